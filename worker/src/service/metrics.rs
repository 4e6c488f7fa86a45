//! Prometheus metrics. Labels are bounded: task, status, error kind, provider.

use std::sync::atomic::AtomicI64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub task: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub jobs: Family<JobLabels, Counter>,
    pub step_seconds: Family<StepLabels, Histogram>,
    pub queue_wait_seconds: Histogram,
    pub batch_size: Histogram,
    pub in_flight: Gauge<i64, AtomicI64>,
    pub provider: Family<ProviderLabels, Gauge<i64, AtomicI64>>,
    pub redeliveries: Counter,
    pub breaker_open: Gauge<i64, AtomicI64>,
}

impl Metrics {
    pub fn new(provider: &str) -> Self {
        let mut registry = Registry::with_prefix("ddit");
        let jobs = Family::<JobLabels, Counter>::default();
        registry.register("jobs", "Jobs finished, by task and status", jobs.clone());
        let step_seconds = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "step_seconds",
            "Latency of one batched sampler step (forward pass)",
            step_seconds.clone(),
        );
        let queue_wait_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "queue_wait_seconds",
            "Time from submission to start",
            queue_wait_seconds.clone(),
        );
        let batch_size = Histogram::new(linear_buckets(1.0, 1.0, 32));
        registry.register(
            "batch_size",
            "Rows per batched forward pass",
            batch_size.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "jobs_in_flight",
            "Jobs received and not yet acknowledged",
            in_flight.clone(),
        );
        let provider_f = Family::<ProviderLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "execution_provider",
            "The execution provider in use (value 1)",
            provider_f.clone(),
        );
        provider_f
            .get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            })
            .set(1);
        let redeliveries = Counter::default();
        registry.register(
            "redeliveries",
            "Deliveries flagged as redelivered",
            redeliveries.clone(),
        );
        let breaker_open = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "breaker_open",
            "1 once the circuit breaker opened on device faults (the worker takes no jobs), else 0",
            breaker_open.clone(),
        );
        #[cfg(feature = "gpu")]
        super::gpu::register(&mut registry);
        Self {
            registry: Mutex::new(registry),
            jobs,
            step_seconds,
            queue_wait_seconds,
            batch_size,
            in_flight,
            provider: provider_f,
            redeliveries,
            breaker_open,
        }
    }

    /// Reports where the nodes run, read from the loaded engines' sessions, in place of the
    /// provider requested.
    pub fn set_provider(&self, provider: &str) {
        self.provider.clear();
        self.provider
            .get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            })
            .set(1);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}
