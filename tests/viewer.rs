//! The viewer end to end: feature dashboards computed from a real store (stories260K activations, a small
//! random transcoder), served by `clt serve`'s server, and driven in headless Chromium through WebDriver.
//!
//! The browser test needs Debian's `chromium` and `chromium-driver`; `scripts/install-browser.sh` installs them
//! (scripts/test.sh calls it). Without them it fails, naming that script.

use clt::attribution::cli::{AttributeArgs, Inputs, ModelArgs};
use clt::cache::{CacheConfig, InputHook, cache};
use clt::clt::checkpoint::save_transcoder;
use clt::clt::{Activation, CltConfig, DecoderKind, NormScales, Params, Transcoder};
use clt::features::FeatureFile;
use clt::features::cli::{FEATURES_FILE, FeaturesArgs};
use clt::rng::Rng;
use clt::viewer::{InterveneSource, ServeConfig, Server};
use fantoccini::{ClientBuilder, Locator};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

struct Fixture {
    graphs: PathBuf,
    features: PathBuf,
    transcoder: PathBuf,
    model: PathBuf,
}

/// The graph `clt attribute` writes in the fixture (the random transcoder on a TinyStories prompt).
const ATTRIBUTED: &str = "attributed.json";
/// Its prompt: long enough for a graph of thousands of nodes and tens of thousands of edges.
const PROMPT: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside \
in the park with her friends. One day, she saw a big red ball under a tree";

/// Builds once per test binary: a store of stories260K activations, a random CLT, its features file, and a
/// graphs folder holding the fixture graphs.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let shared = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared"));
        assert!(
            shared.is_dir(),
            "{} is missing: the viewer tests need stories260K",
            shared.display()
        );
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("viewer-test");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let m = clt::model::load(&shared.join("models/stories260K/stories260K.bin"), None).unwrap();
        let store = root.join("store");
        cache(
            &m,
            &CacheConfig {
                corpus: vec![shared.join("corpus/tinystories_valid_head.txt")],
                column: None,
                skip_documents: 0,
                out: store.clone(),
                context: 64,
                max_tokens: Some(3000),
                input_hook: InputHook::MlpInNormed,
                codec: clt::store::Codec::F32,
                target_rel_err: None,
                shard_tokens: 1000,
                contexts_per_batch: 16,
                quiet: true,
            },
        )
        .unwrap();
        let cfg = CltConfig {
            n_layers: 5,
            d_model: 64,
            n_features: 40,
            decoder: DecoderKind::CrossLayer,
            activation: Activation::JumpRelu,
            skip: false,
        };
        let mut rng = Rng::seed(3);
        let params = Params::init(&cfg, 0.05, &mut rng);
        let t = Transcoder {
            norms: NormScales::identity(cfg.n_layers),
            cfg,
            params,
        };
        let tdir = root.join("transcoder");
        save_transcoder(&tdir, &t).unwrap();
        let features = root.join("features");
        clt::features::cli::run(&FeaturesArgs {
            transcoder: tdir.clone(),
            store,
            out: features.clone(),
            model: None, // from the store's cache.json
            tokenizer: None,
            top_k: 5,
            samples: 6,
            before: 8,
            after: 3,
            logits: 5,
            max_tokens: None,
            chunk_tokens: 700,
            scan: Some("test-scan".into()),
            json: true,
            quiet: true,
        })
        .unwrap();
        let graphs = root.join("graphs");
        std::fs::create_dir_all(&graphs).unwrap();
        clt::attribution::cli::run_attribute(&AttributeArgs {
            inputs: Inputs {
                source: ModelArgs {
                    model: shared.join("models/stories260K/stories260K.bin"),
                    tokenizer: None,
                    transcoder: tdir.clone(),
                    input_hook: Some(InputHook::MlpInNormed),
                },
                prompt: Some(PROMPT.into()),
                prompt_file: None,
            },
            out: graphs.join(ATTRIBUTED),
            slug: None,
            prompts: None,
            max_n_logits: 10,
            desired_logit_prob: 0.95,
            max_feature_nodes: 7500,
            batch_size: 512,
            update_interval: 4,
            node_threshold: 0.99,
            edge_threshold: 0.995,
            quiet: true,
            targets: Vec::new(),
            versus: Vec::new(),
        })
        .unwrap();
        for name in ["graph-small.json", "graph-malformed.json"] {
            std::fs::copy(Path::new(FIXTURES).join(name), graphs.join(name)).unwrap();
        }
        std::fs::write(root.join("secret.json"), "{\"secret\": true}").unwrap();
        Fixture {
            graphs,
            features,
            transcoder: tdir,
            model: shared.join("models/stories260K/stories260K.bin"),
        }
    })
}

fn serve() -> Server {
    let f = fixture();
    clt::viewer::start(&ServeConfig {
        graphs: f.graphs.clone(),
        features: Some(f.features.clone()),
        host: "127.0.0.1".into(),
        port: 0,
        intervene: None,
    })
    .unwrap()
}

/// Sends one raw HTTP/1.1 request (no client-side path normalisation) and reads the answer until the
/// server closes: status and body.
fn exchange(server: &Server, request: &str, timeout: Duration) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A raw HTTP/1.1 GET: status and body.
fn get(server: &Server, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    exchange(server, &request, Duration::from_secs(10))
}

/// The fixture's model and transcoder, for the viewer's interventions.
fn intervene_source() -> InterveneSource {
    let f = fixture();
    InterveneSource {
        model: f.model.clone(),
        tokenizer: None,
        transcoder: f.transcoder.clone(),
    }
}

