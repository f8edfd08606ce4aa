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
        column: None,
        skip_documents: 0,
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
    let ids = m.tokenizer.encode(docs[0].as_text().unwrap()).unwrap();
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

/// `skip_documents` caches a held-out store from the same corpus: exactly the full store's rows of the
/// documents past those skipped (document ids kept), and `documents_end` says where a store stopped.
#[test]
fn skipped_documents_make_a_held_out_store_of_the_same_corpus() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, max_tokens: u64, skip: u64| {
        let out = dir.path().join(name);
        let cfg = CacheConfig {
            skip_documents: skip,
            ..config(&out, max_tokens, Codec::F32, 1000)
        };
        cache(&m, &cfg).map(|rec| (rec, read_all(&out)))
    };
    let (full_rec, full) = run("full", 4000, 0).unwrap();
    let (x, y, tokens, positions, docs) = &full;
    assert_eq!(full_rec.documents_end, Some(docs[docs.len() - 1] + 1));
    let skip = 4;
    let (rec, held) = run("held", 1500, skip).unwrap();
    assert_eq!(rec.skip_documents, skip);
    let first = docs.iter().position(|&d| d >= skip).unwrap();
    assert!(first > 0 && first + 1500 <= docs.len(), "{first}");
    let row = x.len() / docs.len();
    let rows = first..first + 1500;
    let want = (
        x[rows.start * row..rows.end * row].to_vec(),
        y[rows.start * row..rows.end * row].to_vec(),
        tokens[rows.clone()].to_vec(),
        positions[rows.clone()].to_vec(),
        docs[rows.clone()].to_vec(),
    );
    assert!(
        held == want,
        "the held-out store is not the full store's later rows"
    );
    assert_eq!(rec.documents_end, Some(docs[rows.end - 1] + 1));
    // The record is written, and a finished store reports it again.
    let again = run("held", 1500, skip).unwrap().0;
    assert_eq!(again.documents_end, rec.documents_end);
    let err = run("none", 100, 1_000_000).err().unwrap().to_string();
    assert!(
        err.contains("skip_documents") && err.contains("only"),
        "{err}"
    );
}

/// An Arrow IPC stream as Hugging Face datasets' `save_to_disk` writes it: a text column, or an `int32`
/// token-list column (datasets' `Sequence(Value("int32"))`), in record batches of `per_batch` rows.
fn write_arrow(path: &Path, name: &str, texts: &[String], ids: &[Vec<u32>], per_batch: usize) {
    use arrow_array::builder::{Int32Builder, ListBuilder};
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    let rows = texts.len().max(ids.len());
    let mut batches = Vec::new();
    for start in (0..rows).step_by(per_batch) {
        let end = (start + per_batch).min(rows);
        let column: ArrayRef = if ids.is_empty() {
            std::sync::Arc::new(StringArray::from_iter_values(&texts[start..end]))
        } else {
            let mut b = ListBuilder::new(Int32Builder::new());
            for row in &ids[start..end] {
                b.append_value(row.iter().map(|&id| Some(id as i32)));
            }
            std::sync::Arc::new(b.finish())
        };
        batches.push(RecordBatch::try_from_iter([(name, column)]).unwrap());
    }
    let file = std::fs::File::create(path).unwrap();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(file, &batches[0].schema()).unwrap();
    for b in &batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
}

/// A Parquet file of one column, `name`: text (`optional binary (UTF8)`) or token ids (the standard
/// three-level `LIST` of `int32` with optional elements, as pyarrow writes `list<int32>`), `per_group` rows
/// per row group, snappy-compressed.
fn write_parquet(path: &Path, name: &str, texts: &[String], ids: &[Vec<u32>], per_group: usize) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = if ids.is_empty() {
        format!("message schema {{ optional binary {name} (UTF8); }}")
    } else {
        format!(
            "message schema {{ optional group {name} (LIST) {{ repeated group list {{ optional int32 element; }} }} }}"
        )
    };
    let schema = std::sync::Arc::new(parquet::schema::parser::parse_message_type(&schema).unwrap());
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, std::sync::Arc::new(props)).unwrap();
    let rows = texts.len().max(ids.len());
    for start in (0..rows).step_by(per_group) {
        let end = (start + per_group).min(rows);
        let mut g = w.next_row_group().unwrap();
        let mut col = g.next_column().unwrap().unwrap();
        if ids.is_empty() {
            let values: Vec<ByteArray> = texts[start..end]
                .iter()
                .map(|t| t.as_str().into())
                .collect();
            let def = vec![1i16; values.len()];
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(&def), None)
                .unwrap();
        } else {
            let (mut values, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
            for row in &ids[start..end] {
                for (i, &id) in row.iter().enumerate() {
                    values.push(id as i32);
                    def.push(3i16);
                    rep.push(if i == 0 { 0i16 } else { 1 });
                }
            }
            col.typed::<Int32Type>()
                .write_batch(&values, Some(&def), Some(&rep))
                .unwrap();
        }
        col.close().unwrap();
        g.close().unwrap();
    }
    w.close().unwrap();
}

