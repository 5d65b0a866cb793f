//! `tramontane serve`: an OpenAI-compatible HTTP server over one base model and any number of LoRA adapters.
//!
//! Every adapter is a clone of the base [`Model`] (the frozen base tensors are shared, not copied) with the
//! adapter applied, so a request's `model` field picks the base or an adapter. Generation runs on a dedicated
//! worker thread fed by a FIFO queue; tokens go to each client through an unbounded channel, so a slow reader
//! never stalls the worker or other clients.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use trainer::infer::{generate, GenerateRequest, GenerationDefaults, SamplingParams, StopReason};
use trainer::model::{Model, ModelTokenizer};

use super::model_args::ModelArgs;

/// Arguments of `tramontane serve`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  tramontane serve --model runs/models/tiny-mixtral\n  \
tramontane serve --model DIR --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter --port 8080 --api-key s3cret")]
pub struct ServeArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a GGUF file.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A PEFT LoRA adapter to serve under a name, as `NAME=DIR` (repeatable); requests select it with `"model": NAME`.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapter: Vec<String>,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    pub dtype: String,
    /// Address to bind (loopback by default; use 0.0.0.0 to expose the server).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 endpoints.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Name under which the base model (no adapter) is served [default: the model directory's name].
    #[arg(long, value_name = "NAME")]
    pub base_name: Option<String>,
    /// Largest accepted request body in bytes.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_body: usize,
}

/// One queued piece of work for the generation thread.
enum Job {
    /// Generate with the named model.
    Generate { model: String, request: GenerateRequest, events: mpsc::UnboundedSender<WorkerEvent> },
    /// Start serving `model` under `name`.
    Load { name: String, model: Box<Model> },
    /// Stop serving `name`.
    Unload { name: String },
}

/// What the worker reports about a job.
enum WorkerEvent {
    /// Newly final text.
    Text(String),
    /// The generation ended, with its full text (equal to `generate --json`'s; the streamed pieces can
    /// differ from it where a byte-fallback sequence decodes differently once complete).
    Done { text: String, completion_tokens: usize, stop: StopReason, tool_call: bool },
    /// The generation failed.
    Failed(String),
}

/// Counters for `/metrics`.
#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    latency_micros: AtomicU64,
}

/// Shared server state.
struct AppState {
    models: std::sync::RwLock<Vec<String>>,
    base: Model,
    tokenizer: Arc<ModelTokenizer>,
    encoder: datasets::Encoder,
    context: usize,
    defaults: GenerationDefaults,
    eos_ids: Vec<u32>,
    api_key: Option<String>,
    queue: mpsc::UnboundedSender<Job>,
    metrics: Metrics,
    next_id: AtomicU64,
}

/// An OpenAI-style error response.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

/// Sampling fields common to both endpoints.
#[derive(Deserialize)]
struct CommonParams {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    seed: Option<u64>,
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    tools: Option<Value>,
    n: Option<u64>,
}

