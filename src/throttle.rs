//! A token bucket per client address for failed authentications.
//!
//! Guessing a key is hopeless (190 random bits), but every guess with a well-formed key still
//! costs a store lookup and a hash. Past a burst of failures an address's keyed requests are
//! refused with 429 before any key is looked at, until its bucket refills. A correctly
//! configured gateway never fails to authenticate, so it never meets the limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Addresses tracked at once. Past it, addresses whose buckets are full again are forgotten
/// (they carry no information), and if none are, the oldest-refilled half goes.
const MAX_ADDRESSES: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    refilled_ms: i64,
}

pub struct FailureThrottle {
    /// Failures refilled per second; 0 turns the throttle off.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl FailureThrottle {
    pub fn new(rate: f64, burst: u32) -> FailureThrottle {
        FailureThrottle {
            rate,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after_s)` when the address has no failures left to spend.
    pub fn check(&self, address: IpAddr, now_ms: i64) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().expect("throttle lock");
        let Some(bucket) = buckets.get_mut(&address) else {
            return Ok(());
        };
        self.refill(bucket, now_ms);
        if bucket.tokens >= 1.0 {
            return Ok(());
        }
        Err(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
    }

    /// Spends one token of the address's bucket for a failed authentication.
    pub fn record_failure(&self, address: IpAddr, now_ms: i64) {
        if self.rate <= 0.0 {
            return;
        }
        let mut buckets = self.buckets.lock().expect("throttle lock");
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&address) {
            self.forget_some(&mut buckets, now_ms);
        }
        let burst = self.burst;
        let bucket = buckets.entry(address).or_insert(Bucket {
            tokens: burst,
            refilled_ms: now_ms,
        });
        self.refill(bucket, now_ms);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    fn refill(&self, bucket: &mut Bucket, now_ms: i64) {
        let elapsed_s = (now_ms - bucket.refilled_ms).max(0) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed_s * self.rate).min(self.burst);
        bucket.refilled_ms = now_ms.max(bucket.refilled_ms);
    }

    fn forget_some(&self, buckets: &mut HashMap<IpAddr, Bucket>, now_ms: i64) {
        let (rate, burst) = (self.rate, self.burst);
        buckets.retain(|_, bucket| {
            let elapsed_s = (now_ms - bucket.refilled_ms).max(0) as f64 / 1000.0;
            bucket.tokens + elapsed_s * rate < burst
        });
        if buckets.len() >= MAX_ADDRESSES {
            let mut ages: Vec<i64> = buckets.values().map(|b| b.refilled_ms).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            buckets.retain(|_, bucket| bucket.refilled_ms > cutoff);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_burst_of_failures_closes_the_address_until_it_refills() {
        let throttle = FailureThrottle::new(2.0, 3);
        for _ in 0..3 {
            assert_eq!(throttle.check(ip(1), 0), Ok(()));
            throttle.record_failure(ip(1), 0);
        }
        assert_eq!(throttle.check(ip(1), 0), Err(1));
        // Another address is untouched.
        assert_eq!(throttle.check(ip(2), 0), Ok(()));
        // Half a second at 2/s refills one failure.
        assert_eq!(throttle.check(ip(1), 499), Err(1));
        assert_eq!(throttle.check(ip(1), 500), Ok(()));
    }

    #[test]
    fn no_rate_means_no_limit() {
        let throttle = FailureThrottle::new(0.0, 1);
        for _ in 0..100 {
            throttle.record_failure(ip(1), 0);
        }
        assert_eq!(throttle.check(ip(1), 0), Ok(()));
        assert_eq!(throttle.tracked(), 0);
    }

    #[test]
    fn the_table_of_addresses_is_bounded() {
        let throttle = FailureThrottle::new(1.0, 10);
        for n in 0..(MAX_ADDRESSES as u32 * 3) {
            throttle.record_failure(IpAddr::from(n.to_be_bytes()), i64::from(n));
        }
        assert!(throttle.tracked() <= MAX_ADDRESSES);
        // The newest offender is still held to its budget: nine more failures empty it.
        let now = i64::from(MAX_ADDRESSES as u32 * 3);
        let last = IpAddr::from((MAX_ADDRESSES as u32 * 3 - 1).to_be_bytes());
        for _ in 0..9 {
            throttle.record_failure(last, now);
        }
        assert!(throttle.check(last, now).is_err());
    }
}
