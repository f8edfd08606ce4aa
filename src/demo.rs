//! The demonstrations behind `clt demo`: small, complete runs that show the engine working end to end.

use crate::Result;
use crate::clt::{Activation, CltConfig, DecoderKind};
use crate::data::ActDims;
use crate::data::synthetic::{SyntheticConfig, SyntheticGenerator};
use crate::train::{DataConfig, LambdaRamp, RunConfig, TrainConfig, Trainer};
use std::path::Path;

/// The synthetic-ground-truth run: 4 layers of width 32, 24 planted features per layer, a CLT with 64 features
/// per layer. Sized to finish well under two minutes on one core.
pub fn synthetic_config() -> RunConfig {
    RunConfig {
        model: CltConfig {
            n_layers: 4,
            d_model: 32,
            n_features: 64,
            decoder: DecoderKind::CrossLayer,
            activation: Activation::JumpRelu,
            skip: false,
        },
        train: TrainConfig {
            steps: 3000,
            batch_size: 256,
            lr: 2e-3,
            warmup_steps: 100,
            decay_fraction: 0.1,
            lambda_sparsity: 1.0,
            lambda_ramp: LambdaRamp::Cosine,
            lambda_wait_fraction: 0.0,
            lambda_ramp_fraction: 0.8,
            init_fire_rate: Some(0.1),
            // Planted activations are O(5) after normalisation: start the thresholds at 1 rather than 0.03, so
            // that the log-threshold (moved by Adam at about lr per step) reaches its scale within the run.
            theta_init: 1.0,
            log_every: 250,
            checkpoint_every: 1000,
            ..TrainConfig::default()
        },
        data: DataConfig::Synthetic(SyntheticConfig {
            features_per_layer: 24,
            fire_prob: 0.05,
            max_span: 3,
            noise: 0.01,
            seed: 7,
        }),
    }
}

/// The outcome of the synthetic demo.
#[derive(Clone, Debug)]
pub struct SyntheticReport {
    /// NMSE per layer and overall on a fresh evaluation batch.
    pub nmse_per_layer: Vec<f64>,
    pub nmse: f64,
    pub l0_per_layer: Vec<f64>,
    /// Best decoder cosine similarity of each planted feature.
    pub recovery: Vec<f32>,
    /// Fraction of planted features matched with cosine ≥ 0.9.
    pub recovered_fraction: f64,
    pub seconds: f64,
}

