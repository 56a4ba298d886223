//! An example roomgate backend: an echo bot with one moderation rule.
//!
//! It listens to every client message the gateways publish on
//! `<prefix>.message.>` and answers into the same room through
//! `<prefix>.broadcast.<room>` with the header `Roomgate-From: bot`, so every
//! member, on every gateway instance, sees `echo: <text>` from `bot`. A
//! message containing a blocked word is not echoed: its author alone gets a
//! warning through `<prefix>.send.<connection_id>`.
//!
//! ```sh
//! nats-server &                          # NATS on 127.0.0.1:4222
//! cargo run                              # the gateway
//! cargo run --example echo_backend       # this bot
//! ```
//!
//! `NATS_URL` (default `nats://127.0.0.1:4222`) and
//! `ROOMGATE_NATS_SUBJECT_PREFIX` (default `roomgate`, as for the gateway)
//! change where it listens.

use async_nats::{Client, HeaderMap, Message, Subscriber};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;

/// What the author of a blocked message is told.
pub const WARNING: &str = "please keep it civil";

/// Words the bot refuses to echo.
const BLOCKED: &[&str] = &["badword"];

/// The payload of `<prefix>.message.<room>`, as the gateway publishes it.
#[derive(Debug, Deserialize)]
struct ClientMessage {
    room: String,
    content: Value,
    /// The sender's connection id.
    from: String,
}

/// The bot: a NATS client and its subscription to client messages.
pub struct EchoBot {
    client: Client,
    prefix: String,
    messages: Subscriber,
}

impl EchoBot {
    /// Subscribes to `<prefix>.message.>`.
    pub async fn start(client: Client, prefix: &str) -> Result<Self, async_nats::Error> {
        let messages = client.subscribe(format!("{prefix}.message.>")).await?;
        client.flush().await?;
        Ok(Self {
            client,
            prefix: prefix.to_string(),
            messages,
        })
    }

    /// Answers messages until the subscription ends.
    pub async fn run(mut self) {
        while let Some(message) = self.messages.next().await {
            if let Err(e) = self.answer(&message).await {
                eprintln!("cannot answer a message on {}: {e}", message.subject);
            }
        }
    }

    async fn answer(&self, message: &Message) -> Result<(), async_nats::Error> {
        let Ok(incoming) = serde_json::from_slice::<ClientMessage>(&message.payload) else {
            // Not something a gateway published; not ours to answer.
            return Ok(());
        };
        // A string is echoed as is, any other JSON value as its text.
        let text = match &incoming.content {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut headers = HeaderMap::new();
        headers.insert("Roomgate-From", "bot");
        if BLOCKED.iter().any(|word| text.contains(word)) {
            let subject = format!("{}.send.{}", self.prefix, incoming.from);
            self.client
                .publish_with_headers(subject, headers, WARNING.into())
                .await?;
        } else {
            // `broadcast`, not `message`: the bot's own words are not client
            // messages, so it never hears (and echoes) itself.
            let subject = format!("{}.broadcast.{}", self.prefix, incoming.room);
            self.client
                .publish_with_headers(subject, headers, format!("echo: {text}").into())
                .await?;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix =
        std::env::var("ROOMGATE_NATS_SUBJECT_PREFIX").unwrap_or_else(|_| "roomgate".into());
    let client = async_nats::connect(url.as_str()).await?;
    let bot = EchoBot::start(client, &prefix).await?;
    println!("echo bot: listening on {prefix}.message.> at {url}");
    bot.run().await;
    Ok(())
}
