//! Who may call the inference API and how often: bearer API keys (`--api-key`) and a token
//! bucket per client (`--rate-limit-per-client`, `--rate-limit-burst`). gRPC and HTTP calls
//! pass the same gate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use crate::error::RouterError;

/// Clients tracked at once; past it, buckets that have refilled completely are dropped (they
/// hold nothing a new bucket would not).
const MAX_TRACKED_CLIENTS: usize = 100_000;

/// Requests per second a client may make, with bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug, Default)]
pub(crate) struct ClientGate {
    api_keys: Vec<String>,
    rate: Option<RateLimit>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl ClientGate {
    pub(crate) fn new(api_keys: Vec<String>, rate: Option<RateLimit>) -> Self {
        Self {
            api_keys,
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The client a call comes from: with API keys configured, the key it presents (which it
    /// must); otherwise its address.
    pub(crate) fn identify(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<String, RouterError> {
        if self.api_keys.is_empty() {
            return Ok(peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string()));
        }
        let Some(given) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
            return Err(RouterError::Unauthenticated(
                "this router needs an API key: send `authorization: Bearer <key>`".into(),
            ));
        };
        match self.api_keys.iter().position(|key| key == given) {
            // Named by position, so logs and errors never show a key.
            Some(i) => Ok(format!("api key #{}", i + 1)),
            None => Err(RouterError::Unauthenticated(
                "the API key is not valid".into(),
            )),
        }
    }

    /// Takes one request from `client`'s bucket, or says it is over its rate.
    pub(crate) fn charge(&self, client: &str) -> Result<(), RouterError> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED_CLIENTS {
            buckets.retain(|_, b| refill(b, rate, now) < rate.burst);
        }
        let bucket = buckets.entry(client.to_owned()).or_insert(Bucket {
            tokens: rate.burst,
            updated: now,
        });
        bucket.tokens = refill(bucket, rate, now);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(RouterError::RateLimited {
            client: client.to_owned(),
            per_second: rate.per_second,
            burst: rate.burst,
        })
    }
}

/// `bucket`'s tokens at `now`.
fn refill(bucket: &Bucket, rate: RateLimit, now: Instant) -> f64 {
    let elapsed = now.duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * rate.per_second).min(rate.burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_required_once_configured() {
        let open = ClientGate::default();
        let peer = Some(IpAddr::from([10, 0, 0, 7]));
        assert_eq!(open.identify(None, peer).expect("open"), "10.0.0.7");
        let gate = ClientGate::new(vec!["a".into(), "b".into()], None);
        assert_eq!(
            gate.identify(Some("Bearer b"), peer).expect("key"),
            "api key #2"
        );
        for bad in [None, Some("b"), Some("Bearer c")] {
            let err = gate.identify(bad, peer).expect_err("refused");
            assert!(matches!(err, RouterError::Unauthenticated(_)), "{err}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let gate = ClientGate::new(
            Vec::new(),
            Some(RateLimit {
                per_second: 1000.0,
                burst: 2.0,
            }),
        );
        gate.charge("x").expect("first");
        gate.charge("x").expect("second");
        let err = gate.charge("x").expect_err("over the burst");
        assert!(err.to_string().contains("--rate-limit-per-client"), "{err}");
        gate.charge("y").expect("another client has its own bucket");
        std::thread::sleep(std::time::Duration::from_millis(5));
        gate.charge("x").expect("refilled at 1000/s");
    }
}
