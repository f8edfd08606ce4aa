//! The HTTP server of the viewer (axum on a tokio runtime of its own thread).
//!
//! Routes (`docs/viewer.md`):
//! - `GET /`, `/assets/app.js`, `/assets/style.css`: the page, compiled into the binary;
//! - `GET /api/graphs`: the `*.json` files of the graphs folder, `[{name, bytes}]`;
//! - `GET /api/graphs/{name}`: one graph file, as stored (names are plain file names inside the folder);
//! - `GET /api/features`: the features file's metadata, or 404 without one;
//! - `GET /api/labels`: every feature label, `{"labels": {"{layer}/{feature}": "…"}}` (empty without any);
//! - `GET /api/features/{layer}/{feature}`: one feature's record, with its `label` when labels exist;
//! - `GET /features/{scan}/{index}.json`: the same by circuit-tracer's path (`index` the Cantor id);
//! - `GET /api/intervene`: whether interventions are available (`clt serve --model --transcoder`), with the
//!   transcoder's name and sizes;
//! - `POST /api/intervene`: `{prompt, edits: ["L:P:F=V", ...], mode?, generate?, top?, watch?}` runs
//!   [`crate::attribution::intervene::intervene_and_generate`] and answers `clt intervene --json`'s record;
//! - `POST /api/activations`: `{prompt, features?: ["L:F", ...], top?, all?}` runs
//!   [`crate::attribution::activations::prompt_activations`] and answers `clt activations --json`'s record
//!   (every active feature only with `all`), features labelled;
//! - `POST /save_graph/{slug}`: `{qParams}` (the pinned nodes and supernodes of the page's subgraph) written
//!   into the graph file `{slug}.json`, as circuit-tracer's local server does ([`super::subgraph`]): every id
//!   checked against the graph's nodes, everything else in the file kept byte for byte, the file replaced
//!   atomically.
//!
//! Errors are JSON `{"error": "…"}` with a 4xx/5xx status, so the page can show them.

use super::assets;
use crate::attribution::ReplacementTranscoder;
use crate::attribution::activations::{activations_json, parse_feature, prompt_activations};
use crate::attribution::cli::{intervention_json, load_replacement};
use crate::attribution::intervene::{Edit, Mode, intervene_and_generate};
use crate::features::cli::FEATURES_FILE;
use crate::features::labels::Labels;
use crate::features::{FeatureFile, file::FeaturesMeta};
use crate::model::LoadedModel;
use crate::{Error, Result};
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// What to serve and where.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Folder of graph JSON files.
    pub graphs: PathBuf,
    /// Features directory (holding `features.cltf`, optionally `labels.json`) or the features file itself.
    pub features: Option<PathBuf>,
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// The model and transcoder the page's interventions run with; none: interventions are off.
    pub intervene: Option<InterveneSource>,
}

/// Where the viewer's interventions get their model and transcoder (as `clt intervene` does).
#[derive(Clone, Debug)]
pub struct InterveneSource {
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub transcoder: PathBuf,
}

/// The loaded model and transcoder of [`InterveneSource`].
struct Intervener {
    model: LoadedModel,
    tc: ReplacementTranscoder,
    name: String,
}

struct AppState {
    graphs: PathBuf,
    features: Option<FeatureFile>,
    labels: Labels,
    intervener: Option<Intervener>,
    /// One save at a time (each rewrites a whole file through one temporary name).
    saving: std::sync::Mutex<()>,
}

/// The most tokens one `/api/intervene` request may generate, and the most top logits it may ask for.
const MAX_GENERATE: usize = 256;
const MAX_TOP: usize = 100;

