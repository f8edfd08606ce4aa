//! Time and peak memory of attribution graphs on the CPU, with the breakdown (forward, logit rows, feature
//! rows, ranking, pruning), for stories260K and SmolLM2-135M prompts of 16, 64 and 256 tokens (and SmolLM2
//! at 1,024 tokens), and the fitted scaling exponent of time with prompt length.
//!
//! The transcoder is a random CLT calibrated to `L0` active features per layer per token on each prompt
//! (`calibrated_transcoder`): the cost depends on the active count and the shapes, not on what features
//! mean. `cargo bench --bench attribution` (env: `ATTR_MODELS=stories,smollm2`, `ATTR_NODES` for SmolLM2's
//! `max_feature_nodes`, `ATTR_LONG=0` to skip the 1,024-token run, `ATTR_LONG_LENGTHS=1024,2048` for other long lengths).

mod common;
use common::{shared, smollm2};
use std::time::Instant;

use clt::attribution::graph::{AttributionConfig, attribute};
use clt::attribution::replacement::calibrated_transcoder;
use clt::attribution::{prune, scores};
use clt::cache::InputHook;

/// Resets the peak resident set (Linux: `clear_refs` 5) so that the next reading is this graph's peak.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Least-squares slope of log(time) against log(tokens).
fn exponent(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x.ln(), b + y.ln()));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x.ln() - mx) * (y.ln() - my), b + (x.ln() - mx).powi(2))
    });
    num / den
}

fn run(
    name: &str,
    m: &clt::model::LoadedModel,
    lengths: &[usize],
    n_features: usize,
    l0: usize,
    nodes: usize,
) {
    let llama = m.model.as_llama().expect("a Llama model");
    let text = std::fs::read_to_string(shared().join("corpus/tinystories_valid_head.txt")).unwrap();
    let all = m.tokenizer.encode(&text[..text.len().min(40_000)]).unwrap();
    println!(
        "\n{name}: F = {n_features} per layer, L0 = {l0} per layer per token, max_feature_nodes = {nodes}"
    );
    println!(
        "{:>6} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "tokens",
        "active",
        "nodes",
        "total s",
        "fwd s",
        "logit s",
        "feat s",
        "rank s",
        "prune s",
        "peak MiB",
        "repl",
        "compl"
    );
    let mut points = Vec::new();
    for &n in lengths {
        let tokens = &all[..n.min(all.len())];
        let tc = calibrated_transcoder(llama, tokens, n_features, l0, 1, InputHook::MlpInNormed)
            .unwrap();
        reset_peak();
        let t0 = Instant::now();
        let cfg = AttributionConfig {
            max_feature_nodes: Some(nodes),
            ..AttributionConfig::default()
        };
        let g = attribute(llama, &tc, tokens, &cfg).unwrap();
        let tp = Instant::now();
        let _p = prune(&g.adjacency, &g.logit_probs, 0.8, 0.98).unwrap();
        let s = scores(&g.adjacency, &g.logit_probs).unwrap();
        let prune_s = tp.elapsed().as_secs_f64();
        let total = t0.elapsed().as_secs_f64();
        let t = g.timings;
        println!(
            "{:>6} {:>8} {:>6} {:>8.2} {:>8.3} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.0} {:>7.3} {:>7.3} {:>8.1}",
            tokens.len(),
            g.active.len(),
            g.selected.len(),
            total,
            t.forward,
            t.logit_rows,
            t.feature_rows,
            t.ranking,
            prune_s,
            peak_mib(),
            s.replacement,
            s.completeness,
            t.flops / (t.logit_rows + t.feature_rows) / 1e9
        );
        points.push((tokens.len() as f64, total));
    }
    if points.len() > 1 {
        println!(
            "time ∝ tokens^{:.2} (least squares over {} lengths)",
            exponent(&points),
            points.len()
        );
    }
}

fn main() {
    let ceiling = clt::bench::gemm_ceiling(512, 576, 576, 5);
    println!("GEMM ceiling of this machine (512×576·576×576, all threads): {ceiling:.1} GFLOP/s");
    // `cargo bench` passes `--bench`; nothing else to parse.
    let models = std::env::var("ATTR_MODELS").unwrap_or_else(|_| "stories,smollm2".into());
    if models.contains("stories") {
        let s = shared();
        let m = clt::model::load(
            &s.join("models/stories260K/stories260K.bin"),
            Some(&s.join("models/stories260K/tok512.bin")),
        )
        .unwrap();
        run("stories260K", &m, &[16, 64, 256], 512, 32, 7500);
    }
    if models.contains("smollm2") {
        let m = clt::model::load(&smollm2(), None).unwrap();
        let nodes = env_usize("ATTR_NODES", 1000);
        run("SmolLM2-135M", &m, &[16, 64, 256], 2304, 16, nodes);
        if env_usize("ATTR_LONG", 1) == 1 {
            let long: Vec<usize> = std::env::var("ATTR_LONG_LENGTHS")
                .unwrap_or_else(|_| "1024".into())
                .split(',')
                .map(|v| v.trim().parse().expect("ATTR_LONG_LENGTHS: token counts"))
                .collect();
            run(
                "SmolLM2-135M (long)",
                &m,
                &long,
                2304,
                16,
                env_usize("ATTR_LONG_NODES", 256),
            );
        }
    }
}
