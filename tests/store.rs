//! Tests of the activation store: codec round-trips, corrupt and inconsistent input, and the loader's order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use clt::Error;
use clt::data::{ActDims, ActivationSource, Batch};
use clt::store::format::{self, ShardMeta};
use clt::store::{
    BlockReader, Codec, Dataset, DatasetWriter, LoaderConfig, Shard, ShardLoader, TokenIds,
    WriterConfig,
};
use proptest::prelude::*;

mod common;

use common::store::read_all;

const DIMS: ActDims = ActDims {
    n_layers: 3,
    d_model: 20,
};

/// Deterministic pseudo-normal data with outlier dimensions (dims 3 and 11 are 30× larger).
fn synth(n_tokens: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let n = n_tokens * DIMS.n_layers * DIMS.d_model;
    let mut gen_one = |n| {
        (0..n)
            .map(|i| {
                let v = next() + next() + next();
                if i % DIMS.d_model == 3 || i % DIMS.d_model == 11 {
                    v * 30.0
                } else {
                    v
                }
            })
            .collect::<Vec<f32>>()
    };
    (gen_one(n), gen_one(n))
}

fn write_ds(
    dir: &Path,
    codec: Codec,
    planes: bool,
    n_tokens: usize,
    block: usize,
    shard_tokens: u64,
) -> (Vec<f32>, Vec<f32>) {
    let (x, y) = synth(n_tokens, 7);
    let cfg = WriterConfig {
        codec,
        byte_planes: planes,
        block_tokens: block,
        zstd_level: 3,
        threads: 2,
        outlier_dims: 8,
        target_rel_err: None,
    };
    let meta = ShardMeta {
        model: "synthetic".into(),
        ..Default::default()
    };
    let mut w = DatasetWriter::create(dir, DIMS, cfg, meta, shard_tokens).unwrap();
    let tokens: Vec<u32> = (0..n_tokens as u32).collect();
    let pos: Vec<u32> = (0..n_tokens as u32).map(|t| t % 17).collect();
    let docs: Vec<u64> = (0..n_tokens as u64).map(|t| t / 17).collect();
    let row = DIMS.n_layers * DIMS.d_model;
    // Push in uneven pieces to exercise the streaming path.
    let mut s = 0;
    for (i, step) in [1usize, 37, 5, 200, 3].iter().cycle().enumerate() {
        if s >= n_tokens {
            break;
        }
        let e = (s + step + i % 3).min(n_tokens);
        let ids = TokenIds {
            tokens: &tokens[s..e],
            positions: &pos[s..e],
            doc_ids: &docs[s..e],
        };
        w.push(&x[s * row..e * row], &y[s * row..e * row], Some(ids))
            .unwrap();
        s = e;
    }
    let m = w.finish().unwrap();
    assert_eq!(m.n_tokens, n_tokens as u64);
    (x, y)
}

/// int8e's step of every row of `v` (`n` tokens written in shards of `shard` tokens, blocks of `block`): its
/// layer's `Δ_l` over its block at the writer's default error target.
fn int8e_steps(v: &[f32], n: usize, block: usize, shard: usize) -> Vec<f32> {
    let (l_n, d) = (DIMS.n_layers, DIMS.d_model);
    let mut out = vec![0f32; n * l_n];
    for s0 in (0..n).step_by(shard) {
        let se = (s0 + shard).min(n);
        for b0 in (s0..se).step_by(block) {
            let be = (b0 + block).min(se);
            let st = clt::store::codec::target_steps(
                &v[b0 * l_n * d..be * l_n * d],
                l_n,
                d,
                clt::store::int8e::DEFAULT_EPS,
            );
            for (r, o) in out.iter_mut().enumerate().take(be * l_n).skip(b0 * l_n) {
                *o = st[r % l_n];
            }
        }
    }
    out
}

