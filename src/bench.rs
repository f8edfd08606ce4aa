//! Throughput measurements of the training step (behind `clt bench step` and the criterion benches).
//!
//! A benchmark problem is a transcoder with random parameters whose encoder biases are calibrated (as at the
//! start of training) so that about `l0` features per token and layer fire, and one batch of random activations
//! reused for every step. The sparse step and the dense reference run on the same problem in the same process,
//! so their ratio is meaningful on a noisy machine.

use crate::Result;
use crate::backend::cpu::adam::{self, AdamHyper, AdamState};
use crate::backend::cpu::encode::encode_all;
use crate::backend::cpu::gemm::{Mat, Threads, matmul};
use crate::backend::cpu::sparse::thresholds;
use crate::backend::{Backend, BackendKind, Grads, Objective};
use crate::clt::params::decoder_norms;
use crate::clt::{Activation, CltConfig, DecoderKind, Params};
use crate::rng::Rng;
use crate::train::init::calibrate_b_enc;
use std::time::Instant;

/// A benchmark problem.
pub struct Problem {
    pub cfg: CltConfig,
    pub params: Params,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub n_tokens: usize,
    pub obj: Objective,
}

/// Named problem sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// A smoke test of the code paths, not a measurement: 2 layers, d = 64, 256 features, batch 256 (with
    /// `--cuda`, small enough for the CPU emulator, kernels/emu/).
    Tiny,
    /// stories260K-sized: 5 layers, d = 64, 4096 features per layer, batch 4096.
    Small,
    /// GPT-2-small-sized: 12 layers, d = 768, 3072 features per layer, batch 2048.
    Large,
}

/// Which rows `clt bench --cuda` times. The Hopper wgmma encoders are the kernels most likely to fail on
/// their first GPU run (hand-encoded descriptors, tensor maps, mbarriers), and a fault poisons the process's
/// CUDA context: `scripts/gpu-check.sh` runs them in a process of their own, after the other rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CudaRows {
    /// Every row.
    #[default]
    All,
    /// Every row but the wgmma encoders'.
    NoWgmma,
    /// The encoder rows only (every encoder kernel, both epilogues, the ratio and fastest-kernel lines).
    Encoders,
}

impl Preset {
    /// (layers, d, features, batch)
    pub fn dims(self) -> (usize, usize, usize, usize) {
        match self {
            Preset::Tiny => (2, 64, 256, 256),
            Preset::Small => (5, 64, 4096, 4096),
            Preset::Large => (12, 768, 3072, 2048),
        }
    }
}

impl Problem {
    /// A problem of the given sizes with about `l0` active features per token and layer.
    pub fn new(
        n_layers: usize,
        d_model: usize,
        n_features: usize,
        n_tokens: usize,
        l0: f64,
        bandwidth: f32,
        seed: u64,
    ) -> Self {
        let cfg = CltConfig {
            n_layers,
            d_model,
            n_features,
            decoder: DecoderKind::CrossLayer,
            activation: Activation::JumpRelu,
            skip: false,
        };
        let mut rng = Rng::seed(seed);
        let mut params = Params::init(&cfg, 0.03, &mut rng);
        let n = n_tokens * n_layers * d_model;
        let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let y: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        calibrate_b_enc(
            &cfg,
            &mut params,
            &x,
            n_tokens,
            (l0 / n_features as f64).min(1.0),
        );
        Problem {
            cfg,
            params,
            x,
            y,
            n_tokens,
            obj: Objective {
                lambda: 2.0,
                c: 4.0,
                lambda_preact: 1e-5,
                bandwidth,
                threshold_grad: Default::default(),
            },
        }
    }

    /// Floating-point operations of the encoder GEMM (2·B·d·F per layer).
    pub fn encoder_flops(&self) -> f64 {
        2.0 * (self.n_tokens * self.cfg.d_model * self.cfg.n_features * self.cfg.n_layers) as f64
    }
}

/// Timings of one backend on a problem.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepTiming {
    pub backend: String,
    /// Median seconds per full step (loss, gradient, clipping norm, Adam).
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// Median seconds of the encoder alone (GEMM + epilogue), sparse path only.
    pub encode_s: Option<f64>,
    pub encoder_gflops: Option<f64>,
    pub l0_per_layer: f64,
    pub near_threshold_per_layer: f64,
    /// Median seconds of each phase of the sparse step, timed apart (sparse path only).
    pub phases: Option<Phases>,
}

