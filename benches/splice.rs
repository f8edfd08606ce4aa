//! The transcoder spliced into the model (`clt splice`): one 128-token context's forward bare, spliced with
//! the model's MLPs still run (the public `spliced_logits`, which needs them at position 0), spliced and
//! zero-ablated given position 0's MLP outputs from the model's own run (what `splice_eval` does: no MLP
//! runs), and `splice_eval`'s whole work for the context (the model's forward with its MLP outputs recorded,
//! the spliced and the ablated forwards, the scores).
//!
//! The transcoder is a random CLT calibrated to 32 active features per layer per token on the context
//! (the cost depends on the shapes and the active count, not on what the features mean). Models:
//! stories260K (F = 512 per layer) and SmolLM2-135M (F = 2,304). `cargo bench --bench splice`.

mod common;
use common::{shared, smollm2};

use clt::attribution::replacement::calibrated_transcoder;
use clt::attribution::splice::{Splice, splice_eval, spliced_logits, spliced_logits_with};
use clt::cache::InputHook;
use clt::model::{self, CausalLm, ForwardOptions, Hooks};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const N: usize = 128;

fn bench_splice(c: &mut Criterion) {
    let models = [
        (
            "stories260K",
            shared().join("models/stories260K/stories260K.bin"),
            512,
        ),
        ("smollm2_135m", smollm2(), 2304),
    ];
    let text = std::fs::read_to_string(shared().join("corpus/tinystories_valid_head.txt")).unwrap();
    for (name, path, n_features) in models {
        let loaded = model::load(&path, None).unwrap_or_else(|e| panic!("{e}"));
        let m = loaded.model.as_llama().expect("a Llama model");
        let mut toks = loaded.tokenizer.encode(&text[..4000]).unwrap();
        toks.truncate(N);
        let tc =
            calibrated_transcoder(m, &toks, n_features, 32, 1, InputHook::MlpInNormed).unwrap();
        let hooks = Hooks {
            mlp_out: true,
            ..Hooks::default()
        };
        let run = m
            .forward_with(
                &toks,
                &ForwardOptions {
                    hooks,
                    ..ForwardOptions::default()
                },
            )
            .unwrap();
        let d = tc.cfg.d_model;
        let p0: Vec<Vec<f32>> = run
            .record
            .layers
            .iter()
            .map(|l| l.mlp_out.as_ref().unwrap()[..d].to_vec())
            .collect();
        // The shortcut is exact: the same logits as the forward that runs the MLPs.
        assert_eq!(
            spliced_logits(m, &tc, &toks, Splice::All).unwrap(),
            spliced_logits_with(m, &tc, &toks, Splice::All, Some(&p0)).unwrap()
        );
        let mut g = c.benchmark_group(format!("splice_128_tokens/{name}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(N as u64));
        g.bench_function("forward", |b| b.iter(|| m.forward(&toks).unwrap()));
        g.bench_function("spliced_running_mlps", |b| {
            b.iter(|| spliced_logits(m, &tc, &toks, Splice::All).unwrap())
        });
        g.bench_function("spliced", |b| {
            b.iter(|| spliced_logits_with(m, &tc, &toks, Splice::All, Some(&p0)).unwrap())
        });
        g.bench_function("zero_ablated", |b| {
            b.iter(|| spliced_logits_with(m, &tc, &toks, Splice::Zero, Some(&p0)).unwrap())
        });
        g.bench_function("splice_eval", |b| {
            b.iter(|| splice_eval(m, &tc, [Ok(toks.clone())], false, |_| {}).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench_splice);
criterion_main!(benches);
