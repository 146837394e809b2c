//! A token bucket per client address for failed authentications.
//!
//! Past a burst of failures, an address's further failures are answered 429 with the time to
//! wait instead of 401, until its bucket refills: a misconfigured or hostile client is told to
//! back off, and the operator sees it in the metrics. A valid key is never refused by this:
//! the sidecar's clients share an address (the gateway, on loopback), so a lock-out would let
//! any local process shut every user out, while guessing a 190-bit secret is hopeless at any
//! rate. IPv6 addresses count by their /64, the block one host usually holds.

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

    /// Spends one failure from the address's bucket: `Err(retry_after_s)` when there was
    /// none left to spend.
    pub fn record_failure(&self, address: IpAddr, now_ms: i64) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let address = block_of(address);
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
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
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
    }

    #[test]
    fn the_table_of_addresses_is_bounded() {
        let throttle = FailureThrottle::new(1.0, 10);
        for n in 0..(MAX_ADDRESSES as u32 * 3) {
            let _ = throttle.record_failure(IpAddr::from(n.to_be_bytes()), i64::from(n));
        }
        assert!(throttle.tracked() <= MAX_ADDRESSES);
        // The newest offender is still held to its budget: nine more failures empty it.
        let now = i64::from(MAX_ADDRESSES as u32 * 3);
        let last = IpAddr::from((MAX_ADDRESSES as u32 * 3 - 1).to_be_bytes());
        for _ in 0..9 {
            assert_eq!(throttle.record_failure(last, now), Ok(()));
        }
        assert!(throttle.record_failure(last, now).is_err());
    }
}
