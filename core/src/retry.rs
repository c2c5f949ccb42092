//! Retry policies: after a handler fails, retry at instant T or give up.
//!
//! A [`RetryPolicy`] is a pure decision function. [`RetryPolicy::decide`] takes the number of
//! retries already done (the attempt header), the failure, `now` and the seeded [`Rng`], and
//! returns a [`RetryDecision`] value. It never sleeps, never returns a future, never reads a
//! clock and never draws OS randomness: the Engine turns a decision into actions and the runtime
//! or the broker does the waiting.
//!
//! Brokers cannot keep one waiting queue per possible delay, so [`ladder_delay`] rounds a delay
//! up to a small fixed ladder (100 ms x 2^k) that names the waiting queues
//! (`microfw.retry.<queue>.<delay_ms>`).

use std::time::Duration;

use crate::outcome::HandlerError;
use crate::rng::Rng;
use crate::time::Instant;

/// The first rung of the broker delay ladder: 100 ms.
pub const LADDER_BASE: Duration = Duration::from_millis(100);
/// The highest ladder step `k` (rung `LADDER_BASE * 2^k`).
pub const LADDER_MAX_STEP: u32 = 24;
/// The top rung of the ladder, `LADDER_BASE * 2^LADDER_MAX_STEP` (about 19.4 days).
pub const LADDER_TOP: Duration = Duration::from_millis(100 << LADDER_MAX_STEP);

/// How the delay grows with the attempt number.
///
/// Every kind is capped by [`RetryPolicy::max_delay`]; none of them panics or overflows,
/// whatever the attempt number or parameters (results saturate at the cap).
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Backoff {
    /// The same delay before every retry.
    Fixed(Duration),
    /// `initial + step * (attempt - 1)`.
    Linear {
        /// The delay before the first retry.
        initial: Duration,
        /// Added for each further retry.
        step: Duration,
    },
    /// `initial * factor^(attempt - 1)`.
    ///
    /// A factor below 1 (or negative, or minus infinity) is treated as 1: the delay never
    /// shrinks. A NaN factor makes every delay the cap. An infinite factor gives `initial`
    /// for the first retry and the cap after that.
    Exponential {
        /// The delay before the first retry.
        initial: Duration,
        /// The growth per retry (2 doubles the delay each time).
        factor: f64,
    },
}

/// Which failures are retried.
///
/// Matching looks only at the [`HandlerError`]; it does not look at how many retries were
/// done (that is [`RetryPolicy::max_retries`]).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum RetryOn {
    /// Errors whose [`HandlerError::retryable`] is true (the default).
    #[default]
    Retryable,
    /// Every failure, retryable or not.
    Any,
    /// Retryable errors whose `exc_type` is exactly one of these names.
    ///
    /// micro_framework's `exception_list` semantics: the type name must match exactly (no
    /// subclasses, no module path); an empty list matches every retryable error, as an empty
    /// `exception_list` does.
    Types(Vec<String>),
}

/// A route's retry policy: how often, how long to wait, and for which failures.
///
/// Fields are public so policies can be written as literals; [`decide`](Self::decide) is
/// defensive about them anyway (an out-of-range or NaN `jitter` is clamped to `[0, 1]`, NaN
/// to 0).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// How many retries after the first run; 0 never retries.
    ///
    /// Unlike later micro_framework versions, 0 does not mean "forever".
    pub max_retries: u32,
    /// How the delay grows.
    pub backoff: Backoff,
    /// The longest delay ever returned (applied before jitter).
    pub max_delay: Duration,
    /// A fraction in `[0, 1]`: the delay is multiplied by a factor drawn uniformly from
    /// `[1 - jitter, 1]`, so jitter never exceeds the cap nor goes below
    /// `(1 - jitter) * base`. 0 draws no randomness at all.
    pub jitter: f64,
    /// Which failures are retried.
    pub retry_on: RetryOn,
}

/// What to do after a failure.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum RetryDecision {
    /// Run the handler again at `at`.
    Retry {
        /// The number of this retry, 1-based (the first retry is 1): the new attempt header.
        attempt: u32,
        /// The (jittered, capped) wait before the retry.
        delay: Duration,
        /// `now + delay`, saturating.
        at: Instant,
    },
    /// Stop: run the failure callback, then ack or dead-letter.
    GiveUp(GiveUpReason),
}

/// Why a policy gave up.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The failure is not one the policy retries ([`RetryOn`]).
    NotRetryable,
    /// All allowed retries were used.
    Exhausted {
        /// How many retries had been done.
        retries: u32,
    },
}