/// Runs `tramontane serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let base_args = ModelArgs { model: args.model.clone(), adapter: Vec::new(), dtype: args.dtype.clone() };
    let loaded = base_args.load(true)?;
    let tokenizer = Arc::new(loaded.tokenizer.context("serving needs tokenizer.json")?);
    let base = loaded.model;
    let base_name = args.base_name.clone().unwrap_or_else(|| {
        args.model.file_name().map_or_else(|| "base".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let mut models: HashMap<String, Model> = HashMap::new();
    let mut names = vec![base_name.clone()];
    for spec in &args.adapter {
        let (name, dir) = spec.split_once('=').with_context(|| format!("--adapter `{spec}`: expected NAME=DIR"))?;
        if name.is_empty() || names.iter().any(|n| n == name) {
            bail!("--adapter `{spec}`: the name is empty or already used");
        }
        let adapter = trainer::lora::peft::load_adapter(std::path::Path::new(dir), &base.config)
            .with_context(|| format!("--adapter {spec}"))?;
        let mut model = base.clone();
        trainer::lora::peft::apply_adapters(&mut model, &[(adapter, 1.0)])?;
        models.insert(name.to_string(), model);
        names.push(name.to_string());
    }
    let context = base.config.max_position_embeddings;
    let defaults = GenerationDefaults::load(&args.model).unwrap_or_default();
    let eos_ids =
        if defaults.eos_token_ids.is_empty() { tokenizer.eos_ids.clone() } else { defaults.eos_token_ids.clone() };
    models.insert(base_name, base.clone());
    let encoder = datasets::Encoder::new(&tokenizer.inner, datasets::PromptFormatChoice::Auto)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let (queue, jobs) = mpsc::unbounded_channel::<Job>();
    let worker_tokenizer = Arc::clone(&tokenizer);
    std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || worker(models, worker_tokenizer, jobs))
        .context("cannot start the generation thread")?;

    let state = Arc::new(AppState {
        models: std::sync::RwLock::new(names),
        base,
        tokenizer,
        encoder,
        context,
        defaults,
        eos_ids,
        api_key: args.api_key.clone(),
        queue,
        metrics: Metrics::default(),
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", axum::routing::delete(unload_adapter))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(args.max_body))
        .with_state(state);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot bind {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app).await.context("server failed")
    })
}

/// The generation thread: runs queued jobs in arrival order.
fn worker(mut models: HashMap<String, Model>, tokenizer: Arc<ModelTokenizer>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.blocking_recv() {
        let (name, request, job_events) = match job {
            Job::Generate { model, request, events } => (model, request, events),
            Job::Load { name, model } => {
                models.insert(name, *model);
                continue;
            }
            Job::Unload { name } => {
                models.remove(&name);
                continue;
            }
        };
        let Some(model) = models.get(&name) else {
            let _ = job_events.send(WorkerEvent::Failed(format!("model `{name}` is not loaded")));
            continue;
        };
        if job_events.is_closed() {
            continue;
        }
        let events = job_events.clone();
        let mut on_text = |piece: &str| {
            if !piece.is_empty() {
                let _ = events.send(WorkerEvent::Text(piece.to_string()));
            }
        };
        let event = match generate(model, Some(&tokenizer), &request, &mut on_text) {
            Ok(g) => {
                let tool_call = tokenizer.inner.token_to_id("[TOOL_CALLS]").is_some_and(|t| g.ids.first() == Some(&t));
                WorkerEvent::Done { text: g.text, completion_tokens: g.ids.len(), stop: g.stop_reason, tool_call }
            }
            Err(e) => WorkerEvent::Failed(e.to_string()),
        };
        let _ = job_events.send(event);
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Length => "length",
        StopReason::Eos | StopReason::StopString => "stop",
    }
}

fn check_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else { return Ok(()) };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given.map(str::trim) == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "incorrect API key provided".into(),
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            param: None,
        })
    }
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".to_string()
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError { status, message, kind: "invalid_request_error", code: None, param: None }
    })?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object", None));
    }
    Ok(value)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        kind: "invalid_request_error",
        code: Some("not_found"),
        param: None,
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    let m = &state.metrics;
    format!(
        "# TYPE tramontane_requests_total counter\ntramontane_requests_total {}\n\
# TYPE tramontane_request_errors_total counter\ntramontane_request_errors_total {}\n\
# TYPE tramontane_prompt_tokens_total counter\ntramontane_prompt_tokens_total {}\n\
# TYPE tramontane_completion_tokens_total counter\ntramontane_completion_tokens_total {}\n\
# TYPE tramontane_generation_seconds_total counter\ntramontane_generation_seconds_total {:.6}\n",
        m.requests.load(Ordering::Relaxed),
        m.errors.load(Ordering::Relaxed),
        m.prompt_tokens.load(Ordering::Relaxed),
        m.completion_tokens.load(Ordering::Relaxed),
        m.latency_micros.load(Ordering::Relaxed) as f64 / 1e6,
    )
}

