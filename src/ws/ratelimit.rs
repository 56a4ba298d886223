//! Per-connection rate limit on incoming frames.

use std::time::Instant;

/// A token bucket holding up to one second's worth of frames: a client may
/// burst to `rate` frames at once and sustain `rate` per second. Owned by
/// the session's reader, so it needs no synchronisation.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket for `per_sec` frames per second; `None` when unlimited (0).
    pub fn new(per_sec: u32, now: Instant) -> Option<Self> {
        (per_sec > 0).then(|| Self {
            rate: f64::from(per_sec),
            tokens: f64::from(per_sec),
            last: now,
        })
    }

    /// Takes one token if available.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn zero_means_unlimited() {
        assert!(TokenBucket::new(0, Instant::now()).is_none());
    }

    #[test]
    fn allows_a_burst_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(5, t0).expect("limited");
        assert_eq!((0..10).filter(|_| bucket.try_take(t0)).count(), 5);
        assert!(!bucket.try_take(t0));
        // 200 ms at 5/s is one token.
        let t1 = t0 + Duration::from_millis(200);
        assert!(bucket.try_take(t1));
        assert!(!bucket.try_take(t1));
        // A long pause refills to the burst size, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.try_take(t2)).count(), 5);
    }

    #[test]
    fn time_going_backwards_does_not_mint_tokens() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut bucket = TokenBucket::new(1, t0).expect("limited");
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0 - Duration::from_millis(500)));
    }
}