#[test]
fn round_trip_every_codec_within_its_error_bound() {
    let n = 1000;
    for codec in Codec::ALL {
        for planes in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (x, y) = write_ds(dir.path(), codec, planes, n, 64, 300);
            let (rx, ry, t, p, d) = read_all(dir.path());
            assert_eq!(t, (0..n as u32).collect::<Vec<_>>());
            assert_eq!(p, (0..n as u32).map(|t| t % 17).collect::<Vec<_>>());
            assert_eq!(d, (0..n as u64).map(|t| t / 17).collect::<Vec<_>>());
            for (orig, back) in [(&x, &rx), (&y, &ry)] {
                assert_eq!(orig.len(), back.len());
                let steps = int8e_steps(orig, n, 64, 300);
                for (r, (ro, rb)) in orig
                    .chunks(DIMS.d_model)
                    .zip(back.chunks(DIMS.d_model))
                    .enumerate()
                {
                    let absmax = ro.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // Largest value outside the planted outlier dims 3 and 11 (which int8o keeps in bf16).
                    let rest = ro
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != 3 && *j != 11)
                        .fold(0f32, |m, (_, v)| m.max(v.abs()));
                    for (&a, &b) in ro.iter().zip(rb) {
                        let err = (a - b).abs();
                        let bound = match codec {
                            Codec::F32 => 0.0,
                            Codec::Bf16 => a.abs() * 2f32.powi(-8),
                            Codec::F16 => a.abs() * 2f32.powi(-11) + 6e-8,
                            // int8p codes a prediction's residual at int8's step: the same bound.
                            Codec::Int8 | Codec::Int8p => absmax / 127.0 * 0.5 * 1.0001,
                            Codec::Int4 => absmax / 7.0 * 0.5 * 1.0001,
                            Codec::Int8o => {
                                (rest / 127.0 * 0.5 * 1.0001).max(a.abs() * 2f32.powi(-8))
                            }
                            // One step per (block, layer, stream), whatever the value's range.
                            Codec::Int8e => steps[r] * 0.5 * 1.0001,
                        };
                        assert!(
                            err <= bound,
                            "{codec:?} planes={planes}: {a} -> {b} (err {err} > {bound})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn writer_rejects_non_finite_and_bad_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = DatasetWriter::create(
        dir.path(),
        DIMS,
        WriterConfig::default(),
        ShardMeta::default(),
        100,
    )
    .unwrap();
    let (mut x, y) = synth(2, 1);
    x[5] = f32::NAN;
    assert!(matches!(
        w.push(&x, &y, None),
        Err(Error::InvalidData { .. })
    ));
    assert!(matches!(
        w.push(&x[1..], &y, None),
        Err(Error::Shape { .. })
    ));
    let cfg = WriterConfig {
        codec: Codec::F16,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(dir.path().join("f16"), DIMS, cfg, ShardMeta::default(), 100)
        .unwrap();
    let (mut x, y) = synth(2, 1);
    x[7] = 1e5;
    assert!(matches!(
        w.push(&x, &y, None),
        Err(Error::InvalidData { .. })
    ));
    // Nothing valid was written: finishing an empty dataset is an error, and no shard file is left behind.
    assert!(matches!(w.finish(), Err(Error::InvalidData { .. })));
    assert_eq!(
        std::fs::read_dir(dir.path().join("f16")).unwrap().count(),
        0
    );
}

fn one_shard(dir: &Path) -> PathBuf {
    write_ds(dir, Codec::Int8, false, 300, 64, 1000);
    dir.join("shard-00000.clts")
}

#[test]
fn truncated_shard_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = one_shard(dir.path());
    let bytes = std::fs::read(&p).unwrap();
    for cut in [0, 10, 63, 64, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        match Shard::open(&p) {
            Err(Error::Format { path, reason, .. }) => {
                assert_eq!(path, p);
                assert!(
                    reason.contains("truncated") || cut > 64,
                    "cut {cut}: {reason}"
                );
            }
            other => panic!("cut {cut}: expected a format error, got {other:?}"),
        }
    }
}

#[test]
fn flipped_byte_in_a_block_names_shard_block_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = one_shard(dir.path());
    // A byte flipped at the start of block 4's frame: the header and index are intact, so the shard opens;
    // reading block 4 fails, naming it, and block 3 still reads.
    let e4 = Shard::open(&p).unwrap().blocks()[4];
    let good = std::fs::read(&p).unwrap();
    let mut bytes = good.clone();
    bytes[(e4.offset + 1) as usize] ^= 0x01;
    std::fs::write(&p, &bytes).unwrap();
    let shard = Shard::open(&p).unwrap();
    let mut r = BlockReader::new().unwrap();
    assert!(r.read(&shard, 3).is_ok());
    match r.read(&shard, 4) {
        Err(Error::Corrupt {
            path,
            block,
            offset,
            ..
        }) => assert_eq!((path, block, offset), (p.clone(), 4, e4.offset)),
        other => panic!("expected a corrupt block, got {:?}", other.map(|_| ())),
    }
    // Near the end of block 2's frame, with `clt store verify`, then the shard truncated.
    std::fs::write(&p, &good).unwrap();
    common::store::assert_damage_is_a_typed_error(dir.path());
}

#[test]
fn flipped_byte_in_header_or_index_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let p = one_shard(dir.path());
    let good = std::fs::read(&p).unwrap();
    let io = u64::from_le_bytes(good[40..48].try_into().unwrap()) as usize;
    for at in [16, 24, 30, 36, 44, io + 3, io + 50, good.len() - 2] {
        let mut b = good.clone();
        b[at] ^= 0x01;
        std::fs::write(&p, &b).unwrap();
        assert!(
            matches!(Shard::open(&p), Err(Error::Format { .. })),
            "flip at {at}"
        );
    }
}

#[test]
fn wrong_magic_and_wrong_version() {
    let dir = tempfile::tempdir().unwrap();
    let p = one_shard(dir.path());
    let good = std::fs::read(&p).unwrap();
    let mut b = good.clone();
    b[0] = b'X';
    std::fs::write(&p, &b).unwrap();
    assert!(
        matches!(Shard::open(&p), Err(Error::Format { offset: 0, ref reason, .. }) if reason.contains("magic"))
    );
    let mut b = good.clone();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(
        matches!(Shard::open(&p), Err(Error::Format { offset: 8, ref reason, .. }) if reason.contains("version"))
    );
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mp = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn manifest_disagreements_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_ds(dir.path(), Codec::Bf16, true, 500, 32, 200);
    assert_eq!(Dataset::open(dir.path()).unwrap().shards().len(), 3);

    // Dims that disagree with the manifest.
    edit_manifest(dir.path(), |m| m["dims"]["d_model"] = 21.into());
    let e = Dataset::open(dir.path()).unwrap_err();
    assert!(
        matches!(&e, Error::Manifest { reason, .. } if reason.contains("shard-00000.clts") && reason.contains("dims")),
        "{e}"
    );
    edit_manifest(dir.path(), |m| m["dims"]["d_model"] = 20.into());
    Dataset::open(dir.path()).unwrap();

    // A shard file present but missing from the manifest.
    std::fs::copy(
        dir.path().join("shard-00001.clts"),
        dir.path().join("shard-00009.clts"),
    )
    .unwrap();
    let e = Dataset::open(dir.path()).unwrap_err();
    assert!(
        matches!(&e, Error::Manifest { reason, .. } if reason.contains("shard-00009.clts")),
        "{e}"
    );
    std::fs::remove_file(dir.path().join("shard-00009.clts")).unwrap();

    // A listed shard missing from the directory.
    std::fs::rename(
        dir.path().join("shard-00002.clts"),
        dir.path().join("elsewhere"),
    )
    .unwrap();
    let e = Dataset::open(dir.path()).unwrap_err();
    assert!(
        matches!(&e, Error::Manifest { reason, .. } if reason.contains("shard-00002.clts")),
        "{e}"
    );
    std::fs::rename(
        dir.path().join("elsewhere"),
        dir.path().join("shard-00002.clts"),
    )
    .unwrap();

    // Token counts that disagree.
    edit_manifest(dir.path(), |m| m["shards"][1]["n_tokens"] = 199.into());
    assert!(matches!(
        Dataset::open(dir.path()),
        Err(Error::Manifest { .. })
    ));
}

/// Loader over a dataset where x[t][0][0] == t exactly (f32 codec), so tokens can be identified.
fn id_dataset(dir: &Path, n: usize, block: usize, shard_tokens: u64) {
    let row = DIMS.n_layers * DIMS.d_model;
    let (mut x, y) = synth(n, 3);
    for t in 0..n {
        x[t * row] = t as f32;
    }
    let cfg = WriterConfig {
        codec: Codec::F32,
        block_tokens: block,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(dir, DIMS, cfg, ShardMeta::default(), shard_tokens).unwrap();
    w.push(&x, &y, None).unwrap();
    w.finish().unwrap();
}

fn ids(b: &Batch) -> Vec<usize> {
    let row = DIMS.n_layers * DIMS.d_model;
    (0..b.n_tokens).map(|i| b.x[i * row] as usize).collect()
}

fn cfg(seed: u64, workers: usize) -> LoaderConfig {
    LoaderConfig {
        seed,
        window_blocks: 3,
        workers,
        prefetch: 2,
        rank: 0,
        world: 1,
    }
}

#[test]
fn loader_covers_each_token_once_per_epoch_and_shuffles() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1003; // last block short
    id_dataset(dir.path(), n, 20, 250);
    let mut l = ShardLoader::open(dir.path(), cfg(11, 2)).unwrap();
    assert_eq!(l.epoch_tokens(0), n as u64);
    let mut b = Batch::default();
    for epoch in 0..2 {
        let mut seen = Vec::new();
        // 17 does not divide 1003: batches span epochs, so take exactly one epoch's worth.
        while seen.len() < n {
            l.next_batch((n - seen.len()).min(17), &mut b).unwrap();
            seen.extend(ids(&b));
        }
        let set: HashSet<_> = seen.iter().copied().collect();
        assert_eq!(set.len(), n, "epoch {epoch}: a token repeated");
        assert!(set.iter().all(|&t| t < n));
        assert_ne!(seen, (0..n).collect::<Vec<_>>(), "not shuffled");
        assert_eq!(l.epoch(), epoch + 1);
    }
}

#[test]
fn loader_is_deterministic_and_independent_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    id_dataset(dir.path(), 700, 16, 200);
    let run = |seed, workers| {
        let mut l = ShardLoader::open(dir.path(), cfg(seed, workers)).unwrap();
        let mut b = Batch::default();
        let mut out = Vec::new();
        for _ in 0..30 {
            l.next_batch(64, &mut b).unwrap();
            out.push((b.x.clone(), b.y.clone()));
        }
        out
    };
    let a = run(5, 0);
    assert_eq!(a, run(5, 0));
    assert_eq!(a, run(5, 1));
    assert_eq!(a, run(5, 3));
    assert_ne!(a, run(6, 2));
}

