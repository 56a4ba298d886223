//! Configuration: one TOML file, every key optional, every key overridable
//! from the environment (SPEC §5).
//!
//! Loading is strict on purpose. A typo in a key, a value of the wrong type or
//! a contradictory setting stops start-up with a message naming the key, so an
//! operator learns about it from the deploy, not from a silent default. The
//! field doc comments below are the reference for each key; the commented
//! default file `config/roomgate.toml` repeats them for operators.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of every environment variable that overrides a key.
pub const ENV_PREFIX: &str = "ROOMGATE_";

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "config/roomgate.toml";

/// Why a configuration could not be used. Every variant names the offending
/// key or file so the operator can fix it without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was named.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key,
    /// wrong type); toml's message names the key and shows the line.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file being parsed.
        path: PathBuf,
        /// toml's description, which names the key.
        message: String,
    },
    /// An environment override could not be parsed as the key's type.
    #[error("invalid value for {var} (key `{key}`): {message}")]
    Env {
        /// The environment variable.
        var: String,
        /// The configuration key it overrides.
        key: String,
        /// What is wrong with the value.
        message: String,
    },
    /// A `ROOMGATE_` variable whose value is not UTF-8. The value is not
    /// shown: it may be a secret.
    #[error("environment variable {var} is not valid UTF-8")]
    NotUtf8 {
        /// The environment variable.
        var: String,
    },
    /// Values that parse but cannot work, possibly several at once.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// Adds to each problem of an [`ConfigError::Invalid`] the environment
    /// variables that set its key, or another key it names (the mode that
    /// made a setting required): the operator then knows where to look,
    /// the file or the deployment's environment.
    fn naming_variables(self, set_by: &BTreeMap<String, String>) -> Self {
        let ConfigError::Invalid(problems) = self else {
            return self;
        };
        let named = problems
            .into_iter()
            .map(|problem| {
                let key = problem.split_once(':').map_or("", |(key, _)| key);
                let mut named = problem.clone();
                for (other, var) in set_by {
                    if other == key {
                        named.push_str(&format!(" (set by {var})"));
                    } else if mentions_key(&problem, other) {
                        named.push_str(&format!(" ({other} set by {var})"));
                    }
                }
                named
            })
            .collect();
        ConfigError::Invalid(named)
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The public listener: WebSocket paths and the proxied rest.
    pub server: ServerConfig,
    /// The operator listener: metrics, health, rooms.
    pub admin: AdminConfig,
    /// The HTTP service roomgate sits in front of.
    pub upstream: UpstreamConfig,
    /// Per-connection WebSocket behaviour.
    pub websocket: WebSocketConfig,
    /// The NATS bridge to backends and to the other instances.
    pub nats: NatsConfig,
    /// Who may upgrade and which rooms they may join.
    pub auth: AuthConfig,
    /// Log verbosity and format.
    pub log: LogConfig,
}

/// `[server]`: the one public port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the public listener (WebSocket and proxied HTTP).
    pub listen: String,
    /// Paths whose WebSocket upgrades roomgate terminates itself; every other
    /// path is proxied.
    pub ws_paths: Vec<String>,
    /// Upgrades beyond this many open WebSockets get 503, so a flood of
    /// clients cannot exhaust memory or file descriptors.
    pub max_connections: usize,
    /// How long a shutdown waits for in-flight proxied requests.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            ws_paths: vec!["/ws".into()],
            max_connections: 100_000,
            shutdown_grace_secs: 10,
        }
    }
}

/// `[admin]`: kept off the public port so metrics and room listings are not
/// exposed to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`, `/rooms`).
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

/// `[upstream]`: the service behind the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL, e.g. `http://127.0.0.1:3000`; empty means nothing is proxied
    /// and other paths answer 404.
    pub url: String,
    /// Time allowed to open a TCP connection to the upstream.
    pub connect_timeout_secs: u64,
    /// Longest the upstream may stand still: before its response headers
    /// (then 504), and between two pieces of a response body (then the
    /// response is cut off).
    pub timeout_secs: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            connect_timeout_secs: 5,
            timeout_secs: 30,
        }
    }
}

/// What happens when a connection's send queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumerPolicy {
    /// Close the connection with 1013 so the client reconnects and resyncs.
    Close,
    /// Drop the newest frame for that connection and count it.
    Drop,
}

