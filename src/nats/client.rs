//! Making the gateway's NATS clients: the server URLs of `nats.url` and
//! the login they carry, the credentials file, the connect options, and
//! what the client reports about its connection.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};
use prometheus::IntCounter;
use tracing::{debug, info, warn};

use super::refused::ServerReports;
use super::{NatsSetupError, SUBSCRIPTION_CAPACITY, diagnose};
use crate::config::{NatsConfig, mask_login};
use crate::metrics::Metrics;

/// The servers of `nats.url` and how to log in to them, checked. The URLs
/// lose their user info on the way: it becomes the client's login, since
/// async-nats 0.51 does not log in with credentials found in a server URL
/// (nats-io/nats.rs#1623).
pub struct Servers {
    addrs: Vec<ServerAddr>,
    options: ConnectOptions,
}

impl Servers {
    /// Reads `[nats]`: the server URLs with their login, and the
    /// credentials file. Both `check-config` and start-up call it, so the
    /// one refuses what the other would.
    pub fn new(config: &NatsConfig) -> Result<Self, NatsSetupError> {
        let mut addrs = Vec::new();
        let mut login: Option<Login> = None;
        let urls = config.urls();
        for (n, url) in urls.iter().enumerate() {
            let named = || named_url(url, n, urls.len());
            // The URL parser ends the user info at a `?` or `#`, where the
            // masking would not: what follows would be taken for the host,
            // and shown and looked up.
            if url.contains(['?', '#']) {
                return Err(NatsSetupError::Url(format!(
                    "{}: a server URL has no query or fragment (write `?` and `#` in a \
                     password or token as %3F and %23)",
                    named()
                )));
            }
            let addr = url
                .parse::<ServerAddr>()
                .map_err(|e| NatsSetupError::Url(format!("{}: {e}", named())))?;
            if let Some(found) = Login::of(&addr)? {
                if login.as_ref().is_some_and(|l| *l != found) {
                    return Err(NatsSetupError::Logins);
                }
                login = Some(found);
            }
            addrs.push(without_login(addr)?);
        }
        let options = credentials(config)?;
        let options = match login {
            Some(login) => login.apply(options),
            None => options,
        };
        Ok(Self { addrs, options })
    }
}

/// How an error names the `n`th of `total` server URLs: with its secret
/// masked when it has user info, and by its place alone when it has none,
/// since it may then be a piece of a password cut at a `,`, which
/// separates the URLs.
fn named_url(url: &str, n: usize, total: usize) -> String {
    if url.contains('@') {
        mask_login(url)
    } else {
        format!(
            "server URL {} of {total} (not shown: a `,` in a password or token, which must be \
             written %2C, would make a piece of it one)",
            n + 1
        )
    }
}

/// The connect options with the credentials file loaded, if there is one.
/// Read with blocking I/O: it is one small file, read once before anything
/// is served, and `check-config` has no runtime.
fn credentials(config: &NatsConfig) -> Result<ConnectOptions, NatsSetupError> {
    if config.creds_file.is_empty() {
        return Ok(ConnectOptions::new());
    }
    std::fs::read_to_string(&config.creds_file)
        .and_then(|creds| ConnectOptions::with_credentials(&creds))
        .map_err(|source| NatsSetupError::Credentials {
            path: config.creds_file.clone(),
            source,
        })
}

/// A login taken from a server URL's user info. Not `Debug`: it holds a
/// secret.
#[derive(PartialEq, Eq)]
enum Login {
    /// `user:password@`.
    Password { user: String, password: String },
    /// `token@`: NATS reads user info without a password as a token.
    Token(String),
}

impl Login {
    /// The login in `addr`'s user info, percent-decoded, if it has one.
    fn of(addr: &ServerAddr) -> Result<Option<Self>, NatsSetupError> {
        let user = addr.username().map(decode).transpose()?;
        let password = addr.password().map(decode).transpose()?;
        Ok(match (user, password) {
            (user, Some(password)) => Some(Self::Password {
                user: user.unwrap_or_default(),
                password,
            }),
            (Some(token), None) => Some(Self::Token(token)),
            (None, None) => None,
        })
    }

    fn apply(self, options: ConnectOptions) -> ConnectOptions {
        match self {
            Self::Password { user, password } => options.user_and_password(user, password),
            Self::Token(token) => options.token(token),
        }
    }
}

/// Percent-decodes a URL's user or password: a URL carries `@`, `:` or
/// `/` in them as `%40`, `%3A`, `%2F`.
fn decode(text: &str) -> Result<String, NatsSetupError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| NatsSetupError::Url("the user info is not UTF-8 once percent-decoded".into()))
}