impl RetryPolicy {
    /// A policy that never retries (`max_retries` 0, zero delay, no jitter).
    pub const fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            backoff: Backoff::Fixed(Duration::ZERO),
            max_delay: Duration::ZERO,
            jitter: 0.0,
            retry_on: RetryOn::Retryable,
        }
    }

    /// Up to `max_retries` retries, each after `delay`; no jitter, the cap is `delay`.
    pub fn fixed(max_retries: u32, delay: Duration) -> Self {
        RetryPolicy { max_retries, backoff: Backoff::Fixed(delay), max_delay: delay, ..Self::none() }
    }

    /// Up to `max_retries` retries, doubling from `initial` and capped at `cap`; no jitter.
    pub fn exponential(max_retries: u32, initial: Duration, cap: Duration) -> Self {
        RetryPolicy {
            max_retries,
            backoff: Backoff::Exponential { initial, factor: 2.0 },
            max_delay: cap,
            ..Self::none()
        }
    }

    /// The same policy with `jitter`, clamped to `[0, 1]` (NaN becomes 0).
    pub fn with_jitter(self, jitter: f64) -> Self {
        RetryPolicy { jitter: clamp_jitter(jitter), ..self }
    }

    /// The same policy, retrying the failures `on` matches.
    pub fn retrying_on(self, on: RetryOn) -> Self {
        RetryPolicy { retry_on: on, ..self }
    }

    /// The base delay (un-jittered, capped at `max_delay`) before retry number `attempt`
    /// (1-based; 0 is treated as 1). Never panics; saturates at the cap.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let n = attempt.saturating_sub(1);
        let cap = self.max_delay;
        match self.backoff {
            Backoff::Fixed(d) => d.min(cap),
            Backoff::Linear { initial, step } => {
                step.checked_mul(n).and_then(|grown| grown.checked_add(initial)).map_or(cap, |d| d.min(cap))
            }
            Backoff::Exponential { initial, factor } => exponential_delay(initial, factor, n, cap),
        }
    }

    /// The delay before retry number `attempt`: [`base_delay`](Self::base_delay) with the
    /// policy's jitter applied. Draws one value from `rng` only when the (clamped) jitter is
    /// above 0.
    pub fn jittered_delay(&self, attempt: u32, rng: &mut Rng) -> Duration {
        apply_jitter(self.base_delay(attempt), self.jitter, rng)
    }

    /// The decision after a failure, given how many retries were already done (0 after the
    /// first run).
    ///
    /// In order: a failure [`RetryOn`] does not match gives up as
    /// [`GiveUpReason::NotRetryable`]; `retries_done >= max_retries` gives up as
    /// [`GiveUpReason::Exhausted`]; otherwise retry number `retries_done + 1` after
    /// [`jittered_delay`](Self::jittered_delay). Giving up draws no randomness. This does
    /// not wait, record anything, or read a clock: `now` is only added to the delay.
    pub fn decide(
        &self,
        retries_done: u32,
        error: &HandlerError,
        now: Instant,
        rng: &mut Rng,
    ) -> RetryDecision {
        if !self.retry_on.matches(error) {
            return RetryDecision::GiveUp(GiveUpReason::NotRetryable);
        }
        if retries_done >= self.max_retries {
            return RetryDecision::GiveUp(GiveUpReason::Exhausted { retries: retries_done });
        }
        let attempt = retries_done.saturating_add(1);
        let delay = self.jittered_delay(attempt, rng);
        RetryDecision::Retry { attempt, delay, at: now + delay }
    }
}

impl Default for RetryPolicy {
    /// [`RetryPolicy::none`]: never retry.
    fn default() -> Self {
        Self::none()
    }
}

impl RetryOn {
    /// True when a policy with this setting may retry `error` (retry counts aside).
    pub fn matches(&self, error: &HandlerError) -> bool {
        match self {
            RetryOn::Retryable => error.retryable,
            RetryOn::Any => true,
            RetryOn::Types(types) => {
                error.retryable && (types.is_empty() || types.contains(&error.error.exc_type))
            }
        }
    }
}

/// Rounds `delay` UP to the broker delay ladder: `LADDER_BASE * 2^k` for
/// `k = 0..=LADDER_MAX_STEP`. Zero maps to [`LADDER_BASE`]; anything above [`LADDER_TOP`]
/// maps to [`LADDER_TOP`] (the only case where the result is shorter than `delay`).
pub fn ladder_delay(delay: Duration) -> Duration {
    ladder_rung(ladder_step(delay))
}

