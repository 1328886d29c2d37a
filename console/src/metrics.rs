//! `/metrics`: what Prometheus scrapes, in the OpenMetrics text format (prometheus-client's
//! encoder), built afresh at each scrape from the same reads the API makes (cached, so a scrape
//! every 15 s costs a few list calls per minute).
//!
//! The job's label is `backflow_job`, not `job`: Prometheus sets `job` itself (the scrape job's
//! name) and would rename ours to `exported_job`.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `backflow_job_enabled`, `backflow_job_running` | backflow_job | 1 or 0 |
//! | `backflow_job_last_run_timestamp_seconds` | backflow_job | start of its last session |
//! | `backflow_job_last_duration_seconds` | backflow_job | how long it took |
//! | `backflow_job_last_success` | backflow_job | 1: success or warning; 0: failure or cancelled |
//! | `backflow_job_next_run_timestamp_seconds` | backflow_job | its next scheduled run |
//! | `backflow_vm_last_success_timestamp_seconds` | backflow_job, vm, repository | end of its last successful backup; 0: never |
//! | `backflow_vm_last_backup_size_bytes` | backflow_job, vm, repository | that restore point's size |
//! | `backflow_vm_last_backup_written_bytes` | backflow_job, vm, repository | what that backup added |
//! | `backflow_vm_restore_points` | backflow_job, vm, repository | restore points kept |
//! | `backflow_repository_{snapshots,logical_bytes,stored_bytes,chunks}` | repository | usage |
//! | `backflow_repository_deduplication_ratio` | repository | logical / stored |
//! | `backflow_repository_readable` | repository | 1 when it could be read |
//! | `backflow_gc_last_{run_timestamp_seconds,success,deleted_bytes}` | repository | its last gc |
//! | `backflow_health_check_last_{run_timestamp_seconds,success,damaged_chunks}` | repository | its last health check |
//! | `backflow_pipeline_stage_{bytes_in,bytes_out,items_in,items_out}_total` | run, backflow_job, target, pipeline, stage, kind | counts of a running (or just ended) pipeline's stage |
//! | `backflow_pipeline_stage_busy_seconds_total` | same | worker time spent working |
//! | `backflow_pipeline_stage_{utilisation,queue_fill,bytes_per_second}` | same | over the last interval |
//! | `backflow_pipeline_running` | run, backflow_job, target, pipeline | 1 while it runs |

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use backflow_jobs::Verdict;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::api::{ApiError, AppState, blocking};

type Labels = Vec<(String, String)>;
type FloatGauge = Family<Labels, Gauge<f64, AtomicU64>>;
type IntGauge = Family<Labels, Gauge<i64>>;
type IntCounter = Family<Labels, Counter<u64>>;
type FloatCounter = Family<Labels, Counter<f64, AtomicU64>>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Registers families by name and help, and keeps them to fill.
struct Families<'a> {
    registry: &'a mut Registry,
}

impl Families<'_> {
    fn gauge(&mut self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::default();
        self.registry.register(name, help, g.clone());
        g
    }

    fn fgauge(&mut self, name: &str, help: &str) -> FloatGauge {
        let g = FloatGauge::default();
        self.registry.register(name, help, g.clone());
        g
    }

    fn counter(&mut self, name: &str, help: &str) -> IntCounter {
        let c = IntCounter::default();
        self.registry.register(name, help, c.clone());
        c
    }

    fn fcounter(&mut self, name: &str, help: &str) -> FloatCounter {
        let c = FloatCounter::default();
        self.registry.register(name, help, c.clone());
        c
    }
}

/// The metrics: OpenMetrics when the scraper accepts it (Prometheus does), else Prometheus's
/// classic text format (version 0.0.4: what `curl` and `promtool check metrics` read).
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "OpenMetrics text, or the classic text format", content_type = "text/plain", body = String),
    (status = 401, body = crate::api::ErrorBody),
))]
pub async fn metrics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let text = blocking(move || render(&state)).await??;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    Ok(if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_classic(&text),
        )
            .into_response()
    })
}