/// `addr` without its user info. The login is in the connect options
/// instead, so no address async-nats logs (at debug level) shows it, and a
/// server that a cluster announces (without user info) is recognised as
/// one of the configured ones.
fn without_login(addr: ServerAddr) -> Result<ServerAddr, NatsSetupError> {
    let mut url = addr.into_inner();
    // Only a URL without a host refuses, and a NATS server URL has one.
    url.set_username("")
        .and_then(|()| url.set_password(None))
        .map_err(|()| NatsSetupError::Url("a server URL has no host".into()))?;
    ServerAddr::from_url(url).map_err(|e| NatsSetupError::Url(e.to_string()))
}

/// What makes the gateway's NATS clients: the first at start-up, and a new
/// one should a client stop for good (see [`Bridge::run`](super::Bridge::run)).
#[derive(Clone)]
pub struct Connector {
    config: NatsConfig,
    gateway_id: Arc<str>,
    metrics: Metrics,
    /// What the server reported; the bridge takes the refused subjects.
    pub(super) reports: Arc<ServerReports>,
}

impl Connector {
    /// A connector for `config`, naming its clients after `gateway_id`.
    pub fn new(config: &NatsConfig, gateway_id: Arc<str>, metrics: &Metrics) -> Self {
        Self {
            config: config.clone(),
            gateway_id,
            metrics: metrics.clone(),
            reports: Arc::new(ServerReports::new(metrics.nats_publish_errors.clone())),
        }
    }

    /// The servers the clients are told of, for a look at why none can be
    /// reached.
    pub(super) fn targets(&self) -> Vec<diagnose::Target> {
        // Start-up has checked every URL (`Servers::new`).
        (self.config.urls().iter())
            .filter_map(|url| url.parse::<ServerAddr>().ok())
            .map(|addr| diagnose::Target::of(&addr))
            .collect()
    }

    /// Creates a NATS client. It returns at once: the connection is made
    /// in the background and retried forever; [`Bridge::run`](super::Bridge::run) keeps
    /// `roomgate_nats_connected` in line with its state.
    pub async fn connect(&self) -> Result<Client, NatsSetupError> {
        connect(
            &self.config,
            &self.gateway_id,
            &self.metrics,
            self.reports.clone(),
        )
        .await
    }
}

