//! Tests of the predictive int8 codec (`int8p`, `clt::store::predict`): error never above plain int8's, smaller
//! on correlated data, bit-exact and path-independent decoding, typed errors on corrupt blocks, conversion, and
//! awkward shapes (1 token, 1 layer, d = 1).

use std::path::Path;

use clt::data::ActDims;
use clt::store::{BlockReader, Codec, Dataset, WriterConfig};
use proptest::prelude::*;

mod common;
use common::SplitMix as Rng;
use common::store::{
    assert_damage_is_a_typed_error, assert_rows_and_loader_agree, bits, read_blocks,
    residual_stream, write_with_ids,
};

/// Independent Gaussian values with two 30× outlier dimensions (nothing to predict).
fn random(n: usize, dims: ActDims, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut r = Rng(seed);
    let d = dims.d_model;
    let mut one = |_| {
        (0..n * dims.n_layers * d)
            .map(|i| r.normal() * if i % d == 3 || i % d == 11 { 30.0 } else { 1.0 })
            .collect::<Vec<f32>>()
    };
    (one(0), one(1))
}

/// The toy residual stream of `tests/common/store.rs` from `seed`.
fn correlated(n: usize, dims: ActDims, seed: u64) -> (Vec<f32>, Vec<f32>) {
    residual_stream(&mut Rng(seed), n, dims)
}

fn write(dir: &Path, codec: Codec, dims: ActDims, x: &[f32], y: &[f32], block: usize) -> u64 {
    let cfg = WriterConfig {
        codec,
        block_tokens: block,
        threads: 2,
        ..Default::default()
    };
    write_with_ids(dir, dims, cfg, x, y)
        .shards
        .iter()
        .map(|s| s.bytes)
        .sum()
}

/// All inputs and targets of a dataset, decoded with `x_rows` then `y_rows` (`split`) or `xy_rows`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
    num / a.iter().map(|p| (*p as f64).powi(2)).sum::<f64>()
}

/// Every value within int8's bound: half a step of its row, `max|row| / 127`.
fn assert_int8_bound(orig: &[f32], back: &[f32], d: usize, what: &str) {
    assert_eq!(orig.len(), back.len());
    for (i, (ro, rb)) in orig.chunks(d).zip(back.chunks(d)).enumerate() {
        let step = ro.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for (j, (&a, &b)) in ro.iter().zip(rb).enumerate() {
            assert!(
                (a - b).abs() <= step * 0.5 * 1.0001,
                "{what}: row {i} dim {j}: {a} -> {b}, step {step}"
            );
        }
    }
}

const DIMS: ActDims = ActDims {
    n_layers: 4,
    d_model: 24,
};

/// Error at most int8's: per value always (half a step); overall within 1% when d ≥ 130 (below that, the predicted
/// rows' step cannot be refined enough to offset the row maximum that int8 codes exactly: see
/// `predict::step_factor`), so this uses d = 160.
#[test]
fn error_at_most_int8s_and_smaller_on_correlated_data() {
    let dims = ActDims {
        n_layers: 4,
        d_model: 160,
    };
    for (name, (x, y)) in [
        ("random", random(400, dims, 1)),
        ("correlated", correlated(400, dims, 2)),
    ] {
        let (dp, d8) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let bp = write(dp.path(), Codec::Int8p, dims, &x, &y, 64);
        let b8 = write(d8.path(), Codec::Int8, dims, &x, &y, 64);
        let (px, py, _) = read_blocks(dp.path(), false);
        let (qx, qy, _) = read_blocks(d8.path(), false);
        assert_int8_bound(&x, &px, dims.d_model, name);
        assert_int8_bound(&y, &py, dims.d_model, name);
        for (v, p, q) in [(&x, &px, &qx), (&y, &py, &qy)] {
            let (ep, e8) = (rel_err(v, p), rel_err(v, q));
            assert!(
                ep <= e8 * 1.01,
                "{name}: int8p error {ep:.3e} > int8's {e8:.3e}"
            );
        }
        if name == "correlated" {
            assert!(
                (bp as f64) < 0.95 * b8 as f64,
                "{name}: int8p {bp} bytes, int8 {b8}"
            );
        }
    }
}

