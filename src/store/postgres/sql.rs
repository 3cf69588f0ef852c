//! The statements of a PostgreSQL store, built once per schema and table,
//! and the decoding of its rows and errors: shared by [`PostgresStore`] and
//! [`TransactionalPostgresStore`].
//!
//! [`PostgresStore`]: super::PostgresStore
//! [`TransactionalPostgresStore`]: super::TransactionalPostgresStore

use std::time::Duration;

use sqlx::Row;

use crate::store::sql;
use crate::store::{Begin, StoreError};

pub(super) const DEFAULT_SCHEMA: &str = "public";
pub(super) const DEFAULT_TABLE: &str = "idempotency_records";
/// PostgreSQL's identifier limit (NAMEDATALEN - 1).
pub(super) const MAX_IDENTIFIER: usize = 63;
/// Serializes concurrent `migrate` calls (ASCII "tower_id").
pub(super) const MIGRATE_LOCK: i64 = 0x746f_7765_725f_6964;

pub(super) fn identifier(name: &str) -> Result<String, StoreError> {
    sql::identifier(name, MAX_IDENTIFIER)
}

/// The statements of one store, built once for its schema and table.
pub(super) struct Sql {
    pub(super) schema: String,
    pub(super) table: String,
    /// `"schema"."table"`
    pub(super) qualified: String,
    /// `"schema"."index"`, as `to_regclass` takes it.
    pub(super) qualified_index: String,
    pub(super) create_schema: String,
    pub(super) create_table: String,
    pub(super) create_index: String,
    pub(super) begin: String,
    /// `begin`, committing a lock it takes without waiting for the WAL
    /// flush ([`PostgresStore::with_async_lock_commit`]).
    ///
    /// [`PostgresStore::with_async_lock_commit`]: super::PostgresStore::with_async_lock_commit
    pub(super) begin_async: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) extend: String,
    pub(super) delete_expired: String,
}

impl Sql {
    pub(super) fn new(schema: String, table: String) -> Self {
        let t = format!("\"{schema}\".\"{table}\"");
        let index = index_name(&table);
        let begin = begin_statement(&t, "");
        // `set_config(…, true)` is `SET LOCAL`: it lasts until the end of
        // the statement's implicit transaction, whose commit reads it. It
        // runs only where the statement writes.
        let begin_async = begin_statement(
            &t,
            "AND set_config('synchronous_commit', 'off', true) IS NOT NULL",
        );
        let complete = format!(
            "UPDATE {t} SET state = 1, record = $3, lock_token = NULL, \
                expires_at = now() + make_interval(secs => $4) \
             WHERE key = $1 AND state = 0 AND lock_token = $2 AND expires_at > now()"
        );
        let release = format!(
            "DELETE FROM {t} \
             WHERE key = $1 AND state = 0 AND lock_token = $2 AND expires_at > now()"
        );
        let extend = format!(
            "UPDATE {t} SET expires_at = now() + make_interval(secs => $3) \
             WHERE key = $1 AND state = 0 AND lock_token = $2 AND expires_at > now()"
        );
        let delete_expired = format!(
            "DELETE FROM {t} \
             WHERE key IN ( \
                 SELECT key FROM {t} WHERE expires_at <= now() \
                 LIMIT $1 FOR UPDATE SKIP LOCKED \
             ) AND expires_at <= now()"
        );
        let create_schema = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {t} ( \
                key bytea PRIMARY KEY, \
                fingerprint bytea NOT NULL, \
                state smallint NOT NULL CHECK (state IN (0, 1)), \
                lock_token bytea, \
                record bytea, \
                created_at timestamptz NOT NULL DEFAULT now(), \
                expires_at timestamptz NOT NULL \
            )"
        );
        let create_index = format!("CREATE INDEX IF NOT EXISTS \"{index}\" ON {t} (expires_at)");
        Self {
            qualified_index: format!("\"{schema}\".\"{index}\""),
            qualified: t,
            schema,
            table,
            create_schema,
            create_table,
            create_index,
            begin,
            begin_async,
            complete,
            release,
            extend,
            delete_expired,
        }
    }
}

