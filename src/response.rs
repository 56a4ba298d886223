//! The body type every HTTP response of the gateway uses, and helpers for
//! the responses the gateway writes itself (errors, admin JSON).
//!
//! Proxied bodies stream through untouched; the gateway's own responses are
//! small and complete. One body type covers both, so every service has a
//! single response type.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

use crate::proxy::pool::PooledBody;

/// A response (or proxied request) body: streamed from a peer, or written
/// by the gateway. An enum rather than a boxed trait object, so proxying a
/// request allocates no box per body.
pub struct Body(Kind);

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Stream(Incoming),
    Pooled(PooledBody),
}

impl Body {
    /// A body streamed from a peer as it arrives.
    pub fn stream(incoming: Incoming) -> Self {
        Self(Kind::Stream(incoming))
    }

    /// An upstream response body that drives its pooled connection.
    pub fn pooled(body: PooledBody) -> Self {
        Self(Kind::Pooled(body))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(incoming) => Pin::new(incoming).poll_frame(cx),
            Kind::Pooled(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Stream(incoming) => incoming.is_end_stream(),
            Kind::Pooled(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(incoming) => incoming.size_hint(),
            Kind::Pooled(body) => body.size_hint(),
        }
    }
}

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    let bytes = bytes.into();
    if bytes.is_empty() {
        Body(Kind::Empty)
    } else {
        Body(Kind::Full(Some(bytes)))
    }
}

/// A body with nothing in it (a 101, the GET to the auth service), at no
/// allocation.
pub fn empty() -> Body {
    Body(Kind::Empty)
}

/// A plain-text response, e.g. `400 bad handshake: missing Sec-WebSocket-Key`.
pub fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut message = message.into();
    message.push('\n');
    let mut response = Response::new(full(message));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A response with `value` as JSON; a value that cannot be encoded (a
/// bug, not input) gets 500 rather than a panic.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(full(body));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode response: {e}"),
        ),
    }
}
