//! Tests of the error-targeted predictive codec with escapes (`int8e`, `clt::store::int8e`): each layer's error
//! about ε, every value within half a step of its layer's Δ (escaped outliers exactly on the grid), decoding bit
//! for bit the encoder's reconstruction through every path (including the loader), typed errors on corrupt blocks
//! and inconsistent escape indexes, the default ε in the manifest, `clt store convert` both ways, and awkward shapes.

use std::path::Path;

use clt::Error;
use clt::data::ActDims;
use clt::store::codec::target_steps;
use clt::store::format::ShardMeta;
use clt::store::int8e;
use clt::store::{Codec, DatasetWriter, Shard, WriterConfig};

mod common;
use common::SplitMix as Rng;
use common::store::{
    assert_damage_is_a_typed_error, assert_rows_and_loader_agree, bits, read_blocks,
    residual_stream, write_with_ids,
};

/// The toy residual stream of `tests/common/store.rs` (inputs correlated across layers, each output nearly a
/// combination of the next and the same layer's input), plus rare unpredictable spikes of ±300 RMS in both
/// streams (0.1% of the values), whose codes do not fit in int8 at the steps used here: they must be escaped.
fn spiky(n: usize, dims: ActDims, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut r = Rng(seed);
    let (mut x, mut y) = residual_stream(&mut r, n, dims);
    for v in x.iter_mut().chain(y.iter_mut()) {
        if r.unit() < 0.001 {
            *v = if r.unit() < 0.5 { 300.0 } else { -300.0 } * v.abs().max(0.5);
        }
    }
    (x, y)
}

fn write(
    dir: &Path,
    dims: ActDims,
    x: &[f32],
    y: &[f32],
    block: usize,
    eps: Option<f64>,
) -> clt::store::Manifest {
    let cfg = WriterConfig {
        codec: Codec::Int8e,
        block_tokens: block,
        threads: 2,
        target_rel_err: eps,
        ..Default::default()
    };
    write_with_ids(dir, dims, cfg, x, y)
}

/// All inputs and targets of a dataset, decoded with `x_rows` then `y_rows` (`split`) or `xy_rows`, and the number
/// of escapes (from the blocks' tails).
const DIMS: ActDims = ActDims {
    n_layers: 4,
    d_model: 24,
};

/// Checks every value of `back` against `orig` block by block: within half of its layer's step Δ_l (computed from
/// the block as the writer does), and values beyond 150 steps (the spikes: escaped) exactly on the grid. Returns
/// the relative error of each layer and how many values were beyond 150 steps.
fn check_grid(
    orig: &[f32],
    back: &[f32],
    dims: ActDims,
    block: usize,
    eps: f64,
    what: &str,
) -> (Vec<f64>, usize) {
    let (l_n, d) = (dims.n_layers, dims.d_model);
    let (mut num, mut den) = (vec![0f64; l_n], vec![0f64; l_n]);
    let mut far = 0;
    for (bi, (bo, bb)) in orig
        .chunks(block * l_n * d)
        .zip(back.chunks(block * l_n * d))
        .enumerate()
    {
        let st = target_steps(bo, l_n, d, eps);
        for (i, (&a, &b)) in bo.iter().zip(bb).enumerate() {
            let l = (i / d) % l_n;
            let s = st[l];
            assert!(
                (a - b).abs() <= 0.5 * s * (1.0 + 1e-4) + 1e-6 * a.abs(),
                "{what}: block {bi} value {i} (layer {l}): {a} -> {b}, step {s}"
            );
            if (a / s).abs() > 150.0 {
                far += 1;
                let on_grid = ((a * (1.0 / s)).round() as i32) as f32 * s;
                assert_eq!(
                    b.to_bits(),
                    on_grid.to_bits(),
                    "{what}: block {bi} value {i}: {a} -> {b}"
                );
            }
            num[l] += ((a - b) as f64).powi(2);
            den[l] += (a as f64).powi(2);
        }
    }
    (num.iter().zip(&den).map(|(n, d)| n / d).collect(), far)
}

