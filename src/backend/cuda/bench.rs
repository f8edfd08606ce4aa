//! Per-kernel timings of the CUDA backend on the device (`clt bench --cuda`, `cargo bench --features cuda
//! --bench cuda`): CUDA events, median of 5 after 2 warm-ups, random data (never zeros), each kernel's
//! TFLOP/s against the bf16 ceiling and GB/s against the device copy rate measured in the same run; then the
//! whole sparse step against the dense cuBLAS step ([`super::dense`]) on the same parameters and batch, and
//! their ratio. Timings include the wrappers' allocations (and, for the encoder, the count read-back), so
//! they are upper bounds on kernel time.

use super::memory::DBuf;
use super::{Gpu, adam, backward, decode, dense, dequant, encode, resident, step};
use crate::Result;
use crate::backend::cpu::adam::AdamHyper;
use crate::backend::{ActBlocks, EncoderKernel, Objective, SparseKernels, ThresholdGrad};
use crate::bench::{CudaRows, Preset};
use crate::clt::{Activation, CltConfig, DecoderKind};
use crate::rng::Rng;
use crate::store::Codec;

/// The H100's bf16 dense matrix-product ceiling (measured on the GPU machine, ../shared/docs/gpu.md).
pub const BF16_TFLOPS: f64 = 798.0;
/// The H100's device copy bandwidth measured on the GPU machine (bytes read + written); the bench measures
/// its own device's copy rate too and reports against that.
pub const COPY_GBS: f64 = 3000.0;

/// How a row of [`run_with`] is timed. `name` is the row's name; the returned milliseconds go into the
/// printed table (and into its ratios).
pub trait Timer {
    fn time(&mut self, gpu: &Gpu, name: &str, f: &mut dyn FnMut() -> Result<()>) -> Result<f64>;
}

/// `clt bench --cuda`'s timer: CUDA events around each run, the median of 5 after 2 warm-ups.
pub struct Median;

impl Timer for Median {
    fn time(&mut self, gpu: &Gpu, name: &str, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        median(gpu, 5, f).map_err(|e| in_row(name, e))
    }
}

/// A row's failure, naming the row: the bench stops at the first error (a kernel fault poisons the
/// context), and the error alone would not say which of the kernels it timed failed.
pub fn in_row(name: &str, e: crate::Error) -> crate::Error {
    crate::Error::Cuda {
        what: format!("bench row `{name}`"),
        reason: e.to_string(),
    }
}

/// The median of `reps` event-timed runs of `f` after 2 warm-ups, in milliseconds.
pub fn median(gpu: &Gpu, reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    median_after(gpu, 2, reps, f)
}

