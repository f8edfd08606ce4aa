//! The real pipeline on the stories260K fixture: caching writes exactly the model's activations, resumes
//! after an interruption, and the cached store trains a CLT.

use clt::cache::{CacheConfig, InputHook, cache};
use clt::model::{ForwardOptions, Hooks, Logits};
use clt::store::{BlockReader, Codec, Dataset};
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        p.is_dir(),
        "../shared is missing: these tests need the stories260K fixture and the corpus"
    );
    p
}

fn model() -> clt::model::LoadedModel {
    let s = shared();
    clt::model::load(
        &s.join("models/stories260K/stories260K.bin"),
        Some(&s.join("models/stories260K/tok512.bin")),
    )
    .unwrap()
}

fn config(out: &Path, max_tokens: u64, codec: Codec, shard_tokens: u64) -> CacheConfig {
    CacheConfig {
        corpus: vec![shared().join("corpus/tinystories_valid_head.txt")],
        out: out.to_path_buf(),
        context: 64,
        max_tokens: Some(max_tokens),
        input_hook: InputHook::MlpInNormed,
        codec,
        target_rel_err: None,
        shard_tokens,
        contexts_per_batch: 8,
        quiet: true,
    }
}

/// One cached token: (token id, position, doc id, x row, y row).
type CachedToken = (u32, u32, u64, Vec<f32>, Vec<f32>);

/// Every token of a dataset.
fn read_all(dir: &Path) -> Vec<CachedToken> {
    let ds = Dataset::open(dir).unwrap();
    let row = ds.dims().n_layers * ds.dims().d_model;
    let mut reader = BlockReader::new().unwrap();
    let mut out = Vec::new();
    for shard in ds.shards() {
        for b in 0..shard.blocks().len() {
            let block = reader.read(shard, b).unwrap();
            let n = block.n_tokens();
            let mut x = vec![0.0; n * row];
            let mut y = vec![0.0; n * row];
            block.x_rows(0, &mut x);
            block.y_rows(0, &mut y);
            let toks: Vec<u32> = block.tokens().collect();
            let pos: Vec<u32> = block.positions().collect();
            let docs: Vec<u64> = block.doc_ids().collect();
            for t in 0..n {
                out.push((
                    toks[t],
                    pos[t],
                    docs[t],
                    x[t * row..(t + 1) * row].to_vec(),
                    y[t * row..(t + 1) * row].to_vec(),
                ));
            }
        }
    }
    out
}

#[test]
fn cached_activations_are_the_models_hooks() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let rec = cache(&m, &config(dir.path(), 300, Codec::F32, 1 << 20)).unwrap();
    assert_eq!(rec.n_tokens, 300);
    let rows = read_all(dir.path());
    assert_eq!(rows.len(), 300);
    // The first document's first context, run directly.
    let docs =
        clt::cache::read_documents(&[shared().join("corpus/tinystories_valid_head.txt")]).unwrap();
    let ids = m.tokenizer.encode(&docs[0]).unwrap();
    let ctx = &ids[..64.min(ids.len())];
    let opts = ForwardOptions {
        hooks: Hooks {
            mlp_in_normed: true,
            mlp_out: true,
            ..Hooks::default()
        },
        logits: Logits::None,
        ..Default::default()
    };
    let out = m.model.forward_with(ctx, &opts).unwrap();
    let (l_n, d) = (m.model.n_layers(), m.model.d_model());
    for p in 1..ctx.len() {
        let (tok, pos, doc, x, y) = &rows[p - 1]; // BOS (position 0) is not cached
        assert_eq!((*tok, *pos, *doc), (ctx[p], p as u32, 0));
        for l in 0..l_n {
            let xin = &out.record.layers[l].mlp_in_normed.as_ref().unwrap()[p * d..(p + 1) * d];
            let yout = &out.record.layers[l].mlp_out.as_ref().unwrap()[p * d..(p + 1) * d];
            assert_eq!(&x[l * d..(l + 1) * d], xin, "x at position {p}, layer {l}");
            assert_eq!(&y[l * d..(l + 1) * d], yout, "y at position {p}, layer {l}");
        }
    }
}

#[test]
fn interrupted_cache_resumes_to_the_same_dataset() {
    let m = model();
    let full = tempfile::tempdir().unwrap();
    cache(&m, &config(full.path(), 2500, Codec::Int8, 1000)).unwrap();
    let want = read_all(full.path());
    assert_eq!(want.len(), 2500);

    // An interruption after two complete shards: no manifest, no third shard.
    let part = tempfile::tempdir().unwrap();
    cache(&m, &config(part.path(), 2500, Codec::Int8, 1000)).unwrap();
    for f in ["manifest.json", "cache.json", "shard-00002.clts"] {
        std::fs::remove_file(part.path().join(f)).unwrap();
    }
    let rec = cache(&m, &config(part.path(), 2500, Codec::Int8, 1000)).unwrap();
    assert_eq!(rec.n_tokens, 2500);
    let got = read_all(part.path());
    assert!(
        got == want,
        "the resumed dataset differs from the uninterrupted one"
    );
    // A finished dataset is left alone.
    assert_eq!(
        cache(&m, &config(part.path(), 2500, Codec::Int8, 1000))
            .unwrap()
            .n_tokens,
        2500
    );
}

#[test]
fn the_real_pipeline_trains_a_clt_from_cached_stories260k_activations() {
    let out = tempfile::tempdir().unwrap();
    let mut demo = clt::demo::StoriesDemo::from_shared(&shared(), out.path());
    demo.train_tokens = 20_000;
    demo.steps = 300;
    demo.quiet = true;
    let r = clt::demo::run_stories(&demo).unwrap();
    assert_eq!(r.cached_tokens, 20_000);
    eprintln!(
        "NMSE {:.4} per layer {:?}, L0 {:?}",
        r.eval.nmse, r.eval.nmse_per_layer, r.eval.l0_per_layer
    );
    assert!(
        r.eval.nmse < 0.5,
        "a CLT trained on real activations should explain most of the variance: {:?}",
        r.eval
    );
    assert!(r.eval.l0_per_layer.iter().all(|l| *l > 0.0 && *l < 512.0));
    assert!(r.export.join("W_dec_4.safetensors").exists());
    let back = clt::clt::export::import_circuit_tracer(&r.export).unwrap();
    assert_eq!(back.cfg.n_layers, 5);
}