#[test]
fn error_is_eps_per_layer_and_outliers_are_escaped_on_the_grid() {
    let (x, y) = spiky(400, DIMS, 1);
    for eps in [1e-3, 1e-4] {
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path(), DIMS, &x, &y, 64, Some(eps));
        assert_eq!(m.target_rel_err, Some(eps));
        let (bx, by, esc) = read_blocks(dir.path(), false);
        let (ex, fx) = check_grid(&x, &bx, DIMS, 64, eps, "x");
        let (ey, fy) = check_grid(&y, &by, DIMS, 64, eps, "y");
        assert!(fx > 10 && fy > 10, "too few spikes: {fx}, {fy}");
        // Every spike is escaped (its code is far beyond ±127 whatever the prediction); other values may be too.
        assert!(
            esc >= fx + fy,
            "ε {eps}: {esc} escapes for {} spikes",
            fx + fy
        );
        for (l, e) in ex.iter().chain(&ey).enumerate() {
            assert!(
                (0.7 * eps..=1.3 * eps).contains(e),
                "ε {eps}: layer {} of {}: rel. err {e:.3e}",
                l % DIMS.n_layers,
                if l < DIMS.n_layers { "x" } else { "y" }
            );
        }
    }
}

#[test]
fn decoding_is_bit_exact_with_the_encoder_on_every_path() {
    let (x, y) = spiky(300, DIMS, 3);
    let (l_n, d) = (DIMS.n_layers, DIMS.d_model);
    let row = l_n * d;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(a.path(), DIMS, &x, &y, 50, None);
    write(b.path(), DIMS, &x, &y, 50, None);
    // Deterministic whatever the threads.
    for f in ["shard-00000.clts", "manifest.json"] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap()
        );
    }
    let (x1, y1, _) = read_blocks(a.path(), false);
    let (x2, y2, _) = read_blocks(a.path(), true);
    assert_eq!((bits(&x1), bits(&y1)), (bits(&x2), bits(&y2)));
    // The encoder's own reconstruction, block by block (the writer's default ε).
    for (bi, (bx, by)) in x.chunks(50 * row).zip(y.chunks(50 * row)).enumerate() {
        let (mut codes, mut side, mut tail) = (Vec::new(), Vec::new(), Vec::new());
        let (rx, ry) = int8e::encode(
            bx,
            by,
            l_n,
            d,
            int8e::DEFAULT_EPS,
            &mut codes,
            &mut side,
            &mut tail,
        );
        let g = bi * 50 * row;
        assert_eq!(bits(&rx), bits(&x1[g..g + bx.len()]), "block {bi}: x");
        assert_eq!(bits(&ry), bits(&y1[g..g + by.len()]), "block {bi}: y");
        assert!(!tail.is_empty(), "block {bi} has no escapes");
    }
    // Token by token from the middle of a block (escape index), as the loader does, and through the shuffling
    // loader.
    assert_rows_and_loader_agree(a.path(), &x1, &y1, 50);
}

#[test]
fn default_target_is_recorded_and_bad_targets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = spiky(40, DIMS, 5);
    let m = write(dir.path(), DIMS, &x, &y, 16, None);
    assert_eq!(
        (m.codec, m.target_rel_err),
        (Codec::Int8e, Some(int8e::DEFAULT_EPS))
    );
    let (bx, _, _) = read_blocks(dir.path(), false);
    check_grid(&x, &bx, DIMS, 16, int8e::DEFAULT_EPS, "default ε");
    for eps in [0.0, 1.0, -1e-3, f64::NAN] {
        let cfg = WriterConfig {
            codec: Codec::Int8e,
            target_rel_err: Some(eps),
            ..Default::default()
        };
        let d2 = tempfile::tempdir().unwrap();
        let e = DatasetWriter::create(d2.path(), DIMS, cfg, ShardMeta::default(), 100);
        assert!(matches!(e, Err(Error::Config { .. })), "ε {eps} accepted");
    }
}

#[test]
fn corrupt_truncated_or_unknown_codec_shards_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = spiky(200, DIMS, 4);
    write(dir.path(), DIMS, &x, &y, 64, None);
    let p = dir.path().join("shard-00000.clts");
    let good = std::fs::read(&p).unwrap();
    // The codec byte: 7. A reader that does not know it (any build before int8e) refuses the file at offset 12, as
    // this build refuses the next unassigned byte.
    assert_eq!(good[12], Codec::Int8e as u8);
    let mut unknown = good.clone();
    unknown[12] = 8;
    std::fs::write(&p, &unknown).unwrap();
    assert!(matches!(
        Shard::open(&p),
        Err(Error::Format { offset: 12, .. })
    ));
    std::fs::write(&p, &good).unwrap();
    assert_damage_is_a_typed_error(dir.path());
}