async fn list_models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check_key(&state, &headers)?;
    let names = state.models.read().map(|m| m.clone()).unwrap_or_default();
    let data: Vec<Value> =
        names.iter().map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "tramontane"})).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Which endpoint a request came through (shapes the responses).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, headers, body, Kind::Completion).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, headers, body, Kind::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

/// Converts OpenAI chat messages into a conversation.
fn conversation(messages: &Value, tools: Option<&Value>) -> Result<datasets::Conversation, ApiError> {
    let list = messages.as_array().ok_or_else(|| ApiError::invalid("`messages` must be an array", Some("messages")))?;
    if list.is_empty() {
        return Err(ApiError::invalid("`messages` must not be empty", Some("messages")));
    }
    let mut conv = datasets::Conversation::default();
    for m in list {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => datasets::Role::System,
            Some("user") => datasets::Role::User,
            Some("assistant") => datasets::Role::Assistant,
            Some("tool") => datasets::Role::Tool,
            other => {
                return Err(ApiError::invalid(format!("unsupported message role {other:?}"), Some("messages")));
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n\n")
            }
            None | Some(Value::Null) => String::new(),
            Some(_) => return Err(ApiError::invalid("message `content` must be a string", Some("messages"))),
        };
        let mut msg = datasets::Message::new(role, content);
        msg.tool_call_id = m.get("tool_call_id").and_then(Value::as_str).map(str::to_string);
        for call in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let function = &call["function"];
            let name = function["name"]
                .as_str()
                .ok_or_else(|| ApiError::invalid("every tool call needs `function.name`", Some("messages")))?;
            let arguments = match &function["arguments"] {
                Value::String(s) if s.trim().is_empty() => datasets::Json::Object(Vec::new()),
                Value::String(s) => datasets::Json::parse(s).unwrap_or_else(|_| datasets::Json::Str(s.clone())),
                Value::Null => datasets::Json::Object(Vec::new()),
                other => datasets::Json::parse(&other.to_string()).unwrap_or(datasets::Json::Null),
            };
            let id = call.get("id").and_then(Value::as_str).map(str::to_string);
            msg.tool_calls.push(datasets::ToolCall { id, name: name.to_string(), arguments });
        }
        conv.messages.push(msg);
    }
    match tools {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for tool in list {
                let function = &tool["function"];
                let name = function["name"]
                    .as_str()
                    .ok_or_else(|| ApiError::invalid("every tool needs `function.name`", Some("tools")))?;
                let parameters = match function.get("parameters") {
                    None | Some(Value::Null) => datasets::Json::Object(Vec::new()),
                    Some(p) => datasets::Json::parse(&p.to_string())
                        .map_err(|e| ApiError::invalid(format!("tool `{name}` parameters: {e}"), Some("tools")))?,
                };
                conv.tools.push(datasets::ToolSpec {
                    name: name.to_string(),
                    description: function["description"].as_str().unwrap_or_default().to_string(),
                    parameters,
                });
            }
        }
        Some(_) => return Err(ApiError::invalid("`tools` must be an array", Some("tools"))),
    }
    Ok(conv)
}