/// The median of `reps` event-timed runs of `f` after `warmups` untimed ones, in milliseconds.
pub fn median_after(
    gpu: &Gpu,
    warmups: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmups {
        f()?;
    }
    let mut t: Vec<f64> = (0..reps)
        .map(|_| gpu.time_ms(&mut f).map(|v| v as f64))
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// The device's copy rate in GB/s (bytes read + written): device-to-device copies of `n` f32 (256 Mi: 1 GiB),
/// median of 5 after 2 warm-ups.
pub fn copy_ceiling_gbs(gpu: &Gpu, n: usize) -> Result<f64> {
    let src = gpu.upload(&(0..n).map(|i| (i % 977) as f32).collect::<Vec<f32>>())?;
    let mut dst = gpu.zeros::<f32>(n)?;
    let ms = median(gpu, 5, || gpu.copy(&src, &mut dst))?;
    Ok(2.0 * (n * 4) as f64 / ms / 1e6)
}

/// Lists of `n_tokens` tokens with `l0` distinct features each, drawn with probability ∝ 1 / rank from
/// `n_features` (Zipf's law, exponent 1: at 8,192 features the most frequent is on nearly every token of 64
/// draws, the rarest on about one in a thousand), ranks mapped to features by a random permutation, in
/// increasing feature order; activations and pre-activations in 1..2.
fn zipf_lists(n_tokens: usize, n_features: usize, l0: usize, seed: u64) -> encode::HostCodes {
    let mut rng = Rng::seed(seed);
    let cdf: Vec<f64> = (0..n_features)
        .scan(0.0, |s, r| {
            *s += 1.0 / (r + 1) as f64;
            Some(*s)
        })
        .collect();
    let total = cdf.last().copied().unwrap_or(0.0);
    let mut feature: Vec<u32> = (0..n_features as u32).collect();
    for i in (1..n_features).rev() {
        feature.swap(i, rng.below(i + 1));
    }
    let want = l0.min(n_features);
    let mut h = encode::HostCodes {
        offsets: vec![0],
        ..Default::default()
    };
    let mut fs = Vec::with_capacity(want);
    for _ in 0..n_tokens {
        fs.clear();
        while fs.len() < want {
            let u = rng.uniform() * total;
            let f = feature[cdf.partition_point(|&c| c < u).min(n_features - 1)];
            if !fs.contains(&f) {
                fs.push(f);
            }
        }
        fs.sort_unstable();
        for &f in &fs {
            h.feat.push(f);
            h.pre.push(1.0 + rng.uniform() as f32);
            h.act.push(1.0 + rng.uniform() as f32);
        }
        h.offsets.push(h.feat.len());
    }
    h
}

/// Lists of `n_tokens` tokens whose lengths vary as real data's do: `l0 · g` entries (capped at half the
/// features), g log-normal with σ = 1 and mean 1 (the median token lists 0.6 · l0, one in a hundred over
/// 6 · l0, the longest of 16,384 about 30 · l0); distinct features drawn uniformly, in increasing order;
/// activations and pre-activations in 1..2.
fn uneven_lists(n_tokens: usize, n_features: usize, l0: usize, seed: u64) -> encode::HostCodes {
    let mut rng = Rng::seed(seed);
    let mut h = encode::HostCodes {
        offsets: vec![0],
        ..Default::default()
    };
    let mut taken = vec![false; n_features];
    let mut fs = Vec::new();
    for _ in 0..n_tokens {
        let g = (rng.normal() - 0.5).exp();
        let n = ((l0 as f64 * g).round() as usize).min(n_features / 2);
        fs.clear();
        while fs.len() < n {
            let f = rng.below(n_features);
            if !taken[f] {
                taken[f] = true;
                fs.push(f as u32);
            }
        }
        fs.sort_unstable();
        for &f in &fs {
            taken[f as usize] = false;
            h.feat.push(f);
            h.pre.push(1.0 + rng.uniform() as f32);
            h.act.push(1.0 + rng.uniform() as f32);
        }
        h.offsets.push(h.feat.len());
    }
    h
}

/// The decodes on [`uneven_lists`] (every layer the same lists, `layers`' decoders): the gather, and the
/// tiled decode in decode_order's order and in batch order, whose ratio is what the order buys where list
/// lengths vary as with real data. `(codes, n_entries)`: the lists on the device and their entries.
fn time_uneven_decode(
    gpu: &Gpu,
    timer: &mut dyn Timer,
    rec: &mut Record,
    layers: &[decode::DecodeLayer],
    b_dec: &DBuf<f32>,
    targets: &decode::Targets,
    (codes, n_entries): (&encode::DeviceCodes, usize),
) -> Result<()> {
    let (l_n, d, b_n) = (layers.len(), targets.d, codes.n_tokens);
    rec.say(format!(
        "  uneven lists: {:.1} entries a token, the longest {}",
        n_entries as f64 / b_n.max(1) as f64,
        codes.longest
    ));
    let uneven_layers: Vec<decode::DecodeLayer> = layers
        .iter()
        .map(|v| decode::DecodeLayer { codes, ..*v })
        .collect();
    let rows_bytes: f64 = (0..l_n)
        .map(|s| (n_entries * (l_n - s) * d * 2) as f64)
        .sum();
    let bytes = (3 * b_n * l_n * d * 4) as f64 + rows_bytes;
    let (y, cross, scale) = (targets.y, targets.cross_layer, targets.resid_scale);
    let gather_ms = timer.time(gpu, "sparse decode, uneven lists", &mut || {
        decode::sparse_decode(gpu, &uneven_layers, b_dec, y, d, cross, scale).map(|_| ())
    })?;
    rec.report("sparse decode, uneven lists", gather_ms, 0.0, bytes);
    let mut tiled = [0.0; 2];
    for (t, (name, order)) in tiled.iter_mut().zip([
        ("  tiled", decode::TokenOrder::ByLength),
        ("  tiled, in batch order", decode::TokenOrder::Batch),
    ]) {
        *t = timer.time(gpu, name, &mut || {
            decode::sparse_decode_tiled_in(gpu, &uneven_layers, b_dec, targets, order).map(|_| ())
        })?;
        rec.report(name, *t, 0.0, bytes);
    }
    rec.say(format!(
        "  uneven lists: gather / tiled decode time {:.2}x; batch order / by length {:.2}x",
        gather_ms / tiled[0],
        tiled[1] / tiled[0]
    ));
    Ok(())
}

/// `act_grad_partial`'s tiles of `codes` with `tiling` and `split` (`act_plan`, read back).
fn act_tiles(
    gpu: &Gpu,
    codes: &encode::DeviceCodes,
    tiling: &backward::ActTiling,
    split: usize,
) -> Result<usize> {
    let (starts, _, _) = backward::act_plan(gpu, codes, tiling, split)?.to_host(gpu)?;
    Ok(starts.len() - 1)
}

/// "N tiles of M tokens on average".
fn tiles_text(tiles: usize, n_tokens: usize) -> String {
    format!(
        "{tiles} tile{} of {:.0} tokens on average",
        if tiles == 1 { "" } else { "s" },
        n_tokens as f64 / tiles.max(1) as f64
    )
}

/// One kernel row of the bench: its time, and its rates against the bf16 ceiling and the copy rate
/// measured in the same run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub name: String,
    pub ms: f64,
    pub tflops: f64,
    pub pct_of_bf16: f64,
    pub gbs: f64,
    pub pct_of_copy: f64,
}

/// What a run of the bench printed (`clt bench --cuda --json` writes it): the device, the shape, the
/// ceilings, each kernel row, and every other line (ratios, choices, notes) in order.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Record {
    pub device: String,
    pub preset: String,
    /// `--cuda-rows`: which rows ran (`all`, `no-wgmma`, `encoders`).
    pub cuda_rows: String,
    /// Seconds since the Unix epoch when the run began.
    pub unix_time: u64,
    /// (layers, d, features per layer, tokens, L0).
    pub shape: (usize, usize, usize, usize, usize),
    /// The device copy rate measured at the start (GB/s, bytes read + written).
    pub copy_gbs: f64,
    /// The bf16 ceiling the percentages are of (nominal, [`BF16_TFLOPS`]).
    pub bf16_tflops: f64,
    pub rows: Vec<Row>,
    pub lines: Vec<String>,
}

impl Record {
    /// Prints one row (time, TFLOP/s against the bf16 ceiling, GB/s against the measured copy rate) and
    /// keeps it.
    fn report(&mut self, name: &str, ms: f64, flops: f64, bytes: f64) {
        let tflops = flops / ms / 1e9;
        let gbs = bytes / ms / 1e6;
        let row = Row {
            name: name.to_string(),
            ms,
            tflops,
            pct_of_bf16: 100.0 * tflops / BF16_TFLOPS,
            gbs,
            pct_of_copy: 100.0 * gbs / self.copy_gbs,
        };
        println!(
            "{name:<34} {ms:>9.3} ms  {tflops:>7.1} TFLOP/s ({:>5.1}% of bf16)  {gbs:>7.0} GB/s ({:>5.1}% of \
             copy)",
            row.pct_of_bf16, row.pct_of_copy
        );
        self.rows.push(row);
    }

    /// Prints a line and keeps it.
    fn say(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        self.lines.push(line);
    }
}

/// Milliseconds of one layer's backward through the tiled kernels with `act_grad_partial`'s shared memory
/// divided as `tiling`; the device is left on the gathers and the default tiling, as the bench keeps it.
fn time_tiled_backward(
    gpu: &Gpu,
    timer: &mut dyn Timer,
    name: &str,
    tiling: backward::ActTiling,
    inp: &backward::LayerGradInput,
) -> Result<f64> {
    gpu.set_act_tiling(tiling)?;
    gpu.set_sparse_kernels(SparseKernels::Tiled);
    let t = timer.time(gpu, name, &mut || {
        backward::layer_grads(gpu, inp).map(|_| ())
    });
    gpu.set_sparse_kernels(SparseKernels::Gather);
    gpu.set_act_tiling(backward::ActTiling::default())?;
    t
}