/// A corpus given as a Parquet text column, or pretokenised as a Parquet column of token ids (with or
/// without BOS), caches exactly what the plain-text corpus does: the same tokens, positions, documents
/// and activations, across row groups and shards. Ids outside the model's vocabulary stop the cache with
/// the file and row named.
#[test]
fn parquet_and_arrow_corpora_cache_as_the_text_does() {
    let m = model();
    let txt = shared().join("corpus/tinystories_valid_head.txt");
    let docs: Vec<String> = clt::cache::read_documents(std::slice::from_ref(&txt))
        .unwrap()
        .into_iter()
        .take(40)
        .map(|d| d.as_text().unwrap().to_string())
        .collect();
    let ids: Vec<Vec<u32>> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let ids = m.tokenizer.encode(d).unwrap();
            assert_eq!(ids[0], m.tokenizer.bos().unwrap());
            // Every other document without its BOS: the cache adds it.
            ids[i % 2..].to_vec()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let text_pq = dir.path().join("text.parquet");
    let ids_pq = dir.path().join("ids.parquet");
    write_parquet(&text_pq, "text", &docs, &[], 7);
    write_parquet(&ids_pq, "input_ids", &[], &ids, 5);

    let run = |corpus: &Path, column: Option<&str>, name: &str| {
        let out = dir.path().join(name);
        let cfg = CacheConfig {
            corpus: vec![corpus.to_path_buf()],
            column: column.map(str::to_string),
            ..config(&out, 3000, Codec::Int8, 1000)
        };
        cache(&m, &cfg).map(|rec| (rec, read_all(&out)))
    };
    let (_, want) = run(&txt, None, "txt").unwrap();
    assert_eq!(want.2.len(), 3000);
    let (_, got) = run(&text_pq, None, "text-pq").unwrap();
    assert!(
        got == want,
        "the Parquet text column caches other activations"
    );
    let (rec, got) = run(&ids_pq, Some("input_ids"), "ids-pq").unwrap();
    assert!(
        got == want,
        "the pretokenised column caches other activations"
    );
    assert_eq!(rec.column.as_deref(), Some("input_ids"));
    // The same documents as Arrow IPC streams (datasets' `save_to_disk`).
    let text_arrow = dir.path().join("text.arrow");
    let ids_arrow = dir.path().join("ids.arrow");
    write_arrow(&text_arrow, "text", &docs, &[], 6);
    write_arrow(&ids_arrow, "input_ids", &[], &ids, 4);
    let (_, got) = run(&text_arrow, None, "text-arrow").unwrap();
    assert!(
        got == want,
        "the Arrow text column caches other activations"
    );
    let (_, got) = run(&ids_arrow, None, "ids-arrow").unwrap();
    assert!(
        got == want,
        "the pretokenised Arrow column caches other activations"
    );

    // A dataset tokenised for a larger vocabulary: row 12's third id is beyond stories260K's 512.
    let mut bad = ids.clone();
    bad[12][2] = 600;
    let bad_pq = dir.path().join("bad.parquet");
    write_parquet(&bad_pq, "input_ids", &[], &bad, 5);
    let err = run(&bad_pq, None, "bad").err().unwrap().to_string();
    assert!(
        err.contains("bad.parquet")
            && err.contains("row 12: \"input_ids\"[2]")
            && err.contains("512"),
        "{err}"
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
    // Spliced into the model, the trained CLT keeps most of its next-token loss (ablating every MLP
    // costs ~7 nats on this text).
    let sp = &r.splice;
    eprintln!(
        "spliced: CE {:.4} against {:.4} (zero-ablated {:.4}): loss recovered {:.4}",
        sp.spliced.mean_ce(),
        sp.model.mean_ce(),
        sp.zero.mean_ce(),
        sp.loss_recovered()
    );
    assert!(sp.model.n >= 8192, "{} predictions", sp.model.n);
    assert!(sp.loss_recovered() > 0.5, "{sp:?}");
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