/// A raw HTTP/1.1 POST of a JSON body: status and body.
fn post(server: &Server, path: &str, body: &str) -> (u16, String) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(server, &request, Duration::from_secs(60))
}

/// `POST /api/intervene` answers what `clt intervene` computes for the same prompt and edits; bad requests
/// are 400s that say what is wrong; a server without the model has no interventions.
#[test]
fn the_intervention_and_activations_apis_run_their_commands() {
    let f = fixture();
    let plain = serve();
    let (status, body) = get(&plain, "/api/intervene");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"available":false}"#);
    let (status, body) = post(&plain, "/api/intervene", r#"{"prompt":"x","edits":[]}"#);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("--model"), "{body}");
    drop(plain);

    let server = clt::viewer::start(&ServeConfig {
        graphs: f.graphs.clone(),
        features: None,
        host: "127.0.0.1".into(),
        port: 0,
        intervene: Some(intervene_source()),
    })
    .unwrap();
    let (status, body) = get(&server, "/api/intervene");
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["available"], true);
    assert_eq!(info["n_layers"], 5);
    assert_eq!(info["n_features"], 40);

    let edits = ["1:*:3=4.0", "0:2:5*=-1"];
    let req = serde_json::json!({
        "prompt": PROMPT, "edits": edits, "mode": "live", "generate": 6, "top": 4, "watch": ["#426"]
    });
    let (status, body) = post(&server, "/api/intervene", &req.to_string());
    assert_eq!(status, 200, "{body}");
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The library on the same inputs.
    let (m, tc, _) =
        clt::attribution::cli::load_replacement(&f.model, None, &f.transcoder, None).unwrap();
    let tokens = m.tokenizer.encode_prompt(PROMPT).unwrap();
    let parsed: Vec<clt::attribution::intervene::Edit> =
        edits.iter().map(|e| e.parse().unwrap()).collect();
    let mode = clt::attribution::intervene::Mode::Live;
    let r = clt::attribution::intervene::intervene_and_generate(
        &m.model,
        &tc,
        &tokens,
        &parsed,
        mode,
        6,
        m.tokenizer.eos(),
    )
    .unwrap();
    let edits: Vec<String> = edits.iter().map(|e| e.to_string()).collect();
    let want = clt::attribution::cli::intervention_json(
        &m.tokenizer,
        &tokens,
        mode,
        &edits,
        4,
        &[426],
        &r,
    );
    // (through text, as the server's answer went: f32s print as their shortest decimals)
    let want: serde_json::Value = serde_json::from_str(&want.to_string()).unwrap();
    assert_eq!(got, want);
    assert_eq!(got["mode"], "live");
    assert_eq!(got["top"].as_array().unwrap().len(), 4);
    assert_eq!(got["continuation"]["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(got["watch"][0]["token"], 426);

    for (body, says) in [
        (r#"{"prompt":"x","edits":["1:2"]}"#.to_string(), "1:2"),
        (
            r#"{"prompt":"x","edits":[],"mode":"sideways"}"#.to_string(),
            "sideways",
        ),
        (
            r#"{"prompt":"x","edits":[],"generate":100000}"#.to_string(),
            "at most",
        ),
        (
            r#"{"prompt":"x","edits":["9:1:0=1"]}"#.to_string(),
            "outside the transcoder",
        ),
        (
            r#"{"prompt":"x","edits":["0:40:0=1"]}"#.to_string(),
            "position 40",
        ),
        (r#"{"edits":[]}"#.to_string(), "prompt"),
        (
            r##"{"prompt":"x","edits":[],"watch":["#99999"]}"##.to_string(),
            "outside the vocabulary",
        ),
        ("not json".to_string(), "bad request"),
    ] {
        let (status, text) = post(&server, "/api/intervene", &body);
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(says), "{body}: {text}");
    }

    // `/api/activations` is `clt activations --json`'s record, every feature only when asked.
    let req =
        serde_json::json!({"prompt": PROMPT, "features": ["2:7", "0:39"], "top": 3, "all": true});
    let (status, body) = post(&server, "/api/activations", &req.to_string());
    assert_eq!(status, 200, "{body}");
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pa = clt::attribution::activations::prompt_activations(
        &m.model,
        &tc,
        &tokens,
        &[(2, 7), (0, 39)],
    )
    .unwrap();
    let want = clt::attribution::activations::activations_json(
        &m.tokenizer,
        &pa,
        3,
        Some(&Default::default()),
        true,
    );
    let want: serde_json::Value = serde_json::from_str(&want.to_string()).unwrap();
    assert_eq!(got, want);
    assert_eq!(got["traces"].as_array().unwrap().len(), 2);
    assert_eq!(
        got["active"]["feature"].as_array().unwrap().len(),
        pa.features.len()
    );
    let (status, body) = post(
        &server,
        "/api/activations",
        &format!(r#"{{"prompt":{PROMPT:?}}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(got.get("active").is_none(), "{got}");
    assert_eq!(
        got["top"][1].as_array().unwrap().len(),
        pa.top_at(1, 5).len()
    );
    for (body, says) in [
        (r#"{"prompt":"x","features":["5:0"]}"#, "5 layers"),
        (r#"{"prompt":"x","features":["0:40"]}"#, "40 features"),
        (r#"{"prompt":"x","features":["07"]}"#, "LAYER:FEATURE"),
        (r#"{"prompt":"x","top":"many"}"#, "bad request"),
        (r#"{"features":[]}"#, "prompt"),
    ] {
        let (status, text) = post(&server, "/api/activations", body);
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(says), "{body}: {text}");
    }
    drop(server);
    let plain = serve();
    let (status, body) = post(&plain, "/api/activations", r#"{"prompt":"x"}"#);
    assert_eq!(status, 404, "{body}");
}

#[test]
fn features_file_holds_real_contexts_and_logit_effects() {
    let f = fixture();
    let file = FeatureFile::open(f.features.join(FEATURES_FILE)).unwrap();
    assert_eq!((file.n_layers(), file.n_features()), (5, 40));
    assert_eq!(file.meta().n_tokens, 3000);
    assert_eq!(file.meta().logit_slot, "last layer");
    let mut fired = 0;
    for l in 0..5 {
        for i in 0..40 {
            let r = file.get(l, i).unwrap();
            assert_eq!((r.layer, r.feature), (l as u32, i as u32));
            assert_eq!(r.index, clt::features::cantor(l as u64, i as u64));
            assert_eq!(
                r.top_logits.len(),
                5,
                "logit effects need the model from cache.json"
            );
            let top = &r.examples_quantiles[0].examples;
            if r.n_active == 0 {
                assert!(top.is_empty());
                continue;
            }
            fired += 1;
            assert!(top.len() <= 5 && !top.is_empty());
            // Best first; the chosen token's activation is the example's, and the best is the maximum.
            let centre = |e: &clt::features::Example| e.tokens_acts_list[e.train_token_ind];
            assert_eq!(centre(&top[0]), r.act_max);
            assert!(top.windows(2).all(|w| centre(&w[0]) >= centre(&w[1])));
            for e in top {
                assert_eq!(e.tokens.len(), e.tokens_acts_list.len());
                assert!(e.tokens.len() <= 8 + 1 + 3);
                assert!(
                    e.tokens.iter().all(|t| !t.starts_with('#')),
                    "tokens decoded"
                );
            }
            let hist: f32 = r.histogram.iter().sum();
            assert_eq!(hist as u64, r.n_active);
            assert_eq!(r.histogram_edges.len(), r.histogram.len() + 1);
            assert!((r.activation_frequency - r.n_active as f64 / 3000.0).abs() < 1e-12);
        }
    }
    assert!(fired > 20, "only {fired} features fired");
    // circuit-tracer's per-feature JSON files.
    let one = f
        .features
        .join("features/test-scan")
        .join(format!("{}.json", clt::features::cantor(1, 3)));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(one).unwrap()).unwrap();
    assert!(v["examples_quantiles"].is_array() && v["act_max"].is_number());
}

#[test]
fn server_api_and_traversal() {
    let server = serve();
    let (s, body) = get(&server, "/api/graphs");
    assert_eq!(s, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [ATTRIBUTED, "graph-malformed.json", "graph-small.json"]
    );
    let (s, body) = get(&server, "/api/graphs/graph-small.json");
    assert_eq!(s, 200);
    assert!(body.contains("\"nodes\""));
    for bad in [
        "/api/graphs/..%2Fsecret.json",
        "/api/graphs/%2e%2e%2fsecret.json",
        "/api/graphs/..%5Csecret.json",
        "/api/graphs/%2Fetc%2Fpasswd",
        "/api/graphs/..",
        "/api/graphs/../secret.json",
        "/api/graphs/../../etc/passwd",
        "/../secret.json",
        "/assets/../../secret.json",
    ] {
        let (s, body) = get(&server, bad);
        assert!(matches!(s, 400 | 404), "{bad}: status {s}");
        assert!(
            !body.contains("secret\": true") && !body.contains("root:"),
            "{bad} leaked: {body}"
        );
    }
    let (s, body) = get(&server, "/api/graphs/missing.json");
    assert_eq!(s, 404, "{body}");
    let (s, body) = get(&server, "/api/features/1/3");
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["layer"].as_u64(), v["feature"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(get(&server, "/api/features/9/0").0, 404);
    // circuit-tracer's path for the same record (Cantor id of (1, 3) = 13).
    let (s, same) = get(&server, "/features/test-scan/13.json");
    assert_eq!(s, 200);
    assert_eq!(same, body);
    assert_eq!(get(&server, "/features/other-scan/13.json").0, 404);
    assert_eq!(get(&server, "/features/test-scan/x.json").0, 404);
    assert_eq!(get(&server, "/api/features/x/0").0, 400);
    let (s, body) = get(&server, "/");
    assert_eq!(s, 200);
    assert!(body.contains("/assets/app.js"));
    assert_eq!(get(&server, "/assets/app.js").0, 200);
}

/// A copy of the fixture's graphs folder under `name` (for tests that write into it).
fn graphs_copy(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&fixture().graphs).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

/// Two feature nodes of a graph that both send a link to one third node (the first such target in the
/// file's order): `(first, second, target)`.
fn two_into_one(graph: &serde_json::Value) -> (String, String, String) {
    let feature: std::collections::HashSet<&str> = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["feature_type"] == "cross layer transcoder")
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    let mut into: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for l in graph["links"].as_array().unwrap() {
        let (s, t) = (l["source"].as_str().unwrap(), l["target"].as_str().unwrap());
        if feature.contains(s) {
            into.entry(t).or_default().push(s);
        }
    }
    let (t, s) = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .find_map(|t| into.get(t).filter(|s| s.len() >= 2).map(|s| (t, s)))
        .expect("a node with links from two features");
    (s[0].into(), s[1].into(), t.into())
}

/// `POST /save_graph/{slug}` writes the page's subgraph into the graph file (circuit-tracer's local server
/// route): only `qParams` changes, the server then serves the new file, and an id that is not the graph's,
/// a malformed body, a missing graph or a path are refused with the file left as it was.
#[test]
fn saving_a_subgraph_rewrites_only_its_qparams() {
    let dir = graphs_copy("viewer-test-save");
    std::fs::write(dir.parent().unwrap().join("secret.json"), "{\"nodes\": []}").unwrap();
    let server = clt::viewer::start(&ServeConfig {
        graphs: dir.clone(),
        features: None,
        host: "127.0.0.1".into(),
        port: 0,
        intervene: None,
    })
    .unwrap();
    let path = dir.join(ATTRIBUTED);
    let before: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let (a, b, t) = two_into_one(&before);
    let slug = ATTRIBUTED.trim_end_matches(".json");
    let q = serde_json::json!({"pinnedIds": [a, b, t], "supernodes": [["pair", a, b]],
                               "linkType": "both", "clickedId": t, "sg_pos": ""});
    let (s, body) = post(
        &server,
        &format!("/save_graph/{slug}"),
        &serde_json::json!({"qParams": q}).to_string(),
    );
    assert_eq!(s, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"saved": ATTRIBUTED, "pinned": 3, "supernodes": 1})
    );
    let after: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(after["qParams"], q);
    for key in ["metadata", "nodes", "links"] {
        assert_eq!(after[key], before[key], "{key} changed");
    }
    assert_eq!(
        after.as_object().unwrap().len(),
        before.as_object().unwrap().len()
    );
    let (s, served) = get(&server, &format!("/api/graphs/{ATTRIBUTED}"));
    assert_eq!(s, 200);
    assert_eq!(served.as_bytes(), std::fs::read(&path).unwrap().as_slice());

    let saved = std::fs::read(&path).unwrap();
    for (route, body, status, says) in [
        (
            format!("/save_graph/{slug}"),
            serde_json::json!({"qParams": {"pinnedIds": [a, "99_1_1"]}}).to_string(),
            400,
            "\"99_1_1\" is not a node",
        ),
        (
            format!("/save_graph/{slug}"),
            serde_json::json!({"qParams": {"supernodes": [["g", "E_999999_0"]]}}).to_string(),
            400,
            "supernodes[0]",
        ),
        (
            format!("/save_graph/{slug}"),
            serde_json::json!({"qParams": {"supernodes": [[1, a]]}}).to_string(),
            400,
            "label",
        ),
        (
            format!("/save_graph/{slug}"),
            serde_json::json!({"pinnedIds": [a]}).to_string(),
            400,
            "qParams",
        ),
        (
            format!("/save_graph/{slug}"),
            "not json".into(),
            400,
            "bad request",
        ),
        (
            "/save_graph/missing".into(),
            serde_json::json!({"qParams": {}}).to_string(),
            404,
            "missing.json",
        ),
        (
            "/save_graph/..%2Fsecret".into(),
            serde_json::json!({"qParams": {}}).to_string(),
            400,
            "file name",
        ),
        (
            "/save_graph/graph-malformed".into(),
            serde_json::json!({"qParams": {}}).to_string(),
            400,
            "graph-malformed.json",
        ),
    ] {
        let (s, answer) = post(&server, &route, &body);
        assert_eq!(s, status, "{route} {body}: {answer}");
        let said: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let said = said["error"].as_str().unwrap_or_default();
        assert!(said.contains(says), "{route} {body}: {answer}");
    }
    // Only as JSON: a form or text body (what another site's page can send without asking) is refused.
    let body = serde_json::json!({"qParams": {"pinnedIds": [a]}}).to_string();
    let request = format!(
        "POST /save_graph/{slug} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (s, answer) = exchange(&server, &request, Duration::from_secs(10));
    assert_eq!(s, 415, "{answer}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        saved,
        "a refused save changed the file"
    );
    assert_eq!(
        std::fs::read_to_string(dir.parent().unwrap().join("secret.json")).unwrap(),
        "{\"nodes\": []}"
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "temporary files left: {names:?}");
}

/// Kills chromedriver when the test ends, however it ends.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

fn browser() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| which(&["chromium", "chromium-browser"]));
    let driver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| which(&["chromedriver"]));
    match (chromium, driver) {
        (Some(c), Some(d)) => (c, d),
        (c, d) => panic!(
            "the viewer's browser test needs chromium ({}) and chromedriver ({}): run `bash scripts/install-browser.sh` \
             (as root; scripts/test.sh does) or set CHROMIUM and CHROMEDRIVER",
            c.map_or("missing".into(), |p| p.display().to_string()),
            d.map_or("missing".into(), |p| p.display().to_string()),
        ),
    }
}

fn start_driver(driver: &Path) -> (Driver, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
    let guard = Driver(child);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "chromedriver did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (guard, port)
}

async fn wait_js(c: &fantoccini::Client, script: &str, want: &str) {
    let t0 = Instant::now();
    loop {
        let v = c.execute(script, vec![]).await.unwrap();
        if v.as_str() == Some(want) {
            return;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let err = c
                .execute(
                    "return document.getElementById('error').textContent",
                    vec![],
                )
                .await
                .unwrap();
            panic!("`{script}` is {v}, not {want:?}; error banner: {err}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn graph_and_features_in_headless_chromium() {
    let (chromium, driver) = browser();
    let f = fixture();
    let (_driver, port) = start_driver(&driver);
    let small: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(FIXTURES).join("graph-small.json")).unwrap(),
    )
    .unwrap();
    let small_nodes = small["nodes"].as_array().unwrap().len();
    // The graph the attribution command wrote: thousands of nodes (the page must draw them all).
    let graph: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.graphs.join(ATTRIBUTED)).unwrap()).unwrap();
    let n_nodes = graph["nodes"].as_array().unwrap().len();
    let n_links = graph["links"].as_array().unwrap().len();
    // The first fixture feature node whose feature fired in the store, and its best context's text.
    let file = FeatureFile::open(f.features.join(FEATURES_FILE)).unwrap();
    let (node_id, want_text, key) = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["feature_type"] == "cross layer transcoder")
        .find_map(|n| {
            let id = n["node_id"].as_str().unwrap();
            let mut parts = id.split('_');
            let l: usize = parts.next()?.parse().ok()?;
            let i: usize = parts.next()?.parse().ok()?;
            let rec = file.get(l, i).unwrap();
            let ex = rec.examples_quantiles[0].examples.first()?;
            Some((id.to_string(), ex.tokens.concat(), format!("{l}/{i}")))
        })
        .expect("some fixture feature fired");
    // Serve a copy of the features with a label for that feature (as `clt explain` writes it).
    let feats = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("viewer-test-browser");
    let _ = std::fs::remove_dir_all(&feats);
    std::fs::create_dir_all(&feats).unwrap();
    std::fs::copy(f.features.join(FEATURES_FILE), feats.join(FEATURES_FILE)).unwrap();
    let mut labels = clt::features::labels::Labels::default();
    let (l, i) = key.split_once('/').unwrap();
    labels.insert(
        l.parse().unwrap(),
        i.parse().unwrap(),
        "Zebra-striped test label".into(),
    );
    labels.write(&feats).unwrap();
    // (A copy of the graphs: the page saves a subgraph into one.)
    let graphs = graphs_copy("viewer-test-browser-graphs");
    let server = clt::viewer::start(&ServeConfig {
        graphs: graphs.clone(),
        features: Some(feats),
        host: "127.0.0.1".into(),
        port: 0,
        intervene: Some(intervene_source()),
    })
    .unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1500,900"]
            }
        });
        let caps = caps.as_object().unwrap().clone().into_iter().collect();
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session with headless chromium");
        let base = server.url();
        let t0 = Instant::now();
        c.goto(&format!("{base}/?graph={ATTRIBUTED}")).await.unwrap();
        wait_js(&c, "return document.body.dataset.state", "ready").await;
        let times = c
            .execute("return [document.body.dataset.fetchMs, document.body.dataset.renderMs, document.body.dataset.readyAt]", vec![])
            .await
            .unwrap();
        eprintln!(
            "attributed graph: {n_nodes} nodes, {n_links} edges; page ready in {:.2} s, [fetch, render] ms = {times}",
            t0.elapsed().as_secs_f64()
        );
        assert!(n_nodes >= 1000, "the attributed graph has only {n_nodes} nodes");
        let counts = c
            .execute(
                "return [document.querySelectorAll('#nodes .node').length, Number(document.getElementById('edge-canvas').dataset.drawn)]",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(counts, serde_json::json!([n_nodes, n_links]));

        // Hovering a node draws its own edges above the canvas.
        let own = graph["links"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["source"] == node_id.as_str() || l["target"] == node_id.as_str())
            .count();
        let hot = c
            .execute(
                "document.querySelector(`[data-id=\"${arguments[0]}\"]`).dispatchEvent(new MouseEvent('mouseenter'));
                 return document.querySelectorAll('#edges .edge.hot').length",
                vec![serde_json::json!(node_id)],
            )
            .await
            .unwrap();
        assert!(own > 0, "node {node_id} has no edges");
        assert_eq!(hot, serde_json::json!(own));

        // Click a feature node: it is pinned and its panel shows its top context.
        let node = c.find(Locator::Css(&format!("[data-id=\"{node_id}\"]"))).await.unwrap();
        node.click().await.unwrap();
        wait_js(&c, "return document.body.dataset.feature", &key).await;
        let text = c
            .execute("return document.querySelector('#feature-panel .context').textContent", vec![])
            .await
            .unwrap();
        assert_eq!(text.as_str(), Some(want_text.as_str()));
        let pinned = c.execute("return document.querySelectorAll('.node.pinned').length", vec![]).await.unwrap();
        assert_eq!(pinned, serde_json::json!(1));
        let logits = c.execute("return document.querySelectorAll('#feature-panel .logits li').length", vec![]).await.unwrap();
        assert_eq!(logits, serde_json::json!(10));

        // The CI artifact: the graph with a feature's dashboard open.
        let png = c.screenshot().await.unwrap();
        let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("viewer-screenshot.png");
        std::fs::write(&shot, png).unwrap();

        // Search highlights; the pinned subgraph hides the rest.
        let label = c.execute("return document.querySelector('#feature-panel .label').textContent", vec![]).await.unwrap();
        assert_eq!(label, serde_json::json!("Zebra-striped test label"));
        // Search finds the node by its label.
        c.find(Locator::Id("search")).await.unwrap().send_keys("zebra-striped").await.unwrap();
        // (the feature's node at every position where it is in the graph).
        let prefix = format!("{}_", key.replace('/', "_"));
        let same_feature = graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node_id"].as_str().unwrap().starts_with(&prefix))
            .count();
        let hits = c.execute("return document.querySelectorAll('.node.match').length", vec![]).await.unwrap();
        assert_eq!(hits, serde_json::json!(same_feature));
        c.find(Locator::Id("pinned-only")).await.unwrap().click().await.unwrap();
        let shown = c
            .execute("return [...document.querySelectorAll('#nodes .node')].filter(e => !e.classList.contains('hidden')).length", vec![])
            .await
            .unwrap();
        assert_eq!(shown, serde_json::json!(1));
        let drawn = c
            .execute("return Number(document.getElementById('edge-canvas').dataset.drawn)", vec![])
            .await
            .unwrap();
        assert_eq!(drawn, serde_json::json!(0), "one pinned node has no edges among pinned nodes");
        c.find(Locator::Id("pinned-only")).await.unwrap().click().await.unwrap();

        // Interventions from the page: the node's "silence here" edit, run, both tops and continuations shown.
        node.click().await.unwrap();
        let node = c.find(Locator::Css(&format!("[data-id=\"{node_id}\"]"))).await.unwrap();
        node.click().await.unwrap();
        c.find(Locator::Css("#node-panel button[data-edit-kind=silence]")).await.unwrap().click().await.unwrap();
        let edits = c.execute("return [...document.querySelectorAll('#intervene-panel .edit-list li')].map(e => e.firstChild.textContent)", vec![]).await.unwrap();
        let (nl, nf, np) = {
            let mut parts = node_id.split('_');
            (parts.next().unwrap().to_string(), parts.next().unwrap().to_string(), parts.next().unwrap().to_string())
        };
        assert_eq!(edits, serde_json::json!([format!("{nl}:{np}:{nf}=0")]));
        c.find(Locator::Id("intervene-run")).await.unwrap().click().await.unwrap();
        wait_js(&c, "return document.body.dataset.intervened", "done").await;
        let result = c.find(Locator::Id("intervene-result")).await.unwrap().text().await.unwrap();
        assert!(result.contains("with the edits"), "{result}");
        assert!(result.contains("clean continuation"), "{result}");
        let tops = c.execute("return document.querySelectorAll('#intervene-result .logits li').length", vec![]).await.unwrap();
        assert_eq!(tops, serde_json::json!(10));

        // The feature on its graph's prompt from its panel: shaded where the library finds it firing.
        let prompt = graph["metadata"]["prompt"].as_str().unwrap();
        let (m, tc, _) = clt::attribution::cli::load_replacement(&f.model, None, &f.transcoder, None).unwrap();
        let tokens = m.tokenizer.encode_prompt(prompt).unwrap();
        let pa = clt::attribution::activations::prompt_activations(
            &m.model,
            &tc,
            &tokens,
            &[(nl.parse().unwrap(), nf.parse().unwrap())],
        )
        .unwrap();
        let fired = pa.traces[0].activation.iter().filter(|&&a| a > 0.0).count();
        assert!(fired >= 1, "the node's feature fires at its position");
        wait_js(&c, "return document.body.dataset.feature", &key).await;
        let typed = c.execute("return document.getElementById('test-prompt').value", vec![]).await.unwrap();
        assert_eq!(typed, serde_json::json!(prompt));
        c.find(Locator::Id("test-run")).await.unwrap().click().await.unwrap();
        wait_js(&c, "return document.body.dataset.tested", &fired.to_string()).await;
        let shaded = c
            .execute("return [...document.querySelectorAll('#test-result .tok')].filter(e => e.style.backgroundColor).length", vec![])
            .await
            .unwrap();
        assert_eq!(shaded, serde_json::json!(fired));
        let toks = c.execute("return document.querySelectorAll('#test-result .tok').length", vec![]).await.unwrap();
        assert_eq!(toks, serde_json::json!(tokens.len()));

        // Features on a prompt: the graph's prompt by default, each position's three strongest features as
        // the library ranks them, and a feature's button opens its dashboard.
        let typed = c.execute("return document.getElementById('probe-prompt').value", vec![]).await.unwrap();
        assert_eq!(typed, serde_json::json!(prompt));
        c.find(Locator::Id("probe-run")).await.unwrap().click().await.unwrap();
        wait_js(&c, "return document.body.dataset.prompted", "done").await;
        let rows = c.execute("return document.querySelectorAll('#probe-result tr').length", vec![]).await.unwrap();
        assert_eq!(rows, serde_json::json!(tokens.len() - 1));
        let all = clt::attribution::activations::prompt_activations(&m.model, &tc, &tokens, &[]).unwrap();
        let af = &all.features;
        for p in 1..tokens.len() {
            let want: Vec<String> =
                all.top_at(p, 3).iter().map(|&i| format!("{}/{}", af.layer[i], af.index[i])).collect();
            let got = c
                .execute(
                    "return [...document.querySelectorAll('#probe-result tr')[arguments[0] - 1].querySelectorAll('.feature-link')].map(b => b.dataset.feature)",
                    vec![serde_json::json!(p)],
                )
                .await
                .unwrap();
            assert_eq!(got, serde_json::json!(want), "position {p}");
        }
        let first = all.top_at(1, 1)[0];
        c.find(Locator::Css("#probe-result .feature-link")).await.unwrap().click().await.unwrap();
        wait_js(&c, "return document.body.dataset.feature", &format!("{}/{}", af.layer[first], af.index[first])).await;

        // The subgraph: two features feeding one node grouped into a supernode, the pinned subgraph drawing it
        // as one box with the summed edge, saved into the file, and restored from it and from a link.
        let (a, b, t) = two_into_one(&graph);
        c.find(Locator::Id("clear-pins")).await.unwrap().click().await.unwrap();
        for id in [&a, &b, &t] {
            c.execute(
                "document.querySelector(`[data-id=\"${arguments[0]}\"]`).dispatchEvent(new MouseEvent('click'))",
                vec![serde_json::json!(id)],
            )
            .await
            .unwrap();
        }
        for id in [&a, &b] {
            c.execute(
                "document.querySelector(`.group-check[data-id=\"${arguments[0]}\"]`).click()",
                vec![serde_json::json!(id)],
            )
            .await
            .unwrap();
        }
        c.find(Locator::Id("group-label")).await.unwrap().send_keys("Zebra pair").await.unwrap();
        c.find(Locator::Id("group-make")).await.unwrap().click().await.unwrap();
        let items = c.execute("return [...document.querySelectorAll('.supernode-item')].map(e => e.firstChild.textContent)", vec![]).await.unwrap();
        assert_eq!(items, serde_json::json!([format!("Zebra pair (2): {a}, {b}")]));
        // The units' summed edges, computed here from the file.
        let unit = |id: &str| if id == a || id == b { "S".to_string() } else { id.to_string() };
        let mut sums: std::collections::BTreeMap<(String, String), f64> = Default::default();
        for l in graph["links"].as_array().unwrap() {
            let (s, d) = (l["source"].as_str().unwrap(), l["target"].as_str().unwrap());
            let pinned = |x: &str| x == a || x == b || x == t;
            if pinned(s) && pinned(d) && unit(s) != unit(d) {
                *sums.entry((unit(s), unit(d))).or_default() += l["weight"].as_f64().unwrap();
            }
        }
        let into_t = sums[&("S".to_string(), t.clone())];
        c.find(Locator::Id("pinned-only")).await.unwrap().click().await.unwrap();
        let drawn = c
            .execute(
                "return [Number(document.getElementById('edge-canvas').dataset.drawn),
                         [...document.querySelectorAll('#nodes .node')].filter(e => !e.classList.contains('hidden')).length,
                         [...document.querySelectorAll('#supernodes .supernode text')].map(e => e.textContent)]",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(drawn, serde_json::json!([sums.len(), 1, ["Zebra pair"]]));
        let row = c
            .execute(
                "const r = document.querySelector(`#unit-edges tr[data-source=\"s0\"][data-target=\"${arguments[0]}\"]`);
                 return r ? Number(r.dataset.weight) : null",
                vec![serde_json::json!(t)],
            )
            .await
            .unwrap();
        let png = c.screenshot().await.unwrap();
        std::fs::write(shot.with_file_name("viewer-subgraph.png"), png).unwrap();
        let got = row.as_f64().expect("a row for the supernode's edge into its target");
        assert!((got - into_t).abs() <= 1e-9 * into_t.abs().max(1e-30), "summed edge {got}, want {into_t}");
        c.find(Locator::Id("pinned-only")).await.unwrap().click().await.unwrap();
        c.find(Locator::Id("save-subgraph")).await.unwrap().click().await.unwrap();
        wait_js(&c, "return document.body.dataset.saved", "done").await;
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(graphs.join(ATTRIBUTED)).unwrap()).unwrap();
        assert_eq!(saved["qParams"]["pinnedIds"], serde_json::json!([a, b, t]));
        assert_eq!(saved["qParams"]["supernodes"], serde_json::json!([["Zebra pair", a, b]]));
        assert_eq!(saved["links"], graph["links"]);
        c.goto(&format!("{base}/?graph={ATTRIBUTED}")).await.unwrap();
        wait_js(&c, "return document.body.dataset.state", "ready").await;
        let restored = c
            .execute("return [document.querySelectorAll('.node.pinned').length, [...document.querySelectorAll('.supernode-item')].map(e => e.firstChild.textContent)]", vec![])
            .await
            .unwrap();
        assert_eq!(restored, serde_json::json!([3, [format!("Zebra pair (2): {a}, {b}")]]));
        // Neuronpedia's link form: the URL's subgraph instead of the file's.
        let link = format!(
            "{base}/?graph={ATTRIBUTED}&pinnedIds={t}&supernodes={}",
            serde_json::json!([["Via link", a]]).to_string().replace('"', "%22").replace('[', "%5B").replace(']', "%5D")
        );
        c.goto(&link).await.unwrap();
        wait_js(&c, "return document.body.dataset.state", "ready").await;
        let from_link = c
            .execute("return [document.querySelectorAll('.node.pinned').length, [...document.querySelectorAll('.supernode-item')].map(e => e.firstChild.textContent)]", vec![])
            .await
            .unwrap();
        assert_eq!(from_link, serde_json::json!([2, [format!("Via link (1): {a}")]]));

        // A malformed graph shows an error, not a blank page.
        c.goto(&format!("{base}/?graph=graph-malformed.json")).await.unwrap();
        wait_js(&c, "return document.body.dataset.state", "error").await;
        let err = c.find(Locator::Id("error")).await.unwrap().text().await.unwrap();
        assert!(err.contains("graph-malformed.json is not a valid attribution graph"), "{err}");

        // A graph from disk through the file input.
        let input = c.find(Locator::Id("file-input")).await.unwrap();
        input.send_keys(&Path::new(FIXTURES).join("graph-small.json").display().to_string()).await.unwrap();
        wait_js(&c, "return document.body.dataset.state", "ready").await;
        let n = c.execute("return document.querySelectorAll('#nodes .node').length", vec![]).await.unwrap();
        assert_eq!(n, serde_json::json!(small_nodes));
        let hidden = c.execute("return document.getElementById('error').hidden", vec![]).await.unwrap();
        assert_eq!(hidden, serde_json::json!(true));
        // A graph from disk cannot be saved on the server: it is downloaded with its subgraph instead
        // (the blob the page hands the browser, caught on its way).
        let first = small["nodes"][1]["node_id"].as_str().unwrap().to_string();
        let downloaded = c
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 const blobs = [];
                 const orig = URL.createObjectURL;
                 URL.createObjectURL = (b) => { blobs.push(b); return orig(b); };
                 document.getElementById('clear-pins').click();
                 document.querySelector(`[data-id=\"${arguments[0]}\"]`).dispatchEvent(new MouseEvent('click'));
                 document.getElementById('download-subgraph').click();
                 blobs[0].text().then(done);",
                vec![serde_json::json!(first)],
            )
            .await
            .unwrap();
        let back: serde_json::Value = serde_json::from_str(downloaded.as_str().unwrap()).unwrap();
        assert_eq!(back["qParams"]["pinnedIds"], serde_json::json!([first]));
        assert_eq!(back["qParams"]["supernodes"], serde_json::json!([]));
        // (JavaScript writes 0.0 as 0: the nodes and links are compared by id and value.)
        let ids = |g: &serde_json::Value| -> Vec<String> {
            g["nodes"].as_array().unwrap().iter().map(|n| n["node_id"].to_string()).collect()
        };
        let links = |g: &serde_json::Value| -> Vec<(String, String, f64)> {
            g["links"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["source"].to_string(), l["target"].to_string(), l["weight"].as_f64().unwrap()))
                .collect()
        };
        assert_eq!((ids(&back), links(&back)), (ids(&small), links(&small)));
        assert_eq!(back["metadata"]["prompt"], small["metadata"]["prompt"]);
        assert!(c.find(Locator::Id("save-subgraph")).await.is_err(), "no save for a graph from disk");
        c.close().await.unwrap();
    });
}