/// One layer's backward on `inp`'s lists through the gathers and through the tiled kernels (default
/// tiling): the rows `backward (1 layer), {label}` and `backward, tiled, {label}`, counting `bytes` each,
/// and their ratio.
fn time_backward_both(
    gpu: &Gpu,
    timer: &mut dyn Timer,
    rec: &mut Record,
    label: &str,
    inp: &backward::LayerGradInput,
    bytes: f64,
) -> Result<()> {
    let name = format!("backward (1 layer), {label}");
    let gather_ms = timer.time(gpu, &name, &mut || {
        backward::layer_grads(gpu, inp).map(|_| ())
    })?;
    rec.report(&name, gather_ms, 0.0, bytes);
    let name = format!("backward, tiled, {label}");
    let tiled_ms = time_tiled_backward(gpu, timer, &name, backward::ActTiling::default(), inp)?;
    rec.report(&name, tiled_ms, 0.0, bytes);
    rec.say(format!(
        "  gather / tiled backward time, {label}: {:.2}x",
        gather_ms / tiled_ms
    ));
    Ok(())
}

/// Runs every kernel bench on device 0 and prints the table: with [`Preset::Large`] the issue's
/// Llama-3.2-1B shape (16 layers, d = 2048, 8192 features per layer, 16,384 tokens, L0 ≈ 64), with
/// [`Preset::Small`] a quarter of it in tokens and features, with [`Preset::Tiny`] a smoke test of every code
/// path (2 layers, d = 64, 256 features, 256 tokens, L0 ≈ 8; its GEMM and copy are small too) that the CPU
/// emulator (kernels/emu/) runs in seconds.
/// `rows` selects the rows ([`CudaRows`]). Returns what it printed ([`Record`]: `clt bench --cuda --json`).
pub fn run(preset: Preset, rows: CudaRows) -> Result<Record> {
    run_with(preset, rows, &mut Median)
}

