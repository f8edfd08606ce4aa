//! Measures the activation store's figures for `docs/perf-store.md`: per codec, bytes per token against f32,
//! relative reconstruction error ‖x − x̂‖²/‖x‖² (overall and per layer), and decode throughput (f32-equivalent
//! GB/s, one thread and all threads), against a CLT-Forge-style baseline (one int8 scale per layer per file,
//! whole-file zstd); also byte planes on/off for the 16-bit codecs and the shuffling loader's throughput.
//!
//! Run: `cargo run --release --example store_figures -- [TOKENS] [LAYERS] [D_MODEL]` (default 8192 4 512).
//! Data: synthetic, see `synth` (per-token norm spread, 4 outlier dimensions per layer at 20–50×); or real
//! activations with `-- --real DATASET [TOKENS]`: the first TOKENS tokens of an f32 (or any) store dataset
//! written by `clt cache`, with each layer's 4 largest-RMS dimensions taken as its outliers.

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
fn forge_baseline(x: &[f32], y: &[f32], dims: ActDims, t: usize) -> (f64, Vec<f32>, f64) {
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
    let (qy, _) = enc(y);
    let mut blob: Vec<u8> = qx.iter().chain(&qy).map(|&c| c as u8).collect();
    blob.extend(sx.iter().flat_map(|s| s.to_le_bytes()));
    let t0 = Instant::now();
    let comp = zstd::bulk::compress(&blob, 3).unwrap();
    let _ = t0;
    let xh: Vec<f32> = qx
        .chunks_exact(dims.d_model)
        .enumerate()
        .flat_map(|(i, row)| {
            let s = sx[i % dims.n_layers];
            row.iter().map(move |&c| c as f32 * s)
        })
        .collect();
    // Decode throughput of the baseline: whole-blob decompress + dequantise (1 thread).
    let t0 = Instant::now();
    let raw = zstd::bulk::decompress(&comp, blob.len()).unwrap();
    let mut out = vec![0f32; raw.len() - 4 * sx.len()];
    for (i, (o, &c)) in out.iter_mut().zip(&raw).enumerate() {
        *o = (c as i8) as f32 * sx[(i / dims.d_model) % dims.n_layers];
    }
    std::hint::black_box(&out);
    let gbs = (out.len() * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9;
    (comp.len() as f64 / t as f64, xh, gbs)
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
                    || (BlockReader::new().unwrap(), Vec::<f32>::new()),
                    |(r, buf), &(s, b)| {
                        let blk = r.read(&ds.shards()[s], b).unwrap();
                        buf.resize(blk.n_tokens() * row, 0.0);
                        blk.x_rows(0, buf);
                        blk.y_rows(0, buf);
                        std::hint::black_box(&buf);
                        blk.n_tokens() * row * 8
                    },
                )
                .sum()
        });
        best = best.max(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = rayon::current_num_threads();
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
    let row = dims.n_layers * dims.d_model;
    let f32_bpt = (row * 8) as f64;
    println!(
        "tokens {t}, L {}, d {}, f32 bytes/token (x+y) {f32_bpt}, threads {threads}\n",
        dims.n_layers, dims.d_model
    );
    println!(
        "| codec | planes | bytes/token | vs f32 | rel. err x | rel. err x, non-outlier dims | decode GB/s 1 thr | decode GB/s {threads} thr | write s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let tmp = tempfile::tempdir().unwrap();
    let mut int8_bpt = 0.0;
    let mut int8_err = (0.0, vec![]);
    let mut int8_dir = None;
    for (codec, planes) in [
        (Codec::F32, false),
        (Codec::Bf16, false),
        (Codec::Bf16, true),
        (Codec::F16, false),
        (Codec::F16, true),
        (Codec::Int8, false),
        (Codec::Int8o, false),
        (Codec::Int4, false),
    ] {
        let dir = tmp.path().join(format!("{}-{planes}", codec.name()));
        let cfg = WriterConfig {
            codec,
            byte_planes: planes,
            block_tokens: 256,
            zstd_level: 3,
            threads: 0,
            outlier_dims: 4,
        };
        let t0 = Instant::now();
        let mut w =
            DatasetWriter::create(&dir, dims, cfg, ShardMeta::default(), (t / 2) as u64).unwrap();
        w.push(&x, &y, None).unwrap();
        let m = w.finish().unwrap();
        let wsec = t0.elapsed().as_secs_f64();
        let bpt = m.shards.iter().map(|s| s.bytes).sum::<u64>() as f64 / t as f64;
        let ds = Dataset::open(&dir).unwrap();
        let mut xh = Vec::with_capacity(x.len());
        let mut r = BlockReader::new().unwrap();
        for s in ds.shards() {
            for b in 0..s.blocks().len() {
                let blk = r.read(s, b).unwrap();
                let k = xh.len();
                xh.resize(k + blk.n_tokens() * row, 0.0);
                blk.x_rows(0, &mut xh[k..]);
            }
        }
        let err = rel_err_per_layer(&x, &xh, dims);
        let g1 = decode_all(&ds, row, 1);
        let gn = decode_all(&ds, row, threads);
        println!(
            "| {} | {} | {:.0} | {:.2}× | {:.2e} | {:.2e} | {:.2} | {:.2} | {:.2} |",
            codec.name(),
            if codec.is_16bit() {
                planes.to_string()
            } else {
                "-".into()
            },
            bpt,
            f32_bpt / bpt,
            err.0,
            rel_err_bulk(&x, &xh, dims, &xout),
            g1,
            gn,
            wsec
        );
        if codec == Codec::Int8 {
            int8_bpt = bpt;
            int8_err = err;
            int8_dir = Some(dir);
        }
    }
    let (fb, fxh, fg) = forge_baseline(&x, &y, dims, t);
    let ferr = rel_err_per_layer(&x, &fxh, dims);
    println!(
        "| CLT-Forge int8 (scale per layer per file, whole-file zstd) | - | {fb:.0} | {:.2}× | {:.2e} | {:.2e} | {fg:.2} | n/a (one blob) | - |",
        f32_bpt / fb,
        ferr.0,
        rel_err_bulk(&x, &fxh, dims, &xout)
    );
    println!(
        "\nint8 per-row vs CLT-Forge: size ratio {:.3}, error ratio (forge / ours) {:.1}×",
        int8_bpt / fb,
        ferr.0 / int8_err.0
    );
    println!("\n| layer | rel. err int8 per-row | rel. err CLT-Forge int8 | ratio |");
    println!("|---:|---:|---:|---:|");
    for l in 0..dims.n_layers {
        println!(
            "| {l} | {:.2e} | {:.2e} | {:.1}× |",
            int8_err.1[l],
            ferr.1[l],
            ferr.1[l] / int8_err.1[l]
        );
    }

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
    let dir = int8_dir.unwrap();
    for workers in [0, 1, threads] {
        let cfg = LoaderConfig {
            seed: 1,
            window_blocks: 8,
            workers,
            prefetch: 2,
            rank: 0,
            world: 1,
        };
        let mut ld = ShardLoader::open(&dir, cfg).unwrap();
        let mut b = Batch::default();
        ld.next_batch(4096, &mut b).unwrap();
        let n = 3 * t;
        let t0 = Instant::now();
        let mut done = 0;
        while done < n {
            ld.next_batch(4096, &mut b).unwrap();
            done += 4096;
        }
        println!(
            "loader int8, workers {workers}: {:.2} GB/s f32-equivalent (x+y)",
            (done * row * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9
        );
    }
}
