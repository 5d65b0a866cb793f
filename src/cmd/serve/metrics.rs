//! The server's counters, gauges and latency histograms, rendered in the Prometheus text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets; `+Inf` is implied.
const LATENCY_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A Prometheus histogram with fixed buckets, updated lock-free.
pub(super) struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub(super) fn observe(&self, d: Duration) {
        let seconds = d.as_secs_f64();
        let bucket = self.bounds.iter().position(|&b| seconds <= b).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Everything `/metrics` reports. Request counters are kept by the HTTP handlers, generation ones by the worker.
pub(super) struct Metrics {
    /// Requests received on the generation endpoints.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Requests whose client went away before the generation ended.
    pub cancelled: AtomicU64,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens: AtomicU64,
    /// New tokens of completed requests.
    pub completion_tokens: AtomicU64,
    /// Every token the worker generated, cancelled requests included.
    pub generated_tokens: AtomicU64,
    /// Batched decode steps run (one forward each).
    pub decode_steps: AtomicU64,
    /// Sequences advanced by those steps (their sum of batch sizes).
    pub decode_sequences: AtomicU64,
    /// Gauge: accepted requests waiting for the worker to start them.
    pub queue_depth: AtomicU64,
    /// Gauge: sequences being decoded (all models together).
    pub batch_size: AtomicU64,
    /// Request to completion.
    pub request_latency: Histogram,
    /// Request to its first generated token.
    pub time_to_first_token: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            decode_sequences: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            batch_size: AtomicU64::new(0),
            request_latency: Histogram::new(&LATENCY_BUCKETS),
            time_to_first_token: Histogram::new(&LATENCY_BUCKETS),
        }
    }
}

impl Metrics {
    /// The exposition text (`text/plain; version=0.0.4`).
    pub(super) fn render(&self) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let scalars: [(&str, &str, &str, String); 11] = [
            ("tramontane_requests_total", "counter", "Generation requests received.", get(&self.requests).to_string()),
            (
                "tramontane_request_errors_total",
                "counter",
                "Requests answered with an error.",
                get(&self.errors).to_string(),
            ),
            (
                "tramontane_requests_cancelled_total",
                "counter",
                "Requests whose client disconnected before the generation ended.",
                get(&self.cancelled).to_string(),
            ),
            (
                "tramontane_prompt_tokens_total",
                "counter",
                "Prompt tokens of accepted requests.",
                get(&self.prompt_tokens).to_string(),
            ),
            (
                "tramontane_completion_tokens_total",
                "counter",
                "New tokens of completed requests.",
                get(&self.completion_tokens).to_string(),
            ),
            (
                "tramontane_generated_tokens_total",
                "counter",
                "Tokens generated, cancelled requests included.",
                get(&self.generated_tokens).to_string(),
            ),
            (
                "tramontane_decode_steps_total",
                "counter",
                "Batched decode steps (one forward pass each).",
                get(&self.decode_steps).to_string(),
            ),
            (
                "tramontane_decode_step_sequences_total",
                "counter",
                "Sequences advanced by decode steps (divide by the steps for the mean batch size).",
                get(&self.decode_sequences).to_string(),
            ),
            (
                "tramontane_generation_seconds_total",
                "counter",
                "Seconds from request to completion, summed over completed requests.",
                format!("{:.6}", get(&self.request_latency.sum_nanos) as f64 / 1e9),
            ),
            (
                "tramontane_queue_depth",
                "gauge",
                "Accepted requests waiting for the generation worker.",
                get(&self.queue_depth).to_string(),
            ),
            (
                "tramontane_batch_size",
                "gauge",
                "Sequences being decoded, all models together.",
                get(&self.batch_size).to_string(),
            ),
        ];
        for (name, kind, help, value) in scalars {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        self.request_latency.render(
            &mut out,
            "tramontane_request_duration_seconds",
            "Seconds from request to the end of its generation (completed requests).",
        );
        self.time_to_first_token.render(
            &mut out,
            "tramontane_time_to_first_token_seconds",
            "Seconds from request to its first generated token.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_inf_equal_to_count() {
        let m = Metrics::default();
        for ms in [1u64, 7, 7, 300, 200_000] {
            m.request_latency.observe(Duration::from_millis(ms));
        }
        let text = m.render();
        let line = |prefix: &str| {
            text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` in\n{text}"))
        };
        assert_eq!(
            line("tramontane_request_duration_seconds_bucket{le=\"0.005\"}"),
            "tramontane_request_duration_seconds_bucket{le=\"0.005\"} 1"
        );
        assert!(line("tramontane_request_duration_seconds_bucket{le=\"0.01\"}").ends_with(" 3"));
        assert!(line("tramontane_request_duration_seconds_bucket{le=\"0.5\"}").ends_with(" 4"));
        assert!(line("tramontane_request_duration_seconds_bucket{le=\"120\"}").ends_with(" 4"));
        assert!(line("tramontane_request_duration_seconds_bucket{le=\"+Inf\"}").ends_with(" 5"));
        assert_eq!(line("tramontane_request_duration_seconds_count"), "tramontane_request_duration_seconds_count 5");
        assert_eq!(line("tramontane_request_duration_seconds_sum"), "tramontane_request_duration_seconds_sum 200.315");
        assert!(text.contains("# TYPE tramontane_time_to_first_token_seconds histogram\n"));
        assert!(text.contains("tramontane_time_to_first_token_seconds_count 0\n"));
        assert!(text.contains("# TYPE tramontane_queue_depth gauge\ntramontane_queue_depth 0\n"));
    }
}
