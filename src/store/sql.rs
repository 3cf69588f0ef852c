//! What the SQL stores ([`PostgresStore`](super::PostgresStore),
//! [`MySqlStore`](super::MySqlStore), [`SqliteStore`](super::SqliteStore))
//! have in common: identifier checks, the decoding of a live row, bounded
//! calls with their error mapping, a `begin` whose answer may go missing,
//! and the sweeper loop.
//!
//! Every SQL store keeps the same row: the key's SHA-256, the fingerprint,
//! a state (0 in flight, 1 completed), the holder's lock token while in
//! flight, the [`Record::encode`] bytes once completed, and an expiry (the
//! lease end in flight, the ttl end once completed). Only the column types
//! and the statements differ between databases.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Begin, LockToken, Store, StoreError, StoreKey, release_unanswered};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

/// The least bound for `migrate` and `delete_expired`, which are not on a
/// request's path.
pub(crate) const MAINTENANCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a `begin` runs again when the row it saw changed under it.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) const BEGIN_ATTEMPTS: usize = 5;

/// A schema or table name that is not a plain SQL identifier.
///
/// Names must be a letter or underscore, then letters, digits or
/// underscores, within the database's length limit (63 bytes for
/// PostgreSQL, 64 for MySQL and SQLite). Stores quote every name, so its case
/// is kept. The error reaches the caller as [`StoreError::Backend`] and can be
/// recovered with `downcast_ref`.
///
/// ```
/// # #[cfg(feature = "postgres")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower_idempotency::store::{InvalidIdentifier, StoreError, postgres::PostgresStore};
///
/// # let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://localhost/app").unwrap();
/// let store = PostgresStore::new(pool);
/// match store.with_table("orders; DROP TABLE users") {
///     Err(StoreError::Backend(err)) => {
///         let err = err.downcast_ref::<InvalidIdentifier>().unwrap();
///         assert_eq!(err.name(), "orders; DROP TABLE users");
///     }
///     _ => unreachable!(),
/// }
/// # }
/// # #[cfg(not(feature = "postgres"))]
/// # fn main() {}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid SQL identifier {name:?}: expected a letter or underscore, then up to {} letters, digits or underscores",
    max_len - 1
)]
pub struct InvalidIdentifier {
    name: String,
    max_len: usize,
}

impl InvalidIdentifier {
    /// The rejected name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// `name` if it is a plain identifier of at most `max_len` bytes.
pub(crate) fn identifier(name: &str, max_len: usize) -> Result<String, StoreError> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && name.len() <= max_len
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(name.to_owned())
    } else {
        Err(StoreError::backend(InvalidIdentifier {
            name: name.to_owned(),
            max_len,
        }))
    }
}

/// `d`, capped at about 1000 years.
pub(crate) fn capped(d: Duration) -> Duration {
    d.min(super::MAX_EXPIRY)
}

/// `d` in whole microseconds, capped, as the MySQL and SQLite statements
/// take it.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn micros(d: Duration) -> i64 {
    // 1000 years of microseconds is about 3.2e16: far inside i64.
    i64::try_from(capped(d).as_micros()).unwrap_or(i64::MAX)
}

/// A live row that is not the caller's (its state, fingerprint and record
/// columns) as the outcome of a `begin`: in flight, or completed.
pub(crate) fn live_row(
    state: Option<i64>,
    fingerprint: Option<Vec<u8>>,
    record: Option<Vec<u8>>,
) -> Result<Begin, StoreError> {
    match state {
        Some(0) => {
            let stored = fingerprint
                .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
                .ok_or_else(|| malformed("fingerprint is not 32 bytes"))?;
            Ok(Begin::InFlight {
                fingerprint: Some(Fingerprint::from_bytes(stored)),
            })
        }
        Some(1) => {
            let bytes = record.ok_or_else(|| malformed("completed row without a record"))?;
            Ok(Begin::Completed(Record::decode_bytes(Bytes::from(bytes))?))
        }
        _ => Err(malformed("unknown state")),
    }
}

fn malformed(what: &'static str) -> StoreError {
    StoreError::backend(format!("malformed idempotency row: {what}"))
}

