//! GPU metrics through NVML (the `gpu` cargo feature): per device, memory used and total and
//! utilisation, read at each scrape of `/metrics`. NVML (libnvidia-ml) loads at run time; on a
//! host without it or without a device, nothing is registered and nothing fails.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use nvml_wrapper::Nvml;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
    name: String,
}

/// One device's reading.
struct Reading {
    labels: DeviceLabels,
    used: Option<u64>,
    total: Option<u64>,
    utilization: Option<f64>,
}

#[derive(Debug)]
struct GpuCollector {
    nvml: Nvml,
}

impl GpuCollector {
    /// Every device's reading; a value NVML cannot give (a lost device) is left out.
    fn read(&self) -> Vec<Reading> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let d = self.nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok();
                Some(Reading {
                    labels: DeviceLabels {
                        device: i.to_string(),
                        name: d.name().unwrap_or_default(),
                    },
                    used: mem.as_ref().map(|m| m.used),
                    total: mem.as_ref().map(|m| m.total),
                    utilization: d.utilization_rates().ok().map(|u| f64::from(u.gpu) / 100.0),
                })
            })
            .collect()
    }
}

/// `(name, help, value of a reading)` of each exported gauge.
type Gauge = (&'static str, &'static str, fn(&Reading) -> Option<f64>);

const GAUGES: [Gauge; 3] = [
    (
        "gpu_memory_used_bytes",
        "Device memory in use on each GPU (NVML), bytes",
        |r| r.used.map(|v| v as f64),
    ),
    (
        "gpu_memory_total_bytes",
        "Device memory of each GPU (NVML), bytes",
        |r| r.total.map(|v| v as f64),
    ),
    (
        "gpu_utilization_ratio",
        "Share of the last sample period a kernel ran on each GPU (NVML), 0 to 1",
        |r| r.utilization,
    ),
];

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let readings = self.read();
        for (name, help, value) in GAUGES {
            let rows: Vec<(&DeviceLabels, f64)> = readings
                .iter()
                .filter_map(|r| value(r).map(|v| (&r.labels, v)))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, v) in rows {
                ConstGauge::new(v).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// Registers the GPU gauges when NVML loads and sees at least one device; otherwise nothing.
/// Returns whether it did.
pub fn register(registry: &mut Registry) -> bool {
    match Nvml::init() {
        Ok(nvml) if nvml.device_count().unwrap_or(0) > 0 => {
            registry.register_collector(Box::new(GpuCollector { nvml }));
            true
        }
        Ok(_) => {
            tracing::info!("nvml: no GPU, no GPU metrics");
            false
        }
        Err(e) => {
            tracing::info!("nvml not available ({e}): no GPU metrics");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // This host has no NVIDIA driver: the GPU metrics are absent, and nothing fails.
    #[test]
    fn without_a_gpu_nothing_is_registered_and_metrics_still_encode() {
        let mut registry = Registry::with_prefix("ddit");
        let registered = register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        if registered {
            // On a GPU host: every device reports all three gauges.
            assert!(
                out.contains("ddit_gpu_memory_total_bytes{device=\"0\""),
                "{out}"
            );
        } else {
            assert!(!out.contains("gpu_"), "{out}");
            assert!(out.contains("# EOF"), "{out}");
        }
    }
}