#[test]
fn inconsistent_escape_indexes_are_refused() {
    let (l_n, d, n) = (DIMS.n_layers, DIMS.d_model, 30);
    let (x, y) = spiky(n, DIMS, 6);
    let (mut codes, mut side, mut tail) = (Vec::new(), Vec::new(), Vec::new());
    int8e::encode(&x, &y, l_n, d, 1e-3, &mut codes, &mut side, &mut tail);
    let (xc, yc) = codes.split_at(n * l_n * d);
    assert_eq!(side.len(), int8e::side_bytes(l_n, d, n).unwrap());
    assert!(tail.len() >= 8);
    let ok = |xc: &[u8], yc: &[u8], side: &[u8], tail: &[u8]| {
        int8e::validate(xc, yc, side, tail, l_n, d, n)
    };
    assert_eq!(ok(xc, yc, &side, &tail), Ok(()));
    // The tail one escape short.
    assert!(ok(xc, yc, &side, &tail[..tail.len() - 4]).is_err());
    // A code turned into an escape byte without its escape.
    let i = xc.iter().position(|&c| c != 0x80).unwrap();
    let mut xb = xc.to_vec();
    xb[i] = 0x80;
    assert!(ok(&xb, yc, &side, &tail).is_err());
    // An index entry moved (token 1's first x escape), and a non-finite step.
    let idx = side.len() - 8 * (n + 1);
    let mut sb = side.clone();
    sb[idx + 4] = sb[idx + 4].wrapping_add(1);
    assert!(ok(xc, yc, &sb, &tail).is_err());
    let mut sb = side.clone();
    let st = idx - 8 * l_n;
    sb[st..st + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(ok(xc, yc, &sb, &tail).is_err());
}

#[test]
fn awkward_shapes_round_trip() {
    let mut escapes = 0;
    for (n, l_n, d, block) in [(1, 1, 1, 1), (7, 1, 5, 3), (9, 3, 1, 4), (33, 2, 17, 10)] {
        let dims = ActDims {
            n_layers: l_n,
            d_model: d,
        };
        let (x, mut y) = spiky(n, dims, 7 + n as u64);
        // A layer of zeros (zero step) in the targets.
        for (i, v) in y.iter_mut().enumerate() {
            if (i / d) % l_n == 0 {
                *v = 0.0;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        // A small ε, so that even short blocks (whose spikes dominate their layer's energy) need escapes.
        write(dir.path(), dims, &x, &y, block, Some(1e-5));
        let (bx, by, esc) = read_blocks(dir.path(), false);
        let (sx, sy, _) = read_blocks(dir.path(), true);
        assert_eq!((bits(&bx), bits(&by)), (bits(&sx), bits(&sy)));
        check_grid(&x, &bx, dims, block, 1e-5, "awkward x");
        check_grid(&y, &by, dims, block, 1e-5, "awkward y");
        escapes += esc;
    }
    assert!(escapes > 0);
}

#[test]
fn convert_to_and_from_int8e() {
    use clt::store::cli::{EncodeArgs, convert, verify};
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = spiky(230, DIMS, 8);
    let src = dir.path().join("f32");
    let cfg = WriterConfig {
        codec: Codec::F32,
        block_tokens: 40,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(&src, DIMS, cfg, ShardMeta::default(), 500).unwrap();
    w.push(&x, &y, None).unwrap();
    w.finish().unwrap();
    let args = |codec, target_rel_err| EncodeArgs {
        codec,
        no_byte_planes: false,
        block_tokens: 32,
        shard_tokens: 1000,
        zstd_level: 3,
        threads: 1,
        outlier_dims: 8,
        target_rel_err,
    };
    let e = dir.path().join("e");
    let m = convert(&src, &e, &args(Codec::Int8e, Some(1e-4))).unwrap();
    assert_eq!(
        (m.codec, m.n_tokens, m.target_rel_err),
        (Codec::Int8e, 230, Some(1e-4))
    );
    verify(&e).unwrap();
    let (ex, ey, esc) = read_blocks(&e, false);
    assert!(esc > 0);
    check_grid(&x, &ex, DIMS, 32, 1e-4, "f32 -> int8e x");
    check_grid(&y, &ey, DIMS, 32, 1e-4, "f32 -> int8e y");
    // Back to f32: exactly the int8e reconstruction.
    let back = dir.path().join("back");
    convert(&e, &back, &args(Codec::F32, None)).unwrap();
    let (bx, by, _) = read_blocks(&back, false);
    assert_eq!((bits(&bx), bits(&by)), (bits(&ex), bits(&ey)));
}
