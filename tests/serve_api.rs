//! `tramontane serve` end to end over loopback: the OpenAI endpoints, per-request adapters equal to
//! `generate --adapter`, OpenAI-style 4xx errors, the API key, and a bounded 64-client streaming load test (whose
//! answers, decoded in shared batches, must equal each adapter's answer alone).

mod serve_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::{bin, http, metrics, post, streamed_text, Reply, Server};

/// The bundled model and three adapters (checkpoints of one short quickstart run), made once per test binary.
struct Fixture {
    model: PathBuf,
    adapters: Vec<(String, PathBuf)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve_api");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml");
        let mut args = vec!["train".to_string(), recipe.display().to_string()];
        for set in [
            format!("model.path={}", root.join("model").display()),
            format!("output.dir={}", root.join("run").display()),
            "train.max_steps=30".to_string(),
            "output.save_every_steps=10".to_string(),
            "output.keep_last=100".to_string(),
            "eval.every_steps=0".to_string(),
        ] {
            args.extend(["--set".to_string(), set]);
        }
        let out = Command::new(bin()).args(&args).output().expect("binary runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let run = root.join("run");
        let adapters = vec![
            ("step10".to_string(), run.join("adapters/step-00000010")),
            ("step20".to_string(), run.join("adapters/step-00000020")),
            ("final".to_string(), run.join("adapter")),
        ];
        for (_, dir) in &adapters {
            assert!(dir.join("adapter_config.json").exists(), "{} missing", dir.display());
        }
        Fixture { model: root.join("model"), adapters }
    })
}

fn start(extra: &[&str]) -> Server {
    let fx = fixture();
    let mut args: Vec<String> = vec!["--base-name".into(), "base".into()];
    for (name, dir) in &fx.adapters {
        args.push("--adapter".into());
        args.push(format!("{name}={}", dir.display()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    serve_common::start(&fx.model, &args)
}

/// `generate`'s greedy output: the `--json` text, and the streamed stdout (they differ only where a byte-fallback
/// sequence decodes differently once complete).
fn generate_cli(adapter: Option<&Path>, flag: &str, input: &str, max: usize) -> (String, String) {
    (generate_once(adapter, flag, input, max, true), generate_once(adapter, flag, input, max, false))
}

fn generate_once(adapter: Option<&Path>, flag: &str, input: &str, max: usize, json: bool) -> String {
    let fx = fixture();
    let mut cmd = Command::new(bin());
    cmd.args(["generate", "--model"]).arg(&fx.model);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    cmd.args([flag, input, "--temperature", "0", "--max-new-tokens", &max.to_string()]);
    if !json {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        return text.strip_suffix('\n').unwrap_or(&text).to_string();
    }
    cmd.arg("--json");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

fn chat_body(model: &str, question: &str, max: usize, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
        "max_tokens": max, "stream": stream})
}

#[test]
fn endpoints_match_generate_per_adapter() {
    let fx = fixture();
    let server = start(&[]);
    let port = server.port;
    let health = http(port, "GET", "/health", &[], b"");
    assert_eq!(health.status, 200);
    let models = http(port, "GET", "/v1/models", &[], b"").json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "step10", "step20", "final"]);

    let question = "What color is the sky?";
    let mut answers = Vec::new();
    for (name, dir) in [("base", None)].into_iter().chain(fx.adapters.iter().map(|(n, d)| (n.as_str(), Some(d)))) {
        let (expected, expected_stream) = generate_cli(dir.map(PathBuf::as_path), "--chat", question, 16);
        let reply = post(port, "/v1/chat/completions", &chat_body(name, question, 16, false));
        assert_eq!(reply.status, 200, "{}", reply.body);
        let v = reply.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], name);
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), expected, "chat via {name}");
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
        let streamed = post(port, "/v1/chat/completions", &chat_body(name, question, 16, true));
        assert_eq!(streamed.status, 200);
        assert_eq!(streamed_text(&streamed.body), expected_stream, "streamed chat via {name}");

        let prompt = "The colour of the sea";
        let (expected, expected_stream) = generate_cli(dir.map(PathBuf::as_path), "--prompt", prompt, 8);
        let body = json!({"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0});
        let v = post(port, "/v1/completions", &body).json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), expected, "completion via {name}");
        let mut body = body;
        body["stream"] = json!(true);
        assert_eq!(streamed_text(&post(port, "/v1/completions", &body).body), expected_stream);
        answers.push(expected);
    }
    // The adapters really change the output.
    assert_ne!(answers[0], answers[3], "the final adapter should differ from the base");
    let metrics = http(port, "GET", "/metrics", &[], b"");
    assert!(metrics.body.contains("tramontane_requests_total 16"), "{}", metrics.body);
}