#[test]
fn restored_loader_yields_bit_identical_batches() {
    let dir = tempfile::tempdir().unwrap();
    id_dataset(dir.path(), 555, 16, 200);
    for workers in [0, 2] {
        let mut l = ShardLoader::open(dir.path(), cfg(9, workers)).unwrap();
        let mut b = Batch::default();
        // Stop at several points: mid-window, at a window boundary, and past an epoch.
        for skip in [0usize, 1, 5, 12, 25] {
            for _ in 0..skip {
                l.next_batch(23, &mut b).unwrap();
            }
            let pos = l.position();
            let json = serde_json::to_string(&pos).unwrap();
            let mut expect = Vec::new();
            for _ in 0..8 {
                l.next_batch(23, &mut b).unwrap();
                expect.push((b.x.clone(), b.y.clone()));
            }
            let mut r = ShardLoader::open(dir.path(), cfg(9, 2 - workers)).unwrap();
            r.restore(&serde_json::from_str(&json).unwrap()).unwrap();
            for e in &expect {
                r.next_batch(23, &mut b).unwrap();
                assert_eq!(e, &(b.x.clone(), b.y.clone()), "skip {skip}: {json}");
            }
            // Continue the original from where the copy is, so positions stay aligned.
            assert_eq!(l.position(), r.position());
        }
        // A position from another seed is refused.
        let mut other = ShardLoader::open(dir.path(), cfg(10, workers)).unwrap();
        assert!(matches!(
            other.restore(&l.position()),
            Err(Error::Source(_))
        ));
    }
}

