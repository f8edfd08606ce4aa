//! GPU property tests: every CUDA kernel against its CPU reference on random, awkward shapes (sizes that are
//! not multiples of the tile or block sizes, empty batches, rows with nothing or everything active), with
//! poisoned output buffers (0xFF bytes: NaN / `u32::MAX`) so an element a kernel forgets to write fails.
//!
//! They run on the GPU machine (scripts/gpu-check.sh) and, in CI, on the CPU emulator of the CUDA driver
//! (kernels/emu/: the kernels compiled as host C++, found through `LD_LIBRARY_PATH`), which checks their
//! logic but not the hardware.
//!
//! Without a CUDA driver the GPU tests print "skipped: no CUDA driver ..." and return; with
//! `CLT_REQUIRE_GPU=1` (set by scripts/gpu-check.sh on the GPU machine) a missing driver or device fails
//! them instead, so they never pass vacuously there.
//!
//! Tolerances are tied to the dtypes (docs/cuda.md): inputs are rounded to bf16 on the host before the CPU
//! reference runs, so both sides multiply the same numbers and differ only by fp32 summation order:
//! `|Δ| ≤ 4 · n · 2⁻²⁴ · Σ|terms|` for a sum of n terms (checked as `TOL_REL` on the sum of magnitudes).
//! Selections (top-k, BatchTopK, dequantisation) must match exactly.

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_tests_skipped_without_feature() {
    eprintln!("skipped: built without `--features cuda` (scripts/gpu-build.sh builds them)");
}

#[cfg(feature = "cuda")]
mod common;

#[cfg(feature = "cuda")]
mod gpu_tests {
    use super::common::*;
    use clt::backend::cpu::{adam as cpu_adam, encode as cpu_enc, sparse};
    use clt::backend::cuda::memory::{round_bf16, to_bf16_bits};
    use clt::backend::cuda::{
        Gpu, adam, backward, bench, decode, dense, dequant, driver_present, encode, gradsum, step,
        topk, tune,
    };
    use clt::backend::{
        ActBlocks, Backend, BackendKind, EncoderKernel, Grads, KernelChoice, Objective,
        SparseKernels, ThresholdGrad, tuning::Tuning,
    };
    use clt::clt::params::decoder_norms;
    use clt::clt::{Activation, CltConfig, DecoderKind, Params};
    use clt::rng::Rng;
    use clt::store::codec::{Codec, Section};
    use clt::train::Trainer;
    use proptest::prelude::*;
    use std::sync::{Mutex, OnceLock};

    /// Relative tolerance on sums of magnitudes (fp32 accumulation, any order, n ≤ a few thousand terms).
    const TOL_REL: f64 = 2e-5;

