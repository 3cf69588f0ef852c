//! The response future of [`Idempotency`](crate::Idempotency), and the
//! futures it is made of.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use crate::body::{BodyMode, ResponseBody, WrapBody};
use crate::util::BoxFuture;

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// A request the layer does not cover is the inner future, unboxed; a
    /// covered one is a boxed future that reads the body, consults the store
    /// and runs the handler.
    ///
    /// # Panics
    ///
    /// Like any future, it panics if polled again after it completed.
    pub struct ResponseFuture<F, B, E, M = WrapBody>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<F, B, E>,
        mode: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E>
    where
        B: Body,
    {
        Passthrough {
            #[pin]
            fut: F,
        },
        Ready {
            // Boxed: a rejection is rare, and the response would make every
            // passthrough future hundreds of bytes larger.
            res: Option<Box<Response<ResponseBody<B>>>>,
        },
        Covered {
            #[pin]
            fut: Detached<Result<Response<ResponseBody<B>>, E>>,
        },
    }
}

impl<F, B: Body, E, M> fmt::Debug for ResponseFuture<F, B, E, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Covered { .. } => "Covered",
        };
        f.debug_tuple("ResponseFuture").field(&name).finish()
    }
}

impl<F, B: Body, E, M> ResponseFuture<F, B, E, M> {
    pub(crate) fn passthrough(fut: F) -> Self {
        Self {
            kind: Kind::Passthrough { fut },
            mode: PhantomData,
        }
    }

    pub(crate) fn ready(res: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                res: Some(Box::new(res)),
            },
            mode: PhantomData,
        }
    }

    pub(crate) fn covered(fut: Detached<Result<Response<ResponseBody<B>>, E>>) -> Self {
        Self {
            kind: Kind::Covered { fut },
            mode: PhantomData,
        }
    }
}

impl<F, B, E, M> Future for ResponseFuture<F, B, E, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    M: BodyMode<B>,
{
    type Output = Result<Response<M::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { fut } => {
                let res = ready!(fut.poll(cx))?;
                Poll::Ready(Ok(res.map(M::passthrough)))
            }
            KindProj::Ready { res } => {
                let res = res.take().expect("ResponseFuture polled after completion");
                Poll::Ready(Ok((*res).map(M::wrap)))
            }
            KindProj::Covered { fut } => {
                let res = ready!(fut.poll(cx))?;
                Poll::Ready(Ok(res.map(M::wrap)))
            }
        }
    }
}

pin_project! {
    /// Turns a panic while polling into an `Err`.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        fut: F,
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(fut: F) -> Self {
        Self { fut }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.project().fut;
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// A future that, if dropped before it finishes (the client went away),
/// moves itself onto a spawned task and runs to completion there: the
/// handler is never cancelled half way, and its response is recorded for the
/// retry. While the client stays, no task is spawned.
pub(crate) struct Detached<T> {
    fut: Option<BoxFuture<T>>,
    // Chosen where `T: Send + 'static` is known, so the type itself needs
    // no bounds (the response future's type stays as general as the body's).
    spawn: fn(BoxFuture<T>),
}

impl<T> Detached<T> {
    pub(crate) fn new(fut: BoxFuture<T>) -> Self
    where
        T: Send + 'static,
    {
        Self {
            fut: Some(fut),
            spawn: spawn_detached::<T>,
        }
    }
}

fn spawn_detached<T: Send + 'static>(fut: BoxFuture<T>) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            tracing::debug!("client went away; the request runs to completion in the background");
            handle.spawn(fut);
        }
        Err(_) => {
            tracing::warn!("request abandoned outside a runtime; its lock expires with its lease")
        }
    }
}

impl<T> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let fut = self
            .fut
            .as_mut()
            .expect("ResponseFuture polled after completion");
        let out = ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(out)
    }
}

impl<T> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            (self.spawn)(fut);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use bytes::Bytes;
    use http::Response;
    use http_body_util::Full;

    use super::*;

    type Fut =
        ResponseFuture<std::future::Ready<Result<Response<Full<Bytes>>, ()>>, Full<Bytes>, ()>;

    #[test]
    #[should_panic(expected = "polled after completion")]
    fn a_ready_response_panics_when_polled_again() {
        let res = Response::new(ResponseBody::full(Bytes::from_static(b"x"), None));
        let mut fut = pin!(Fut::ready(res));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
        let _ = fut.as_mut().poll(&mut cx);
    }

    #[test]
    #[should_panic(expected = "polled after completion")]
    fn a_covered_response_panics_when_polled_again() {
        let res = Response::new(ResponseBody::full(Bytes::from_static(b"x"), None));
        let detached = Detached::new(Box::pin(async move { Ok(res) }));
        let mut fut = pin!(Fut::covered(detached));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
        let _ = fut.as_mut().poll(&mut cx);
    }
}