/// The ladder step `k` of [`ladder_delay`]`(delay)`: the smallest `k` whose rung is at least
/// `delay`, or [`LADDER_MAX_STEP`] when no rung is.
pub fn ladder_step(delay: Duration) -> u32 {
    let mut k = 0;
    while k < LADDER_MAX_STEP && ladder_rung(k) < delay {
        k += 1;
    }
    k
}

/// The rung `LADDER_BASE * 2^step`; a step above [`LADDER_MAX_STEP`] gives [`LADDER_TOP`].
pub fn ladder_rung(step: u32) -> Duration {
    LADDER_BASE.saturating_mul(1 << step.min(LADDER_MAX_STEP))
}

/// Clamps a jitter fraction to `[0, 1]`; NaN becomes 0.
fn clamp_jitter(jitter: f64) -> f64 {
    if jitter.is_nan() { 0.0 } else { jitter.clamp(0.0, 1.0) }
}

/// `initial * factor^n`, capped, computed in floating-point nanoseconds.
fn exponential_delay(initial: Duration, factor: f64, n: u32, cap: Duration) -> Duration {
    if factor.is_nan() {
        return cap;
    }
    if initial.is_zero() {
        return Duration::ZERO;
    }
    let factor = factor.max(1.0);
    let cap_nanos = cap.as_nanos() as f64;
    let grown = initial.as_nanos() as f64 * factor.powf(f64::from(n));
    // Infinity lands here too.
    if grown.is_nan() || grown >= cap_nanos {
        return cap;
    }
    // `grown` is finite and non-negative here, so the cast is exact up to truncation.
    duration_from_nanos(grown as u128).min(cap)
}

/// `base` shortened by a random fraction of at most `jitter` (in `[0, 1]` after clamping).
fn apply_jitter(base: Duration, jitter: f64, rng: &mut Rng) -> Duration {
    let jitter = clamp_jitter(jitter);
    if jitter <= 0.0 {
        return base;
    }
    let nanos = base.as_nanos();
    // The factor 1 - jitter * u, with u in [0, 1), lies in (1 - jitter, 1].
    let cut = (nanos as f64 * jitter * rng.next_f64()) as u128;
    duration_from_nanos(nanos - cut.min(nanos))
}

