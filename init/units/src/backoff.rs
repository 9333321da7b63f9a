//! Restart backoff, one type for every restart policy steelcup runs: init's
//! services, vmmd's workloads and its warm pool.
//!
//! # Design
//! A plain value the policy code owns and asks, with no clock of its own:
//! [`Backoff::take`] gives the delay before the next try and doubles the
//! one after it, up to a cap; [`Backoff::reset`] goes back to the first
//! delay (after a stable run, a healthy probe, a start by hand). So the
//! supervisor's and the reconciler's tests move time by hand and check the
//! delays without sleeping.

use std::time::Duration;

/// Exponential backoff: `first`, doubling on every [`Backoff::take`] up to
/// `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay before the next try; the one after it doubles.
    pub fn take(&mut self) -> Duration {
        let now = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        now
    }

    /// The delay the next try would get, without taking it.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_and_reset() {
        let s = Duration::from_secs;
        let mut b = Backoff::new(s(1), s(30));
        let got: Vec<u64> = (0..7).map(|_| b.take().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.peek(), s(30));
        b.reset();
        assert_eq!(b.take(), s(1));
    }

    #[test]
    fn a_huge_cap_does_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..200 {
            b.take();
        }
        assert_eq!(b.peek(), Duration::MAX);
    }
}
