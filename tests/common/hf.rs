//! Tiny random Hugging Face model directories and the pure-Python reference forwards that check them
//! (`tests/gpt2_reference.py`, `tests/gemma2_reference.py`).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use safetensors::{Dtype, tensor::TensorView};

/// Deterministic uniform values in `[-s/2, s/2)` (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn vals(&mut self, len: usize, s: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * s
            })
            .collect()
    }
}

/// A named tensor and its shape.
pub type Tensor = (String, Vec<f32>, Vec<usize>);

/// Writes `dir/model.safetensors` with these tensors, their names prefixed with `prefix`; those named in
/// `bf16` (without the prefix) are stored as BF16 (rounded to nearest even), the rest as F32.
pub fn write_safetensors(dir: &Path, tensors: &[Tensor], prefix: &str, bf16: &[&str]) {
    let bytes: Vec<(String, Dtype, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, v, s)| {
            let (dtype, data) = if bf16.contains(&n.as_str()) {
                let b = v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect();
                (Dtype::BF16, b)
            } else {
                (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            };
            (format!("{prefix}{n}"), dtype, data, s.clone())
        })
        .collect();
    let views: HashMap<String, TensorView<'_>> = bytes
        .iter()
        .map(|(n, dtype, data, s)| (n.clone(), TensorView::new(*dtype, s.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// A toy `dir/tokenizer.json`: characters a, b and the merge "ab" (ids 0, 1, 2).
pub fn write_toy_tokenizer(dir: &Path) {
    let vocab: tokenizers::models::bpe::Vocab = [
        ("a".to_string(), 0u32),
        ("b".to_string(), 1),
        ("ab".to_string(), 2),
    ]
    .into_iter()
    .collect();
    let bpe = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, vec![("a".into(), "b".into())])
        .build()
        .unwrap();
    tokenizers::Tokenizer::new(bpe)
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
}

/// Runs `tests/{script}` on the model directory and token sequences; its JSON output.
pub fn python_reference(script: &str, dir: &Path, seqs: &[Vec<u32>]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .arg(serde_json::to_string(seqs).unwrap())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running python3 {} (the reference forward needs python3): {e}",
                script.display()
            )
        });
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A nested JSON array of numbers, flattened.
pub fn flat(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

/// The largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts that two loadings of one model are the same model: on each sequence, the same logits and every
/// hook's record, bit for bit.
pub fn assert_same_forward(a: &clt::model::Model, b: &clt::model::Model, seqs: &[Vec<u32>]) {
    use clt::model::{ForwardOptions, Hooks};
    let all = ForwardOptions {
        hooks: Hooks::all(),
        ..Default::default()
    };
    for toks in seqs {
        let (x, y) = (
            a.forward_with(toks, &all).unwrap(),
            b.forward_with(toks, &all).unwrap(),
        );
        assert_eq!(x.logits, y.logits, "logits of {toks:?}");
        assert_eq!(x.record, y.record, "hooks of {toks:?}");
    }
}

/// Runs `m` with every hook over each sequence and compares its logits and records with the reference's
/// runs (`want["runs"][i]`), each value within `tol`; the post-norm scales are compared where the model
/// records them, and must be recorded exactly when the reference has them. Returns the largest difference
/// per value.
pub fn assert_matches_reference(
    m: &clt::model::Model,
    seqs: &[Vec<u32>],
    want: &serde_json::Value,
    tol: f32,
) -> Vec<(&'static str, f32)> {
    use clt::model::{CausalLm, ForwardOptions, Hooks};
    let mut worst: HashMap<&'static str, f32> = HashMap::new();
    for (i, toks) in seqs.iter().enumerate() {
        let run = &want["runs"][i];
        let out = m
            .forward_with(
                toks,
                &ForwardOptions {
                    hooks: Hooks::all(),
                    ..Default::default()
                },
            )
            .unwrap();
        let mut cmp = |what: &'static str, got: Option<&Vec<f32>>, want: &serde_json::Value| {
            assert_eq!(
                got.is_some(),
                !want.is_null(),
                "sequence {i}: {what} recorded by one side only"
            );
            if let Some(got) = got {
                let e = max_diff(got, &flat(want));
                assert!(e < tol, "sequence {i}: {what} differs by {e}");
                let w = worst.entry(what).or_default();
                *w = w.max(e);
            }
        };
        cmp("logits", Some(&out.logits), &run["logits"]);
        cmp(
            "final_norm_scale",
            out.record.final_norm_scale.as_ref(),
            &run["final_norm_scale"],
        );
        for (l, rec) in out.record.layers.iter().enumerate() {
            let r = &run["layers"][l];
            let pattern = rec.attn_pattern.as_ref().map(|p| p.to_dense());
            for (what, got) in [
                ("resid_pre", &rec.resid_pre),
                ("resid_mid", &rec.resid_mid),
                ("mlp_in_normed", &rec.mlp_in_normed),
                ("mlp_in_unweighted", &rec.mlp_in_unweighted),
                ("mlp_out", &rec.mlp_out),
                ("attn_pattern", &pattern),
                ("attn_norm_scale", &rec.attn_norm_scale),
                ("mlp_norm_scale", &rec.mlp_norm_scale),
                ("attn_post_norm_scale", &rec.attn_post_norm_scale),
                ("mlp_post_norm_scale", &rec.mlp_post_norm_scale),
            ] {
                cmp(what, got.as_ref(), &r[what]);
            }
        }
        // The plain forward and the last position's logits agree with the hooked forward.
        let vocab = m.vocab_size();
        assert!(max_diff(&m.forward(toks).unwrap(), &out.logits) < 1e-6);
        let last = m.next_logits(toks).unwrap();
        assert!(max_diff(&last, &out.logits[(toks.len() - 1) * vocab..]) < 1e-6);
    }
    let mut worst: Vec<_> = worst.into_iter().collect();
    worst.sort_by(|a, b| a.0.cmp(b.0));
    worst
}

/// Exports `tc` in circuit-tracer's format with `feature_input_hook` (a name that must resolve to
/// `tc.input_hook` on `m`) into `model_dir/transcoder` and runs [`attribute_and_intervene_on`] with it.
pub fn run_attribute_and_intervene(
    model_dir: &Path,
    m: &clt::model::LoadedModel,
    model_name: &str,
    tc: clt::attribution::replacement::ReplacementTranscoder,
    feature_input_hook: &str,
    prompt: &str,
) -> serde_json::Value {
    let t = clt::clt::Transcoder {
        norms: clt::clt::NormScales::identity(tc.cfg.n_layers),
        cfg: tc.cfg.clone(),
        params: tc.params.clone(),
    };
    let ct = model_dir.join("transcoder");
    let meta = clt::clt::export::ExportMeta {
        model_name: model_name.into(),
        feature_input_hook: feature_input_hook.into(),
        feature_output_hook: "hook_mlp_out".into(),
    };
    clt::clt::export::export_circuit_tracer(&t, &ct, &meta).unwrap();
    attribute_and_intervene_on(model_dir, m, &tc, &ct, prompt)
}

/// Runs `clt attribute` on `prompt` with the circuit-tracer transcoder directory `ct` (which must hold `tc`
/// under a hook name that resolves to `tc.input_hook` on `m`; the graph into `model_dir/g.json`) and
/// `clt intervene` with two edits. Checks that the command found as many active features as the replacement
/// model `tc` here (which differs under the other MLP-norm hook, so a name read as the wrong hook fails),
/// that the graph has token, feature and logit nodes and links, and that the edits print the logits after
/// them; returns the graph's JSON.
pub fn attribute_and_intervene_on(
    model_dir: &Path,
    m: &clt::model::LoadedModel,
    tc: &clt::attribution::replacement::ReplacementTranscoder,
    ct: &Path,
    prompt: &str,
) -> serde_json::Value {
    use clt::attribution::replacement::prompt_state;
    use clt::cache::InputHook;
    let tokens = m.tokenizer.encode_prompt(prompt).unwrap();
    let active = |hook: InputHook| {
        let mut tc = tc.clone();
        tc.input_hook = hook;
        prompt_state(&m.model, &tc, &tokens).unwrap().features.len()
    };
    let want = active(tc.input_hook);
    let other = match tc.input_hook {
        InputHook::MlpInUnweighted => InputHook::MlpInNormed,
        _ => InputHook::MlpInUnweighted,
    };
    assert_ne!(
        want,
        active(other),
        "the test cannot tell the two norm hooks apart"
    );
    let out = model_dir.join("g.json");
    let run = |command: &str, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_clt"))
            .arg(command)
            .args(["--model", model_dir.to_str().unwrap()])
            .args(["--transcoder", ct.to_str().unwrap()])
            .args(["--prompt", prompt])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        text
    };
    let text = run("attribute", &["--out", out.to_str().unwrap(), "--quiet"]);
    assert!(text.contains("replacement score"), "{text}");
    assert!(
        text.contains(&format!(" {want} active features")),
        "{} should be read as {:?}, giving {want} active features: {text}",
        ct.display(),
        tc.input_hook
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    for kind in ["embedding", "cross layer transcoder", "logit"] {
        assert!(
            nodes.iter().any(|n| n["feature_type"] == kind),
            "no {kind} node"
        );
    }
    assert!(!v["links"].as_array().unwrap().is_empty());
    let text = run("intervene", &["--set", "1:*:0*=0", "--set", "0:4:3=2.5"]);
    assert!(text.contains("with the edits:"), "{text}");
    v
}

/// What `clt run` prints for `prompt` on the model at `model` (top 3 tokens, `generate` greedy tokens).
pub fn clt_run_text(model: &Path, prompt: &str, generate: usize) -> String {
    let args = clt::model::cli::RunArgs {
        model: model.to_path_buf(),
        tokenizer: None,
        prompt: prompt.into(),
        generate,
        dump_logits: None,
        top: 3,
    };
    let mut out = Vec::new();
    clt::model::cli::run_to(&args, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}