/// OpenMetrics text as the classic text format: a counter family is named by its samples
/// (`foo_total`, where OpenMetrics names the family `foo`), and there is no `# EOF` or `# UNIT`.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn b(v: bool) -> i64 {
    i64::from(v)
}

/// The whole exposition.
pub fn render(state: &AppState) -> Result<String, ApiError> {
    let mut registry = Registry::default();
    let mut f = Families {
        registry: &mut registry,
    };
    let jobs = state.control.jobs();
    let data = Arc::clone(&state.data);

    let enabled = f.gauge(
        "backflow_job_enabled",
        "Whether the job's schedule is enabled",
    );
    let running = f.gauge("backflow_job_running", "Whether the job runs now");
    let last_run = f.gauge(
        "backflow_job_last_run_timestamp_seconds",
        "Start of the job's last session (unix seconds)",
    );
    let last_duration = f.gauge(
        "backflow_job_last_duration_seconds",
        "How long the job's last session took",
    );
    let last_success = f.gauge(
        "backflow_job_last_success",
        "1 when the job's last session succeeded (or warned), 0 when it failed or was cancelled",
    );
    let next_run = f.gauge(
        "backflow_job_next_run_timestamp_seconds",
        "The job's next scheduled run (unix seconds)",
    );
    for j in &jobs {
        let name = j.job.name.0.as_str();
        let l = labels(&[("backflow_job", name)]);
        enabled.get_or_create(&l).set(b(j.enabled));
        running.get_or_create(&l).set(b(j.running));
        if let Some(t) = j.next_run {
            next_run.get_or_create(&l).set(t);
        }
        let view = data.view(&j.job.repository);
        if let Some(s) = view
            .sessions
            .iter()
            .rev()
            .find(|s| s.job == name && s.action.is_none())
        {
            last_run.get_or_create(&l).set(s.started);
            last_duration.get_or_create(&l).set(s.ended - s.started);
            last_success
                .get_or_create(&l)
                .set(b(matches!(s.result, Verdict::Success | Verdict::Warning)));
        }
    }

    let vm_success = f.gauge(
        "backflow_vm_last_success_timestamp_seconds",
        "End of the VM's last successful backup (unix seconds); 0 when it never had one",
    );
    let vm_size = f.gauge(
        "backflow_vm_last_backup_size_bytes",
        "Size of the VM's latest successful restore point (its disks)",
    );
    let vm_written = f.gauge(
        "backflow_vm_last_backup_written_bytes",
        "Bytes the VM's last successful backup added to the repository",
    );
    let vm_points = f.gauge(
        "backflow_vm_restore_points",
        "Restore points of the VM in the job's repository",
    );
    for vm in crate::data::vms(&jobs, &data) {
        let l = labels(&[
            ("backflow_job", &vm.job),
            ("vm", &vm.vm),
            ("repository", &vm.repository),
        ]);
        vm_success
            .get_or_create(&l)
            .set(vm.last_success.unwrap_or(0));
        vm_size.get_or_create(&l).set(vm.last_size as i64);
        vm_written
            .get_or_create(&l)
            .set(vm.last_bytes_written as i64);
        vm_points.get_or_create(&l).set(vm.restore_points as i64);
    }

    let snapshots = f.gauge(
        "backflow_repository_snapshots",
        "Restore points in the repository",
    );
    let logical = f.gauge(
        "backflow_repository_logical_bytes",
        "The restore points' disks' sizes together",
    );
    let stored = f.gauge("backflow_repository_stored_bytes", "The pack files' size");
    let chunks = f.gauge("backflow_repository_chunks", "Chunk records in the index");
    let ratio = f.fgauge(
        "backflow_repository_deduplication_ratio",
        "Logical bytes over stored bytes",
    );
    let readable = f.gauge(
        "backflow_repository_readable",
        "1 when the repository could be read",
    );
    let gc_run = f.gauge(
        "backflow_gc_last_run_timestamp_seconds",
        "End of the repository's last gc (unix seconds)",
    );
    let gc_ok = f.gauge("backflow_gc_last_success", "1 when the last gc succeeded");
    let gc_deleted = f.gauge(
        "backflow_gc_last_deleted_bytes",
        "Bytes of pack files the last gc deleted",
    );
    let hc_run = f.gauge(
        "backflow_health_check_last_run_timestamp_seconds",
        "End of the repository's last health check (unix seconds)",
    );
    let hc_ok = f.gauge(
        "backflow_health_check_last_success",
        "1 when the last health check found the repository whole",
    );
    let hc_damaged = f.gauge(
        "backflow_health_check_damaged_chunks",
        "Damaged chunks restore points need, as the last health check found",
    );
    for r in crate::api::repositories(&jobs, &data) {
        let l = labels(&[("repository", &r.location)]);
        readable.get_or_create(&l).set(b(r.error.is_none()));
        snapshots.get_or_create(&l).set(r.snapshots as i64);
        logical.get_or_create(&l).set(r.logical_bytes as i64);
        stored.get_or_create(&l).set(r.stored_bytes as i64);
        chunks.get_or_create(&l).set(r.chunks as i64);
        ratio.get_or_create(&l).set(r.deduplication_ratio);
        if let Some(gc) = &r.last_gc {
            gc_run.get_or_create(&l).set(gc.ended);
            gc_ok.get_or_create(&l).set(b(gc.result == "success"));
            gc_deleted.get_or_create(&l).set(gc.amount as i64);
        }
        if let Some(hc) = &r.last_health_check {
            hc_run.get_or_create(&l).set(hc.ended);
            hc_ok
                .get_or_create(&l)
                .set(b(hc.result == "success" || hc.result == "warning"));
            hc_damaged.get_or_create(&l).set(hc.amount as i64);
        }
    }

    let p_running = f.gauge(
        "backflow_pipeline_running",
        "1 while the pipeline run goes on",
    );
    let bytes_in = f.counter(
        "backflow_pipeline_stage_bytes_in",
        "Bytes the stage received",
    );
    let bytes_out = f.counter("backflow_pipeline_stage_bytes_out", "Bytes the stage sent");
    let items_in = f.counter(
        "backflow_pipeline_stage_items_in",
        "Messages the stage received",
    );
    let items_out = f.counter(
        "backflow_pipeline_stage_items_out",
        "Messages the stage sent",
    );
    let busy = f.fcounter(
        "backflow_pipeline_stage_busy_seconds",
        "Worker time the stage spent working (not waiting)",
    );
    let utilisation = f.fgauge(
        "backflow_pipeline_stage_utilisation",
        "Share of the stage's worker time spent working over the last interval",
    );
    let fill = f.fgauge(
        "backflow_pipeline_stage_queue_fill",
        "Items waiting in the channel into the stage over its capacity",
    );
    let rate = f.fgauge(
        "backflow_pipeline_stage_bytes_per_second",
        "Bytes per second through the stage over the last interval",
    );
    for run in state.live.list() {
        let id = run.id.to_string();
        let base = [
            ("run", id.as_str()),
            ("backflow_job", run.job.as_str()),
            ("target", run.target.as_str()),
            ("pipeline", run.pipeline.as_str()),
        ];
        p_running
            .get_or_create(&labels(&base))
            .set(b(run.ended.is_none()));
        for s in &run.stages {
            let mut pairs = base.to_vec();
            pairs.push(("stage", &s.name));
            pairs.push(("kind", &s.kind));
            let l = labels(&pairs);
            bytes_in.get_or_create(&l).inc_by(s.bytes_in);
            bytes_out.get_or_create(&l).inc_by(s.bytes_out);
            items_in.get_or_create(&l).inc_by(s.items_in);
            items_out.get_or_create(&l).inc_by(s.items_out);
            busy.get_or_create(&l).inc_by(s.busy_seconds);
            utilisation.get_or_create(&l).set(s.utilisation);
            fill.get_or_create(&l).set(if s.capacity > 0 {
                s.queued as f64 / s.capacity as f64
            } else {
                0.0
            });
            rate.get_or_create(&l).set(s.bytes_per_second);
        }
    }

    let mut out = String::new();
    encode(&mut out, &registry).map_err(|e| ApiError::internal(format!("metrics: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_in_the_classic_format() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\na_bytes_total{x=\"1\"} 5\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"1\"} 5\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
