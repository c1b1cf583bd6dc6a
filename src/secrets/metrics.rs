//! Per-store counters, kept per registry (for `SecretStores::metrics`) and exported to the
//! process's Prometheus registry (`telemetry::metrics`) from the same recording point.
//!
//! Labels are the store type and the error code only: never a reference (a secret's name can be
//! sensitive too) and never a value.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets; a last `+Inf` bucket is implied.
pub const LATENCY_BUCKETS: [f64; 8] = [0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A snapshot of one store's counters.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StoreMetrics {
    /// The store type (`AWS`, `HASHICORP_VAULT`, ...).
    pub store: String,
    /// Calls made to the store (cache hits excluded).
    pub calls: u64,
    /// Fetches answered from the cache (or from a concurrent identical call).
    pub cache_hits: u64,
    /// Failed calls by error code (`secret_not_found`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Sum of the calls' latencies, in seconds.
    pub latency_seconds_sum: f64,
    /// Cumulative counts of calls at or under each bound of [`LATENCY_BUCKETS`] (Prometheus style);
    /// `calls` is the `+Inf` bucket.
    pub latency_buckets: Vec<(f64, u64)>,
}

#[derive(Default)]
pub(super) struct Metrics {
    by_store: Mutex<BTreeMap<&'static str, StoreMetrics>>,
}

impl Metrics {
    fn with<R>(&self, store: &'static str, f: impl FnOnce(&mut StoreMetrics) -> R) -> R {
        let mut map = self.by_store.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(store).or_insert_with(|| StoreMetrics {
            store: store.to_string(),
            latency_buckets: LATENCY_BUCKETS.iter().map(|b| (*b, 0)).collect(),
            ..StoreMetrics::default()
        });
        f(entry)
    }

    pub(super) fn record(&self, store: &'static str, elapsed: Duration, error_code: Option<&'static str>) {
        crate::telemetry::metrics().secret_store_call(store, error_code.unwrap_or("ok"), elapsed);
        self.with(store, |m| {
            m.calls += 1;
            let secs = elapsed.as_secs_f64();
            m.latency_seconds_sum += secs;
            for (bound, count) in &mut m.latency_buckets {
                if secs <= *bound {
                    *count += 1;
                }
            }
            if let Some(code) = error_code {
                *m.errors.entry(code.to_string()).or_default() += 1;
            }
        });
    }

    pub(super) fn cache_hit(&self, store: &'static str) {
        crate::telemetry::metrics().secret_store_call(store, "cached", Duration::ZERO);
        self.with(store, |m| m.cache_hits += 1);
    }

    pub(super) fn snapshot(&self) -> Vec<StoreMetrics> {
        self.by_store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