/// `[websocket]`: limits that keep one client from hurting the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Largest incoming message; a bigger one closes the connection with 1009.
    pub max_message_size_bytes: usize,
    /// How often the gateway pings each client.
    pub ping_interval_secs: u64,
    /// How long a ping may stay unanswered before the connection is closed.
    pub pong_timeout_secs: u64,
    /// Frames queued per connection before the slow-consumer policy applies.
    pub send_queue_capacity: usize,
    /// What to do with a client whose queue is full.
    pub slow_consumer: SlowConsumerPolicy,
    /// Incoming frames allowed per second per connection; 0 is unlimited.
    pub max_messages_per_sec: u32,
    /// Room behaviour.
    pub rooms: RoomsConfig,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_message_size_bytes: 65_536,
            ping_interval_secs: 30,
            pong_timeout_secs: 10,
            send_queue_capacity: 256,
            slow_consumer: SlowConsumerPolicy::Close,
            max_messages_per_sec: 0,
            rooms: RoomsConfig::default(),
        }
    }
}

/// `[websocket.rooms]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// `false` turns the gateway into a pure connection relay: joins get
    /// `rooms_disabled`, backends still reach connections directly.
    pub enabled: bool,
    /// Members per room on this instance; further joins get `room_full`.
    pub max_members: usize,
    /// Rooms one connection may be in; further joins get `too_many_rooms`.
    pub max_rooms_per_connection: usize,
    /// How long an empty room is kept before it is freed; 0 frees at once.
    /// At most `rooms::MAX_EMPTY_ROOMS` wait at a time; beyond that the one
    /// empty longest is freed early.
    pub idle_timeout_secs: u64,
    /// `false`: client messages go to NATS only and the backend decides what
    /// is broadcast.
    pub client_broadcast: bool,
    /// Send `presence` frames to members when others join or leave.
    pub presence: bool,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_members: 1000,
            max_rooms_per_connection: 10,
            idle_timeout_secs: 3600,
            client_broadcast: true,
            presence: false,
        }
    }
}

/// `[nats]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// `false` runs a single instance with in-process rooms only.
    pub enabled: bool,
    /// Server URLs, comma-separated for a cluster; `user:pass@` or
    /// `token@` allowed (percent-encoded), one login for every URL that
    /// has one.
    pub url: String,
    /// NATS credentials (`.creds`) file; empty for none.
    pub creds_file: String,
    /// First token of every subject the gateway publishes or subscribes.
    pub subject_prefix: String,
    /// `true`: `/readyz` answers 503 while NATS is disconnected.
    pub required: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            url: "nats://127.0.0.1:4222".into(),
            creds_file: String::new(),
            subject_prefix: "roomgate".into(),
            required: false,
        }
    }
}

impl NatsConfig {
    /// The server URLs, split and trimmed.
    pub fn urls(&self) -> Vec<String> {
        split_list(&self.url)
    }
}

/// How upgrades are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may connect.
    None,
    /// A signed JWT in a header, query parameter or cookie.
    Jwt,
    /// Ask the upstream (forward auth).
    Upstream,
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `none`, `jwt` or `upstream`.
    pub mode: AuthMode,
    /// `Origin` values a browser may upgrade from; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Settings for `mode = "jwt"`.
    pub jwt: JwtConfig,
    /// Settings for `mode = "upstream"`.
    pub upstream: AuthUpstreamConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            allowed_origins: Vec::new(),
            jwt: JwtConfig::default(),
            upstream: AuthUpstreamConfig::default(),
        }
    }
}

/// Signature algorithm of accepted tokens. Exactly one is accepted, so a
/// token cannot pick a weaker one (`alg: none`, HS256 signed with a public key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC with a shared secret.
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256.
    RS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
}

/// `[auth.jwt]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256`, `RS256` or `ES256`.
    pub algorithm: JwtAlgorithm,
    /// Name of the environment variable holding the HS256 secret; the secret
    /// itself never appears in the file.
    pub secret_env: String,
    /// PEM public key for RS256 and ES256.
    pub public_key_file: String,
    /// Cookie to read the token from; empty for none.
    pub cookie: String,
    /// Required `iss`, checked when set.
    pub issuer: String,
    /// Required `aud`, checked when set.
    pub audience: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::HS256,
            secret_env: String::new(),
            public_key_file: String::new(),
            cookie: String::new(),
            issuer: String::new(),
            audience: String::new(),
        }
    }
}

/// `[auth.upstream]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthUpstreamConfig {
    /// Path of the upstream's auth endpoint.
    pub path: String,
    /// Time allowed for the auth answer; a timeout refuses with 503.
    pub timeout_secs: u64,
}

