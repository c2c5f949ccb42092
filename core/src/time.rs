//! Time as a value: the core never reads a clock.
//!
//! Every input to the [`Engine`](crate::Engine) carries `now: Instant`. A runtime makes
//! instants from its monotonic clock, anchored once at start to the wall clock, so an
//! [`Instant`] is both monotonic within a run and close to Unix time (which is what a
//! timer's timestamp and a retry's "last retry" header need). The simulator makes
//! instants from nothing at all: [`Instant::from_unix_millis`].

use std::fmt;
use std::ops::{Add, AddAssign, Sub};
use std::time::Duration;

/// A point in time, in nanoseconds since the Unix epoch, as supplied by the caller.
///
/// This type does not read any clock and cannot: it is built from numbers. Arithmetic
/// saturates instead of panicking, so a far deadline never overflows.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The Unix epoch.
    pub const EPOCH: Instant = Instant(0);
    /// The latest representable instant ("never").
    pub const MAX: Instant = Instant(u64::MAX);

    /// An instant `nanos` nanoseconds after the Unix epoch.
    pub const fn from_unix_nanos(nanos: u64) -> Self {
        Instant(nanos)
    }

    /// An instant `millis` milliseconds after the Unix epoch.
    pub const fn from_unix_millis(millis: u64) -> Self {
        Instant(millis.saturating_mul(1_000_000))
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_unix_nanos(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch (truncated).
    pub const fn as_unix_millis(self) -> u64 {
        self.0 / 1_000_000
    }

    /// Seconds since the Unix epoch as a float: the form Python's `time.time()` and
    /// micro_framework's `last_retry` use.
    pub fn as_unix_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    /// The time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, rhs: Duration) -> Instant {
        let nanos = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, rhs: Duration) {
        *self = *self + rhs;
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    /// Saturating: an earlier `self` gives zero.
    fn sub(self, rhs: Instant) -> Duration {
        self.saturating_duration_since(rhs)
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Instant({}.{:09}s)", self.0 / 1_000_000_000, self.0 % 1_000_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Instant::from_unix_millis(1_000);
        assert_eq!(t + Duration::from_millis(500), Instant::from_unix_millis(1_500));
        assert_eq!(Instant::MAX + Duration::from_secs(1), Instant::MAX);
        assert_eq!(t - Instant::from_unix_millis(2_000), Duration::ZERO);
        assert_eq!(Instant::from_unix_millis(2_500) - t, Duration::from_millis(1_500));
    }

    #[test]
    fn unix_conversions() {
        let t = Instant::from_unix_millis(1_700_000_000_123);
        assert_eq!(t.as_unix_millis(), 1_700_000_000_123);
        assert!((t.as_unix_secs_f64() - 1_700_000_000.123).abs() < 1e-6);
    }
}