/// A running server; dropping it stops the server and waits for its thread.
pub struct Server {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Blocks until the server stops (it does not on its own: this serves until the process ends).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_features(path: &std::path::Path) -> Result<(FeatureFile, Labels)> {
    let (file, dir) = if path.is_dir() {
        (path.join(FEATURES_FILE), path.to_path_buf())
    } else {
        let dir = path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        (path.to_path_buf(), dir)
    };
    Ok((FeatureFile::open(file)?, Labels::read(&dir)?))
}

/// Binds `host:port` and serves in a background thread.
pub fn start(cfg: &ServeConfig) -> Result<Server> {
    if !cfg.graphs.is_dir() {
        return Err(Error::config(
            "serve.graphs",
            format!("{} is not a directory", cfg.graphs.display()),
        ));
    }
    let (features, labels) = match &cfg.features {
        Some(p) => {
            let (f, l) = open_features(p)?;
            (Some(f), l)
        }
        None => (None, Labels::default()),
    };
    let intervener = match &cfg.intervene {
        Some(src) => {
            let (model, tc, name) =
                load_replacement(&src.model, src.tokenizer.as_deref(), &src.transcoder, None)?;
            Some(Intervener { model, tc, name })
        }
        None => None,
    };
    let state = Arc::new(AppState {
        graphs: cfg.graphs.clone(),
        features,
        labels,
        intervener,
        saving: std::sync::Mutex::new(()),
    });
    let bind_err =
        |e: std::io::Error| Error::config("serve.host", format!("{}:{}: {e}", cfg.host, cfg.port));
    let listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port)).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Unsupported(format!("tokio runtime: {e}")))?;
    let listener = rt
        .block_on(async { tokio::net::TcpListener::from_std(listener) })
        .map_err(bind_err)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(state);
    let thread = std::thread::spawn(move || {
        rt.block_on(async move {
            let stop = async move {
                let _ = rx.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                eprintln!("viewer: server error: {e}");
            }
        });
    });
    Ok(Server {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", assets::APP_JS) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", assets::STYLE_CSS) }),
        )
        .route("/api/graphs", get(list_graphs))
        .route("/api/graphs/{name}", get(graph))
        .route("/api/features", get(features_meta))
        .route("/api/labels", get(labels))
        .route("/api/features/{layer}/{feature}", get(feature))
        .route("/features/{scan}/{file}", get(feature_by_cantor))
        .route("/api/intervene", get(intervene_info).post(intervene_run))
        .route("/api/activations", axum::routing::post(activations_run))
        .route("/save_graph/{slug}", axum::routing::post(save_graph))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .with_state(state)
}

/// The page may load only its own assets and talk only to this server.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'";

