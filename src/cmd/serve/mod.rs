//! `tramontane serve`: an OpenAI-compatible HTTP server over one base model and any number of LoRA adapters.
//!
//! Every adapter is a clone of the base [`Model`] (the frozen base tensors are shared, not copied) with the
//! adapter applied, so a request's `model` field picks the base or an adapter.
//!
//! Generation runs on one worker thread ([`worker`]) with continuous batching: requests wait in a FIFO queue and
//! join the running batch at the next decode step (their prompt is prefilled alone); the sequences that use the
//! same model then decode together, ONE forward pass per step for all of them (each keeps its own KV cache,
//! position and RNG, so outputs equal unbatched generation), and leave the batch as soon as they finish. Groups of
//! different models take turns step by step, round-robin. Tokens go to each client through an unbounded channel,
//! so a slow reader never stalls the worker or other clients; a client that disconnects (a dropped stream, or a
//! non-streaming request abandoned) cancels its generation: the sequence leaves the batch at the next step.
//!
//! `/metrics` reports request, token and cancellation counters, the queue depth and batch size, and latency and
//! time-to-first-token histograms in the Prometheus text format.

mod api;
mod metrics;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use trainer::infer::{GenerateRequest, GenerationDefaults, SamplingOverrides, StopReason};
use trainer::model::{Model, ModelTokenizer};

use self::api::{chat_prompt_ids, parse_body, parse_object, read_body, tool_calls_of, ApiError};
use self::metrics::Metrics;
use self::worker::{GenerateJob, Job, Worker, WorkerEvent};
use super::model_args::{ContextNeed, Demand, LoadArgs, ModelArgs};

/// The least context the server starts with (the memory check fails below it).
const MIN_CONTEXT: usize = 512;

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
    /// Dtype, quantization and memory check.
    #[command(flatten)]
    pub load: LoadArgs,
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
    /// Most sequences generating at once (all models together); further requests wait in the queue. Each may
    /// fill the context with its own KV cache: the memory check sizes the context per sequence so that N of
    /// them fit, and when not even the least context fits, it suggests a smaller N.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_batch_size: usize,
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
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
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
    /// vLLM's extension: also return the prompt's and the completion's token ids (non-streaming responses).
    #[serde(default)]
    return_token_ids: bool,
    /// vLLM's extension: keep generating past end-of-sequence tokens (up to `max_tokens`), for benchmarks.
    #[serde(default)]
    ignore_eos: bool,
}

/// Runs `tramontane serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    if args.max_batch_size == 0 {
        bail!("--max-batch-size must be at least 1");
    }
    let base_args = ModelArgs { model: args.model.clone(), adapter: Vec::new(), load: args.load.clone() };
    // The memory check covers --max-batch-size sequences at once, each at the context it chooses (as much as
    // fits for all of them, up to the model's); requests longer than that context are refused.
    let demand = Demand {
        context: ContextNeed::Batch { min: MIN_CONTEXT, sequences: args.max_batch_size },
        extra_adapters: args
            .adapter
            .iter()
            .filter_map(|spec| spec.split_once('=').map(|(_, dir)| PathBuf::from(dir)))
            .collect(),
    };
    let loaded = base_args.load(true, &demand)?;
    let context = loaded.context;
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
    let defaults = GenerationDefaults::load(&args.model).unwrap_or_default();
    let eos_ids =
        if defaults.eos_token_ids.is_empty() { tokenizer.eos_ids.clone() } else { defaults.eos_token_ids.clone() };
    models.insert(base_name, base.clone());
    let encoder = tokenizer.encoder(datasets::PromptFormatChoice::Auto)?;

    let metrics = Arc::new(Metrics::default());
    let (queue, jobs) = mpsc::unbounded_channel::<Job>();
    let worker = Worker::new(models, Arc::clone(&tokenizer), Arc::clone(&metrics), args.max_batch_size);
    std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || worker.run(jobs))
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
        metrics,
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(serve_metrics))
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
            code: Some("invalid_api_key"),
            ..ApiError::invalid("incorrect API key provided", None)
        })
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, code: Some("not_found"), ..ApiError::invalid("no such endpoint", None) }
}

async fn serve_metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
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

/// A validated generation request.
struct Prepared {
    model: String,
    params: CommonParams,
    request: GenerateRequest,
}

