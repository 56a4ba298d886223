//! `auth.mode = "upstream"`: forward auth. The upstream already knows its
//! sessions, so the gateway asks it: `GET auth.upstream.path` with the
//! upgrade request's cookies and headers. 2xx admits, and the response
//! headers `Roomgate-User` and `Roomgate-Rooms` say who it is and where it
//! may go; 401 and 403 (with their body and headers) go back to the
//! client; anything else, a timeout or an unreachable upstream refuses
//! with 503, because failing open would let everyone in whenever the
//! upstream hiccups.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, StatusCode};

use super::Rejection;
use crate::config::AuthUpstreamConfig;
use crate::metrics::RejectReason;
use crate::proxy::{Upstream, read_refusal, strip_hop_by_hop};
use crate::response;
use crate::rooms::{Identity, RoomPatterns};

/// The forward-auth client.
pub struct ForwardAuth {
    upstream: Upstream,
    path: String,
    timeout: Duration,
}

impl ForwardAuth {
    /// Uses the proxy's pooled client to reach `path` on the upstream.
    pub fn new(config: &AuthUpstreamConfig, upstream: Upstream) -> Self {
        Self {
            upstream,
            path: config.path.clone(),
            timeout: crate::config::secs(config.timeout_secs),
        }
    }

    /// Asks the upstream about this upgrade request.
    pub async fn ask(&self, parts: &Parts, client: SocketAddr) -> Result<Identity, Rejection> {
        let request = self.request(parts, client).map_err(|_| unavailable())?;
        let response = self
            .upstream
            .send_idempotent(request, || self.request(parts, client), self.timeout)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "auth upstream unavailable");
                unavailable()
            })?;
        let status = response.status();
        if status.is_success() {
            return identity(response.headers()).map_err(|why| {
                tracing::warn!("auth upstream answered with {why}");
                unavailable()
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let reason = if status == StatusCode::UNAUTHORIZED {
                RejectReason::Unauthorized
            } else {
                RejectReason::Forbidden
            };
            let (parts, body) = response.into_parts();
            // Too long, broken or stalled: the refusal stands, without it.
            let body = read_refusal(body, self.timeout).await.unwrap_or_default();
            return Err(Rejection {
                status,
                reason,
                body,
                headers: Box::new(refusal_headers(parts.headers)),
            });
        }
        tracing::warn!(
            status = status.as_u16(),
            "auth upstream answered neither 2xx nor 401/403"
        );
        Err(unavailable())
    }

    /// The auth request: the upgrade's headers minus the WebSocket and
    /// hop-by-hop ones, plus where the request came from and went to.
    fn request(
        &self,
        parts: &Parts,
        client: SocketAddr,
    ) -> Result<Request<response::Body>, crate::proxy::ProxyError> {
        let mut request = Request::new(response::empty());
        *request.method_mut() = Method::GET;
        *request.uri_mut() = self.upstream.uri_for(&self.path)?;
        let headers = request.headers_mut();
        for (name, value) in &parts.headers {
            // The answer's own headers, from the client, are a forgery
            // the service has no use for.
            let ours = name == "roomgate-user" || name == "roomgate-rooms";
            if !name.as_str().starts_with("sec-websocket-")
                && name != header::CONTENT_LENGTH
                && !ours
            {
                headers.append(name, value.clone());
            }
        }
        strip_hop_by_hop(headers, false);
        let uri = parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        // `X-Forwarded-*` as Traefik's forward auth sends them, and
        // `X-Original-URI` as nginx's `auth_request` setups do: set by the
        // gateway, never the client's.
        let forwarded = [
            ("x-forwarded-for", client.ip().to_string()),
            ("x-forwarded-proto", "http".to_string()),
            ("x-forwarded-method", parts.method.to_string()),
            ("x-forwarded-uri", uri.clone()),
            ("x-original-uri", uri),
        ];
        for (name, value) in forwarded {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        // The host the upgrade was for: an absolute-form target's, as for
        // proxied requests (RFC 9112 §3.2.2), else its `Host`.
        let host = parts
            .uri
            .authority()
            .and_then(|target| crate::proxy::target_host(&parts.uri, target).ok())
            .or_else(|| parts.headers.get(header::HOST).cloned());
        if let Some(host) = host {
            headers.insert(header::HOST, host.clone());
            headers.insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        Ok(request)
    }
}

/// The identity the auth service's answer grants. A `Roomgate-Rooms` header
/// that is present but lists no pattern allows no room: only a missing
/// header leaves the rooms unrestricted, so that a service building the list
/// from a user's rooms never grants every room to a user who has none. The
/// list may come in several field lines, which count as one list joined by
/// commas (RFC 9110 §5.3). The user is UTF-8 text, as a JWT's `sub` is;
/// an answer whose user is not text grants nothing (the error says why):
/// admitting the client anonymously instead would hide who it is from every
/// backend. Nor does an answer naming two users: which one the service
/// meant is not for the gateway to guess.
fn identity(headers: &hyper::HeaderMap) -> Result<Identity, &'static str> {
    let mut users = headers.get_all("roomgate-user").into_iter();
    let (user, None) = (users.next(), users.next()) else {
        return Err("more than one Roomgate-User");
    };
    let user = match user {
        // Only HTTP's own whitespace around a field value is not part of it.
        Some(value) => std::str::from_utf8(value.as_bytes())
            .map_err(|_| "a Roomgate-User that is not UTF-8")?
            .trim_matches([' ', '\t']),
        None => "",
    };
    let user = (!user.is_empty()).then(|| Arc::from(user));
    let rooms = headers.contains_key("roomgate-rooms").then(|| {
        let lines = headers.get_all("roomgate-rooms").into_iter();
        RoomPatterns::new(lines.flat_map(|v| text(v).split(',')))
    });
    Ok(Identity {
        user,
        rooms,
        expires_at: None,
    })
}

/// A `Roomgate-Rooms` line as text; one that is not ASCII (room names are)
/// counts as empty, which grants nothing.
fn text(value: &HeaderValue) -> &str {
    value.to_str().map(str::trim).unwrap_or_default()
}

/// The auth service's headers as the client gets them with its refusal:
/// without hop-by-hop headers and without its framing, since the body is
/// passed on whole (or empty, if it was too long) with a length of its
/// own.
fn refusal_headers(mut headers: hyper::HeaderMap) -> hyper::HeaderMap {
    strip_hop_by_hop(&mut headers, false);
    headers.remove(header::CONTENT_LENGTH);
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    headers
}

fn unavailable() -> Rejection {
    Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        RejectReason::AuthUnavailable,
        "authentication service unavailable",
    )
}