#[test]
fn bad_requests_are_openai_errors() {
    let server = start(&["--api-key", "sekret", "--max-body", "4096"]);
    let port = server.port;
    let auth = [("Authorization", "Bearer sekret")];
    let check = |reply: Reply, status: u16, needle: &str| {
        assert_eq!(reply.status, status, "{}", reply.body);
        let v = reply.json();
        let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {v}"));
        assert!(message.contains(needle), "`{message}` lacks `{needle}`");
        assert!(v["error"]["type"].is_string());
    };
    let ok = chat_body("final", "hi", 4, false);
    // Wrong or missing key.
    check(http(port, "POST", "/v1/chat/completions", &[], ok.to_string().as_bytes()), 401, "API key");
    let wrong = [("Authorization", "Bearer nope")];
    check(http(port, "GET", "/v1/models", &wrong, b""), 401, "API key");
    // Health needs no key; a good key works.
    assert_eq!(http(port, "GET", "/health", &[], b"").status, 200);
    assert_eq!(http(port, "POST", "/v1/chat/completions", &auth, ok.to_string().as_bytes()).status, 200);
    let send = |body: &[u8]| http(port, "POST", "/v1/chat/completions", &auth, body);
    let send_json = |v: Value| send(v.to_string().as_bytes());
    check(send(b"{\"model\": \"final\", "), 400, "not valid JSON");
    check(send(b"[1, 2]"), 400, "JSON object");
    check(send_json(chat_body("nope", "hi", 4, false)), 404, "does not exist");
    check(send_json(chat_body("final", "hi", 100_000, false)), 400, "context");
    check(send_json(chat_body("final", "hi", 0, false)), 400, "max_tokens");
    let mut negative = chat_body("final", "hi", 4, false);
    negative["temperature"] = json!(-0.5);
    check(send_json(negative), 400, "temperature");
    check(send_json(json!({"model": "final", "messages": []})), 400, "must not be empty");
    check(send_json(json!({"model": "final"})), 400, "`messages` is required");
    check(send_json(json!({"model": "final", "messages": [{"role": "wizard", "content": "x"}]})), 400, "role");
    check(send_json(json!({"model": "final", "max_tokens": "many", "messages": [] })), 400, "invalid");
    let big = json!({"model": "final", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    check(send_json(big), 413, "too large");
    let completion = |v: Value| http(port, "POST", "/v1/completions", &auth, v.to_string().as_bytes());
    check(completion(json!({"model": "base"})), 400, "`prompt` is required");
    check(completion(json!({"model": "base", "prompt": "hi", "max_tokens": 600})), 400, "context");
    check(http(port, "GET", "/v1/nothing", &auth, b""), 404, "no such endpoint");
    // Still serving after all that.
    assert_eq!(http(port, "POST", "/v1/chat/completions", &auth, ok.to_string().as_bytes()).status, 200);
}

/// 64 concurrent streaming clients spread over `adapters`, each answer checked; prints requests/s, p50/p99 latency
/// and the mean decode batch; returns the decode steps and the sequences they advanced.
fn load(port: u16, adapters: &[(String, String)], question: &str, max: usize, label: &str) -> (f64, f64) {
    let clients = 64;
    let before = metrics(port);
    let start_all = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (name, want) = adapters[i % adapters.len()].clone();
            let question = question.to_string();
            std::thread::spawn(move || {
                let t = Instant::now();
                let reply = post(port, "/v1/chat/completions", &chat_body(&name, &question, max, true));
                assert_eq!(reply.status, 200, "{}", reply.body);
                assert_eq!(streamed_text(&reply.body), want, "client {i} on {name}");
                t.elapsed()
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = handles.into_iter().map(|h| h.join().expect("client ok")).collect();
    let wall = start_all.elapsed();
    let after = metrics(port);
    let delta = |name: &str| after[name] - before[name];
    let (steps, rows) = (delta("tramontane_decode_steps_total"), delta("tramontane_decode_step_sequences_total"));
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1];
    println!(
        "load test ({label}): {clients} streaming clients over {} adapters, {max} tokens each: {:.1} requests/s, \
         p50 {:.0} ms, p99 {:.0} ms, wall {:.2} s; {steps} decode steps, mean batch {:.1}",
        adapters.len(),
        clients as f64 / wall.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        wall.as_secs_f64(),
        rows / steps.max(1.0),
    );
    assert!(wall < Duration::from_secs(240), "the load test is bounded");
    assert_eq!(after["tramontane_requests_cancelled_total"], 0.0);
    let first_tokens = delta("tramontane_time_to_first_token_seconds_count");
    assert_eq!(first_tokens, clients as f64, "every request produced a first token");
    (steps, rows)
}

#[test]
fn load_test_64_streaming_clients_across_3_adapters() {
    let fx = fixture();
    let question = "Tell me the color of the grass.";
    let max = 8;
    // Unbatched (one sequence at a time, FIFO) for comparison, then continuous batching.
    let mut expected = Vec::new();
    for (label, args) in [("one at a time", &["--max-batch-size", "1"][..]), ("batched", &[][..])] {
        let server = start(args);
        if expected.is_empty() {
            for (name, _) in &fx.adapters {
                let reply = post(server.port, "/v1/chat/completions", &chat_body(name, question, max, true));
                expected.push((name.clone(), streamed_text(&reply.body)));
            }
        }
        let (steps, rows) = load(server.port, &expected, question, max, label);
        if args.is_empty() {
            // The clients' sequences shared decode steps (not one forward per token).
            assert!(rows > 2.0 * steps, "{rows} sequences in {steps} steps");
        } else {
            assert_eq!(rows, steps, "--max-batch-size 1 decodes one sequence per step");
        }
    }
}

#[test]
fn adapters_load_and_unload_at_run_time() {
    let fx = fixture();
    let server = start(&[]);
    let port = server.port;
    let (_, step10) = &fx.adapters[0];
    let question = "What color is the sky?";
    let expected = generate_cli(Some(step10), "--chat", question, 12).0;
    let delete = |name: &str| http(port, "DELETE", &format!("/v1/adapters/{name}"), &[], b"");
    let deleted = delete("step10");
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["deleted"], true);
    assert_eq!(post(port, "/v1/chat/completions", &chat_body("step10", question, 12, false)).status, 404);
    assert_eq!(delete("step10").status, 404);
    assert_eq!(delete("base").status, 400);
    let load = |name: &str, path: &str| post(port, "/v1/adapters", &json!({"name": name, "path": path}));
    let loaded = load("again", &step10.display().to_string());
    assert_eq!(loaded.status, 201, "{}", loaded.body);
    assert_eq!(load("again", &step10.display().to_string()).status, 409);
    assert_eq!(load("final", &step10.display().to_string()).status, 409);
    let bad = load("bad", "/does/not/exist");
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.json()["error"]["message"].is_string());
    assert_eq!(post(port, "/v1/adapters", &json!({"name": "x"})).status, 400);
    let models = http(port, "GET", "/v1/models", &[], b"").json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "step20", "final", "again"]);
    let v = post(port, "/v1/chat/completions", &chat_body("again", question, 12, false)).json();
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), expected);
}