#[test]
fn loader_batches_ahead_follow_changing_batch_sizes() {
    // With workers, batches are assembled ahead for the last size asked for; another size restarts assembly at
    // the caller's position, so the stream is the same as on the caller's thread.
    let dir = tempfile::tempdir().unwrap();
    id_dataset(dir.path(), 700, 16, 200);
    let sizes = [7usize, 7, 13, 7, 64, 64, 1, 13, 13, 200, 5];
    let run = |workers| {
        let mut l = ShardLoader::open(dir.path(), cfg(3, workers)).unwrap();
        let mut b = Batch::default();
        let mut out = Vec::new();
        for &n in sizes.iter().cycle().take(40) {
            l.next_batch(n, &mut b).unwrap();
            assert_eq!(b.n_tokens, n);
            out.push((ids(&b), b.y.clone(), l.position()));
        }
        out
    };
    let a = run(0);
    assert_eq!(a, run(1));
    assert_eq!(a, run(2));
}

#[test]
fn coded_batches_decode_to_the_f32_batches_in_the_same_stream() {
    // `next_coded` serves the rows `next_batch` would, still quantised: decoded on the host (the device's
    // reference) they are the f32 batches bit for bit, mixed calls share one stream and one position, and
    // the result depends neither on the workers nor on which kind was asked for before.
    for codec in [Codec::Int8, Codec::Int4] {
        let dir = tempfile::tempdir().unwrap();
        write_ds(dir.path(), codec, false, 613, 16, 200);
        let kinds = [
            true, false, true, true, false, false, true, false, true, true,
        ];
        let sizes = [64usize, 64, 13, 64, 1, 64, 200, 7, 7, 64];
        let run = |workers, coded_only: bool| {
            let mut l = ShardLoader::open(dir.path(), cfg(4, workers)).unwrap();
            assert_eq!(l.coded(), Some(codec));
            let (mut b, mut c) = (Batch::default(), clt::data::CodedBatch::default());
            let mut out = Vec::new();
            for (i, (&coded, &n)) in kinds.iter().zip(&sizes).cycle().take(30).enumerate() {
                if coded || coded_only {
                    l.next_coded(n, &mut c).unwrap();
                    assert_eq!((c.n_tokens, c.codec), (n, codec));
                    assert_eq!(c.x.len(), c.section().bytes());
                    c.decode_into(&mut b);
                    // The targets' variance from the codes (per layer, scaled) is the f32 batch's.
                    let scale = [0.5f32, 1.0, 3.0];
                    let mut scaled = b.y.clone();
                    for (r, row) in scaled.chunks_exact_mut(DIMS.d_model).enumerate() {
                        row.iter_mut().for_each(|v| *v *= scale[r % DIMS.n_layers]);
                    }
                    let want = clt::backend::grads::target_variance(
                        &scaled,
                        n,
                        DIMS.n_layers,
                        DIMS.d_model,
                    );
                    let got = c.target_variance(&scale);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{codec:?} batch {i}: target variance"
                    );
                } else {
                    l.next_batch(n, &mut b).unwrap();
                }
                out.push((b.x.clone(), b.y.clone(), l.position()));
            }
            out
        };
        let f32_only = {
            let mut l = ShardLoader::open(dir.path(), cfg(4, 0)).unwrap();
            let mut b = Batch::default();
            sizes
                .iter()
                .cycle()
                .take(30)
                .map(|&n| {
                    l.next_batch(n, &mut b).unwrap();
                    (b.x.clone(), b.y.clone(), l.position())
                })
                .collect::<Vec<_>>()
        };
        for workers in [0, 1, 3] {
            assert_eq!(
                run(workers, false),
                f32_only,
                "{codec:?}, {workers} workers, mixed"
            );
            assert_eq!(
                run(workers, true),
                f32_only,
                "{codec:?}, {workers} workers, coded"
            );
        }
    }
    // Codecs whose rows are not a scale and codes alone are not served coded.
    for codec in [Codec::F32, Codec::Bf16, Codec::Int8p, Codec::Int8e] {
        let dir = tempfile::tempdir().unwrap();
        write_ds(dir.path(), codec, false, 100, 16, 200);
        let mut l = ShardLoader::open(dir.path(), cfg(4, 0)).unwrap();
        assert_eq!(l.coded(), None, "{codec:?}");
        let mut c = clt::data::CodedBatch::default();
        assert!(matches!(
            l.next_coded(8, &mut c),
            Err(Error::Unsupported(_))
        ));
    }
}

