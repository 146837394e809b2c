//! One token bucket, and the two budgets built on it: each memory key's request rate, and each
//! client address's failed authentications.
//!
//! The failure budget: past a burst of failures, an address's further failures are answered
//! 429 with the time to wait instead of 401, until its bucket refills, so a misconfigured or
//! hostile client is told to back off and the operator sees it in the metrics. A valid key is
//! never refused by it: the sidecar's clients share an address (the gateway, on loopback), so a
//! lock-out would let any local process shut every user out, while guessing a 190-bit secret is
//! hopeless at any rate. IPv6 addresses count by their /64, the block one host usually holds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::bounds::MAX_TRACKED_ADDRESSES;
use crate::ids::KeyId;

/// A bucket of `burst` tokens refilled at `rate` a second. Time is passed in (ms), so the
/// bucket is tested without sleeping.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    refilled_ms: i64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: f64, now_ms: i64) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            refilled_ms: now_ms,
        }
    }

    /// Takes one token: `Err(seconds until one is there)` when there is none.
    pub fn take(&mut self, rate: f64, burst: f64, now_ms: i64) -> Result<(), u64> {
        self.refill(rate, burst, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - self.tokens) / rate).ceil().max(1.0) as u64)
    }

    /// Whether the bucket would be full at `now_ms` (it then carries no information).
    fn is_full_at(&self, rate: f64, burst: f64, now_ms: i64) -> bool {
        self.tokens + elapsed_s(self.refilled_ms, now_ms) * rate >= burst
    }

    fn refill(&mut self, rate: f64, burst: f64, now_ms: i64) {
        self.tokens = (self.tokens + elapsed_s(self.refilled_ms, now_ms) * rate).min(burst);
        self.refilled_ms = now_ms.max(self.refilled_ms);
    }
}

fn elapsed_s(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms).max(0) as f64 / 1000.0
}

