//! Rate-limited warnings for the read path: reads are triggered by containers, so a container
//! reading a file whose chunks cannot be fetched must not be able to flood the node's log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one warning per layer in this interval; failures in between are counted and the
/// count is reported with the next warning. Details of every failure are at debug level.
pub(crate) const READ_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Lets one event through per interval and counts the ones it holds back.
#[derive(Debug)]
pub(crate) struct RateLimit {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State::default()),
        }
    }

    /// `Some(n)` when an event at `now` may be reported, `n` being the events held back since
    /// the last one reported; `None` when it is held back (and counted).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval_and_the_held_back_count_with_the_next() {
        let limit = RateLimit::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        for s in 1..=59 {
            assert_eq!(limit.allow(t0 + Duration::from_secs(s)), None, "{s}");
        }
        assert_eq!(limit.allow(t0 + Duration::from_secs(60)), Some(59));
        assert_eq!(limit.allow(t0 + Duration::from_secs(61)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(500)), Some(1));
        assert_eq!(limit.allow(t0 + Duration::from_secs(1000)), Some(0));
        // A clock that appears to go back (events raced to the lock) is held back, not a panic.
        assert_eq!(limit.allow(t0), None);
    }
}