/// A one-thread OpenAI-compatible stand-in on loopback: answers each chat-completions request with
/// "label N" and keeps the request bodies.
fn fake_llm(n: usize) -> (String, std::thread::JoinHandle<Vec<serde_json::Value>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        for i in 0..n {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while !buf.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                buf.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&buf).to_lowercase();
            assert!(head.starts_with("post /v1/chat/completions "), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("content-length");
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).unwrap();
            bodies.push(serde_json::from_slice(&body).unwrap());
            let answer = serde_json::json!({
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": format!("\"label {i}\"\n") } }]
            })
            .to_string();
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .unwrap();
        }
        bodies
    });
    (url, handle)
}

#[test]
fn explain_labels_features_through_a_local_endpoint_and_the_server_shows_them() {
    let f = fixture();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("viewer-test-explain");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(f.features.join(FEATURES_FILE), dir.join(FEATURES_FILE)).unwrap();
    let (url, llm) = fake_llm(4);
    let args = clt::features::explain::ExplainArgs {
        features: dir.clone(),
        url,
        model_name: "test-model".into(),
        api_key_env: "CLT_TEST_NO_SUCH_KEY".into(),
        layers: vec![1],
        limit: Some(4),
        examples: 3,
        overwrite: false,
        timeout: 30,
    };
    assert_eq!(clt::features::explain::run(&args).unwrap(), 4);
    let bodies = llm.join().unwrap();
    let file = FeatureFile::open(dir.join(FEATURES_FILE)).unwrap();
    let fired: Vec<usize> = (0..40)
        .filter(|&i| file.get(1, i).unwrap().n_active > 0)
        .take(4)
        .collect();
    let labels = clt::features::labels::Labels::read(&dir).unwrap();
    for (k, &i) in fired.iter().enumerate() {
        assert_eq!(labels.get(1, i), Some(format!("label {k}").as_str()));
        // The request carried the model name and the feature's best context, its token marked.
        let b = &bodies[k];
        assert_eq!(b["model"], "test-model");
        let user = b["messages"][1]["content"].as_str().unwrap();
        let ex = &file.get(1, i).unwrap().examples_quantiles[0].examples[0];
        let marked = format!("[[{}]]", ex.tokens[ex.train_token_ind]);
        assert!(user.contains(&marked), "{user}");
    }
    assert_eq!(labels.labels.len(), 4);
    // A second run resumes: labelled features are skipped, the rest of the layer is asked for.
    let all_fired = (0..40)
        .filter(|&i| file.get(1, i).unwrap().n_active > 0)
        .count();
    let (url, llm) = fake_llm(all_fired - 4);
    let again = clt::features::explain::ExplainArgs {
        url,
        limit: None,
        ..args.clone()
    };
    assert_eq!(clt::features::explain::run(&again).unwrap(), all_fired - 4);
    llm.join().unwrap();
    let labels = clt::features::labels::Labels::read(&dir).unwrap();
    assert_eq!(labels.labels.len(), all_fired);
    assert_eq!(labels.get(1, fired[0]), Some("label 0"));

    let server = clt::viewer::start(&ServeConfig {
        graphs: f.graphs.clone(),
        features: Some(dir.clone()),
        host: "127.0.0.1".into(),
        port: 0,
        intervene: None,
    })
    .unwrap();
    let (s, body) = get(&server, &format!("/api/features/1/{}", fired[0]));
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["label"], "label 0");
    let (s, body) = get(&server, "/api/labels");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["labels"][format!("1/{}", fired[0])], "label 0");
}
