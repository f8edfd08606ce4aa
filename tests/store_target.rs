//! Tests of the int8 / int8p error target (`WriterConfig::target_rel_err`): each layer's relative error is about
//! ε when no row's range needs a coarser step, rows whose range does keep int8's absmax step, every other row is
//! on its layer's grid `Δ_l` (`clt::store::codec::target_steps`), and targets the codecs cannot honour are
//! configuration errors.

use std::path::Path;

use clt::Error;
use clt::data::ActDims;
use clt::store::codec::target_steps;
use clt::store::format::ShardMeta;
use clt::store::{BlockReader, Codec, Dataset, DatasetWriter, WriterConfig};

mod common;
use common::SplitMix as Rng;

const DIMS: ActDims = ActDims {
    n_layers: 3,
    d_model: 100,
};
/// Tokens per block (the last of the 300 tokens' blocks has 44).
const BLOCK: usize = 128;
const TOKENS: usize = 300;

/// Gaussian rows, a different scale per layer, inputs correlated from layer to layer and targets with their
/// inputs (so int8p predicts most rows). No row's range exceeds ±127 steps of Δ_l for ε ≥ 1e-4.
fn data(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (l_n, d) = (DIMS.n_layers, DIMS.d_model);
    let mut r = Rng(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..TOKENS {
        let h: Vec<f32> = (0..d).map(|_| r.normal()).collect();
        for l in 0..l_n {
            let g = [1.0, 3.0, 0.2][l];
            let xl: Vec<f32> = h.iter().map(|v| g * (v + 0.3 * r.normal())).collect();
            y.extend(xl.iter().map(|v| 0.5 * v + 0.2 * g * r.normal()));
            x.extend(xl);
        }
    }
    (x, y)
}

fn write(dir: &Path, codec: Codec, target: Option<f64>, x: &[f32], y: &[f32]) -> u64 {
    let cfg = WriterConfig {
        codec,
        block_tokens: BLOCK,
        threads: 2,
        target_rel_err: target,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(dir, DIMS, cfg, ShardMeta::default(), 1000).unwrap();
    w.push(x, y, None).unwrap();
    w.finish().unwrap().shards.iter().map(|s| s.bytes).sum()
}

fn read(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let ds = Dataset::open(dir).unwrap();
    let row = DIMS.n_layers * DIMS.d_model;
    let mut r = BlockReader::new().unwrap();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for s in ds.shards() {
        for b in 0..s.blocks().len() {
            let blk = r.read(s, b).unwrap();
            let k = x.len();
            x.resize(k + blk.n_tokens() * row, 0.0);
            y.resize(k + blk.n_tokens() * row, 0.0);
            blk.xy_rows(0, &mut x[k..], &mut y[k..]);
        }
    }
    (x, y)
}

/// ‖v − v̂‖²/‖v‖² per layer.
fn rel_err_per_layer(v: &[f32], vh: &[f32]) -> Vec<f64> {
    let l_n = DIMS.n_layers;
    let (mut num, mut den) = (vec![0f64; l_n], vec![0f64; l_n]);
    for (i, (a, b)) in v
        .chunks_exact(DIMS.d_model)
        .zip(vh.chunks_exact(DIMS.d_model))
        .enumerate()
    {
        for (&p, &q) in a.iter().zip(b) {
            num[i % l_n] += ((p - q) as f64).powi(2);
            den[i % l_n] += (p as f64).powi(2);
        }
    }
    num.iter().zip(&den).map(|(n, d)| n / d).collect()
}

#[test]
fn each_layer_error_is_the_target_when_no_row_overflows() {
    let (x, y) = data(1);
    let tmp = tempfile::tempdir().unwrap();
    for codec in [Codec::Int8, Codec::Int8p] {
        let plain = write(&tmp.path().join(codec.name()), codec, None, &x, &y);
        for eps in [1e-4, 1e-3] {
            let dir = tmp.path().join(format!("{}-{eps}", codec.name()));
            let bytes = write(&dir, codec, Some(eps), &x, &y);
            let (xh, yh) = read(&dir);
            for (what, v, vh) in [("x", &x, &xh), ("y", &y, &yh)] {
                for (l, e) in rel_err_per_layer(v, vh).into_iter().enumerate() {
                    // Δ²/12 per value at high rate: within sampling noise of ε (12,800 values per block).
                    assert!(
                        (0.85 * eps..=1.1 * eps).contains(&e),
                        "{} ε {eps} {what} layer {l}: relative error {e:.3e}",
                        codec.name()
                    );
                }
            }
            // Int8's per-row steps give these rows an error far below 1e-4 at a higher rate.
            assert!(
                bytes < plain,
                "{} ε {eps}: {bytes} bytes, without a target {plain}",
                codec.name()
            );
        }
    }
}

/// The step of a decoded row: every value is an integer multiple of it (within f32 rounding).
fn on_grid(row: &[f32], step: f32) -> bool {
    row.iter().all(|&v| {
        let q = v / step;
        (q - q.round()).abs() <= 1e-3
    })
}

#[test]
fn rows_whose_range_needs_a_coarser_step_keep_the_absmax_step() {
    let (mut x, y) = data(2);
    let (l_n, d) = (DIMS.n_layers, DIMS.d_model);
    let row = l_n * d;
    // Token 7, layer 1: one value 400× the layer's scale, far beyond ±127 steps of Δ_1.
    let spike = 7 * l_n + 1;
    x[spike * d + 5] = 1200.0;
    let eps = 1e-3;
    let tmp = tempfile::tempdir().unwrap();
    for codec in [Codec::Int8, Codec::Int8p] {
        let dir = tmp.path().join(codec.name());
        write(&dir, codec, Some(eps), &x, &y);
        let (xh, _) = read(&dir);
        // The block of tokens 0..128 holds the spike; its steps are the encoder's (same function, same values).
        let steps = target_steps(&x[..BLOCK * row], l_n, d, eps);
        for r in 0..BLOCK * l_n {
            let (v, vh) = (&x[r * d..][..d], &xh[r * d..][..d]);
            let absmax = v.iter().fold(0f32, |m, a| m.max(a.abs())) / 127.0;
            let step = absmax.max(steps[r % l_n]);
            for (j, (&a, &b)) in v.iter().zip(vh).enumerate() {
                assert!(
                    (a - b).abs() <= 0.5 * step * 1.0001,
                    "{} row {r} dim {j}: {a} -> {b}, step {step}",
                    codec.name()
                );
            }
            if r == spike {
                assert!(absmax > 2.0 * steps[1], "the spike row must overflow Δ_1");
                assert!(
                    !on_grid(vh, steps[1]),
                    "{}: the spike row is on Δ_1's grid",
                    codec.name()
                );
                if codec == Codec::Int8 {
                    // int8 codes the row's largest value exactly (code 127).
                    assert!((vh[5] - 1200.0).abs() <= 1200.0 * 1e-6, "{}", vh[5]);
                    assert!(on_grid(vh, absmax));
                }
            } else {
                assert!(
                    on_grid(vh, steps[r % l_n]),
                    "{} row {r}: not on its layer's grid {}",
                    codec.name(),
                    steps[r % l_n]
                );
            }
        }
    }
}

#[test]
fn targets_the_codec_cannot_honour_are_config_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for (codec, eps) in [
        (Codec::Bf16, 1e-3),
        (Codec::Int4, 1e-3),
        (Codec::Int8o, 1e-3),
        (Codec::Int8, 0.0),
        (Codec::Int8p, 1.0),
        (Codec::Int8, f64::NAN),
        (Codec::Int8, -1e-3),
    ] {
        let cfg = WriterConfig {
            codec,
            target_rel_err: Some(eps),
            ..Default::default()
        };
        let r = DatasetWriter::create(tmp.path().join("d"), DIMS, cfg, ShardMeta::default(), 100);
        assert!(
            matches!(&r, Err(Error::Config { field, .. }) if field == "store.target_rel_err"),
            "{} ε {eps}: {:?}",
            codec.name(),
            r.err()
        );
    }
}