/// The sparse CPU step phase by phase (median seconds over the timed steps).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Phases {
    /// Encoder GEMM + JumpReLU epilogue + per-token lists.
    pub encode_s: f64,
    /// Sparse decode (tiled: each feature's decoder row read once per tile of tokens).
    pub decode_s: f64,
    /// The same decode token by token (every active entry's row gathered), for comparison.
    pub decode_by_token_s: f64,
    /// Residual, loss terms and the sparse backward (every parameter's gradient).
    pub backward_s: f64,
    /// The global gradient norm for clipping.
    pub norm_s: f64,
    /// Adam over every parameter, with the decoder norms refreshed.
    pub adam_s: f64,
    /// Bytes the decode must read: one decoder row (all its target layers) per active entry, in GB.
    pub decode_gb: f64,
    /// Bytes Adam must move: parameter, gradient, two moments read and parameter and moments written, in GB.
    pub adam_gb: f64,
}

/// What a timed step updates: the parameters, their gradient, Adam's state and the decoder norms.
struct StepState {
    params: Params,
    grads: Grads,
    state: AdamState,
    norms: Vec<Vec<f32>>,
    hyper: AdamHyper,
}

impl StepState {
    fn new(p: &Problem) -> Self {
        let params = p.params.clone();
        StepState {
            norms: decoder_norms(&p.cfg, &params.w_dec),
            grads: Grads::zeros(&p.cfg),
            state: AdamState::new(&p.cfg),
            hyper: AdamHyper::default(),
            params,
        }
    }

    /// The clipping factor of the current gradient (global norm clipped to 1).
    fn clip_scale(&self, cfg: &CltConfig) -> f32 {
        adam::clip_scale(
            1.0,
            adam::grad_norm(cfg, &self.params, &self.grads, &self.norms),
        )
    }

    /// One Adam update at a tiny learning rate, which keeps the problem's sparsity where it was calibrated.
    fn update(&mut self, cfg: &CltConfig, scale: f32) {
        let st = &mut self.state;
        adam::step(
            cfg,
            &self.hyper,
            &mut self.params,
            st,
            &self.grads,
            1e-7,
            scale,
            &mut self.norms,
        );
    }
}

