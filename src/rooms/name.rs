//! Room names and room patterns.
//!
//! A room name is also a NATS subject suffix (`game.42.lobby` becomes
//! `roomgate.broadcast.game.42.lobby`), so the syntax is strict and nothing
//! is escaped: 1 to 128 bytes of `A-Z a-z 0-9 _ - : @ =` in dot-separated,
//! non-empty tokens.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest room name in bytes.
pub const MAX_ROOM_LEN: usize = 128;

/// A validated room name. Cloning shares the text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name` against SPEC §1; `None` means `invalid_room`.
    pub fn parse(name: &str) -> Option<Self> {
        is_valid(name).then(|| Self(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Whether `name` is a valid room name.
pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROOM_LEN
        && name
            .split('.')
            .all(|token| !token.is_empty() && token.bytes().all(is_name_byte))
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'@' | b'=')
}

/// The rooms a user may join, as NATS-style patterns: `*` matches exactly one
/// token, a final `>` matches one or more remaining tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPatterns(Vec<Box<str>>);

impl RoomPatterns {
    /// Builds the set from patterns, dropping empty ones. A pattern that is
    /// not well formed matches nothing rather than failing the connection.
    pub fn new<I, S>(patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self(
            patterns
                .into_iter()
                .filter_map(|p| {
                    let p = p.as_ref().trim();
                    (!p.is_empty()).then(|| p.into())
                })
                .collect(),
        )
    }

    /// Whether any pattern admits `room`.
    pub fn allows(&self, room: &str) -> bool {
        self.0.iter().any(|p| pattern_matches(p, room))
    }
}

fn pattern_matches(pattern: &str, room: &str) -> bool {
    let mut names = room.split('.');
    let mut pats = pattern.split('.').peekable();
    while let Some(p) = pats.next() {
        if p == ">" {
            // `>` must be last and needs at least one token left.
            return pats.peek().is_none() && names.next().is_some();
        }
        match names.next() {
            Some(n) if p == "*" || p == n => continue,
            _ => return false,
        }
    }
    names.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_of_the_spec() {
        for name in [
            "general",
            "game.42.lobby",
            "a",
            "user:42@eu=1",
            "A_b-C",
            &"x".repeat(128),
        ] {
            assert!(is_valid(name), "{name} should be valid");
        }
    }

    #[test]
    fn refuses_everything_else() {
        let too_long = "x".repeat(129);
        for name in [
            "", ".", "a.", ".a", "a..b", "a b", "a*", "a.>", "é", "a/b", "a#", &too_long, "a\n",
            "a.b.",
        ] {
            assert!(!is_valid(name), "{name:?} should be invalid");
        }
    }

    #[test]
    fn patterns_follow_nats_wildcards() {
        let p = RoomPatterns::new(["chat.*", "game.>", "lobby"]);
        assert!(p.allows("chat.general"));
        assert!(!p.allows("chat"));
        assert!(!p.allows("chat.a.b"));
        assert!(p.allows("game.1"));
        assert!(p.allows("game.1.2"));
        assert!(!p.allows("game"));
        assert!(p.allows("lobby"));
        assert!(!p.allows("admin"));
        assert!(!RoomPatterns::new(["a.>.b"]).allows("a.x.b"));
        assert!(RoomPatterns::new([">"]).allows("anything.at.all"));
        assert!(!RoomPatterns::new(Vec::<String>::new()).allows("a"));
    }
}