async fn handle(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let result = prepare(&state, &headers, body, kind);
    let (model, params, prompt_ids) = match result {
        Ok(r) => r,
        Err(e) => {
            state.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let max_new_tokens = params.max_completion_tokens.or(params.max_tokens).map_or(16, |m| m as usize);
    let mut sampling: SamplingParams = state.defaults.sampling();
    if let Some(t) = params.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = params.top_p {
        sampling.top_p = p;
    }
    if let Some(k) = params.top_k {
        sampling.top_k = k;
    }
    let stop_strings = match &params.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(_) => return Err(ApiError::invalid("`stop` must be a string or an array of strings", Some("stop"))),
    };
    let seed =
        params.seed.unwrap_or_else(|| state.next_id.load(Ordering::Relaxed) ^ started.elapsed().as_nanos() as u64);
    let prompt_tokens = prompt_ids.len();
    let request = GenerateRequest {
        prompt_ids,
        max_new_tokens,
        sampling,
        seed,
        eos_ids: state.eos_ids.clone(),
        stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
    };
    let (events, mut rx) = mpsc::unbounded_channel();
    state.queue.send(Job::Generate { model: model.clone(), request, events }).map_err(|_| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        ..ApiError::invalid("the generation worker stopped", None)
    })?;
    state.metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let id_num = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{id_num}"),
        Kind::Completion => format!("cmpl-{id_num}"),
    };
    let created = now();

    let has_tools =
        kind == Kind::Chat && params.tools.as_ref().and_then(Value::as_array).is_some_and(|t| !t.is_empty());
    if params.stream {
        let (tx, out) = mpsc::unbounded_channel::<Result<Event, std::convert::Infallible>>();
        let state2 = Arc::clone(&state);
        tokio::spawn(async move {
            let chunk = |delta: Value, finish: Option<&str>| -> Value {
                match kind {
                    Kind::Chat => {
                        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                    }
                    Kind::Completion => {
                        json!({"id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                            "logprobs": null, "finish_reason": finish}]})
                    }
                }
            };
            if kind == Kind::Chat {
                let _ = tx.send(Ok(
                    Event::default().data(chunk(json!({"role": "assistant", "content": ""}), None).to_string())
                ));
            }
            while let Some(ev) = rx.recv().await {
                match ev {
                    // With tools the reply may be a tool call: it is sent whole at the end.
                    WorkerEvent::Text(_) if has_tools => {}
                    WorkerEvent::Text(t) => {
                        let _ = tx.send(Ok(Event::default().data(chunk(json!({"content": t}), None).to_string())));
                    }
                    WorkerEvent::Done { text, completion_tokens, stop, tool_call } => {
                        let m = &state2.metrics;
                        m.completion_tokens.fetch_add(completion_tokens as u64, Ordering::Relaxed);
                        m.latency_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        let mut finish = finish_reason(stop);
                        if has_tools {
                            let delta = match tool_call.then(|| parse_tool_calls(&text, id_num)).flatten() {
                                Some(calls) => {
                                    finish = "tool_calls";
                                    json!({"tool_calls": calls})
                                }
                                None => json!({"content": text}),
                            };
                            let _ = tx.send(Ok(Event::default().data(chunk(delta, None).to_string())));
                        }
                        let _ = tx.send(Ok(Event::default().data(chunk(json!({}), Some(finish)).to_string())));
                        break;
                    }
                    WorkerEvent::Failed(msg) => {
                        state2.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        let err =
                            json!({"error": {"message": msg, "type": "server_error", "param": null, "code": null}});
                        let _ = tx.send(Ok(Event::default().data(err.to_string())));
                        break;
                    }
                }
            }
            let _ = tx.send(Ok(Event::default().data("[DONE]")));
        });
        let stream = futures_util::stream::unfold(out, |mut out| async move { out.recv().await.map(|e| (e, out)) });
        return Ok(Sse::new(stream).into_response());
    }

    let (text, completion_tokens, stop, tool_call) = loop {
        match rx.recv().await {
            Some(WorkerEvent::Text(_)) => {}
            Some(WorkerEvent::Done { text, completion_tokens, stop, tool_call }) => {
                break (text, completion_tokens, stop, tool_call)
            }
            Some(WorkerEvent::Failed(msg)) => {
                state.metrics.errors.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    kind: "server_error",
                    ..ApiError::invalid(msg, None)
                });
            }
            None => {
                return Err(ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    kind: "server_error",
                    ..ApiError::invalid("the generation worker stopped", None)
                })
            }
        }
    };
    state.metrics.completion_tokens.fetch_add(completion_tokens as u64, Ordering::Relaxed);
    state.metrics.latency_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens});
    let mut finish = finish_reason(stop);
    let mut message = json!({"role": "assistant", "content": text});
    if let Some(calls) = (has_tools && tool_call).then(|| parse_tool_calls(&text, id_num)).flatten() {
        message = json!({"role": "assistant", "content": null, "tool_calls": calls});
        finish = "tool_calls";
    }
    let body = match kind {
        Kind::Chat => json!({"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": null,
                "finish_reason": finish}], "usage": usage}),
        Kind::Completion => json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}], "usage": usage}),
    };
    Ok(Json(body).into_response())
}

