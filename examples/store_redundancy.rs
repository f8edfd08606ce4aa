//! How much redundancy per-row int8 leaves in real activations, and how much a predictive coder could remove:
//! the measurement behind `docs/perf-store.md`'s "what a better coder would gain" (issue 3's size target).
//!
//! For the MLP inputs x and outputs y of every layer (layout `[token][layer][d]`), with the store's int8 codes
//! (one absmax/127 step per (token, layer) row), it prints the bits per value of:
//! - the codes' order-0 entropy, the entropy given the layer, and given (layer, dimension) (an adaptive coder
//!   with per-dimension statistics; estimated from the sample, so slightly optimistic), and zstd's actual rate;
//! - the residuals of predicting x_l from the decoded x_{l−1}, and y_l from the decoded x_{l+1} and x_l (a
//!   least-squares coefficient per dimension and layer), coded at the same step, so with the same error: their
//!   entropy, zstd's rate, and the residual-to-signal energy ratio per layer;
//! - the residual of predicting each token from the previous one (same layer), for comparison.
//!
//! Run: `cargo run --release --example store_redundancy -- DATASET [TOKENS]` on an f32 store written by
//! `clt cache --codec f32` (the figures in `docs/perf-store.md` use SmolLM2-135M on WikiText-2).

use clt::store::{BlockReader, Dataset};
use std::collections::HashMap;