#[test]
fn loader_reports_a_corrupt_block_without_hanging_or_moving() {
    let dir = tempfile::tempdir().unwrap();
    id_dataset(dir.path(), 600, 16, 600);
    let path = dir.path().join("shard-00000.clts");
    let shard = clt::store::Shard::open(&path).unwrap();
    let bad = 20; // of 38 blocks
    let e = &shard.blocks()[bad];
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(e.offset + e.comp_len / 2) as usize] ^= 0x10;
    drop(shard);
    std::fs::write(&path, bytes).unwrap();
    for workers in [0, 2] {
        let mut l = ShardLoader::open(dir.path(), cfg(1, workers)).unwrap();
        let mut b = Batch::default();
        let mut last = l.position();
        let err = loop {
            match l.next_batch(16, &mut b) {
                Ok(()) => last = l.position(),
                Err(e) => break e,
            }
        };
        match &err {
            Error::Corrupt { path: p, block, .. } => {
                assert_eq!(p, &path);
                assert_eq!(*block, bad as u64);
            }
            other => panic!("workers {workers}: expected a corrupt-block error, got {other}"),
        }
        // The failed call did not move the stream; asking again reports the same block again.
        assert_eq!(l.position(), last, "workers {workers}");
        assert!(
            matches!(l.next_batch(16, &mut b), Err(Error::Corrupt { block, .. }) if block == bad as u64)
        );
        assert_eq!(l.position(), last);
    }
}

#[test]
fn partitions_are_disjoint_and_cover_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let n = 640;
    id_dataset(dir.path(), n, 16, 160);
    let world = 3;
    let mut all = Vec::new();
    for rank in 0..world {
        let c = LoaderConfig {
            rank,
            world,
            ..cfg(4, 1)
        };
        let mut l = ShardLoader::open(dir.path(), c).unwrap();
        let k = l.epoch_tokens(0) as usize;
        let mut b = Batch::default();
        l.next_batch(k, &mut b).unwrap();
        all.extend(ids(&b));
    }
    let set: HashSet<_> = all.iter().copied().collect();
    assert_eq!(all.len(), n);
    assert_eq!(set.len(), n);
    let bad = LoaderConfig {
        rank: 3,
        world: 3,
        ..cfg(4, 1)
    };
    assert!(matches!(
        ShardLoader::open(dir.path(), bad),
        Err(Error::Config { .. })
    ));
}

