//! The process's Prometheus metrics (prometheus-client): one registry, made with the
//! `App`, that the HTTP edge (and the job engine, once it runs) update as they work, and
//! that `GET /metrics` encodes together with what is read at scrape time (the relay's
//! lag, from Postgres).
//!
//! Label values come from small sets fixed in our code (method names, status classes,
//! job kinds and outcomes), never from what a client sends: every label value is a
//! series kept for the life of the process.

use std::sync::Arc;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Every metric's name starts with `assetd_`.
const PREFIX: &str = "assetd";

/// The media type of [`Metrics::encode`]'s text: Prometheus's text format 0.0.4, which
/// every Prometheus version scrapes (and the format `/metrics` always had).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Methods counted by name; any other is counted as `other`, so a client inventing
/// methods cannot add series.
const KNOWN_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// The outcomes [`Metrics::job_finished`] expects.
pub const JOB_OUTCOMES: [&str; 6] = ["succeeded", "failed", "cancelled", "retry", "released", "superseded"];

/// Upper bounds in seconds of the job-duration buckets: from quick checks to hour-long
/// jobs; longer ones land in `+Inf`.
const JOB_DURATION_BUCKETS: [f64; 12] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    /// `2xx`, `4xx`…: the class keeps the series few; the logs have exact statuses.
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobOutcomeLabels {
    kind: String,
    outcome: String,
}

/// The metrics of this process. Cloning is cheap and every clone updates the same
/// metrics.
#[derive(Clone, Debug)]
pub struct Metrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    registry: Registry,
    http_requests: Family<RequestLabels, Counter>,
    upload_received_bytes: Counter,
    download_sent_bytes: Counter,
    jobs_started: Family<JobLabels, Counter>,
    jobs_finished: Family<JobOutcomeLabels, Counter>,
    job_duration: Family<JobOutcomeLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let http_requests = Family::default();
        // The crate adds `_total` to counters and the unit to the name: the names in the
        // comments are the ones exported.
        // assetd_http_requests_total{method,status}
        registry.register("http_requests", "HTTP requests answered, by method and status class", http_requests.clone());
        let upload_received_bytes = Counter::default();
        // assetd_upload_received_bytes_total
        registry.register_with_unit(
            "upload_received",
            "Bytes received in upload request bodies (POST /api/assets), multipart framing included",
            Unit::Bytes,
            upload_received_bytes.clone(),
        );
        let download_sent_bytes = Counter::default();
        // assetd_download_sent_bytes_total
        registry.register_with_unit(
            "download_sent",
            "Asset bytes sent by downloads that assetd streams itself (not those nginx sends for it)",
            Unit::Bytes,
            download_sent_bytes.clone(),
        );
        let jobs_started = Family::default();
        // assetd_jobs_started_total{kind}
        registry.register("jobs_started", "Jobs started, by kind", jobs_started.clone());
        let jobs_finished = Family::default();
        // assetd_jobs_finished_total{kind,outcome}
        registry.register("jobs_finished", "Jobs finished, by kind and outcome", jobs_finished.clone());
        let job_duration: Family<_, _, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(JOB_DURATION_BUCKETS));
        // assetd_job_duration_seconds{kind,outcome}
        registry.register_with_unit(
            "job_duration",
            "How long jobs ran, by kind and outcome",
            Unit::Seconds,
            job_duration.clone(),
        );
        Self(Arc::new(Inner {
            registry,
            http_requests,
            upload_received_bytes,
            download_sent_bytes,
            jobs_started,
            jobs_finished,
            job_duration,
        }))
    }

    /// One HTTP request answered with `status`.
    pub fn http_request(&self, method: &str, status: u16) {
        let method = KNOWN_METHODS.into_iter().find(|known| *known == method).unwrap_or("other");
        let status = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        self.0.http_requests.get_or_create(&RequestLabels { method, status }).inc();
    }

    /// Bytes of an upload's request body, as they arrive.
    pub fn upload_received(&self, bytes: u64) {
        self.0.upload_received_bytes.inc_by(bytes);
    }

    /// Bytes of a download, as they are handed to the connection.
    pub fn download_sent(&self, bytes: u64) {
        self.0.download_sent_bytes.inc_by(bytes);
    }

    /// A job of this kind started running (for the job engine).
    pub fn job_started(&self, kind: &str) {
        self.0.jobs_started.get_or_create(&JobLabels { kind: kind.to_owned() }).inc();
    }

    /// A job of this kind finished after `seconds` with `outcome`: one of
    /// [`JOB_OUTCOMES`] (`succeeded`, `failed`, `cancelled`, `retry`, `released` at
    /// shutdown, `superseded` when the attempt was no longer the job's).
    pub fn job_finished(&self, kind: &str, outcome: &str, seconds: f64) {
        debug_assert!(JOB_OUTCOMES.contains(&outcome), "unknown job outcome {outcome:?}");
        let labels = JobOutcomeLabels { kind: kind.to_owned(), outcome: outcome.to_owned() };
        self.0.jobs_finished.get_or_create(&labels).inc();
        self.0.job_duration.get_or_create(&labels).observe(seconds);
    }

    /// Everything, in [`CONTENT_TYPE`]: the registry, then the relay's lag as given.
    pub fn encode(&self, relay_lag_events: i64, relay_lag_seconds: f64) -> Result<String, std::fmt::Error> {
        // The lag is read from Postgres for each scrape and belongs to no process, so it
        // is not kept here: a registry of its own per scrape, encoded after ours.
        let mut scrape = Registry::with_prefix(PREFIX);
        scrape.register(
            "relay_lag_events",
            "Events committed but not yet published to the broker",
            ConstGauge::new(relay_lag_events),
        );
        scrape.register(
            "relay_lag_seconds",
            "Age of the oldest event not yet published (0 when none)",
            ConstGauge::new(relay_lag_seconds),
        );
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.0.registry)?;
        prometheus_text::encode(&mut text, &scrape)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_jobs_and_the_relay_lag() {
        let metrics = Metrics::new();
        metrics.http_request("GET", 200);
        metrics.http_request("GET", 204);
        metrics.http_request("BREW", 418);
        metrics.upload_received(1000);
        metrics.download_sent(10);
        metrics.job_started("thumbnail");
        metrics.job_finished("thumbnail", "succeeded", 0.2);
        let text = metrics.encode(3, 1.5).unwrap();

        let lines: Vec<&str> = text.lines().collect();
        for expected in [
            "# TYPE assetd_http_requests_total counter",
            r#"assetd_http_requests_total{method="GET",status="2xx"} 2"#,
            r#"assetd_http_requests_total{method="other",status="4xx"} 1"#,
            "assetd_upload_received_bytes_total 1000",
            "assetd_download_sent_bytes_total 10",
            r#"assetd_jobs_started_total{kind="thumbnail"} 1"#,
            r#"assetd_jobs_finished_total{kind="thumbnail",outcome="succeeded"} 1"#,
            "# TYPE assetd_job_duration_seconds histogram",
            r#"assetd_job_duration_seconds_bucket{kind="thumbnail",outcome="succeeded",le="0.1"} 0"#,
            r#"assetd_job_duration_seconds_bucket{kind="thumbnail",outcome="succeeded",le="0.5"} 1"#,
            r#"assetd_job_duration_seconds_count{kind="thumbnail",outcome="succeeded"} 1"#,
            "# TYPE assetd_relay_lag_events gauge",
            "assetd_relay_lag_events 3",
            "assetd_relay_lag_seconds 1.5",
        ] {
            assert!(lines.contains(&expected), "no line {expected:?} in:\n{text}");
        }
    }
}