/// Serves one completion or chat completion. Dropping this future (the client went away) drops the event
/// receiver, which cancels the generation.
async fn handle(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let Prepared { model, params, request } = prepare(&state, &headers, body, kind).inspect_err(|_| {
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
    })?;
    let prompt_ids = params.return_token_ids.then(|| request.prompt_ids.clone());
    let prompt_tokens = request.prompt_ids.len();
    let (events, mut rx) = mpsc::unbounded_channel();
    state.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    let job = GenerateJob { model: model.clone(), request, events, received: started };
    if state.queue.send(Job::Generate(job)).is_err() {
        state.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::server(StatusCode::SERVICE_UNAVAILABLE, "the generation worker stopped"));
    }
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
            let chunk = |delta: Value, finish: Option<&str>| -> Event {
                let body = match kind {
                    Kind::Chat => {
                        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                    }
                    Kind::Completion => {
                        json!({"id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                            "logprobs": null, "finish_reason": finish}]})
                    }
                };
                Event::default().data(body.to_string())
            };
            if kind == Kind::Chat {
                let _ = tx.send(Ok(chunk(json!({"role": "assistant", "content": ""}), None)));
            }
            loop {
                let event = tokio::select! {
                    // The client went away (axum dropped the stream): returning drops `rx`, which cancels the
                    // generation at the worker's next step.
                    _ = tx.closed() => return,
                    event = rx.recv() => event,
                };
                match event {
                    // With tools the reply may be a tool call: it is sent whole at the end.
                    Some(WorkerEvent::Text(_)) if has_tools => {}
                    Some(WorkerEvent::Text(t)) => {
                        let _ = tx.send(Ok(chunk(json!({"content": t}), None)));
                    }
                    Some(WorkerEvent::Done { text, ids, stop, tool_call }) => {
                        let mut finish = finish_reason(stop);
                        if has_tools {
                            let parsed = tool_call.then(|| tool_calls_of(&state2.encoder, &ids, id_num)).flatten();
                            let delta = match parsed {
                                Some((content, calls)) => {
                                    finish = "tool_calls";
                                    json!({"content": content, "tool_calls": calls})
                                }
                                None => json!({"content": text}),
                            };
                            let _ = tx.send(Ok(chunk(delta, None)));
                        }
                        let _ = tx.send(Ok(chunk(json!({}), Some(finish))));
                        break;
                    }
                    failed => {
                        // The worker failed this request, or stopped altogether.
                        state2.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        let msg = match failed {
                            Some(WorkerEvent::Failed(msg)) => msg,
                            _ => "the generation worker stopped".to_string(),
                        };
                        let err = ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, msg).body();
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

    let (text, ids, stop, tool_call) = loop {
        match rx.recv().await {
            Some(WorkerEvent::Text(_)) => {}
            Some(WorkerEvent::Done { text, ids, stop, tool_call }) => break (text, ids, stop, tool_call),
            Some(WorkerEvent::Failed(msg)) => {
                state.metrics.errors.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, msg));
            }
            None => {
                state.metrics.errors.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "the generation worker stopped"));
            }
        }
    };
    let completion_tokens = ids.len();
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens});
    let mut finish = finish_reason(stop);
    let mut message = json!({"role": "assistant", "content": text});
    if let Some((content, calls)) =
        (has_tools && tool_call).then(|| tool_calls_of(&state.encoder, &ids, id_num)).flatten()
    {
        message = json!({"role": "assistant", "content": content, "tool_calls": calls});
        finish = "tool_calls";
    }
    let mut body = match kind {
        Kind::Chat => json!({"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": null,
                "finish_reason": finish}], "usage": usage}),
        Kind::Completion => json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}], "usage": usage}),
    };
    if let Some(prompt_ids) = prompt_ids {
        body["prompt_token_ids"] = json!(prompt_ids);
        body["choices"][0]["token_ids"] = json!(ids);
    }
    Ok(Json(body).into_response())
}

/// Authenticates, parses and validates a request into what the worker runs.
fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Prepared, ApiError> {
    check_key(state, headers)?;
    let raw = read_body(body)?;
    let value = parse_object(&raw)?;
    let params = CommonParams::deserialize(&value)
        .map_err(|e| ApiError::invalid(format!("invalid request parameters: {e}"), None))?;
    let model = params.model.clone().ok_or_else(|| ApiError::invalid("`model` is required", Some("model")))?;
    let names = state.models.read().map(|m| m.clone()).unwrap_or_default();
    if !names.contains(&model) {
        return Err(ApiError::model_not_found(
            format!("the model `{model}` does not exist; loaded: {}", names.join(", ")),
            "model",
        ));
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
    let stop_strings = match &params.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().filter_map(Value::as_str).map(str::to_string).collect()
        }
        Some(_) => return Err(ApiError::invalid("`stop` must be a string or an array of strings", Some("stop"))),
    };
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
        Kind::Chat => chat_prompt_ids(&state.encoder, &raw)?,
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
    let sampling = state.defaults.sampling().overridden(SamplingOverrides {
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        repetition_penalty: None,
    });
    let seed = params.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        state.next_id.load(Ordering::Relaxed) ^ nanos
    });
    let request = GenerateRequest {
        prompt_ids,
        max_new_tokens: max_tokens as usize,
        sampling,
        seed,
        eos_ids: if params.ignore_eos { Vec::new() } else { state.eos_ids.clone() },
        stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
    };
    Ok(Prepared { model, params, request })
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
            .map_err(|_| ApiError::server(StatusCode::SERVICE_UNAVAILABLE, "the generation worker stopped"))?;
        names.push(name.clone());
    }
    let body = json!({"id": name, "object": "model", "created": now(), "owned_by": "tramontane"});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /v1/adapters/{name}`: stops serving an adapter loaded at start-up or at run time (not the base).
/// Generations already running on it finish.
async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_key(&state, &headers)?;
    let mut names = state.models.write().map_err(|_| ApiError::invalid("server state poisoned", None))?;
    let Some(index) = names.iter().position(|n| *n == name) else {
        return Err(ApiError::model_not_found(format!("the adapter `{name}` does not exist"), "name"));
    };
    if index == 0 {
        return Err(ApiError::invalid("the base model cannot be unloaded", Some("name")));
    }
    names.remove(index);
    let _ = state.queue.send(Job::Unload { name: name.clone() });
    Ok(Json(json!({"id": name, "object": "model", "deleted": true})))
}