/// Failed authentications per client address.
pub struct FailureThrottle {
    /// Failures refilled per second; 0 turns the throttle off.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl FailureThrottle {
    pub fn new(rate: f64, burst: u32) -> FailureThrottle {
        FailureThrottle {
            rate,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Spends one failure from the address's bucket: `Err(retry_after_s)` when there was
    /// none left to spend.
    pub fn record_failure(&self, address: IpAddr, now_ms: i64) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let address = block_of(address);
        let mut buckets = self.buckets.lock().expect("throttle lock");
        if buckets.len() >= MAX_TRACKED_ADDRESSES && !buckets.contains_key(&address) {
            self.forget_some(&mut buckets, now_ms);
        }
        buckets
            .entry(address)
            .or_insert(TokenBucket::full(self.burst, now_ms))
            .take(self.rate, self.burst, now_ms)
    }

    /// Forgets addresses whose buckets are full again, and if none are, the oldest-refilled
    /// half.
    fn forget_some(&self, buckets: &mut HashMap<IpAddr, TokenBucket>, now_ms: i64) {
        buckets.retain(|_, bucket| !bucket.is_full_at(self.rate, self.burst, now_ms));
        if buckets.len() >= MAX_TRACKED_ADDRESSES {
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

/// Each memory key's request budget, and when its last use was last written down.
pub struct KeyThrottle {
    /// Requests refilled per second; 0 turns the limit off.
    rate: f64,
    burst: f64,
    /// How often a key's last use is worth writing to the store, at most.
    touch_every_ms: i64,
    keys: Mutex<HashMap<KeyId, (TokenBucket, i64)>>,
}

impl KeyThrottle {
    pub fn new(rate: f64, burst: u32, touch_every_ms: i64) -> KeyThrottle {
        KeyThrottle {
            rate,
            burst: f64::from(burst),
            touch_every_ms,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from the key's budget: `Err(retry_after_s)` when it is spent;
    /// `Ok(true)` when its last use is due to be written down.
    pub fn spend(&self, key: &KeyId, now_ms: i64) -> Result<bool, u64> {
        let mut keys = self.keys.lock().expect("key throttle lock");
        let (bucket, touched_ms) = keys
            .entry(key.clone())
            .or_insert((TokenBucket::full(self.burst, now_ms), i64::MIN));
        if self.rate > 0.0 {
            bucket.take(self.rate, self.burst, now_ms)?;
        }
        let due = now_ms.saturating_sub(*touched_ms) >= self.touch_every_ms;
        if due {
            *touched_ms = now_ms;
        }
        Ok(due)
    }
}

/// The unit an address is counted by: itself for IPv4, its /64 for IPv6 (IPv4-mapped IPv6
/// addresses count as the IPv4 address).
fn block_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::from(segments)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn past_a_burst_failures_are_refused_until_the_bucket_refills() {
        let throttle = FailureThrottle::new(2.0, 3);
        for _ in 0..3 {
            assert_eq!(throttle.record_failure(ip(1), 0), Ok(()));
        }
        assert_eq!(throttle.record_failure(ip(1), 0), Err(1));
        // Another address is untouched.
        assert_eq!(throttle.record_failure(ip(2), 0), Ok(()));
        // Half a second at 2/s refills one failure.
        assert_eq!(throttle.record_failure(ip(1), 499), Err(1));
        assert_eq!(throttle.record_failure(ip(1), 500), Ok(()));
        assert_eq!(throttle.record_failure(ip(1), 500), Err(1));
    }

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64() {
        let throttle = FailureThrottle::new(1.0, 2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(throttle.record_failure(a, 0), Ok(()));
        assert_eq!(throttle.record_failure(b, 0), Ok(()));
        assert!(throttle.record_failure(a, 0).is_err());
        assert_eq!(throttle.record_failure(elsewhere, 0), Ok(()));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(throttle.record_failure(mapped, 0), Ok(()));
        assert_eq!(throttle.record_failure(ip(1), 0), Ok(()));
        assert!(throttle.record_failure(ip(1), 0).is_err());
    }

    #[test]
    fn no_rate_means_no_limit() {
        let throttle = FailureThrottle::new(0.0, 1);
        for _ in 0..100 {
            assert_eq!(throttle.record_failure(ip(1), 0), Ok(()));
        }
        assert_eq!(throttle.tracked(), 0);
        let keys = KeyThrottle::new(0.0, 1, 60_000);
        let key = KeyId::generate();
        for _ in 0..100 {
            assert!(keys.spend(&key, 0).is_ok());
        }
    }

    #[test]
    fn the_table_of_addresses_is_bounded() {
        let throttle = FailureThrottle::new(1.0, 10);
        let many = MAX_TRACKED_ADDRESSES as u32 * 3;
        for n in 0..many {
            let _ = throttle.record_failure(IpAddr::from(n.to_be_bytes()), i64::from(n));
        }
        assert!(throttle.tracked() <= MAX_TRACKED_ADDRESSES);
        // The newest offender is still held to its budget: nine more failures empty it.
        let now = i64::from(many);
        let last = IpAddr::from((many - 1).to_be_bytes());
        for _ in 0..9 {
            assert_eq!(throttle.record_failure(last, now), Ok(()));
        }
        assert!(throttle.record_failure(last, now).is_err());
    }

    #[test]
    fn a_key_spends_its_burst_then_its_rate_and_is_touched_once_a_period() {
        let keys = KeyThrottle::new(1.0, 2, 60_000);
        let key = KeyId::generate();
        assert_eq!(keys.spend(&key, 0), Ok(true), "first use is written down");
        assert_eq!(keys.spend(&key, 0), Ok(false));
        assert_eq!(keys.spend(&key, 0), Err(1));
        assert_eq!(keys.spend(&key, 1000), Ok(false), "refilled after a second");
        assert_eq!(
            keys.spend(&KeyId::generate(), 0),
            Ok(true),
            "keys are apart"
        );
        assert_eq!(
            keys.spend(&key, 61_000),
            Ok(true),
            "due again after a minute"
        );
    }
}