/// A duration of `nanos` nanoseconds, saturating at `Duration::MAX`.
fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below one second, so `Duration::new` cannot carry over and panic.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rng::Rng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn t0() -> Instant {
        Instant::from_unix_millis(1_700_000_000_000)
    }

    fn policy(backoff: Backoff, cap: Duration) -> RetryPolicy {
        RetryPolicy { max_retries: 10, backoff, max_delay: cap, ..RetryPolicy::none() }
    }

    fn delays(p: &RetryPolicy, attempts: std::ops::RangeInclusive<u32>) -> Vec<Duration> {
        attempts.map(|a| p.base_delay(a)).collect()
    }

    #[test]
    fn fixed_is_constant_and_capped() {
        let p = RetryPolicy::fixed(3, ms(250));
        assert_eq!(p.max_delay, ms(250));
        assert_eq!(delays(&p, 1..=4), vec![ms(250); 4]);
        assert_eq!(p.base_delay(u32::MAX), ms(250));
        let capped = policy(Backoff::Fixed(ms(900)), ms(300));
        assert_eq!(capped.base_delay(1), ms(300));
    }

    #[test]
    fn linear_grows_by_step_until_the_cap() {
        let p = policy(Backoff::Linear { initial: ms(100), step: ms(50) }, ms(260));
        assert_eq!(delays(&p, 1..=5), vec![ms(100), ms(150), ms(200), ms(250), ms(260)]);
        assert_eq!(p.base_delay(0), ms(100));
        assert_eq!(p.base_delay(u32::MAX), ms(260));
        let huge = policy(Backoff::Linear { initial: Duration::MAX, step: Duration::MAX }, Duration::MAX);
        assert_eq!(huge.base_delay(7), Duration::MAX);
    }

    #[test]
    fn exponential_doubles_until_the_cap() {
        let p = RetryPolicy::exponential(5, ms(100), ms(1_000));
        assert_eq!(p.backoff, Backoff::Exponential { initial: ms(100), factor: 2.0 });
        assert_eq!(delays(&p, 1..=6), vec![ms(100), ms(200), ms(400), ms(800), ms(1_000), ms(1_000)]);
        assert_eq!(p.base_delay(u32::MAX), ms(1_000));
        let p15 = policy(Backoff::Exponential { initial: ms(100), factor: 1.5 }, Duration::MAX);
        assert_eq!(delays(&p15, 1..=3), vec![ms(100), ms(150), ms(225)]);
        let uncapped = RetryPolicy::exponential(5, ms(100), Duration::MAX);
        assert_eq!(uncapped.base_delay(u32::MAX), Duration::MAX);
    }

    #[test]
    fn exponential_odd_factors_are_safe() {
        let cap = ms(5_000);
        let with = |factor| policy(Backoff::Exponential { initial: ms(100), factor }, cap);
        assert_eq!(delays(&with(f64::NAN), 1..=3), vec![cap; 3]);
        assert_eq!(delays(&with(f64::INFINITY), 1..=3), vec![ms(100), cap, cap]);
        assert_eq!(delays(&with(0.5), 1..=3), vec![ms(100); 3]);
        assert_eq!(delays(&with(-3.0), 1..=3), vec![ms(100); 3]);
        assert_eq!(delays(&with(f64::NEG_INFINITY), 1..=2), vec![ms(100); 2]);
        let zero = policy(Backoff::Exponential { initial: Duration::ZERO, factor: f64::INFINITY }, cap);
        assert_eq!(zero.base_delay(9), Duration::ZERO);
    }

    #[test]
    fn constructors_and_default() {
        let none = RetryPolicy::none();
        assert_eq!(RetryPolicy::default(), none);
        assert_eq!(none.max_retries, 0);
        assert_eq!(none.jitter, 0.0);
        assert_eq!(none.retry_on, RetryOn::Retryable);
        assert_eq!(none.clone().with_jitter(1.7).jitter, 1.0);
        assert_eq!(none.clone().with_jitter(-0.2).jitter, 0.0);
        assert_eq!(none.clone().with_jitter(f64::NAN).jitter, 0.0);
        assert_eq!(none.clone().with_jitter(0.25).jitter, 0.25);
        assert_eq!(none.retrying_on(RetryOn::Any).retry_on, RetryOn::Any);
    }

    #[test]
    fn decide_retries_then_gives_up_as_exhausted() {
        let p = RetryPolicy::exponential(2, ms(100), ms(1_000));
        let err = HandlerError::retryable("Timeout", "slow");
        let mut rng = Rng::from_seed(1);
        assert_eq!(
            p.decide(0, &err, t0(), &mut rng),
            RetryDecision::Retry { attempt: 1, delay: ms(100), at: t0() + ms(100) }
        );
        assert_eq!(
            p.decide(1, &err, t0(), &mut rng),
            RetryDecision::Retry { attempt: 2, delay: ms(200), at: t0() + ms(200) }
        );
        assert_eq!(
            p.decide(2, &err, t0(), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::Exhausted { retries: 2 })
        );
        assert_eq!(
            p.decide(7, &err, t0(), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::Exhausted { retries: 7 })
        );
    }

    #[test]
    fn max_retries_zero_never_retries() {
        let err = HandlerError::retryable("Timeout", "slow");
        let mut rng = Rng::from_seed(1);
        for p in [RetryPolicy::none(), RetryPolicy::fixed(0, ms(10)).retrying_on(RetryOn::Any)] {
            assert_eq!(
                p.decide(0, &err, t0(), &mut rng),
                RetryDecision::GiveUp(GiveUpReason::Exhausted { retries: 0 })
            );
        }
    }

    #[test]
    fn retry_on_variants() {
        let timeout = HandlerError::retryable("Timeout", "slow");
        let value = HandlerError::retryable("ValueError", "bad").in_module("builtins");
        let fatal_timeout = HandlerError::fatal("Timeout", "never");
        let types = RetryOn::Types(vec!["Timeout".into(), "KeyError".into()]);

        assert!(RetryOn::Retryable.matches(&timeout));
        assert!(!RetryOn::Retryable.matches(&fatal_timeout));
        assert!(RetryOn::Any.matches(&fatal_timeout));
        assert!(types.matches(&timeout));
        assert!(!types.matches(&value), "type not in the list");
        assert!(!types.matches(&fatal_timeout), "listed type but not retryable");
        // Exact names only: no module path, no prefix or subclass-like matching.
        assert!(!RetryOn::Types(vec!["builtins.ValueError".into()]).matches(&value));
        assert!(!RetryOn::Types(vec!["Time".into()]).matches(&timeout));
        // An empty list is micro_framework's "no exception_list".
        assert!(RetryOn::Types(vec![]).matches(&value));
        assert!(!RetryOn::Types(vec![]).matches(&fatal_timeout));

        let p = RetryPolicy::fixed(3, ms(10)).retrying_on(types);
        let mut rng = Rng::from_seed(1);
        let not = RetryDecision::GiveUp(GiveUpReason::NotRetryable);
        assert_eq!(p.decide(0, &value, t0(), &mut rng), not);
        assert_eq!(p.decide(0, &fatal_timeout, t0(), &mut rng), not);
        // Not matching wins over exhaustion.
        assert_eq!(p.decide(9, &value, t0(), &mut rng), not);
        assert!(matches!(p.decide(0, &timeout, t0(), &mut rng), RetryDecision::Retry { attempt: 1, .. }));
    }

    #[test]
    fn no_jitter_draws_no_randomness_and_jitter_does() {
        let err = HandlerError::retryable("Timeout", "slow");
        let first = Rng::from_seed(5).next_u64();

        let mut rng = Rng::from_seed(5);
        RetryPolicy::fixed(3, ms(100)).decide(0, &err, t0(), &mut rng);
        assert_eq!(rng.next_u64(), first);

        let mut rng = Rng::from_seed(5);
        RetryPolicy::fixed(3, ms(100)).with_jitter(0.5).decide(0, &err, t0(), &mut rng);
        assert_ne!(rng.next_u64(), first);

        // Giving up draws nothing even with jitter.
        let mut rng = Rng::from_seed(5);
        RetryPolicy::fixed(0, ms(100)).with_jitter(0.5).decide(0, &err, t0(), &mut rng);
        assert_eq!(rng.next_u64(), first);
    }

    #[test]
    fn jitter_shortens_within_bounds_and_full_jitter_spreads() {
        let p = RetryPolicy::fixed(3, ms(1_000)).with_jitter(1.0);
        let mut rng = Rng::from_seed(9);
        let ds: Vec<Duration> = (0..200).map(|_| p.jittered_delay(1, &mut rng)).collect();
        assert!(ds.iter().all(|d| *d <= ms(1_000)));
        assert!(ds.iter().any(|d| *d < ms(100)));
        assert!(ds.iter().any(|d| *d > ms(900)));
        // Out-of-range jitter written as a literal is clamped, not trusted.
        let wild = RetryPolicy { jitter: 7.0, ..RetryPolicy::fixed(3, ms(1_000)) };
        assert!((0..100).all(|_| wild.jittered_delay(1, &mut rng) <= ms(1_000)));
    }

    #[test]
    fn retry_instant_saturates() {
        let p = RetryPolicy::fixed(1, Duration::MAX);
        let err = HandlerError::retryable("Timeout", "slow");
        let d = p.decide(0, &err, t0(), &mut Rng::from_seed(0));
        assert_eq!(d, RetryDecision::Retry { attempt: 1, delay: Duration::MAX, at: Instant::MAX });
    }

    #[test]
    fn ladder_rungs_rounding_zero_and_top() {
        assert_eq!(LADDER_TOP, ms(100) * (1 << 24));
        assert_eq!(ladder_rung(0), ms(100));
        assert_eq!(ladder_rung(3), ms(800));
        assert_eq!(ladder_rung(99), LADDER_TOP);
        assert_eq!(ladder_delay(Duration::ZERO), ms(100));
        assert_eq!(ladder_delay(Duration::from_nanos(1)), ms(100));
        assert_eq!(ladder_delay(ms(100)), ms(100));
        assert_eq!(ladder_delay(ms(100) + Duration::from_nanos(1)), ms(200));
        assert_eq!(ladder_delay(ms(250)), ms(400));
        assert_eq!(ladder_delay(ms(400)), ms(400));
        assert_eq!(ladder_delay(Duration::from_secs(60)), ms(102_400));
        assert_eq!(ladder_delay(LADDER_TOP), LADDER_TOP);
        assert_eq!(ladder_delay(LADDER_TOP + Duration::from_nanos(1)), LADDER_TOP);
        assert_eq!(ladder_delay(Duration::MAX), LADDER_TOP);
        assert_eq!(ladder_step(ms(250)), 2);
        assert_eq!(ladder_step(Duration::MAX), LADDER_MAX_STEP);
        for k in 0..=LADDER_MAX_STEP {
            assert_eq!(ladder_delay(ladder_rung(k)), ladder_rung(k));
            assert_eq!(ladder_rung(k).as_millis(), 100u128 << k);
        }
    }

    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            (0u64..100_000).prop_map(Duration::from_millis),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    /// A rung, or one nanosecond either side of it.
    fn near_rung() -> impl Strategy<Value = Duration> {
        (0..=LADDER_MAX_STEP + 1, 0u32..3).prop_map(|(k, off)| {
            (ladder_rung(k) + Duration::from_nanos(u64::from(off))).saturating_sub(Duration::from_nanos(1))
        })
    }

    fn factor() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(1.0),
            Just(2.0),
            -10.0f64..10.0,
            any::<f64>(),
        ]
    }

    fn backoff() -> impl Strategy<Value = Backoff> {
        prop_oneof![
            duration().prop_map(Backoff::Fixed),
            (duration(), duration()).prop_map(|(initial, step)| Backoff::Linear { initial, step }),
            (duration(), factor()).prop_map(|(initial, factor)| Backoff::Exponential { initial, factor }),
        ]
    }

    fn attempt() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..70, any::<u32>()]
    }

    fn any_policy() -> impl Strategy<Value = RetryPolicy> {
        (0u32..6, backoff(), duration(), 0.0f64..=1.0, 0u8..3).prop_map(|(max, b, cap, j, on)| {
            let on = match on {
                0 => RetryOn::Retryable,
                1 => RetryOn::Any,
                _ => RetryOn::Types(vec!["Timeout".into()]),
            };
            RetryPolicy { max_retries: max, backoff: b, max_delay: cap, jitter: j, retry_on: on }
        })
    }

    proptest! {
        #[test]
        fn base_delays_are_monotonic_and_capped(
            b in backoff(), cap in duration(), a in attempt(), gap in attempt(),
        ) {
            let p = policy(b, cap);
            let later = a.saturating_add(gap);
            let (d1, d2) = (p.base_delay(a), p.base_delay(later));
            prop_assert!(d1 <= d2, "{d1:?} > {d2:?} for attempts {a} < {later}");
            prop_assert!(d2 <= cap);
            let run = delays(&p, 1..=40);
            prop_assert!(run.windows(2).all(|w| w[0] <= w[1]), "{run:?}");
        }

        #[test]
        fn jittered_delays_stay_within_bounds(
            b in backoff(), cap in duration(), j in 0.0f64..=1.0, a in attempt(), seed in any::<u64>(),
        ) {
            let p = policy(b, cap).with_jitter(j);
            let base = p.base_delay(a);
            let mut rng = Rng::from_seed(seed);
            for _ in 0..8 {
                let d = p.jittered_delay(a, &mut rng);
                prop_assert!(d <= base);
                let low = ((1.0 - j) * base.as_nanos() as f64) as u128;
                // One nanosecond (and float relative error on huge delays) of slack.
                let slack = 1 + low / (1u128 << 50);
                prop_assert!(d.as_nanos() + slack >= low, "{d:?} below {low}ns (base {base:?}, j {j})");
            }
        }

        #[test]
        fn ladder_rounds_up_to_a_rung(d in prop_oneof![duration(), near_rung()]) {
            let r = ladder_delay(d);
            let k = ladder_step(d);
            prop_assert!(k <= LADDER_MAX_STEP);
            prop_assert_eq!(r, ladder_rung(k));
            prop_assert!(r >= d.min(LADDER_TOP));
            // And it is the smallest such rung.
            prop_assert!(k == 0 || ladder_rung(k - 1) < d);
        }

        #[test]
        fn same_seed_same_decisions(
            p in any_policy(),
            seed in any::<u64>(),
            steps in proptest::collection::vec((0u32..8, any::<bool>(), any::<bool>()), 1..20),
        ) {
            let run = |seed| {
                let mut rng = Rng::from_seed(seed);
                steps.iter().map(|&(done, retryable, timeout)| {
                    let kind = if timeout { "Timeout" } else { "ValueError" };
                    let err = if retryable {
                        HandlerError::retryable(kind, "x")
                    } else {
                        HandlerError::fatal(kind, "x")
                    };
                    p.decide(done, &err, t0(), &mut rng)
                }).collect::<Vec<_>>()
            };
            let first = run(seed);
            prop_assert_eq!(&first, &run(seed));
            for d in &first {
                if let RetryDecision::Retry { attempt, delay, at } = *d {
                    prop_assert!(attempt >= 1 && attempt <= p.max_retries);
                    prop_assert!(delay <= p.max_delay);
                    prop_assert_eq!(at, t0() + delay);
                }
            }
        }
    }
}
