//! Shared helpers for the store's tests: reading a dataset back through the block reader, checking that every
//! decode path gives the same bits, that a damaged shard is a typed error, and that cached rows are the
//! model's hooks.

use std::collections::HashMap;
use std::path::Path;

use clt::Error;
use clt::data::{ActDims, ActivationSource, Batch};
use clt::store::format::ShardMeta;
use clt::store::{
    BlockReader, Dataset, DatasetWriter, LoaderConfig, Manifest, Shard, ShardLoader, TokenIds,
    WriterConfig,
};

use super::SplitMix;

/// The bit patterns of `v` (exact comparison, NaN-safe).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Inputs `[n][L·d]`, targets, token ids, positions and document ids of a whole dataset, in order.
pub type Contents = (Vec<f32>, Vec<f32>, Vec<u32>, Vec<u32>, Vec<u64>);

/// Decodes every block of the dataset at `dir` in order, through `x_rows` then `y_rows` (`split`) or
/// `xy_rows`; with the number of 4-byte values in the blocks' tails (int8e's escapes; 0 for the other
/// codecs).
fn decode_all(dir: &Path, split: bool) -> (Contents, usize) {
    let ds = Dataset::open(dir).unwrap();
    let row = ds.dims().n_layers * ds.dims().d_model;
    let mut r = BlockReader::new().unwrap();
    let (mut x, mut y, mut t, mut p, mut d) = (vec![], vec![], vec![], vec![], vec![]);
    let mut tail = 0;
    for s in ds.shards() {
        for b in 0..s.blocks().len() {
            let blk = r.read(s, b).unwrap();
            tail += blk.layout.tail / 4;
            let mut bx = vec![0f32; blk.n_tokens() * row];
            let mut by = bx.clone();
            if split {
                blk.x_rows(0, &mut bx);
                blk.y_rows(0, &mut by);
            } else {
                blk.xy_rows(0, &mut bx, &mut by);
            }
            x.extend(bx);
            y.extend(by);
            t.extend(blk.tokens());
            p.extend(blk.positions());
            d.extend(blk.doc_ids());
        }
    }
    ((x, y, t, p, d), tail)
}

/// The whole dataset at `dir`, read back in order.
pub fn read_all(dir: &Path) -> Contents {
    decode_all(dir, true).0
}

/// The inputs and targets of every block of the dataset at `dir`, decoded through `x_rows` then `y_rows`
/// (`split`) or `xy_rows`, and the number of 4-byte values in the blocks' tails.
pub fn read_blocks(dir: &Path, split: bool) -> (Vec<f32>, Vec<f32>, usize) {
    let ((x, y, ..), tail) = decode_all(dir, split);
    (x, y, tail)
}

/// Checks that the dataset at `dir` (cached from `model`, reading `hook`) begins with the context `ctx` of
/// document 0 from position `first` on (the positions before it, a BOS, are not cached): each row is the
/// forward's input hook and MLP output at that token, bit for bit.
pub fn assert_cached_as_hooks(
    model: &clt::model::Model,
    dir: &Path,
    hook: clt::cache::InputHook,
    ctx: &[u32],
    first: usize,
) {
    use clt::model::{ForwardOptions, Hooks, Logits};
    let (x, y, tokens, positions, docs) = read_all(dir);
    let opts = ForwardOptions {
        hooks: Hooks {
            mlp_out: true,
            ..hook.hooks()
        },
        logits: Logits::None,
        ..Default::default()
    };
    let out = model.forward_with(ctx, &opts).unwrap();
    let (l_n, d) = (model.n_layers(), model.d_model());
    for p in first..ctx.len() {
        let i = p - first;
        assert_eq!(
            (tokens[i], positions[i], docs[i]),
            (ctx[p], p as u32, 0),
            "row {i}"
        );
        for (l, r) in out.record.layers.iter().enumerate() {
            let at = i * l_n * d + l * d;
            let xin = &hook.recorded(r).unwrap()[p * d..(p + 1) * d];
            let yout = &r.mlp_out.as_ref().unwrap()[p * d..(p + 1) * d];
            assert_eq!(&x[at..at + d], xin, "x at position {p}, layer {l}");
            assert_eq!(&y[at..at + d], yout, "y at position {p}, layer {l}");
        }
    }
}

