//! [`ClientError`]: why a request got no response.

use std::time::Duration;

use crate::store::BoxError;

/// Why [`IdempotentClient`](super::IdempotentClient) returned no response; it reaches the caller
/// boxed, as a [`BoxError`] (see [Errors](crate::client#errors)).
///
/// A retryable status that is still there after the last attempt is not an
/// error: that response is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The inner service failed on the last attempt (or, with `attempts`
    /// 0, while becoming ready before any attempt).
    #[error("the request failed after {attempts} attempt(s)")]
    Inner {
        /// The inner service's error, boxed.
        source: BoxError,
        /// How many attempts were sent.
        attempts: u32,
    },
    /// The last attempt got no response head within the per-attempt
    /// timeout.
    #[error("the request timed out after {attempts} attempt(s) of {timeout:?} each")]
    Timeout {
        /// How many attempts were sent.
        attempts: u32,
        /// The per-attempt timeout.
        timeout: Duration,
    },
    /// The request body failed while it was buffered; nothing was sent.
    #[error("the request body could not be read")]
    Body(#[source] BoxError),
    /// The request body grew past the buffering limit while it was read;
    /// nothing was sent.
    #[error("the request body exceeds the {limit} bytes buffered for retries")]
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
}

impl ClientError {
    /// How many attempts were sent (0 when the body failed, or the service
    /// failed to become ready before the first one).
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Inner { attempts, .. } | Self::Timeout { attempts, .. } => *attempts,
            Self::Body(_) | Self::BodyTooLarge { .. } => 0,
        }
    }

    /// Whether the last attempt timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// The inner service's error, if that is what ended the request.
    pub fn inner(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Self::Inner { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }

    pub(super) fn inner_boxed(source: impl Into<BoxError>, attempts: u32) -> BoxError {
        Box::new(Self::Inner {
            source: source.into(),
            attempts,
        })
    }
}