async fn connect(
    config: &NatsConfig,
    gateway_id: &str,
    metrics: &Metrics,
    reports: Arc<ServerReports>,
) -> Result<Client, NatsSetupError> {
    let Servers { addrs, options } = Servers::new(config)?;
    let slow_consumer = metrics.dropped_nats_slow_consumer.clone();
    options
        .name(format!("roomgate {gateway_id}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // The server does not send this instance's publications back to it;
        // the `Roomgate-Gateway` check in `inbound` stays as a second guard.
        .no_echo()
        .connection_timeout(CONNECT_TIMEOUT)
        // A server that stops answering (frozen, or a dead link that TCP
        // has not noticed) is given up after three unanswered pings: 30 s
        // rather than async-nats' default of three minutes.
        .ping_interval(Duration::from_secs(10))
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .reconnect_delay_callback(reconnect_delay)
        // Events are for logs and the slow-consumer count only: async-nats
        // drops events when its event queue is full, so the connected gauge
        // is taken from the client's state instead (see `watch_connection`).
        .event_callback(move |event| on_event(event, slow_consumer.clone(), reports.clone()))
        .connect(addrs)
        .await
        .map_err(|e| NatsSetupError::Connect(e.to_string()))
}

/// Logs a client event, counts the messages async-nats dropped because a
/// subscription's buffer was full, and passes on the server's errors.
async fn on_event(
    event: async_nats::Event,
    slow_consumer: IntCounter,
    reports: Arc<ServerReports>,
) {
    match event {
        async_nats::Event::ServerError(error) => reports.report(&error),
        async_nats::Event::LameDuckMode => {
            info!("NATS server entering lame duck mode; the client will reconnect")
        }
        async_nats::Event::Connected => info!("NATS connected"),
        async_nats::Event::Disconnected => {
            warn!("NATS disconnected; rooms keep working, events are dropped until it is back")
        }
        async_nats::Event::SlowConsumer(sid) => {
            slow_consumer.inc();
            debug!(sid, "NATS subscription full; a message was dropped");
        }
        other => debug!(event = %other, "NATS event"),
    }
}

/// The longest the client waits between two attempts to connect.
pub(super) const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);

/// How long one attempt to connect to a server may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Exponential backoff from 100 ms, capped at [`RECONNECT_DELAY_MAX`]: a
/// restarted NATS is found quickly without hammering one that stays down.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.min(5) as u32;
    Duration::from_millis(100 * 2u64.pow(exp)).min(RECONNECT_DELAY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(100));
        assert_eq!(reconnect_delay(1), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100), Duration::from_secs(2));
    }

    #[test]
    fn urls_are_parsed_and_masked() {
        let config = NatsConfig {
            url: "nats://a:secret@127.0.0.1:4222, nats://127.0.0.1:4223".into(),
            ..NatsConfig::default()
        };
        assert_eq!(Servers::new(&config).expect("valid").addrs.len(), 2);
        // A URL that does not parse is named in the error without its
        // password.
        let config = NatsConfig {
            url: "nats://a:secret@127.0.0.1:4222, nats://a:secret@127.0.0.1:99999".into(),
            ..NatsConfig::default()
        };
        let error = match Servers::new(&config) {
            Err(NatsSetupError::Url(message)) => message,
            Err(other) => panic!("expected a URL error, got {other}"),
            Ok(_) => panic!("port 99999 was accepted"),
        };
        assert!(
            error.starts_with("nats://a:***@127.0.0.1:99999: "),
            "{error}"
        );
        assert!(!error.contains("secret"), "{error}");
        // A `,` in a password cuts the list in two; the piece before it
        // is not shown.
        let error = url_error("nats://user:secretpart1,secretpart2@h:4222");
        assert!(error.starts_with("server URL 1 of 2 (not shown"), "{error}");
        assert!(!error.contains("secretpart"), "{error}");
        // A `#` or `?` would end the user info for the parser, not for the
        // masking.
        for url in ["nats://TOPSECRET#tok@127.0.0.1:4222", "nats://a:b?c@h:1"] {
            let error = url_error(url);
            assert!(error.contains("no query or fragment"), "{error}");
            assert!(
                !error.contains("TOPSECRET") && !error.contains("b?c"),
                "{error}"
            );
        }
    }

    /// The error `Servers::new` gives for `url`, which must be one.
    fn url_error(url: &str) -> String {
        let config = NatsConfig {
            url: url.into(),
            ..NatsConfig::default()
        };
        match Servers::new(&config) {
            Err(NatsSetupError::Url(message)) => message,
            Err(other) => panic!("expected a URL error, got {other}"),
            Ok(_) => panic!("{url} was accepted"),
        }
    }

    fn login(url: &str) -> Option<Login> {
        Login::of(&url.parse().expect("valid URL")).expect("decodable")
    }

    #[test]
    fn user_info_becomes_a_login() {
        let password = |user: &str, password: &str| Login::Password {
            user: user.into(),
            password: password.into(),
        };
        assert!(login("nats://h:1").is_none());
        assert!(login("nats://a:b@h:1") == Some(password("a", "b")));
        assert!(login("nats://a:p%40ss%3A%2F@h:1") == Some(password("a", "p@ss:/")));
        assert!(login("nats://a:p@ss@h:1") == Some(password("a", "p@ss")));
        assert!(login("nats://:b@h:1") == Some(password("", "b")));
        assert!(login("nats://t0k%2Ben@h:1") == Some(Login::Token("t0k+en".into())));
    }

    #[test]
    fn the_login_is_taken_out_of_the_addresses() {
        let config = NatsConfig {
            url: "nats://a:b@127.0.0.1:4222".into(),
            ..NatsConfig::default()
        };
        let servers = Servers::new(&config).expect("valid");
        assert_eq!(servers.addrs[0].username(), None);
        assert_eq!(servers.addrs[0].password(), None);
        assert_eq!(servers.addrs[0].port(), 4222);
    }

    #[test]
    fn one_login_for_every_server_or_none() {
        let servers = |url: &str| {
            Servers::new(&NatsConfig {
                url: url.into(),
                ..NatsConfig::default()
            })
        };
        assert!(servers("nats://a:b@h:1, nats://a:b@h:2, nats://h:3").is_ok());
        assert!(matches!(
            servers("nats://a:b@h:1, nats://a:c@h:2"),
            Err(NatsSetupError::Logins)
        ));
        assert!(matches!(
            servers("nats://a:b@h:1, nats://a@h:2"),
            Err(NatsSetupError::Logins)
        ));
    }
}
