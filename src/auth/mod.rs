//! Who may upgrade (SPEC §4). Every check runs before the 101, so a refused
//! upgrade never becomes a WebSocket: the origin allow-list first (it stops
//! cross-site WebSocket hijacking when auth rides on cookies), then the
//! configured mode: nobody, a JWT, or the upstream's verdict.
//!
//! Credentials never reach the logs: refusals are logged by reason only.

mod forward;
mod jwt;

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};

use crate::config::{AuthConfig, AuthMode};
use crate::metrics::RejectReason;
use crate::proxy::Upstream;
use crate::response::{self, Body};
use crate::rooms::Identity;

/// Why the authenticator could not be built; reported at start-up as a
/// configuration error.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// The HS256 secret's environment variable is unset or empty.
    #[error("auth.jwt.secret_env: environment variable {0} is not set, or empty")]
    MissingSecret(String),
    /// The public key file could not be read.
    #[error("auth.jwt.public_key_file: cannot read {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The public key file is not a PEM key of the configured kind.
    #[error("auth.jwt.public_key_file: {path} is not a valid {algorithm} public key: {message}")]
    BadKey {
        /// The file.
        path: String,
        /// The configured algorithm.
        algorithm: String,
        /// The parser's complaint.
        message: String,
    },
}

/// An upgrade refused before the WebSocket exists.
#[derive(Debug)]
pub struct Rejection {
    /// HTTP status for the client.
    pub status: StatusCode,
    /// Metrics label.
    pub reason: RejectReason,
    /// Body text, or the auth upstream's own body for its 401/403.
    pub body: bytes::Bytes,
    /// Headers of the answer: `Content-Type`, and for forward auth's 401
    /// and 403 those the auth service sent (its `WWW-Authenticate`, a
    /// `Set-Cookie` that ends a session), so that the client learns what
    /// the service meant it to. Boxed: refusals are rare, and the result
    /// of every admission would otherwise be as large as a header map.
    pub headers: Box<HeaderMap>,
}

impl Rejection {
    /// A plain-text refusal.
    pub fn new(status: StatusCode, reason: RejectReason, message: &str) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Self {
            status,
            reason,
            body: bytes::Bytes::from(format!("{message}\n")),
            headers: Box::new(headers),
        }
    }

    /// The HTTP response.
    pub fn into_response(self) -> Response<Body> {
        let mut response = Response::new(response::full(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = *self.headers;
        response
    }
}

enum Method {
    None,
    Jwt(jwt::JwtVerifier),
    Upstream(forward::ForwardAuth),
}

/// Decides whether an upgrade request may proceed and who the client is.
pub struct Authenticator {
    allowed_origins: Vec<String>,
    method: Method,
}

impl Authenticator {
    /// Builds the authenticator: reads the HS256 secret from the environment
    /// (`env` looks variables up) or the public key file, once, at start-up.
    pub fn new(
        config: &AuthConfig,
        upstream: &Upstream,
        env: impl Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Self, AuthSetupError> {
        let method = match config.mode {
            AuthMode::None => Method::None,
            AuthMode::Jwt => Method::Jwt(jwt::JwtVerifier::new(&config.jwt, env)?),
            AuthMode::Upstream => Method::Upstream(forward::ForwardAuth::new(
                &config.upstream,
                upstream.clone(),
            )),
        };
        Ok(Self {
            allowed_origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            method,
        })
    }

    /// Checks the origin, then the credentials.
    pub async fn admit(&self, parts: &Parts, client: SocketAddr) -> Result<Identity, Rejection> {
        self.check_origin(parts)?;
        match &self.method {
            Method::None => Ok(Identity::default()),
            Method::Jwt(verifier) => verifier.verify(parts),
            Method::Upstream(forward) => forward.ask(parts, client).await,
        }
    }

    /// Browsers always send `Origin` on a WebSocket upgrade; non-browser
    /// clients usually do not and cannot be hijacked cross-site, so a missing
    /// header is not refused. Two are refused: a request has one origin
    /// (RFC 6454 §7.3), and checking either alone would let the other pass.
    fn check_origin(&self, parts: &Parts) -> Result<(), Rejection> {
        if self.allowed_origins.is_empty() {
            return Ok(());
        }
        let mut origins = parts.headers.get_all(header::ORIGIN).into_iter();
        let origin = match (origins.next(), origins.next()) {
            (None, _) => return Ok(()),
            (Some(origin), None) => origin,
            (Some(_), Some(_)) => return Err(origin_refused()),
        };
        let origin = origin
            .to_str()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_ascii_lowercase();
        if self.allowed_origins.contains(&origin) {
            Ok(())
        } else {
            Err(origin_refused())
        }
    }
}

/// The 403 of an origin that may not upgrade.
fn origin_refused() -> Rejection {
    Rejection::new(
        StatusCode::FORBIDDEN,
        RejectReason::Origin,
        "origin not allowed",
    )
}