impl Default for AuthUpstreamConfig {
    fn default() -> Self {
        Self {
            path: "/auth/ws".into(),
            timeout_secs: 5,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, or per target `roomgate=debug,info`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// A configuration together with what loading it noticed but did not reject.
#[derive(Debug)]
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// Warnings to log once logging is up (e.g. unknown `ROOMGATE_` variables).
    pub warnings: Vec<String>,
}

impl Config {
    /// Loads the file (the explicit one, else the default path if it exists,
    /// else built-in defaults), applies `env`, and validates.
    pub fn load(
        explicit: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, ConfigError> {
        let (path, text) = read_file(explicit)?;
        let mut table: toml::Table = match &text {
            Some(text) => toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.clone(),
                message: syntax_error(text, &e),
            })?,
            None => toml::Table::new(),
        };
        // Check the file alone first, so its errors point at its lines.
        Self::deserialize_table(&table, &path)?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        let Overrides {
            mut warnings,
            set_by,
        } = apply_env(&mut table, &env)?;
        let config = Self::deserialize_table(&table, &path)?;
        warnings.retain(|w| !mentions_secret_var(w, &config));
        config.validate().map_err(|e| e.naming_variables(&set_by))?;
        Ok(Loaded { config, warnings })
    }

    fn deserialize_table(table: &toml::Table, path: &Path) -> Result<Config, ConfigError> {
        Config::deserialize(toml::Value::Table(table.clone())).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Checks what types alone cannot: addresses, URLs, ranges and settings
    /// that depend on each other. Reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                errors.push(msg.to_string());
            }
        };
        check(
            self.server.listen.parse::<SocketAddr>().is_ok(),
            "server.listen: expected an address such as 0.0.0.0:8080",
        );
        check(
            self.admin.listen.parse::<SocketAddr>().is_ok(),
            "admin.listen: expected an address such as 127.0.0.1:9090",
        );
        check(
            !listeners_clash(&self.server.listen, &self.admin.listen),
            "admin.listen: must not be the address of server.listen (the second bind would fail)",
        );
        check(
            !self.server.ws_paths.is_empty() && self.server.ws_paths.iter().all(|p| ws_path_ok(p)),
            "server.ws_paths: needs at least one path, each starting with '/', without a query",
        );
        check(
            self.server.max_connections > 0,
            "server.max_connections: must be at least 1",
        );
        check(
            self.upstream.url.is_empty() || upstream_url_ok(&self.upstream.url),
            "upstream.url: expected http://host:port with an optional path and no user info, or empty",
        );
        check(
            self.upstream.connect_timeout_secs > 0,
            "upstream.connect_timeout_secs: must be at least 1",
        );
        check(
            self.upstream.timeout_secs > 0,
            "upstream.timeout_secs: must be at least 1",
        );
        let ws = &self.websocket;
        check(
            ws.max_message_size_bytes >= 64,
            "websocket.max_message_size_bytes: must be at least 64",
        );
        check(
            ws.ping_interval_secs > 0,
            "websocket.ping_interval_secs: must be at least 1",
        );
        check(
            ws.pong_timeout_secs > 0,
            "websocket.pong_timeout_secs: must be at least 1",
        );
        check(
            ws.send_queue_capacity > 0,
            "websocket.send_queue_capacity: must be at least 1",
        );
        check(
            ws.rooms.max_members > 0,
            "websocket.rooms.max_members: must be at least 1",
        );
        check(
            ws.rooms.max_rooms_per_connection > 0,
            "websocket.rooms.max_rooms_per_connection: must be at least 1",
        );
        check(
            self.nats.enabled || !self.nats.required,
            "nats.required: true needs nats.enabled (readiness cannot wait for a NATS that is off)",
        );
        check(
            self.nats.enabled || ws.rooms.client_broadcast,
            "websocket.rooms.client_broadcast: false needs nats.enabled (client messages would go nowhere)",
        );
        check(
            !self.nats.enabled || !self.nats.urls().is_empty(),
            "nats.url: needs at least one server URL",
        );
        // Checked whether NATS is on or not, like every value: a file that
        // passes `check-config` must not fail once NATS is turned on.
        check(
            valid_subject_prefix(&self.nats.subject_prefix),
            "nats.subject_prefix: must be one or more dot-separated tokens without spaces, '*' or '>'",
        );
        check(
            log_level_ok(&self.log.level),
            "log.level: expected a level (trace, debug, info, warn, error, off), or a filter like roomgate=debug",
        );
        self.validate_auth(&mut check);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    fn validate_auth(&self, check: &mut impl FnMut(bool, &str)) {
        check(
            self.auth.allowed_origins.iter().all(|o| origin_ok(o)),
            "auth.allowed_origins: each entry is an origin such as https://app.example.com (\"*\" is no wildcard: an empty list allows every origin)",
        );
        check(
            self.auth.jwt.cookie.is_empty() || cookie_name_ok(&self.auth.jwt.cookie),
            "auth.jwt.cookie: a cookie name (letters, digits and !#$%&'*+-.^_`|~)",
        );
        // Values are checked in every mode, so that a file that passes
        // `check-config` does not fail once the mode is switched.
        check(
            self.auth.upstream.path.starts_with('/')
                && hyper::http::uri::PathAndQuery::try_from(self.auth.upstream.path.as_str())
                    .is_ok(),
            "auth.upstream.path: must be a path starting with '/', percent-encoded where needed",
        );
        check(
            self.auth.upstream.timeout_secs > 0,
            "auth.upstream.timeout_secs: must be at least 1",
        );
        match self.auth.mode {
            AuthMode::None => {}
            AuthMode::Upstream => check(
                !self.upstream.url.is_empty(),
                "auth.mode: \"upstream\" needs upstream.url",
            ),
            AuthMode::Jwt => match self.auth.jwt.algorithm {
                JwtAlgorithm::HS256 => check(
                    !self.auth.jwt.secret_env.is_empty(),
                    "auth.jwt.secret_env: auth.mode \"jwt\" with auth.jwt.algorithm HS256 needs the name of the environment variable holding the secret",
                ),
                JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => check(
                    !self.auth.jwt.public_key_file.is_empty(),
                    "auth.jwt.public_key_file: auth.mode \"jwt\" with auth.jwt.algorithm RS256 or ES256 needs a PEM public key file",
                ),
            },
        }
    }

