//! Measures the activation store's figures for `docs/perf-store.md`: per codec, bytes per token against f32,
//! relative reconstruction error ‖x − x̂‖²/‖x‖² (overall and per layer), and decode throughput (f32-equivalent
//! GB/s, one thread and all threads), against a CLT-Forge-style baseline (one int8 scale per layer per file,
//! whole-file zstd); also byte planes on/off for the 16-bit codecs and the shuffling loader's throughput. For int8,
//! the predictive int8p (at 256 and 1024 tokens per block) and int8e (default ε) it compares sizes and errors of
//! inputs x, targets y and both with CLT-Forge's scheme, per layer too, and gives int8p's coefficient bytes.
//! Decoding uses `xy_rows` (inputs and targets of a block together, as the loader does). With
//! `CLT_FIGURES_QUICK=1` only int8, int8p (256) and int8e are measured, and the loader with no workers.
//! `--decode DATASET`, `--loader DATASET` and `--zstd DATASET` measure an existing dataset's reader alone, its
//! loader (0, 1 and all-core workers) and its zstd settings.
//!
//! Run: `cargo run --release --example store_figures -- [TOKENS] [LAYERS] [D_MODEL]` (default 8192 4 512).
//! Data: synthetic, see `synth` (per-token norm spread, 4 outlier dimensions per layer at 20–50×); or real
//! activations with `-- --real DATASET [TOKENS]`: the first TOKENS tokens of an f32 (or any) store dataset
//! written by `clt cache`, with each layer's 4 largest-RMS dimensions taken as its outliers. With
//! `CLT_FIGURES_EPS=ε1,ε2,...` it measures instead int8 and int8p at each error target (`target_rel_err`), and
//! without, against CLT-Forge's scheme, per layer too; `CLT_FIGURES_CODECS=int8e` (a comma list) picks the codecs
//! of that sweep (with int8e, the escape count of each run, and no estimate).

use std::time::Instant;

use clt::data::{ActDims, ActivationSource, Batch};
use clt::store::format::ShardMeta;
use clt::store::{
    BlockReader, Codec, Dataset, DatasetWriter, LoaderConfig, ShardLoader, WriterConfig,
};
use rayon::prelude::*;

struct Rng(u64);

impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        ((self.u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// Synthetic activations: per (token, layer) a norm factor exp(N(0, 0.5²)) (token norms vary), Gaussian values,
/// and per layer 4 outlier dimensions with scales 20, 30, 40, 50.
fn synth(t: usize, dims: ActDims, seed: u64) -> (Vec<f32>, Vec<Vec<usize>>) {
    let d = dims.d_model;
    let mut r = Rng(seed);
    let outliers: Vec<Vec<(usize, f32)>> = (0..dims.n_layers)
        .map(|_| {
            (0..4)
                .map(|k| ((r.u64() % d as u64) as usize, 20.0 + 10.0 * k as f32))
                .collect()
        })
        .collect();
    let mut v = vec![0f32; t * dims.n_layers * d];
    for (i, row) in v.chunks_exact_mut(d).enumerate() {
        let l = i % dims.n_layers;
        let g = (0.5 * r.normal()).exp();
        for x in row.iter_mut() {
            *x = g * r.normal();
        }
        for &(j, s) in &outliers[l] {
            row[j] *= s;
        }
    }
    (
        v,
        outliers
            .iter()
            .map(|o| o.iter().map(|p| p.0).collect())
            .collect(),
    )
}

/// ‖x − x̂‖²/‖x‖² over the non-outlier dimensions only (the bulk of the features).
fn rel_err_bulk(x: &[f32], xh: &[f32], dims: ActDims, out: &[Vec<usize>]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (a, b)) in x
        .chunks_exact(dims.d_model)
        .zip(xh.chunks_exact(dims.d_model))
        .enumerate()
    {
        let od = &out[i % dims.n_layers];
        for (j, (&p, &q)) in a.iter().zip(b).enumerate() {
            if !od.contains(&j) {
                num += ((p - q) as f64).powi(2);
                den += (p as f64).powi(2);
            }
        }
    }
    num / den
}

fn rel_err_per_layer(x: &[f32], xh: &[f32], dims: ActDims) -> (f64, Vec<f64>) {
    let l = dims.n_layers;
    let (mut num, mut den) = (vec![0f64; l], vec![0f64; l]);
    for (i, (a, b)) in x
        .chunks_exact(dims.d_model)
        .zip(xh.chunks_exact(dims.d_model))
        .enumerate()
    {
        for (&p, &q) in a.iter().zip(b) {
            num[i % l] += ((p - q) as f64).powi(2);
            den[i % l] += (p as f64).powi(2);
        }
    }
    let total = num.iter().sum::<f64>() / den.iter().sum::<f64>();
    (total, num.iter().zip(&den).map(|(n, d)| n / d).collect())
}

/// CLT-Forge's scheme: one absmax int8 scale per layer for the whole file, the whole file one zstd blob.
/// Returns bytes per token (zstd level 3 as zstd ships it), the decoded inputs and targets, the decode throughput,
/// and bytes per token with our writer's zstd parameters ([`clt::store::ZSTD_MIN_MATCH`]), for a like-for-like
/// comparison of the schemes.
fn forge_baseline(
    x: &[f32],
    y: &[f32],
    dims: ActDims,
    t: usize,
) -> (f64, Vec<f32>, Vec<f32>, f64, f64) {
    let enc = |v: &[f32]| -> (Vec<i8>, Vec<f32>) {
        let l = dims.n_layers;
        let mut amax = vec![0f32; l];
        for (i, row) in v.chunks_exact(dims.d_model).enumerate() {
            amax[i % l] = row.iter().fold(amax[i % l], |m, x| m.max(x.abs()));
        }
        let sc: Vec<f32> = amax.iter().map(|a| a / 127.0).collect();
        let q = v
            .chunks_exact(dims.d_model)
            .enumerate()
            .flat_map(|(i, row)| {
                let s = sc[i % l];
                row.iter()
                    .map(move |x| (x / s).round().clamp(-127.0, 127.0) as i8)
            })
            .collect();
        (q, sc)
    };
    let (qx, sx) = enc(x);
    let (qy, sy) = enc(y);
    let mut blob: Vec<u8> = qx.iter().chain(&qy).map(|&c| c as u8).collect();
    blob.extend(sx.iter().chain(&sy).flat_map(|s| s.to_le_bytes()));
    let t0 = Instant::now();
    let comp = zstd::bulk::compress(&blob, 3).unwrap();
    let _ = t0;
    let mut c7 = zstd::bulk::Compressor::new(3).unwrap();
    c7.set_parameter(zstd::zstd_safe::CParameter::MinMatch(
        clt::store::ZSTD_MIN_MATCH as u32,
    ))
    .unwrap();
    let bpt7 = c7.compress(&blob).unwrap().len() as f64 / t as f64;
    let dequant = |q: &[i8], sc: &[f32]| -> Vec<f32> {
        q.chunks_exact(dims.d_model)
            .enumerate()
            .flat_map(|(i, row)| {
                let s = sc[i % dims.n_layers];
                row.iter().map(move |&c| c as f32 * s)
            })
            .collect()
    };
    let (xh, yh) = (dequant(&qx, &sx), dequant(&qy, &sy));
    // Decode throughput of the baseline: whole-blob decompress + dequantise (1 thread).
    let t0 = Instant::now();
    let raw = zstd::bulk::decompress(&comp, blob.len()).unwrap();
    let mut out = vec![0f32; raw.len() - 8 * sx.len()];
    for (i, (o, &c)) in out.iter_mut().zip(&raw).enumerate() {
        *o = (c as i8) as f32 * sx[(i / dims.d_model) % dims.n_layers];
    }
    std::hint::black_box(&out);
    let gbs = (out.len() * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9;
    (comp.len() as f64 / t as f64, xh, yh, gbs, bpt7)
}

/// Order-0 entropy in bits of a histogram.
fn entropy_bits(hist: &[u64]) -> f64 {
    let n = hist.iter().sum::<u64>() as f64;
    hist.iter()
        .filter(|&&k| k > 0)
        .map(|&k| -(k as f64) * (k as f64 / n).log2())
        .sum()
}

/// Where the bytes of a quantised dataset (int8 layout: scales, then codes, for x and y) go, and what a better
/// entropy coder of the codes would reach: per stream, the codes' zstd rate (each block's codes compressed alone),
/// their order-0 entropy, the entropy given the layer and given (layer, dimension) (an adaptive per-dimension
/// coder, estimated on the whole sample, so slightly optimistic), all in bits per value; and the bytes per token
/// the dataset would have with the codes coded at the (layer, dimension) entropy.
fn code_stats(ds: &Dataset, name: &str) {
    let dims = ds.dims();
    let (l_n, d) = (dims.n_layers, dims.d_model);
    // Histograms [stream][layer][dim][256].
    let mut hist = vec![vec![0u64; l_n * d * 256]; 2];
    let mut zstd_bytes = [0usize; 2];
    let mut values = 0usize;
    let mut total = 0u64;
    // Rows coded as a prediction's residual (int8p: scale sign bit set), per stream and layer.
    let mut predicted = vec![vec![0usize; l_n]; 2];
    for s in ds.shards() {
        total += std::fs::metadata(s.path()).unwrap().len();
        for (b, e) in s.blocks().iter().enumerate() {
            let raw = zstd::bulk::decompress(s.compressed(b), e.raw_len as usize).unwrap();
            let layout = s.header().block_layout(e.n_tokens as usize);
            let rows = layout.section.rows;
            for (k, h) in hist.iter_mut().enumerate() {
                let sec = &raw[layout.ranges()[k].clone()];
                for (r, sc) in sec[..4 * rows].chunks_exact(4).enumerate() {
                    predicted[k][r % l_n] += (sc[3] >> 7) as usize;
                }
                let codes = &sec[4 * rows..];
                zstd_bytes[k] += zstd::bulk::compress(codes, 3).unwrap().len();
                for (i, &c) in codes.iter().enumerate() {
                    let (r, j) = (i / d, i % d);
                    h[((r % l_n) * d + j) * 256 + c as usize] += 1;
                }
            }
            values += rows * d;
        }
    }
    let t = ds.n_tokens() as f64;
    let mut saved = 0.0;
    for (k, h) in hist.iter().enumerate() {
        let mut all = vec![0u64; 256];
        let mut by_layer = 0.0;
        let mut by_dim = 0.0;
        for l in 0..l_n {
            let mut hl = vec![0u64; 256];
            for j in 0..d {
                let hd = &h[(l * d + j) * 256..][..256];
                by_dim += entropy_bits(hd);
                for (a, &b) in hl.iter_mut().zip(hd) {
                    *a += b;
                }
            }
            by_layer += entropy_bits(&hl);
            for (a, &b) in all.iter_mut().zip(&hl) {
                *a += b;
            }
        }
        let v = values as f64;
        let z = zstd_bytes[k] as f64 * 8.0 / v;
        println!(
            "{name} {} codes: zstd {z:.3} bits/value, entropy {:.3}, given layer {:.3}, given layer and dim {:.3}",
            ["x", "y"][k],
            entropy_bits(&all) / v,
            by_layer / v,
            by_dim / v
        );
        saved += zstd_bytes[k] as f64 - by_dim / 8.0;
        if predicted[k].iter().any(|&p| p > 0) {
            let pct: Vec<String> = predicted[k]
                .iter()
                .map(|&p| format!("{:.0}", 100.0 * p as f64 / t))
                .collect();
            println!(
                "{name} {} rows predicted, % per layer: {}",
                ["x", "y"][k],
                pct.join(" ")
            );
        }
    }
    println!(
        "{name}: {:.0} bytes/token; with the codes at their (layer, dim) entropy {:.0} bytes/token",
        total as f64 / t,
        (total as f64 - saved) / t
    );
}

fn decode_all(ds: &Dataset, row: usize, threads: usize) -> f64 {
    let jobs: Vec<(usize, usize)> = ds
        .shards()
        .iter()
        .enumerate()
        .flat_map(|(s, sh)| (0..sh.blocks().len()).map(move |b| (s, b)))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut best = 0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let bytes: usize = pool.install(|| {
            jobs.par_iter()
                .map_init(
                    || (BlockReader::new().unwrap(), Vec::<f32>::new(), Vec::new()),
                    |(r, bx, by), &(s, b)| {
                        let blk = r.read(&ds.shards()[s], b).unwrap();
                        bx.resize(blk.n_tokens() * row, 0.0);
                        by.resize(blk.n_tokens() * row, 0.0);
                        blk.xy_rows(0, bx, by);
                        std::hint::black_box((&bx, &by));
                        blk.n_tokens() * row * 8
                    },
                )
                .sum()
        });
        best = best.max(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// `--decode DATASET [SECONDS]`: decodes every block of an existing dataset again and again on one thread with
/// buffers allocated once, for about SECONDS (default 5), and prints the f32-equivalent GB/s (x + y); a loop to
/// profile (`perf record`) the reader alone.
fn decode_only(args: &[String]) {
    let ds = Dataset::open(args.first().expect("--decode DATASET")).expect("open the dataset");
    let secs: f64 = args.get(1).map_or(5.0, |s| s.parse().expect("seconds"));
    let dims = ds.dims();
    let row = dims.n_layers * dims.d_model;
    let mut r = BlockReader::new().unwrap();
    let (mut bx, mut by) = (Vec::<f32>::new(), Vec::<f32>::new());
    let t0 = Instant::now();
    let (mut bytes, mut passes) = (0usize, 0);
    while passes == 0 || t0.elapsed().as_secs_f64() < secs {
        let tp = Instant::now();
        let mut pb = 0;
        for s in ds.shards() {
            for b in 0..s.blocks().len() {
                let blk = r.read(s, b).unwrap();
                bx.resize(blk.n_tokens() * row, 0.0);
                by.resize(blk.n_tokens() * row, 0.0);
                blk.xy_rows(0, &mut bx, &mut by);
                std::hint::black_box((&bx, &by));
                pb += blk.n_tokens() * row * 8;
            }
        }
        if passes > 0 {
            println!(
                "pass {passes}: {:.2} GB/s",
                pb as f64 / tp.elapsed().as_secs_f64() / 1e9
            );
        }
        bytes += pb;
        passes += 1;
    }
    println!(
        "{passes} passes, {:.2} GB/s f32-equivalent (x+y), 1 thread",
        bytes as f64 / t0.elapsed().as_secs_f64() / 1e9
    );
}

/// `--zstd DATASET`: recompresses the dataset's decompressed blocks at zstd levels 1 and 3, with zstd's default
/// shortest match and with the writer's ([`clt::store::ZSTD_MIN_MATCH`]), and prints each one's size against the
/// dataset's and its decompression speed (raw GB/s, best of 5 passes, one thread; the four alternate per pass).
fn zstd_params(path: &str) {
    use zstd::zstd_safe::CParameter;
    let ds = Dataset::open(path).expect("open the dataset");
    let mut raws = Vec::new();
    let mut stored = 0;
    for s in ds.shards() {
        for b in 0..s.blocks().len() {
            let e = &s.blocks()[b];
            raws.push(zstd::bulk::decompress(s.compressed(b), e.raw_len as usize).unwrap());
            stored += s.compressed(b).len();
        }
    }
    let raw: usize = raws.iter().map(Vec::len).sum();
    println!(
        "{path}: {} blocks, {raw} bytes raw, {stored} stored",
        raws.len()
    );
    let mm = clt::store::ZSTD_MIN_MATCH;
    let configs = [(1, None), (1, Some(mm)), (3, None), (3, Some(mm))];
    let comps: Vec<Vec<Vec<u8>>> = configs
        .iter()
        .map(|&(level, min_match)| {
            let mut c = zstd::bulk::Compressor::new(level).unwrap();
            if let Some(m) = min_match {
                c.set_parameter(CParameter::MinMatch(m as u32)).unwrap();
            }
            raws.iter().map(|r| c.compress(r).unwrap()).collect()
        })
        .collect();
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let mut buf = vec![0u8; raws.iter().map(Vec::len).max().unwrap_or(0)];
    let mut best = [f64::MAX; 4];
    for _ in 0..5 {
        for (k, blocks) in comps.iter().enumerate() {
            let t = Instant::now();
            for c in blocks {
                d.decompress_to_buffer(c, &mut buf[..]).unwrap();
            }
            best[k] = best[k].min(t.elapsed().as_secs_f64());
        }
    }
    println!(
        "| level | min match | bytes vs stored | decompress GB/s (raw) |\n|---:|---|---:|---:|"
    );
    for (k, &(level, min_match)) in configs.iter().enumerate() {
        let size: usize = comps[k].iter().map(Vec::len).sum();
        println!(
            "| {level} | {} | {:.4} | {:.2} |",
            min_match.map_or("default".to_string(), |m| m.to_string()),
            size as f64 / stored as f64,
            raw as f64 / best[k] / 1e9
        );
    }
}

/// The first `t` tokens of a store dataset (inputs, targets), and per layer the 4 dimensions of largest RMS.
fn real(path: &str, t: usize) -> (ActDims, usize, Vec<f32>, Vec<f32>, Vec<Vec<usize>>) {
    let ds = Dataset::open(path).expect("open the dataset");
    let dims = ds.dims();
    let row = dims.n_layers * dims.d_model;
    let mut reader = BlockReader::new().unwrap();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    'outer: for shard in ds.shards() {
        for b in 0..shard.blocks().len() {
            let block = reader.read(shard, b).unwrap();
            let n = block.n_tokens();
            let (mut bx, mut by) = (vec![0.0; n * row], vec![0.0; n * row]);
            block.x_rows(0, &mut bx);
            block.y_rows(0, &mut by);
            x.extend_from_slice(&bx);
            y.extend_from_slice(&by);
            if x.len() >= t * row {
                break 'outer;
            }
        }
    }
    let t = (x.len() / row).min(t);
    x.truncate(t * row);
    y.truncate(t * row);
    let d = dims.d_model;
    let out = (0..dims.n_layers)
        .map(|l| {
            let mut ms: Vec<(f64, usize)> = (0..d)
                .map(|j| {
                    (
                        (0..t)
                            .map(|i| (x[(i * dims.n_layers + l) * d + j] as f64).powi(2))
                            .sum::<f64>(),
                        j,
                    )
                })
                .collect();
            ms.sort_by(|a, b| b.0.total_cmp(&a.0));
            ms.iter().take(4).map(|p| p.1).collect()
        })
        .collect();
    (dims, t, x, y, out)
}

/// Writes `x`, `y` as a dataset (256-token blocks, zstd 3, 2 shards) and returns bytes/token, the decoded inputs
/// and targets, and the decode throughput (1 thread).
fn write_read(
    dir: &std::path::Path,
    dims: ActDims,
    cfg: WriterConfig,
    x: &[f32],
    y: &[f32],
    t: usize,
) -> (f64, Vec<f32>, Vec<f32>, f64) {
    let row = dims.n_layers * dims.d_model;
    let mut w =
        DatasetWriter::create(dir, dims, cfg, ShardMeta::default(), (t / 2) as u64).unwrap();
    w.push(x, y, None).unwrap();
    let m = w.finish().unwrap();
    let bpt = m.shards.iter().map(|s| s.bytes).sum::<u64>() as f64 / t as f64;
    let ds = Dataset::open(dir).unwrap();
    let (mut xh, mut yh) = (Vec::with_capacity(x.len()), Vec::with_capacity(y.len()));
    let mut r = BlockReader::new().unwrap();
    for s in ds.shards() {
        for b in 0..s.blocks().len() {
            let blk = r.read(s, b).unwrap();
            let k = xh.len();
            xh.resize(k + blk.n_tokens() * row, 0.0);
            yh.resize(k + blk.n_tokens() * row, 0.0);
            blk.xy_rows(0, &mut xh[k..], &mut yh[k..]);
        }
    }
    let g = decode_all(&ds, row, 1);
    (bpt, xh, yh, g)
}

/// Escapes of an int8e dataset (count, and bytes of the blocks' tails before zstd).
fn escapes(dir: &std::path::Path) -> (usize, usize) {
    let ds = Dataset::open(dir).unwrap();
    let mut r = BlockReader::new().unwrap();
    let mut tail = 0;
    for s in ds.shards() {
        for b in 0..s.blocks().len() {
            tail += r.read(s, b).unwrap().layout.tail;
        }
    }
    (tail / 4, tail)
}

/// The smallest and largest per-layer ratio of CLT-Forge's error `f` to ours `o`, with their layers (the first
/// such layer on a tie): `"1.1× (3), 42.6× (29)"`.
fn ratio_span(f: &[f64], o: &[f64]) -> String {
    let r: Vec<f64> = f.iter().zip(o).map(|(a, b)| a / b).collect();
    let (mut lo, mut hi) = (0, 0);
    for (l, v) in r.iter().enumerate() {
        if *v < r[lo] {
            lo = l;
        }
        if *v > r[hi] {
            hi = l;
        }
    }
    format!("{:.1}× ({lo}), {:.1}× ({hi})", r[lo], r[hi])
}

/// `CLT_FIGURES_EPS=ε1,ε2,...`: int8 and int8p (or the codecs of `CLT_FIGURES_CODECS=a,b`; int8e only with a
/// target) with each error target ε (and without), against CLT-Forge's
/// scheme: bytes/token, size ratio, errors of x and y overall and their ratio to CLT-Forge's, the smallest and
/// largest per-layer ratio (and the layer), and decode GB/s; then the per-layer errors of every run.
fn eps_sweep(list: &str, dims: ActDims, t: usize, x: &[f32], y: &[f32]) {
    let codecs: Vec<Codec> = std::env::var("CLT_FIGURES_CODECS")
        .unwrap_or_else(|_| "int8,int8p".into())
        .split(',')
        .map(|c| {
            Codec::ALL
                .into_iter()
                .find(|k| k.name() == c)
                .expect("CLT_FIGURES_CODECS: codec names")
        })
        .collect();
    let eps: Vec<Option<f64>> = std::iter::once(None)
        .chain(list.split(',').map(|e| Some(e.parse().expect("ε list"))))
        .collect();
    let (fb, fxh, fyh, _, fb7) = forge_baseline(x, y, dims, t);
    let (fex, fey) = (
        rel_err_per_layer(x, &fxh, dims),
        rel_err_per_layer(y, &fyh, dims),
    );
    println!(
        "CLT-Forge: {fb:.0} B/token ({fb7:.0} with our zstd parameters: a ratio below is then {:.3}× higher), rel. err x {:.3e}, y {:.3e}; per layer x {:.2e}..{:.2e}, y {:.2e}..{:.2e}\n",
        fb / fb7,
        fex.0,
        fey.0,
        fex.1.iter().cloned().fold(f64::INFINITY, f64::min),
        fex.1.iter().cloned().fold(0.0, f64::max),
        fey.1.iter().cloned().fold(f64::INFINITY, f64::min),
        fey.1.iter().cloned().fold(0.0, f64::max),
    );
    // Rows whose range needs more than ±127 steps of Δ_l (so they keep int8's absmax step), per ε.
    let row = dims.n_layers * dims.d_model;
    for &e in eps.iter().flatten() {
        let frac = |v: &[f32]| -> (f64, f64, usize) {
            let mut per = vec![0usize; dims.n_layers];
            for blk in v.chunks(256 * row) {
                let st = clt::store::codec::target_steps(blk, dims.n_layers, dims.d_model, e);
                for (r, rv) in blk.chunks_exact(dims.d_model).enumerate() {
                    let amax = rv.iter().fold(0f32, |m, a| m.max(a.abs()));
                    per[r % dims.n_layers] += (amax / 127.0 > st[r % dims.n_layers]) as usize;
                }
            }
            let p: Vec<f64> = per.iter().map(|&k| k as f64 / t as f64).collect();
            let lo = p.iter().cloned().fold(1.0, f64::min);
            let below_half = p.iter().filter(|&&a| a < 0.5).count();
            (p.iter().sum::<f64>() / p.len() as f64, lo, below_half)
        };
        let (fx, fy) = (frac(x), frac(y));
        println!(
            "ε {e:.0e}: rows keeping the absmax step: x {:.1}% (least in a layer {:.1}%, layers under half {}), y {:.1}% ({:.1}%, {})",
            100.0 * fx.0,
            100.0 * fx.1,
            fx.2,
            100.0 * fy.0,
            100.0 * fy.1,
            fy.2
        );
    }
    println!();
    println!(
        "| codec | ε | B/token | vs CLT-Forge | err x | err y | ratio x | ratio y | per layer x: min ratio (layer), max | per layer y: min ratio (layer), max | max per-layer err / ε (x, y) | decode GB/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|");
    let tmp = tempfile::tempdir().unwrap();
    let mut per_layer = Vec::new();
    for &codec in &codecs {
        for &e in &eps {
            if codec == Codec::Int8e && e.is_none() {
                continue; // int8e always has a target
            }
            let dir = tmp.path().join(format!("{}-{e:?}", codec.name()));
            let cfg = WriterConfig {
                codec,
                byte_planes: false,
                block_tokens: 256,
                zstd_level: 3,
                threads: 0,
                outlier_dims: 4,
                target_rel_err: e,
            };
            let (bpt, xh, yh, g) = write_read(&dir, dims, cfg, x, y, t);
            let (ex, ey) = (
                rel_err_per_layer(x, &xh, dims),
                rel_err_per_layer(y, &yh, dims),
            );
            let over =
                |o: &[f64]| e.map_or(f64::NAN, |e| o.iter().cloned().fold(0.0, f64::max) / e);
            println!(
                "| {} | {} | {bpt:.0} | {:.3}× | {:.3e} | {:.3e} | {:.1}× | {:.1}× | {} | {} | {:.2}, {:.2} | {g:.2} |",
                codec.name(),
                e.map_or("-".into(), |e| format!("{e:.0e}")),
                bpt / fb,
                ex.0,
                ey.0,
                fex.0 / ex.0,
                fey.0 / ey.0,
                ratio_span(&fex.1, &ex.1),
                ratio_span(&fey.1, &ey.1),
                over(&ex.1),
                over(&ey.1),
            );
            if codec == Codec::Int8e {
                let (esc, tail) = escapes(&dir);
                println!(
                    "|  | (int8e: {esc} escapes = {:.3}% of the values; tail {:.0} B/token raw) | | | | | | | | | | |",
                    100.0 * esc as f64 / (2 * x.len()) as f64,
                    tail as f64 / t as f64,
                );
            }
            per_layer.push((format!("{} ε={e:?}", codec.name()), ex.1, ey.1));
        }
    }
    // The outlier-aware estimate (not with CLT_FIGURES_CODECS=int8e: int8e is that codec, built).
    if codecs.contains(&Codec::Int8p) {
        // The outlier-aware estimate: one ε for every layer, and per-layer targets a tenth of CLT-Forge's errors.
        println!(
            "\nEstimate, int8p with one step per (block, layer, stream) and escaped residuals (no range limit):\n"
        );
        println!(
            "| targets | B/token | vs CLT-Forge | err x | err y | ratio x | ratio y | per layer x: min ratio (layer), max | per layer y: min ratio (layer), max |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
        let l_n = dims.n_layers;
        let mut targets: Vec<(String, Vec<f64>, Vec<f64>)> = eps
            .iter()
            .flatten()
            .map(|&e| (format!("ε = {e:.0e}"), vec![e; l_n], vec![e; l_n]))
            .collect();
        // One step for all layers of a stream (error counted over the whole stream, not per layer): ε_l = ε · Ē / E_l.
        let energy = |v: &[f32]| -> Vec<f64> {
            let mut e = vec![0f64; l_n];
            for (i, r) in v.chunks_exact(dims.d_model).enumerate() {
                e[i % l_n] += r.iter().map(|&a| a as f64 * a as f64).sum::<f64>();
            }
            e
        };
        let (enx, eny) = (energy(x), energy(y));
        let global = |e: f64, en: &[f64]| -> Vec<f64> {
            let mean = en.iter().sum::<f64>() / l_n as f64;
            en.iter().map(|&a| e * mean / a).collect()
        };
        for &e in eps.iter().flatten() {
            targets.push((
                format!("one step per stream, ε = {e:.0e} overall"),
                global(e, &enx),
                global(e, &eny),
            ));
        }
        for k in [10.0, 12.0] {
            targets.push((
                format!("ε_l = CLT-Forge's error of the layer / {k}"),
                fex.1.iter().map(|e| e / k).collect(),
                fey.1.iter().map(|e| e / k).collect(),
            ));
        }
        for (name, tx, ty) in &targets {
            let (bpt, xh, yh) = escape_estimate(x, y, dims, tx, ty);
            let (ex, ey) = (
                rel_err_per_layer(x, &xh, dims),
                rel_err_per_layer(y, &yh, dims),
            );
            println!(
                "| {name} | {bpt:.0} | {:.3}× | {:.3e} | {:.3e} | {:.1}× | {:.1}× | {} | {} |",
                bpt / fb,
                ex.0,
                ey.0,
                fex.0 / ex.0,
                fey.0 / ey.0,
                ratio_span(&fex.1, &ex.1),
                ratio_span(&fey.1, &ey.1),
            );
        }
    }
    println!("\nper layer, x then y: CLT-Forge, then each run");
    for l in 0..dims.n_layers {
        print!("{l} x {:.2e}", fex.1[l]);
        for (_, ex, _) in &per_layer {
            print!(" {:.2e}", ex[l]);
        }
        print!(" | y {:.2e}", fey.1[l]);
        for (_, _, ey) in &per_layer {
            print!(" {:.2e}", ey[l]);
        }
        println!();
    }
    for (i, (name, ..)) in per_layer.iter().enumerate() {
        println!("run {i}: {name}");
    }
}

/// Codes residuals `q − p` as int8 bytes with an escape: a residual outside ±127 is stored as byte −128 and its
/// value as an i32 in `esc`.
fn push_escaped(r: i64, codes: &mut Vec<u8>, esc: &mut Vec<u8>) {
    if (-127..=127).contains(&r) {
        codes.push(r as i8 as u8);
    } else {
        codes.push(0x80);
        esc.extend_from_slice(&(r as i32).to_le_bytes());
    }
}

/// An estimate (not a codec of the store) of an outlier-aware int8p: one step per (block, layer, stream), `Δ_l =
/// √(12 ε_l E_l)`, for every value, with no range limit (residual codes outside ±127 escaped to an i32), the same
/// closed-loop inter-layer prediction as int8p (bf16 least-squares coefficients per (layer, dim) per block; no
/// per-row choice between predicted and plain), per-block zstd level 3 of codes, escapes and coefficients, plus
/// the block's steps as f32. `eps_x[l]`, `eps_y[l]`: per-layer targets. Returns bytes/token and the decoded x, y.
fn escape_estimate(
    x: &[f32],
    y: &[f32],
    dims: ActDims,
    eps_x: &[f64],
    eps_y: &[f64],
) -> (f64, Vec<f32>, Vec<f32>) {
    let (l_n, d) = (dims.n_layers, dims.d_model);
    let row = l_n * d;
    let t = x.len() / row;
    let bt = 256;
    let bf = |a: f64| {
        half::bf16::from_f64(if a.is_finite() {
            a.clamp(-6e4, 6e4)
        } else {
            0.0
        })
        .to_f32()
    };
    let steps = |v: &[f32], eps: &[f64]| -> Vec<f32> {
        (0..l_n)
            .map(|l| {
                let (mut s, mut k) = (0f64, 0usize);
                for r in v.chunks_exact(d).skip(l).step_by(l_n) {
                    s += r.iter().map(|&a| a as f64 * a as f64).sum::<f64>();
                    k += d;
                }
                (12.0 * eps[l] * s / k as f64).sqrt() as f32
            })
            .collect()
    };
    let (mut xh, mut yh) = (vec![0f32; x.len()], vec![0f32; y.len()]);
    let blocks: Vec<usize> = (0..t).step_by(bt).collect();
    let sizes: Vec<usize> = blocks
        .par_iter()
        .map(|&s| {
            let e = (s + bt).min(t);
            let n = e - s;
            let (bx, by) = (&x[s * row..e * row], &y[s * row..e * row]);
            let mut xd = vec![0f32; n * row];
            let mut yd = vec![0f32; n * row];
            let (sx, sy) = (steps(bx, eps_x), steps(by, eps_y));
            let (mut codes, mut esc, mut coef) = (Vec::new(), Vec::new(), Vec::new());
            let at = |tk: usize, l: usize| (tk * l_n + l) * d;
            let q = |v: f32, st: f32| -> i64 { if st > 0.0 { (v / st).round() as i64 } else { 0 } };
            for l in 0..l_n {
                let a: Vec<f32> = (0..d)
                    .map(|j| {
                        if l == 0 {
                            return 0.0;
                        }
                        let (mut rr, mut ry) = (0f64, 0f64);
                        for tk in 0..n {
                            let p = xd[at(tk, l - 1) + j] as f64;
                            rr += p * p;
                            ry += p * bx[at(tk, l) + j] as f64;
                        }
                        bf(if rr > 0.0 { ry / rr } else { 0.0 })
                    })
                    .collect();
                if l > 0 {
                    coef.extend(
                        a.iter()
                            .flat_map(|c| half::bf16::from_f32(*c).to_bits().to_le_bytes()),
                    );
                }
                for tk in 0..n {
                    for j in 0..d {
                        let o = at(tk, l) + j;
                        let p = if l > 0 {
                            a[j] * xd[at(tk, l - 1) + j]
                        } else {
                            0.0
                        };
                        let qv = q(bx[o], sx[l]);
                        push_escaped(qv - q(p, sx[l]), &mut codes, &mut esc);
                        xd[o] = qv as f32 * sx[l];
                    }
                }
            }
            for l in 0..l_n {
                let two = l + 1 < l_n;
                let bc: Vec<(f32, f32)> = (0..d)
                    .map(|j| {
                        let mut m = [0f64; 5];
                        for tk in 0..n {
                            let ra = if two {
                                xd[at(tk, l + 1) + j] as f64
                            } else {
                                0.0
                            };
                            let rb = xd[at(tk, l) + j] as f64;
                            let v = by[at(tk, l) + j] as f64;
                            m[0] += ra * ra;
                            m[1] += ra * rb;
                            m[2] += rb * rb;
                            m[3] += ra * v;
                            m[4] += rb * v;
                        }
                        let det = m[0] * m[2] - m[1] * m[1];
                        if two && m[0] > 0.0 && m[2] > 0.0 && det > 1e-9 * m[0] * m[2] {
                            (
                                bf((m[3] * m[2] - m[4] * m[1]) / det),
                                bf((m[4] * m[0] - m[3] * m[1]) / det),
                            )
                        } else {
                            (0.0, bf(if m[2] > 0.0 { m[4] / m[2] } else { 0.0 }))
                        }
                    })
                    .collect();
                coef.extend(bc.iter().flat_map(|c| {
                    let mut b = half::bf16::from_f32(c.0).to_bits().to_le_bytes().to_vec();
                    b.extend(half::bf16::from_f32(c.1).to_bits().to_le_bytes());
                    b
                }));
                for tk in 0..n {
                    for j in 0..d {
                        let o = at(tk, l) + j;
                        let ra = if two { xd[at(tk, l + 1) + j] } else { 0.0 };
                        let p = bc[j].0 * ra + bc[j].1 * xd[o];
                        let qv = q(by[o], sy[l]);
                        push_escaped(qv - q(p, sy[l]), &mut codes, &mut esc);
                        yd[o] = qv as f32 * sy[l];
                    }
                }
            }
            let mut raw = codes;
            raw.extend(esc);
            raw.extend(coef);
            raw.extend(sx.iter().chain(&sy).flat_map(|v| v.to_le_bytes()));
            let c = zstd::bulk::compress(&raw, 3).unwrap().len();
            (c, xd, yd)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .zip(&blocks)
        .map(|((c, xd, yd), &s)| {
            xh[s * row..s * row + xd.len()].copy_from_slice(&xd);
            yh[s * row..s * row + yd.len()].copy_from_slice(&yd);
            c
        })
        .collect();
    (sizes.iter().sum::<usize>() as f64 / t as f64, xh, yh)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = rayon::current_num_threads();
    if args.first().map(String::as_str) == Some("--decode") {
        decode_only(&args[1..]);
        return;
    }
    if args.first().map(String::as_str) == Some("--loader") {
        loader_only(&args[1..]);
        return;
    }
    if args.first().map(String::as_str) == Some("--zstd") {
        zstd_params(args.get(1).expect("--zstd DATASET"));
        return;
    }
    let (dims, t, x, y, xout) = if args.first().map(String::as_str) == Some("--real") {
        let t = args
            .get(2)
            .map(|s| s.parse().expect("a token count"))
            .unwrap_or(8192);
        real(args.get(1).expect("--real DATASET"), t)
    } else {
        let a: Vec<usize> = args.iter().map(|s| s.parse().expect("numbers")).collect();
        let t = a.first().copied().unwrap_or(8192);
        let dims = ActDims {
            n_layers: a.get(1).copied().unwrap_or(4),
            d_model: a.get(2).copied().unwrap_or(512),
        };
        let (x, xout) = synth(t, dims, 1);
        let (y, _) = synth(t, dims, 2);
        (dims, t, x, y, xout)
    };
    if let Ok(list) = std::env::var("CLT_FIGURES_EPS") {
        eps_sweep(&list, dims, t, &x, &y);
        return;
    }
    let row = dims.n_layers * dims.d_model;
    let f32_bpt = (row * 8) as f64;
    println!(
        "tokens {t}, L {}, d {}, f32 bytes/token (x+y) {f32_bpt}, threads {threads}\n",
        dims.n_layers, dims.d_model
    );
    println!(
        "| codec | planes | block | bytes/token | vs f32 | rel. err x | rel. err y | rel. err x, non-outlier dims | decode GB/s 1 thr | decode GB/s {threads} thr | write s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // Errors of x and y together (the sum of both squared errors over the sum of both energies).
    let both = |xh: &[f32], yh: &[f32]| {
        let n = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum()
        };
        let e = |a: &[f32]| -> f64 { a.iter().map(|p| (*p as f64).powi(2)).sum() };
        (n(&x, xh) + n(&y, yh)) / (e(&x) + e(&y))
    };
    let tmp = tempfile::tempdir().unwrap();
    // Per codec of interest: bytes/token, (total, per-layer) errors of x and y.
    type Errs = (f64, Vec<f64>);
    let mut kept: Vec<(String, f64, Errs, Errs, f64)> = Vec::new();
    let mut int8_dir = None;
    let mut int8p_dir = None;
    let mut int8e_dir = None;
    // `CLT_FIGURES_QUICK=1`: only int8, int8p and int8e, and the loader with no workers (a quicker run).
    let quick = std::env::var_os("CLT_FIGURES_QUICK").is_some();
    let all = [
        (Codec::F32, false, 256),
        (Codec::Bf16, false, 256),
        (Codec::Bf16, true, 256),
        (Codec::F16, false, 256),
        (Codec::F16, true, 256),
        (Codec::Int8, false, 256),
        (Codec::Int8p, false, 256),
        (Codec::Int8p, false, 1024),
        (Codec::Int8o, false, 256),
        (Codec::Int4, false, 256),
        (Codec::Int8e, false, 256),
    ];
    for (codec, planes, block) in all.into_iter().filter(|&(c, _, b)| {
        !quick || c == Codec::Int8 || c == Codec::Int8e || (c == Codec::Int8p && b == 256)
    }) {
        let dir = tmp
            .path()
            .join(format!("{}-{planes}-{block}", codec.name()));
        let cfg = WriterConfig {
            codec,
            byte_planes: planes,
            block_tokens: block,
            zstd_level: 3,
            threads: 0,
            outlier_dims: 4,
            target_rel_err: None,
        };
        let t0 = Instant::now();
        let mut w =
            DatasetWriter::create(&dir, dims, cfg, ShardMeta::default(), (t / 2) as u64).unwrap();
        w.push(&x, &y, None).unwrap();
        let m = w.finish().unwrap();
        let wsec = t0.elapsed().as_secs_f64();
        let bpt = m.shards.iter().map(|s| s.bytes).sum::<u64>() as f64 / t as f64;
        let ds = Dataset::open(&dir).unwrap();
        let (mut xh, mut yh) = (Vec::with_capacity(x.len()), Vec::with_capacity(y.len()));
        let mut r = BlockReader::new().unwrap();
        let (mut coef_raw, mut coef_zstd) = (0usize, 0usize);
        for s in ds.shards() {
            for b in 0..s.blocks().len() {
                let blk = r.read(s, b).unwrap();
                let k = xh.len();
                xh.resize(k + blk.n_tokens() * row, 0.0);
                yh.resize(k + blk.n_tokens() * row, 0.0);
                blk.xy_rows(0, &mut xh[k..], &mut yh[k..]);
                let c = blk.coef_bytes();
                coef_raw += c.len();
                if !c.is_empty() {
                    coef_zstd += zstd::bulk::compress(c, 3).unwrap().len();
                }
            }
        }
        let (ex, ey) = (
            rel_err_per_layer(&x, &xh, dims),
            rel_err_per_layer(&y, &yh, dims),
        );
        let g1 = decode_all(&ds, row, 1);
        let gn = decode_all(&ds, row, threads);
        println!(
            "| {} | {} | {block} | {:.0} | {:.2}× | {:.2e} | {:.2e} | {:.2e} | {:.2} | {:.2} | {:.2} |",
            codec.name(),
            if codec.is_16bit() {
                planes.to_string()
            } else {
                "-".into()
            },
            bpt,
            f32_bpt / bpt,
            ex.0,
            ey.0,
            rel_err_bulk(&x, &xh, dims, &xout),
            g1,
            gn,
            wsec
        );
        if coef_raw > 0 {
            println!(
                "|  | (int8p coefficients: {:.0} B/token raw, {:.0} zstd'd alone = {:.1}% of the shard bytes) | | | | | | | | | |",
                coef_raw as f64 / t as f64,
                coef_zstd as f64 / t as f64,
                100.0 * coef_zstd as f64 / (bpt * t as f64)
            );
        }
        if matches!(codec, Codec::Int8 | Codec::Int8p | Codec::Int8e) {
            let eb = both(&xh, &yh);
            kept.push((format!("{} (block {block})", codec.name()), bpt, ex, ey, eb));
        }
        if codec == Codec::Int8 {
            int8_dir = Some(dir);
        } else if codec == Codec::Int8p && block == 256 {
            int8p_dir = Some(dir);
        } else if codec == Codec::Int8e {
            int8e_dir = Some(dir);
        }
    }
    let (fb, fxh, fyh, fg, _) = forge_baseline(&x, &y, dims, t);
    let (fex, fey) = (
        rel_err_per_layer(&x, &fxh, dims),
        rel_err_per_layer(&y, &fyh, dims),
    );
    println!(
        "| CLT-Forge int8 (scale per layer per file, whole-file zstd) | - | file | {fb:.0} | {:.2}× | {:.2e} | {:.2e} | {:.2e} | {fg:.2} | n/a (one blob) | - |",
        f32_bpt / fb,
        fex.0,
        fey.0,
        rel_err_bulk(&x, &fxh, dims, &xout)
    );
    let fboth = both(&fxh, &fyh);
    println!();
    for (name, bpt, ex, ey, eb) in &kept {
        println!(
            "{name} vs CLT-Forge: size ratio {:.3}, error ratio (forge / ours) x {:.1}×, y {:.1}×, x+y {:.1}×",
            bpt / fb,
            fex.0 / ex.0,
            fey.0 / ey.0,
            fboth / eb
        );
    }
    println!("CLT-Forge x+y rel. err {fboth:.3e}");
    print!("\n| layer | rel. err x CLT-Forge |");
    for (name, ..) in &kept {
        print!(" x {name} | ratio |");
    }
    print!(" rel. err y CLT-Forge |");
    for (name, ..) in &kept {
        print!(" y {name} | ratio |");
    }
    println!();
    println!("|---:|{}", "---:|".repeat(2 + 4 * kept.len()));
    for l in 0..dims.n_layers {
        print!("| {l} | {:.2e} |", fex.1[l]);
        for (_, _, ex, _, _) in &kept {
            print!(" {:.2e} | {:.1}× |", ex.1[l], fex.1[l] / ex.1[l]);
        }
        print!(" {:.2e} |", fey.1[l]);
        for (_, _, _, ey, _) in &kept {
            print!(" {:.2e} | {:.1}× |", ey.1[l], fey.1[l] / ey.1[l]);
        }
        println!();
    }
    println!();
    code_stats(&Dataset::open(int8_dir.as_ref().unwrap()).unwrap(), "int8");
    code_stats(
        &Dataset::open(int8p_dir.as_ref().unwrap()).unwrap(),
        "int8p",
    );
    println!("CLT-Forge: {fb:.0} bytes/token");
    let int8_err = kept[0].2.clone();

    // Outlier-aware variant (estimate, not a codec of format v1): the 4 largest-|mean square| dims of each layer kept
    // in bf16, the other dims int8 with a per-row scale over them only.
    let l = dims.n_layers;
    let mut ms = vec![vec![0f64; dims.d_model]; l];
    for (i, r) in x.chunks_exact(dims.d_model).enumerate() {
        for (j, v) in r.iter().enumerate() {
            ms[i % l][j] += (*v as f64).powi(2);
        }
    }
    let out_dims: Vec<Vec<usize>> = ms
        .iter()
        .map(|m| {
            let mut idx: Vec<usize> = (0..m.len()).collect();
            idx.sort_by(|a, b| m[*b].total_cmp(&m[*a]));
            idx[..4].to_vec()
        })
        .collect();
    let mut oxh = x.clone();
    for (i, r) in oxh.chunks_exact_mut(dims.d_model).enumerate() {
        let od = &out_dims[i % l];
        let amax = r
            .iter()
            .enumerate()
            .filter(|(j, _)| !od.contains(j))
            .fold(0f32, |m, (_, v)| m.max(v.abs()));
        let s = amax / 127.0;
        for (j, v) in r.iter_mut().enumerate() {
            *v = if od.contains(&j) {
                half::bf16::from_f32(*v).to_f32()
            } else if s > 0.0 {
                (*v / s).round().clamp(-127.0, 127.0) * s
            } else {
                0.0
            };
        }
    }
    let oerr = rel_err_per_layer(&x, &oxh, dims);
    println!(
        "\noutlier-aware int8 estimate (4 dims/layer in bf16, scale over the rest): rel. err {:.2e}, non-outlier dims {:.2e} ({:.1}× below per-row int8 overall), +{} raw bytes/token before zstd",
        oerr.0,
        rel_err_bulk(&x, &oxh, dims, &xout),
        int8_err.0 / oerr.0,
        2 * l * 4 // x and y, 4 dims per layer, 2 bytes instead of 1
    );

    // Loader throughput: shuffled batches of 4096 tokens, workers = threads.
    for (name, dir, workers) in [
        ("int8", int8_dir.as_ref().unwrap(), 0),
        ("int8", int8_dir.as_ref().unwrap(), 1),
        ("int8", int8_dir.as_ref().unwrap(), threads),
        ("int8p", int8p_dir.as_ref().unwrap(), 0),
        ("int8p", int8p_dir.as_ref().unwrap(), 1),
        ("int8p", int8p_dir.as_ref().unwrap(), threads),
        ("int8e", int8e_dir.as_ref().unwrap(), 0),
        ("int8e", int8e_dir.as_ref().unwrap(), 1),
        ("int8e", int8e_dir.as_ref().unwrap(), threads),
    ]
    .into_iter()
    .filter(|l| !quick || l.2 == 0)
    {
        let g = loader_gbs(dir, workers, 3 * t, row);
        println!("loader {name}, workers {workers}: {g:.2} GB/s f32-equivalent (x+y)");
    }
}

/// The shuffling loader's throughput on the dataset at `dir`: f32-equivalent GB/s (x + y) of at least `tokens`
/// tokens served in batches of 4096 (windows of 8 blocks), after a first batch.
fn loader_gbs(dir: &std::path::Path, workers: usize, tokens: usize, row: usize) -> f64 {
    let cfg = LoaderConfig {
        seed: 1,
        window_blocks: 8,
        workers,
        prefetch: 2,
        rank: 0,
        world: 1,
    };
    let mut ld = ShardLoader::open(dir, cfg).unwrap();
    let mut b = Batch::default();
    ld.next_batch(4096, &mut b).unwrap();
    let t0 = Instant::now();
    let mut done = 0;
    while done < tokens {
        ld.next_batch(4096, &mut b).unwrap();
        done += 4096;
    }
    (done * row * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// `--loader DATASET [TOKENS]`: the loader's throughput on an existing dataset with 0, 1 and all-core workers.
fn loader_only(args: &[String]) {
    let dir = std::path::Path::new(args.first().expect("--loader DATASET"));
    let ds = Dataset::open(dir).expect("open the dataset");
    let row = ds.dims().n_layers * ds.dims().d_model;
    let tokens = args
        .get(1)
        .map_or(3 * ds.n_tokens() as usize, |s| s.parse().expect("tokens"));
    for workers in [0, 1, rayon::current_num_threads()] {
        let g = loader_gbs(dir, workers, tokens, row);
        println!("loader, workers {workers}: {g:.2} GB/s f32-equivalent (x+y)");
    }
}
