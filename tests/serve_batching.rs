//! `tramontane serve`'s continuous batching, cancellation and metrics, on a small random Mistral (sliding window,
//! long context) served with a PEFT adapter:
//!
//! - concurrent requests on two models decode in shared batches and get exactly the answers they get alone;
//! - a client that stops reading does not hold up others, and a client that disconnects (streaming or not) stops
//!   its generation: the cancelled counter goes up and no more tokens are generated;
//! - `/metrics` is valid Prometheus text: counters, gauges and cumulative latency histograms.

mod serve_common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};
use serve_common::{http, metric, metrics, post, send, start, streamed_text, wait_for, Server};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// tiny-mistral's shapes (so the PEFT fixture adapter fits) with an 8192-token context and a window of 32.
fn model() -> &'static PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve_batching/long-mistral");
        let config = trainer::model::ModelConfig::from_json_str(
            &json!({
                "model_type": "mistral", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5, "sliding_window": 32, "max_position_embeddings": 8192,
                "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false
            })
            .to_string(),
        )
        .unwrap();
        trainer::model::synthetic::write_random_model(&dir, &config, 7, 0.1).unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixtures().join("models").join(file), dir.join(file)).unwrap();
        }
        dir
    })
}

fn serve() -> Server {
    let adapter = fixtures().join("adapters/peft-mistral");
    start(model(), &["--base-name".into(), "base".into(), "--adapter".into(), format!("peft={}", adapter.display())])
}

fn completion(model: &str, prompt: &str, max: usize, stream: bool) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max, "temperature": 0, "stream": stream})
}

/// The answer's text (streamed or not).
fn answer(reply: &serve_common::Reply, stream: bool) -> String {
    assert_eq!(reply.status, 200, "{}", reply.body);
    if stream {
        streamed_text(&reply.body)
    } else {
        reply.json()["choices"][0]["text"].as_str().unwrap().to_string()
    }
}

#[test]
fn concurrent_requests_share_batches_and_answer_as_alone() {
    let server = serve();
    let port = server.port;
    let prompts = ["The wind", "Tokenizers are fast and", "A", "Safetensors files hold tensors, and the models"];
    let mut cases = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        for (j, model) in ["base", "peft"].into_iter().enumerate() {
            // Budgets differ, so sequences leave the batch at different steps; some are sampled with a seed.
            let max = 6 + 7 * i + 3 * j;
            let mut body = completion(model, prompt, max, (i + j) % 2 == 0);
            body["ignore_eos"] = json!(true);
            if i == 1 {
                body["temperature"] = json!(0.8);
                body["seed"] = json!(42 + j);
            }
            cases.push(body);
        }
    }
    // One at a time (a batch of one each).
    let alone: Vec<String> =
        cases.iter().map(|b| answer(&post(port, "/v1/completions", b), b["stream"].as_bool().unwrap())).collect();
    assert_ne!(alone[0], alone[1], "the adapter should change the answer");
    let before = metrics(port);
    // All at once, several times over.
    let handles: Vec<_> = (0..3)
        .flat_map(|_| cases.iter().cloned().enumerate())
        .map(|(i, body)| {
            std::thread::spawn(move || (i, answer(&post(port, "/v1/completions", &body), body["stream"] == true)))
        })
        .collect();
    for h in handles {
        let (i, text) = h.join().unwrap();
        assert_eq!(text, alone[i], "request {i} answered differently in a batch");
    }
    let after = metrics(port);
    let delta = |name: &str| after[name] - before[name];
    let steps = delta("tramontane_decode_steps_total");
    let rows = delta("tramontane_decode_step_sequences_total");
    assert!(rows > steps * 1.5, "no batching: {rows} sequences in {steps} steps");
    assert_eq!(after["tramontane_batch_size"], 0.0);
    assert_eq!(after["tramontane_queue_depth"], 0.0);
    assert_eq!(after["tramontane_requests_cancelled_total"], 0.0);
}