#[test]
fn decoding_is_bit_exact_and_path_independent() {
    let (x, y) = correlated(300, DIMS, 3);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(a.path(), Codec::Int8p, DIMS, &x, &y, 50);
    write(b.path(), Codec::Int8p, DIMS, &x, &y, 50);
    // The encoder is deterministic (whatever the thread count), so the files are identical.
    for f in ["shard-00000.clts", "manifest.json"] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap()
        );
    }
    let (x1, y1, _) = read_blocks(a.path(), false);
    let (x2, y2, _) = read_blocks(a.path(), true);
    assert_eq!((bits(&x1), bits(&y1)), (bits(&x2), bits(&y2)));
    // Token by token from the middle of a block, as the loader does, and through the shuffling loader.
    assert_rows_and_loader_agree(a.path(), &x1, &y1, 50);
}

#[test]
fn corrupt_or_truncated_int8p_shards_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = correlated(200, DIMS, 4);
    write(dir.path(), Codec::Int8p, DIMS, &x, &y, 64);
    assert_damage_is_a_typed_error(dir.path());
}

#[test]
fn convert_to_and_from_int8p() {
    use clt::store::cli::{EncodeArgs, convert};
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = correlated(230, DIMS, 5);
    let src = dir.path().join("f32");
    write(&src, Codec::F32, DIMS, &x, &y, 40);
    let args = |codec| EncodeArgs {
        codec,
        no_byte_planes: false,
        block_tokens: 32,
        shard_tokens: 100,
        zstd_level: 3,
        threads: 1,
        outlier_dims: 8,
        target_rel_err: None,
    };
    let p = dir.path().join("p");
    let m = convert(&src, &p, &args(Codec::Int8p)).unwrap();
    assert_eq!(
        (m.codec, m.n_tokens, m.shards.len()),
        (Codec::Int8p, 230, 3)
    );
    let (px, py, _) = read_blocks(&p, false);
    assert_int8_bound(&x, &px, DIMS.d_model, "f32 -> int8p");
    assert_int8_bound(&y, &py, DIMS.d_model, "f32 -> int8p");
    // Back to f32: exactly the int8p reconstruction, ids kept.
    let back = dir.path().join("back");
    convert(&p, &back, &args(Codec::F32)).unwrap();
    let (bx, by, _) = read_blocks(&back, false);
    assert_eq!((bits(&bx), bits(&by)), (bits(&px), bits(&py)));
    let ds = Dataset::open(&back).unwrap();
    let mut r = BlockReader::new().unwrap();
    let toks: Vec<u32> = ds
        .shards()
        .iter()
        .flat_map(|s| {
            (0..s.blocks().len())
                .flat_map(|b| r.read(s, b).unwrap().tokens().collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(toks, (0..230).collect::<Vec<u32>>());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Awkward shapes: 1 token, 1 layer, d = 1, blocks of 1 token, zero rows and constant rows; int8's bound holds
    /// and both decode paths agree bit for bit.
    #[test]
    fn awkward_shapes_round_trip(
        n in 1usize..6,
        layers in 1usize..4,
        d in 1usize..5,
        block in 1usize..4,
        seed in any::<u64>(),
        kind in 0u8..3,
    ) {
        let dims = ActDims { n_layers: layers, d_model: d };
        let (mut x, mut y) = match kind {
            0 => random(n, dims, seed),
            _ => correlated(n, dims, seed),
        };
        if kind == 2 {
            // A zero row and a constant row.
            x[..d].fill(0.0);
            let k = y.len() - d;
            y[k..].fill(1.5);
        }
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), Codec::Int8p, dims, &x, &y, block);
        let (px, py, _) = read_blocks(dir.path(), false);
        let (sx, sy, _) = read_blocks(dir.path(), true);
        prop_assert_eq!(bits(&px), bits(&sx));
        prop_assert_eq!(bits(&py), bits(&sy));
        assert_int8_bound(&x, &px, d, "x");
        assert_int8_bound(&y, &py, d, "y");
    }
}
