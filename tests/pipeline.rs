//! The real pipeline on the stories260K fixture: caching writes exactly the model's activations, resumes
//! after an interruption, and the cached store trains a CLT.

mod common;

use clt::cache::{CacheConfig, InputHook, cache};
use clt::store::Codec;
use common::store::{assert_cached_as_hooks, read_all};
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

#[test]
fn cached_activations_are_the_models_hooks() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let rec = cache(&m, &config(dir.path(), 300, Codec::F32, 1 << 20)).unwrap();
    assert_eq!(rec.n_tokens, 300);
    assert_eq!(read_all(dir.path()).2.len(), 300);
    // The first document's first context, run directly.
    let docs =
        clt::cache::read_documents(&[shared().join("corpus/tinystories_valid_head.txt")]).unwrap();
    let ids = m.tokenizer.encode(&docs[0]).unwrap();
    let ctx = &ids[..64.min(ids.len())];
    // BOS (position 0) is not cached.
    assert_cached_as_hooks(&m.model, dir.path(), InputHook::MlpInNormed, ctx, 1);
}

#[test]
fn interrupted_cache_resumes_to_the_same_dataset() {
    let m = model();
    let full = tempfile::tempdir().unwrap();
    let whole = cache(&m, &config(full.path(), 2500, Codec::Int8, 1000)).unwrap();
    let want = read_all(full.path());
    assert_eq!(want.2.len(), 2500);

    // An interruption after two complete shards: no manifest, no third shard.
    let part = tempfile::tempdir().unwrap();
    cache(&m, &config(part.path(), 2500, Codec::Int8, 1000)).unwrap();
    for f in ["manifest.json", "cache.json", "shard-00002.clts"] {
        std::fs::remove_file(part.path().join(f)).unwrap();
    }
    let rec = cache(&m, &config(part.path(), 2500, Codec::Int8, 1000)).unwrap();
    assert_eq!(rec.n_tokens, 2500);
    // Only the contexts past the two complete shards are run again: those of 500 of the 2,500 tokens
    // (a fifth of the contexts, give or take a context cut by a shard's end).
    assert!(
        rec.contexts_run > 0 && rec.contexts_run * 3 < whole.contexts_run,
        "resumed: {} contexts run, whole: {}",
        rec.contexts_run,
        whole.contexts_run
    );
    let got = read_all(part.path());
    assert!(
        got == want,
        "the resumed dataset differs from the uninterrupted one"
    );
    // A finished dataset is left alone.
    let again = cache(&m, &config(part.path(), 2500, Codec::Int8, 1000)).unwrap();
    assert_eq!((again.n_tokens, again.contexts_run), (2500, 0));
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
    // The run's store is found from its checkpoint: `clt export` names its hook as circuit-tracer does,
    // and the export reads back as the hook the CLT was trained on.
    assert_eq!(
        clt::attribution::exported_input_hook(&r.checkpoint).unwrap(),
        Some("mlp.hook_in".to_string())
    );
    let yaml = std::fs::read_to_string(r.export.join("config.yaml")).unwrap();
    assert!(yaml.contains("feature_input_hook: mlp.hook_in\n"), "{yaml}");
    let norm = clt::attribution::linear::NormKind::Rms;
    let lt = clt::attribution::load_transcoder(&r.export, None, norm).unwrap();
    assert_eq!(lt.input_hook, InputHook::MlpInNormed);
    let lt = clt::attribution::load_transcoder(&r.checkpoint, None, norm).unwrap();
    assert_eq!(lt.input_hook, InputHook::MlpInNormed);
    // A sharded checkpoint of the same run (one rank, one step): its manifest leads to the store too, and
    // attribution reads it whole.
    let mut run = clt::dist::checkpoint::run_config(&r.checkpoint).unwrap();
    run.train.steps = 1;
    let mut s = clt::dist::trainer::ShardedTrainer::new(run, clt::dist::comm::SelfComm).unwrap();
    s.step().unwrap();
    let sharded = out.path().join("sharded");
    s.save_checkpoint(&sharded).unwrap();
    assert!(clt::dist::checkpoint::is_sharded(
        &clt::dist::checkpoint::resolve(&sharded).unwrap()
    ));
    assert_eq!(
        clt::attribution::exported_input_hook(&sharded).unwrap(),
        Some("mlp.hook_in".to_string())
    );
    let lt = clt::attribution::load_transcoder(&sharded, None, norm).unwrap();
    assert_eq!(lt.input_hook, InputHook::MlpInNormed);
    assert_eq!(lt.transcoder.cfg.n_layers, 5);
}