    /// The configuration as TOML with secrets masked, for `check-config`.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.nats.url = shown
            .nats
            .urls()
            .iter()
            .map(|u| mask_login(u))
            .collect::<Vec<_>>()
            .join(",");
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    /// The public listener address (validated).
    pub fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .parse()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080)))
    }

    /// The admin listener address (validated).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .listen
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9090)))
    }
}

impl WebSocketConfig {
    /// `ping_interval_secs` as a duration.
    pub fn ping_interval(&self) -> Duration {
        secs(self.ping_interval_secs)
    }

    /// `pong_timeout_secs` as a duration.
    pub fn pong_timeout(&self) -> Duration {
        secs(self.pong_timeout_secs)
    }
}

/// The longest a configured duration is taken to be: a century.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A `*_secs` setting as a duration, at most [`MAX_DURATION`]. Any longer
/// value means the same thing ("practically never"), and the clock cannot
/// represent "now" plus the largest ones: unclamped, they made connections
/// panic at their first ping, close or emptied room.
pub fn secs(secs: u64) -> Duration {
    Duration::from_secs(secs).min(MAX_DURATION)
}

/// toml's description of a syntax error, which quotes the line it is on,
/// unless that line holds user info (`nats.url`'s password or token): then
/// the line is named by its number only.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let Some(start) = e.span().map(|span| span.start) else {
        return e.to_string();
    };
    let (before, after) = text.split_at(text.floor_char_boundary(start));
    let line = before.rsplit('\n').next().unwrap_or_default().to_string()
        + after.split('\n').next().unwrap_or_default();
    if !line.contains('@') {
        return e.to_string();
    }
    let number = before.matches('\n').count() + 1;
    format!(
        "line {number}: {} (the line is not shown: it holds a login)",
        e.message().trim_end()
    )
}

fn read_file(explicit: Option<&Path>) -> Result<(PathBuf, Option<String>), ConfigError> {
    match explicit {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| (path.to_path_buf(), Some(t)))
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        None => {
            let path = PathBuf::from(DEFAULT_PATH);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok((path, Some(text))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((path, None)),
                Err(source) => Err(ConfigError::Read { path, source }),
            }
        }
    }
}

/// The type of a leaf key, taken from its default value, which decides how an
/// environment string is parsed.
#[derive(Debug, Clone, Copy)]
enum Kind {
    String,
    Integer,
    Bool,
    List,
}

/// Every leaf key (`websocket.rooms.max_members`) with its kind, derived from
/// the defaults so that a new key is overridable without extra code.
fn leaf_keys() -> BTreeMap<String, Kind> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, Kind>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            let kind = match value {
                toml::Value::Table(t) => {
                    walk(&path, t, out);
                    continue;
                }
                toml::Value::Integer(_) => Kind::Integer,
                toml::Value::Boolean(_) => Kind::Bool,
                toml::Value::Array(_) => Kind::List,
                _ => Kind::String,
            };
            out.insert(path, kind);
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(Config::default()) {
        walk("", &defaults, &mut out);
    }
    out
}

/// The environment variable that overrides `key`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_uppercase())
}

/// What the environment did to the file's table.
struct Overrides {
    /// Variables that match no key.
    warnings: Vec<String>,
    /// The variable that set each key it set.
    set_by: BTreeMap<String, String>,
}