/// [`run`] with every kernel row timed by `timer` (the criterion bench, benches/cuda.rs, passes one that
/// hands each row to criterion as well).
pub fn run_with(preset: Preset, rows: CudaRows, timer: &mut dyn Timer) -> Result<Record> {
    let gpu = Gpu::open(0)?;
    let (l_n, d, f_n, b_n, l0) = match preset {
        Preset::Large => (16usize, 2048usize, 8192usize, 16384usize, 64usize),
        Preset::Small => (16, 2048, 2048, 4096, 64),
        Preset::Tiny => (2, 64, 256, 256, 8),
    };
    let tiny = preset == Preset::Tiny;
    let mut rec = Record {
        device: gpu.describe(),
        preset: format!("{preset:?}").to_lowercase(),
        cuda_rows: clap::ValueEnum::to_possible_value(&rows)
            .map_or_else(|| format!("{rows:?}"), |v| v.get_name().to_string()),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs()),
        shape: (l_n, d, f_n, b_n, l0),
        bf16_tflops: BF16_TFLOPS,
        ..Default::default()
    };
    rec.say(format!(
        "device {}; L = {l_n}, d = {d}, F = {f_n}, B = {b_n}, L0 ≈ {l0}",
        gpu.describe()
    ));
    let copy_n = if tiny { 1 << 20 } else { 256 << 20 };
    let copy = copy_ceiling_gbs(&gpu, copy_n)?;
    rec.copy_gbs = copy;
    rec.say(format!(
        "device copy ({} MiB, read + write): {copy:.0} GB/s measured ({:.0}% of the {COPY_GBS:.0} GB/s \
         nominal); bf16 ceiling {BF16_TFLOPS} TFLOP/s (nominal); percentages below are of these two",
        (copy_n * 4) >> 20,
        100.0 * copy / COPY_GBS
    ));
    // cuBLAS is needed only for its GEMM rate and the dense baseline: without it the kernel rows still run.
    let blas = dense::Blas::new(&gpu);
    match &blas {
        Ok(blas) => {
            let n = if tiny { 256 } else { 8192 };
            let vals: Vec<f32> = (0..n * n)
                .map(|i| ((i * 7919) % 1021) as f32 / 1021.0 - 0.5)
                .collect();
            let (a, c) = (gpu.upload_bf16(&vals)?, gpu.zeros::<f32>(n * n)?);
            let ms = timer.time(&gpu, "cuBLAS bf16 GEMM", &mut || {
                dense::gemm_square(&gpu, blas, &a, &c, n)
            })?;
            let gemm = 2.0 * (n as f64).powi(3) / ms / 1e9;
            rec.say(format!(
                "cuBLAS bf16 GEMM {n}³ (fp32 accumulate): {gemm:.0} TFLOP/s measured ({:.0}% of the \
                 nominal ceiling)",
                100.0 * gemm / BF16_TFLOPS
            ));
        }
        Err(e) => rec.say(format!("cuBLAS: {e} (no GEMM rate, no dense baseline)")),
    }
    let mut rng = Rng::seed(7);
    // Random values (a 1 Mi-value random block repeated: large tensors fill fast, never zeros).
    let base: Vec<f32> = (0..1 << 20).map(|_| rng.normal() as f32).collect();
    let rand = |n: usize, s: f64| -> Vec<f32> {
        base.iter()
            .cycle()
            .take(n)
            .map(|v| (s * *v as f64) as f32)
            .collect()
    };
    // Encoder of one layer (the middle one), thresholds set so that about L0 features fire per token.
    let l = l_n / 2;
    let row = l_n * d;
    let x = gpu.upload_bf16(&rand(b_n * row, 1.0))?;
    let w = gpu.upload_bf16(&rand(f_n * d, 1.0 / (d as f64).sqrt()))?;
    let bias = gpu.upload(&vec![0f32; f_n])?;
    // h ~ N(0, 1): P(h > θ) = L0 / F.
    let z = inv_normal_tail(l0 as f64 / f_n as f64) as f32;
    let theta = gpu.upload(&vec![z; f_n])?;
    let inp = encode::EncodeInput {
        x: &x,
        x_offset: l * d,
        x_stride: row,
        n_tokens: b_n,
        d,
        w: &w,
        bias: &bias,
        n_features: f_n,
    };
    // encode_wgmma, encode_wgmma_narrow and encode_wgmma_tma (sm_90a) where the device has them; encode_mma runs last: the
    // codes below are its.
    let wgmma = gpu.has_wgmma() && rows != CudaRows::NoWgmma;
    if rows == CudaRows::NoWgmma {
        rec.say("  encode wgmma: left out (--cuda-rows no-wgmma)");
    } else if !wgmma {
        rec.say(format!(
            "  encode wgmma: skipped ({} has no wgmma: compute capability 9.x only)",
            gpu.describe()
        ));
    }
    let gemms = |epilogue: &str| {
        let mut v = vec![(format!("encode SIMT ({epilogue})"), encode::Gemm::Simt)];
        if wgmma {
            v.push((
                format!("encode wgmma 256 ({epilogue})"),
                encode::Gemm::Wgmma,
            ));
            v.push((
                format!("encode wgmma 128 ({epilogue})"),
                encode::Gemm::WgmmaNarrow,
            ));
            v.push((
                format!("encode wgmma 256 TMA ({epilogue})"),
                encode::Gemm::WgmmaTma,
            ));
        }
        v.push((format!("encode mma ({epilogue})"), encode::Gemm::TensorCore));
        v
    };
    // Each epilogue's times by kernel, for the mma / wgmma ratio lines and the fastest tensor-core kernel
    // by its `[train] encoder_kernel` name.
    let ratios = |rec: &mut Record, times: &[(encode::Gemm, f64)], epilogue: &str| {
        let mma = times.iter().find(|t| t.0 == encode::Gemm::TensorCore);
        let choices = [
            (encode::Gemm::TensorCore, EncoderKernel::Mma, "mma"),
            (encode::Gemm::Wgmma, EncoderKernel::Wgmma, "wgmma 256"),
            (
                encode::Gemm::WgmmaNarrow,
                EncoderKernel::WgmmaNarrow,
                "wgmma 128",
            ),
            (
                encode::Gemm::WgmmaTma,
                EncoderKernel::WgmmaTma,
                "wgmma 256 TMA",
            ),
        ];
        let mut best: Option<(EncoderKernel, f64)> = None;
        let mut timed = 0;
        for (gemm, kernel, label) in choices {
            let Some(w) = times.iter().find(|t| t.0 == gemm) else {
                continue;
            };
            timed += 1;
            if let Some(m) = mma.filter(|_| gemm != encode::Gemm::TensorCore) {
                rec.say(format!("  mma / {label} encoder time: {:.2}x", m.1 / w.1));
            }
            if best.is_none_or(|b| w.1 < b.1) {
                best = Some((kernel, w.1));
            }
        }
        // (Only when there was a choice: with the wgmma rows left out, mma is the only one.)
        if let Some((kernel, _)) = best.filter(|_| timed > 1) {
            rec.say(format!(
                "  fastest tensor-core encoder ({epilogue}): [train] encoder_kernel = \"{}\"",
                kernel.name()
            ));
        }
    };
    let mut times = Vec::new();
    let mut codes = None;
    for (name, gemm) in gemms("JumpReLU") {
        let name = name.as_str();
        let ms = timer.time(&gpu, name, &mut || {
            codes = Some(encode::jumprelu_with(
                &gpu,
                &inp,
                &theta,
                0.01,
                2 * l0,
                gemm,
            )?);
            Ok(())
        })?;
        rec.report(
            name,
            ms,
            2.0 * (b_n * d * f_n) as f64,
            (b_n * d * 2 + f_n * d * 2) as f64,
        );
        times.push((gemm, ms));
    }
    ratios(&mut rec, &times, "JumpReLU");
    {
        let h = gpu.output::<f32>(b_n * f_n)?;
        times.clear();
        for (name, gemm) in gemms("dense") {
            let name = name.as_str();
            let ms = timer.time(&gpu, name, &mut || {
                encode::dense_into_with(&gpu, &inp, &h, 0, gemm)
            })?;
            times.push((gemm, ms));
            rec.report(
                name,
                ms,
                2.0 * (b_n * d * f_n) as f64,
                (b_n * d * 2 + f_n * d * 2 + b_n * f_n * 4) as f64,
            );
        }
        ratios(&mut rec, &times, "dense, TopK");
    }
    if rows == CudaRows::Encoders {
        return Ok(rec);
    }
    let (codes, window) = codes.expect("encoded");
    let listed = codes.to_host(&gpu)?;
    let nnz = listed.feat.len();
    // The decode reads the rows of active entries only (a near-threshold entry's activation is 0).
    let n_active = listed.act.iter().filter(|a| **a != 0.0).count();
    let act_rows = backward::ActTiling::default().split(&codes);
    let act_n_tiles = act_tiles(&gpu, &codes, &backward::ActTiling::default(), act_rows)?;
    rec.say(format!(
        "  entries listed per token: {:.1} ({:.1} active); the longest list {} (capacity {}): \
         act_grad_partial's default tiles: {} (at most {} entries a token; {} tokens list more)",
        nnz as f64 / b_n as f64,
        n_active as f64 / b_n as f64,
        codes.longest,
        codes.cap,
        tiles_text(act_n_tiles, b_n),
        act_rows,
        codes.lengths.iter().skip(act_rows + 1).sum::<usize>()
    ));
    // act_plan alone (one block: the sort by list length and the packing), which runs before each layer's
    // act_grad_partial; bytes: the counts read three times, the order written.
    let ms = timer.time(&gpu, "act_plan (1 layer)", &mut || {
        backward::act_plan(&gpu, &codes, &backward::ActTiling::default(), act_rows).map(|_| ())
    })?;
    rec.report("act_plan (1 layer)", ms, 0.0, (16 * b_n) as f64);

    // Decode: every layer with the same codes (L0 per layer), cross-layer rows.
    let w_dec: Vec<_> = (0..l_n)
        .map(|s| gpu.upload_bf16(&rand(f_n * (l_n - s) * d, 0.02)))
        .collect::<Result<_>>()?;
    let layers: Vec<decode::DecodeLayer> = (0..l_n)
        .map(|s| decode::DecodeLayer {
            codes: &codes,
            w_dec: &w_dec[s],
            row_len: (l_n - s) * d,
        })
        .collect();
    let b_dec = gpu.upload(&vec![0f32; l_n * d])?;
    let y = gpu.upload(&rand(b_n * row, 1.0))?;
    let mut out = None;
    let ms = timer.time(&gpu, "sparse decode (all layers)", &mut || {
        out = Some(decode::sparse_decode(
            &gpu,
            &layers,
            &b_dec,
            Some(&y),
            d,
            true,
            2.0 / b_n as f32,
        )?);
        Ok(())
    })?;
    // Bytes it must move: y read, ŷ and r written (f32), the active rows once per (token, layer).
    let rows_bytes: f64 = (0..l_n)
        .map(|s| (n_active * (l_n - s) * d * 2) as f64)
        .sum();
    rec.report(
        "sparse decode (all layers)",
        ms,
        0.0,
        (3 * b_n * row * 4) as f64 + rows_bytes,
    );
    // The tiled decode (weights staged once per 1,024 tokens, lists read once per 8 columns): the same
    // result; its row counts the same bytes, so the two percentages compare directly.
    let tiled_ms = timer.time(&gpu, "sparse decode, tiled", &mut || {
        decode::sparse_decode_tiled(&gpu, &layers, &b_dec, Some(&y), d, true, 2.0 / b_n as f32)
            .map(|_| ())
    })?;
    rec.report(
        "sparse decode, tiled",
        tiled_ms,
        0.0,
        (3 * b_n * row * 4) as f64 + rows_bytes,
    );
    rec.say(format!(
        "  gather / tiled decode time: {:.2}x",
        ms / tiled_ms
    ));
    // The tiled decode with the tokens in batch order instead of decode_order's (longest lists first), and
    // decode_order alone (its bytes: the counts read twice for every (source, target) pair, the order
    // written).
    let targets = decode::Targets {
        y: Some(&y),
        d,
        cross_layer: true,
        resid_scale: 2.0 / b_n as f32,
    };
    let decode_rows = (3 * b_n * row * 4) as f64 + rows_bytes;
    let batch_ms = timer.time(&gpu, "  in batch order", &mut || {
        decode::sparse_decode_tiled_in(&gpu, &layers, &b_dec, &targets, decode::TokenOrder::Batch)
            .map(|_| ())
    })?;
    rec.report("  in batch order", batch_ms, 0.0, decode_rows);
    let order_ms = timer.time(&gpu, "decode_order (all layers)", &mut || {
        decode::decode_order(&gpu, &layers, true).map(|_| ())
    })?;
    let order_bytes = (l_n * (l_n + 1) * b_n * 4 + l_n * b_n * 4) as f64;
    rec.report("decode_order (all layers)", order_ms, 0.0, order_bytes);
    // Lists whose lengths vary as real data's do (`uneven_lists`), for the decode here and the backward
    // below.
    let uneven = uneven_lists(b_n, f_n, l0, 13);
    let uneven_codes = encode::DeviceCodes::from_host(&gpu, &uneven)?;
    let uneven_entries = uneven.feat.len();
    drop(uneven);
    let uneven_at = (&uneven_codes, uneven_entries);
    time_uneven_decode(&gpu, timer, &mut rec, &layers, &b_dec, &targets, uneven_at)?;
    let out = out.expect("decoded");
    let resid = out.resid.expect("residual");

    // Backward of the middle layer.
    let xf = gpu.upload(&rand(b_n * row, 1.0))?;
    let norms = gpu.upload(&vec![1f32; f_n])?;
    let obj = Objective {
        lambda: 1.0,
        c: 1.0,
        lambda_preact: 0.1,
        bandwidth: 0.02,
        threshold_grad: ThresholdGrad::Theta,
    };
    let inp = backward::LayerGradInput {
        codes: &codes,
        window: &window,
        w_dec: &w_dec[l],
        row_len: (l_n - l) * d,
        n_features: f_n,
        norms: &norms,
        theta: &theta,
        x: &xf,
        resid: &resid,
        layer: l,
        n_layers: l_n,
        d,
        preact_mask: None,
        obj,
        jump: true,
    };
    let ms = timer.time(&gpu, "backward (1 layer)", &mut || {
        backward::layer_grads(&gpu, &inp).map(|_| ())
    })?;
    let rl = (l_n - l) * d;
    // Bytes one layer's backward must move for `n` listed entries: a decoder row (bf16) and a residual row
    // (f32) an entry, an input row (f32) an entry, the encoder and decoder rows' gradients written (f32).
    let backward_bytes = |n: usize| (n * rl * (2 + 4) + n * d * 4 + f_n * (d + rl) * 4) as f64;
    let bytes = backward_bytes(nnz);
    rec.report("backward (1 layer)", ms, 0.0, bytes);
    // The same backward with the tiled kernels (`act_grad_partial`: decoder slices staged once per tile of
    // tokens; `row_grad_tiled`: residual and input slices staged once per 1,024 features): the same result;
    // its row counts the same bytes, so the two compare directly.
    let tiled_ms = time_tiled_backward(
        &gpu,
        timer,
        "backward (1 layer), tiled",
        backward::ActTiling::default(),
        &inp,
    )?;
    rec.report("backward (1 layer), tiled", tiled_ms, 0.0, bytes);
    rec.say(format!(
        "  gather / tiled backward time: {:.2}x",
        ms / tiled_ms
    ));
    // The same with act_grad_partial's shared memory divided for two and three blocks an SM (the default
    // above: one block, the largest token tiles).
    // (`[train] act_blocks = "two"` and `"three"`.)
    for tiling in [ActBlocks::Two, ActBlocks::Three].map(backward::ActTiling::for_blocks) {
        let name = format!(
            "  act tiles: {} KB + 2 x {} KB",
            tiling.accumulators * 4 / 1024,
            tiling.feature_chunk * 32 / 1024
        );
        let t = time_tiled_backward(&gpu, timer, &name, tiling, &inp)?;
        rec.report(&name, t, 0.0, bytes);
    }

    // A long tail: one token in 2,048 lists 8 times as many entries (a sequence's first token, say). The tiled
    // backward with the default tiling (their entries past the accumulator rows go to act_grad, a warp
    // each) and with rows for the longest list (tail = usize::MAX: no token may list more).
    let mut tail_rng = Rng::seed(11);
    let mut long = encode::HostCodes {
        offsets: vec![0],
        ..Default::default()
    };
    for b in 0..b_n {
        let (s, e) = (listed.offsets[b], listed.offsets[b + 1]);
        let mut fs: Vec<(u32, f32, f32)> = (s..e)
            .map(|i| (listed.feat[i], listed.pre[i], listed.act[i]))
            .collect();
        if b % 2048 == 0 {
            for _ in 0..7 * (e - s).max(l0) {
                fs.push((tail_rng.below(f_n) as u32, 1.0, 1.0));
            }
            fs.sort_by_key(|t| t.0);
            fs.dedup_by_key(|t| t.0);
        }
        for (f, pre, act) in fs {
            long.feat.push(f);
            long.pre.push(pre);
            long.act.push(act);
        }
        long.offsets.push(long.feat.len());
    }
    let long_codes = encode::DeviceCodes::from_host(&gpu, &long)?;
    let long_inp = backward::LayerGradInput {
        codes: &long_codes,
        ..inp
    };
    let n_long = long.feat.len();
    let long_bytes = backward_bytes(n_long);
    let whole = backward::ActTiling {
        tail: usize::MAX,
        ..Default::default()
    };
    let split = backward::ActTiling::default().split(&long_codes);
    rec.say(format!(
        "  long tail: the longest list {}; act_grad_partial's split {} ({}); with a split at the longest \
         list: {}",
        long_codes.longest,
        split,
        tiles_text(
            act_tiles(&gpu, &long_codes, &backward::ActTiling::default(), split)?,
            b_n
        ),
        tiles_text(
            act_tiles(&gpu, &long_codes, &whole, whole.split(&long_codes))?,
            b_n
        )
    ));
    for (name, tiling) in [
        ("backward, tiled, long tail", backward::ActTiling::default()),
        ("  rows for the longest list", whole),
    ] {
        let t = time_tiled_backward(&gpu, timer, name, tiling, &long_inp)?;
        rec.report(name, t, 0.0, long_bytes);
    }
    drop(long_codes);

    // Lists with real data's skew (`zipf_lists`: a few features on most tokens, most on very few), L0
    // entries a token: the gathers (a block a feature in feature_grads) and the tiled kernels, whose walks
    // feature_order and act_plan balance.
    let zipf = zipf_lists(b_n, f_n, l0, 11);
    let zipf_codes = encode::DeviceCodes::from_host(&gpu, &zipf)?;
    let zipf_inp = backward::LayerGradInput {
        codes: &zipf_codes,
        ..inp
    };
    let n_zipf = zipf.feat.len();
    let zipf_bytes = backward_bytes(n_zipf);
    let busiest = {
        let mut per = vec![0usize; f_n];
        zipf.feat.iter().for_each(|&f| per[f as usize] += 1);
        per.into_iter().max().unwrap_or(0)
    };
    rec.say(format!(
        "  Zipf features: {:.1} entries a token; the busiest feature on {busiest} of {b_n} tokens",
        n_zipf as f64 / b_n as f64
    ));
    time_backward_both(
        &gpu,
        timer,
        &mut rec,
        "Zipf features",
        &zipf_inp,
        zipf_bytes,
    )?;
    drop(zipf_codes);

    // The uneven lists of the decode rows: the gathers and the tiled kernels, whose tiles act_plan packs
    // by list length.
    let uneven_inp = backward::LayerGradInput {
        codes: &uneven_codes,
        ..inp
    };
    let uneven_bytes = backward_bytes(uneven_entries);
    let split = backward::ActTiling::default().split(&uneven_codes);
    rec.say(format!(
        "  uneven lists: the longest {}; act_grad_partial's split {split} ({})",
        uneven_codes.longest,
        tiles_text(
            act_tiles(&gpu, &uneven_codes, &backward::ActTiling::default(), split)?,
            b_n
        )
    ));
    time_backward_both(
        &gpu,
        timer,
        &mut rec,
        "uneven lists",
        &uneven_inp,
        uneven_bytes,
    )?;
    drop(uneven_codes);

    // The grouping by feature inside that backward, alone, and with feature 0 added to every token's list
    // (a feature on every token: the segment `csr_sort` orders is the whole batch). Bytes: the lists read
    // twice (count, fill), the unsorted ids written, read twice and written sorted, 4 bytes each.
    let mut hot = encode::HostCodes {
        offsets: vec![0],
        ..Default::default()
    };
    for b in 0..b_n {
        let (s, e) = (listed.offsets[b], listed.offsets[b + 1]);
        hot.feat.extend_from_slice(&listed.feat[s..e]);
        hot.pre.extend_from_slice(&listed.pre[s..e]);
        hot.act.extend_from_slice(&listed.act[s..e]);
        if !listed.feat[s..e].contains(&0) {
            hot.feat.push(0);
            hot.pre.push(1.0);
            hot.act.push(1.0);
        }
        hot.offsets.push(hot.feat.len());
    }
    let hot_codes = encode::DeviceCodes::from_host(&gpu, &hot)?;
    for (name, c, n_listed) in [
        ("group by feature", &codes, nnz),
        ("  one feature on every token", &hot_codes, hot.feat.len()),
    ] {
        let ms = timer.time(&gpu, name, &mut || {
            backward::group_by_feature(&gpu, c, f_n).map(|_| ())
        })?;
        rec.report(name, ms, 0.0, (n_listed * 4 * 6) as f64);
    }
    drop(hot_codes);

    // Fused Adam of one decoder layer (fp32 p, m, v, g; bf16 copy).
    let n = f_n * rl;
    let (p, m, v, g) = (
        gpu.upload(&rand(n, 0.02))?,
        gpu.zeros::<f32>(n)?,
        gpu.zeros::<f32>(n)?,
        gpu.upload(&rand(n, 1e-3))?,
    );
    let coef = gpu.upload(&rand(f_n, 1e-3))?;
    let touched = gpu.upload(&vec![1u8; f_n])?;
    let pb = gpu.zeros::<u16>(n)?;
    let nr = gpu.zeros::<f32>(f_n)?;
    let k = adam::consts(&AdamHyper::default(), 1, 1e-4, 1.0);
    let ms = timer.time(&gpu, "adam (1 decoder layer)", &mut || {
        adam::adam_decoder(&gpu, &p, &m, &v, &g, &coef, &touched, Some(&pb), &nr, rl, k)
    })?;
    rec.report("adam (1 decoder layer)", ms, 0.0, (n * 30) as f64);
    drop((p, m, v, g, pb, resid, out.yhat, out.sq_err));

    // The whole step's loss and gradient (Adam excluded from both): the sparse step on device-resident
    // parameters and batch vs the dense cuBLAS step a dense trainer runs, same parameters, same batch.
    let dp = step::DeviceParams {
        w_skip: Vec::new(),
        w_enc: (0..l_n)
            .map(|_| gpu.upload_bf16(&rand(f_n * d, 1.0 / (d as f64).sqrt())))
            .collect::<Result<_>>()?,
        b_enc: (0..l_n)
            .map(|_| gpu.upload(&vec![0f32; f_n]))
            .collect::<Result<_>>()?,
        theta: (0..l_n)
            .map(|_| gpu.upload(&vec![z; f_n]))
            .collect::<Result<_>>()?,
        w_dec,
        norms: (0..l_n)
            .map(|_| gpu.upload(&vec![1f32; f_n]))
            .collect::<Result<_>>()?,
        b_dec,
    };
    let x_bf = encode::to_bf16(&gpu, &xf)?;
    let batch = step::DeviceBatch {
        n_tokens: b_n,
        x: xf,
        x_bf,
        y,
    };
    let cfg = CltConfig {
        n_layers: l_n,
        d_model: d,
        n_features: f_n,
        decoder: DecoderKind::CrossLayer,
        activation: Activation::JumpRelu,
        skip: false,
    };
    let sparse_ms = timer.time(&gpu, "sparse step (loss + grad)", &mut || {
        step::device_loss_and_grad(&gpu, &cfg, &dp, &batch, &obj, None).map(|_| ())
    })?;
    rec.report("sparse step (loss + grad)", sparse_ms, 0.0, 0.0);
    // What its gathers read (docs/cuda.md, "What today's sparse kernels gather"): per active entry the
    // decoder slices (decode, bf16), per listed entry the decoder row and residual row (act_grad, bf16 +
    // f32), per active entry the residual row and input row (feature_grads, f32); the lists per layer
    // estimated by the encoder row's above (same distributions).
    let rl_sum: usize = (0..l_n).map(|s| (l_n - s) * d).sum();
    let gathered = (n_active * rl_sum * (2 + 4) + nnz * rl_sum * 6 + n_active * l_n * d * 4) as f64;
    rec.say(format!(
        "  its kernels gather ≈ {:.1} GB of rows (one fetch per entry): {:.1} ms at the measured copy \
         rate if none came from cache; the step took {:.0}% of that",
        gathered / 1e9,
        gathered / copy / 1e6,
        100.0 * sparse_ms / (gathered / copy / 1e6)
    ));
    // The same step with the tiled kernels (the same result within f32 rounding).
    gpu.set_sparse_kernels(SparseKernels::Tiled);
    let tiled_step_ms = timer.time(&gpu, "sparse step, tiled kernels", &mut || {
        step::device_loss_and_grad(&gpu, &cfg, &dp, &batch, &obj, None).map(|_| ())
    });
    gpu.set_sparse_kernels(SparseKernels::Gather);
    let tiled_step_ms = tiled_step_ms?;
    rec.report("sparse step, tiled kernels", tiled_step_ms, 0.0, 0.0);
    // What the tiled kernels fetch instead: the decoder staged once per 1,024 tokens (decode) and the
    // residual once per 1,024 features (decoder gradient), with 8 bytes of list per entry for every 8
    // columns in each; the same for the encoder rows (the input staged once per 1,024 features); the
    // decoder staged once per tile of tokens for the activation gradients (`act_grad_partial`'s default
    // tiles), 4 bytes of list (the feature id) per entry for every 16 columns, and the residual once.
    let staged = ((b_n.div_ceil(decode::TILE_TOKENS) + act_n_tiles) * f_n * rl_sum * 2
        + f_n.div_ceil(backward::RG_TILE_FEATURES) * b_n * (rl_sum + l_n * d) * 4)
        as f64;
    let fetched =
        staged + (2 * nnz * rl_sum + nnz * l_n * d + nnz * rl_sum / 4 + b_n * rl_sum * 4) as f64;
    rec.say(format!(
        "  the tiled kernels fetch ≈ {:.1} GB ({:.1} ms at the measured copy rate); the step took {:.0}% \
         of that",
        fetched / 1e9,
        fetched / copy / 1e6,
        100.0 * tiled_step_ms / (fetched / copy / 1e6)
    ));
    match &blas {
        Ok(blas) => {
            let dense_ms = timer.time(&gpu, "dense cuBLAS step (baseline)", &mut || {
                dense::dense_loss_and_grad(&gpu, blas, &cfg, &dp, &batch, &obj).map(|_| ())
            })?;
            // GEMM FLOPs: encoder forward and weight gradient; decode forward, decoder weight gradient
            // and activation gradient, each over every (source, target) block.
            let dec_cols: usize = (0..l_n).map(|s| (l_n - s) * d).sum();
            let flops =
                2.0 * (2 * b_n * d * f_n * l_n) as f64 + 3.0 * (2 * b_n * f_n * dec_cols) as f64;
            rec.report("dense cuBLAS step (baseline)", dense_ms, flops, 0.0);
            rec.say(format!(
                "dense / sparse step time: {:.2}x with the gathers, {:.2}x with the tiled kernels \
                 (issue 5 target: >= 5x)",
                dense_ms / sparse_ms,
                dense_ms / tiled_step_ms
            ));
        }
        Err(e) => rec.say(format!("dense cuBLAS step: skipped ({e})")),
    }
    drop((batch, x));

    // The resident training step (resident.rs): loss and gradient, the clipping norm, Adam on every
    // tensor and the kernels' copies refreshed, all on the device, on the same parameters (with fp32
    // masters of the same values) and a batch of the same values staged from pinned host memory.
    let gpu = std::sync::Arc::new(gpu);
    let master = resident::Masters {
        w_skip: Vec::new(),
        w_enc: (0..l_n)
            .map(|_| gpu.upload(&rand(f_n * d, 1.0 / (d as f64).sqrt())))
            .collect::<Result<_>>()?,
        log_theta: (0..l_n)
            .map(|_| gpu.upload(&vec![z.ln(); f_n]))
            .collect::<Result<_>>()?,
        w_dec: (0..l_n)
            .map(|s| gpu.upload(&rand(f_n * (l_n - s) * d, 0.02)))
            .collect::<Result<_>>()?,
    };
    let mut r =
        resident::Resident::from_device(gpu.clone(), &cfg, AdamHyper::default(), dp, master)?;
    let host = crate::data::Batch {
        n_tokens: b_n,
        x: rand(b_n * row, 1.0),
        y: rand(b_n * row, 1.0),
    };
    let (lr, clip) = (1e-4f32, 1.0f32);
    // Device time of a step whose batch is already on the device (CUDA events, median of 5 after 2).
    let mut times = Vec::new();
    for i in 0..7 {
        r.stage(&host)?;
        r.wait_staged()?;
        let ms = gpu.time_ms(|| r.step(&obj, None, lr, clip, i).map(|_| ()))?;
        if i >= 2 {
            times.push(ms as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    let resident_ms = times[times.len() / 2];
    rec.report("resident step (+ clip, Adam)", resident_ms, 0.0, 0.0);
    rec.say(format!(
        "  resident step / sparse loss + grad: {:.2}x (the difference is the clipping norm and Adam)",
        resident_ms / sparse_ms
    ));
    // Pipelined wall-clock: each step stages the next batch (host writes the pinned buffer, the copy
    // runs on the second stream) before stepping, as the trainer does.
    r.stage(&host)?;
    let steps = 5u64;
    let clock = std::time::Instant::now();
    for i in 0..steps {
        r.stage(&host)?;
        r.step(&obj, None, lr, clip, i)?;
    }
    gpu.sync()?;
    let wall_ms = clock.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let batch_bytes = (2 * b_n * row * 4) as f64;
    rec.say(format!(
        "resident step, pipelined (host staging + copy on a second stream), wall clock: {wall_ms:.3} ms \
         per step; the batch is {:.2} GB of f32 x and y, i.e. {:.1} GB/s of host-to-device copy if the \
         copy were the bound",
        batch_bytes / 1e9,
        batch_bytes / wall_ms / 1e6
    ));

    // The same batch as the store's int8 rows (the default codec): staged as codes, decoded and
    // normalised on the device by `dequant_rows` (the trainer's default for an int8 store), a quarter of
    // the bytes across the bus. First the kernel alone on x: it reads the codes and scales and writes
    // f32 and bf16 (the bytes below).
    let dims = crate::data::ActDims {
        n_layers: l_n,
        d_model: d,
    };
    let mut coded = crate::data::CodedBatch::default();
    coded.resize(Codec::Int8, dims, b_n);
    let sec = coded.section();
    let (mut cx, mut cy) = (Vec::new(), Vec::new());
    sec.encode(&host.x, &mut cx);
    sec.encode(&host.y, &mut cy);
    (coded.x, coded.y) = (cx, cy);
    let norms = crate::clt::NormScales {
        input: vec![1.5; l_n],
        target: vec![0.5; l_n],
    };
    {
        let codes = gpu.upload(&coded.x)?;
        let (out, bf) = (gpu.output::<f32>(b_n * row)?, gpu.output::<u16>(b_n * row)?);
        let scales = gpu.upload(&norms.input)?;
        let dst = dequant::DequantOut {
            out: &out,
            bf16: Some(&bf),
            layer_scale: Some(&scales),
        };
        let q = dequant::Quant::Int8;
        let ms = timer.time(&gpu, "dequant int8 x (+ bf16)", &mut || {
            dequant::dequant_into(&gpu, &codes, q, b_n * l_n, d, 0, &dst)
        })?;
        let bytes = (coded.x.len() + b_n * row * 6) as f64;
        rec.report("dequant int8 x (+ bf16)", ms, 0.0, bytes);
    }
    // The f32 loop left its next batch staged: step on it (untimed), then the same loop on codes.
    r.step(&obj, None, lr, clip, steps)?;
    r.stage_coded(&coded, &norms)?;
    let clock = std::time::Instant::now();
    for i in 0..steps {
        r.stage_coded(&coded, &norms)?;
        r.step(&obj, None, lr, clip, steps + 1 + i)?;
    }
    gpu.sync()?;
    let coded_ms = clock.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let coded_bytes = (coded.x.len() + coded.y.len()) as f64;
    rec.say(format!(
        "resident step, pipelined, batch staged as int8 codes and decoded on the device: {coded_ms:.3} ms \
         per step ({:.2} GB across the bus, {:.1} GB/s if the copy were the bound); f32 staging / int8 \
         staging: {:.2}x",
        coded_bytes / 1e9,
        coded_bytes / coded_ms / 1e6,
        wall_ms / coded_ms
    ));

    // The f32 loop again with the device's memory pool at the driver's default: its free memory handed
    // back at each synchronisation (release threshold 0), so that every step maps its temporaries again,
    // against the threshold `Gpu::open` sets (the pool keeps them).
    if gpu.pool_release_threshold()?.is_some() {
        r.step(&obj, None, lr, clip, 2 * steps + 1)?;
        gpu.set_pool_release_threshold(0)?;
        r.stage(&host)?;
        let clock = std::time::Instant::now();
        let run = (0..steps).try_for_each(|i| {
            r.stage(&host)?;
            r.step(&obj, None, lr, clip, 2 * steps + 2 + i).map(|_| ())
        });
        let synced = gpu.sync();
        let trimmed_ms = clock.elapsed().as_secs_f64() * 1e3 / steps as f64;
        gpu.set_pool_release_threshold(u64::MAX)?;
        run?;
        synced?;
        rec.say(format!(
            "resident step, pipelined, f32 staging, the memory pool trimmed at each synchronisation (the \
             driver's default): {trimmed_ms:.3} ms per step; trimmed / kept: {:.2}x",
            trimmed_ms / wall_ms
        ));
    }
    Ok(rec)
}

/// `z` with `P(N(0,1) > z) = p` (bisection on erfc).
fn inv_normal_tail(p: f64) -> f64 {
    let (mut lo, mut hi) = (-10.0f64, 10.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if 0.5 * erfc(mid / std::f64::consts::SQRT_2) > p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Complementary error function (Numerical Recipes' erfcc, |error| < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851499 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}