    /// The device, or `None` after printing (once per test) why the test is skipped. Panics under
    /// `CLT_REQUIRE_GPU=1`.
    fn gpu() -> Option<&'static Gpu> {
        static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
        let g = GPU.get_or_init(|| {
            Gpu::open(0).map_err(|e| e.to_string()).inspect(|g| {
                g.set_poison(true);
                eprintln!("CUDA tests on {}", g.describe());
            })
        });
        match g {
            Ok(g) => Some(g),
            Err(e) => {
                if std::env::var("CLT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                    panic!("CLT_REQUIRE_GPU=1 but the GPU cannot be used: {e}");
                }
                static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());
                let name = std::thread::current().name().unwrap_or("?").to_string();
                let mut seen = SKIPPED.lock().unwrap_or_else(|p| p.into_inner());
                if !seen.contains(&name) {
                    eprintln!("{name}: skipped: no CUDA driver or device ({e})");
                    seen.push(name);
                }
                None
            }
        }
    }

    /// The warpgroup-MMA encoders: 128 × 256 tiles, 128 × 128, and 128 × 256 through the TMA.
    const WGMMA_KERNELS: [encode::Gemm; 3] = [
        encode::Gemm::Wgmma,
        encode::Gemm::WgmmaNarrow,
        encode::Gemm::WgmmaTma,
    ];

    /// Whether the device runs `encode_wgmma` (compute capability 9.x); says once, per test, when not.
    fn wgmma(gpu: &Gpu) -> bool {
        if gpu.has_wgmma() {
            return true;
        }
        static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let name = std::thread::current().name().unwrap_or("?").to_string();
        let mut seen = SKIPPED.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&name) {
            eprintln!(
                "{name}: skipped: {} has no wgmma (compute capability 9.x only)",
                gpu.describe()
            );
            seen.push(name);
        }
        false
    }

    fn close(what: &str, got: f64, want: f64, scale: f64) -> Result<(), TestCaseError> {
        let tol = TOL_REL * scale.abs() + 1e-6;
        if got.is_nan() || (got - want).abs() > tol {
            return Err(TestCaseError::fail(format!(
                "{what}: got {got}, want {want} (tolerance {tol})"
            )));
        }
        Ok(())
    }

    /// The same sums added in another order (a tiled kernel's against a gather's): within
    /// `TOL_REL · 10 · max|want|` element by element.
    fn close_reordered(what: &str, got: &[f32], want: &[f32]) -> Result<(), TestCaseError> {
        let s = 10.0 * want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        close_all(what, got, want, &vec![s; want.len()])
    }

    fn close_all(
        what: &str,
        got: &[f32],
        want: &[f32],
        scale: &[f64],
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(got.len(), want.len(), "{} length", what);
        for i in 0..got.len() {
            close(
                &format!("{what}[{i}]"),
                got[i] as f64,
                want[i] as f64,
                scale[i],
            )?;
        }
        Ok(())
    }

    /// Rounds the parameters the device reads in bf16 (W_enc, W_dec) so the CPU sees the same numbers.
    fn bf16_params(p: &Params) -> Params {
        let mut q = p.clone();
        for w in q
            .w_enc
            .iter_mut()
            .chain(q.w_dec.iter_mut())
            .chain(q.w_skip.iter_mut())
        {
            *w = round_bf16(w);
        }
        q
    }

    /// For each (token, feature) of layer l: f64 pre-activation and the sum of magnitudes of its terms.
    fn preact_bounds(
        cfg: &CltConfig,
        p: &Params,
        x: &[f32],
        n: usize,
        l: usize,
    ) -> Vec<(f64, f64)> {
        let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
        let mut out = Vec::with_capacity(n * f_n);
        for b in 0..n {
            let xs = &x[(b * l_n + l) * d..][..d];
            for f in 0..f_n {
                let w = &p.w_enc[l][f * d..(f + 1) * d];
                let (mut h, mut s) = (p.b_enc[l][f] as f64, p.b_enc[l][f].abs() as f64);
                for (a, c) in xs.iter().zip(w) {
                    h += *a as f64 * *c as f64;
                    s += (*a as f64 * *c as f64).abs();
                }
                out.push((h, s));
            }
        }
        out
    }

    /// Whether any pre-activation sits so close to θ or θ − ε/2 that summation order could move it across.
    fn ambiguous(cfg: &CltConfig, p: &Params, x: &[f32], n: usize, half: f32) -> bool {
        let th = sparse::thresholds(p);
        (0..cfg.n_layers).any(|l| {
            preact_bounds(cfg, p, x, n, l)
                .iter()
                .enumerate()
                .any(|(i, (h, s))| {
                    let t = th[l][i % cfg.n_features] as f64;
                    let tol = 4.0 * TOL_REL * s + 1e-6;
                    (h - t).abs() <= tol || (h - (t - half as f64)).abs() <= tol
                })
        })
    }

    fn config(l_n: usize, d: usize, f_n: usize, per_layer: bool, act: Activation) -> CltConfig {
        CltConfig {
            n_layers: l_n,
            d_model: d,
            n_features: f_n,
            decoder: if per_layer {
                DecoderKind::PerLayer
            } else {
                DecoderKind::CrossLayer
            },
            activation: act,
            skip: false,
        }
    }

    #[test]
    fn cuda_backend_reports_a_missing_driver_clearly() {
        if driver_present() {
            eprintln!(
                "skipped: a CUDA driver is present (this test checks the message without one)"
            );
            return;
        }
        let e = Backend::new(BackendKind::Cuda).unwrap_err().to_string();
        assert!(
            e.contains("no CUDA driver found (libcuda.so)"),
            "unclear error: {e}"
        );
    }

    /// Both CUDA trainers (`cuda`, resident, and `cuda-host`) refuse clearly without a driver, before
    /// touching the data.
    #[test]
    fn cuda_trainers_report_a_missing_driver_clearly() {
        if driver_present() {
            eprintln!(
                "skipped: a CUDA driver is present (this test checks the message without one)"
            );
            return;
        }
        for kind in [BackendKind::Cuda, BackendKind::CudaHost] {
            let mut run = small_gpu_run(2);
            run.train.backend = kind;
            let e = Trainer::new(run)
                .err()
                .expect("no trainer without a driver")
                .to_string();
            assert!(
                e.contains("no CUDA driver found (libcuda.so)"),
                "{kind:?}: unclear error: {e}"
            );
        }
    }

    /// `clt bench --cuda` without a driver says so (the per-kernel bench is library code).
    #[test]
    fn cuda_bench_reports_a_missing_driver_clearly() {
        if driver_present() {
            eprintln!(
                "skipped: a CUDA driver is present (this test checks the message without one)"
            );
            return;
        }
        let e =
            clt::bench::cuda_kernels(clt::bench::Preset::Small, clt::bench::CudaRows::All, None)
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("no CUDA driver found (libcuda.so)"),
            "unclear error: {e}"
        );
    }

    /// Every kernel a wrapper launches exists as an entry of the embedded PTX of its module (runs without a
    /// GPU: a misspelt name would otherwise surface only on the GPU machine).
    #[test]
    fn every_launched_kernel_is_in_the_embedded_ptx() {
        use clt::backend::cuda::context::ptx;
        let sources = [
            include_str!("../src/backend/cuda/encode.rs"),
            include_str!("../src/backend/cuda/decode.rs"),
            include_str!("../src/backend/cuda/backward.rs"),
            include_str!("../src/backend/cuda/topk.rs"),
            include_str!("../src/backend/cuda/adam.rs"),
            include_str!("../src/backend/cuda/dequant.rs"),
            include_str!("../src/backend/cuda/dense.rs"),
            include_str!("../src/backend/cuda/bench.rs"),
        ];
        let modules = [
            ("Encode", ptx::ENCODE),
            ("Decode", ptx::DECODE),
            ("Backward", ptx::BACKWARD),
            ("Topk", ptx::TOPK),
            ("Adam", ptx::ADAM),
            ("Dequant", ptx::DEQUANT),
            ("Dense", ptx::DENSE),
        ];
        let mut checked = 0;
        for src in sources {
            for (i, _) in src.match_indices("Module::") {
                let rest = &src[i + 8..];
                let comma = rest.find(',').expect("Module::X,");
                let module = &rest[..comma];
                // The kernel argument: a string literal, or a name chosen at run time (checked below).
                let arg = rest[comma + 1..].trim_start();
                let Some(lit) = arg.strip_prefix('"') else {
                    continue;
                };
                let name = &lit[..lit.find('"').expect("closing quote")];
                let (_, text) = modules
                    .iter()
                    .find(|(m, _)| *m == module)
                    .unwrap_or_else(|| panic!("unknown module {module}"));
                assert!(
                    text.contains(&format!(".entry {name}(")),
                    "kernel {name} is not in the PTX of {module}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} launches found");
        // The encoder's GEMM kernels, chosen at run time (encode.rs's `Kernel::name`).
        for name in ["encode_tile", "encode_mma"] {
            assert!(
                ptx::ENCODE.contains(&format!(".entry {name}(")),
                "kernel {name} missing"
            );
            assert!(
                include_str!("../src/backend/cuda/encode.rs")
                    .contains(&format!("name: \"{name}\"")),
                "encode.rs does not launch {name}"
            );
        }
    }

    /// Encoder GEMM (`gemm`) + JumpReLU epilogue + sort vs `encode_layer(.., list_near = true)`.
    fn check_jumprelu(
        gpu: &Gpu,
        n_tokens: usize,
        d: usize,
        f_n: usize,
        wide: bool,
        seed: u64,
        gemm: encode::Gemm,
    ) -> Result<(), TestCaseError> {
        let cfg = config(2, d, f_n, false, Activation::JumpRelu);
        let mut rng = Rng::seed(seed);
        let p = bf16_params(&random_params(&cfg, &mut rng));
        let x = round_bf16(&random_batch(&cfg, n_tokens, &mut rng).0);
        let bw = if wide { 1.0 } else { 0.05 };
        prop_assume!(!ambiguous(&cfg, &p, &x, n_tokens, 0.5 * bw));
        let th = sparse::thresholds(&p);
        let l = 1;
        let want = cpu_enc::encode_layer(&cfg, &p, l, &x, n_tokens, &th[l], bw, true);
        let (xd, w, b, t) = (
            gpu.upload_bf16(&x).unwrap(),
            gpu.upload_bf16(&p.w_enc[l]).unwrap(),
            gpu.upload(&p.b_enc[l]).unwrap(),
            gpu.upload(&th[l]).unwrap(),
        );
        let inp = encode::EncodeInput {
            x: &xd,
            x_offset: l * d,
            x_stride: 2 * d,
            n_tokens,
            d,
            w: &w,
            bias: &b,
            n_features: f_n,
        };
        // A small first cap exercises the re-run on overflow.
        let (codes, win) = encode::jumprelu_with(gpu, &inp, &t, 0.5 * bw, 2, gemm).unwrap();
        let got = codes.to_host(gpu).unwrap();
        prop_assert_eq!(&got.offsets, &want.offsets);
        prop_assert_eq!(&got.feat, &want.feat);
        let bounds = preact_bounds(&cfg, &p, &x, n_tokens, l);
        for b in 0..n_tokens {
            for e in want.offsets[b]..want.offsets[b + 1] {
                let s = bounds[b * f_n + want.feat[e] as usize].1;
                close("pre", got.pre[e] as f64, want.pre[e] as f64, s)?;
                close("act", got.act[e] as f64, want.act[e] as f64, s)?;
            }
        }
        let near = gpu.download(&win.near_count).unwrap();
        prop_assert_eq!(&near, &want.window_inactive);
        let ps = gpu.download(&win.preact_sum).unwrap();
        let nh = gpu.download(&win.near_h).unwrap();
        for f in 0..f_n {
            let s: f64 = (0..n_tokens)
                .map(|b| bounds[b * f_n + f].1 + th[l][f] as f64)
                .sum();
            close("preact_sum", ps[f] as f64, want.preact_sum[f], s)?;
            close("near_h", nh[f] as f64, want.window_inactive_h[f], s)?;
        }
        Ok(())
    }

    /// The device's default memory pool keeps what the backend frees (its release threshold at the
    /// maximum, set by `Gpu::open`), so that a step's temporaries reuse the last step's memory instead of
    /// being unmapped at every synchronisation and mapped again. (The emulator records the attribute.)
    #[test]
    fn the_device_pool_keeps_freed_memory() {
        let Some(gpu) = gpu() else { return };
        assert_eq!(gpu.pool_release_threshold().unwrap(), Some(u64::MAX));
    }

    /// Another handle on the device (tests run in parallel, so settings are never switched on a shared
    /// handle): outputs poisoned, the tiled sparse kernels, and `act_grad_partial`'s `tiling` if given.
    fn tiled_handle(tiling: Option<backward::ActTiling>) -> Gpu {
        let g = Gpu::open(0).expect("the device opened once opens again");
        g.set_poison(true);
        g.set_sparse_kernels(SparseKernels::Tiled);
        if let Some(t) = tiling {
            g.set_act_tiling(t).unwrap();
        }
        g
    }

    /// A second handle on the same device whose step runs the tiled sparse kernels (the shared `gpu()`
    /// keeps the gathers).
    fn tiled_gpu() -> Option<&'static Gpu> {
        static TILED: OnceLock<Gpu> = OnceLock::new();
        gpu()?;
        Some(TILED.get_or_init(|| tiled_handle(None)))
    }

    /// A third handle on the device, tiled, with `act_grad_partial`'s shared memory cut small (1,024
    /// accumulators, 300 features a chunk): a group of 32 tokens or a few a tile, lists past 32 entries
    /// partly to `act_grad`, and many feature chunks.
    fn small_tiles_gpu() -> Option<&'static Gpu> {
        static SMALL: OnceLock<Gpu> = OnceLock::new();
        gpu()?;
        let tiling = backward::ActTiling {
            accumulators: 1024,
            feature_chunk: 300,
            ..Default::default()
        };
        Some(SMALL.get_or_init(|| tiled_handle(Some(tiling))))
    }

    /// A fourth handle on the device, tiled, whose `act_grad_partial` leaves the lists of up to one token
    /// in 100 past its rows to `act_grad` (`ActTiling::tail`).
    fn tail_tiles_gpu() -> Option<&'static Gpu> {
        static TAIL: OnceLock<Gpu> = OnceLock::new();
        gpu()?;
        let tiling = backward::ActTiling {
            tail: 100,
            ..Default::default()
        };
        Some(TAIL.get_or_init(|| tiled_handle(Some(tiling))))
    }

    /// One training step's loss and gradient on the GPU (`step::loss_and_grad`) against the CPU's.
    #[allow(clippy::too_many_arguments)]
    fn check_training_step(
        gpu: &Gpu,
        l_n: usize,
        d: usize,
        f_n: usize,
        n_tokens: usize,
        kind: u8,
        k_raw: usize,
        per_layer: bool,
        bandwidth: f32,
        by_h: bool,
        masked: bool,
        skip: bool,
        seed: u64,
    ) -> Result<(), TestCaseError> {
        let k = k_raw.min(f_n);
        let act = match kind {
            0 | 1 => Activation::JumpRelu,
            2 => Activation::TopK { k },
            _ => Activation::BatchTopK {
                k,
                across_layers: seed.is_multiple_of(2),
            },
        };
        let cfg = CltConfig {
            skip,
            ..config(l_n, d, f_n, per_layer, act)
        };
        let mut rng = Rng::seed(seed);
        let p = bf16_params(&random_params(&cfg, &mut rng));
        let (x, y) = random_batch(&cfg, n_tokens, &mut rng);
        let x = round_bf16(&x);
        prop_assume!(!ambiguous(&cfg, &p, &x, n_tokens, 0.5 * bandwidth));
        let norms = decoder_norms(&cfg, &p.w_dec);
        let threshold_grad = if by_h {
            ThresholdGrad::Preact
        } else {
            ThresholdGrad::Theta
        };
        let obj = Objective {
            lambda: 0.9,
            c: 4.0,
            lambda_preact: 0.2,
            bandwidth,
            threshold_grad,
        };
        let mask: Vec<Vec<bool>> = (0..l_n)
            .map(|_| (0..f_n).map(|_| rng.below(2) == 0).collect())
            .collect();
        let mask = masked.then_some(mask.as_slice());
        let mut gc = Grads::zeros(&cfg);
        let sc = sparse::loss_and_grad(&cfg, &p, &norms, &x, &y, n_tokens, &obj, mask, &mut gc);
        let mut gg = Grads::zeros(&cfg);
        // Poison the host gradients too: every tensor must be overwritten.
        for t in gg.p.tensors_mut() {
            t.iter_mut().for_each(|v| *v = f32::NAN);
        }
        let sg = step::loss_and_grad(gpu, &cfg, &p, &norms, &x, &y, n_tokens, &obj, mask, &mut gg)
            .unwrap();
        let loss_scale = sc.loss().abs() + 1.0;
        close("recon", sg.recon, sc.recon, loss_scale)?;
        close("sparsity", sg.sparsity, sc.sparsity, loss_scale)?;
        close("preact", sg.preact, sc.preact, loss_scale)?;
        prop_assert_eq!(&sg.n_active, &sc.n_active);
        prop_assert_eq!(&sg.active_count, &sc.active_count);
        prop_assert_eq!(&gg.dec_touched, &gc.dec_touched);
        // Gradients: compare the materialised full gradient, scaled by its magnitude per tensor.
        let (mg, mc) = (gg.materialize(&cfg, &p), gc.materialize(&cfg, &p));
        let names = p.named(&cfg);
        for ((a, b), n) in mg.tensors().iter().zip(mc.tensors()).zip(&names) {
            let s = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) * 50.0 + 1.0;
            close_all(&n.name, a, b, &vec![s; a.len()])?;
        }
        // The tiled kernels (where d is a multiple of 8) give the gathers' bits for the statistics and
        // every gradient tensor except those downstream of the activation gradients (encoder rows and
        // biases, log θ), which `act_grad_partial` sums in another order where a row is a multiple of 16
        // columns: those within f32 rounding.
        let Some(tg) = tiled_gpu() else { return Ok(()) };
        let mut gt = Grads::zeros(&cfg);
        for t in gt.p.tensors_mut() {
            t.iter_mut().for_each(|v| *v = f32::NAN);
        }
        let st = step::loss_and_grad(tg, &cfg, &p, &norms, &x, &y, n_tokens, &obj, mask, &mut gt)
            .unwrap();
        prop_assert!(
            (
                st.recon.to_bits(),
                st.sparsity.to_bits(),
                st.preact.to_bits()
            ) == (
                sg.recon.to_bits(),
                sg.sparsity.to_bits(),
                sg.preact.to_bits()
            ),
            "tiled step's loss differs from the gathers'"
        );
        prop_assert_eq!(&st.sq_err, &sg.sq_err);
        prop_assert_eq!(&st.active_count, &sg.active_count);
        prop_assert_eq!(&gt.dec_touched, &gg.dec_touched);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for ((a, b), n) in gt.p.tensors().iter().zip(gg.p.tensors()).zip(&names) {
            let reordered = ["W_enc", "b_enc", "log_threshold"]
                .iter()
                .any(|p| n.name.starts_with(p));
            if reordered && d.is_multiple_of(8) {
                close_reordered(&format!("tiled {}", n.name), a, b)?;
            } else {
                prop_assert!(
                    bits(a) == bits(b),
                    "tiled {} differs from the gathers'",
                    n.name
                );
            }
        }
        for (a, b) in gt.dec_coef.iter().zip(&gg.dec_coef) {
            prop_assert!(bits(a) == bits(b), "tiled decoder-norm coefficients differ");
        }
        Ok(())
    }

    /// Dense epilogue (`gemm`) vs `dense_preact`; returns the device's pre-activations.
    fn check_dense(
        gpu: &Gpu,
        cfg: &CltConfig,
        p: &Params,
        x: &[f32],
        n_tokens: usize,
        gemm: encode::Gemm,
    ) -> Result<Vec<f32>, TestCaseError> {
        let (d, f_n) = (cfg.d_model, cfg.n_features);
        let want = cpu_enc::dense_preact(cfg, p, 0, x, n_tokens, cpu_enc_threads());
        let (xd, w, b) = (
            gpu.upload_bf16(x).unwrap(),
            gpu.upload_bf16(&p.w_enc[0]).unwrap(),
            gpu.upload(&p.b_enc[0]).unwrap(),
        );
        let inp = encode::EncodeInput {
            x: &xd,
            x_offset: 0,
            x_stride: d,
            n_tokens,
            d,
            w: &w,
            bias: &b,
            n_features: f_n,
        };
        let h = encode::dense_with(gpu, &inp, gemm).unwrap();
        let got = gpu.download(&h).unwrap();
        let bounds = preact_bounds(cfg, p, x, n_tokens, 0);
        let scale: Vec<f64> = bounds.iter().map(|b| b.1).collect();
        close_all("dense h", &got, &want, &scale)?;
        Ok(got)
    }

    /// The run the training tests share: synthetic data, 48 features, 128 tokens per batch.
    fn small_gpu_run(steps: u64) -> clt::train::RunConfig {
        let mut run = clt::demo::synthetic_config();
        run.model.n_features = 48;
        run.train.steps = steps;
        run.train.batch_size = 128;
        run.train.warmup_steps = 2;
        run.train.calibration_batches = 2;
        run
    }

    /// A short training run on the GPU follows the CPU run, with both CUDA trainers: `cuda` (resident:
    /// parameters, Adam and the clipping norm on the device, batches staged through pinned memory on a
    /// second stream) and `cuda-host` (the step's loss and gradient on the device, Adam on the host). Same
    /// synthetic data, same initialisation, 8 steps.
    ///
    /// Against the CPU, each step's loss within 5%: the device reads W_enc and W_dec in bf16 (the CPU in
    /// f32), about 2⁻⁹ relative per weight, which moves pre-activations, may flip entries within that of θ,
    /// and Adam's early, nearly sign-sized updates carry the difference forward. The 5% is a bound chosen
    /// ahead of the first GPU run, not a measured one: tighten it from the GPU log.
    ///
    /// Resident against `cuda-host`: both read the same bf16 numbers through the same kernels, so the
    /// gradients agree; they differ only in Adam's fp32 arithmetic (device vs host: fused multiply-adds,
    /// `expf` vs `f32::exp` for θ, f64 summation order of the norm), a few ulp per update, which can still
    /// flip an entry sitting on θ. Bound: 10⁻³ relative per step (also chosen before any GPU run).
    #[test]
    fn training_run_on_gpu_matches_cpu() {
        let Some(_gpu) = gpu() else { return };
        let mut run = small_gpu_run(8);
        let mut on_cpu = Trainer::new(run.clone()).unwrap();
        run.train.backend = BackendKind::CudaHost;
        let mut host_adam = Trainer::new(run.clone()).unwrap();
        run.train.backend = BackendKind::Cuda;
        let mut resident = Trainer::new(run).unwrap();
        for step in 0..8 {
            let (a, b, c) = (
                on_cpu.step().unwrap(),
                host_adam.step().unwrap(),
                resident.step().unwrap(),
            );
            let (la, lb, lc) = (a.stats.loss(), b.stats.loss(), c.stats.loss());
            eprintln!(
                "step {step}: loss CPU {la:.6}, cuda-host {lb:.6}, cuda (resident) {lc:.6}; grad norm \
                 CPU {:.6}, cuda-host {:.6}, resident {:.6}",
                a.grad_norm, b.grad_norm, c.grad_norm
            );
            for (name, l) in [("cuda-host", lb), ("cuda (resident)", lc)] {
                assert!(
                    l.is_finite() && (la - l).abs() <= 5e-2 * la.abs() + 1e-6,
                    "step {step}: {name} loss {l} vs CPU {la}"
                );
            }
            assert!(
                (lb - lc).abs() <= 1e-3 * lb.abs() + 1e-6,
                "step {step}: resident loss {lc} vs cuda-host {lb}"
            );
            assert!(
                (b.grad_norm - c.grad_norm).abs() <= 1e-3 * b.grad_norm + 1e-6,
                "step {step}: resident grad norm {} vs cuda-host {}",
                c.grad_norm,
                b.grad_norm
            );
            assert_eq!(b.stats.n_tokens, c.stats.n_tokens);
            assert_eq!(
                b.stats.target_var, c.stats.target_var,
                "step {step}: target variance"
            );
        }
    }

    /// One resident step against one `cuda-host` step from the same state: the same loss (to 10⁻⁵: θ and the
    /// decoder norms are made on the device here, on the host there, a few ulp apart) and nearly the same
    /// gradient (same kernels on the same bf16 numbers), so the parameters and Adam's moments downloaded after it agree to Adam's
    /// fp32 rounding (device vs host): `|Δ| ≤ 10⁻⁵ |p| + 10⁻³ lr` for parameters (an update is at most
    /// about lr), `10⁻⁴` relative to the tensor's largest moment for m and v; the decoder norms the
    /// resident kernels read match the norms of the downloaded decoder, and the bf16 copies are the
    /// downloaded weights rounded (checked through a second step's loss being the `cuda-host` one's).
    #[test]
    fn resident_step_matches_host_adam() {
        let Some(_gpu) = gpu() else { return };
        for skip in [false, true] {
            resident_step_matches_host_adam_with(skip);
        }
    }

    fn resident_step_matches_host_adam_with(skip: bool) {
        let mut run = small_gpu_run(4);
        run.model.skip = skip;
        run.train.backend = BackendKind::CudaHost;
        let mut host_adam = Trainer::new(run.clone()).unwrap();
        run.train.backend = BackendKind::Cuda;
        let mut resident = Trainer::new(run).unwrap();
        let (a, b) = (host_adam.step().unwrap(), resident.step().unwrap());
        assert!(
            (a.stats.loss() - b.stats.loss()).abs() <= 1e-5 * a.stats.loss().abs(),
            "first loss: resident {} vs cuda-host {} (same parameters, same batch)",
            b.stats.loss(),
            a.stats.loss()
        );
        resident.sync_host().unwrap();
        let lr = a.lr;
        let (pa, pb) = (&host_adam.params, &resident.params);
        for (name, ta, tb) in [
            ("w_enc", &pa.w_enc, &pb.w_enc),
            ("b_enc", &pa.b_enc, &pb.b_enc),
            ("log_theta", &pa.log_theta, &pb.log_theta),
            ("w_dec", &pa.w_dec, &pb.w_dec),
            ("b_dec", &pa.b_dec, &pb.b_dec),
            ("w_skip", &pa.w_skip, &pb.w_skip),
        ] {
            assert_eq!(ta.len(), tb.len(), "{name}: layers");
            for (l, (x, y)) in ta.iter().zip(tb).enumerate() {
                assert_eq!(x.len(), y.len(), "{name}[{l}] length");
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    let tol = 1e-5 * u.abs() + 1e-3 * lr;
                    assert!(
                        (u - v).abs() <= tol,
                        "{name}[{l}][{i}]: resident {v} vs cuda-host {u} (tolerance {tol})"
                    );
                }
            }
        }
        let (sa, sb) = (host_adam.adam_state(), resident.adam_state());
        assert_eq!(sa.t, sb.t, "Adam's update count");
        for (name, ma, mb) in [("m", &sa.m, &sb.m), ("v", &sa.v, &sb.v)] {
            for (l, (x, y)) in ma.w_dec.iter().zip(&mb.w_dec).enumerate() {
                let big = x.iter().fold(0f32, |m, u| m.max(u.abs()));
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    assert!(
                        (u - v).abs() <= 1e-4 * big + 1e-12,
                        "{name}.w_dec[{l}][{i}]: resident {v} vs cuda-host {u}"
                    );
                }
            }
            for (t, (ta, tb)) in [
                ("w_enc", (&ma.w_enc, &mb.w_enc)),
                ("w_skip", (&ma.w_skip, &mb.w_skip)),
            ] {
                assert_eq!(ta.len(), tb.len(), "{name}.{t}: layers");
                for (l, (x, y)) in ta.iter().zip(tb).enumerate() {
                    let big = x.iter().fold(0f32, |m, u| m.max(u.abs()));
                    for (i, (u, v)) in x.iter().zip(y).enumerate() {
                        assert!(
                            (u - v).abs() <= 1e-4 * big + 1e-12,
                            "{name}.{t}[{l}][{i}]: resident {v} vs cuda-host {u}"
                        );
                    }
                }
            }
        }
        // The second step reads the refreshed bf16 copies, θ and norms: its loss is the cuda-host one's
        // (whose copies are made on the host from its own parameters) to the same rounding.
        let (a, b) = (host_adam.step().unwrap(), resident.step().unwrap());
        assert!(
            (a.stats.loss() - b.stats.loss()).abs() <= 1e-4 * a.stats.loss().abs() + 1e-6,
            "second loss: resident {} vs cuda-host {}",
            b.stats.loss(),
            a.stats.loss()
        );
    }

    /// A resident run checkpointed at step 3 and resumed (on the resident trainer) reaches step 6 with
    /// exactly the parameters of the uninterrupted run: the checkpoint holds the device's masters and
    /// moments, the source position before the batch already staged for step 4, and the copies the kernels
    /// read are rebuilt by the same kernels (`to_bf16`, `exp_f32`, `row_norms` agrees with `adam_decoder`'s
    /// norm). This also needs every kernel of the step to be deterministic run to run (no float atomics).
    #[test]
    fn resident_checkpoint_resumes_bit_for_bit() {
        let Some(_gpu) = gpu() else { return };
        for skip in [false, true] {
            resident_checkpoint_resumes_bit_for_bit_with(skip);
        }
    }

    fn resident_checkpoint_resumes_bit_for_bit_with(skip: bool) {
        let mut run = small_gpu_run(6);
        run.model.skip = skip;
        run.train.backend = BackendKind::Cuda;
        run.train.checkpoint_every = 3;
        run.train.keep_checkpoints = 4;
        run.train.log_every = 1;
        let dir = tempfile::tempdir().unwrap();
        let mut whole = Trainer::new(run).unwrap();
        whole.train(dir.path(), true).unwrap();
        let at3 = dir.path().join("checkpoints").join("step_00000003");
        let mut resumed = Trainer::resume(&at3, None).unwrap();
        assert_eq!(resumed.step, 3);
        let dir2 = tempfile::tempdir().unwrap();
        resumed.train(dir2.path(), true).unwrap();
        assert_eq!(resumed.step, 6);
        assert!(
            resumed.params == whole.params,
            "resumed parameters differ from the uninterrupted run's"
        );
        assert!(
            resumed.adam_state() == whole.adam_state(),
            "resumed Adam state differs from the uninterrupted run's"
        );
        // The checkpoint is the CPU trainer's format: it loads as a transcoder.
        let t = clt::clt::checkpoint::load_transcoder(&at3).unwrap();
        assert_eq!(t.params.w_dec.len(), whole.params.w_dec.len());
    }

    /// `--backend cuda` on a store of int8 (and int4) rows: batches staged as the store's codes and decoded
    /// and normalised on the device (`train.device_dequant`, the default) give the run that batches decoded
    /// and normalised on the host and staged in f32 give, bit for bit: every step's loss, the parameters
    /// and Adam's state. (The device multiplies the same two products as the host, and the bf16 copy of x
    /// rounds the same f32 values.)
    #[test]
    fn resident_decodes_store_batches_on_the_device() {
        let Some(_gpu) = gpu() else { return };
        for codec in [Codec::Int8, Codec::Int4] {
            let dir = tempfile::tempdir().unwrap();
            let mut run = small_gpu_run(5);
            super::common::store::synthetic_store(&mut run, dir.path(), codec, 700, 300);
            run.train.backend = BackendKind::Cuda;
            let run_dev = run.clone();
            let mut on_device = Trainer::new(run.clone()).unwrap();
            run.train.device_dequant = false;
            let mut on_host = Trainer::new(run).unwrap();
            for step in 0..5 {
                let (a, b) = (on_device.step().unwrap(), on_host.step().unwrap());
                assert_eq!(
                    a.stats.loss().to_bits(),
                    b.stats.loss().to_bits(),
                    "{codec:?} step {step}: loss {} decoded on the device, {} on the host",
                    a.stats.loss(),
                    b.stats.loss()
                );
                assert_eq!(
                    a.stats.target_var, b.stats.target_var,
                    "{codec:?} step {step}"
                );
            }
            on_device.sync_host().unwrap();
            on_host.sync_host().unwrap();
            assert!(
                on_device.params == on_host.params,
                "{codec:?}: parameters differ"
            );
            assert!(
                on_device.adam_state() == on_host.adam_state(),
                "{codec:?}: Adam state differs"
            );
            // Checkpointed at step 2 with a coded batch staged for step 3, and resumed: the same run.
            let mut run = run_dev;
            run.train.checkpoint_every = 2;
            run.train.keep_checkpoints = 4;
            let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let mut whole = Trainer::new(run).unwrap();
            whole.train(d1.path(), true).unwrap();
            assert!(
                whole.params == on_device.params,
                "{codec:?}: train() differs from step()"
            );
            let at2 = d1.path().join("checkpoints").join("step_00000002");
            let mut resumed = Trainer::resume(&at2, None).unwrap();
            resumed.train(d2.path(), true).unwrap();
            assert_eq!(resumed.step, 5);
            assert!(
                resumed.params == whole.params,
                "{codec:?}: resumed parameters differ from the uninterrupted run's"
            );
        }
    }

    /// `train.sparse_kernels = "tiled"` reaches the device of a new and of a resumed trainer; it trains the
    /// run the gathers train (d = 32: every tiled kernel applies, `act_grad_partial` with its sums in
    /// another order, so within 10⁻⁴ relative L2 per tensor after 4 steps rather than to the bit), and
    /// resumed from its step-2 checkpoint it ends where it ended, to the bit (the tiled step is
    /// deterministic).
    #[test]
    fn tiled_kernels_train_the_gathers_run() {
        let Some(_gpu) = gpu() else { return };
        let mut run = small_gpu_run(4);
        run.train.backend = BackendKind::Cuda;
        run.train.checkpoint_every = 2;
        let mut gather = Trainer::new(run.clone()).unwrap();
        run.train.sparse_kernels = SparseKernels::Tiled;
        let mut tiled = Trainer::new(run).unwrap();
        assert_eq!(
            gather.backend().sparse_kernels(),
            Some(SparseKernels::Gather)
        );
        assert_eq!(tiled.backend().sparse_kernels(), Some(SparseKernels::Tiled));
        let (d1, d2, d3) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        gather.train(d1.path(), true).unwrap();
        tiled.train(d2.path(), true).unwrap();
        super::common::runs::assert_params_close("tiled run", &tiled.params, &gather.params, 1e-4);
        let at2 = d2.path().join("checkpoints").join("step_00000002");
        let mut resumed = Trainer::resume(&at2, None).unwrap();
        assert_eq!(
            resumed.backend().sparse_kernels(),
            Some(SparseKernels::Tiled)
        );
        resumed.train(d3.path(), true).unwrap();
        assert!(
            resumed.params == tiled.params,
            "the resumed tiled run differs"
        );
    }

    /// `train.encoder_kernel = "wgmma"` reaches the device of a new and of a resumed trainer (where the
    /// device has wgmma; elsewhere the trainer, and the three wgmma kernels asked for by name, are
    /// refused with a typed error: scripts/test.sh runs this on the emulator as compute capability 8.0),
    /// and it trains the run
    /// `encode_mma` trains (d = 32, every encoder launch on the warpgroup MMA: on the GPU the tensor cores
    /// add in another order, so within 10⁻⁴ relative L2 per tensor after 4 steps), and so does
    /// `"wgmma_narrow"` and `"wgmma_tma"`; resumed from its step-2 checkpoint the wgmma run ends where it ended, to the bit.
    #[test]
    fn wgmma_encoder_trains_the_mma_run() {
        let Some(gpu) = gpu() else { return };
        let mut run = small_gpu_run(4);
        run.train.backend = BackendKind::Cuda;
        run.train.checkpoint_every = 2;
        let mut mma = Trainer::new(run.clone()).unwrap();
        run.train.encoder_kernel = EncoderKernel::Wgmma;
        if !gpu.has_wgmma() {
            let e = Trainer::new(run)
                .err()
                .expect("wgmma refused without compute capability 9.x");
            assert!(matches!(e, clt::Error::Unsupported(_)), "{e}");
            // And the kernels themselves, asked for by name.
            let (x, w, b) = (
                gpu.upload_bf16(&[0.5; 16]).unwrap(),
                gpu.upload_bf16(&[0.25; 16]).unwrap(),
                gpu.upload(&[0.0f32; 2]).unwrap(),
            );
            let inp = encode::EncodeInput {
                x: &x,
                x_offset: 0,
                x_stride: 8,
                n_tokens: 2,
                d: 8,
                w: &w,
                bias: &b,
                n_features: 2,
            };
            for g in WGMMA_KERNELS {
                let e = encode::dense_with(gpu, &inp, g).err().expect("refused");
                assert!(matches!(e, clt::Error::Unsupported(_)), "{g:?}: {e}");
            }
            assert!(encode::dense_with(gpu, &inp, encode::Gemm::TensorCore).is_ok());
            eprintln!(
                "wgmma_encoder_trains_the_mma_run: {} has no wgmma: refused ({e})",
                gpu.describe()
            );
            return;
        }
        let mut wg = Trainer::new(run.clone()).unwrap();
        run.train.encoder_kernel = EncoderKernel::WgmmaNarrow;
        let mut narrow = Trainer::new(run.clone()).unwrap();
        run.train.encoder_kernel = EncoderKernel::WgmmaTma;
        let mut tma = Trainer::new(run).unwrap();
        assert_eq!(
            tma.backend().encoder_kernel(),
            Some(EncoderKernel::WgmmaTma)
        );
        assert_eq!(mma.backend().encoder_kernel(), Some(EncoderKernel::Mma));
        assert_eq!(
            narrow.backend().encoder_kernel(),
            Some(EncoderKernel::WgmmaNarrow)
        );
        assert_eq!(wg.backend().encoder_kernel(), Some(EncoderKernel::Wgmma));
        let (d1, d2, d3, d4, d5) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        mma.train(d1.path(), true).unwrap();
        wg.train(d2.path(), true).unwrap();
        narrow.train(d4.path(), true).unwrap();
        tma.train(d5.path(), true).unwrap();
        super::common::runs::assert_params_close("wgmma run", &wg.params, &mma.params, 1e-4);
        super::common::runs::assert_params_close(
            "wgmma_narrow run",
            &narrow.params,
            &mma.params,
            1e-4,
        );
        super::common::runs::assert_params_close("wgmma_tma run", &tma.params, &mma.params, 1e-4);
        let at2 = d2.path().join("checkpoints").join("step_00000002");
        let mut resumed = Trainer::resume(&at2, None).unwrap();
        assert_eq!(
            resumed.backend().encoder_kernel(),
            Some(EncoderKernel::Wgmma)
        );
        resumed.train(d3.path(), true).unwrap();
        assert!(resumed.params == wg.params, "the resumed wgmma run differs");
    }

    /// `encoder_kernel = "auto"` and `sparse_kernels = "auto"` (the name says wgmma: on compute capability
    /// 9.x the candidates include the wgmma encoders, so gpu-check.sh runs it with them, last). On both CUDA
    /// trainers, the first step times every encoder the device runs with the gathers, then the tiled
    /// kernels with the encoder chosen; all agree with the reference here, so all are timed, and the run
    /// keeps the fastest. `tuning.json` says so; the checkpoints record the choice; a run resumed from one
    /// runs it from its first step, without timing anything, and ends where the whole run ended, to the
    /// bit. With the encoder fixed, only the sparse kernels are tried.
    #[test]
    fn auto_kernels_time_the_wgmma_encoders_and_keep_their_choice() {
        let Some(gpu) = gpu() else { return };
        let encoders = if gpu.has_wgmma() { 4 } else { 1 };
        for backend in [BackendKind::Cuda, BackendKind::CudaHost] {
            let mut run = small_gpu_run(4);
            run.train.backend = backend;
            run.train.checkpoint_every = 2;
            run.train.encoder_kernel = EncoderKernel::Auto;
            run.train.sparse_kernels = SparseKernels::Auto;
            run.train.act_blocks = ActBlocks::Auto;
            let mut whole = Trainer::new(run.clone()).unwrap();
            assert_eq!(
                whole.kernels(),
                None,
                "{backend:?}: resolved before the first step"
            );
            let dir = tempfile::tempdir().unwrap();
            whole.train(dir.path(), true).unwrap();
            let chosen = whole.kernels().expect("resolved by the first step");
            assert!(!chosen.is_auto(), "{backend:?}: {chosen}");
            assert_eq!(whole.backend().encoder_kernel(), Some(chosen.encoder));
            assert_eq!(whole.backend().sparse_kernels(), Some(chosen.sparse));
            assert_eq!(whole.backend().act_blocks(), Some(chosen.act_blocks));
            let text = std::fs::read_to_string(dir.path().join("tuning.json")).unwrap();
            let report: Tuning = serde_json::from_str(&text).unwrap();
            assert_eq!(report.chosen, chosen);
            // The act_blocks trials only where the tiled kernels beat the gathers.
            let tiled_won = {
                let t = &report.trials;
                t[..encoders].iter().all(|g| t[encoders].ms < g.ms)
            };
            let acts = if tiled_won { 2 } else { 0 };
            assert_eq!(
                report.trials.len(),
                encoders + 1 + acts,
                "{backend:?}: {text}"
            );
            let first = KernelChoice {
                encoder: EncoderKernel::Mma,
                sparse: SparseKernels::Gather,
                act_blocks: ActBlocks::One,
            };
            assert_eq!(report.trials[0].kernels, first, "the reference runs first");
            let mut fastest = (first, f64::INFINITY);
            for (i, t) in report.trials.iter().enumerate() {
                assert_eq!(t.disagrees, None, "{backend:?}: {} disagrees", t.kernels);
                let ms = t.ms.expect("every agreeing candidate is timed");
                assert!(ms > 0.0 && ms.is_finite(), "{}: {ms} ms", t.kernels);
                let sparse = if i < encoders {
                    SparseKernels::Gather
                } else {
                    SparseKernels::Tiled
                };
                assert_eq!(t.kernels.sparse, sparse, "trial {i}");
                let act = [ActBlocks::Two, ActBlocks::Three];
                let act = i
                    .checked_sub(encoders + 1)
                    .map_or(ActBlocks::One, |j| act[j]);
                assert_eq!(t.kernels.act_blocks, act, "trial {i}");
                if i > encoders {
                    assert_eq!(t.kernels.encoder, report.trials[encoders].kernels.encoder);
                }
                if ms < fastest.1 {
                    fastest = (t.kernels, ms);
                }
            }
            assert_eq!(chosen, fastest.0, "{backend:?}: not the fastest");
            // The tiled trial runs the encoder the gathers' trials chose.
            let by_encoder = report.trials[..encoders]
                .iter()
                .min_by(|a, b| a.ms.unwrap().total_cmp(&b.ms.unwrap()))
                .unwrap();
            assert_eq!(
                report.trials[encoders].kernels.encoder,
                by_encoder.kernels.encoder
            );
            // Resumed: the checkpoint's choice from the start, and the same run.
            let at2 = dir.path().join("checkpoints").join("step_00000002");
            let state = std::fs::read_to_string(at2.join("state.json")).unwrap();
            let state: serde_json::Value = serde_json::from_str(&state).unwrap();
            assert_eq!(state["kernels"], serde_json::to_value(chosen).unwrap());
            let mut resumed = Trainer::resume(&at2, None).unwrap();
            assert_eq!(resumed.kernels(), Some(chosen));
            assert_eq!(resumed.backend().encoder_kernel(), Some(chosen.encoder));
            assert_eq!(resumed.backend().sparse_kernels(), Some(chosen.sparse));
            assert_eq!(resumed.backend().act_blocks(), Some(chosen.act_blocks));
            let dir2 = tempfile::tempdir().unwrap();
            resumed.train(dir2.path(), true).unwrap();
            assert!(
                !dir2.path().join("tuning.json").exists(),
                "{backend:?}: the resumed run timed the candidates again"
            );
            assert!(
                resumed.params == whole.params,
                "{backend:?}: the resumed run differs"
            );
            // Whatever the checkpoint records is what the resumed run sets up (here, one that the
            // timing above may or may not have chosen).
            let other = KernelChoice {
                encoder: EncoderKernel::Mma,
                sparse: SparseKernels::Tiled,
                act_blocks: ActBlocks::Three,
            };
            let mut state = state;
            state["kernels"] = serde_json::to_value(other).unwrap();
            std::fs::write(at2.join("state.json"), state.to_string()).unwrap();
            let resumed = Trainer::resume(&at2, None).unwrap();
            assert_eq!(resumed.kernels(), Some(other));
            assert_eq!(resumed.backend().encoder_kernel(), Some(other.encoder));
            assert_eq!(resumed.backend().sparse_kernels(), Some(other.sparse));
            assert_eq!(resumed.backend().act_blocks(), Some(other.act_blocks));
            // A recorded wgmma encoder: kept on compute capability 9.x; elsewhere the candidates are
            // timed again (the device would refuse it).
            let wgmma = KernelChoice {
                encoder: EncoderKernel::Wgmma,
                ..other
            };
            state["kernels"] = serde_json::to_value(wgmma).unwrap();
            std::fs::write(at2.join("state.json"), state.to_string()).unwrap();
            let mut resumed = Trainer::resume(&at2, None).unwrap();
            if gpu.has_wgmma() {
                assert_eq!(resumed.kernels(), Some(wgmma));
                assert_eq!(
                    resumed.backend().encoder_kernel(),
                    Some(EncoderKernel::Wgmma)
                );
            } else {
                assert_eq!(resumed.kernels(), None, "{backend:?}: kept what cannot run");
                assert_eq!(resumed.backend().encoder_kernel(), Some(EncoderKernel::Mma));
                let dir3 = tempfile::tempdir().unwrap();
                resumed.train(dir3.path(), true).unwrap();
                let text = std::fs::read_to_string(dir3.path().join("tuning.json")).unwrap();
                let report: Tuning = serde_json::from_str(&text).unwrap();
                assert_eq!(resumed.kernels(), Some(report.chosen));
                assert_eq!(report.chosen.encoder, EncoderKernel::Mma);
            }
        }
        // The encoder fixed: the gathers against the tiled kernels, with that encoder; the tiled kernels
        // fixed: act_grad_partial's three divisions.
        let tried = |sparse, act_blocks, d| {
            let mut run = small_gpu_run(1);
            run.model.d_model = d;
            run.train.backend = BackendKind::Cuda;
            run.train.sparse_kernels = sparse;
            run.train.act_blocks = act_blocks;
            let mut t = Trainer::new(run).unwrap();
            let dir = tempfile::tempdir().unwrap();
            t.train(dir.path(), true).unwrap();
            let text = std::fs::read_to_string(dir.path().join("tuning.json")).unwrap();
            let report: Tuning = serde_json::from_str(&text).unwrap();
            assert_eq!(t.kernels(), Some(report.chosen));
            let tried: Vec<_> = report
                .trials
                .iter()
                .map(|t| t.kernels.to_string())
                .collect();
            tried
        };
        assert_eq!(
            tried(SparseKernels::Auto, ActBlocks::One, 32),
            ["mma + gather", "mma + tiled"]
        );
        // Rows of 36 columns: the tiled kernels would run the gathers, so they are not tried.
        assert_eq!(
            tried(SparseKernels::Auto, ActBlocks::Auto, 36),
            ["mma + gather"]
        );
        assert_eq!(
            tried(SparseKernels::Tiled, ActBlocks::Auto, 32),
            [
                "mma + tiled",
                "mma + tiled, act_blocks two",
                "mma + tiled, act_blocks three"
            ]
        );
        // Nothing auto: nothing timed.
        let mut fixed = Trainer::new(small_gpu_run(1)).unwrap();
        assert_eq!(
            fixed.kernels(),
            Some(KernelChoice {
                encoder: EncoderKernel::Mma,
                sparse: SparseKernels::Gather,
                act_blocks: ActBlocks::One,
            })
        );
        let dir = tempfile::tempdir().unwrap();
        fixed.train(dir.path(), true).unwrap();
        assert!(!dir.path().join("tuning.json").exists());
    }

    /// A candidate whose step disagrees with the reference's is reported and never chosen, however fast:
    /// here the step reports a loss 1% off whenever `encode_wgmma` runs (on compute capability 9.x; the
    /// tiled kernels elsewhere), and the timer says it is the fastest. The candidates' order and the
    /// choice among the rest follow the timer.
    #[test]
    fn auto_kernels_never_choose_a_disagreeing_wgmma_candidate() {
        let Some(_) = gpu() else { return };
        // A handle of its own: the tuning switches its kernels (tests run in parallel).
        let own = Gpu::open(0).unwrap();
        own.set_poison(true);
        let gpu = &own;
        let cfg = config(3, 32, 40, false, Activation::JumpRelu);
        let mut rng = Rng::seed(7);
        let p = random_params(&cfg, &mut rng);
        let (x, y) = random_batch(&cfg, 96, &mut rng);
        let norms = decoder_norms(&cfg, &p.w_dec);
        let obj = Objective {
            lambda: 0.9,
            c: 4.0,
            lambda_preact: 0.2,
            bandwidth: 1.0,
            threshold_grad: ThresholdGrad::Theta,
        };
        let dp = step::DeviceParams::upload(gpu, &p, &norms).unwrap();
        let batch = step::DeviceBatch::upload(gpu, &x, &y, 96).unwrap();
        let broken = if gpu.has_wgmma() {
            "wgmma + gather"
        } else {
            "mma + tiled"
        };
        // Milliseconds by candidate: the broken one fastest, then wgmma_narrow, then the rest.
        struct Said(Vec<String>);
        impl bench::Timer for Said {
            fn time(
                &mut self,
                _gpu: &Gpu,
                name: &str,
                f: &mut dyn FnMut() -> clt::Result<()>,
            ) -> clt::Result<f64> {
                f()?;
                self.0.push(name.to_string());
                Ok(match name {
                    "wgmma + gather" | "mma + tiled" => 1.0,
                    "wgmma_narrow + gather" => 2.0,
                    _ => 3.0,
                })
            }
        }
        let mut said = Said(Vec::new());
        let wanted = KernelChoice {
            encoder: EncoderKernel::Auto,
            sparse: SparseKernels::Auto,
            act_blocks: ActBlocks::One,
        };
        let mut run = || {
            let (mut stats, g) = step::device_loss_and_grad(gpu, &cfg, &dp, &batch, &obj, None)?;
            let now = KernelChoice {
                encoder: gpu.encoder_kernel(),
                sparse: gpu.sparse_kernels(),
                act_blocks: ActBlocks::One,
            };
            if now.to_string() == broken {
                stats.recon *= 1.01;
            }
            Ok((stats, g))
        };
        let report = tune::tune(gpu, wanted, true, &mut run, &mut said).unwrap();
        let tried: Vec<_> = report
            .trials
            .iter()
            .map(|t| t.kernels.to_string())
            .collect();
        let (want_tried, want_chosen): (&[&str], &str) = if gpu.has_wgmma() {
            (
                &[
                    "mma + gather",
                    "wgmma + gather",
                    "wgmma_narrow + gather",
                    "wgmma_tma + gather",
                    "wgmma_narrow + tiled",
                ],
                "wgmma_narrow + gather",
            )
        } else {
            (&["mma + gather", "mma + tiled"], "mma + gather")
        };
        assert_eq!(tried, want_tried);
        assert_eq!(report.chosen.to_string(), want_chosen);
        let bad = report
            .trials
            .iter()
            .find(|t| t.kernels.to_string() == broken)
            .unwrap();
        let why = bad
            .disagrees
            .as_deref()
            .expect("the broken candidate disagrees");
        assert!(why.starts_with("loss"), "{why}");
        assert_eq!(bad.ms, None, "a disagreeing candidate is not timed");
        assert!(!said.0.iter().any(|n| n == broken), "timed: {:?}", said.0);
        assert!(
            report
                .lines()
                .iter()
                .any(|l| l.contains("not used: disagrees"))
        );
        // The device is left on the choice.
        assert_eq!(gpu.encoder_kernel(), report.chosen.encoder);
        assert_eq!(gpu.sparse_kernels(), report.chosen.sparse);
    }

    /// `encode_wgmma_tma` runs a persistent grid (one block an SM; the emulator reports one SM): a block
    /// loops over its tiles, its producer warp loading the next tile's slices while the consumers run the
    /// epilogue. Fixed shapes of 3 tiles (along tokens, along features; few pre-activations, so that some
    /// seed has none within rounding of a threshold) with 1, 3 and 5 K slices (fewer than the 4 stages, and
    /// more), both epilogues, against the CPU (the JumpReLU one on the first of 32 seeds that qualifies).
    #[test]
    fn wgmma_tma_encoder_loops_over_tiles() {
        let Some(gpu) = gpu() else { return };
        if !wgmma(gpu) {
            return;
        }
        for (i, &(n_tokens, d, f_n)) in [(300, 64, 8), (2, 136, 600), (260, 264, 4)]
            .iter()
            .enumerate()
        {
            for wide in [false, true] {
                // The first seed whose pre-activations are not within rounding of a threshold.
                let ran = (0..32).any(|seed| {
                    match check_jumprelu(gpu, n_tokens, d, f_n, wide, seed, encode::Gemm::WgmmaTma)
                    {
                        Ok(()) => true,
                        Err(TestCaseError::Reject(_)) => false,
                        Err(e) => panic!("JumpReLU, {n_tokens} × {d} × {f_n}: {e}"),
                    }
                });
                assert!(ran, "{n_tokens} × {d} × {f_n}: no unambiguous seed");
            }
            let cfg = config(1, d, f_n, false, Activation::TopK { k: 1 });
            let mut rng = Rng::seed(11 + i as u64);
            let p = bf16_params(&random_params(&cfg, &mut rng));
            let x = round_bf16(&random_batch(&cfg, n_tokens, &mut rng).0);
            check_dense(gpu, &cfg, &p, &x, n_tokens, encode::Gemm::WgmmaTma)
                .unwrap_or_else(|e| panic!("dense, {n_tokens} × {d} × {f_n}: {e}"));
        }
    }

    /// `Resident::stage_coded` checks what it is given before touching a slot: a batch of other layers,
    /// width or byte counts, scales for other layers and a codec the device does not decode are typed
    /// errors that stage nothing; the normalisation cannot change while a coded batch waits (it would be
    /// decoded with the new factors), but can once the staged batches are stepped; a third batch before a
    /// step is refused.
    #[test]
    fn stage_coded_refuses_what_it_cannot_decode() {
        use clt::Error;
        use clt::backend::cpu::adam::{AdamHyper, AdamState};
        use clt::backend::cuda::resident::Resident;
        use clt::clt::NormScales;
        use clt::data::{ActDims, CodedBatch};
        let Some(_gpu) = gpu() else { return };
        let (l_n, d, f_n, n) = (2usize, 5usize, 7usize, 3usize);
        let cfg = config(l_n, d, f_n, false, Activation::JumpRelu);
        let params = Params::init(&cfg, 0.03, &mut Rng::seed(1));
        let gpu = std::sync::Arc::new(Gpu::open(0).unwrap());
        let mut res = Resident::new(
            gpu,
            &cfg,
            &params,
            &AdamState::new(&cfg),
            AdamHyper::default(),
        )
        .unwrap();
        // n·L rows of d int8 codes: every row's f32 scale, then the codes.
        let rows = n * l_n;
        let stream = |seed: u8| -> Vec<u8> {
            let mut v: Vec<u8> = (0..rows).flat_map(|_| 0.02f32.to_le_bytes()).collect();
            v.extend((0..rows * d).map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed)));
            v
        };
        let good = CodedBatch {
            n_tokens: n,
            dims: ActDims {
                n_layers: l_n,
                d_model: d,
            },
            codec: Codec::Int8,
            x: stream(1),
            y: stream(2),
        };
        let norms = NormScales::identity(l_n);
        let shape = |r: clt::Result<()>, what: &str| match r {
            Err(Error::Shape { .. }) => {}
            other => panic!("{what}: expected a shape error, got {other:?}"),
        };
        let mut b = good.clone();
        b.dims.n_layers = l_n + 1;
        shape(res.stage_coded(&b, &norms), "other layers");
        let mut b = good.clone();
        b.dims.d_model = d - 1;
        shape(res.stage_coded(&b, &norms), "other width");
        let mut b = good.clone();
        b.x.pop();
        shape(res.stage_coded(&b, &norms), "x a byte short");
        let mut b = good.clone();
        b.y.push(0);
        shape(res.stage_coded(&b, &norms), "y a byte long");
        shape(
            res.stage_coded(&good, &NormScales::identity(l_n - 1)),
            "scales of fewer layers",
        );
        let mut b = good.clone();
        b.codec = Codec::Int8p;
        assert!(
            matches!(res.stage_coded(&b, &norms), Err(Error::Unsupported(_))),
            "a codec the device does not decode"
        );
        assert_eq!(res.staged(), 0, "a refused batch must stage nothing");

        res.stage_coded(&good, &norms).unwrap();
        let mut other = norms.clone();
        other.target[1] = 0.5;
        assert!(
            matches!(res.stage_coded(&good, &other), Err(Error::Unsupported(_))),
            "the normalisation changed under a staged coded batch"
        );
        res.stage_coded(&good, &norms).unwrap();
        assert!(
            matches!(res.stage_coded(&good, &norms), Err(Error::Unsupported(_))),
            "a third staged batch"
        );
        assert_eq!(res.staged(), 2);
        let obj = Objective {
            lambda: 0.1,
            c: 1.0,
            lambda_preact: 0.0,
            bandwidth: 0.1,
            threshold_grad: ThresholdGrad::Theta,
        };
        let first = res.step(&obj, None, 1e-3, 0.0, 0).unwrap().stats.loss();
        res.step(&obj, None, 1e-3, 0.0, 1).unwrap();
        assert!(first.is_finite(), "loss {first}");
        res.stage_coded(&good, &other).unwrap();
        assert_eq!(res.staged(), 1);
        res.step(&obj, None, 1e-3, 0.0, 2).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// SIMT encoder (`encode_tile`) + JumpReLU epilogue + sort vs the CPU, any d.
        #[test]
        fn encoder_jumprelu_matches_cpu(
            n_tokens in 0usize..150, d in 1usize..80, f_n in 1usize..150,
            wide in any::<bool>(), seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            check_jumprelu(gpu, n_tokens, d, f_n, wide, seed, encode::Gemm::Simt)?;
        }

        /// Tensor-core encoder (`encode_mma`, 128 × 128 × 32 tiles) + JumpReLU epilogue vs the CPU: token and
        /// feature counts not multiples of 128, d a multiple of 8 but mostly not of 32 (the K remainder), up
        /// to 232 (8 K slices: the ring of 4 shared-memory stages wraps).
        #[test]
        fn encoder_tensor_core_jumprelu_matches_cpu(
            n_tokens in 0usize..300, d8 in 1usize..30, f_n in 1usize..300,
            wide in any::<bool>(), seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            check_jumprelu(gpu, n_tokens, 8 * d8, f_n, wide, seed, encode::Gemm::TensorCore)?;
        }

        /// Warpgroup-MMA encoders (sm_90a: `encode_wgmma`, 128 × 256 × 64 tiles, `encode_wgmma_narrow`,
        /// 128 × 128 × 32, or `encode_wgmma_tma`, 128 × 256 × 64 through the TMA) + JumpReLU epilogue vs the
        /// CPU: token and feature counts not multiples of the tile
        /// (up to two token and three feature tiles; more pre-activations would put one within rounding of a
        /// threshold too often), d a multiple of 8 but mostly not of the K slice (the K remainder), up to 392
        /// (7 or 13 K slices: the ring of 4 stages wraps).
        #[test]
        fn encoder_wgmma_jumprelu_matches_cpu(
            n_tokens in 0usize..200, d8 in 1usize..50, f_n in 1usize..320,
            wide in any::<bool>(), kernel in 0usize..3, seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            if !wgmma(gpu) { return Ok(()) }
            check_jumprelu(gpu, n_tokens, 8 * d8, f_n, wide, seed, WGMMA_KERNELS[kernel])?;
        }

        /// Warpgroup-MMA dense epilogue (TopK / BatchTopK), the three kernels, vs `dense_preact`.
        #[test]
        fn encoder_wgmma_dense_matches_cpu(
            n_tokens in 0usize..300, d8 in 1usize..50, f_n in 1usize..600, kernel in 0usize..3,
            seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            if !wgmma(gpu) { return Ok(()) }
            let cfg = config(1, 8 * d8, f_n, false, Activation::TopK { k: 1 });
            let mut rng = Rng::seed(seed);
            let p = bf16_params(&random_params(&cfg, &mut rng));
            let x = round_bf16(&random_batch(&cfg, n_tokens, &mut rng).0);
            check_dense(gpu, &cfg, &p, &x, n_tokens, WGMMA_KERNELS[kernel])?;
        }

        /// Tensor-core dense epilogue (TopK / BatchTopK) vs `dense_preact`.
        #[test]
        fn encoder_tensor_core_dense_matches_cpu(
            n_tokens in 0usize..300, d8 in 1usize..30, f_n in 1usize..400, seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let cfg = config(1, 8 * d8, f_n, false, Activation::TopK { k: 1 });
            let mut rng = Rng::seed(seed);
            let p = bf16_params(&random_params(&cfg, &mut rng));
            let x = round_bf16(&random_batch(&cfg, n_tokens, &mut rng).0);
            check_dense(gpu, &cfg, &p, &x, n_tokens, encode::Gemm::TensorCore)?;
        }

        /// Dense epilogue vs `dense_preact`; per-row top-k vs `topk_indices` + ReLU on the same values.
        #[test]
        fn encoder_dense_and_topk_match_cpu(
            n_tokens in 0usize..100, d in 1usize..70, f_n in 1usize..600, k_raw in 1usize..40,
            ties in any::<bool>(), seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let k = k_raw.min(f_n);
            let cfg = config(1, d, f_n, false, Activation::TopK { k });
            let mut rng = Rng::seed(seed);
            let p = bf16_params(&random_params(&cfg, &mut rng));
            let x = round_bf16(&random_batch(&cfg, n_tokens, &mut rng).0);
            let got = check_dense(gpu, &cfg, &p, &x, n_tokens, encode::Gemm::Simt)?;
            // Top-k on exactly the device's values (ties: quantise them to few levels, some negative).
            let vals: Vec<f32> = if ties { got.iter().map(|v| (v * 2.0).round() / 2.0).collect() } else { got };
            let hv = gpu.upload(&vals).unwrap();
            let codes = topk::topk_rows(gpu, &hv, n_tokens, f_n, k).unwrap().to_host(gpu).unwrap();
            for b in 0..n_tokens {
                let row = &vals[b * f_n..(b + 1) * f_n];
                let sel: Vec<u32> = cpu_enc::topk_indices(row, k).into_iter()
                    .filter(|f| row[*f as usize] > 0.0).collect();
                prop_assert_eq!(&codes.feat[codes.offsets[b]..codes.offsets[b + 1]], &sel[..]);
                for e in codes.offsets[b]..codes.offsets[b + 1] {
                    prop_assert_eq!(codes.act[e], row[codes.feat[e] as usize]);
                }
            }
        }

        /// BatchTopK (per layer and across layers) vs `batch_topk_codes` on the same values, ties included.
        #[test]
        fn batch_topk_matches_cpu(
            l_n in 1usize..4, n_tokens in 0usize..40, f_n in 1usize..300, k in 1usize..20,
            across in any::<bool>(), levels in prop_oneof![Just(0u32), Just(4u32)], seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let k = k.min(f_n);
            let mut rng = Rng::seed(seed);
            let pre: Vec<Vec<f32>> = (0..l_n).map(|_| (0..n_tokens * f_n).map(|_| {
                let v = rng.normal() as f32;
                if levels > 0 { (v * levels as f32).round() / levels as f32 } else { v }
            }).collect()).collect();
            let want = cpu_enc::batch_topk_codes(&pre, n_tokens, f_n, k, across);
            let dev = gpu.upload(&pre.concat()).unwrap();
            let got = topk::batch_topk(gpu, &dev, l_n, n_tokens, f_n, k, across).unwrap();
            for l in 0..l_n {
                let g = got[l].to_host(gpu).unwrap();
                prop_assert_eq!(&g.offsets, &want[l].offsets, "layer {}", l);
                prop_assert_eq!(&g.feat, &want[l].feat, "layer {}", l);
                prop_assert_eq!(&g.act, &want[l].act, "layer {}", l);
            }
        }

        /// Sparse decode + residual + squared error vs `decode` and `residual` on the CPU's own codes. Widths:
        /// any (mostly the scalar path), multiples of 8 (the 16-byte vector path, one pass of 2,048 outputs
        /// a block), and multiples of 8 around 2,048 (the vector path's second pass).
        #[test]
        fn decode_matches_cpu(
            l_n in 1usize..5, d_kind in 0u8..3, d_raw in 1usize..300, f_n in 1usize..80, n_tokens in 0usize..60,
            per_layer in any::<bool>(), dense_codes in any::<bool>(), seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let d = match d_kind {
                0 => d_raw,
                1 => 8 * (1 + d_raw % 40),
                _ => 8 * (250 + d_raw % 16),
            };
            let cfg = config(l_n, d, f_n, per_layer, Activation::JumpRelu);
            let mut rng = Rng::seed(seed);
            let mut p = bf16_params(&random_params(&cfg, &mut rng));
            if dense_codes {
                // Every feature active on every token (all-active rows).
                p.log_theta.iter_mut().for_each(|t| t.iter_mut().for_each(|v| *v = -30.0));
                p.b_enc.iter_mut().for_each(|t| t.iter_mut().for_each(|v| *v = 100.0));
            }
            let (x, y) = random_batch(&cfg, n_tokens, &mut rng);
            let codes = cpu_enc::encode_all(&cfg, &p, &x, n_tokens, &sparse::thresholds(&p), 0.1);
            let want = sparse::decode(&cfg, &p, &codes, &x, n_tokens);
            let (r_want, sq_want) = sparse::residual(&want, &y, n_tokens, l_n, d);
            let dev_codes: Vec<encode::DeviceCodes> = codes.iter().map(|c| encode::DeviceCodes::from_host(gpu,
                &encode::HostCodes { offsets: c.offsets.clone(), feat: c.feat.clone(), pre: c.pre.clone(),
                    act: c.act.clone() }).unwrap()).collect();
            let w: Vec<_> = p.w_dec.iter().map(|w| gpu.upload_bf16(w).unwrap()).collect();
            let layers: Vec<decode::DecodeLayer> = (0..l_n).map(|l| decode::DecodeLayer {
                codes: &dev_codes[l], w_dec: &w[l], row_len: cfg.dec_row_len(l) }).collect();
            let b_dec = gpu.upload(&p.b_dec.concat()).unwrap();
            let yd = gpu.upload(&y).unwrap();
            let scale_r = 2.0 / n_tokens.max(1) as f32;
            let out = decode::sparse_decode(gpu, &layers, &b_dec, Some(&yd), d, !per_layer, scale_r).unwrap();
            let got = gpu.download(&out.yhat).unwrap();
            // Scale: Σ |a·w| over the sum, bounded by Σ|a| · max|w| per (token, target layer).
            let maxw = p.w_dec.iter().flatten().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let mut scale = vec![0f64; n_tokens * l_n * d];
            for (l, c) in codes.iter().enumerate() {
                for b in 0..n_tokens {
                    let s: f64 = c.act[c.offsets[b]..c.offsets[b + 1]].iter().map(|a| a.abs() as f64).sum();
                    for k in l..if per_layer { l + 1 } else { l_n } {
                        scale[(b * l_n + k) * d..][..d].iter_mut().for_each(|v| *v += s * maxw + 1.0);
                    }
                }
            }
            close_all("yhat", &got, &want, &scale)?;
            let r = gpu.download(out.resid.as_ref().unwrap()).unwrap();
            let rs: Vec<f64> = scale.iter().map(|s| s * scale_r as f64).collect();
            close_all("residual", &r, &r_want, &rs)?;
            let sq = gpu.download(out.sq_err.as_ref().unwrap()).unwrap();
            for k in 0..l_n {
                let s: f64 = (0..n_tokens).map(|b| sq[b * l_n + k] as f64).sum();
                close("sq_err", s, sq_want[k], sq_want[k] * 10.0 + 1.0)?;
            }
            // The residual alone (a feature shard's, after the all-reduce) on the decode's ŷ: the fused
            // epilogue's bits, and the CPU residual's on the same ŷ.
            let (r2, sq2) = decode::residual(gpu, &out.yhat, false, &yd, n_tokens, l_n, d, scale_r).unwrap();
            let (r2, sq2) = (gpu.download(&r2).unwrap(), gpu.download(&sq2).unwrap());
            prop_assert!(r2.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()), "residual vs fused");
            prop_assert!(sq2.iter().zip(&sq).all(|(a, b)| a.to_bits() == b.to_bits()), "sq_err vs fused");
            let (r_cpu, sq_cpu) = sparse::residual(&got, &y, n_tokens, l_n, d);
            prop_assert!(r2.iter().zip(&r_cpu).all(|(a, b)| a.to_bits() == b.to_bits()), "residual vs CPU");
            for k in 0..l_n {
                let s: f64 = (0..n_tokens).map(|b| sq2[b * l_n + k] as f64).sum();
                close("sq_err (residual)", s, sq_cpu[k], sq_cpu[k])?;
            }
            // The overlapped form (a feature shard's partials decoded a target layer at a time into a
            // poisoned layer-major buffer): every block the one-launch decode's to the bit, and the residual
            // read from that layout the same again.
            let lm = gpu.output::<f32>(n_tokens * l_n * d).unwrap();
            let plan = decode::PartialDecode::new(gpu, &layers, &b_dec, d, !per_layer, &lm).unwrap();
            for k in 0..l_n {
                plan.layer(k).unwrap();
            }
            prop_assert!(plan.layer(l_n).is_err(), "a target layer past the last is refused");
            drop(plan);
            let lm_host = gpu.download(&lm).unwrap();
            for b in 0..n_tokens {
                for k in 0..l_n {
                    let (a, t) = (&lm_host[(k * n_tokens + b) * d..][..d], &got[(b * l_n + k) * d..][..d]);
                    prop_assert!(a.iter().zip(t).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "layer-major block (token {}, layer {}) differs from the one-launch decode", b, k);
                }
            }
            let (r3, sq3) = decode::residual(gpu, &lm, true, &yd, n_tokens, l_n, d, scale_r).unwrap();
            let (r3, sq3) = (gpu.download(&r3).unwrap(), gpu.download(&sq3).unwrap());
            prop_assert!(r3.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()), "layer-major residual");
            prop_assert!(sq3.iter().zip(&sq).all(|(a, b)| a.to_bits() == b.to_bits()), "layer-major sq_err");
            // The same plan with the tiled kernels (the tiled decode a layer at a time where d is a multiple
            // of 8, else the gather): the same layer-major bits.
            let lm_t = gpu.output::<f32>(n_tokens * l_n * d).unwrap();
            let plan = decode::PartialDecode::with_kernels(gpu, &layers, &b_dec, d, !per_layer, &lm_t,
                SparseKernels::Tiled).unwrap();
            for k in 0..l_n {
                plan.layer(k).unwrap();
            }
            drop(plan);
            let lm_t = gpu.download(&lm_t).unwrap();
            prop_assert!(lm_t.iter().zip(&lm_host).all(|(a, b)| a.to_bits() == b.to_bits()),
                "tiled layer-major decode differs from the gather's");
            // The tiled decode (weights staged in shared memory per tile of tokens): the same bits.
            let tiled = decode::sparse_decode_tiled(gpu, &layers, &b_dec, Some(&yd), d, !per_layer, scale_r);
            if d % 8 == 0 {
                check_same_decode(gpu, &tiled.unwrap(), &got, &r, &sq)?;
            } else {
                prop_assert!(tiled.is_err(), "the tiled decode refuses d = {}", d);
            }
        }

        /// The gradients packed for the replicas' device all-reduce (weighted by `w`), summed (here: doubled,
        /// as two identical replicas would) and unpacked: every f32 tensor is `2 (w g)` to the bit, the
        /// touched flags come back as they were, the firing counts doubled.
        #[test]
        fn gradient_packing_round_trips(
            l_n in 1usize..4, d in 1usize..40, f_n in 1usize..90, w in 0.01f32..1.0, seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let cfg = config(l_n, d, f_n, false, Activation::JumpRelu);
            let mut rng = Rng::seed(seed);
            let mut normal = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
            // Per layer: w_enc, w_dec, b_enc, log_theta, dec_coef (f32); then b_dec per layer.
            let f32s: Vec<Vec<Vec<f32>>> = (0..l_n).map(|l| vec![normal(f_n * d),
                normal(f_n * cfg.dec_row_len(l)), normal(f_n), normal(f_n), normal(f_n)]).collect();
            let b_dec: Vec<Vec<f32>> = (0..l_n).map(|_| normal(d)).collect();
            // Skip weights' gradients on every other case.
            let skip = seed % 2 == 0;
            let w_skip: Vec<Vec<f32>> = (0..if skip { l_n } else { 0 }).map(|_| normal(d * d)).collect();
            let touched: Vec<Vec<u8>> = (0..l_n).map(|l| (0..f_n).map(|f| ((f * 7 + l) % 3 == 0) as u8 * (1 + f as u8 % 5)).collect()).collect();
            let counts: Vec<Vec<u32>> = (0..l_n).map(|l| (0..f_n).map(|f| (f * 131 + l * 17) as u32 % 5000).collect()).collect();
            let grads = |zero: bool| -> step::DeviceGrads {
                let up = |v: &[f32]| if zero { gpu.zeros(v.len()).unwrap() } else { gpu.upload(v).unwrap() };
                step::DeviceGrads {
                    layers: (0..l_n).map(|l| backward::LayerGrads {
                        w_enc: up(&f32s[l][0]), w_dec: up(&f32s[l][1]), b_enc: up(&f32s[l][2]),
                        log_theta: up(&f32s[l][3]), dec_coef: up(&f32s[l][4]),
                        touched: if zero { gpu.zeros(f_n).unwrap() } else { gpu.upload(&touched[l]).unwrap() },
                        active_count: if zero { gpu.zeros(f_n).unwrap() } else { gpu.upload(&counts[l]).unwrap() },
                        sparsity: gpu.zeros(f_n).unwrap(),
                    }).collect(),
                    b_dec: b_dec.iter().map(|b| up(b)).collect(),
                    w_skip: w_skip.iter().map(|w| up(w)).collect(),
                }
            };
            let (g, back) = (grads(false), grads(true));
            let len = gradsum::packed_len(gpu, &g);
            let buf = gpu.zeros::<f32>(len).unwrap();
            gradsum::pack(gpu, &g, w, &buf).unwrap();
            let summed: Vec<f32> = gpu.download(&buf).unwrap().iter().map(|v| v * 2.0).collect();
            gradsum::unpack(gpu, &gpu.upload(&summed).unwrap(), &back).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let want = |v: &[f32]| v.iter().map(|x| (x * w) * 2.0).collect::<Vec<f32>>();
            for (l, lg) in back.layers.iter().enumerate() {
                for (t, got) in [&lg.w_enc, &lg.w_dec, &lg.b_enc, &lg.log_theta, &lg.dec_coef].iter().enumerate() {
                    prop_assert_eq!(bits(&gpu.download(got).unwrap()), bits(&want(&f32s[l][t])), "layer {} tensor {}", l, t);
                }
                let flags: Vec<u8> = touched[l].iter().map(|t| (*t != 0) as u8).collect();
                prop_assert_eq!(gpu.download(&lg.touched).unwrap(), flags, "layer {} touched", l);
                let doubled: Vec<u32> = counts[l].iter().map(|c| 2 * c).collect();
                prop_assert_eq!(gpu.download(&lg.active_count).unwrap(), doubled, "layer {} counts", l);
            }
            for (l, b) in back.b_dec.iter().enumerate() {
                prop_assert_eq!(bits(&gpu.download(b).unwrap()), bits(&want(&b_dec[l])), "b_dec {}", l);
            }
            prop_assert_eq!(back.w_skip.len(), w_skip.len());
            for (l, b) in back.w_skip.iter().enumerate() {
                prop_assert_eq!(bits(&gpu.download(b).unwrap()), bits(&want(&w_skip[l])), "w_skip {}", l);
            }
        }

        /// The whole chained step (encode, decode, backward) vs the sparse CPU step, every activation, with
        /// and without skip connections (their GEMMs through cuBLAS: the term in the reconstruction and the
        /// weight gradient from the residual's two bf16 parts). Half the cases have d a multiple of 8, where
        /// the decode, `act_grad` and `feature_grads` take their 16-byte-load paths.
        #[test]
        fn training_step_matches_cpu(
            l_n in 1usize..4, d_raw in 1usize..40, by8 in any::<bool>(), f_n in 1usize..90,
            n_tokens in 0usize..80, kind in 0u8..4, k_raw in 1usize..6, per_layer in any::<bool>(),
            bandwidth in prop_oneof![Just(1.0f32), Just(0.05f32)], by_h in any::<bool>(),
            masked in any::<bool>(), skip in any::<bool>(), seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let d = if by8 { 8 * (1 + d_raw % 5) } else { d_raw };
            check_training_step(gpu, l_n, d, f_n, n_tokens, kind, k_raw, per_layer, bandwidth, by_h, masked,
                skip, seed)?;
        }

        /// The dense cuBLAS baseline's loss equals the sparse step's (CPU reference and GPU step) on the same
        /// parameters and batch. Sparsity and pre-activation terms come from the same f32 pre-activations
        /// (TOL_REL); the reconstruction goes through the decode GEMM with the activations in bf16 (as
        /// autocast does), so it is compared with `10⁻² · recon + 10⁻⁶` (bf16 keeps 8 significant bits).
        #[test]
        fn dense_baseline_loss_matches_sparse(
            l_n in 1usize..4, d in 1usize..40, f_n in 1usize..90, n_tokens in 0usize..80,
            per_layer in any::<bool>(), bandwidth in prop_oneof![Just(1.0f32), Just(0.05f32)],
            seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let blas = match dense::Blas::new(gpu) {
                Ok(b) => b,
                Err(e) if std::env::var("CLT_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
                    panic!("CLT_REQUIRE_GPU=1 but cuBLAS cannot be used: {e}")
                }
                Err(e) => {
                    eprintln!("dense_baseline_loss_matches_sparse: skipped: {e}");
                    return Ok(());
                }
            };
            let cfg = config(l_n, d, f_n, per_layer, Activation::JumpRelu);
            let mut rng = Rng::seed(seed);
            let p = bf16_params(&random_params(&cfg, &mut rng));
            let (x, y) = random_batch(&cfg, n_tokens, &mut rng);
            let x = round_bf16(&x);
            prop_assume!(!ambiguous(&cfg, &p, &x, n_tokens, 0.5 * bandwidth));
            let norms = decoder_norms(&cfg, &p.w_dec);
            let obj = Objective { lambda: 0.9, c: 4.0, lambda_preact: 0.2, bandwidth,
                threshold_grad: ThresholdGrad::Theta };
            let mut gc = Grads::zeros(&cfg);
            let sc = sparse::loss_and_grad(&cfg, &p, &norms, &x, &y, n_tokens, &obj, None, &mut gc);
            let dp = step::DeviceParams::upload(gpu, &p, &norms).unwrap();
            let batch = step::DeviceBatch::upload(gpu, &x, &y, n_tokens).unwrap();
            let (sg, _) = step::device_loss_and_grad(gpu, &cfg, &dp, &batch, &obj, None).unwrap();
            let dn = dense::dense_loss_and_grad(gpu, &blas, &cfg, &dp, &batch, &obj).unwrap();
            let loss_scale = sc.loss().abs() + 1.0;
            close("dense sparsity", dn.sparsity, sc.sparsity, loss_scale)?;
            close("dense preact", dn.preact, sc.preact, loss_scale)?;
            for (what, got) in [("dense recon", dn.recon), ("sparse GPU recon", sg.recon)] {
                let tol = 1e-2 * sc.recon.abs() + 1e-6;
                prop_assert!((got - sc.recon).abs() <= tol, "{}: got {}, want {} (tolerance {})",
                    what, got, sc.recon, tol);
            }
            close("sparse GPU loss", sg.loss(), sc.loss(), loss_scale)?;
            let tol = 1e-2 * sc.loss().abs() + 1e-6;
            prop_assert!((dn.loss() - sc.loss()).abs() <= tol, "dense loss {} vs sparse {}", dn.loss(), sc.loss());
            // Every gradient tensor was written (outputs are poisoned) and is finite.
            for t in dn.w_enc.iter().chain(&dn.w_dec).chain(&dn.b_enc).chain(&dn.log_theta).chain(&dn.b_dec) {
                prop_assert!(gpu.download(t).unwrap().iter().all(|v| v.is_finite()), "non-finite dense gradient");
            }
        }

        /// The resident trainer's device pieces: sum-of-squares partials written at offsets of one buffer
        /// and summed on the device (`sum_sq_into`, `dec_grad_sq_into`, `sum_f64`) vs the host's f64 sums;
        /// `exp_f32` vs `f32::exp` (4 ulp: CUDA's `expf` is within 2, the host's within 1); `to_bf16_into` bit-exact vs the host's rounding; `adam_dense_at`
        /// on a slice bit-identical to `adam_dense` on that slice alone, and the rest untouched.
        #[test]
        fn resident_pieces_match_cpu(
            n in 1usize..3000, rl in 1usize..40, f_n in 1usize..50, at in 0usize..20, seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let mut rng = Rng::seed(seed);
            let mut rand = |k: usize| -> Vec<f32> { (0..k).map(|_| rng.normal() as f32).collect() };
            let (x, gs, w, coef) = (rand(n), rand(f_n * rl), rand(f_n * rl), rand(f_n));
            let touched: Vec<u8> = coef.iter().map(|c| (*c > 0.0) as u8).collect();
            let blocks = adam::sum_sq_blocks(n);
            let parts = gpu.output::<f64>(at + blocks + f_n).unwrap();
            // The first `at` partials belong to "another tensor": zero them (a kernel would write them).
            let lead = gpu.upload(&vec![0f64; at]).unwrap();
            let mut parts_buf = parts;
            gpu.copy(&lead, &mut parts_buf).unwrap();
            prop_assert_eq!(adam::sum_sq_into(gpu, &gpu.upload(&x).unwrap(), &parts_buf, at).unwrap(), blocks);
            let (gsd, wd, cd, td) = (gpu.upload(&gs).unwrap(), gpu.upload(&w).unwrap(),
                gpu.upload(&coef).unwrap(), gpu.upload(&touched).unwrap());
            prop_assert_eq!(adam::dec_grad_sq_into(gpu, &gsd, &wd, &cd, &td, rl, &parts_buf, at + blocks).unwrap(), f_n);
            let out = gpu.output::<f64>(1).unwrap();
            adam::sum_f64(gpu, &parts_buf, &out).unwrap();
            let got = gpu.download(&out).unwrap()[0];
            let host_parts = gpu.download(&parts_buf).unwrap();
            let mut want: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
            let mut scale = want;
            for f in 0..f_n {
                let c = coef[f] as f64;
                for j in 0..rl {
                    let g = if touched[f] != 0 { gs[f * rl + j] as f64 } else { 0.0 } + c * w[f * rl + j] as f64;
                    want += g * g;
                    scale += g * g;
                }
            }
            close("Σ partials (device) vs host partials", got, host_parts.iter().sum(), scale)?;
            close("squared gradient norm", got, want, scale)?;

            // exp and bf16 copies.
            let lt: Vec<f32> = x.iter().map(|v| v * 0.5).collect();
            let (ltd, th) = (gpu.upload(&lt).unwrap(), gpu.output::<f32>(n).unwrap());
            adam::exp_into(gpu, &ltd, &th).unwrap();
            for (i, (g, v)) in gpu.download(&th).unwrap().iter().zip(&lt).enumerate() {
                let e = v.exp();
                prop_assert!((g - e).abs() <= 4.0 * f32::EPSILON * e, "exp[{}]: {} vs {}", i, g, e);
            }
            let bf = gpu.output::<u16>(n).unwrap();
            encode::to_bf16_into(gpu, &gpu.upload(&x).unwrap(), &bf).unwrap();
            prop_assert_eq!(gpu.download(&bf).unwrap(), to_bf16_bits(&x));

            // Adam on a slice of a concatenated tensor.
            let len = (n / 3).max(1);
            let at = at.min(n - len.min(n));
            let len = len.min(n - at);
            let (p0, m0) = (rand(n), rand(n));
            let v0: Vec<f32> = rand(n).iter().map(|v| v.abs()).collect();
            let g = rand(len);
            let k = adam::consts(&cpu_adam::AdamHyper::default(), 3, 1e-3, 0.7);
            let (pd, md, vd) = (gpu.upload(&p0).unwrap(), gpu.upload(&m0).unwrap(), gpu.upload(&v0).unwrap());
            adam::adam_dense_at(gpu, &pd, &md, &vd, at, &gpu.upload(&g).unwrap(), k).unwrap();
            let (ps, ms, vs) = (gpu.upload(&p0[at..at + len]).unwrap(), gpu.upload(&m0[at..at + len]).unwrap(),
                gpu.upload(&v0[at..at + len]).unwrap());
            adam::adam_dense(gpu, &ps, &ms, &vs, &gpu.upload(&g).unwrap(), k).unwrap();
            for (name, whole, part, orig) in [("p", &pd, &ps, &p0), ("m", &md, &ms, &m0), ("v", &vd, &vs, &v0)] {
                let wh = gpu.download(whole).unwrap();
                prop_assert_eq!(&wh[at..at + len], &gpu.download(part).unwrap()[..], "{} slice", name);
                prop_assert_eq!(&wh[..at], &orig[..at], "{} before the slice", name);
                prop_assert_eq!(&wh[at + len..], &orig[at + len..], "{} after the slice", name);
            }
        }

        /// Fused Adam (dense and decoder rows) and decoder norms vs `adam::step`.
        #[test]
        fn adam_matches_cpu(
            d in 1usize..50, f_n in 1usize..70, l_n in 1usize..3, t in 1u64..50,
            scale in 0.1f32..1.0, seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let cfg = config(l_n, d, f_n, false, Activation::JumpRelu);
            let mut rng = Rng::seed(seed);
            let mut p = random_params(&cfg, &mut rng);
            let mut st = cpu_adam::AdamState::new(&cfg);
            st.m = random_params(&cfg, &mut rng);
            st.v = random_params(&cfg, &mut rng);
            st.v.tensors_mut().into_iter().for_each(|t| t.iter_mut().for_each(|v| *v = v.abs()));
            st.t = t - 1;
            let mut g = Grads::zeros(&cfg);
            g.p = random_params(&cfg, &mut rng);
            for l in 0..l_n {
                for f in 0..f_n {
                    g.dec_coef[l][f] = rng.normal() as f32;
                    g.dec_touched[l][f] = rng.below(2) == 0;
                }
            }
            let hp = cpu_adam::AdamHyper::default();
            let (p0, m0, v0) = (p.clone(), st.m.clone(), st.v.clone());
            let mut norms = decoder_norms(&cfg, &p.w_dec);
            cpu_adam::step(&cfg, &hp, &mut p, &mut st, &g, 1e-3, scale, &mut norms);
            let k = adam::consts(&hp, t, 1e-3, scale);
            for l in 0..l_n {
                let rl = cfg.dec_row_len(l);
                let (pd, md, vd, gd) = (gpu.upload(&p0.w_enc[l]).unwrap(), gpu.upload(&m0.w_enc[l]).unwrap(),
                    gpu.upload(&v0.w_enc[l]).unwrap(), gpu.upload(&g.p.w_enc[l]).unwrap());
                adam::adam_dense(gpu, &pd, &md, &vd, &gd, k).unwrap();
                close_all("w_enc", &gpu.download(&pd).unwrap(), &p.w_enc[l], &vec![1e-3; pd.len()])?;
                close_all("m w_enc", &gpu.download(&md).unwrap(), &st.m.w_enc[l], &vec![1.0; pd.len()])?;
                let (pd, md, vd, gs) = (gpu.upload(&p0.w_dec[l]).unwrap(), gpu.upload(&m0.w_dec[l]).unwrap(),
                    gpu.upload(&v0.w_dec[l]).unwrap(), gpu.upload(&g.p.w_dec[l]).unwrap());
                let coef = gpu.upload(&g.dec_coef[l]).unwrap();
                let touched: Vec<u8> = g.dec_touched[l].iter().map(|t| *t as u8).collect();
                let touched = gpu.upload(&touched).unwrap();
                let nd = gpu.output::<f32>(f_n).unwrap();
                let bf = gpu.output::<u16>(f_n * rl).unwrap();
                adam::adam_decoder(gpu, &pd, &md, &vd, &gs, &coef, &touched, Some(&bf), &nd, rl, k).unwrap();
                let got = gpu.download(&pd).unwrap();
                close_all("w_dec", &got, &p.w_dec[l], &vec![1e-3; got.len()])?;
                close_all("v w_dec", &gpu.download(&vd).unwrap(), &st.v.w_dec[l], &vec![1.0; got.len()])?;
                prop_assert_eq!(gpu.download(&bf).unwrap(), to_bf16_bits(&got));
                let ns: Vec<f64> = norms[l].iter().map(|n| *n as f64 * 10.0).collect();
                close_all("norms", &gpu.download(&nd).unwrap(), &norms[l], &ns)?;
                let rn = adam::row_norms(gpu, &pd, rl, None).unwrap();
                close_all("row_norms", &gpu.download(&rn).unwrap(), &norms[l], &ns)?;
            }
        }

        /// The clipping norm's pieces vs `adam::grad_norm`.
        #[test]
        fn grad_norm_matches_cpu(d in 1usize..40, f_n in 1usize..60, seed in any::<u64>()) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let cfg = config(1, d, f_n, false, Activation::JumpRelu);
            let mut rng = Rng::seed(seed);
            let p = random_params(&cfg, &mut rng);
            let mut g = Grads::zeros(&cfg);
            g.p = random_params(&cfg, &mut rng);
            for f in 0..f_n {
                g.dec_coef[0][f] = rng.normal() as f32;
                g.dec_touched[0][f] = rng.below(2) == 0;
                if !g.dec_touched[0][f] {
                    let rl = cfg.dec_row_len(0);
                    g.p.w_dec[0][f * rl..(f + 1) * rl].iter_mut().for_each(|v| *v = 0.0);
                }
            }
            let norms = decoder_norms(&cfg, &p.w_dec);
            let want = cpu_adam::grad_norm(&cfg, &p, &g, &norms);
            let mut total = 0.0;
            for t in [&g.p.w_enc[0], &g.p.b_enc[0], &g.p.log_theta[0], &g.p.b_dec[0]] {
                total += adam::sum_sq(gpu, &gpu.upload(t).unwrap()).unwrap();
            }
            let touched: Vec<u8> = g.dec_touched[0].iter().map(|t| *t as u8).collect();
            total += adam::dec_grad_sq(gpu, &gpu.upload(&g.p.w_dec[0]).unwrap(), &gpu.upload(&p.w_dec[0]).unwrap(),
                &gpu.upload(&g.dec_coef[0]).unwrap(), &gpu.upload(&touched).unwrap(), cfg.dec_row_len(0)).unwrap();
            close("grad norm", total.sqrt(), want, want * 10.0)?;
        }

        /// int8 / int4 dequantisation vs the store's `decode_rows`: exact.
        #[test]
        fn dequant_matches_cpu(
            rows in 1usize..40, d in 1usize..100, int4 in any::<bool>(), r0 in 0usize..40, n in 0usize..40,
            seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let r0 = r0 % rows;
            let n = n.min(rows - r0);
            let codec = if int4 { Codec::Int4 } else { Codec::Int8 };
            let sec = Section { codec, planes: false, rows, d, layers: 1, outliers: 0 };
            let mut rng = Rng::seed(seed);
            let src: Vec<f32> = (0..rows * d).map(|_| rng.normal() as f32).collect();
            let mut bytes = Vec::new();
            sec.encode(&src, &mut bytes);
            let mut want = vec![0f32; n * d];
            sec.decode_rows(&bytes, r0, &mut want);
            let q = if int4 { dequant::Quant::Int4 } else { dequant::Quant::Int8 };
            let dev = gpu.upload(&bytes).unwrap();
            let got = dequant::dequant_rows(gpu, &dev, q, rows, d, r0, n, None).unwrap();
            prop_assert_eq!(gpu.download(&got).unwrap(), want);

            // The trainer's form: all rows into existing (poisoned) buffers, each multiplied by its layer's
            // normalisation factor (`NormScales::apply` on the host's decode), and the bf16 copy the encoder
            // reads (`to_bf16` of the f32 values).
            let layers = 1 + (seed % 4) as usize;
            let scales: Vec<f32> = (0..layers).map(|_| (rng.normal() as f32).exp()).collect();
            let mut want = vec![0f32; rows * d];
            sec.decode_rows(&bytes, 0, &mut want);
            for (r, row) in want.chunks_exact_mut(d).enumerate() {
                row.iter_mut().for_each(|v| *v *= scales[r % layers]);
            }
            let (out, bf) = (gpu.output::<f32>(rows * d).unwrap(), gpu.output::<u16>(rows * d).unwrap());
            let ls = gpu.upload(&scales).unwrap();
            let dst = dequant::DequantOut { out: &out, bf16: Some(&bf), layer_scale: Some(&ls) };
            dequant::dequant_into(gpu, &dev, q, rows, d, 0, &dst).unwrap();
            let got = gpu.download(&out).unwrap();
            prop_assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let bf_want = gpu.download(&encode::to_bf16(gpu, &out).unwrap()).unwrap();
            prop_assert_eq!(gpu.download(&bf).unwrap(), bf_want);
        }

        /// Column sums (Σ_b x_b, the decoder-bias gradient) and the per-feature grouping (CSR).
        #[test]
        fn col_sum_and_grouping_match_cpu(
            n_tokens in 0usize..1500, d in 1usize..50, f_n in 1usize..2000, hot in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            let mut rng = Rng::seed(seed);
            let x: Vec<f32> = (0..n_tokens * d).map(|_| rng.normal() as f32).collect();
            let got = gpu.download(&backward::col_sum(gpu, &gpu.upload(&x).unwrap(), 0, d, n_tokens, d).unwrap()).unwrap();
            for j in 0..d {
                let want: f64 = (0..n_tokens).map(|b| x[b * d + j] as f64).sum();
                close("col_sum", got[j] as f64, want, n_tokens as f64 * 4.0)?;
            }
            // Random lists (distinct increasing features per token), some tokens empty; with `hot`, feature 0
            // is on every token, so its segment (up to 1,500 entries) takes several strides of csr_sort's block.
            let lists = (0..n_tokens).map(|_| {
                let n = if rng.below(5) == 0 { 0 } else { rng.below(f_n.min(40)) + 1 };
                let mut fs: Vec<u32> = (0..n).map(|_| rng.below(f_n) as u32).collect();
                if hot {
                    fs.push(0);
                }
                fs.sort_unstable();
                fs.dedup();
                fs
            });
            check_grouping(gpu, lists, f_n)?;
        }
    }

    /// `csr_sort` ranks entries through a bitmap of a tile of 32,768 tokens: a batch of more than two tiles,
    /// with a feature on every token, one on every third, one only in the last tile and one in none, must
    /// come out grouped in token order across the tiles' boundaries. Lists in decreasing feature order, so
    /// the fill's slot order differs from the features' order.
    #[test]
    fn grouping_spans_several_token_tiles() {
        let Some(gpu) = gpu() else { return };
        let n_tokens = 2 * 32_768 + 1_000;
        let lists = (0..n_tokens).map(|b| {
            let mut fs = vec![0u32];
            if b % 3 == 0 {
                fs.push(1);
            }
            if b >= 2 * 32_768 + 17 && b % 5 != 0 {
                fs.push(2);
            }
            fs.reverse();
            fs
        });
        check_grouping(gpu, lists, 4).unwrap();
    }

    /// `sparse_decode_tiled` against `sparse_decode` where its loops wrap: 9,000 features (five chunks of
    /// 2,048 staged in turn through its two buffers, for each of three source layers), 2,100 tokens (three
    /// tiles of 1,024, and 4 tokens a thread), and two 8-column chunks; lists sorted by feature, as the
    /// encoder leaves them. Same bits for ŷ, r and the squared error, token-major, with the tokens in
    /// `decode_order`'s order and in batch order; and `decode_order` against its definition.
    #[test]
    fn tiled_decode_matches_the_gather_across_chunks_and_tiles() {
        let Some(gpu) = gpu() else { return };
        let (l_n, d, f_n, n_tokens) = (3usize, 16usize, 9000usize, 2100usize);
        let mut rng = Rng::seed(5);
        let mut counts = vec![Vec::new(); l_n];
        let dev_codes: Vec<encode::DeviceCodes> = (0..l_n)
            .map(|l| {
                let mut h = encode::HostCodes {
                    offsets: vec![0],
                    ..Default::default()
                };
                for _ in 0..n_tokens {
                    // Lengths 0..40, and one token in 50 with up to 400 (decode_order's buckets).
                    let n = if rng.below(50) == 0 {
                        rng.below(400)
                    } else {
                        rng.below(40)
                    };
                    let mut fs: Vec<u32> = (0..n).map(|_| rng.below(f_n) as u32).collect();
                    fs.sort_unstable();
                    fs.dedup();
                    for f in fs {
                        h.feat.push(f);
                        h.pre.push(1.0);
                        // Some listed entries near the threshold (activation 0, skipped by both).
                        h.act.push(if rng.below(8) == 0 {
                            0.0
                        } else {
                            rng.normal() as f32
                        });
                    }
                    h.offsets.push(h.feat.len());
                }
                counts[l] = h.offsets.windows(2).map(|w| w[1] - w[0]).collect();
                encode::DeviceCodes::from_host(gpu, &h).unwrap()
            })
            .collect();
        let w: Vec<_> = (0..l_n)
            .map(|l| {
                let v: Vec<f32> = (0..f_n * (l_n - l) * d)
                    .map(|_| rng.normal() as f32 * 0.1)
                    .collect();
                gpu.upload_bf16(&v).unwrap()
            })
            .collect();
        let layers: Vec<decode::DecodeLayer> = (0..l_n)
            .map(|l| decode::DecodeLayer {
                codes: &dev_codes[l],
                w_dec: &w[l],
                row_len: (l_n - l) * d,
            })
            .collect();
        let b_dec = gpu
            .upload(
                &(0..l_n * d)
                    .map(|_| rng.normal() as f32)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let y = gpu
            .upload(
                &(0..n_tokens * l_n * d)
                    .map(|_| rng.normal() as f32)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let gather = decode::sparse_decode(gpu, &layers, &b_dec, Some(&y), d, true, 0.5).unwrap();
        let (g, r, sq) = (
            gpu.download(&gather.yhat).unwrap(),
            gpu.download(gather.resid.as_ref().unwrap()).unwrap(),
            gpu.download(gather.sq_err.as_ref().unwrap()).unwrap(),
        );
        // Four launches in a row: on the CPU emulator they take consecutive schedules (unless another
        // test's launches come between), so two of them land each `cp.async` copy as it is issued, which
        // fails a buffer refilled while a warp still reads it (kernels/emu/README.md).
        for _ in 0..4 {
            let tiled =
                decode::sparse_decode_tiled(gpu, &layers, &b_dec, Some(&y), d, true, 0.5).unwrap();
            check_same_decode(gpu, &tiled, &g, &r, &sq).unwrap();
        }
        // In batch order: the same bits.
        let targets = decode::Targets {
            y: Some(&y),
            d,
            cross_layer: true,
            resid_scale: 0.5,
        };
        let batch = decode::sparse_decode_tiled_in(
            gpu,
            &layers,
            &b_dec,
            &targets,
            decode::TokenOrder::Batch,
        )
        .unwrap();
        check_same_decode(gpu, &batch, &g, &r, &sq).unwrap();
        for cross_layer in [true, false] {
            check_decode_order(gpu, &layers, &counts, cross_layer);
        }
    }

    /// `decode::decode_order` against its definition: for each target layer k, a permutation of the tokens
    /// whose lengths (summed over the source layers that reach k: all l <= k, or k alone) never grow, or
    /// from 16 on grow by less than an eighth (the buckets). `counts[l][b]`: token b's list in layer l.
    fn check_decode_order(
        gpu: &Gpu,
        layers: &[decode::DecodeLayer],
        counts: &[Vec<usize>],
        cross_layer: bool,
    ) {
        let (l_n, b_n) = (counts.len(), counts[0].len());
        let order = gpu
            .download(&decode::decode_order(gpu, layers, cross_layer).unwrap())
            .unwrap();
        assert_eq!(order.len(), l_n * b_n);
        for (k, row) in order.chunks(b_n).enumerate() {
            let mut seen = row.to_vec();
            seen.sort_unstable();
            assert!(
                seen.iter().copied().eq(0..b_n as u32),
                "target {k}: not a permutation"
            );
            let sources = if cross_layer { 0..=k } else { k..=k };
            let len = |b: u32| -> usize { sources.clone().map(|l| counts[l][b as usize]).sum() };
            let lens: Vec<usize> = row.iter().map(|&b| len(b)).collect();
            for w in lens.windows(2) {
                let (prev, next) = (w[0], w[1]);
                assert!(
                    next <= prev || (prev >= 16 && next <= prev + prev / 8),
                    "target {k} (cross-layer {cross_layer}): a length of {next} after {prev}"
                );
            }
            // The longest bucket first.
            let (first, max) = (lens[0], *lens.iter().max().unwrap());
            assert!(
                first == max || (first >= 16 && max <= first + first / 8),
                "target {k}: the first token lists {first}, the longest {max}"
            );
        }
    }

    /// Host inputs of one layer's backward (`backward::layer_grads`), for running it on two devices.
    struct LayerInputs<'a> {
        codes: &'a encode::HostCodes,
        x: &'a [f32],
        resid: &'a [f32],
        norms: &'a [f32],
        theta: &'a [f32],
        w: &'a [f32],
        layer: usize,
        n_layers: usize,
        d: usize,
        /// Per feature, whether the pre-activation loss is on (`None`: all on).
        preact_mask: Option<&'a [u8]>,
    }

    /// One layer's backward on `g`: the bits of every output (decoder and encoder rows, encoder bias,
    /// log θ, decoder-norm coefficients, sparsity, active counts).
    fn layer_grads_bits(g: &Gpu, i: &LayerInputs) -> Vec<Vec<u32>> {
        let f_n = i.norms.len();
        let rl = (i.n_layers - i.layer) * i.d;
        let codes = encode::DeviceCodes::from_host(g, i.codes).unwrap();
        let window = encode::WindowStats {
            preact_sum: g.upload(&vec![0.25f32; f_n]).unwrap(),
            near_count: g.upload(&vec![3u32; f_n]).unwrap(),
            near_h: g.upload(&vec![1.5f32; f_n]).unwrap(),
        };
        let (w_dec, norms, theta) = (
            g.upload_bf16(i.w).unwrap(),
            g.upload(i.norms).unwrap(),
            g.upload(i.theta).unwrap(),
        );
        let (xd, rd) = (g.upload(i.x).unwrap(), g.upload(i.resid).unwrap());
        let mask = i.preact_mask.map(|m| g.upload(m).unwrap());
        let inp = backward::LayerGradInput {
            codes: &codes,
            window: &window,
            w_dec: &w_dec,
            row_len: rl,
            n_features: f_n,
            norms: &norms,
            theta: &theta,
            x: &xd,
            resid: &rd,
            layer: i.layer,
            n_layers: i.n_layers,
            d: i.d,
            preact_mask: mask.as_ref(),
            obj: Objective {
                lambda: 0.9,
                c: 4.0,
                lambda_preact: 0.2,
                bandwidth: 1.0,
                threshold_grad: ThresholdGrad::Theta,
            },
            jump: true,
        };
        let o = backward::layer_grads(g, &inp).unwrap();
        let bits = |b: &clt::backend::cuda::memory::DBuf<f32>| {
            g.download(b)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        vec![
            bits(&o.w_dec),
            bits(&o.w_enc),
            bits(&o.b_enc),
            bits(&o.log_theta),
            bits(&o.dec_coef),
            bits(&o.sparsity),
            g.download(&o.active_count).unwrap(),
        ]
    }

    /// Appends one token's entries for the sorted, distinct features `fs` to `h`: one in 8 near the
    /// threshold (listed, activation 0), the rest active.
    fn push_token(h: &mut encode::HostCodes, fs: &[u32], rng: &mut Rng) {
        for &f in fs {
            let near = rng.below(8) == 0;
            h.feat.push(f);
            h.pre.push(if near {
                0.49
            } else {
                1.0 + rng.uniform() as f32
            });
            h.act.push(if near {
                0.0
            } else {
                1.0 + rng.uniform() as f32
            });
        }
        h.offsets.push(h.feat.len());
    }

    /// Random inputs, residuals, decoder norms and decoders for the lists `h` (`l_n` layers of width `d`,
    /// `f_n` features), and the backward of each of `layers` on the gathers' device and on the tiled one,
    /// compared by [`same_layer_grads`] (`reordered(row_len)`: whether `act_grad_partial` runs on such a
    /// row). Returns each layer's outputs from the gathers.
    #[allow(clippy::too_many_arguments)]
    fn compare_layer_grads(
        (gpu, tiled): (&Gpu, &Gpu),
        h: &encode::HostCodes,
        (l_n, d, f_n): (usize, usize, usize),
        layers: &[usize],
        preact_mask: Option<&[u8]>,
        reordered: fn(usize) -> bool,
        rng: &mut Rng,
    ) -> Vec<Vec<Vec<u32>>> {
        let n_tokens = h.offsets.len() - 1;
        let row = l_n * d;
        let x: Vec<f32> = (0..n_tokens * row).map(|_| rng.normal() as f32).collect();
        let resid: Vec<f32> = (0..n_tokens * row).map(|_| rng.normal() as f32).collect();
        let norms: Vec<f32> = (0..f_n).map(|_| 0.5 + rng.uniform() as f32).collect();
        let theta = vec![0.5f32; f_n];
        let mut out = Vec::new();
        for &layer in layers {
            let rl = (l_n - layer) * d;
            let w: Vec<f32> = (0..f_n * rl).map(|_| rng.normal() as f32 * 0.1).collect();
            let inputs = LayerInputs {
                codes: h,
                x: &x,
                resid: &resid,
                norms: &norms,
                theta: &theta,
                w: &w,
                layer,
                n_layers: l_n,
                d,
                preact_mask,
            };
            let (want, got) = (
                layer_grads_bits(gpu, &inputs),
                layer_grads_bits(tiled, &inputs),
            );
            same_layer_grads(&got, &want, layer, reordered(rl));
            out.push(want);
        }
        out
    }

    /// `got` against `want` from [`layer_grads_bits`]: every output to the bit, except, with `reordered`
    /// (`act_grad_partial`'s sums in another order), those downstream of the activation gradients
    /// (encoder rows, biases, log θ) within f32 rounding.
    fn same_layer_grads(got: &[Vec<u32>], want: &[Vec<u32>], layer: usize, reordered: bool) {
        let names = [
            "w_dec",
            "w_enc",
            "b_enc",
            "log_theta",
            "dec_coef",
            "sparsity",
            "count",
        ];
        for (i, ((a, b), n)) in got.iter().zip(want).zip(names).enumerate() {
            if reordered && (1..=3).contains(&i) {
                let f = |v: &[u32]| v.iter().map(|&x| f32::from_bits(x)).collect::<Vec<_>>();
                close_reordered(&format!("layer {layer}: tiled {n}"), &f(a), &f(b)).unwrap();
            } else {
                assert!(a == b, "layer {layer}: tiled {n} differs from the gathers'");
            }
        }
    }

    /// One layer's backward with `act_grad_tiled` (a block per token, its residual row staged in chunks of
    /// 2,048) against `act_grad` where its loops wrap: rows of 3,096 and 1,032 columns (two chunks, the
    /// second partial; one partial chunk; neither a multiple of 16, where `act_grad_partial` would run),
    /// up to ~180 entries a token (three passes of 64 entries), empty lists, and near-threshold entries.
    /// Every output to the bit: the activation gradients reach the encoder rows, biases and thresholds.
    #[test]
    fn tiled_activation_gradient_matches_the_gather_across_chunks() {
        let (Some(gpu), Some(tiled)) = (gpu(), tiled_gpu()) else {
            return;
        };
        let (l_n, d, f_n, n_tokens) = (3usize, 1032usize, 200usize, 40usize);
        let mut rng = Rng::seed(12);
        let mut h = encode::HostCodes {
            offsets: vec![0],
            ..Default::default()
        };
        for b in 0..n_tokens {
            let keep = [0.0, 0.1, 0.5, 0.9][b % 4];
            let fs: Vec<u32> = (0..f_n as u32).filter(|_| rng.uniform() < keep).collect();
            push_token(&mut h, &fs, &mut rng);
        }
        assert!((0..n_tokens).any(|b| h.offsets[b + 1] - h.offsets[b] > 128));
        compare_layer_grads(
            (gpu, tiled),
            &h,
            (l_n, d, f_n),
            &[0, 2],
            None,
            |_| false,
            &mut rng,
        );
    }

    /// One layer's backward with `act_grad_partial` (each decoder row staged once per tile of tokens, sums
    /// per 512-column range added by `act_grad_finish`) against `act_grad`, where its loops wrap: 2,100
    /// features (three chunks of 1,024 staged in turn through its two buffers), 1,000 tokens with up to
    /// ~75 entries (`act_plan`'s tiles of up to 16 groups of 32 tokens sorted by list length: at least
    /// two tiles, checked, the last partial; two tokens a thread), rows of 2,080 and
    /// 1,040 columns (five and three ranges, the last of 32 and 16 columns), empty lists, near-threshold
    /// entries and feature 7 on every token; then again with the kernel's shared memory cut small. The
    /// activation gradients' outputs (encoder rows, biases, log θ) within f32 rounding, the rest to the
    /// bit.
    #[test]
    fn tiled_activation_gradient_over_token_tiles_matches_the_gather() {
        let (Some(gpu), Some(tiled)) = (gpu(), tiled_gpu()) else {
            return;
        };
        let (l_n, d, f_n, n_tokens) = (2usize, 1040usize, 2100usize, 1000usize);
        let mut rng = Rng::seed(13);
        let mut h = encode::HostCodes {
            offsets: vec![0],
            ..Default::default()
        };
        for b in 0..n_tokens {
            let mut fs: Vec<u32> = Vec::new();
            if b % 50 != 3 {
                fs = (0..rng.below(75)).map(|_| rng.below(f_n) as u32).collect();
                fs.push(7);
                fs.sort_unstable();
                fs.dedup();
            }
            push_token(&mut h, &fs, &mut rng);
        }
        compare_layer_grads(
            (gpu, tiled),
            &h,
            (l_n, d, f_n),
            &[0, 1],
            None,
            |_| true,
            &mut rng,
        );
        let codes = encode::DeviceCodes::from_host(tiled, &h).unwrap();
        let tiling = tiled.act_tiling();
        let (starts, _, _) = backward::act_plan(tiled, &codes, &tiling, tiling.split(&codes))
            .unwrap()
            .to_host(tiled)
            .unwrap();
        assert!(starts.len() > 2, "{} tiles", starts.len() - 1);
        // With the shared memory cut small: 1,024 accumulators (a token's first 32 entries; a group of 32
        // tokens or a few a tile; act_grad takes the entries past 32), 7 feature chunks.
        let small = small_tiles_gpu().unwrap();
        let shape = (l_n, d, f_n);
        compare_layer_grads((gpu, small), &h, shape, &[0, 1], None, |_| true, &mut rng);
        // Tilings the kernel cannot run are refused, and leave the setting as it was.
        let bad = |accumulators, feature_chunk| backward::ActTiling {
            accumulators,
            feature_chunk,
            ..Default::default()
        };
        for t in [
            bad(0, 2048),
            bad(1024, 0),
            bad(1024, 2049),
            bad(64 * 1024, 2048),
        ] {
            assert!(small.set_act_tiling(t).is_err(), "{t:?} accepted");
        }
        assert_eq!(small.act_tiling(), bad(1024, 300));
    }

    /// `act_plan` orders a layer's tokens by list length (capped at the split) and packs them into
    /// `act_grad_partial`'s tiles as `ActTiling::plan_host` does, and the packing itself is checked from
    /// its definition: the order holds every token once, in nondecreasing capped length; tiles are runs
    /// of consecutive groups of 32 tokens of that order covering every group, at most 16 groups each, each group's accumulators (32 × its longest
    /// list, capped at the split) at the running sum of the tile's earlier ones and within the tile's
    /// accumulators, a tile closed only when the next group would not fit or it is full, and no more tiles
    /// than the grid `act_grad_partial` gets. Shapes: lists longer than the split, a batch not a multiple of
    /// 32, empty lists, small accumulators (a group a tile), and more groups than `act_plan` reads at a time
    /// (4,096).
    #[test]
    fn act_plan_packs_the_lists_into_tiles() {
        let Some(gpu) = gpu() else {
            return;
        };
        let mut rng = Rng::seed(23);
        let small = backward::ActTiling {
            accumulators: 1024,
            ..Default::default()
        };
        let cases = [
            (600usize, backward::ActTiling::default(), 90usize, 64usize),
            (1000, small, 40, 32),
            (1000, small, 3, 1),
            (33, backward::ActTiling::default(), 0, 1),
            (4096 * 32 + 77, backward::ActTiling::default(), 6, 6),
        ];
        for (n_tokens, tiling, longest, split) in cases {
            let mut h = encode::HostCodes {
                offsets: vec![0],
                ..Default::default()
            };
            for b in 0..n_tokens {
                // One token with the longest list, so that the cap covers it.
                let n = if b == n_tokens / 2 {
                    longest
                } else {
                    rng.below(longest + 1)
                };
                let mut fs: Vec<u32> = (0..n).map(|_| rng.below(4096) as u32).collect();
                fs.sort_unstable();
                fs.dedup();
                push_token(&mut h, &fs, &mut rng);
            }
            let counts: Vec<u32> = h.offsets.windows(2).map(|w| (w[1] - w[0]) as u32).collect();
            let codes = encode::DeviceCodes::from_host(gpu, &h).unwrap();
            let plan = backward::act_plan(gpu, &codes, &tiling, split).unwrap();
            let (starts, offsets, order) = plan.to_host(gpu).unwrap();
            let what = format!("{n_tokens} tokens, {tiling:?}, split {split}");
            // The order: every token once, by capped length.
            let capped = |b: u32| (counts[b as usize] as usize).min(split).min(codes.cap);
            let mut seen = order.clone();
            seen.sort_unstable();
            assert!(seen.iter().copied().eq(0..n_tokens as u32), "{what}: order");
            assert!(
                order.windows(2).all(|w| capped(w[0]) <= capped(w[1])),
                "{what}: not sorted"
            );
            assert_eq!(
                (starts.clone(), offsets.clone()),
                tiling.plan_host(&counts, codes.cap, split),
                "{what}"
            );
            let n_groups = n_tokens.div_ceil(32);
            assert!(starts.len() >= 2 && starts.len() - 1 <= plan.grid, "{what}");
            assert_eq!((starts[0], *starts.last().unwrap()), (0, n_groups as u32));
            let rows = |g: usize| {
                order[32 * g..(32 * g + 32).min(n_tokens)]
                    .iter()
                    .map(|&b| capped(b))
                    .max()
                    .unwrap()
            };
            for t in 0..starts.len() - 1 {
                let (g0, g1) = (starts[t] as usize, starts[t + 1] as usize);
                assert!(
                    g0 < g1 && g1 - g0 <= backward::ACT_TILE_GROUPS,
                    "{what}: tile {t}"
                );
                let mut used = 0;
                for g in g0..g1 {
                    assert_eq!(offsets[g] as usize, used, "{what}: group {g}");
                    used += 32 * rows(g);
                }
                assert!(used <= tiling.accumulators, "{what}: tile {t} holds {used}");
                if g1 < n_groups {
                    assert!(
                        g1 - g0 == backward::ACT_TILE_GROUPS
                            || used + 32 * rows(g1) > tiling.accumulators,
                        "{what}: tile {t} closed early"
                    );
                }
            }
        }
    }

    /// `ActTiling::rows_for`: the rows `act_grad_partial` gives a token leave at most one token in `tail`
    /// longer (a host computation: runs without a GPU).
    #[test]
    fn act_tiling_rows_leave_at_most_the_tail_longer() {
        let t = |tail| backward::ActTiling {
            tail,
            ..Default::default()
        };
        // 2,048 tokens of 60 entries, 2 of 500: at tail 1,024 the two long ones go past the rows.
        let mut lengths = vec![0; 501];
        lengths[60] = 2048;
        lengths[500] = 2;
        assert_eq!(t(1024).rows_for(&lengths), 60);
        // A third long one (499) is one more than 2,051 / 1,024 allows: the rows reach it.
        lengths[499] = 1;
        assert_eq!(t(1024).rows_for(&lengths), 499);
        // A tail of 1 lets every list be longer: one row (the least there is).
        assert_eq!(t(1).rows_for(&lengths), 1);
        // Lengths spread 0..=99, 100 tokens each: 10,000 / 1,024 = 9 tokens may be longer, fewer than the
        // 100 of length 99, so the rows are 99; at a tail of 50 (200 tokens: lengths 99 and 98), 97.
        let spread = vec![100; 100];
        assert_eq!(t(1024).rows_for(&spread), 99);
        assert_eq!(t(50).rows_for(&spread), 97);
        // No tokens, or only empty lists: one row.
        assert_eq!(t(1024).rows_for(&[]), 1);
        assert_eq!(t(1024).rows_for(&[7]), 1);
    }

    /// One layer's backward with `act_grad_partial` holding rows for all but the 6 longest lists of 600
    /// (`tail` = 100: at most 6 tokens may list more), whose entries past the rows `act_grad` computes, a
    /// warp each, against the gathers: lists of up to 40 entries, and 6 of 150 to 400. The split is checked
    /// to fall below the longest list, so the tail launch runs. Activation gradients' outputs within f32
    /// rounding, the rest to the bit.
    #[test]
    fn tiled_activation_gradient_leaves_the_longest_lists_to_the_gather() {
        let (Some(gpu), Some(tail)) = (gpu(), tail_tiles_gpu()) else {
            return;
        };
        let (l_n, d, f_n, n_tokens) = (2usize, 1040usize, 2100usize, 600usize);
        let mut rng = Rng::seed(17);
        let mut h = encode::HostCodes {
            offsets: vec![0],
            ..Default::default()
        };
        for b in 0..n_tokens {
            let n = if b % 100 == 37 {
                150 + rng.below(250)
            } else {
                rng.below(41)
            };
            let mut fs: Vec<u32> = (0..n).map(|_| rng.below(f_n) as u32).collect();
            fs.sort_unstable();
            fs.dedup();
            push_token(&mut h, &fs, &mut rng);
        }
        let codes = encode::DeviceCodes::from_host(gpu, &h).unwrap();
        let split = tail.act_tiling().split(&codes);
        assert!(
            split <= 40 && split < codes.longest,
            "split {split}, longest {}",
            codes.longest
        );
        compare_layer_grads(
            (gpu, tail),
            &h,
            (l_n, d, f_n),
            &[0, 1],
            None,
            |_| true,
            &mut rng,
        );
    }

    /// One layer's backward with the encoder and decoder rows' gradients from `row_grad_tiled` against
    /// `feature_grads`' own, where the tiled kernel's loops wrap (d = 8: one 8-column chunk of input):
    /// 2,100 features (three tiles of 1,024, 4 features a thread), 2,100 tokens (three chunks of 1,024
    /// staged in turn through its two buffers), rows of 16 and 24 columns (two and three 8-column chunks; source layers 1 and 0 of three),
    /// near-threshold entries (activation 0), feature 7 on every token, and the pre-activation loss off
    /// for a third of the features. Every output of the layer to the bit, but for layer 1's activation
    /// gradients, which `act_grad_partial` sums in another order (16-column rows).
    #[test]
    fn tiled_row_gradients_match_the_gathers_across_tiles() {
        let (Some(gpu), Some(tiled)) = (gpu(), tiled_gpu()) else {
            return;
        };
        let (l_n, d, f_n, n_tokens) = (3usize, 8usize, 2100usize, 2100usize);
        let mut rng = Rng::seed(11);
        let mut h = encode::HostCodes {
            offsets: vec![0],
            ..Default::default()
        };
        for _ in 0..n_tokens {
            let mut fs: Vec<u32> = (0..rng.below(30)).map(|_| rng.below(f_n) as u32).collect();
            fs.push(7);
            fs.sort_unstable();
            fs.dedup();
            push_token(&mut h, &fs, &mut rng);
        }
        // The pre-activation loss off for a third of the features (their κ is 0). Layer 1's rows (16
        // columns) take act_grad_partial.
        let mask: Vec<u8> = (0..f_n).map(|f| (f % 3 != 0) as u8).collect();
        let shape = (l_n, d, f_n);
        let want = compare_layer_grads(
            (gpu, tiled),
            &h,
            shape,
            &[0, 1],
            Some(&mask),
            |rl| rl % 16 == 0,
            &mut rng,
        );
        // Not vacuous: feature 7's row (every token) and most features' rows are nonzero.
        for (layer, w) in want.iter().enumerate() {
            let (rl, nonzero) = ((l_n - layer) * d, |v: &u32| f32::from_bits(*v) != 0.0);
            assert!(w[0][7 * rl..8 * rl].iter().all(nonzero));
            assert!(w[0].iter().filter(|v| nonzero(v)).count() > f_n * rl / 2);
        }
    }

    /// `row_grad_tiled` refuses rows it cannot read 16 bytes at a time and buffers of the wrong size, and
    /// the tiled decode refuses layers with different feature counts, before queuing anything.
    #[test]
    fn tiled_kernels_refuse_what_they_cannot_read() {
        let Some(gpu) = gpu() else { return };
        let h = encode::HostCodes {
            offsets: vec![0, 2, 3],
            feat: vec![0, 2, 1],
            pre: vec![1.0; 3],
            act: vec![1.0; 3],
        };
        let codes = encode::DeviceCodes::from_host(gpu, &h).unwrap();
        let csr = backward::group_by_feature(gpu, &codes, 3).unwrap();
        let src = gpu.zeros::<f32>(2 * 32).unwrap();
        let rows = |offset, stride| backward::TokenRows {
            buf: &src,
            offset,
            stride,
        };
        let out = |n| gpu.zeros::<f32>(n).unwrap();
        let dec = backward::RowTerm::Decoder;
        let run = |r: backward::TokenRows, row_len, term: &backward::RowTerm, n_out| {
            backward::row_grad_tiled(gpu, &codes, &csr, &r, row_len, term, &out(n_out))
        };
        let unsupported = |r: clt::Result<()>| matches!(r, Err(clt::Error::Unsupported(_)));
        let shape = |r: clt::Result<()>| matches!(r, Err(clt::Error::Shape { .. }));
        assert!(run(rows(0, 32), 16, &dec, 48).is_ok());
        assert!(unsupported(run(rows(0, 32), 12, &dec, 36)));
        assert!(unsupported(run(rows(2, 32), 16, &dec, 48)));
        assert!(unsupported(run(rows(0, 30), 16, &dec, 48)));
        assert!(shape(run(rows(0, 32), 16, &dec, 40)));
        assert!(shape(run(rows(24, 32), 16, &dec, 48)));
        assert!(shape(run(rows(0, 8), 16, &dec, 48)));
        // The encoder rows' inputs: ∂L/∂h per listed entry, Σ x over the row, norms and mask per feature.
        let (ge, xsum, norms) = (out(2 * codes.cap), out(16), out(3));
        let mask = gpu.zeros::<u8>(3).unwrap();
        let enc = |ge, xsum, norms, preact_mask| backward::RowTerm::Encoder {
            ge,
            xsum,
            norms,
            preact_mask,
            pre_scale: 0.5,
            jump: true,
        };
        assert!(run(rows(0, 32), 16, &enc(&ge, &xsum, &norms, Some(&mask)), 48).is_ok());
        let short = out(2);
        assert!(shape(run(
            rows(0, 32),
            16,
            &enc(&short, &xsum, &norms, None),
            48
        )));
        assert!(shape(run(
            rows(0, 32),
            16,
            &enc(&ge, &short, &norms, None),
            48
        )));
        assert!(shape(run(
            rows(0, 32),
            16,
            &enc(&ge, &xsum, &short, None),
            48
        )));
        let short_mask = gpu.zeros::<u8>(2).unwrap();
        assert!(shape(run(
            rows(0, 32),
            16,
            &enc(&ge, &xsum, &norms, Some(&short_mask)),
            48
        )));
        // The tiled decode: two layers whose decoders hold different feature counts.
        let (w0, w1) = (
            gpu.zeros::<u16>(3 * 16).unwrap(),
            gpu.zeros::<u16>(4 * 8).unwrap(),
        );
        let layers = [
            decode::DecodeLayer {
                codes: &codes,
                w_dec: &w0,
                row_len: 16,
            },
            decode::DecodeLayer {
                codes: &codes,
                w_dec: &w1,
                row_len: 8,
            },
        ];
        let b_dec = gpu.zeros::<f32>(16).unwrap();
        let r = decode::sparse_decode_tiled(gpu, &layers, &b_dec, None, 8, true, 1.0);
        assert!(matches!(r, Err(clt::Error::Shape { .. })), "{:?}", r.err());
        // decode_order: layers whose lists cover different numbers of tokens.
        let three = encode::DeviceCodes::from_host(
            gpu,
            &encode::HostCodes {
                offsets: vec![0, 1, 1, 2],
                feat: vec![0, 1],
                pre: vec![1.0; 2],
                act: vec![1.0; 2],
            },
        )
        .unwrap();
        let uneven = [
            decode::DecodeLayer {
                codes: &codes,
                w_dec: &w0,
                row_len: 16,
            },
            decode::DecodeLayer {
                codes: &three,
                w_dec: &w0,
                row_len: 16,
            },
        ];
        let r = decode::decode_order(gpu, &uneven, true);
        match r {
            Err(clt::Error::Shape { what, .. }) => assert!(what.contains("layer 1"), "{what}"),
            other => panic!("expected a shape error, got {:?}", other.err()),
        }
    }

    /// A decode's ŷ, residual and squared errors equal (`want_*`) to the bit.
    fn check_same_decode(
        gpu: &Gpu,
        got: &decode::DecodeOut,
        want_yhat: &[f32],
        want_r: &[f32],
        want_sq: &[f32],
    ) -> Result<(), TestCaseError> {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let yhat = gpu.download(&got.yhat).unwrap();
        let r = gpu.download(got.resid.as_ref().unwrap()).unwrap();
        let sq = gpu.download(got.sq_err.as_ref().unwrap()).unwrap();
        prop_assert!(
            bits(&yhat) == bits(want_yhat),
            "tiled ŷ differs from the gather's"
        );
        prop_assert!(bits(&r) == bits(want_r), "tiled residual differs");
        prop_assert!(bits(&sq) == bits(want_sq), "tiled squared error differs");
        Ok(())
    }

    /// Uploads one feature list per token and checks `group_by_feature` against the entries grouped on the
    /// host: every feature's segment holds its entry ids `b·cap + slot` in increasing order; `by_length`
    /// holds every feature once, longest segment first up to its buckets (a length after another is at
    /// most it, or within an eighth of it from 16 on).
    fn check_grouping(
        gpu: &Gpu,
        lists: impl Iterator<Item = Vec<u32>>,
        f_n: usize,
    ) -> Result<(), TestCaseError> {
        let mut h = encode::HostCodes {
            offsets: vec![0],
            ..Default::default()
        };
        for fs in lists {
            h.feat.extend(&fs);
            h.pre.extend(fs.iter().map(|_| 1.0f32));
            h.act.extend(fs.iter().map(|_| 1.0f32));
            h.offsets.push(h.feat.len());
        }
        let n_tokens = h.offsets.len() - 1;
        let codes = encode::DeviceCodes::from_host(gpu, &h).unwrap();
        let csr = backward::group_by_feature(gpu, &codes, f_n).unwrap();
        let start = gpu.download(&csr.fstart).unwrap();
        let order = gpu.download(&csr.order).unwrap();
        let mut want: Vec<Vec<u32>> = vec![Vec::new(); f_n];
        for b in 0..n_tokens {
            for e in h.offsets[b]..h.offsets[b + 1] {
                want[h.feat[e] as usize].push((b * codes.cap + e - h.offsets[b]) as u32);
            }
        }
        prop_assert_eq!(start[f_n] as usize, h.feat.len());
        for f in 0..f_n {
            prop_assert_eq!(
                &order[start[f] as usize..start[f + 1] as usize],
                &want[f][..],
                "feature {}",
                f
            );
        }
        let by_length = gpu.download(&csr.by_length).unwrap();
        let mut seen = by_length.clone();
        seen.sort_unstable();
        prop_assert!(
            seen.iter().copied().eq(0..f_n as u32),
            "by_length: {:?}",
            by_length
        );
        let len = |f: u32| want[f as usize].len();
        for w in by_length.windows(2) {
            let (prev, next) = (len(w[0]), len(w[1]));
            prop_assert!(
                next <= prev || (prev >= 16 && next <= prev + prev / 8),
                "segment of {} after one of {}",
                next,
                prev
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases().div_ceil(4)))]

        /// The training step with long per-feature lists and wide rows: d > 256 makes about half the
        /// features active on each token, so a feature has hundreds of entries and its gradient block
        /// (`feature_grads`) and segment sort (`csr_sort`) go through more than one chunk of 256, as do the
        /// columns; the small shapes of `training_step_matches_cpu` only ever take one.
        #[test]
        fn training_step_with_long_feature_lists_matches_cpu(
            l_n in 1usize..3, d in 257usize..300, f_n in 1usize..6, n_tokens in 520usize..700,
            kind in 0u8..4, k_raw in 1usize..6, seed in any::<u64>(),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            check_training_step(gpu, l_n, d, f_n, n_tokens, kind, k_raw, false, 0.05, seed.is_multiple_of(2), false, false, seed)?;
        }
    }

    /// Cases per property: `CLT_GPU_CASES` (scripts/gpu-check.sh raises it), else 24.
    fn cases() -> u32 {
        std::env::var("CLT_GPU_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(24)
    }

    fn cpu_enc_threads() -> clt::backend::cpu::gemm::Threads {
        clt::backend::cpu::gemm::Threads::One
    }
}