/// Authenticates, parses and validates a request; returns the model name, the parameters and the prompt ids.
fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<(String, CommonParams, Vec<u32>), ApiError> {
    check_key(state, headers)?;
    let value = parse_body(body)?;
    let params: CommonParams = serde_json::from_value(value.clone())
        .map_err(|e| ApiError::invalid(format!("invalid request parameters: {e}"), None))?;
    let model = params.model.clone().ok_or_else(|| ApiError::invalid("`model` is required", Some("model")))?;
    let names = state.models.read().map(|m| m.clone()).unwrap_or_default();
    if !names.contains(&model) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{model}` does not exist; loaded: {}", names.join(", ")),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
        });
    }
    if let Some(t) = params.temperature {
        if !(0.0..=2.0).contains(&t) || !t.is_finite() {
            return Err(ApiError::invalid(format!("temperature {t} is outside [0, 2]"), Some("temperature")));
        }
    }
    if let Some(p) = params.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(format!("top_p {p} is outside (0, 1]"), Some("top_p")));
        }
    }
    if params.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    let max_tokens = params.max_completion_tokens.or(params.max_tokens).unwrap_or(16);
    if max_tokens < 1 {
        return Err(ApiError::invalid(format!("max_tokens must be at least 1 (got {max_tokens})"), Some("max_tokens")));
    }
    let prompt_ids = match kind {
        Kind::Completion => {
            let prompt = match value.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or("").to_string(),
                Some(_) => return Err(ApiError::invalid("`prompt` must be a string", Some("prompt"))),
                None => return Err(ApiError::invalid("`prompt` is required", Some("prompt"))),
            };
            state.tokenizer.encode(&prompt, true).map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?
        }
        Kind::Chat => {
            let messages =
                value.get("messages").ok_or_else(|| ApiError::invalid("`messages` is required", Some("messages")))?;
            let conv = conversation(messages, value.get("tools"))?;
            state
                .encoder
                .encode_prompt(&conv)
                .map_err(|p| ApiError::invalid(format!("cannot encode the messages: {p}"), Some("messages")))?
        }
    };
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    if prompt_ids.len() as u64 + max_tokens as u64 > state.context as u64 {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                format!(
                    "this model's context is {} tokens; the prompt has {} and max_tokens is {max_tokens}",
                    state.context,
                    prompt_ids.len()
                ),
                Some("max_tokens"),
            )
        });
    }
    Ok((model, params, prompt_ids))
}

fn not_found_model(name: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("the adapter `{name}` does not exist"),
        kind: "invalid_request_error",
        code: Some("model_not_found"),
        param: Some("name"),
    }
}

fn model_exists(name: &str) -> ApiError {
    ApiError {
        status: StatusCode::CONFLICT,
        code: Some("model_exists"),
        ..ApiError::invalid(format!("a model named `{name}` is already served"), Some("name"))
    }
}

/// `POST /v1/adapters {"name": NAME, "path": DIR}`: loads a PEFT adapter and serves it as model `NAME`.
async fn load_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_key(&state, &headers)?;
    let value = parse_body(body)?;
    let name = value.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
    let path = value.get("path").and_then(Value::as_str).unwrap_or_default().to_string();
    if name.is_empty() || path.is_empty() {
        return Err(ApiError::invalid("give the adapter's `name` and `path` (strings)", Some("name")));
    }
    if state.models.read().map(|m| m.contains(&name)).unwrap_or(true) {
        return Err(model_exists(&name));
    }
    let state2 = Arc::clone(&state);
    let model = tokio::task::spawn_blocking(move || -> Result<Model, String> {
        let adapter = trainer::lora::peft::load_adapter(std::path::Path::new(&path), &state2.base.config)
            .map_err(|e| e.to_string())?;
        let mut model = state2.base.clone();
        trainer::lora::peft::apply_adapters(&mut model, &[(adapter, 1.0)]).map_err(|e| e.to_string())?;
        Ok(model)
    })
    .await
    .map_err(|e| ApiError::invalid(format!("loading failed: {e}"), None))?
    .map_err(|e| ApiError::invalid(format!("cannot load the adapter: {e}"), Some("path")))?;
    {
        let mut names = state.models.write().map_err(|_| ApiError::invalid("server state poisoned", None))?;
        if names.contains(&name) {
            return Err(model_exists(&name));
        }
        // Queued before the name becomes visible, so no request can reach the worker ahead of the model.
        state
            .queue
            .send(Job::Load { name: name.clone(), model: Box::new(model) })
            .map_err(|_| ApiError::invalid("the generation worker stopped", None))?;
        names.push(name.clone());
    }
    let body = json!({"id": name, "object": "model", "created": now(), "owned_by": "tramontane"});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /v1/adapters/{name}`: stops serving an adapter loaded at start-up or at run time (not the base).
async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_key(&state, &headers)?;
    let mut names = state.models.write().map_err(|_| ApiError::invalid("server state poisoned", None))?;
    let Some(index) = names.iter().position(|n| *n == name) else { return Err(not_found_model(&name)) };
    if index == 0 {
        return Err(ApiError::invalid("the base model cannot be unloaded", Some("name")));
    }
    names.remove(index);
    let _ = state.queue.send(Job::Unload { name: name.clone() });
    Ok(Json(json!({"id": name, "object": "model", "deleted": true})))
}