/// Order-0 entropy of `codes`, bits per value.
fn entropy(codes: &[i16]) -> f64 {
    let mut hist = HashMap::<i16, u64>::new();
    for &c in codes {
        *hist.entry(c).or_default() += 1;
    }
    let n = codes.len() as f64;
    hist.values()
        .map(|&k| {
            let p = k as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// zstd (level 3) bits per value of the codes stored as bytes (clamped to i8, as the store would).
fn zstd_bits(codes: &[i16]) -> f64 {
    let bytes: Vec<u8> = codes
        .iter()
        .map(|&c| c.clamp(-128, 127) as i8 as u8)
        .collect();
    zstd::bulk::compress(&bytes, 3).unwrap().len() as f64 * 8.0 / codes.len() as f64
}

/// One stream's values, its per-row int8 step, codes and decoded values.
struct Stream {
    v: Vec<f32>,
    step: Vec<f32>,
    codes: Vec<i16>,
    dec: Vec<f32>,
}

fn quantise(v: Vec<f32>, d: usize) -> Stream {
    let step: Vec<f32> = v
        .chunks_exact(d)
        .map(|r| r.iter().fold(0f32, |m, a| m.max(a.abs())) / 127.0)
        .collect();
    let q = |a: f32, s: f32| if s > 0.0 { (a / s).round() } else { 0.0 };
    let codes: Vec<i16> = v
        .chunks_exact(d)
        .zip(&step)
        .flat_map(|(r, &s)| r.iter().map(move |&a| q(a, s) as i16))
        .collect();
    let dec = v
        .chunks_exact(d)
        .zip(&step)
        .flat_map(|(r, &s)| r.iter().map(move |&a| q(a, s) * s))
        .collect();
    Stream {
        v,
        step,
        codes,
        dec,
    }
}

/// Codes of `target` rows `rows(l)` after subtracting, per dimension, the least-squares combination of the
/// decoded regressor rows; returns (residual codes, residual energy / signal energy per target layer).
fn predicted(
    target: &Stream,
    regressors: &[&Stream],
    pairs: &[(usize, Vec<usize>)], // (target layer, regressor layer per regressor)
    t: usize,
    l_n: usize,
    d: usize,
) -> (Vec<i16>, Vec<f64>) {
    let k = regressors.len();
    let mut codes = Vec::new();
    let mut ratios = Vec::new();
    for (lt, lr) in pairs {
        let (mut e0, mut e1) = (0f64, 0f64);
        for j in 0..d {
            let reg = |i: usize, r: usize| regressors[r].dec[(i * l_n + lr[r]) * d + j] as f64;
            // Normal equations, k ≤ 2.
            let mut a = [[0f64; 2]; 2];
            let mut b = [0f64; 2];
            for i in 0..t {
                let c = target.v[(i * l_n + lt) * d + j] as f64;
                for r in 0..k {
                    b[r] += reg(i, r) * c;
                    for s in 0..k {
                        a[r][s] += reg(i, r) * reg(i, s);
                    }
                }
            }
            let coef = if k == 1 {
                [if a[0][0] > 0.0 { b[0] / a[0][0] } else { 0.0 }, 0.0]
            } else {
                let det = a[0][0] * a[1][1] - a[0][1] * a[1][0];
                if det.abs() > 1e-12 {
                    [
                        (b[0] * a[1][1] - b[1] * a[0][1]) / det,
                        (b[1] * a[0][0] - b[0] * a[1][0]) / det,
                    ]
                } else {
                    [0.0, 0.0]
                }
            };
            for i in 0..t {
                let c = target.v[(i * l_n + lt) * d + j] as f64;
                let p: f64 = (0..k).map(|r| coef[r] * reg(i, r)).sum();
                e0 += c * c;
                e1 += (c - p) * (c - p);
                let s = target.step[i * l_n + lt] as f64;
                codes.push(if s > 0.0 {
                    ((c - p) / s).round() as i16
                } else {
                    0
                });
            }
        }
        ratios.push(e1 / e0.max(f64::MIN_POSITIVE));
    }
    (codes, ratios)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: store_redundancy DATASET [TOKENS]");
    let want: usize = args
        .get(2)
        .map_or(4096, |s| s.parse().expect("a token count"));
    let ds = Dataset::open(path).expect("open the dataset");
    let dims = ds.dims();
    let (l_n, d) = (dims.n_layers, dims.d_model);
    let row = l_n * d;
    let mut reader = BlockReader::new().unwrap();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    'read: for shard in ds.shards() {
        for b in 0..shard.blocks().len() {
            let block = reader.read(shard, b).unwrap();
            let n = block.n_tokens();
            let (old_x, old_y) = (x.len(), y.len());
            x.resize(old_x + n * row, 0.0);
            y.resize(old_y + n * row, 0.0);
            block.x_rows(0, &mut x[old_x..]);
            block.y_rows(0, &mut y[old_y..]);
            if x.len() >= want * row {
                break 'read;
            }
        }
    }
    let t = (x.len() / row).min(want);
    x.truncate(t * row);
    y.truncate(t * row);
    println!("{t} tokens, {l_n} layers, d {d}; bits per value\n");
    let (xs, ys) = (quantise(x, d), quantise(y, d));
    println!("| stream | coding | entropy | zstd | residual/signal energy per layer |");
    println!("|---|---|---:|---:|---|");
    for (name, s) in [("x (MLP in)", &xs), ("y (MLP out)", &ys)] {
        let by_layer: f64 = (0..l_n)
            .map(|l| {
                let c: Vec<i16> = (0..t)
                    .flat_map(|i| s.codes[(i * l_n + l) * d..][..d].to_vec())
                    .collect();
                entropy(&c)
            })
            .sum::<f64>()
            / l_n as f64;
        let by_dim: f64 = (0..l_n * d)
            .map(|ld| {
                let c: Vec<i16> = (0..t).map(|i| s.codes[i * row + ld]).collect();
                entropy(&c)
            })
            .sum::<f64>()
            / row as f64;
        println!(
            "| {name} | int8 codes | {:.3} (given layer {by_layer:.3}, given layer and dim {by_dim:.3}) | {:.3} | |",
            entropy(&s.codes),
            zstd_bits(&s.codes)
        );
        // Temporal: each token from the previous one, same layer.
        let mut codes = Vec::new();
        let (mut e0, mut e1) = (0f64, 0f64);
        for ld in 0..row {
            let (mut sxy, mut sxx) = (0f64, 0f64);
            for i in 1..t {
                let (p, c) = (s.dec[(i - 1) * row + ld] as f64, s.v[i * row + ld] as f64);
                sxy += p * c;
                sxx += p * p;
            }
            let a = if sxx > 0.0 { sxy / sxx } else { 0.0 };
            for i in 1..t {
                let (p, c) = (
                    a * s.dec[(i - 1) * row + ld] as f64,
                    s.v[i * row + ld] as f64,
                );
                e0 += c * c;
                e1 += (c - p) * (c - p);
                let st = s.step[i * l_n + ld / d] as f64;
                codes.push(if st > 0.0 {
                    ((c - p) / st).round() as i16
                } else {
                    0
                });
            }
        }
        println!(
            "| {name} | residual of the previous token | {:.3} | {:.3} | {:.2} (all layers) |",
            entropy(&codes),
            zstd_bits(&codes),
            e1 / e0
        );
    }
    let fmt = |r: &[f64]| {
        r.iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // x_l from x_{l−1} (layer 0 coded as is).
    let pairs: Vec<(usize, Vec<usize>)> = (1..l_n).map(|l| (l, vec![l - 1])).collect();
    let (mut cx, rx) = predicted(&xs, &[&xs], &pairs, t, l_n, d);
    cx.extend((0..t).flat_map(|i| xs.codes[i * row..][..d].to_vec()));
    println!(
        "| x (MLP in) | residual of x_l from x_(l-1) | {:.3} | {:.3} | {} |",
        entropy(&cx),
        zstd_bits(&cx),
        fmt(&rx)
    );
    // y_l from x_{l+1} and x_l (the last layer's y coded as is).
    let pairs: Vec<(usize, Vec<usize>)> = (0..l_n - 1).map(|l| (l, vec![l + 1, l])).collect();
    let (mut cy, ry) = predicted(&ys, &[&xs, &xs], &pairs, t, l_n, d);
    cy.extend((0..t).flat_map(|i| ys.codes[(i * l_n + l_n - 1) * d..][..d].to_vec()));
    println!(
        "| y (MLP out) | residual of y_l from x_(l+1), x_l | {:.3} | {:.3} | {} |",
        entropy(&cy),
        zstd_bits(&cy),
        fmt(&ry)
    );
}