/// Maps a sqlx error: connection-level failures, and the database errors
/// `unavailable` picks (a server shutting down, out of connections, a lock
/// held too long), are [`StoreError::Unavailable`]; everything else is
/// [`StoreError::Backend`].
pub(crate) fn classify(
    err: sqlx::Error,
    unavailable: fn(&(dyn sqlx::error::DatabaseError + 'static)) -> bool,
) -> StoreError {
    use sqlx::Error as E;
    let is_unavailable = match &err {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => true,
        E::Database(db) => unavailable(db.as_ref()),
        _ => false,
    };
    if is_unavailable {
        StoreError::unavailable(err)
    } else {
        StoreError::backend(err)
    }
}

/// Runs `op` until `deadline`, mapping its errors with `unavailable`; a
/// timeout reports `limit`.
pub(crate) async fn bounded_until<T>(
    deadline: Instant,
    limit: Duration,
    unavailable: fn(&(dyn sqlx::error::DatabaseError + 'static)) -> bool,
    op: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout_at(deadline, op).await {
        Ok(result) => result.map_err(|err| classify(err, unavailable)),
        Err(_) => Err(StoreError::Timeout(limit)),
    }
}

/// Runs a `begin` statement on a task of its own and waits for its answer
/// until `deadline`.
///
/// A statement cut off here (by the deadline, or by the caller dropping
/// `begin`) still runs on in the server, and may take the key under
/// `token`, for instance once a row lock it waits for is freed. Its task
/// sees that nobody took the answer and releases the lock as soon as the
/// statement has finished (`acquired` tells whether it took the key). A
/// release sent alongside instead could run before the statement commits,
/// find nothing, and leave the key locked until the lease ends.
pub(crate) async fn answered_begin<S, R>(
    store: &S,
    key: StoreKey,
    token: LockToken,
    deadline: Instant,
    limit: Duration,
    statement: impl Future<Output = Result<R, StoreError>> + Send + 'static,
    acquired: fn(&R) -> bool,
) -> Result<R, StoreError>
where
    S: Store + Clone,
    R: Send + 'static,
{
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let owner = store.clone();
    tokio::spawn(async move {
        let answer = statement.await;
        if let Err(Ok(unanswered)) = tx.send(answer)
            && acquired(&unanswered)
        {
            release_unanswered(&owner, &key, &token).await;
        }
    });
    match tokio::time::timeout_at(deadline, &mut rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(StoreError::backend("begin's task ended without an answer")),
        Err(_) => {
            // No answer from here on: the task releases what it takes. One
            // that arrived as the deadline passed is released here.
            rx.close();
            if let Ok(Ok(answer)) = rx.try_recv()
                && acquired(&answer)
            {
                let store = store.clone();
                tokio::spawn(async move {
                    release_unanswered(&store, &key, &token).await;
                });
            }
            Err(StoreError::Timeout(limit))
        }
    }
}

/// Spawns the sweeper loop of a SQL store: every `interval`, `sweep(batch)`
/// until a call deletes fewer than `batch` rows. Errors are logged (through
/// `tracing`, at `warn`) and the task goes on; it ends once `closed` says
/// the pool is closed.
pub(crate) fn spawn_sweeper<S, F, Fut>(
    store: S,
    table: String,
    interval: Duration,
    batch: usize,
    closed: fn(&S) -> bool,
    sweep: F,
) -> tokio::task::JoinHandle<()>
where
    S: Send + 'static,
    F: Fn(&S, usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<u64, StoreError>> + Send,
{
    let batch = batch.max(1);
    tokio::spawn(async move {
        // A closed pool stays closed: the application is shutting down.
        while !closed(&store) {
            let mut total = 0u64;
            loop {
                match sweep(&store, batch).await {
                    Ok(n) => {
                        total += n;
                        if n < batch as u64 {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(err) => {
                        tracing::warn!(
                            table = %table,
                            error = %err,
                            source = ?std::error::Error::source(&err),
                            "idempotency sweep failed"
                        );
                        break;
                    }
                }
            }
            if total > 0 {
                tracing::debug!(table = %table, deleted = total, "idempotency sweep");
            }
            tokio::time::sleep(interval).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        for ok in ["a", "_", "idempotency_records", "T1", &"x".repeat(63)] {
            assert_eq!(identifier(ok, 63).ok().as_deref(), Some(ok));
        }
        assert!(identifier(&"x".repeat(64), 64).is_ok());
        for bad in [
            "",
            "1a",
            "a-b",
            "a b",
            "a\"b",
            "a`b",
            "é",
            "public.t",
            &"x".repeat(64),
        ] {
            match identifier(bad, 63) {
                Err(StoreError::Backend(err)) => {
                    let err = err.downcast_ref::<InvalidIdentifier>();
                    assert_eq!(err.map(InvalidIdentifier::name), Some(bad));
                }
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
    }

    #[test]
    #[cfg(any(feature = "mysql", feature = "sqlite"))]
    fn intervals_are_capped() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(capped(Duration::MAX), crate::store::MAX_EXPIRY);
        assert_eq!(
            micros(Duration::MAX),
            crate::store::MAX_EXPIRY.as_micros() as i64
        );
    }

    #[test]
    fn live_rows_decode_or_fail_typed() {
        let fp = Fingerprint::from_bytes([7; 32]);
        match live_row(Some(0), Some(vec![7; 32]), None) {
            Ok(Begin::InFlight { fingerprint }) => assert_eq!(fingerprint, Some(fp)),
            other => panic!("{other:?}"),
        }
        let record = Record::value(fp, Bytes::from_static(b"v"));
        match live_row(Some(1), Some(vec![7; 32]), Some(record.encode().to_vec())) {
            Ok(Begin::Completed(r)) => assert_eq!(*r.fingerprint(), fp),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            live_row(Some(0), Some(vec![7; 31]), None),
            Err(StoreError::Backend(_))
        ));
        assert!(matches!(
            live_row(Some(1), None, None),
            Err(StoreError::Backend(_))
        ));
        assert!(matches!(
            live_row(Some(1), None, Some(b"garbage".to_vec())),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            live_row(Some(2), None, None),
            Err(StoreError::Backend(_))
        ));
    }
}
