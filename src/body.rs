//! The response body type of the layer, and bounded buffering.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

pin_project! {
    /// The body of every response that passes through the layer: the inner
    /// service's body passed through, a buffered body (recorded or
    /// replayed), or a buffered prefix followed by the rest of the inner body
    /// (a response too large to record).
    ///
    /// Its data is [`Bytes`] and its error is the inner body's error, so it
    /// satisfies axum's `IntoResponse` and hyper's server bounds.
    pub struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B>
    where
        B: Body,
    {
        Full {
            data: Option<Bytes>,
            // Boxed: rare, and a `HeaderMap` would triple the body's size.
            trailers: Option<Box<HeaderMap>>,
        },
        Stream {
            #[pin]
            body: B,
        },
        Chain {
            prefix: Option<Bytes>,
            body: Pin<Box<B>>,
        },
        Failed {
            error: Option<B::Error>,
        },
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.kind {
            Kind::Full { .. } => "Full",
            Kind::Stream { .. } => "Stream",
            Kind::Chain { .. } => "Chain",
            Kind::Failed { .. } => "Failed",
        };
        f.debug_tuple("ResponseBody").field(&name).finish()
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers: trailers.map(Box::new),
            },
        }
    }

    pub(crate) fn stream(body: B) -> Self {
        Self {
            kind: Kind::Stream { body },
        }
    }

    pub(crate) fn chain(prefix: Bytes, body: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Chain {
                prefix: (!prefix.is_empty()).then_some(prefix),
                body,
            },
        }
    }

    pub(crate) fn failed(error: B::Error) -> Self {
        Self {
            kind: Kind::Failed { error: Some(error) },
        }
    }
}

impl<B: Body> ResponseBody<B> {
    /// The inner service's body, if this one passes it through unchanged;
    /// otherwise `self` back. For implementing
    /// `From<ResponseBody<B>> for B`, which [`KeepBody`] needs:
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, combinators::BoxBody};
    /// use tower_idempotency::ResponseBody;
    ///
    /// struct MyBody(BoxBody<Bytes, std::io::Error>);
    /// # impl http_body::Body for MyBody {
    /// #     type Data = Bytes;
    /// #     type Error = std::io::Error;
    /// #     fn poll_frame(
    /// #         self: std::pin::Pin<&mut Self>,
    /// #         cx: &mut std::task::Context<'_>,
    /// #     ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
    /// #         std::pin::Pin::new(&mut self.get_mut().0).poll_frame(cx)
    /// #     }
    /// # }
    ///
    /// impl From<ResponseBody<MyBody>> for MyBody {
    ///     fn from(body: ResponseBody<MyBody>) -> Self {
    ///         body.into_inner().unwrap_or_else(|body| MyBody(body.boxed()))
    ///     }
    /// }
    /// ```
    pub fn into_inner(self) -> Result<B, Self> {
        match self.kind {
            Kind::Stream { body } => Ok(body),
            kind => Err(Self { kind }),
        }
    }
}

/// How [`Idempotency`](crate::Idempotency) hands out response bodies: the
/// mode parameter of the layer and the service, [`WrapBody`] (the default)
/// or [`KeepBody`] (chosen with
/// [`IdempotencyLayer::keep_body_type`](crate::IdempotencyLayer::keep_body_type)).
///
/// Sealed: only this crate implements it.
pub trait BodyMode<B: Body>: sealed::Sealed {
    /// The response body type of the service.
    type Body;

    /// A response of the inner service that the layer does not touch.
    #[doc(hidden)]
    fn passthrough(body: B) -> Self::Body;

    /// A response the layer made, recorded, replayed or passed on.
    #[doc(hidden)]
    fn wrap(body: ResponseBody<B>) -> Self::Body;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::WrapBody {}
    impl Sealed for super::KeepBody {}
}

/// The default [`BodyMode`]: every response body is a [`ResponseBody`]
/// around the inner service's body type, whatever that type is.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct WrapBody;