/// The `begin` statement on the table `t`, `extra` added to the condition
/// under which it inserts.
///
/// The live row is read first, and the INSERT runs only when there is
/// none: a replay or a conflict modifies nothing, so it is a read-only
/// transaction that commits without waiting for the WAL to be flushed. (An
/// `ON CONFLICT DO UPDATE` that finds a live row locks it even when its
/// WHERE is false, which makes every replay a write.)
fn begin_statement(t: &str, extra: &str) -> String {
    format!(
        "WITH live AS ( \
            SELECT fingerprint, state, record FROM {t} \
            WHERE key = $1 AND expires_at > now() \
        ), ins AS ( \
            INSERT INTO {t} AS cur \
                (key, fingerprint, state, lock_token, record, created_at, expires_at) \
            SELECT $1, $2, 0, $3, NULL, now(), now() + make_interval(secs => $4) \
            WHERE NOT EXISTS (SELECT 1 FROM live) {extra} \
            ON CONFLICT (key) DO UPDATE SET \
                fingerprint = EXCLUDED.fingerprint, state = 0, \
                lock_token = EXCLUDED.lock_token, record = NULL, \
                created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at \
            WHERE cur.expires_at <= now() \
            RETURNING 1 \
        ) \
        SELECT true AS acquired, NULL::bytea AS fingerprint, \
               NULL::smallint AS state, NULL::bytea AS record \
        FROM ins \
        UNION ALL \
        SELECT false, fingerprint, state, record FROM live"
    )
}

/// `<table>_expires_at_idx`, or, when that would pass PostgreSQL's 63-byte
/// limit, a prefix of the table name and a hash of all of it, so two long
/// table names never share an index name.
fn index_name(table: &str) -> String {
    const SUFFIX: &str = "_expires_at_idx";
    if table.len() + SUFFIX.len() <= 63 {
        return format!("{table}{SUFFIX}");
    }
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(table.as_bytes());
    let hex = crate::util::hex(&hash[..4]);
    // Identifiers are ASCII: any byte index is a char boundary.
    let keep = 63 - SUFFIX.len() - hex.len() - 1;
    format!("{}_{hex}{SUFFIX}", &table[..keep])
}

/// A live row (its `state`, `fingerprint` and `record` columns) as the
/// outcome of a `begin` that did not take the key: in flight, or completed.
pub(super) fn live_row(row: &sqlx::postgres::PgRow) -> Result<Begin, StoreError> {
    let state: Option<i16> = row.try_get("state").map_err(classify)?;
    sql::live_row(
        state.map(i64::from),
        row.try_get("fingerprint").map_err(classify)?,
        row.try_get("record").map_err(classify)?,
    )
}

pub(super) fn interval_secs(d: Duration) -> f64 {
    sql::capped(d).as_secs_f64()
}

/// Connection-level failures are `Unavailable`; everything else `Backend`.
pub(super) fn classify(err: sqlx::Error) -> StoreError {
    sql::classify(err, unavailable)
}

/// SQLSTATEs that mean the server cannot serve now, rather than that the
/// statement is wrong: connection exceptions (08), insufficient resources
/// (53), shutdown and start-up (57P01-57P03), and a read-only server
/// (25006, as after a failover).
pub(super) fn unavailable(err: &(dyn sqlx::error::DatabaseError + 'static)) -> bool {
    err.code().is_some_and(|code| {
        code.starts_with("08")
            || code.starts_with("53")
            || matches!(&*code, "57P01" | "57P02" | "57P03" | "25006")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated_at_postgres_length() {
        assert!(identifier(&"x".repeat(63)).is_ok());
        assert!(identifier(&"x".repeat(64)).is_err());
    }

    #[test]
    fn index_names_fit_and_differ() {
        assert_eq!(
            index_name("idempotency_records"),
            "idempotency_records_expires_at_idx"
        );
        let a = index_name(&format!("{}a", "x".repeat(62)));
        let b = index_name(&format!("{}b", "x".repeat(62)));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
    }

    #[test]
    fn intervals_are_in_seconds() {
        assert_eq!(interval_secs(Duration::from_millis(1500)), 1.5);
        assert!(interval_secs(Duration::MAX) < 1e11);
    }
}
