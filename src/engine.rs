//! The transport-neutral core: lock, run once, record, replay.
//!
//! Both faces, the HTTP layer ([`Idempotency`](crate::Idempotency)) and the
//! message face ([`message`](crate::message)), are thin shells over this
//! engine. A face turns its input into a [`StoreKey`] and a
//! [`Fingerprint`], asks the engine to [`acquire`](Engine::acquire), runs
//! its handler through [`execute`](Engine::execute), and hands the outcome
//! to [`complete`](Engine::complete) or [`release`](Engine::release). What
//! the engine owns, once for every face:
//!
//! - the bound on every store call, and its timing;
//! - the in-flight policy (answer at once, or wait and begin again) and the
//!   store-error policy (fail closed or open);
//! - the mismatch check: a fingerprint that differs from the stored one;
//! - the lease heartbeat while the handler runs, with a hook the face may
//!   add (a broker's "still working" signal), and the news that the lease
//!   was lost;
//! - catching a handler's panic, so that the key is released;
//! - the background retries of a record write or a release that failed
//!   ([`store::retry_with_backoff`](crate::store)), and what a failed write
//!   means for a transactional store (the handler's writes rolled back).
//!
//! Running to completion when the caller goes away is the faces' part: each
//! wraps its whole covered path in a `Detached` future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::future::CatchUnwind;
use crate::observe::store_latency;
use crate::record::Record;
use crate::store::{
    Attachment, Begin, LockToken, Store, StoreError, StoreKey, log_store_error, retry_with_backoff,
};
use crate::util::BoxFuture;

/// What a duplicate gets while the first request with its key still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlightPolicy {
    /// Answer at once: `409 Conflict` with `Retry-After` over HTTP (the
    /// draft's behaviour), [`Processed::InFlight`](crate::message::Processed::InFlight)
    /// for a message.
    Reject,
    /// Wait up to this long for the first request to finish and replay its
    /// outcome; answer as [`Reject`](Self::Reject) if it has not finished
    /// by then.
    Wait(Duration),
}

/// What the engine does when the store fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorPolicy {
    /// `503 Service Unavailable` with `Retry-After` over HTTP,
    /// [`Processed::StoreError`](crate::message::Processed::StoreError) for a
    /// message: the handler does not run, so a duplicate cannot run twice.
    /// The default.
    FailClosed,
    /// Run the handler without idempotency: availability over exactly-once.
    /// A retry during the outage may run twice. A record the store holds
    /// but cannot read ([`StoreError::Corrupt`](crate::store::StoreError::Corrupt),
    /// [`StoreError::Undecodable`](crate::store::StoreError::Undecodable))
    /// still fails closed: the request it records has run.
    FailOpen,
}

/// A heartbeat hook: called after every lease extension that succeeded.
pub(crate) type Beat = Arc<dyn Fn() -> BoxFuture<()> + Send + Sync>;

/// The settings every face shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) in_flight: InFlightPolicy,
    pub(crate) on_store_error: StoreErrorPolicy,
    pub(crate) store_timeout: Duration,
    pub(crate) complete_retries: u32,
}

impl Settings {
    /// The shortest lease either face accepts: a heartbeat every third of
    /// it must still have time for a store round trip.
    const MIN_LEASE: Duration = Duration::from_millis(30);

    /// Sets the lease, raised to [`MIN_LEASE`](Self::MIN_LEASE).
    pub(crate) fn set_lease(&mut self, lease: Duration) {
        self.lease = lease.max(Self::MIN_LEASE);
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(30),
            in_flight: InFlightPolicy::Reject,
            on_store_error: StoreErrorPolicy::FailClosed,
            store_timeout: Duration::from_secs(2),
            complete_retries: 8,
        }
    }
}

/// The store and the settings: everything a face needs to run its
/// requests exactly once. Cheap to clone.
///
/// Its steps are futures held inside every covered request's boxed future,
/// so they are laid out for size: functions returning an async block
/// rather than async fns (an async fn keeps each argument twice, as the
/// argument and as the local it is moved into), the store call a future
/// written out ([`StoreCall`]), and no value kept across an await that
/// does not need it.
#[derive(Clone)]
pub(crate) struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) settings: Settings,
}