/// Checks that the dataset at `dir` (blocks of `block` tokens, at least two in the first shard and 300 tokens in
/// all) decodes to `x1`/`y1` (what [`read_blocks`] gave) token by token from the middle of its second block, as
/// the loader reads it, and that the shuffling loader delivers exactly those rows, each token's x with its y.
pub fn assert_rows_and_loader_agree(dir: &Path, x1: &[f32], y1: &[f32], block: usize) {
    let ds = Dataset::open(dir).unwrap();
    let row = ds.dims().n_layers * ds.dims().d_model;
    let mut r = BlockReader::new().unwrap();
    let blk = r.read(&ds.shards()[0], 1).unwrap();
    for t in [0, 17, block - 1] {
        let (mut tx, mut ty) = (vec![0f32; row], vec![0f32; row]);
        blk.xy_rows(t, &mut tx, &mut ty);
        let g = (block + t) * row;
        assert_eq!(bits(&tx), bits(&x1[g..g + row]), "token {t}: x");
        assert_eq!(bits(&ty), bits(&y1[g..g + row]), "token {t}: y");
        blk.y_rows(t, &mut ty);
        assert_eq!(bits(&ty), bits(&y1[g..g + row]), "token {t}: y alone");
    }
    let by_x: HashMap<Vec<u32>, Vec<u32>> = x1
        .chunks(row)
        .zip(y1.chunks(row))
        .map(|(a, b)| (bits(a), bits(b)))
        .collect();
    let cfg = LoaderConfig {
        seed: 3,
        window_blocks: 2,
        workers: 1,
        prefetch: 2,
        rank: 0,
        world: 1,
    };
    let mut l = ShardLoader::open(dir, cfg).unwrap();
    let mut batch = Batch::default();
    l.next_batch(300, &mut batch).unwrap();
    for (bx, byy) in batch.x.chunks(row).zip(batch.y.chunks(row)) {
        assert_eq!(by_x.get(&bits(bx)), Some(&bits(byy)));
    }
}

/// In the one-shard dataset at `dir` (at least 3 blocks): a byte flipped near the end of block 2's frame makes
/// reading block 2 a `Corrupt` error naming the shard, the block and its offset (block 1 still reads), and
/// `clt store verify` reports the same block; the shard cut 5 bytes short is a `Format` error naming it. Leaves
/// the shard truncated.
pub fn assert_damage_is_a_typed_error(dir: &Path) {
    let p = dir.join("shard-00000.clts");
    let good = std::fs::read(&p).unwrap();
    let e = Shard::open(&p).unwrap().blocks()[2];
    let mut bad = good.clone();
    bad[(e.offset + e.comp_len - 3) as usize] ^= 0x40;
    std::fs::write(&p, &bad).unwrap();
    let shard = Shard::open(&p).unwrap();
    let mut r = BlockReader::new().unwrap();
    assert!(r.read(&shard, 1).is_ok());
    match r.read(&shard, 2) {
        Err(Error::Corrupt {
            path,
            block,
            offset,
            ..
        }) => assert_eq!((path, block, offset), (p.clone(), 2, e.offset)),
        other => panic!("expected a corrupt block, got {:?}", other.map(|_| ())),
    }
    let err = clt::store::cli::verify(dir).unwrap_err();
    assert!(matches!(err, Error::Corrupt { block: 2, .. }), "{err}");
    std::fs::write(&p, &good[..good.len() - 5]).unwrap();
    assert!(matches!(Shard::open(&p), Err(Error::Format { path, .. }) if path == p));
}

/// A toy residual stream: per token a state h; layer l's input is h normalised by its RMS times a per-(layer, dim)
/// gain, its output a small random update added to h (with some attention-like noise). Inputs are strongly
/// correlated across layers and each output is nearly a combination of the next and the same layer's input.
pub fn residual_stream(r: &mut SplitMix, n: usize, dims: ActDims) -> (Vec<f32>, Vec<f32>) {
    let (l_n, d) = (dims.n_layers, dims.d_model);
    let gain: Vec<f32> = (0..l_n * d).map(|_| 0.5 + r.unit() * 2.0).collect();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let mut h: Vec<f32> = (0..d)
            .map(|j| r.normal() * if j == 3 { 20.0 } else { 3.0 })
            .collect();
        for l in 0..l_n {
            let rms = (h.iter().map(|v| v * v).sum::<f32>() / d as f32).sqrt();
            x.extend(h.iter().enumerate().map(|(j, v)| v / rms * gain[l * d + j]));
            let upd: Vec<f32> = (0..d).map(|_| 0.4 * r.normal()).collect();
            for (hv, u) in h.iter_mut().zip(&upd) {
                *hv += u + 0.05 * r.normal();
            }
            y.extend(upd);
        }
    }
    (x, y)
}