/// Applies `ROOMGATE_*` variables onto the file's table.
///
/// A value can have the right shape for the environment and still not fit
/// its key (`ROOMGATE_LOG_FORMAT=xml`, a negative count). The file alone is
/// known to be valid when this runs, so the table is checked after each
/// variable: the first one that breaks it is the one reported, by name,
/// instead of a schema error blamed on the file.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<Overrides, ConfigError> {
    let keys: BTreeMap<String, (String, Kind)> = leaf_keys()
        .into_iter()
        .map(|(key, kind)| (env_name(&key), (key, kind)))
        .collect();
    let mut warnings = Vec::new();
    let mut set_by = BTreeMap::new();
    for (var, raw) in env {
        if !var.starts_with(ENV_PREFIX) {
            continue;
        }
        let Some((key, kind)) = keys.get(var) else {
            warnings.push(format!("ignoring {var}: it matches no configuration key"));
            continue;
        };
        let value = parse_env_value(raw, *kind).map_err(|message| ConfigError::Env {
            var: var.clone(),
            key: key.clone(),
            message,
        })?;
        insert_path(table, key, value);
        if let Err(e) = Config::deserialize(toml::Value::Table(table.clone())) {
            return Err(ConfigError::Env {
                var: var.clone(),
                key: key.clone(),
                message: schema_message(&e.to_string()),
            });
        }
        set_by.insert(key.clone(), var.clone());
    }
    Ok(Overrides { warnings, set_by })
}

/// toml's schema error without its trailing "in `key`" line, which the
/// environment error already names.
fn schema_message(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("in `"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The process's environment as text, for [`Config::load`]. Variables
/// that are not UTF-8 are left out, unless they override a key: those stop
/// start-up, naming the variable but not its value, which may be a secret.
/// Other `ROOMGATE_` ones are kept without their value, for the warning
/// that every variable matching no key gets. (The HS256 secret's variable,
/// which may be named `ROOMGATE_...` too, is read as bytes elsewhere: any
/// bytes make a secret.)
pub fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (var, value) in std::env::vars_os() {
        let var = match var.into_string() {
            Ok(var) => var,
            // Matches no key; kept (without its value) for the warning that
            // every such `ROOMGATE_` variable gets.
            Err(var) => {
                let name = var.to_string_lossy().into_owned();
                if name.starts_with(ENV_PREFIX) {
                    env.push((name, String::new()));
                }
                continue;
            }
        };
        match value.into_string() {
            Ok(value) => env.push((var, value)),
            // Rare: the keys are listed only then, not at every start.
            Err(_) if leaf_keys().keys().any(|key| env_name(key) == var) => {
                return Err(ConfigError::NotUtf8 { var });
            }
            Err(_) if var.starts_with(ENV_PREFIX) => env.push((var, String::new())),
            Err(_) => {}
        }
    }
    Ok(env)
}

/// An override's value as its key's type. An empty value (only spaces, or
/// only commas for a list) is refused rather than taken as "off": it
/// mostly comes from a template whose variable is unset, and would
/// silently turn off a check the file sets, such as `allowed_origins` or
/// the JWT issuer. To turn a setting off, change the file.
fn parse_env_value(raw: &str, kind: Kind) -> Result<toml::Value, String> {
    let raw = raw.trim();
    let empty = match kind {
        Kind::List => split_list(raw).is_empty(),
        _ => raw.is_empty(),
    };
    if empty {
        return Err("empty; unset the variable to keep the file's value".to_string());
    }
    match kind {
        Kind::String => Ok(toml::Value::String(raw.to_string())),
        Kind::Integer => raw
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|e| match e.kind() {
                std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                    format!("{raw} is out of range")
                }
                _ => format!("expected an integer, got {raw:?}"),
            }),
        Kind::Bool => match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!(
                "expected true or false (or 1/0, yes/no, on/off), got {raw:?}"
            )),
        },
        Kind::List => Ok(toml::Value::Array(
            split_list(raw)
                .into_iter()
                .map(toml::Value::String)
                .collect(),
        )),
    }
}

fn insert_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        current = next;
    }
    current.insert(last.to_string(), value);
}

/// Whether `text` names `key` as a whole (`nats.enabled`, not the
/// `nats.enabled` inside `nats.enabled_x`).
fn mentions_key(text: &str, key: &str) -> bool {
    let part_of_key = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    text.match_indices(key).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + key.len()..].chars().next();
        !before.is_some_and(part_of_key) && !after.is_some_and(|c| part_of_key(c) && c != '.')
    })
}

/// The HS256 secret's variable may well be named `ROOMGATE_...`; it is not a
/// configuration key, so it is not worth a warning.
fn mentions_secret_var(warning: &str, config: &Config) -> bool {
    let var = &config.auth.jwt.secret_env;
    !var.is_empty() && warning.starts_with(&format!("ignoring {var}:"))
}

