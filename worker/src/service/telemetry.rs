//! One `init_telemetry`: logs to stderr, and traces over OTLP/HTTP when an endpoint is set.
//! A W3C `traceparent` header on a job continues the caller's trace.

use std::collections::HashMap;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::error::{Result, WorkerError};

/// Flushes and shuts the exporter down when dropped or on [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.force_flush() {
                eprintln!("telemetry flush: {e}");
            }
            let _ = p.shutdown();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub fn init_telemetry(
    filter: &str,
    otlp_endpoint: Option<&str>,
    service: &str,
) -> Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| WorkerError::Config {
            name: "log".into(),
            message: e.to_string(),
        })?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let provider = match otlp_endpoint {
        Some(ep) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(ep)
                .build()
                .map_err(|e| WorkerError::Config {
                    name: "otlp-endpoint".into(),
                    message: e.to_string(),
                })?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("ddit-worker")));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}

/// Makes `span` a child of the caller's trace given a W3C `traceparent`.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let mut carrier = HashMap::new();
        carrier.insert("traceparent".to_string(), tp.to_string());
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
        let _ = span.set_parent(cx);
    }
}
