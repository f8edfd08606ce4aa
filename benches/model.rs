//! Forward throughput of the Llama CPU forward (tokens/s and GFLOP/s) at 128 tokens, for stories260K and
//! SmolLM2-135M, against the GEMM ceiling of the same machine (one 128×576 · 576×1536 product, the SmolLM2
//! MLP shape). Throughput is reported in FLOP/s ("elem/s"); tokens/s = 128 / time.
//!
//! `forward_2048_tokens`: SmolLM2 over 2,048 tokens (the last position's logits), bare and recording every
//! attention pattern as attribution does, where causal attention (tile GEMMs, `model::AttnPattern`) is a
//! large part of the work.
//!
//! `generate_16_after_256`: SmolLM2's greedy continuation of a 256-token prompt by 16 tokens, through the KV
//! cache (`CausalLm::generate_greedy`: the prompt's forward, then one position per token) and the way it ran
//! before the cache (a full forward over the growing sequence per token); `one_token_after_256`: one cached
//! step alone, in bytes of weights read per second.
//!
//! `cargo bench --bench model` (SmolLM2 is fetched by `scripts/fetch-smollm2.sh` when not cached).

mod common;
use common::{shared, smollm2};

use clt::model::{self, CausalLm, ForwardOptions, KvCache, Logits, forward::matmul_wt};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const N: usize = 128;

fn bench_gemm(c: &mut Criterion) {
    let (m, k, n) = (N, 576, 1536);
    let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.01).sin()).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.02).cos()).collect();
    let mut out = vec![0.0f32; m * n];
    let mut g = c.benchmark_group("gemm_ceiling");
    g.throughput(Throughput::Elements((2 * m * k * n) as u64));
    g.bench_function("128x576x1536", |b| {
        b.iter(|| matmul_wt(&x, m, k, &w, n, &mut out))
    });
    g.finish();
}

fn bench_forward(c: &mut Criterion) {
    let models = [
        (
            "stories260K",
            shared().join("models/stories260K/stories260K.bin"),
        ),
        ("smollm2_135m", smollm2()),
    ];
    let mut g = c.benchmark_group("forward_128_tokens");
    g.sample_size(10);
    for (name, path) in models {
        let loaded = model::load(&path, None).unwrap_or_else(|e| panic!("{e}"));
        let m = &loaded.model;
        let v = m.vocab_size() as u32;
        let toks: Vec<u32> = (0..N as u32).map(|i| (i * 7919 + 3) % v).collect();
        // Logits of every position, as activation caching or a logits dump would not need; `All` measures
        // the worst case of a full forward.
        let opts = ForwardOptions {
            logits: Logits::All,
            ..Default::default()
        };
        let flops = m.forward_flops(N, N);
        eprintln!("{name}: {:.3} GFLOP per forward of {N} tokens", flops / 1e9);
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(name, |b| b.iter(|| m.forward_with(&toks, &opts).unwrap()));
    }
    g.finish();
}

fn bench_long_forward(c: &mut Criterion) {
    const LONG: usize = 2048;
    let loaded = model::load(&smollm2(), None).unwrap_or_else(|e| panic!("{e}"));
    let m = &loaded.model;
    let v = m.vocab_size() as u32;
    let toks: Vec<u32> = (0..LONG as u32).map(|i| (i * 7919 + 3) % v).collect();
    let mut g = c.benchmark_group("forward_2048_tokens");
    g.sample_size(10);
    g.throughput(Throughput::Elements(m.forward_flops(LONG, 1) as u64));
    for record in [false, true] {
        let opts = ForwardOptions {
            logits: Logits::Last,
            hooks: model::Hooks {
                attn_pattern: record,
                ..Default::default()
            },
            ..Default::default()
        };
        let name = if record { "recording_patterns" } else { "bare" };
        g.bench_function(name, |b| b.iter(|| m.forward_with(&toks, &opts).unwrap()));
    }
    g.finish();
}

fn bench_generation(c: &mut Criterion) {
    const PROMPT: usize = 256;
    const NEW: usize = 16;
    let loaded = model::load(&smollm2(), None).unwrap_or_else(|e| panic!("{e}"));
    let m = &loaded.model;
    let v = m.vocab_size() as u32;
    let toks: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 7919 + 3) % v).collect();
    let uncached = || {
        let mut seq = toks.clone();
        for _ in 0..NEW {
            let l = m.next_logits(&seq).unwrap();
            seq.push(model::forward::argmax(&l) as u32);
        }
        seq.split_off(PROMPT)
    };
    assert_eq!(m.generate_greedy(&toks, NEW, None).unwrap(), uncached());
    let mut g = c.benchmark_group("generate_16_after_256");
    g.sample_size(10);
    g.bench_function("kv_cache", |b| {
        b.iter(|| m.generate_greedy(&toks, NEW, None).unwrap())
    });
    g.bench_function("full_forward_per_token", |b| b.iter(uncached));
    g.finish();

    // One cached step alone: it reads every weight once (4 bytes per 2 FLOPs of its products).
    let mut cache = KvCache::new();
    let opts = ForwardOptions {
        logits: Logits::Last,
        ..Default::default()
    };
    m.forward_cached(&toks, &mut cache, &opts).unwrap();
    let mut g = c.benchmark_group("one_token_after_256");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(2 * m.forward_flops(1, 1) as u64));
    g.bench_function("kv_cache_step", |b| {
        b.iter(|| {
            let out = m.forward_cached(&[7], &mut cache, &opts).unwrap();
            cache.truncate(PROMPT);
            out
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_forward,
    bench_long_forward,
    bench_generation
);
criterion_main!(benches);