fn split_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Whether two listen addresses cannot both be bound: the same port (not
/// 0, which picks a free one) on the same address, or with either one on
/// every address.
fn listeners_clash(a: &str, b: &str) -> bool {
    let (Ok(a), Ok(b)) = (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) else {
        return false;
    };
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// User info is refused: the authority becomes the proxied requests'
/// `Host`, and a password there would be sent along and printed unmasked.
fn upstream_url_ok(url: &str) -> bool {
    match url.parse::<hyper::Uri>() {
        Ok(uri) => {
            uri.scheme_str() == Some("http")
                && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
                && uri.query().is_none()
                && !url.contains('#')
        }
        Err(_) => false,
    }
}

/// A path a request can carry, to match as a whole: a query or fragment
/// would never match, as paths are compared without them.
fn ws_path_ok(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains(['?', '#'])
        && hyper::http::uri::PathAndQuery::try_from(path).is_ok()
}

/// An origin as browsers send it (RFC 6454 §6.1): a scheme, a host and an
/// optional port, nothing more; or `null`, which browsers send from
/// sandboxed and file pages.
fn origin_ok(origin: &str) -> bool {
    if origin == "null" {
        return true;
    }
    match origin.trim_end_matches('/').parse::<hyper::Uri>() {
        Ok(uri) => {
            // Browsers leave the scheme's default port out (RFC 6454 §6.2),
            // and origins are compared as text.
            let default_port = match uri.scheme_str() {
                Some(scheme) if scheme.eq_ignore_ascii_case("https") => Some(443),
                Some(scheme) if scheme.eq_ignore_ascii_case("http") => Some(80),
                _ => None,
            };
            uri.scheme().is_some()
                && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
                && uri.path_and_query().is_none_or(|p| p.as_str() == "/")
                && (default_port.is_none() || uri.port_u16() != default_port)
        }
        Err(_) => false,
    }
}

/// A cookie name (RFC 6265 §4.1.1: an HTTP token).
fn cookie_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A filter `tracing` accepts, in which every bare word is a level. The
/// filter syntax reads a bare word as a target name, so a misspelt level
/// (`warning`) would pass and silence every log line.
fn log_level_ok(level: &str) -> bool {
    tracing_subscriber::EnvFilter::try_new(level).is_ok()
        && level
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && !d.contains(['=', '[']))
            .all(|d| d.parse::<tracing::level_filters::LevelFilter>().is_ok())
}

fn valid_subject_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty() && !t.contains(['*', '>']) && !t.chars().any(char::is_whitespace)
        })
}

