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
            for (what, got) in [
                ("resid_pre", &rec.resid_pre),
                ("resid_mid", &rec.resid_mid),
                ("mlp_in_normed", &rec.mlp_in_normed),
                ("mlp_out", &rec.mlp_out),
                ("attn_pattern", &rec.attn_pattern),
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