fn asset(mime: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn index() -> Response {
    let mut r = asset("text/html; charset=utf-8", assets::INDEX_HTML);
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": msg }))).into_response()
}

fn json_bytes(bytes: Vec<u8>) -> Response {
    let mut r = bytes.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            StatusCode::NOT_FOUND
        }
        Error::InvalidData { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn list_graphs(State(s): State<Arc<AppState>>) -> Response {
    let dir = s.graphs.clone();
    let listed = tokio::task::spawn_blocking(move || -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
            if is_file && name.ends_with(".json") && !name.starts_with('.') {
                let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(serde_json::json!({ "name": name, "bytes": bytes }));
            }
        }
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(out)
    })
    .await;
    match listed {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => error(status_of(&e), e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn graph(State(s): State<Arc<AppState>>, UrlPath(name): UrlPath<String>) -> Response {
    let read = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let path = super::paths::resolve(&s.graphs, &name)?;
        std::fs::read(&path).map_err(|e| Error::io(&path, e))
    })
    .await;
    match read {
        Ok(Ok(bytes)) => json_bytes(bytes),
        // Do not echo server paths: the name the client sent is enough.
        Ok(Err(e)) => error(status_of(&e), short(&e)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The body of `POST /save_graph/{slug}` (circuit-tracer's frontend sends more; only `qParams` is read).
#[derive(serde::Deserialize)]
struct SaveRequest {
    #[serde(rename = "qParams")]
    q_params: serde_json::Value,
}

async fn save_graph(
    State(s): State<Arc<AppState>>,
    UrlPath(slug): UrlPath<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    // The one route that writes: it takes JSON only, which a page of another site cannot send here without
    // the browser asking this server first (CORS), and this server allows no other origin.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a save is a JSON body sent as Content-Type: application/json".into(),
        );
    }
    let req: SaveRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
    };
    let name = format!("{slug}.json");
    let file = name.clone();
    let saved = tokio::task::spawn_blocking(move || -> Result<serde_json::Value> {
        let name = file;
        let path = super::paths::resolve(&s.graphs, &name)?;
        let _one = s.saving.lock().unwrap_or_else(|p| p.into_inner());
        let (pinned, supernodes) = super::subgraph::save_qparams(&path, &name, &req.q_params)?;
        Ok(serde_json::json!({ "saved": name, "pinned": pinned, "supernodes": supernodes }))
    })
    .await;
    match saved {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        // Not found, or not writable (a read-only folder): named without the server's paths.
        Ok(Err(Error::Io { source, .. })) if source.kind() == std::io::ErrorKind::NotFound => {
            error(StatusCode::NOT_FOUND, format!("graph {name} not found"))
        }
        Ok(Err(Error::Io { source, .. })) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not save {name}: {source}"),
        ),
        Ok(Err(e)) => error(status_of(&e), e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn short(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => format!("graph not found ({source})"),
        other => other.to_string(),
    }
}

async fn labels(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(&s.labels).into_response()
}

async fn features_meta(State(s): State<Arc<AppState>>) -> Response {
    match &s.features {
        Some(f) => {
            let meta: &FeaturesMeta = f.meta();
            axum::Json(serde_json::json!({
                "meta": meta,
                "n_labels": s.labels.labels.len(),
            }))
            .into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "the server was started without --features".into(),
        ),
    }
}

/// circuit-tracer's frontend path: `/features/{scan}/{cantor id}.json`.
async fn feature_by_cantor(
    state: State<Arc<AppState>>,
    UrlPath((scan, file)): UrlPath<(String, String)>,
) -> Response {
    let same_scan = state
        .features
        .as_ref()
        .is_some_and(|f| f.meta().scan == scan);
    let id = file
        .strip_suffix(".json")
        .and_then(|z| z.parse::<u64>().ok());
    match (same_scan, id.and_then(crate::features::record::uncantor)) {
        (true, Some((l, f))) => feature(state, UrlPath((l as usize, f as usize))).await,
        (false, _) => error(
            StatusCode::NOT_FOUND,
            format!("no features for scan {scan:?}"),
        ),
        (true, None) => error(
            StatusCode::NOT_FOUND,
            format!("{file:?} is not a feature id"),
        ),
    }
}

async fn feature(
    State(s): State<Arc<AppState>>,
    UrlPath((layer, feat)): UrlPath<(usize, usize)>,
) -> Response {
    let read = tokio::task::spawn_blocking(move || -> Result<Option<serde_json::Value>> {
        let Some(f) = &s.features else {
            return Ok(None);
        };
        let bytes = f.json(layer, feat)?;
        let mut v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                path: f.path().to_path_buf(),
                block: (layer * f.n_features() + feat) as u64,
                offset: 0,
                reason: format!("bad record JSON: {e}"),
            })?;
        if let (Some(label), Some(obj)) = (s.labels.get(layer, feat), v.as_object_mut()) {
            obj.insert("label".into(), label.into());
        }
        Ok(Some(v))
    })
    .await;
    match read {
        Ok(Ok(Some(v))) => axum::Json(v).into_response(),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            "the server was started without --features".into(),
        ),
        Ok(Err(e @ Error::InvalidData { .. })) => error(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(e)) => error(status_of(&e), e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn intervene_info(State(s): State<Arc<AppState>>) -> Response {
    let v = match &s.intervener {
        Some(iv) => serde_json::json!({
            "available": true,
            "transcoder": iv.name,
            "architecture": iv.model.model.architecture(),
            "n_layers": iv.tc.cfg.n_layers,
            "n_features": iv.tc.cfg.n_features,
            "max_generate": MAX_GENERATE,
        }),
        None => serde_json::json!({ "available": false }),
    };
    axum::Json(v).into_response()
}

/// The body of `POST /api/intervene`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InterveneRequest {
    prompt: String,
    edits: Vec<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    generate: usize,
    #[serde(default)]
    top: Option<usize>,
    /// Tokens whose probability to report (`#ID` or one-token texts).
    #[serde(default)]
    watch: Vec<String>,
}

async fn intervene_run(State(s): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    with_model(s, body, |iv, _, req: InterveneRequest| {
        let mode = match &req.mode {
            None => Mode::default(),
            Some(m) => <Mode as clap::ValueEnum>::from_str(m, true).map_err(|_| {
                Error::config(
                    "mode",
                    format!("unknown mode {m:?} (frozen-attention, live, replacement, direct)"),
                )
            })?,
        };
        if req.generate > MAX_GENERATE {
            return Err(Error::config(
                "generate",
                format!("{} tokens asked for; at most {MAX_GENERATE}", req.generate),
            ));
        }
        let top = req.top.unwrap_or(5).clamp(1, MAX_TOP);
        let edits: Vec<Edit> = req.edits.iter().map(|e| e.parse()).collect::<Result<_>>()?;
        let (m, tok) = (&iv.model.model, &iv.model.tokenizer);
        let watch: Vec<u32> = req
            .watch
            .iter()
            .map(|w| tok.single_token(w))
            .collect::<Result<_>>()?;
        let tokens = tok.encode_prompt(&req.prompt)?;
        let r = intervene_and_generate(m, &iv.tc, &tokens, &edits, mode, req.generate, tok.eos())?;
        Ok(intervention_json(
            tok, &tokens, mode, &req.edits, top, &watch, &r,
        ))
    })
    .await
}

/// The body of `POST /api/activations`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivationsRequest {
    prompt: String,
    /// Features to trace over every position (`"L:F"`).
    #[serde(default)]
    features: Vec<String>,
    /// The strongest features listed per position (default 5; 0 lists none).
    #[serde(default)]
    top: Option<usize>,
    /// Every active feature too.
    #[serde(default)]
    all: bool,
}

async fn activations_run(State(s): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    with_model(s, body, |iv, labels, req: ActivationsRequest| {
        let top = req.top.unwrap_or(5).min(MAX_TOP);
        let watch: Vec<(usize, usize)> = req
            .features
            .iter()
            .map(|f| parse_feature(f, &iv.tc))
            .collect::<Result<_>>()?;
        let (m, tok) = (&iv.model.model, &iv.model.tokenizer);
        let tokens = tok.encode_prompt(&req.prompt)?;
        let pa = prompt_activations(m, &iv.tc, &tokens, &watch)?;
        Ok(activations_json(tok, &pa, top, Some(labels), req.all))
    })
    .await
}

/// Runs `f` with the server's model and transcoder and the labels on the request `body` (JSON of `R`),
/// off the async threads: 404 without a model, 400 for a bad body and for every error but the machine's.
async fn with_model<R, F>(s: Arc<AppState>, body: axum::body::Bytes, f: F) -> Response
where
    R: serde::de::DeserializeOwned + Send + 'static,
    F: FnOnce(&Intervener, &Labels, R) -> Result<serde_json::Value> + Send + 'static,
{
    if s.intervener.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "the server was started without --model and --transcoder: no model to run".into(),
        );
    }
    let req: R = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
    };
    let run = tokio::task::spawn_blocking(move || match &s.intervener {
        Some(iv) => f(iv, &s.labels, req),
        None => Err(Error::Unsupported("no model".into())),
    })
    .await;
    match run {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        // Everything but a failure of the machine comes from the request.
        Ok(Err(e @ (Error::Io { .. } | Error::Cuda { .. }))) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
