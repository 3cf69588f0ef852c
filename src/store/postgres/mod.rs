//! [`PostgresStore`]: durable records in PostgreSQL, shared by every
//! instance of the application, through the sqlx [`PgPool`] the application
//! already has.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//! use tower_idempotency::store::postgres::{PgPool, PostgresStore};
//!
//! async fn create_payment() -> &'static str {
//!     "charged once"
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PgPool::connect("postgres://app@db.internal/app").await?;
//! let store = PostgresStore::new(pool);
//! store.migrate().await?; // creates the table and its index if missing
//! let _sweeper = store.spawn_sweeper(std::time::Duration::from_secs(60), 1000);
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(store));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! # Schema
//!
//! One row per store key, in `public.idempotency_records` unless
//! [`with_schema`](PostgresStore::with_schema) or
//! [`with_table`](PostgresStore::with_table) say otherwise:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "public"."idempotency_records" (
//!     key         bytea       PRIMARY KEY,         -- SHA-256 of scope and key
//!     fingerprint bytea       NOT NULL,            -- of the request holding the key
//!     state       smallint    NOT NULL,            -- 0 in flight, 1 completed
//!     lock_token  bytea,                           -- the holder's token while in flight
//!     record      bytea,                           -- the encoded record once completed
//!     created_at  timestamptz NOT NULL DEFAULT now(),
//!     expires_at  timestamptz NOT NULL             -- lease end in flight, ttl end completed
//! );
//! CREATE INDEX IF NOT EXISTS "idempotency_records_expires_at_idx"
//!     ON "public"."idempotency_records" (expires_at);
//! ```
//!
//! The record column holds [`Record::encode`](crate::record::Record::encode) bytes, the crate's versioned
//! encoding. [`migrate`](PostgresStore::migrate) creates all of it, or the
//! statements above can go into the application's own migrations.
//!
//! # One statement per step
//!
//! Every [`Store`](crate::store::Store) call is one SQL statement in its own implicit
//! transaction, and every time comparison uses the database's `now()`,
//! never the application's clock:
//!
//! - `begin` reads the live row and, only when there is none, runs an
//!   `INSERT … ON CONFLICT DO UPDATE … WHERE expires_at <= now()` that takes
//!   a missing or expired key, all in one statement. A replay or a conflict
//!   therefore writes nothing: its transaction is read-only and commits
//!   without a WAL flush. Under a race the row may have been committed after
//!   the statement's snapshot was taken; the statement is then run again
//!   (rare, and bounded).
//! - `complete`, `release` and `extend` are one `UPDATE` or `DELETE` each,
//!   fenced by the lock token and a live lease.
//!
//! Each statement is one round trip once the connection has prepared it.
//! sqlx itself pings a connection when it goes back to the pool (off the
//! request's path) and, unless the pool is built with
//! `test_before_acquire(false)`, when it hands one out: build the pool with
//! `test_before_acquire(false)` to save that round trip on every call (a
//! broken connection still fails the call, which the layer answers with
//! 503, and sqlx drops it).
//!
//! Expired rows are never returned; they are taken over by the next `begin`
//! and removed by [`delete_expired`](PostgresStore::delete_expired), which
//! [`spawn_sweeper`](PostgresStore::spawn_sweeper) calls periodically.
//!
//! # Asynchronous lock commit
//!
//! A first execution commits twice, the lock and then the record, and by
//! default each commit waits for PostgreSQL to flush the WAL to disk. With
//! [`with_async_lock_commit(true)`](PostgresStore::with_async_lock_commit),
//! `begin` commits a lock it takes with `synchronous_commit` off for that
//! statement alone, so only the record's commit waits for a flush (which
//! also flushes the lock, written before it). What a crash of the database
//! server does then, moment by moment:
//!
//! - **Before the lock's commit**: as without the option; the statement
//!   fails, the layer answers 503, and nothing ran.
//! - **After the lock's commit, before its WAL reaches disk** (the WAL
//!   writer flushes within about three times `wal_writer_delay`, 200 ms by
//!   default): the lock is lost. The handler may be running or done; its
//!   record write is refused by the fence (no row holds its token), so the
//!   client gets the handler's response but nothing is recorded. A retry
//!   after the restart finds the key free and **runs the handler again**.
//!   This is the one case the option gives up. Without it, the lock
//!   survives, the layer retries the record within the lease, and the
//!   retry gets 409 and then the replay.
//! - **After the lock's WAL is on disk**: as without the option.
//! - **After the record's commit**: as without the option; the record,
//!   and the lock before it, are on disk before the client gets its
//!   response.
//!
//! A crash of the application, a lost connection or a timeout change
//! nothing: only the database losing WAL it had not flushed does. That
//! includes a failover: an asynchronous commit does not wait for a
//! synchronous standby either, so a promoted standby may lack the newest
//! locks, with the same result as a crash. Turn it on where a first execution's
//! latency matters more than that window, or where the handler's own effect
//! is idempotent. [`TransactionalPostgresStore`] commits once per first
//! execution already (its lock is an advisory lock inside the request's
//! transaction), so the option does not apply to it.
//!
//! # Timeouts and errors
//!
//! Every call, acquiring a pooled connection included, is bounded by
//! [`with_timeout`](PostgresStore::with_timeout) (1 second by default),
//! whatever the pool's own `acquire_timeout`: past it the call fails with
//! [`StoreError::Timeout`](crate::store::StoreError::Timeout). A connection failure is
//! [`StoreError::Unavailable`](crate::store::StoreError::Unavailable), a record that does not decode
//! [`StoreError::Corrupt`](crate::store::StoreError::Corrupt), anything else [`StoreError::Backend`](crate::store::StoreError::Backend). A call
//! cut short by the bound may still have been applied by the server: a
//! `begin` that took the lock then releases it as soon as its answer
//! arrives.

//!
//! # Transactions
//!
//! [`TransactionalPostgresStore`] runs the handler's own writes in the
//! transaction that holds the key, so they commit together with the record
//! or not at all; see its documentation.

mod maintenance;
mod postgres_store;
mod sql;
mod transactional;

pub use sqlx::PgPool;

pub use postgres_store::PostgresStore;
pub use transactional::{
    IdempotentTransaction, TransactionFinished, TransactionGuard, TransactionalPostgresStore,
};