/// The [`BodyMode`] that keeps the inner service's response body type `B`:
/// a response the layer does not touch is handed on as it is, and one the
/// layer made becomes a `B` through `From<ResponseBody<B>>`.
///
/// This crate implements that conversion for axum's `Body` (feature `axum`)
/// and for `http_body_util`'s `BoxBody` and `UnsyncBoxBody` over [`Bytes`];
/// for a body type of your own, implement it with
/// [`ResponseBody::into_inner`].
///
/// Under axum's `Router::layer` this saves a second boxing of every response
/// body, and it lets the layer sit where a service must answer with one
/// named body type.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct KeepBody;

impl<B: Body> BodyMode<B> for WrapBody {
    type Body = ResponseBody<B>;

    fn passthrough(body: B) -> ResponseBody<B> {
        ResponseBody::stream(body)
    }

    fn wrap(body: ResponseBody<B>) -> ResponseBody<B> {
        body
    }
}

impl<B> BodyMode<B> for KeepBody
where
    B: Body + From<ResponseBody<B>>,
{
    type Body = B;

    fn passthrough(body: B) -> B {
        body
    }

    fn wrap(body: ResponseBody<B>) -> B {
        body.into_inner().unwrap_or_else(B::from)
    }
}

#[cfg(feature = "axum")]
impl From<ResponseBody<axum_core::body::Body>> for axum_core::body::Body {
    fn from(body: ResponseBody<axum_core::body::Body>) -> Self {
        match body.into_inner() {
            Ok(inner) => inner,
            Err(body) => Self::new(body),
        }
    }
}

impl<E> From<ResponseBody<http_body_util::combinators::BoxBody<Bytes, E>>>
    for http_body_util::combinators::BoxBody<Bytes, E>
where
    E: Send + Sync + 'static,
{
    fn from(body: ResponseBody<http_body_util::combinators::BoxBody<Bytes, E>>) -> Self {
        body.into_inner().unwrap_or_else(|body| body.boxed())
    }
}

impl<E> From<ResponseBody<http_body_util::combinators::UnsyncBoxBody<Bytes, E>>>
    for http_body_util::combinators::UnsyncBoxBody<Bytes, E>
where
    E: Send + 'static,
{
    fn from(body: ResponseBody<http_body_util::combinators::UnsyncBoxBody<Bytes, E>>) -> Self {
        body.into_inner().unwrap_or_else(|body| body.boxed_unsync())
    }
}

#[inline]
fn to_bytes<D: Buf, E>(
    poll: Poll<Option<Result<Frame<D>, E>>>,
) -> Poll<Option<Result<Frame<Bytes>, E>>> {
    poll.map(|opt| opt.map(|res| res.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))))
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            KindProj::Stream { body } => to_bytes(body.poll_frame(cx)),
            KindProj::Chain { prefix, body } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                to_bytes(body.as_mut().poll_frame(cx))
            }
            KindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Stream { body } => body.is_end_stream(),
            Kind::Chain { prefix, body } => prefix.is_none() && body.is_end_stream(),
            Kind::Failed { error } => error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { body } => body.size_hint(),
            Kind::Chain { prefix, body } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(extra));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
            Kind::Failed { .. } => SizeHint::new(),
        }
    }
}

pin_project! {
    /// A request body for servers whose own body type cannot be rebuilt
    /// from bytes (hyper's `Incoming`): either the original stream, or the
    /// bytes the layer buffered. axum users never need it, since axum's
    /// `Body` already implements `From<Bytes>`.
    ///
    /// Map the request once, outside the layer:
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::Full;
    /// use tower::ServiceBuilder;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};
    ///
    /// async fn handler<B>(_req: Request<RequestBody<B>>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    ///     Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
    /// }
    ///
    /// # fn build<B: http_body::Body + Send + 'static>() {
    /// let svc = ServiceBuilder::new()
    ///     .map_request(|req: Request<B>| req.map(RequestBody::new))
    ///     .layer(IdempotencyLayer::new(MemoryStore::new()))
    ///     .service_fn(handler::<B>);
    /// # let _ = svc;
    /// # }
    /// ```
    pub struct RequestBody<B> {
        #[pin]
        kind: ReqKind<B>,
    }
}