/// Trains on the synthetic ground truth and measures recovery.
pub fn run_synthetic(run: RunConfig, out: &Path, quiet: bool) -> Result<SyntheticReport> {
    let t0 = std::time::Instant::now();
    let mut trainer = Trainer::new(run.clone())?;
    trainer.train(out, quiet)?;
    let DataConfig::Synthetic(s) = &run.data else {
        return Err(crate::Error::config(
            "data.kind",
            "the synthetic demo needs kind = \"synthetic\"",
        ));
    };
    let dims = ActDims {
        n_layers: run.model.n_layers,
        d_model: run.model.d_model,
    };
    let generator = SyntheticGenerator::new(dims, s.clone());
    let recovery = generator.recovery(&run.model, &trainer.params, &trainer.norms);
    let eval = crate::eval::evaluate(
        &trainer.transcoder(),
        &mut SyntheticGenerator::new(
            dims,
            SyntheticConfig {
                seed: s.seed,
                ..s.clone()
            },
        ),
        4096,
        1u64 << 40,
    )?;
    let recovered =
        recovery.iter().filter(|c| **c >= 0.9).count() as f64 / recovery.len().max(1) as f64;
    Ok(SyntheticReport {
        nmse_per_layer: eval.nmse_per_layer,
        nmse: eval.nmse,
        l0_per_layer: eval.l0_per_layer,
        recovery,
        recovered_fraction: recovered,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Where the real-pipeline demo finds its inputs and writes its outputs.
#[derive(Clone, Debug)]
pub struct StoriesDemo {
    pub model: std::path::PathBuf,
    pub tokenizer: Option<std::path::PathBuf>,
    pub train_corpus: std::path::PathBuf,
    pub eval_corpus: std::path::PathBuf,
    pub out: std::path::PathBuf,
    pub train_tokens: u64,
    pub steps: u64,
    pub quiet: bool,
}

impl StoriesDemo {
    /// The stories260K fixture and TinyStories from `shared` (the project's `../shared`).
    pub fn from_shared(shared: &Path, out: &Path) -> Self {
        StoriesDemo {
            model: shared.join("models/stories260K/stories260K.bin"),
            tokenizer: Some(shared.join("models/stories260K/tok512.bin")),
            train_corpus: shared.join("corpus/tinystories_train_head.txt"),
            eval_corpus: shared.join("corpus/tinystories_valid_head.txt"),
            out: out.to_path_buf(),
            train_tokens: 200_000,
            steps: 2000,
            quiet: false,
        }
    }
}

/// What the real-pipeline demo measured.
#[derive(Clone, Debug)]
pub struct StoriesReport {
    pub cached_tokens: u64,
    pub cache_seconds: f64,
    pub train_seconds: f64,
    pub eval: crate::eval::EvalReport,
    /// The CLT spliced into the model on the held-out text: next-token loss against the model's.
    pub splice: crate::attribution::splice::SpliceReport,
    pub checkpoint: std::path::PathBuf,
    pub export: std::path::PathBuf,
    /// The attribution graph of [`DEMO_PROMPT`].
    pub graph: crate::attribution::cli::Written,
    /// The feature dashboards (over the held-out store) that the viewer shows beside the graph.
    pub features: std::path::PathBuf,
    pub graph_seconds: f64,
    pub graph_features: usize,
}

/// The TinyStories prompt the demo attributes.
pub const DEMO_PROMPT: &str =
    "Once upon a time, there was a little girl named Lily. She loved to play with her";

/// The whole pipeline on a real model: cache its MLP activations over a corpus into the store, train a CLT
/// from the store, evaluate on held-out text, export for circuit-tracer.
pub fn run_stories(demo: &StoriesDemo) -> Result<StoriesReport> {
    use crate::cache::{CacheConfig, InputHook, cache};
    let m = crate::model::load(&demo.model, demo.tokenizer.as_deref())?;
    let acts = demo.out.join("acts");
    let held_out = demo.out.join("acts-valid");
    let t0 = std::time::Instant::now();
    let base = CacheConfig {
        corpus: vec![demo.train_corpus.clone()],
        column: None,
        skip_documents: 0,
        out: acts.clone(),
        context: 128,
        max_tokens: Some(demo.train_tokens),
        input_hook: InputHook::MlpInNormed,
        codec: crate::store::Codec::Int8,
        target_rel_err: None,
        shard_tokens: 65_536,
        contexts_per_batch: 64,
        quiet: demo.quiet,
    };
    let rec = cache(&m, &base)?;
    cache(
        &m,
        &CacheConfig {
            corpus: vec![demo.eval_corpus.clone()],
            column: None,
            skip_documents: 0,
            out: held_out.clone(),
            max_tokens: Some(8192),
            ..base.clone()
        },
    )?;
    let cache_seconds = t0.elapsed().as_secs_f64();

    let (n_layers, d_model) = (m.model.n_layers(), m.model.d_model());
    let run = RunConfig {
        model: CltConfig {
            n_layers,
            d_model,
            n_features: 8 * d_model,
            decoder: DecoderKind::CrossLayer,
            activation: Activation::JumpRelu,
            skip: false,
        },
        train: TrainConfig {
            steps: demo.steps,
            batch_size: 1024,
            lr: 1e-3,
            warmup_steps: 100,
            lambda_sparsity: 0.05,
            theta_init: 0.5,
            init_fire_rate: Some(0.05),
            log_every: 200,
            ..TrainConfig::default()
        },
        data: DataConfig::Store(crate::train::config::StoreDataConfig {
            path: acts.clone(),
            seed: 0,
            window_blocks: 16,
            workers: 2,
            prefetch: 2,
        }),
    };
    let t1 = std::time::Instant::now();
    let run_dir = demo.out.join("run");
    let mut trainer = Trainer::new(run)?;
    trainer.train(&run_dir, demo.quiet)?;
    let train_seconds = t1.elapsed().as_secs_f64();
    let t = trainer.transcoder();
    let mut valid =
        crate::store::ShardLoader::open(&held_out, crate::store::LoaderConfig::default())?;
    let eval = crate::eval::evaluate(&t, &mut valid, 8000, 0)?;
    let export = demo.out.join("circuit-tracer");
    let meta = crate::clt::export::ExportMeta {
        model_name: "stories260K".into(),
        feature_input_hook: InputHook::MlpInNormed
            .circuit_tracer_name(m.model.norm())
            .unwrap_or_default()
            .into(),
        feature_output_hook: "hook_mlp_out".into(),
    };
    crate::clt::export::export_circuit_tracer(&t, &export, &meta)?;

    // The attribution graph of a TinyStories prompt through the trained CLT.
    let t2 = std::time::Instant::now();
    let llama = m.model.as_llama().ok_or_else(|| {
        crate::Error::Unsupported("the demo attributes through a Llama-family model".into())
    })?;
    let tc = crate::attribution::ReplacementTranscoder::new(&t, InputHook::MlpInNormed)?;
    let tokens = m.tokenizer.encode(DEMO_PROMPT)?;
    let cfg = crate::attribution::AttributionConfig {
        max_feature_nodes: Some(7500),
        progress: !demo.quiet,
        ..Default::default()
    };
    let g = crate::attribution::attribute(llama, &tc, &tokens, &cfg)?;
    // The CLT spliced in, on the held-out text the evaluation read (its first 8,192 predictions).
    let corpus = std::slice::from_ref(&demo.eval_corpus);
    let contexts = crate::attribution::splice::first_predictions(
        crate::cache::corpus_contexts(&m, corpus, None, 0, 128)?,
        8192,
    );
    let splice = crate::attribution::splice::splice_eval(llama, &tc, contexts, false, |_| {})?;
    let graph = crate::attribution::cli::write_graph(
        &g,
        &m.tokenizer,
        DEMO_PROMPT,
        &demo.out.join("graphs").join("lily.json"),
        "lily",
        "stories260K-demo-clt",
        0.8,
        0.98,
    )?;
    // Dashboards of every feature over the held-out activations, for the viewer.
    let features = crate::features::cli::run(&crate::features::cli::FeaturesArgs {
        transcoder: crate::train::resolve_checkpoint(&run_dir)?,
        store: held_out.clone(),
        out: demo.out.join("features"),
        model: Some(demo.model.clone()),
        tokenizer: demo.tokenizer.clone(),
        top_k: 20,
        samples: 24,
        before: 12,
        after: 4,
        logits: 10,
        max_tokens: None,
        chunk_tokens: 4096,
        scan: Some("stories260K-demo-clt".into()),
        json: false,
        quiet: demo.quiet,
    })?;
    Ok(StoriesReport {
        features,
        graph,
        graph_seconds: t2.elapsed().as_secs_f64(),
        graph_features: g.selected.len(),
        cached_tokens: rec.n_tokens,
        cache_seconds,
        train_seconds,
        eval,
        splice,
        checkpoint: crate::train::resolve_checkpoint(&run_dir)?,
        export,
    })
}
