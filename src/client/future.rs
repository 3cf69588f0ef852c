//! [`ResponseFuture`], the future [`IdempotentClient`] answers with.
//!
//! [`IdempotentClient`]: super::IdempotentClient

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::ClientError;
use crate::store::BoxError;
use crate::util::BoxFuture;

pin_project! {
    /// The response future of [`IdempotentClient`](super::IdempotentClient): the inner future for a
    /// request the layer does not cover, a boxed retry loop for a covered
    /// one.
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, T> {
        Passthrough {
            #[pin]
            fut: F,
        },
        Covered {
            fut: BoxFuture<Result<T, BoxError>>,
        },
    }
}

impl<F, T> ResponseFuture<F, T> {
    /// The inner service's own future, for a request the layer does not
    /// cover.
    pub(super) fn passthrough(fut: F) -> Self {
        Self {
            kind: Kind::Passthrough { fut },
        }
    }

    /// The retry loop of a covered request.
    pub(super) fn covered(fut: BoxFuture<Result<T, BoxError>>) -> Self {
        Self {
            kind: Kind::Covered { fut },
        }
    }
}

impl<F, T> fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Covered { .. } => "Covered",
        };
        f.debug_tuple("ResponseFuture").field(&name).finish()
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { fut } => {
                let res = ready!(fut.poll(cx));
                Poll::Ready(res.map_err(|error| ClientError::inner_boxed(error, 1)))
            }
            KindProj::Covered { fut } => fut.as_mut().poll(cx),
        }
    }
}
