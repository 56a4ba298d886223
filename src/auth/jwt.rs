//! `auth.mode = "jwt"`: a signed token in `Authorization: Bearer`, the
//! `token` query parameter, or a cookie.
//!
//! Exactly one algorithm is accepted, the configured one, so a token cannot
//! choose `none` or trick an RS256 key into verifying an HMAC. `exp` is
//! checked without leeway, the same instant the session later closes with
//! 1008; a token without `exp` does not expire.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{AuthSetupError, Rejection};
use crate::config::{JwtAlgorithm, JwtConfig};
use crate::metrics::RejectReason;
use crate::request::{cookie, query_param};
use crate::rooms::{Identity, RoomPatterns};

/// The claims the gateway reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    rooms: Option<RoomsClaim>,
}

/// `rooms` as a list of patterns, or one comma-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RoomsClaim {
    List(Vec<String>),
    Text(String),
}

/// Verifies tokens with one key and one algorithm.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    cookie: Option<String>,
}

impl JwtVerifier {
    /// Loads the key: the HS256 secret from the environment variable named
    /// in `secret_env`, or the PEM public key file.
    pub fn new(
        config: &JwtConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, AuthSetupError> {
        let (algorithm, key) = match config.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = env(&config.secret_env)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| AuthSetupError::MissingSecret(config.secret_env.clone()))?;
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                )
            }
            JwtAlgorithm::RS256 => (
                Algorithm::RS256,
                load_pem(config, DecodingKey::from_rsa_pem)?,
            ),
            JwtAlgorithm::ES256 => (
                Algorithm::ES256,
                load_pem(config, DecodingKey::from_ec_pem)?,
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        if config.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[&config.issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        if config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&config.audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        Ok(Self {
            key,
            validation,
            cookie: (!config.cookie.is_empty()).then(|| config.cookie.clone()),
        })
    }

    /// Verifies the request's token and returns who it names.
    pub fn verify(&self, parts: &Parts) -> Result<Identity, Rejection> {
        let token = self
            .token(parts)
            .ok_or_else(|| unauthorized("missing token"))?;
        let data =
            jsonwebtoken::decode::<Claims>(&token, &self.key, &self.validation).map_err(|e| {
                tracing::debug!(error = %e.kind_name(), "token refused");
                unauthorized("invalid token")
            })?;
        let claims = data.claims;
        Ok(Identity {
            user: claims.sub.map(Arc::from),
            rooms: claims.rooms.map(|r| match r {
                RoomsClaim::List(list) => RoomPatterns::new(list),
                RoomsClaim::Text(text) => RoomPatterns::new(text.split(',')),
            }),
            // An expiry past what the clock can represent never comes.
            expires_at: claims
                .exp
                .and_then(|exp| UNIX_EPOCH.checked_add(Duration::from_secs(exp))),
        })
    }

    /// The token from the first place that has one: header, query, cookie.
    fn token(&self, parts: &Parts) -> Option<String> {
        bearer(&parts.headers)
            .or_else(|| query_param(parts.uri.query().unwrap_or_default(), "token"))
            .or_else(|| {
                self.cookie
                    .as_deref()
                    .and_then(|name| cookie(&parts.headers, name))
            })
    }
}

/// Short names for error kinds, so logs say why without showing the token.
trait KindName {
    fn kind_name(&self) -> &'static str;
}

impl KindName for jsonwebtoken::errors::Error {
    fn kind_name(&self) -> &'static str {
        use jsonwebtoken::errors::ErrorKind::*;
        match self.kind() {
            ExpiredSignature => "expired",
            InvalidSignature => "bad signature",
            InvalidAlgorithm => "wrong algorithm",
            InvalidIssuer => "wrong issuer",
            InvalidAudience => "wrong audience",
            InvalidToken | Base64(_) | Json(_) | Utf8(_) => "malformed",
            _ => "invalid",
        }
    }
}

fn load_pem(
    config: &JwtConfig,
    parse: fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>,
) -> Result<DecodingKey, AuthSetupError> {
    let path = &config.public_key_file;
    let pem = std::fs::read(path).map_err(|source| AuthSetupError::KeyFile {
        path: path.clone(),
        source,
    })?;
    parse(&pem).map_err(|e| AuthSetupError::BadKey {
        path: path.clone(),
        algorithm: format!("{:?}", config.algorithm),
        message: e.to_string(),
    })
}

/// A 401 with the challenge RFC 9110 §15.5.2 requires: the gateway reads
/// bearer tokens (RFC 6750).
fn unauthorized(message: &str) -> Rejection {
    let mut rejection = Rejection::new(
        StatusCode::UNAUTHORIZED,
        RejectReason::Unauthorized,
        message,
    );
    rejection
        .headers
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    rejection
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}
