"""Writes deploy/grafana/ddit-worker.json, the Grafana dashboard for the worker's Prometheus metrics.

    python3 tools/deploy/make_dashboard.py

Generated rather than hand-edited so panel ids and grid positions stay consistent. The metric
names are checked against a live worker's /metrics by worker/tests/dashboard.rs.
"""

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid, title, x, y, w, h, targets, unit="short", kind="timeseries", description=""):
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [
            {"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def main() -> None:
    sel = 'job=~"$job", instance=~"$instance"'
    panels = [
        panel(1, "Jobs finished / s by task and status", 0, 0, 12, 8,
              [(f"sum by (task, status) (rate(ddit_jobs_total{{{sel}}}[$__rate_interval]))", "{{task}} {{status}}")],
              unit="reqps", description="ddit_jobs_total: every job that reached a result."),
        panel(2, "Failed jobs share", 12, 0, 6, 8,
              [(f'sum(rate(ddit_jobs_total{{{sel}, status!="succeeded"}}[$__rate_interval])) / '
                f"clamp_min(sum(rate(ddit_jobs_total{{{sel}}}[$__rate_interval])), 1e-9)", "not succeeded")],
              unit="percentunit"),
        panel(3, "Jobs in flight", 18, 0, 6, 8,
              [(f"sum by (instance) (ddit_jobs_in_flight{{{sel}}})", "{{instance}}")],
              description="Deliveries received and not yet acknowledged, per worker (bounded by prefetch)."),
        panel(4, "Sampler step latency (p50 / p95)", 0, 8, 12, 8,
              [(f"histogram_quantile(0.5, sum by (le, kind) (rate(ddit_step_seconds_bucket{{{sel}}}[$__rate_interval])))", "p50 {{kind}}"),
               (f"histogram_quantile(0.95, sum by (le, kind) (rate(ddit_step_seconds_bucket{{{sel}}}[$__rate_interval])))", "p95 {{kind}}")],
              unit="s", description="One batched forward pass (all jobs stepping together)."),
        panel(5, "Queue wait (p50 / p95)", 12, 8, 12, 8,
              [(f"histogram_quantile(0.5, sum by (le) (rate(ddit_queue_wait_seconds_bucket{{{sel}}}[$__rate_interval])))", "p50"),
               (f"histogram_quantile(0.95, sum by (le) (rate(ddit_queue_wait_seconds_bucket{{{sel}}}[$__rate_interval])))", "p95")],
              unit="s", description="From submitted_at to the start of the job."),
        panel(6, "Mean rows per forward pass", 0, 16, 8, 8,
              [(f"sum(rate(ddit_batch_size_sum{{{sel}}}[$__rate_interval])) / "
                f"clamp_min(sum(rate(ddit_batch_size_count{{{sel}}}[$__rate_interval])), 1e-9)", "rows")],
              description="Cross-job batching at work: higher is better for throughput."),
        panel(7, "Redeliveries / s", 8, 16, 8, 8,
              [(f"sum(rate(ddit_redeliveries_total{{{sel}}}[$__rate_interval]))", "redelivered")],
              unit="reqps", description="Messages delivered again after a worker died or requeued them."),
        panel(8, "Execution provider", 16, 16, 8, 8,
              [(f"sum by (provider) (ddit_execution_provider{{{sel}}})", "{{provider}}")],
              kind="stat", description="Workers per execution provider (cpu, cuda, tensorrt)."),
        panel(9, "Workers up", 0, 24, 8, 6,
              [(f'count(up{{{sel}}} == 1)', "up")], kind="stat"),
        panel(10, "RabbitMQ queue depth (rabbitmq_prometheus plugin)", 8, 24, 16, 6,
              [('sum by (queue) (rabbitmq_detailed_queue_messages_ready{queue=~"$queue"})', "{{queue}} ready"),
               ('sum by (queue) (rabbitmq_detailed_queue_messages_unacked{queue=~"$queue"})', "{{queue}} unacked")],
              description="What KEDA scales on. Needs RabbitMQ's Prometheus endpoint scraped at "
                          "/metrics/detailed?family=queue_coarse_metrics."),
    ]
    dash = {
        "uid": "ddit-worker",
        "title": "ddit worker",
        "tags": ["ddit"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "job", "type": "query", "datasource": DS, "query": "label_values(ddit_jobs_in_flight, job)",
             "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2},
            {"name": "instance", "type": "query", "datasource": DS,
             "query": 'label_values(ddit_jobs_in_flight{job=~"$job"}, instance)',
             "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2},
            {"name": "queue", "type": "custom", "query": "ddit.jobs,ddit.dlx.queue", "includeAll": True,
             "multi": True, "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }
    out = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "ddit-worker.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dash, indent=2) + "\n")


if __name__ == "__main__":
    main()