/// A server URL with the secret in its user info hidden: the password of
/// `user:pass@`, or all of it for `token@`, which NATS reads as a token.
/// The scheme is optional, as it is to the NATS client, which logs in with
/// `user:pass@host:4222` all the same. Used wherever a URL is shown:
/// `check-config` and errors about a URL.
pub fn mask_login(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    // The last `@` ends the user info: a password may hold one unencoded.
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    let login = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{login}@{host}"),
        None => format!("{login}@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syntax_error_on_a_line_with_a_login_does_not_show_the_line() {
        let load = |text: &str| {
            let path = std::env::temp_dir().join(format!("roomgate-{}.toml", uuid::Uuid::new_v4()));
            std::fs::write(&path, text).expect("write");
            let error = Config::load(Some(&path), Vec::new()).expect_err("a syntax error");
            let _ = std::fs::remove_file(&path);
            error.to_string()
        };
        let error = load("[nats]\nurl = \"nats://app:hunter2@10.0.0.1:4222\n");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("line 2: "), "{error}");
        // Elsewhere toml shows the line, which helps.
        let error = load("[server]\nlisten = 8080x\n");
        assert!(error.contains("listen = 8080x"), "{error}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn documented_default_file_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_PATH);
        let loaded = Config::load(Some(&path), Vec::new()).expect("default config parses");
        assert_eq!(loaded.config, Config::default());
    }

    #[test]
    fn env_overrides_nested_keys_and_lists() {
        let loaded = Config::load(
            Some(Path::new(&format!(
                "{}/{DEFAULT_PATH}",
                env!("CARGO_MANIFEST_DIR")
            ))),
            env(&[
                ("ROOMGATE_WEBSOCKET_ROOMS_MAX_MEMBERS", "50"),
                ("ROOMGATE_SERVER_WS_PATHS", "/ws, /live"),
                ("ROOMGATE_NATS_ENABLED", "false"),
                ("ROOMGATE_NOT_A_KEY", "1"),
            ]),
        )
        .expect("loads");
        assert_eq!(loaded.config.websocket.rooms.max_members, 50);
        assert_eq!(loaded.config.server.ws_paths, vec!["/ws", "/live"]);
        assert!(!loaded.config.nats.enabled);
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.warnings[0].contains("ROOMGATE_NOT_A_KEY"));
    }

    #[test]
    fn bad_env_value_names_variable_and_key() {
        let err =
            Config::load(None, env(&[("ROOMGATE_SERVER_MAX_CONNECTIONS", "lots")])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("ROOMGATE_SERVER_MAX_CONNECTIONS"), "{msg}");
        assert!(msg.contains("server.max_connections"), "{msg}");
    }

    #[test]
    fn env_value_that_does_not_fit_its_key_is_blamed_on_the_variable() {
        let err = Config::load(None, env(&[("ROOMGATE_LOG_FORMAT", "xml")])).unwrap_err();
        let ConfigError::Env { var, key, message } = &err else {
            panic!("expected an environment error, got {err}");
        };
        assert_eq!(var, "ROOMGATE_LOG_FORMAT");
        assert_eq!(key, "log.format");
        assert!(message.contains("xml"), "{message}");
    }

    #[test]
    fn a_value_refused_by_validation_names_the_variable_that_set_it() {
        let err = Config::load(None, env(&[("ROOMGATE_SERVER_LISTEN", "foo")])).unwrap_err();
        let ConfigError::Invalid(problems) = &err else {
            panic!("expected a validation error, got {err}");
        };
        assert_eq!(
            problems,
            &["server.listen: expected an address such as 0.0.0.0:8080 \
               (set by ROOMGATE_SERVER_LISTEN)"]
        );
        // A key the environment did not set is the file's (or the default's).
        let mut config = Config::default();
        config.server.listen = "foo".into();
        let problems = match config.validate().map_err(|e| {
            e.naming_variables(&BTreeMap::from([(
                "admin.listen".to_string(),
                "ROOMGATE_ADMIN_LISTEN".to_string(),
            )]))
        }) {
            Err(ConfigError::Invalid(problems)) => problems,
            other => panic!("expected a validation error, got {other:?}"),
        };
        assert!(!problems[0].contains("set by"), "{problems:?}");
    }

    #[test]
    fn a_problem_names_the_variable_that_set_the_mode_it_depends_on() {
        let err = Config::load(None, env(&[("ROOMGATE_AUTH_MODE", "jwt")])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("auth.jwt.secret_env:"), "{msg}");
        assert!(
            msg.contains("(auth.mode set by ROOMGATE_AUTH_MODE)"),
            "{msg}"
        );
        assert!(
            !msg.contains("(set by"),
            "the key at fault was not set: {msg}"
        );
        assert!(mentions_key("needs nats.enabled (x)", "nats.enabled"));
        assert!(mentions_key("needs nats.enabled.", "nats.enabled"));
        assert!(!mentions_key("needs nats.enabled_x", "nats.enabled"));
        assert!(!mentions_key("needs xnats.enabled", "nats.enabled"));
    }

    #[test]
    fn an_integer_too_large_for_any_key_is_out_of_range() {
        let err = Config::load(
            None,
            env(&[(
                "ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS",
                "18446744073709551615",
            )]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("18446744073709551615 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn values_of_a_mode_that_is_off_are_checked_too() {
        let errors = errors_with(|c| c.auth.upstream.path = "auth".into());
        assert!(errors[0].starts_with("auth.upstream.path"), "{errors:?}");
        let errors = errors_with(|c| c.auth.upstream.timeout_secs = 0);
        assert!(
            errors[0].starts_with("auth.upstream.timeout_secs"),
            "{errors:?}"
        );
        let errors = errors_with(|c| {
            c.nats.enabled = false;
            c.nats.subject_prefix = "a b".into();
        });
        assert!(errors[0].starts_with("nats.subject_prefix"), "{errors:?}");
        // What is only required in a mode is not required outside it.
        assert!(errors_with(|c| c.nats.enabled = false).is_empty());
        assert!(errors_with(|c| c.auth.jwt.secret_env.clear()).is_empty());
    }

    #[test]
    fn every_leaf_key_has_an_env_name() {
        let keys = leaf_keys();
        assert!(keys.contains_key("websocket.rooms.idle_timeout_secs"));
        assert!(keys.contains_key("auth.jwt.secret_env"));
        assert_eq!(
            env_name("websocket.max_message_size_bytes"),
            "ROOMGATE_WEBSOCKET_MAX_MESSAGE_SIZE_BYTES"
        );
    }

    #[test]
    fn inconsistent_settings_are_all_reported() {
        let mut config = Config::default();
        config.auth.mode = AuthMode::Upstream;
        config.server.listen = "nowhere".into();
        let Err(ConfigError::Invalid(errors)) = config.validate() else {
            panic!("expected validation errors");
        };
        assert!(errors.iter().any(|e| e.starts_with("auth.mode")));
        assert!(errors.iter().any(|e| e.starts_with("server.listen")));
    }

    /// The validation errors of the default config with `edit` applied.
    fn errors_with(edit: impl FnOnce(&mut Config)) -> Vec<String> {
        let mut config = Config::default();
        edit(&mut config);
        match config.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(errors)) => errors,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn settings_that_need_nats_are_refused_without_it() {
        let without_nats = |edit: fn(&mut Config)| {
            errors_with(|c| {
                c.nats.enabled = false;
                edit(c);
            })
        };
        let errors = without_nats(|c| c.nats.required = true);
        assert!(
            errors.iter().any(|e| e.starts_with("nats.required")),
            "{errors:?}"
        );
        let errors = without_nats(|c| c.websocket.rooms.client_broadcast = false);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("websocket.rooms.client_broadcast")),
            "{errors:?}"
        );
        assert!(
            without_nats(|_| {}).is_empty(),
            "NATS off is fine on its own"
        );
        assert!(
            errors_with(|c| {
                c.nats.required = true;
                c.websocket.rooms.client_broadcast = false;
            })
            .is_empty()
        );
    }

    #[test]
    fn a_misspelt_log_level_is_refused() {
        for bad in ["warning", "inf", "verbose", "info,chatty"] {
            let errors = errors_with(|c| c.log.level = bad.into());
            assert!(
                errors.iter().any(|e| e.starts_with("log.level")),
                "{bad}: {errors:?}"
            );
        }
        for good in [
            "info",
            "WARN",
            "off",
            "roomgate=debug",
            "warn,roomgate=trace",
            "",
        ] {
            assert_eq!(
                errors_with(|c| c.log.level = good.into()),
                Vec::<String>::new(),
                "{good}"
            );
        }
    }

    #[test]
    fn the_admin_listener_may_not_take_the_gateway_address() {
        for (server, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "[::]:8080"),
        ] {
            let errors = errors_with(|c| {
                c.server.listen = server.into();
                c.admin.listen = admin.into();
            });
            assert!(
                errors.iter().any(|e| e.starts_with("admin.listen")),
                "{server} {admin}"
            );
        }
        for (server, admin) in [
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("127.0.0.1:8080", "127.0.0.2:8080"),
        ] {
            let errors = errors_with(|c| {
                c.server.listen = server.into();
                c.admin.listen = admin.into();
            });
            assert!(errors.is_empty(), "{server} {admin}: {errors:?}");
        }
    }

    #[test]
    fn an_upstream_url_with_user_info_is_refused() {
        let errors = errors_with(|c| c.upstream.url = "http://user:s3cret@127.0.0.1:3000".into());
        assert!(
            errors.iter().any(|e| e.starts_with("upstream.url")),
            "{errors:?}"
        );
        assert!(errors_with(|c| c.upstream.url = "http://127.0.0.1:3000/api".into()).is_empty());
    }

    #[test]
    fn passwords_are_masked() {
        let mut config = Config::default();
        config.nats.url = "nats://app:hunter2@10.0.0.1:4222,nats://10.0.0.2:4222".into();
        let shown = config.to_masked_toml();
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("nats://app:***@10.0.0.1:4222,nats://10.0.0.2:4222"));
    }

    #[test]
    fn origins_are_a_scheme_a_host_and_a_port_or_null() {
        for good in [
            "https://app.example.com",
            "https://app.example.com/",
            "http://localhost:3000",
            "http://[::1]:8080",
            "https://app.example.com:80",
            "null",
        ] {
            assert!(origin_ok(good), "{good}");
        }
        for bad in [
            "*",
            "",
            "app.example.com",
            "https://app.example.com/path",
            "https://app.example.com?q",
            "https://me@app.example.com",
            "https://app.example.com:443",
            "http://app.example.com:80",
        ] {
            assert!(!origin_ok(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_in_the_user_info_are_masked() {
        for (url, shown) in [
            (
                "nats://s3cr3t-token@10.0.0.1:4222",
                "nats://***@10.0.0.1:4222",
            ),
            (
                "nats://app:p@ss@10.0.0.1:4222",
                "nats://app:***@10.0.0.1:4222",
            ),
            // The NATS client takes URLs without a scheme, logins included.
            ("app:s3cr3t@10.0.0.1:4222", "app:***@10.0.0.1:4222"),
            ("s3cr3t-token@10.0.0.1:4222", "***@10.0.0.1:4222"),
            ("10.0.0.1:4222", "10.0.0.1:4222"),
        ] {
            assert_eq!(mask_login(url), shown);
        }
    }
}