/// Times the sparse CPU step's phases apart: `steps` steps after one warm-up (same work as
/// [`time_steps`] with the CPU backend, which runs them back to back).
pub fn time_phases(p: &Problem, steps: usize) -> Phases {
    use crate::backend::cpu::encode::encode_all_with;
    use crate::backend::cpu::sparse::{backward, decode, decode_layers_by_token, decode_start};
    let cfg = &p.cfg;
    let mut st = StepState::new(p);
    let by_h = p.obj.threshold_grad == crate::backend::ThresholdGrad::Preact;
    let mut t: [Vec<f64>; 5] = Default::default();
    let mut by_token = Vec::new();
    let mut decode_gb = 0.0;
    for i in 0..=steps.max(1) {
        let clock = Instant::now();
        let lap = |k: usize, t: &mut [Vec<f64>; 5], last: &mut f64| {
            let now = clock.elapsed().as_secs_f64();
            if i > 0 {
                t[k].push(now - *last);
            }
            *last = now;
        };
        let mut last = 0.0;
        let th = thresholds(&st.params);
        let codes = encode_all_with(
            cfg,
            &st.params,
            &p.x,
            p.n_tokens,
            &th,
            p.obj.bandwidth,
            by_h,
        );
        lap(0, &mut t, &mut last);
        let yhat = decode(cfg, &st.params, &codes, &p.x, p.n_tokens);
        lap(1, &mut t, &mut last);
        if i > 0 {
            let t0 = Instant::now();
            let mut y2 = decode_start(cfg, &st.params, p.n_tokens, true);
            decode_layers_by_token(
                cfg,
                &st.params,
                &codes,
                p.n_tokens,
                0..cfg.n_layers,
                &mut y2,
            );
            by_token.push(t0.elapsed().as_secs_f64());
            drop(y2);
            last = clock.elapsed().as_secs_f64();
        }
        decode_gb = codes
            .iter()
            .enumerate()
            .map(|(l, c)| {
                let active = c.act.iter().filter(|a| **a != 0.0).count();
                (active * cfg.dec_row_len(l) * 4) as f64
            })
            .sum::<f64>()
            / 1e9;
        backward(
            cfg,
            &st.params,
            &st.norms,
            &p.x,
            &p.y,
            p.n_tokens,
            &p.obj,
            None,
            &th,
            codes,
            yhat,
            &mut st.grads,
        );
        lap(2, &mut t, &mut last);
        let scale = st.clip_scale(cfg);
        lap(3, &mut t, &mut last);
        st.update(cfg, scale);
        lap(4, &mut t, &mut last);
    }
    let [encode_s, decode_s, backward_s, norm_s, adam_s] = t.map(median);
    Phases {
        encode_s,
        decode_s,
        decode_by_token_s: median(by_token),
        backward_s,
        norm_s,
        adam_s,
        decode_gb,
        adam_gb: (st.params.len() * 4 * 7) as f64 / 1e9,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The per-kernel CUDA bench (`clt bench --cuda`): every kernel's time, TFLOP/s or GB/s and fraction of the
/// ceilings (bf16 nominal, device copy measured in the same run), then the sparse step against the dense cuBLAS
/// step, at the shape `preset` names (`Large`: the Llama-3.2-1B shape; `Tiny`: a smoke test). See
/// [`crate::backend::cuda::bench`]. `rows` selects the rows. With `json`, the rows and every other line
/// printed are written there too ([`crate::backend::cuda::bench::Record`]), for docs/perf.md
/// (`scripts/gpu-figures.py` makes its tables).
#[cfg(feature = "cuda")]
pub fn cuda_kernels(preset: Preset, rows: CudaRows, json: Option<&std::path::Path>) -> Result<()> {
    let record = crate::backend::cuda::bench::run(preset, rows)?;
    if let Some(path) = json {
        let text = serde_json::to_vec_pretty(&record)
            .map_err(|e| crate::Error::io(path, std::io::Error::other(e)))?;
        std::fs::write(path, text).map_err(|e| crate::Error::io(path, e))?;
    }
    Ok(())
}

/// Without the `cuda` feature: the error that says so.
#[cfg(not(feature = "cuda"))]
pub fn cuda_kernels(
    _preset: Preset,
    _rows: CudaRows,
    _json: Option<&std::path::Path>,
) -> Result<()> {
    Err(crate::Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: "built without CUDA support (rebuild with `--features cuda`)".into(),
    })
}

/// Times `steps` full training steps (after one warm-up step) on `kind`.
pub fn time_steps(p: &Problem, kind: BackendKind, steps: usize) -> Result<StepTiming> {
    let backend = Backend::new(kind)?;
    let cfg = &p.cfg;
    let mut st = StepState::new(p);
    let mut times = Vec::new();
    let mut stats = None;
    for i in 0..=steps.max(1) {
        let t0 = Instant::now();
        let s = backend.loss_and_grad(
            cfg,
            &st.params,
            &st.norms,
            &p.x,
            &p.y,
            p.n_tokens,
            &p.obj,
            None,
            &mut st.grads,
        )?;
        let scale = st.clip_scale(cfg);
        st.update(cfg, scale);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
        stats = Some(s);
    }
    let stats = stats.expect("at least one step");
    let step_s = median(times);
    let l_n = cfg.n_layers as f64;
    let (encode_s, encoder_gflops) = if kind == BackendKind::Cpu {
        let th = thresholds(&p.params);
        let mut et = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            let codes = encode_all(cfg, &p.params, &p.x, p.n_tokens, &th, p.obj.bandwidth);
            et.push(t0.elapsed().as_secs_f64());
            drop(codes);
        }
        let e = median(et);
        (Some(e), Some(p.encoder_flops() / e / 1e9))
    } else {
        (None, None)
    };
    Ok(StepTiming {
        backend: format!("{kind:?}"),
        step_s,
        tokens_per_s: p.n_tokens as f64 / step_s,
        encode_s,
        encoder_gflops,
        phases: (kind == BackendKind::Cpu).then(|| time_phases(p, steps)),
        l0_per_layer: stats.n_active.iter().sum::<usize>() as f64 / p.n_tokens as f64 / l_n,
        near_threshold_per_layer: stats.n_window.iter().sum::<usize>() as f64
            / p.n_tokens as f64
            / l_n,
    })
}

/// The machine's single-precision GEMM ceiling as this build reaches it: the best of `reps` products of
/// `m × k` by `k × n` on all threads, in GFLOP/s.
pub fn gemm_ceiling(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
        .collect();
    let mut c = vec![0.0f32; m * n];
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        matmul(
            &mut c,
            n,
            Mat::rows(&a, m, k),
            Mat::rows(&b, n, k).t(),
            0.0,
            1.0,
            Threads::All,
        );
        best = best.min(t0.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// The machine's memory bandwidth as a parallel copy reaches it: the best of `reps` copies of `bytes` bytes,
/// in GB/s of bytes read plus bytes written.
pub fn copy_bandwidth(bytes: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let n = bytes / 4;
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (n * 4) as f64 / best / 1e9
}