/// Writes `x`, `y` as a dataset at `dir` under `cfg` (500 tokens per shard) with token ids and positions `0..n`
/// and document id 7, and returns its manifest.
pub fn write_with_ids(
    dir: &Path,
    dims: ActDims,
    cfg: WriterConfig,
    x: &[f32],
    y: &[f32],
) -> Manifest {
    let mut w = DatasetWriter::create(dir, dims, cfg, ShardMeta::default(), 500).unwrap();
    let n = x.len() / (dims.n_layers * dims.d_model);
    let t: Vec<u32> = (0..n as u32).collect();
    let ids = TokenIds {
        tokens: &t,
        positions: &t,
        doc_ids: &vec![7; n],
    };
    w.push(x, y, Some(ids)).unwrap();
    w.finish().unwrap()
}

/// Writes `n_tokens` of `run`'s synthetic data (its `[data]` must be synthetic) as a store of `codec` in
/// blocks of 64 tokens and shards of `shard_tokens` under `dir`, and points `run` at it (seed 3, windows
/// of 2 blocks, one worker): the CUDA trainers' tests of batches staged as the store's codes.
pub fn synthetic_store(
    run: &mut clt::train::RunConfig,
    dir: &Path,
    codec: clt::store::Codec,
    n_tokens: usize,
    shard_tokens: u64,
) {
    use clt::train::config::{DataConfig, StoreDataConfig};
    let dims = ActDims {
        n_layers: run.model.n_layers,
        d_model: run.model.d_model,
    };
    let DataConfig::Synthetic(syn) = &run.data else {
        panic!("synthetic_store needs a synthetic [data] to write")
    };
    let mut source = clt::data::synthetic::SyntheticGenerator::new(dims, syn.clone());
    let mut batch = Batch::default();
    source.next_batch(n_tokens, &mut batch).unwrap();
    let cfg = WriterConfig {
        codec,
        block_tokens: 64,
        ..Default::default()
    };
    let mut w = DatasetWriter::create(dir, dims, cfg, ShardMeta::default(), shard_tokens).unwrap();
    w.push(&batch.x, &batch.y, None).unwrap();
    w.finish().unwrap();
    run.data = DataConfig::Store(StoreDataConfig {
        path: dir.to_path_buf(),
        seed: 3,
        window_blocks: 2,
        workers: 1,
        prefetch: 2,
    });
}

/// Caches 12 tokens of a corpus of a's and b's (contexts of 8, no BOS: the toy `tokenizer.json` of
/// [`super::hf::write_toy_tokenizer`]) from `m` into `dir/store`, reading `hook`, and checks the first
/// context's rows are the model's hooks at every position, position 0 included, and that `cache.json`
/// names the hook and the model's norm.
pub fn toy_corpus_caches_as_hooks(
    m: &clt::model::LoadedModel,
    dir: &Path,
    hook: clt::cache::InputHook,
) {
    use clt::cache::{CacheConfig, cache};
    use clt::store::Codec;
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, "abababbaababaabbababab\n\nbbbaaabababbbab\n").unwrap();
    let out = dir.join("store");
    let cfg = CacheConfig {
        corpus: vec![corpus.clone()],
        column: None,
        skip_documents: 0,
        out: out.clone(),
        context: 8,
        max_tokens: Some(12),
        input_hook: hook,
        codec: Codec::F32,
        target_rel_err: None,
        shard_tokens: 1 << 20,
        contexts_per_batch: 2,
        quiet: true,
    };
    let rec = cache(m, &cfg).unwrap();
    assert_eq!(rec.n_tokens, 12);
    let text = std::fs::read_to_string(out.join("cache.json")).unwrap();
    let written: clt::cache::CacheRecord = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (written.input_hook, written.norm, &written.hooks_in[1]),
        (hook, Some(m.model.norm()), &hook.hook_name(1))
    );
    let docs = clt::cache::read_documents(&[corpus]).unwrap();
    let ids = m.tokenizer.encode(docs[0].as_text().unwrap()).unwrap();
    assert_cached_as_hooks(&m.model, &out, hook, &ids[..8], 0);
}