/// What [`Engine::acquire`] decided.
#[derive(Debug)]
pub(crate) enum Acquired {
    /// The caller holds the lock: run the handler.
    Lock(LockToken),
    /// Completed before with the same fingerprint: replay this record.
    Replay(Record),
    /// The key is in use, or was used, with another fingerprint.
    Mismatch,
    /// Another caller holds the lock (and did not finish within the wait).
    InFlight,
    /// The store failed, and the policy is to fail closed.
    Failed(StoreError),
    /// The store failed, and the policy is to run without idempotency.
    FailOpen,
}

/// How a handler's run ended, from [`Engine::execute`].
pub(crate) enum Executed<T> {
    /// The handler finished with `output`. `lease_held` is `false` if a
    /// heartbeat found the lock taken over while it ran.
    Done { output: T, lease_held: bool },
    /// The handler panicked (when called or while polled).
    Panicked,
}

/// What became of a record write, from [`Engine::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The record is stored.
    Written,
    /// The lock was taken over: nothing was written.
    LeaseLost,
    /// The write failed and is being retried in the background.
    Deferred,
    /// The write failed on a transactional store: the handler's own
    /// writes were rolled back with it.
    RolledBack,
}

impl Engine {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            settings: Settings::default(),
        }
    }

    /// One store call, cut off at the layer's store timeout and timed.
    pub(crate) fn call_store<T, F>(&self, op: &'static str, call: F) -> StoreCall<F>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        // Read the clock only for someone who will see the figure.
        let timed = cfg!(feature = "metrics") || !tracing::Span::current().is_disabled();
        StoreCall {
            call,
            limit: self.settings.store_timeout,
            timer: None,
            op,
            started: timed.then(Instant::now),
        }
    }

    /// Takes the lock for `key`, or says why not: a replay, a mismatch, a
    /// request in flight (after waiting, if the policy says so), or a store
    /// failure under the store-error policy.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    pub(crate) fn acquire(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
    ) -> impl Future<Output = Acquired> {
        async move {
            let deadline = match self.settings.in_flight {
                InFlightPolicy::Wait(bound) => Some(Instant::now() + bound),
                InFlightPolicy::Reject => None,
            };
            loop {
                // How long to wait for the holder. Scoped: the store's answer
                // is not kept across the wait.
                let left = {
                    let begun = self
                        .call_store(
                            "begin",
                            self.store
                                .as_ref()
                                .begin(key, fingerprint, self.settings.lease),
                        )
                        .await;
                    match begun {
                        Ok(Begin::Acquired(token)) => return Acquired::Lock(token),
                        Ok(Begin::Completed(record)) => {
                            if record.fingerprint() != fingerprint {
                                tracing::debug!(key = %key, outcome = "mismatch");
                                return Acquired::Mismatch;
                            }
                            tracing::debug!(key = %key, outcome = "replayed");
                            return Acquired::Replay(record);
                        }
                        Ok(Begin::InFlight { fingerprint: held }) => {
                            // A store that cannot see the holder's fingerprint
                            // leaves the mismatch for the replay to find.
                            if held.is_some_and(|held| held != *fingerprint) {
                                tracing::debug!(key = %key, outcome = "mismatch");
                                return Acquired::Mismatch;
                            }
                            let now = Instant::now();
                            match deadline {
                                Some(deadline) if now < deadline => deadline - now,
                                _ => {
                                    tracing::debug!(key = %key, outcome = "conflict");
                                    return Acquired::InFlight;
                                }
                            }
                        }
                        Err(e) => {
                            log_store_error("begin", key, &e);
                            // A record that exists but cannot be read (corrupt,
                            // tampered with, sealed under an unknown key) is
                            // never taken for a missing one, whatever the
                            // policy: that would run the request again.
                            let unreadable =
                                matches!(e, StoreError::Corrupt(_) | StoreError::Undecodable(_));
                            return match self.settings.on_store_error {
                                StoreErrorPolicy::FailOpen if !unreadable => Acquired::FailOpen,
                                _ => Acquired::Failed(e),
                            };
                        }
                    }
                };
                // Boxed: only a layer that waits for in-flight requests gets
                // here, and its timer would make every request's future larger.
                let waited = Box::pin(tokio::time::timeout(
                    left + self.settings.store_timeout,
                    self.store.as_ref().wait(key, left),
                ))
                .await;
                if let Ok(Err(e)) = waited {
                    log_store_error("wait", key, &e);
                }
            }
        }
    }

    /// The store's request-scoped state for the holder of `token`.
    pub(crate) fn attachment(&self, key: &StoreKey, token: &LockToken) -> Option<Attachment> {
        self.store.attachment(key, token)
    }

    /// Whether a failed record write rolls the handler's writes back.
    pub(crate) fn is_transactional(&self) -> bool {
        self.store.capabilities().is_transactional()
    }

    /// Starts the handler and runs it to its end while the lease is
    /// extended every third of it, catching a panic in either step. `beat`
    /// is called after every extension that succeeded.
    pub(crate) async fn execute<F: Future>(
        &self,
        key: &StoreKey,
        token: &LockToken,
        start: impl FnOnce() -> F,
        beat: Option<&Beat>,
    ) -> Executed<F::Output> {
        let Some(fut) = Self::start(start) else {
            return Executed::Panicked;
        };
        let fut = std::pin::pin!(fut);
        match self.heartbeat(key, token, fut, beat).await {
            (Ok(output), lease_held) => Executed::Done { output, lease_held },
            (Err(_panic), _) => Executed::Panicked,
        }
    }

    /// Starts a handler: calls `start`, catching a panic in the call
    /// itself (`None`), and wraps the future it returns so that a panic
    /// while it runs becomes an `Err`. Not async: whatever `start` captures
    /// (an HTTP request, say) is consumed here, not held by a future.
    pub(crate) fn start<F: Future>(start: impl FnOnce() -> F) -> Option<CatchUnwind<F>> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(start))
            .ok()
            .map(CatchUnwind::new)
    }

    /// Runs `fut` while extending the lease every third of it; also says
    /// whether the lease still held at the last extension. Pinned by the
    /// caller: an async fn that takes a future by value holds it twice.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    pub(crate) fn heartbeat<F: Future>(
        &self,
        key: &StoreKey,
        token: &LockToken,
        mut fut: Pin<&mut F>,
        hook: Option<&Beat>,
    ) -> impl Future<Output = (F::Output, bool)> {
        async move {
            // A future that finishes on its first poll needs no heartbeat, and
            // its request's future no room for one.
            if let Poll::Ready(out) =
                std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
            {
                return (out, true);
            }
            let lease = self.settings.lease;
            let mut lost = false;
            let beat = Box::pin(async {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match self
                        .call_store("extend", self.store.as_ref().extend(key, token, lease))
                        .await
                    {
                        Ok(true) => {
                            if let Some(hook) = hook
                                && tokio::time::timeout(lease / 3, hook()).await.is_err()
                            {
                                tracing::warn!(key = %key, "heartbeat hook did not finish within a third of the lease");
                            }
                        }
                        Ok(false) => {
                            tracing::warn!(key = %key, "lease lost while the handler ran: another caller took the key over; this outcome will not be recorded");
                            lost = true;
                            return;
                        }
                        Err(e) => log_store_error("extend", key, &e),
                    }
                }
            });
            // The heartbeat ends only when the lease is lost; the future is
            // then still awaited, alone. (No output is kept across that await:
            // it would take room in every caller's future.)
            tokio::select! {
                biased;
                out = &mut fut => return (out, !lost),
                () = beat => {}
            }
            (fut.await, !lost)
        }
    }

    /// Drops the lock so a retry may run; a store failure is retried in the
    /// background, as a lock left behind refuses every retry until its
    /// lease ends.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    pub(crate) fn release(&self, key: &StoreKey, token: &LockToken) -> impl Future<Output = ()> {
        async move {
            match self
                .call_store("release", self.store.as_ref().release(key, token))
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(key = %key, "release found the lock taken over");
                }
                Err(e) => {
                    log_store_error("release", key, &e);
                    let (this, key, token) = (self.clone(), *key, *token);
                    tokio::spawn(async move {
                        let answered = retry_with_backoff(
                            "release retry",
                            &key,
                            this.settings.complete_retries,
                            |attempt| this.backoff(attempt),
                            || {
                                this.call_store(
                                    "release",
                                    this.store.as_ref().release(&key, &token),
                                )
                            },
                        )
                        .await;
                        if answered.is_none() {
                            tracing::error!(key = %key, "lock not released: it expires with its lease");
                        }
                    });
                }
            }
        }
    }

    /// The wait before background retry `attempt`: exponential from 50 ms,
    /// and well inside the lease, which still holds the key while the store
    /// recovers.
    fn backoff(&self, attempt: u32) -> Duration {
        Duration::from_millis(50 << attempt.min(10)).min(self.settings.lease / 4)
    }

    /// Writes the record. On a store failure the caller answers anyway and
    /// the write is retried in the background (with a copy of the record) a
    /// bounded number of times, unless the store is transactional: then the
    /// handler's writes were rolled back and nothing is retried.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    pub(crate) fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> impl Future<Output = Completion> {
        async move {
            match self
                .call_store(
                    "complete",
                    self.store.as_ref().complete(key, token, record, ttl),
                )
                .await
            {
                Ok(true) => return Completion::Written,
                Ok(false) if self.is_transactional() => {
                    tracing::error!(key = %key, "the record could not be written and the handler's writes were rolled back");
                    return Completion::RolledBack;
                }
                Ok(false) => {
                    tracing::warn!(key = %key, "lease lost before completion: another caller took the key over; this outcome is not recorded");
                    return Completion::LeaseLost;
                }
                Err(e) => log_store_error("complete", key, &e),
            }
            if self.is_transactional() {
                // The store finishes its transaction in `complete` whatever
                // happens; a release makes sure of it. Fenced, it finds nothing
                // then: that `false` is expected, not a lock taken over.
                if let Err(e) = self
                    .call_store("release", self.store.as_ref().release(key, token))
                    .await
                {
                    log_store_error("release", key, &e);
                }
                tracing::error!(key = %key, "completion failed and the handler's writes were rolled back");
                return Completion::RolledBack;
            }
            let retries = self.settings.complete_retries;
            if retries == 0 {
                return Completion::Deferred;
            }
            let (key, token, record) = (*key, *token, record.clone());
            let this = self.clone();
            tokio::spawn(async move {
                let answered = retry_with_backoff(
                    "complete retry",
                    &key,
                    retries,
                    |attempt| this.backoff(attempt),
                    || {
                        this.call_store(
                            "complete",
                            this.store.as_ref().complete(&key, &token, &record, ttl),
                        )
                    },
                )
                .await;
                match answered {
                    Some(true) => tracing::info!(key = %key, "record completed on retry"),
                    Some(false) => tracing::warn!(key = %key, "lease lost before completion retry"),
                    None => {
                        tracing::error!(key = %key, retries, "record not written: the key stays locked until its lease expires, then a retry runs again")
                    }
                }
            });
            Completion::Deferred
        }
    }
}

pin_project_lite::pin_project! {
    /// A store call bounded by `limit`, its latency recorded when it
    /// answers ([`Engine::call_store`]). The timer is armed only if the
    /// call does not answer on its first poll (the memory store always
    /// does): arming one costs more than such a call, and a future that may
    /// need one would carry it. Written out rather than an async fn, as it
    /// sits inside every covered request's future.
    pub(crate) struct StoreCall<F> {
        #[pin]
        call: F,
        limit: Duration,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        op: &'static str,
        started: Option<Instant>,
    }
}

impl<T, F> Future for StoreCall<F>
where
    F: Future<Output = Result<T, StoreError>>,
{
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = match this.call.poll(cx) {
            Poll::Ready(out) => out,
            Poll::Pending => {
                let limit = *this.limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Err(StoreError::Timeout(limit)),
                    Poll::Pending => return Poll::Pending,
                }
            }
        };
        if let Some(started) = this.started.take() {
            store_latency(this.op, started.elapsed());
        }
        Poll::Ready(out)
    }
}