fn valid_shard_bytes() -> Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            write_ds(dir.path(), Codec::Int4, false, 100, 16, 1000);
            std::fs::read(dir.path().join("shard-00000.clts")).unwrap()
        })
        .clone()
}

/// Recomputes the header checksum of a (mutated) shard where the header's lengths allow it, so that the parser's
/// index and metadata validation is reached rather than stopping at the checksum.
fn fix_checksum(b: &mut [u8]) {
    if b.len() < format::PREFIX_LEN {
        return;
    }
    let io = u64::from_le_bytes(b[40..48].try_into().unwrap()) as u128;
    let nb = u32::from_le_bytes(b[36..40].try_into().unwrap()) as u128;
    let ml = u32::from_le_bytes(b[48..52].try_into().unwrap()) as u128;
    let ie = io + nb * format::INDEX_ENTRY_LEN as u128;
    if io < 64 || ie + ml != b.len() as u128 {
        return;
    }
    let (io, ie) = (io as usize, ie as usize);
    let sum = format::header_checksum(&b[..56], &b[io..ie], &b[ie..]);
    b[56..64].copy_from_slice(&sum.to_le_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Stand-in for the cargo-fuzz target: mutated headers and indexes never panic the parser.
    #[test]
    fn parser_never_panics_on_mutated_shards(
        edits in proptest::collection::vec((0usize..2048, any::<u8>()), 0..8),
        cut in proptest::option::of(0usize..4096),
        fix in any::<bool>(),
    ) {
        let mut b = valid_shard_bytes();
        let len = b.len();
        for (at, v) in edits {
            b[at % len] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.min(len));
        }
        if fix {
            fix_checksum(&mut b);
        }
        let _ = format::parse(&b, Path::new("fuzz.clts"));
    }

    #[test]
    fn parser_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        let mut b = bytes;
        if magic && b.len() >= 12 {
            b[0..8].copy_from_slice(&format::MAGIC);
            b[8..12].copy_from_slice(&format::VERSION.to_le_bytes());
        }
        let _ = format::parse(&b, Path::new("fuzz.clts"));
    }
}

fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let shape_s = match shape {
        [n] => format!("({n},)"),
        s => format!(
            "({})",
            s.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(data);
    std::fs::write(path, b).unwrap();
}

fn encode_args(codec: Codec) -> clt::store::cli::EncodeArgs {
    clt::store::cli::EncodeArgs {
        codec,
        no_byte_planes: false,
        block_tokens: 32,
        shard_tokens: 100,
        zstd_level: 3,
        threads: 1,
        outlier_dims: 8,
        target_rel_err: None,
    }
}

#[test]
fn import_npy_and_clt_forge_then_convert() {
    use clt::store::cli::{StoreCommand, convert, import, run, verify};
    use clt::store::import::ImportSource;
    let dir = tempfile::tempdir().unwrap();
    let n = 150;
    let (x, y) = synth(n, 21);
    let shape = [n, DIMS.n_layers, DIMS.d_model];
    let f32s = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let toks: Vec<i64> = (0..n as i64).map(|t| t * 3).collect();
    let tok_bytes: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();

    // .npy: f32 inputs, f16 targets, i64 tokens.
    let y16: Vec<u8> = y
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    write_npy(&dir.path().join("x.npy"), "<f4", &shape, &f32s(&x));
    write_npy(&dir.path().join("y.npy"), "<f2", &shape, &y16);
    write_npy(&dir.path().join("t.npy"), "<i8", &[n], &tok_bytes);
    let src = ImportSource::npy(
        &dir.path().join("x.npy"),
        &dir.path().join("y.npy"),
        Some(&dir.path().join("t.npy")),
    )
    .unwrap();
    let out = dir.path().join("from-npy");
    let m = import(&[src], &out, &encode_args(Codec::F32), "m").unwrap();
    assert_eq!((m.n_tokens, m.shards.len()), (n as u64, 2));
    let (rx, ry, rt, _, _) = read_all(&out);
    assert_eq!(rx, x);
    assert!(
        ry.iter()
            .zip(&y)
            .all(|(a, b)| (a - b).abs() <= b.abs() * 1e-3 + 1e-4)
    );
    assert_eq!(rt, (0..n as u32).map(|t| t * 3).collect::<Vec<_>>());

    // CLT-Forge split: two files appended, tokens as I64.
    let xb = f32s(&x);
    let yb = f32s(&y);
    let mut files = Vec::new();
    for (i, half_range) in [(0, 0..80), (1, 80..n)].into_iter() {
        let row = DIMS.n_layers * DIMS.d_model * 4;
        let (a, b) = (half_range.start, half_range.end);
        let sh = vec![b - a, DIMS.n_layers, DIMS.d_model];
        let views = vec![
            (
                "act_in",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    sh.clone(),
                    &xb[a * row..b * row],
                )
                .unwrap(),
            ),
            (
                "act_out",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    sh,
                    &yb[a * row..b * row],
                )
                .unwrap(),
            ),
            (
                "tokens",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::I64,
                    vec![b - a],
                    &tok_bytes[a * 8..b * 8],
                )
                .unwrap(),
            ),
        ];
        let p = dir.path().join(format!("split{i}.safetensors"));
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
        files.push(p);
    }
    let out2 = dir.path().join("from-forge");
    run(StoreCommand::Import {
        format: clt::store::cli::ImportFormat::CltForge,
        out: out2.clone(),
        x: None,
        y: None,
        tokens: None,
        files: files.clone(),
        model: "forge".into(),
        encode: encode_args(Codec::Bf16),
    })
    .unwrap();
    assert_eq!(verify(&out2).unwrap().tokens, n as u64);
    let (fx, _, ft, _, _) = read_all(&out2);
    assert!(
        fx.iter()
            .zip(&x)
            .all(|(a, b)| (a - b).abs() <= b.abs() / 256.0)
    );
    assert_eq!(ft, rt);

    // A split missing `act_out` is a typed error naming the tensor.
    let bad = dir.path().join("bad.safetensors");
    let v =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 3, 20], &xb[..240])
            .unwrap();
    std::fs::write(
        &bad,
        safetensors::serialize(vec![("act_in", v)], None).unwrap(),
    )
    .unwrap();
    assert!(
        matches!(ImportSource::clt_forge(&bad), Err(Error::Tensor { ref tensor, .. }) if tensor == "act_out")
    );
    // A truncated .npy is a format error.
    let b = std::fs::read(dir.path().join("x.npy")).unwrap();
    std::fs::write(dir.path().join("x.npy"), &b[..b.len() - 5]).unwrap();
    let src =
        ImportSource::npy(&dir.path().join("x.npy"), &dir.path().join("y.npy"), None).unwrap();
    let e = import(
        &[src],
        &dir.path().join("trunc"),
        &encode_args(Codec::F32),
        "",
    )
    .unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");

    // Convert f32 -> int8 keeps ids and stays within the int8 bound.
    let out3 = dir.path().join("int8");
    let m = convert(&out, &out3, &encode_args(Codec::Int8)).unwrap();
    assert_eq!(m.codec, Codec::Int8);
    let (cx, _, ct, _, _) = read_all(&out3);
    assert_eq!(ct, rt);
    for (ro, rb) in x.chunks(DIMS.d_model).zip(cx.chunks(DIMS.d_model)) {
        let absmax = ro.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            ro.iter()
                .zip(rb)
                .all(|(a, b)| (a - b).abs() <= absmax / 254.0 * 1.0001)
        );
    }
    run(StoreCommand::Inspect {
        path: out3.clone(),
        blocks: true,
    })
    .unwrap();
    run(StoreCommand::Verify { path: out3 }).unwrap();
}

#[test]
fn int8o_rejects_bad_outlier_indices_without_panicking() {
    use clt::store::codec::Section;
    let sec = Section {
        codec: Codec::Int8o,
        planes: false,
        rows: 4,
        d: 8,
        layers: 2,
        outliers: 2,
    };
    let (x, _) = synth(1, 5);
    let src: Vec<f32> = x[..32].to_vec();
    let mut enc = Vec::new();
    sec.encode(&src, &mut enc);
    assert!(sec.validate(&enc).is_ok());
    // Index 0 of layer 1 pointing past d, then a repeated index: both refused; decoding still does not panic.
    for bad in [[200u8, 0], [0, 0]] {
        let mut e = enc.clone();
        e[4..6].copy_from_slice(&bad);
        e[6..8].copy_from_slice(&[0, 0]);
        assert!(sec.validate(&e).is_err());
        let mut out = vec![0f32; 32];
        sec.decode_rows(&e, 0, &mut out);
    }
}