pin_project! {
    #[project = ReqKindProj]
    enum ReqKind<B> {
        Stream {
            #[pin]
            body: B,
        },
        Buffered {
            data: Option<Bytes>,
        },
    }
}

impl<B> RequestBody<B> {
    /// Wraps the server's body.
    pub fn new(body: B) -> Self {
        Self {
            kind: ReqKind::Stream { body },
        }
    }
}

impl<B> From<Bytes> for RequestBody<B> {
    fn from(data: Bytes) -> Self {
        Self {
            kind: ReqKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.kind {
            ReqKind::Stream { .. } => "Stream",
            ReqKind::Buffered { .. } => "Buffered",
        };
        f.debug_tuple("RequestBody").field(&name).finish()
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ReqKindProj::Stream { body } => to_bytes(body.poll_frame(cx)),
            ReqKindProj::Buffered { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ReqKind::Stream { body } => body.is_end_stream(),
            ReqKind::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ReqKind::Stream { body } => body.size_hint(),
            ReqKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Appends chunks, copying only when there is more than one.
#[derive(Default)]
pub(crate) struct Buffer {
    first: Option<Bytes>,
    rest: Option<BytesMut>,
    len: usize,
}

impl Buffer {
    pub(crate) fn with_hint(hint: &SizeHint) -> (Self, usize) {
        (Self::default(), hint.upper().unwrap_or(0) as usize)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, chunk: Bytes, capacity_hint: usize) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        match (&mut self.first, &mut self.rest) {
            (None, _) => self.first = Some(chunk),
            (Some(first), None) => {
                let mut buf = BytesMut::with_capacity(capacity_hint.max(first.len() + chunk.len()));
                buf.extend_from_slice(first);
                buf.extend_from_slice(&chunk);
                self.rest = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&chunk),
        }
    }

    pub(crate) fn freeze(self) -> Bytes {
        match (self.first, self.rest) {
            (_, Some(buf)) => buf.freeze(),
            (Some(first), None) => first,
            (None, None) => Bytes::new(),
        }
    }
}

/// The outcome of reading a body with a limit.
pub(crate) enum Collected<B: Body> {
    /// All of it, within the limit.
    Full {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Over the limit: what was read, and the rest still unread.
    TooLarge { prefix: Bytes, rest: B },
    /// The body failed.
    Failed { error: B::Error },
}

/// Reads `body` up to `limit` bytes, calling `inspect` on every data chunk
/// as it arrives (the fingerprint is computed in this pass).
pub(crate) fn collect<B, F>(body: B, limit: usize, inspect: F) -> Collect<B, F>
where
    B: Body + Unpin,
    F: FnMut(&[u8]),
{
    let hint = body.size_hint();
    let (buf, capacity) = Buffer::with_hint(&hint);
    Collect {
        declared_over: hint.lower() > limit as u64,
        body: Some(body),
        limit,
        inspect,
        buf,
        capacity,
        trailers: None,
    }
}

/// The future of [`collect`]. Written out rather than an async fn: it is
/// held inside every covered request's future, and an async fn would keep
/// its arguments twice and its locals beside them.
pub(crate) struct Collect<B, F> {
    /// Taken when the future completes: handed back unread past the limit.
    body: Option<B>,
    limit: usize,
    inspect: F,
    buf: Buffer,
    capacity: usize,
    /// Boxed: trailers are rare, and a map inline would triple the size.
    trailers: Option<Box<HeaderMap>>,
    /// The body's size hint already says it is over the limit.
    declared_over: bool,
}

impl<B, F> Future for Collect<B, F>
where
    B: Body + Unpin,
    F: FnMut(&[u8]) + Unpin,
{
    type Output = Collected<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Collected<B>> {
        let this = self.get_mut();
        // Out of its slot while polled, and put back only to wait: every
        // way out below owns it.
        let mut body = this.body.take().expect("Collect polled after completion");
        if this.declared_over {
            return Poll::Ready(Collected::TooLarge {
                prefix: Bytes::new(),
                rest: body,
            });
        }
        loop {
            let frame = match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    this.body = Some(body);
                    return Poll::Pending;
                }
            };
            match frame {
                None => {
                    return Poll::Ready(Collected::Full {
                        data: std::mem::take(&mut this.buf).freeze(),
                        trailers: this.trailers.take().map(|t| *t),
                    });
                }
                Some(Err(error)) => return Poll::Ready(Collected::Failed { error }),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let chunk = data.copy_to_bytes(data.remaining());
                        (this.inspect)(&chunk);
                        this.buf.push(chunk, this.capacity);
                        if this.buf.len() > this.limit {
                            return Poll::Ready(Collected::TooLarge {
                                prefix: std::mem::take(&mut this.buf).freeze(),
                                rest: body,
                            });
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            match &mut this.trailers {
                                Some(existing) => existing.extend(t),
                                None => this.trailers = Some(Box::new(t)),
                            }
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::Chunked;
    use http_body_util::Full;

    /// Drains `body`, checking before every frame that it does not claim
    /// to have ended, and after the last that it does; returns the frames'
    /// data and trailers.
    async fn drain<B>(mut body: B) -> (Vec<u8>, Option<HeaderMap>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: fmt::Debug,
    {
        use http_body_util::BodyExt;
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            let ended = body.is_end_stream();
            match body.frame().await {
                Some(frame) => {
                    assert!(!ended, "claimed to have ended before a frame");
                    match frame.unwrap().into_data() {
                        Ok(d) => data.extend_from_slice(&d),
                        Err(frame) => trailers = frame.into_trailers().ok(),
                    }
                }
                None => break,
            }
        }
        assert!(
            body.is_end_stream(),
            "did not claim to have ended after the last frame"
        );
        (data, trailers)
    }

    fn exact(hint: &SizeHint) -> Option<u64> {
        (hint.upper() == Some(hint.lower())).then_some(hint.lower())
    }

    #[tokio::test]
    async fn response_bodies_report_their_end_and_size() {
        let mut t = HeaderMap::new();
        t.insert("x-check", http::HeaderValue::from_static("1"));
        let hello = || Bytes::from_static(b"hello");

        let full = ResponseBody::<Full<Bytes>>::full(hello(), None);
        assert_eq!(exact(&full.size_hint()), Some(5));
        assert_eq!(drain(full).await, (b"hello".to_vec(), None));

        let empty = ResponseBody::<Full<Bytes>>::full(Bytes::new(), None);
        assert!(empty.is_end_stream());
        assert_eq!(exact(&empty.size_hint()), Some(0));

        // Trailers alone: not ended until they are taken.
        let trailers_only = ResponseBody::<Full<Bytes>>::full(Bytes::new(), Some(t.clone()));
        assert!(!trailers_only.is_end_stream());
        assert_eq!(drain(trailers_only).await, (Vec::new(), Some(t.clone())));
        let both = ResponseBody::<Full<Bytes>>::full(hello(), Some(t.clone()));
        assert_eq!(drain(both).await, (b"hello".to_vec(), Some(t)));

        let stream = ResponseBody::stream(Full::new(hello()));
        assert_eq!(exact(&stream.size_hint()), Some(5));
        assert_eq!(drain(stream).await.0, b"hello");

        let chain = ResponseBody::chain(
            Bytes::from_static(b"he"),
            Box::pin(Full::new(Bytes::from_static(b"llo"))),
        );
        assert_eq!(exact(&chain.size_hint()), Some(5));
        assert_eq!(drain(chain).await.0, b"hello");
        // The prefix alone, the inner body already ended.
        let chain =
            ResponseBody::chain(Bytes::from_static(b"he"), Box::pin(Full::new(Bytes::new())));
        assert_eq!(drain(chain).await.0, b"he");
        // An inner body of unknown length: the prefix still counts.
        let unknown = Chunked::new(&[b"llo"]);
        let chain = ResponseBody::chain(Bytes::from_static(b"he"), Box::pin(unknown));
        let hint = chain.size_hint();
        assert_eq!((hint.lower(), hint.upper()), (2, None));
    }

    #[tokio::test]
    async fn a_failed_body_yields_its_error_once_then_ends() {
        use http_body_util::BodyExt;
        type B = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
        let mut failed = ResponseBody::<B>::failed(std::io::Error::other("upstream"));
        assert!(!failed.is_end_stream());
        assert_eq!(exact(&failed.size_hint()), None);
        assert!(failed.frame().await.unwrap().is_err());
        assert!(failed.is_end_stream());
        assert!(failed.frame().await.is_none());
    }

    #[tokio::test]
    async fn request_bodies_report_their_end_and_size() {
        let buffered = RequestBody::<Full<Bytes>>::from(Bytes::from_static(b"hello"));
        assert_eq!(exact(&buffered.size_hint()), Some(5));
        assert_eq!(drain(buffered).await.0, b"hello");
        let empty = RequestBody::<Full<Bytes>>::from(Bytes::new());
        assert!(empty.is_end_stream());
        assert_eq!(exact(&empty.size_hint()), Some(0));
        let stream = RequestBody::new(Full::new(Bytes::from_static(b"hello")));
        assert_eq!(exact(&stream.size_hint()), Some(5));
        assert_eq!(drain(stream).await.0, b"hello");
        assert_eq!(
            format!("{:?}", RequestBody::new(Full::new(Bytes::new()))),
            r#"RequestBody("Stream")"#
        );
        assert_eq!(
            format!("{:?}", RequestBody::<Full<Bytes>>::from(Bytes::new())),
            r#"RequestBody("Buffered")"#
        );
    }

    #[test]
    fn debug_names_the_kind_never_the_contents() {
        type B = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
        let secret = Bytes::from_static(b"card 4242");
        let bodies = [
            (ResponseBody::<B>::full(secret.clone(), None), "Full"),
            (ResponseBody::stream(B::default()), "Stream"),
            (
                ResponseBody::chain(secret.clone(), Box::pin(B::default())),
                "Chain",
            ),
            (ResponseBody::failed(std::io::Error::other("x")), "Failed"),
        ];
        for (body, kind) in bodies {
            assert_eq!(format!("{body:?}"), format!("ResponseBody({kind:?})"));
        }
    }

    #[tokio::test]
    async fn single_chunk_is_not_copied() {
        let data = Bytes::from_static(b"hello");
        let ptr = data.as_ptr();
        let Collected::Full { data, .. } = collect(Full::new(data), 10, |_| {}).await else {
            panic!("expected Full");
        };
        assert_eq!(data.as_ptr(), ptr);
    }

    #[tokio::test]
    async fn chunks_are_joined_and_inspected() {
        let mut seen = Vec::new();
        let body = Chunked::new(&[b"ab", b"cd", b"e"]);
        let Collected::Full { data, .. } = collect(body, 5, |c| seen.extend_from_slice(c)).await
        else {
            panic!("expected Full");
        };
        assert_eq!(&data[..], b"abcde");
        assert_eq!(seen, b"abcde");
    }

    #[tokio::test]
    async fn over_the_limit_keeps_prefix_and_rest() {
        let body = Chunked::new(&[b"ab", b"cd", b"ef", b"gh"]);
        let Collected::TooLarge { prefix, rest } = collect(body, 3, |_| {}).await else {
            panic!("expected TooLarge");
        };
        assert_eq!(&prefix[..], b"abcd");
        let all = ResponseBody::chain(prefix, Box::pin(rest))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&all[..], b"abcdefgh");
    }

    #[tokio::test]
    async fn size_hint_over_the_limit_reads_nothing() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        let Collected::TooLarge { prefix, .. } = collect(body, 3, |_| {}).await else {
            panic!("expected TooLarge");
        };
        assert!(prefix.is_empty());
    }

    #[tokio::test]
    async fn full_body_yields_data_then_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let body: ResponseBody<Full<Bytes>> = ResponseBody::full(Bytes::from_static(b"x"), Some(t));
        assert_eq!(body.size_hint().exact(), Some(1));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(&collected.to_bytes()[..], b"x");
    }
}