/// Parses the payload after `[TOOL_CALLS]` (`[{"name": .., "arguments": {..}}, ..]`) into OpenAI `tool_calls`
/// (arguments as a JSON string, ids `call_<request>_<i>`); `None` when it is not such a list.
fn parse_tool_calls(text: &str, request: u64) -> Option<Vec<Value>> {
    let value: Value = serde_json::from_str(text.trim()).ok()?;
    let list = match value {
        Value::Array(list) => list,
        one @ Value::Object(_) => vec![one],
        _ => return None,
    };
    let mut calls = Vec::with_capacity(list.len());
    for (i, call) in list.iter().enumerate() {
        let name = call.get("name")?.as_str()?;
        let arguments = match call.get("arguments") {
            None | Some(Value::Null) => "{}".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        calls.push(json!({"index": i, "id": format!("call_{request}_{i}"), "type": "function",
            "function": {"name": name, "arguments": arguments}}));
    }
    (!calls.is_empty()).then_some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_payloads_become_openai_tool_calls() {
        let calls = parse_tool_calls(r#" [{"name": "get_weather", "arguments": {"city": "Paris"}}] "#, 7).unwrap();
        assert_eq!(calls[0]["id"], "call_7_0");
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        assert!(parse_tool_calls("Arr, no tools here", 1).is_none());
        assert!(parse_tool_calls("[]", 1).is_none());
        assert!(parse_tool_calls(r#"[{"arguments": {}}]"#, 1).is_none());
    }

    #[test]
    fn openai_messages_and_tools_become_a_conversation() {
        let messages = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "abcdefghi", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "22C"}
        ]);
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let conv = conversation(&messages, Some(&tools)).unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(conv.messages.len(), 4);
        assert_eq!(conv.messages[1].content, "Weather in Paris?");
        assert_eq!(conv.messages[2].tool_calls[0].name, "get_weather");
        assert_eq!(conv.messages[3].tool_call_id.as_deref(), Some("abcdefghi"));
        assert_eq!(conv.tools[0].name, "get_weather");
        assert!(conversation(&json!([]), None).is_err());
        assert!(conversation(&messages, Some(&json!({"not": "a list"}))).is_err());
        assert!(conversation(&json!([{"role": "user", "content": 5}]), None).is_err());
    }
}