#[test]
fn unfinished_shard_leaves_nothing_under_its_name() {
    use clt::store::ShardWriter;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.clts");
    let mut w =
        ShardWriter::create(&p, DIMS, WriterConfig::default(), ShardMeta::default()).unwrap();
    let (x, y) = synth(3000, 2);
    w.push(&x, &y, None).unwrap();
    drop(w); // as if the process stopped before finish()
    assert!(!p.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The fuzz target's seed (`fuzz/seeds/shard_header/minimal.clts`, a 3-token shard of 2 blocks) is a valid shard
/// of the current format, so fuzzing starts from inputs that get past the magic and version. After a format
/// change, rewrite it with `CLT_WRITE_FUZZ_SEEDS=1 cargo test --release --test store fuzz_seed`.
#[test]
fn fuzz_seed_is_a_valid_minimal_shard() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/shard_header/minimal.clts");
    if std::env::var_os("CLT_WRITE_FUZZ_SEEDS").is_some() {
        let dir = tempfile::tempdir().unwrap();
        let dims = ActDims {
            n_layers: 2,
            d_model: 2,
        };
        let cfg = WriterConfig {
            codec: Codec::Int8,
            block_tokens: 2,
            threads: 1,
            ..Default::default()
        };
        let mut w =
            DatasetWriter::create(dir.path(), dims, cfg, ShardMeta::default(), 100).unwrap();
        let v = [
            0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75, 0.0, 3.0, -2.0, 1.0, 0.5, 0.125,
        ];
        let ids = TokenIds {
            tokens: &[1, 2, 3],
            positions: &[0, 1, 2],
            doc_ids: &[0, 0, 0],
        };
        w.push(&v, &v, Some(ids)).unwrap();
        w.finish().unwrap();
        std::fs::create_dir_all(seed.parent().unwrap()).unwrap();
        std::fs::copy(dir.path().join("shard-00000.clts"), &seed).unwrap();
    }
    let bytes = std::fs::read(&seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
    let parsed = format::parse(&bytes, &seed).unwrap_or_else(|e| {
        panic!("the fuzz seed no longer parses ({e}); rewrite it (see this test's doc)")
    });
    assert_eq!(parsed.blocks.len(), 2);
    assert!(bytes.len() < 4096, "a seed is kept short for the fuzzer");
}

/// The seeds of the `shard_blocks` fuzz target (`fuzz/seeds/shard_blocks/`): one 5-token shard of blocks of 2
/// per codec, each still a valid shard whose blocks decode to its data within the codec's error, so that
/// fuzzing starts from blocks every codec's decoder reads. Rewrite them with
/// `CLT_WRITE_FUZZ_SEEDS=1 cargo test --release --test store fuzz_seed`.
#[test]
fn block_fuzz_seeds_are_valid_shards_of_every_codec() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/shard_blocks");
    let (x, y) = synth(5, 3);
    for codec in Codec::ALL {
        let seed = dir.join(format!("{}.clts", codec.name()));
        if std::env::var_os("CLT_WRITE_FUZZ_SEEDS").is_some() {
            let tmp = tempfile::tempdir().unwrap();
            let cfg = WriterConfig {
                codec,
                block_tokens: 2,
                threads: 1,
                outlier_dims: 2,
                ..Default::default()
            };
            let mut w =
                DatasetWriter::create(tmp.path(), DIMS, cfg, ShardMeta::default(), 100).unwrap();
            w.push(&x, &y, None).unwrap();
            w.finish().unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(tmp.path().join("shard-00000.clts"), &seed).unwrap();
        }
        let shard = Shard::open(&seed).unwrap_or_else(|e| {
            panic!("{}: {e} (rewrite it: see this test's doc)", seed.display())
        });
        assert_eq!(shard.header().codec, codec);
        assert_eq!((shard.blocks().len(), shard.n_tokens()), (3, 5));
        let mut reader = BlockReader::new().unwrap();
        let td = DIMS.n_layers * DIMS.d_model;
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for b in 0..3 {
            let block = reader.read(&shard, b).unwrap();
            let (mut bx, mut by) = (
                vec![0.0; block.n_tokens() * td],
                vec![0.0; block.n_tokens() * td],
            );
            block.xy_rows(0, &mut bx, &mut by);
            xs.extend(bx);
            ys.extend(by);
        }
        let rel = |a: &[f32], b: &[f32]| {
            let e: f32 = a.iter().zip(b).map(|(p, q)| (p - q).powi(2)).sum();
            e / b.iter().map(|q| q * q).sum::<f32>()
        };
        // int4 has 15 levels per row (and rows here hold a 30× outlier); the others at least 255.
        let tol = if codec == Codec::Int4 { 0.05 } else { 0.01 };
        let (ex, ey) = (rel(&xs, &x), rel(&ys, &y));
        assert!(ex < tol && ey < tol, "{}: {ex} {ey}", codec.name());
        let bytes = std::fs::metadata(&seed).unwrap().len();
        assert!(
            bytes < 8192,
            "{}: {bytes} bytes; a seed is kept short",
            seed.display()
        );
    }
}
