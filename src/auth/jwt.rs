//! `auth.mode = "jwt"`: a signed token in `Authorization: Bearer`, the
//! `token` query parameter, or a cookie.
//!
//! Exactly one algorithm is accepted, the configured one, so a token cannot
//! choose `none` or trick an RS256 key into verifying an HMAC. `exp` is
//! checked without leeway, the same instant the session later closes with
//! 1008; a token without `exp` does not expire. `nbf` is checked with a
//! minute's leeway for the issuer's clock. Both are read here rather than
//! by the JWT library, which takes only whole seconds, where RFC 7519 §2
//! allows fractions.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer};

use super::{AuthSetupError, Rejection};
use crate::config::{JwtAlgorithm, JwtConfig};
use crate::metrics::RejectReason;
use crate::request::{cookie, query_param};
use crate::rooms::{Identity, RoomPatterns};

/// How far in the future a token's `nbf` may lie and the token still be
/// taken: the issuer's clock may run ahead of this one, and a token used
/// the moment it is issued must not fail for that (RFC 7519 §4.1.5 allows
/// a small leeway; the JWT library's default is the same minute).
const NBF_LEEWAY_SECS: u64 = 60;

/// The claims the gateway reads; others are ignored. A claim that is
/// present must have its type: `null` is no `exp` that never comes, and
/// `"rooms": null` (what some encoders write for an empty list) allows no
/// room rather than every room, as an empty `Roomgate-Rooms` does.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default, deserialize_with = "present")]
    exp: Option<NumericDate>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<NumericDate>,
    #[serde(default, deserialize_with = "rooms_or_none")]
    rooms: Option<RoomsClaim>,
    /// Checked against `auth.jwt.issuer` by the JWT library, which also
    /// takes a list; RFC 7519 §4.1.1 has one string.
    #[serde(rename = "iss", default, deserialize_with = "present")]
    _iss: Option<String>,
}

/// A claim that, when present, must hold a `T` (`null` included).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `rooms`, where `null` is the empty list.
fn rooms_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RoomsClaim>, D::Error> {
    let rooms = Option::<RoomsClaim>::deserialize(d)?;
    Ok(Some(rooms.unwrap_or(RoomsClaim::List(Vec::new()))))
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly with a
/// fraction, which is dropped. A negative or non-finite one makes the
/// token malformed; one past what `u64` holds is the largest.
#[derive(Debug, Clone, Copy)]
struct NumericDate(u64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let secs = f64::deserialize(deserializer)?;
        if secs.is_finite() && secs >= 0.0 {
            // Saturating: 1e300 is "never".
            Ok(Self(secs as u64))
        } else {
            Err(serde::de::Error::custom("not a NumericDate"))
        }
    }
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
        env: impl Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Self, AuthSetupError> {
        let (algorithm, key) = match config.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = env(&config.secret_env)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| AuthSetupError::MissingSecret(config.secret_env.clone()))?;
                (Algorithm::HS256, DecodingKey::from_secret(&secret))
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
        // `exp` and `nbf` are checked in `verify`.
        validation.leeway = 0;
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
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
        // No extension is understood here, so none that a token marks as
        // critical may be ignored (RFC 7515 §4.1.11).
        if data.header.crit.is_some() {
            tracing::debug!(error = "critical extension", "token refused");
            return Err(unauthorized("invalid token"));
        }
        let claims = data.claims;
        check_times(&claims, crate::events::now_ms()).map_err(|why| {
            tracing::debug!(error = why, "token refused");
            unauthorized("invalid token")
        })?;
        Ok(Identity {
            // A blank subject is no user, as a blank `Roomgate-User` is in
            // forward auth: backends see one shape of anonymous.
            user: claims
                .sub
                .filter(|sub| !sub.trim().is_empty())
                .map(Arc::from),
            rooms: claims.rooms.map(|r| match r {
                RoomsClaim::List(list) => RoomPatterns::new(list),
                RoomsClaim::Text(text) => RoomPatterns::new(text.split(',')),
            }),
            // An expiry past what the clock can represent never comes.
            expires_at: claims
                .exp
                .and_then(|exp| UNIX_EPOCH.checked_add(Duration::from_secs(exp.0))),
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

/// Whether the token is valid at `now_ms` (milliseconds since the epoch):
/// before its `exp` (RFC 7519 §4.1.4), the instant the session would close
/// it, and not before its `nbf`, give or take [`NBF_LEEWAY_SECS`].
fn check_times(claims: &Claims, now_ms: u64) -> Result<(), &'static str> {
    if claims
        .exp
        .is_some_and(|exp| exp.0.saturating_mul(1000) <= now_ms)
    {
        return Err("expired");
    }
    let now = now_ms / 1000;
    if claims
        .nbf
        .is_some_and(|nbf| nbf.0 > now.saturating_add(NBF_LEEWAY_SECS))
    {
        return Err("not yet valid");
    }
    Ok(())
}

/// Short names for error kinds, so logs say why without showing the token.
trait KindName {
    fn kind_name(&self) -> &'static str;
}

impl KindName for jsonwebtoken::errors::Error {
    fn kind_name(&self) -> &'static str {
        use jsonwebtoken::errors::ErrorKind::*;
        match self.kind() {
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
    // The RSA parser takes a private key too, and then no token verifies:
    // refuse it here, where the mistake can be named.
    if pem.windows(16).any(|w| w == b"PRIVATE KEY-----") {
        return Err(AuthSetupError::BadKey {
            path: path.clone(),
            algorithm: format!("{:?}", config.algorithm),
            message: "this is a private key; give the public key".to_string(),
        });
    }
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