/// Reads from a streaming response until `n` SSE `data:` events have arrived.
fn read_events(stream: &mut std::net::TcpStream, n: usize) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < n {
        let k = stream.read(&mut buf).unwrap();
        assert!(k > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..k]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn disconnected_clients_are_cancelled_and_slow_ones_block_nobody() {
    let server = serve();
    let port = server.port;
    let long = |stream: bool| {
        let mut body = completion("base", "Once upon a time", 8000, stream);
        body["ignore_eos"] = json!(true);
        body.to_string()
    };
    let generated = |m: &BTreeMap<String, f64>| m["tramontane_generated_tokens_total"];

    // A streaming client reads two events, then stops reading (but stays connected).
    let mut slow = send(port, "POST", "/v1/completions", &[], long(true).as_bytes());
    let head = read_events(&mut slow, 2);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Others are served meanwhile, in the same batch, on the other model too.
    for model in ["base", "peft"] {
        let reply = post(port, "/v1/completions", &completion(model, "Hello", 5, false));
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["usage"]["completion_tokens"], 5);
    }
    let m = metrics(port);
    assert_eq!(m["tramontane_batch_size"], 1.0, "the slow client's generation runs on");
    assert!(generated(&m) < 8000.0);
    // It disconnects: its generation stops.
    drop(slow);
    wait_for(port, "the streaming cancellation", Duration::from_secs(60), |m| {
        m["tramontane_requests_cancelled_total"] == 1.0 && m["tramontane_batch_size"] == 0.0
    });
    let stopped = generated(&metrics(port));
    assert!(stopped < 8000.0 + 10.0, "{stopped} tokens: the cancelled request ran to its budget");

    // A non-streaming client disconnects while its generation runs.
    let waiting = send(port, "POST", "/v1/completions", &[], long(false).as_bytes());
    wait_for(port, "the non-streaming request to decode", Duration::from_secs(60), |m| {
        m["tramontane_batch_size"] == 1.0 && generated(m) > stopped + 10.0
    });
    waiting.shutdown(Shutdown::Both).unwrap();
    drop(waiting);
    wait_for(port, "the non-streaming cancellation", Duration::from_secs(60), |m| {
        m["tramontane_requests_cancelled_total"] == 2.0 && m["tramontane_batch_size"] == 0.0
    });
    let m = metrics(port);
    let total = generated(&m);
    assert!(total < stopped + 8000.0, "{total} tokens: the cancelled request ran to its budget");
    // Nothing more is generated once they are gone, and cancelled requests are no completions.
    std::thread::sleep(Duration::from_millis(200));
    let later = metrics(port);
    assert_eq!(generated(&later), total);
    assert_eq!(later["tramontane_completion_tokens_total"], 10.0);
    assert_eq!(later["tramontane_request_duration_seconds_count"], 2.0);
    assert_eq!(later["tramontane_time_to_first_token_seconds_count"], 4.0);
    // Still serving.
    assert_eq!(post(port, "/v1/completions", &completion("peft", "Hi", 3, true)).status, 200);
}

#[test]
fn metrics_are_prometheus_text() {
    let server = serve();
    let port = server.port;
    for (model, stream) in [("base", false), ("peft", true), ("base", true)] {
        assert_eq!(post(port, "/v1/completions", &completion(model, "The sea", 4, stream)).status, 200);
    }
    assert_eq!(post(port, "/v1/completions", &completion("nope", "x", 4, false)).status, 404);
    let reply = http(port, "GET", "/metrics", &[], b"");
    assert_eq!(reply.status, 200);
    assert!(reply.head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{}", reply.head);
    // Every sample belongs to a metric declared (HELP, then TYPE) before it; values are numbers.
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = Vec::new();
    let mut samples: Vec<(String, String, f64)> = Vec::new();
    for line in reply.body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert_eq!(helped.last().map(String::as_str), Some(name), "HELP before TYPE: {line}");
            types.insert(name.to_string(), kind.to_string());
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line `{line}`"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value `{line}`"));
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').unwrap_or_else(|| panic!("bad labels `{line}`"))),
                None => (series, ""),
            };
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|k| k == "histogram")))
                .unwrap_or(name);
            let kind = types.get(family).unwrap_or_else(|| panic!("`{line}` has no TYPE"));
            if kind == "counter" {
                assert!(name.ends_with("_total") && value >= 0.0, "{line}");
            }
            samples.push((name.to_string(), labels.to_string(), value));
        }
    }
    let value = |name: &str| samples.iter().find(|s| s.0 == name).map(|s| s.2);
    assert_eq!(value("tramontane_requests_total"), Some(4.0));
    assert_eq!(value("tramontane_request_errors_total"), Some(1.0));
    assert_eq!(value("tramontane_completion_tokens_total"), Some(12.0));
    for name in ["tramontane_queue_depth", "tramontane_batch_size"] {
        assert_eq!(types[name], "gauge");
        assert_eq!(value(name), Some(0.0));
    }
    assert_eq!(types["tramontane_requests_cancelled_total"], "counter");
    // Histograms: increasing bounds ending in +Inf, cumulative counts, +Inf = _count, a _sum.
    for name in ["tramontane_request_duration_seconds", "tramontane_time_to_first_token_seconds"] {
        assert_eq!(types[name], "histogram");
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.0 == format!("{name}_bucket"))
            .map(|s| {
                let le = s.1.strip_prefix("le=\"").and_then(|l| l.strip_suffix('"')).unwrap();
                (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, s.2)
            })
            .collect();
        assert!(buckets.len() >= 5, "{name}: {buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{name}: {buckets:?}");
        assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
        let count = value(&format!("{name}_count")).unwrap();
        assert_eq!(buckets.last().unwrap().1, count);
        assert_eq!(count, 3.0, "{name}: three requests completed");
        let sum = value(&format!("{name}_sum")).unwrap();
        assert!(sum > 0.0 && sum < 600.0, "{name}_sum {sum}");
    }
    assert!(metric(port, "tramontane_decode_steps_total") > 0.0);
}
