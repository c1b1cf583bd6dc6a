//! Prometheus metrics, all prefixed `apono_connector_`.
//!
//! One process-wide registry ([`metrics()`]) so every module records without threading a handle
//! through its constructors; `/metrics` encodes it. Label values are codes and names (job kind,
//! outcome, store type, HTTP status), never free text and never a secret.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControlPlaneLabels {
    pub call: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RancherLabels {
    pub operation: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreTypeLabels {
    pub store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IntegrationLabels {
    pub integration: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SweptLabels {
    pub integration: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Distinct `integration` label values; later integrations share [`OTHER_INTEGRATIONS`]. Names
/// come from jobs (inline integrations), so without a bound a control plane could grow the
/// registry and every scrape without limit (reliability review F19).
pub const MAX_INTEGRATION_LABELS: usize = 100;
/// The label value of integrations beyond [`MAX_INTEGRATION_LABELS`].
pub const OTHER_INTEGRATIONS: &str = "other";
/// Longest integration name used as a label value as it is; longer ones are cut.
const MAX_LABEL_CHARS: usize = 64;

fn duration_histogram() -> Histogram {
    // 10 ms .. ~5 min.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    /// Jobs finished, by kind and outcome (`succeeded`, `failed`, `abandoned`).
    pub jobs: Family<JobLabels, Counter>,
    pub job_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    pub jobs_in_flight: Gauge,
    /// The embedded control plane's view, set by `control_plane::embedded::gauges`: accesses not
    /// ended by state, those past their expiry, revoke done minus expiry, pending jobs by kind.
    pub accesses: Family<StateLabels, Gauge>,
    pub accesses_overdue: Gauge,
    pub revoke_lag: Histogram,
    pub jobs_queued: Family<KindLabels, Gauge>,
    pub lease_renewals: Counter,
    pub leases_lost: Counter,
    /// Failed control-plane calls, by call (`hello`, `lease`, `renew`, `complete`, `upload`) and
    /// error code.
    pub control_plane_errors: Family<ControlPlaneLabels, Counter>,
    /// Rancher API requests by operation (`GET users`, `POST clusterroletemplatebindings`, ...)
    /// and HTTP status (or `error` when no answer came).
    pub rancher_requests: Family<RancherLabels, Counter>,
    /// Secret-store reads by store type and outcome (`ok`, `cached`, or an error code).
    pub secret_store_calls: Family<StoreLabels, Counter>,
    pub secret_store_latency: Family<StoreTypeLabels, Histogram, fn() -> Histogram>,
    /// Days until the integration's Rancher API key expires (set by `validate`, through
    /// [`Metrics::api_key_expiry`], which bounds the label values).
    pub api_key_expires_in_days: Family<IntegrationLabels, Gauge<f64, AtomicU64>>,
    /// Repair grants queued by the control plane's reconcile (an active access whose binding was
    /// gone), by integration ([`Metrics::access_repaired`]).
    pub access_repairs: Family<IntegrationLabels, Counter>,
    /// Bindings the reconcile removed, by integration and reason (`expired`, `unclaimed`;
    /// [`Metrics::binding_swept`]).
    pub swept_bindings: Family<SweptLabels, Counter>,
    /// Integration names already used as a label value (at most [`MAX_INTEGRATION_LABELS`]).
    integration_labels: Mutex<HashSet<String>>,
    /// 1 while a session with the control plane is established and the worker pool runs.
    pub ready: Gauge,
    /// 1 when a remote control plane may send this agent's keys to any Rancher host (no
    /// `APONO_ALLOWED_RANCHER_HOSTS`): something to alert on.
    pub rancher_hosts_unrestricted: Gauge,
    /// Log lines dropped because stderr could not take them (a stalled reader): logging never
    /// blocks the daemon.
    pub log_lines_dropped: Counter,
    /// Warnings caused by strangers (refused `Host`, bad tokens) not written because the same
    /// warning was written within its interval.
    pub log_lines_suppressed: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("apono_connector");
        let m = Metrics {
            registry: Registry::default(),
            jobs: Family::default(),
            job_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            jobs_in_flight: Gauge::default(),
            accesses: Family::default(),
            accesses_overdue: Gauge::default(),
            // 0.25 s .. ~34 min: a tick late up to an outage.
            revoke_lag: Histogram::new(exponential_buckets(0.25, 2.0, 14)),
            jobs_queued: Family::default(),
            lease_renewals: Counter::default(),
            leases_lost: Counter::default(),
            control_plane_errors: Family::default(),
            rancher_requests: Family::default(),
            secret_store_calls: Family::default(),
            secret_store_latency: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            api_key_expires_in_days: Family::default(),
            access_repairs: Family::default(),
            swept_bindings: Family::default(),
            integration_labels: Mutex::new(HashSet::new()),
            ready: Gauge::default(),
            rancher_hosts_unrestricted: Gauge::default(),
            log_lines_dropped: Counter::default(),
            log_lines_suppressed: Counter::default(),
        };
        registry.register("jobs", "Jobs finished, by kind and outcome", m.jobs.clone());
        registry.register("job_duration_seconds", "Time to run a job", m.job_duration.clone());
        registry.register("jobs_in_flight", "Jobs running now", m.jobs_in_flight.clone());
        registry.register("accesses", "Accesses not ended, by state", m.accesses.clone());
        let overdue = "Accesses not yet revoked although their expiry has passed";
        registry.register("accesses_overdue", overdue, m.accesses_overdue.clone());
        let lag = "Time from an access's expiry to its revoke done";
        registry.register("revoke_lag_seconds", lag, m.revoke_lag.clone());
        registry.register(
            "jobs_queued",
            "Jobs waiting to be handed out, by kind",
            m.jobs_queued.clone(),
        );
        registry.register("lease_renewals", "Job leases renewed", m.lease_renewals.clone());
        registry.register(
            "leases_lost",
            "Job leases lost (the job went to another agent)",
            m.leases_lost.clone(),
        );
        registry.register(
            "control_plane_errors",
            "Failed control-plane calls, by call and error code",
            m.control_plane_errors.clone(),
        );
        registry.register(
            "rancher_requests",
            "Rancher API requests, by operation and HTTP status",
            m.rancher_requests.clone(),
        );
        registry.register(
            "secret_store_calls",
            "Secret-store reads, by store and outcome",
            m.secret_store_calls.clone(),
        );
        registry.register(
            "secret_store_latency_seconds",
            "Secret-store read latency, by store",
            m.secret_store_latency.clone(),
        );
        registry.register(
            "api_key_expires_in_days",
            "Days until the Rancher API key of an integration expires",
            m.api_key_expires_in_days.clone(),
        );
        registry.register(
            "access_repairs",
            "Repairs queued for active accesses whose binding was gone from Rancher, by integration",
            m.access_repairs.clone(),
        );
        registry.register(
            "swept_bindings",
            "The connector's bindings the reconcile removed, by integration and reason",
            m.swept_bindings.clone(),
        );
        registry.register(
            "ready",
            "1 when connected to the control plane and serving jobs",
            m.ready.clone(),
        );
        registry.register(
            "rancher_hosts_unrestricted",
            "1 when the control plane decides which Rancher hosts receive the agent's keys (no APONO_ALLOWED_RANCHER_HOSTS)",
            m.rancher_hosts_unrestricted.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stderr was not being read fast enough",
            m.log_lines_dropped.clone(),
        );
        registry.register(
            "log_lines_suppressed",
            "Repeated warnings caused by strangers that were rate-limited",
            m.log_lines_suppressed.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: crate::VERSION.to_string(),
            })
            .set(1);
        registry.register("build_info", "Version of the running agent", build);
        Metrics { registry, ..m }
    }

    /// The registry in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn job_finished(&self, kind: &str, outcome: &str, elapsed: Duration) {
        self.jobs
            .get_or_create(&JobLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.job_duration
            .get_or_create(&KindLabels { kind: kind.to_string() })
            .observe(elapsed.as_secs_f64());
    }

    /// Records the days until `integration`'s API key expires, under a bounded label.
    pub fn api_key_expiry(&self, integration: &str, days: f64) {
        let labels = self.integration_labels(integration);
        self.api_key_expires_in_days.get_or_create(&labels).set(days);
    }

    /// Counts a repair queued for an access on `integration`, under a bounded label.
    pub fn access_repaired(&self, integration: &str) {
        let labels = self.integration_labels(integration);
        self.access_repairs.get_or_create(&labels).inc();
    }

    /// Counts a binding the reconcile removed on `integration` for `reason` (a code).
    pub fn binding_swept(&self, integration: &str, reason: &str) {
        let labels = SweptLabels {
            integration: self.integration_label(integration),
            reason: reason.to_string(),
        };
        self.swept_bindings.get_or_create(&labels).inc();
    }

    fn integration_labels(&self, integration: &str) -> IntegrationLabels {
        IntegrationLabels {
            integration: self.integration_label(integration),
        }
    }

    fn integration_label(&self, integration: &str) -> String {
        let name: String = integration.chars().take(MAX_LABEL_CHARS).collect();
        let Ok(mut seen) = self.integration_labels.lock() else {
            return OTHER_INTEGRATIONS.to_string();
        };
        if seen.contains(&name) {
            return name;
        }
        if seen.len() < MAX_INTEGRATION_LABELS {
            seen.insert(name.clone());
            return name;
        }
        OTHER_INTEGRATIONS.to_string()
    }

    pub fn control_plane_error(&self, call: &str, code: &str) {
        self.control_plane_errors
            .get_or_create(&ControlPlaneLabels {
                call: call.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn rancher_request(&self, operation: &str, status: &str) {
        self.rancher_requests
            .get_or_create(&RancherLabels {
                operation: operation.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    pub fn secret_store_call(&self, store: &str, outcome: &str, elapsed: Duration) {
        self.secret_store_calls
            .get_or_create(&StoreLabels {
                store: store.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.secret_store_latency
            .get_or_create(&StoreTypeLabels {
                store: store.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_labelled() {
        let m = metrics();
        m.job_finished("grant", "succeeded", Duration::from_millis(30));
        m.rancher_request("POST clusterroletemplatebindings", "201");
        m.secret_store_call("AWS", "ok", Duration::from_millis(5));
        let text = m.encode();
        for needle in [
            "apono_connector_jobs_total{kind=\"grant\",outcome=\"succeeded\"}",
            "apono_connector_job_duration_seconds_bucket{le=",
            "apono_connector_rancher_requests_total{operation=\"POST clusterroletemplatebindings\",status=\"201\"}",
            "apono_connector_secret_store_calls_total{store=\"AWS\",outcome=\"ok\"}",
            "apono_connector_build_info{version=",
            "apono_connector_jobs_in_flight",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .all(|l| l.is_empty() || l.starts_with("apono_connector_"))
        );
    }

    #[test]
    fn integration_labels_are_bounded() {
        // Its own registry: the process-wide one is shared with other tests.
        let m = Metrics::new();
        for i in 0..MAX_INTEGRATION_LABELS + 50 {
            m.api_key_expiry(&format!("inline-{i}"), 10.0);
        }
        m.api_key_expiry("inline-0", 3.0);
        m.api_key_expiry(&"x".repeat(10_000), 1.0);
        let text = m.encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("apono_connector_api_key_expires_in_days{"))
            .collect();
        assert_eq!(series.len(), MAX_INTEGRATION_LABELS + 1, "{text}");
        assert!(text.contains("integration=\"inline-0\"} 3.0"), "{text}");
        assert!(
            text.contains(&format!("integration=\"{OTHER_INTEGRATIONS}\"")),
            "{text}"
        );
        assert!(!text.contains(&"x".repeat(65)));
    }
}
