//! What happens when a store call's answer is lost or a write fails: the
//! guard that releases a lock whose `begin` went unanswered, that release,
//! and the one retry loop for writes that must not be lost. The contract
//! itself is in the parent module.

use std::time::Duration;

#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite",
    feature = "dynamodb"
))]
use super::{LockToken, Store};
use super::{StoreError, StoreKey};
use crate::observe::Outcome;

/// Guards a `begin` whose command may reach the backend even though the
/// caller never learns the answer (a timeout, a dropped connection, a
/// cancelled future). Unless [`settled`](Self::settled), dropping it
/// releases the lock under the attempt's own token in the background: the
/// release is fenced, so it can only free a lock this very attempt took.
/// Without it such a lock would refuse every retry until its lease ran out.
#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]
pub(crate) struct Unsettled<S: Store + Clone> {
    store: Option<S>,
    key: StoreKey,
    token: LockToken,
}

#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]
impl<S: Store + Clone> Unsettled<S> {
    pub(crate) fn new(store: &S, key: &StoreKey, token: LockToken) -> Self {
        Self {
            store: Some(store.clone()),
            key: *key,
            token,
        }
    }

    /// The answer arrived: nothing to clean up.
    pub(crate) fn settled(mut self) {
        self.store = None;
    }
}

#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]
impl<S: Store + Clone> Drop for Unsettled<S> {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (key, token) = (self.key, self.token);
        handle.spawn(async move {
            release_unanswered(&store, &key, &token).await;
        });
    }
}

/// Releases the lock `token` may hold on `key` although its `begin` went
/// unanswered, retrying a store failure a few times with backoff. Returns
/// whether a lock was released.
#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite",
    feature = "dynamodb"
))]
pub(crate) async fn release_unanswered<S: Store + ?Sized>(
    store: &S,
    key: &StoreKey,
    token: &LockToken,
) -> bool {
    let first = store.release(key, token).await;
    let released = match first {
        Ok(released) => Some(released),
        Err(_) => {
            retry_with_backoff(
                "release unanswered",
                key,
                6,
                |attempt| Duration::from_millis(100 << attempt),
                || store.release(key, token),
            )
            .await
        }
    };
    match released {
        Some(true) => {
            tracing::info!(key = %key, "released a lock whose begin went unanswered");
            true
        }
        Some(false) => false,
        None => {
            tracing::warn!(key = %key, "could not release a lock whose begin went unanswered; it expires with its lease");
            false
        }
    }
}

/// The one retry loop for store writes that must not be lost (a record, a
/// release): up to `attempts` more calls, each after `backoff(attempt)`.
/// Returns the first answer, or `None` if every attempt failed; each
/// failure is logged.
pub(crate) async fn retry_with_backoff<F, Fut>(
    op: &'static str,
    key: &StoreKey,
    attempts: u32,
    backoff: impl Fn(u32) -> Duration,
    mut call: F,
) -> Option<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, StoreError>>,
{
    for attempt in 0..attempts {
        tokio::time::sleep(backoff(attempt)).await;
        match call().await {
            Ok(answer) => return Some(answer),
            Err(e) => log_store_error(op, key, &e),
        }
    }
    None
}

/// Logs a failed store call with the key's hash prefix (never the key) and
/// the error's source.
pub(crate) fn log_store_error(op: &'static str, key: &StoreKey, error: &StoreError) {
    let source = std::error::Error::source(error).map(ToString::to_string);
    tracing::error!(key = %key, op, error = %error, source = source.as_deref().unwrap_or(""), outcome = Outcome::StoreError.as_str(), "idempotency store call failed");
}
