//! The `clt` command line: parses arguments and calls the library. No logic lives here.

use clap::{Parser, Subcommand};
use clt::backend::BackendKind;
use clt::clt::checkpoint::save_transcoder;
use clt::clt::export::{ExportMeta, export_circuit_tracer, import_circuit_tracer};
use clt::train::trainer::make_source;
use clt::train::{RunConfig, Trainer, resolve_checkpoint};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "clt",
    version,
    about = "Cross-layer transcoders: cache activations, train, analyse"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a transcoder from a TOML configuration (or resume a run).
    Train {
        /// The run configuration (TOML). Optional with --resume (the checkpoint holds it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The run directory (metrics.jsonl, checkpoints/).
        #[arg(long, default_value = "runs/clt")]
        out: PathBuf,
        /// Continue from the latest checkpoint in --out.
        #[arg(long)]
        resume: bool,
        /// Override the number of steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Override the backend.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        /// No progress bar or per-interval lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Compute a prompt's attribution graph: which features cause the next-token logits (pruned graph JSON
    /// for circuit-tracer's frontend, plus the raw adjacency).
    Attribute(clt::attribution::cli::AttributeArgs),
    /// Run the replacement model with chosen features set or scaled and print the new top logits.
    Intervene(clt::attribution::cli::IntervenArgs),
    /// Show which transcoder features fire where on a prompt (the strongest at each position, chosen
    /// features' pre-activations everywhere) and how well the transcoder fits each layer there.
    Activations(clt::attribution::cli::ActivationsArgs),
    /// Score the transcoder spliced into the model on text: the next-token loss with every MLP replaced
    /// by the transcoder, against the model and against the MLPs zero-ablated (loss recovered, KL, top-1).
    Splice(clt::attribution::cli::SpliceArgs),
    /// Run a demonstration end to end: by default the real pipeline on stories260K and TinyStories (cache →
    /// train → evaluate → export); with --synthetic, training on planted ground truth.
    Demo {
        /// Train on the synthetic ground truth and report recovery of the planted features.
        #[arg(long)]
        synthetic: bool,
        /// The project's shared folder (model fixture and corpus).
        #[arg(long, default_value = "../shared")]
        shared: PathBuf,
        /// Tokens to cache for training.
        #[arg(long, default_value_t = 200_000)]
        tokens: u64,
        /// Training steps.
        #[arg(long, default_value_t = 2000)]
        steps: u64,
        /// Where to write the run (a fresh folder is best: finished caches are reused).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// At the end, serve the graph and the feature dashboards in the viewer (http://127.0.0.1:8041).
        #[arg(long)]
        serve: bool,
    },
    /// Cache a language model's MLP inputs and outputs over a corpus into the activation store (resumable).
    Cache {
        /// The model: llama2.c checkpoint, GGUF file or Hugging Face directory.
        #[arg(long)]
        model: PathBuf,
        /// The tokenizer, for llama2.c checkpoints.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Corpus files: plain text (blank-line-separated documents), .jsonl (a document per line),
        /// .parquet or .arrow (a document per row; Hugging Face datasets' files, Arrow IPC as its
        /// `save_to_disk` and cache write), text files compressed with zstd (.zst) or gzip (.gz) or not;
        /// read as needed, a document at a time.
        #[arg(long, required = true, num_args = 1..)]
        corpus: Vec<PathBuf>,
        /// The JSON field or Parquet/Arrow column of each document: text, or token ids of a pretokenised dataset
        /// (default: the first of `text`, `input_ids` and `tokens` present).
        #[arg(long)]
        column: Option<String>,
        /// Leave out the corpus's first N documents (read, not run): a held-out store from the corpus a
        /// training store was cached from, past the documents that store reached (`clt cache` prints the
        /// number; its `cache.json` keeps it as `documents_end`).
        #[arg(long, default_value_t = 0)]
        skip_documents: u64,
        /// The dataset directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Tokens per context (BOS included).
        #[arg(long, default_value_t = 128)]
        context: usize,
        /// Stop after this many cached tokens.
        #[arg(long)]
        max_tokens: Option<u64>,
        /// The encoder input hook: the MLP's input (`mlp-in-normed`), the residual stream before the MLP's
        /// norm (`resid-mid`), or that norm before its weight (`mlp-in-unweighted`: Gemma Scope's transcoders).
        #[arg(long, value_enum, default_value = "mlp-in-normed")]
        input_hook: clt::cache::InputHook,
        /// Storage codec.
        #[arg(long, value_enum, default_value = "int8")]
        codec: clt::store::Codec,
        /// Error target ε of the int8, int8p and int8e codecs: no row is quantised finer than a step that gives
        /// each layer a relative error of about ε (under int8 and int8p, rows whose range needs a coarser step keep
        /// int8's absmax step; int8e codes every value at that step, escaping codes beyond ±127; default 7e-4).
        #[arg(long)]
        target_rel_err: Option<f64>,
        /// Tokens per shard.
        #[arg(long, default_value_t = 65_536)]
        shard_tokens: u64,
    },
    /// Evaluate a checkpoint on held-out activations: a store dataset given with --data, or, for a run trained
    /// on the synthetic generator, a region of its stream that training never reaches.
    Eval {
        /// A checkpoint directory or a run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// A held-out activation-store dataset (e.g. `clt cache` over other text).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Tokens to evaluate on (at most what the --data store holds; read 4,096 at a time).
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        /// Also write the report as JSON (tokens, NMSE, explained variance, and per layer NMSE, L0 and
        /// dead features).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Export a checkpoint to another tool's format.
    Export {
        /// A checkpoint directory or a run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The target format.
        #[arg(long, value_enum, default_value = "circuit-tracer")]
        format: ExportFormat,
        /// The output directory.
        #[arg(long)]
        out: PathBuf,
        /// Model name written to config.yaml.
        #[arg(long, default_value = "unknown")]
        model_name: String,
        /// Feature input hook written to config.yaml (default: the circuit-tracer name of the hook the run's
        /// store recorded: `mlp.hook_in`, `hook_resid_mid` or `ln2.hook_normalized`; `mlp.hook_in` when the
        /// store is not found).
        #[arg(long)]
        input_hook: Option<String>,
        /// Feature output hook written to config.yaml (`hook_mlp_out`: the MLP's output as added to the
        /// residual stream, after Gemma-2's post-MLP norm, which is what the engine caches as targets).
        #[arg(long, default_value = "hook_mlp_out")]
        output_hook: String,
    },
    /// Import a transcoder in circuit-tracer's format as a native checkpoint.
    Import {
        /// The circuit-tracer transcoder directory: a CLT, or a transcoder set (`layer_{i}.safetensors`, or
        /// the files its config's `transcoders:` list names: Gemma Scope's `params.npz` and Gemma Scope 2's
        /// files included; `hf://org/repo/path` entries are read from `path` under this directory).
        #[arg(long)]
        from: PathBuf,
        /// The native checkpoint directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert a TopK/BatchTopK checkpoint to JumpReLU (thresholds calibrated on its run's data source).
    ConvertBatchtopk {
        /// A checkpoint directory or a run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The native checkpoint directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Calibration batches.
        #[arg(long, default_value_t = 10)]
        batches: usize,
        /// Tokens per calibration batch.
        #[arg(long, default_value_t = 4096)]
        batch_size: usize,
    },
    /// Measure training-step throughput: the sparse step against the dense reference, in one run.
    Bench {
        /// Problem size.
        #[arg(long, value_enum, default_value = "small")]
        preset: clt::bench::Preset,
        /// Active features per token and layer.
        #[arg(long, default_value_t = 32.0)]
        l0: f64,
        /// Bandwidth ε of the threshold gradient (CLT-Forge: 1.0).
        #[arg(long, default_value_t = 1.0)]
        bandwidth: f32,
        /// Timed sparse steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Timed dense steps (0 skips the dense reference).
        #[arg(long, default_value_t = 2)]
        dense_steps: usize,
        /// Write the results as JSON here (with `--cuda`: every kernel row and every other line printed).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Time the CUDA kernels instead (needs `--features cuda` and a GPU): per kernel time, TFLOP/s or
        /// GB/s and fraction of the ceilings, then the sparse step against the dense cuBLAS step; `--preset
        /// large` picks the Llama-3.2-1B shape (16 layers, d = 2048, 8192 features, 16,384 tokens), `small`
        /// a quarter of it in features and tokens, `tiny` a smoke test (2 layers, d = 64, 256 features and
        /// tokens) that the CPU emulator runs.
        #[arg(long)]
        cuda: bool,
        /// With `--cuda`: which rows to time (`no-wgmma` leaves out the Hopper wgmma encoders, `encoders`
        /// times the encoder kernels only; scripts/gpu-check.sh runs the two in separate processes).
        #[arg(long, value_enum, default_value_t = clt::bench::CudaRows::All)]
        cuda_rows: clt::bench::CudaRows,
    },
    /// Run a language model on a prompt: token ids, next-token probabilities, greedy continuation, logits dump.
    Run(clt::model::cli::RunArgs),
    /// The activation store: inspect, verify, convert and import shards.
    #[command(subcommand)]
    Store(clt::store::cli::StoreCommand),
    /// Feature dashboards: top contexts, histograms, logit effects, from one pass over a store.
    Features(clt::features::cli::FeaturesArgs),
    /// Label features from their top contexts with an OpenAI-compatible chat endpoint (sends only when asked).
    Explain(clt::features::explain::ExplainArgs),
    /// Serve the web viewer for attribution graphs and feature dashboards.
    Serve(clt::viewer::cli::ServeArgs),
    /// Print a checkpoint's configuration and sizes.
    Info {
        #[arg(long)]
        checkpoint: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    CircuitTracer,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> clt::Result<()> {
    match cli.command {
        Command::Train {
            config,
            out,
            resume,
            steps,
            backend,
            quiet,
        } => {
            let args = clt::dist::cli::TrainArgs {
                config,
                out,
                resume,
                steps,
                backend,
                quiet,
            };
            if clt::dist::cli::wants_sharded(&args) {
                // Under mpirun (feature-sharded over the ranks), or resuming a sharded checkpoint.
                return clt::dist::cli::train(args);
            }
            let clt::dist::cli::TrainArgs {
                config,
                out,
                resume,
                steps,
                backend,
                quiet,
            } = args;
            let mut trainer = if resume {
                let t = Trainer::resume(&out, steps)?;
                if let Some(path) = config {
                    let mut given = RunConfig::from_file(&path)?;
                    given.train.steps = t.run.train.steps;
                    if given != t.run {
                        return Err(clt::Error::config(
                            "config",
                            format!(
                                "{} differs from the configuration stored in the checkpoint",
                                path.display()
                            ),
                        ));
                    }
                }
                eprintln!("resuming at step {} of {}", t.step, t.run.train.steps);
                t
            } else {
                let path = config.ok_or_else(|| {
                    clt::Error::config("config", "--config is required unless --resume")
                })?;
                let mut run = RunConfig::from_file(&path)?;
                if let Some(s) = steps {
                    run.train.steps = s;
                }
                if let Some(b) = backend {
                    run.train.backend = b;
                }
                Trainer::new(run)?
            };
            let last = trainer.train(&out, quiet)?;
            if let Some(line) = last {
                print_layers(
                    &line.nmse_per_layer,
                    &line.l0_per_layer,
                    &line.dead_per_layer,
                );
            }
            println!("checkpoint: {}", resolve_checkpoint(&out)?.display());
            Ok(())
        }
        Command::Demo {
            synthetic: true,
            out,
            ..
        } => {
            let run = clt::demo::synthetic_config();
            println!(
                "synthetic ground truth: {} layers, d = {}, {} features per layer ({} steps of {} tokens)",
                run.model.n_layers,
                run.model.d_model,
                run.model.n_features,
                run.train.steps,
                run.train.batch_size
            );
            let r = clt::demo::run_synthetic(run, &out, false)?;
            println!("held-out evaluation:");
            print_layers(&r.nmse_per_layer, &r.l0_per_layer, &[]);
            let n = r.recovery.len();
            let ok = r.recovery.iter().filter(|c| **c >= 0.9).count();
            println!(
                "NMSE {:.4}; planted features recovered (decoder cosine ≥ 0.9): {ok}/{n} ({:.1}%)",
                r.nmse,
                100.0 * r.recovered_fraction
            );
            println!(
                "trained in {:.1} s; run directory {}",
                r.seconds,
                out.display()
            );
            Ok(())
        }
        Command::Demo {
            synthetic: false,
            shared,
            tokens,
            steps,
            out,
            serve,
        } => {
            let mut demo = clt::demo::StoriesDemo::from_shared(&shared, &out);
            demo.train_tokens = tokens;
            demo.steps = steps;
            println!(
                "stories260K on TinyStories: cache {tokens} tokens, train a CLT for {steps} steps, evaluate, \
                 export, attribute a prompt, build feature dashboards"
            );
            let r = clt::demo::run_stories(&demo)?;
            println!(
                "cached {} tokens in {:.1} s",
                r.cached_tokens, r.cache_seconds
            );
            println!(
                "trained in {:.1} s; held-out evaluation on {} tokens:",
                r.train_seconds, r.eval.n_tokens
            );
            print_layers(
                &r.eval.nmse_per_layer,
                &r.eval.l0_per_layer,
                &r.eval.dead_per_layer,
            );
            println!("NMSE {:.4}", r.eval.nmse);
            let sp = &r.splice;
            println!(
                "spliced into the model on the held-out text ({} predictions): next-token loss {:.3} nats \
                 against the model's {:.3} and {:.3} with the MLPs zero-ablated: {:.1}% of the loss \
                 recovered; KL {:.3}, top-1 agreement {:.3} (clt splice)",
                sp.model.n,
                sp.spliced.mean_ce(),
                sp.model.mean_ce(),
                sp.zero.mean_ce(),
                100.0 * sp.loss_recovered(),
                sp.spliced.mean_kl(),
                sp.spliced.top1_agreement()
            );
            println!("checkpoint {}", r.checkpoint.display());
            println!("circuit-tracer export {}", r.export.display());
            println!(
                "attribution graph of {:?}: {} feature nodes in {:.1} s; replacement score {:.3}, \
                 completeness score {:.3}",
                clt::demo::DEMO_PROMPT,
                r.graph_features,
                r.graph_seconds,
                r.graph.scores.replacement,
                r.graph.scores.completeness
            );
            println!(
                "graph JSON (circuit-tracer frontend) {} ({} nodes, {} links); raw adjacency {}",
                r.graph.json.display(),
                r.graph.nodes,
                r.graph.links,
                r.graph.raw.display()
            );
            let graphs = r.graph.json.parent().unwrap_or(&out).to_path_buf();
            let features = r.features.parent().unwrap_or(&out).to_path_buf();
            println!("feature dashboards {}", r.features.display());
            if serve {
                return clt::viewer::cli::run(&clt::viewer::cli::ServeArgs {
                    graphs,
                    features: Some(features),
                    port: 8041,
                    host: "127.0.0.1".into(),
                    model: Some(demo.model.clone()),
                    tokenizer: demo.tokenizer.clone(),
                    transcoder: Some(r.export.clone()),
                });
            }
            let model_args = format!(
                "--model {}{} --transcoder {}",
                demo.model.display(),
                demo.tokenizer
                    .as_ref()
                    .map(|t| format!(" --tokenizer {}", t.display()))
                    .unwrap_or_default(),
                r.export.display()
            );
            println!(
                "view them (and intervene on their features, or test one on any text): clt serve \
                 --graphs {} --features {} {model_args}",
                graphs.display(),
                features.display(),
            );
            println!(
                "which features fire where on a prompt: clt activations {model_args} --labels {} \
                 --prompt {:?}",
                features.display(),
                clt::demo::DEMO_PROMPT
            );
            Ok(())
        }
        Command::Cache {
            model,
            tokenizer,
            corpus,
            column,
            skip_documents,
            out,
            context,
            max_tokens,
            input_hook,
            codec,
            target_rel_err,
            shard_tokens,
        } => {
            let m = clt::model::load(&model, tokenizer.as_deref())?;
            let cfg = clt::cache::CacheConfig {
                corpus,
                column,
                skip_documents,
                out: out.clone(),
                context,
                max_tokens,
                input_hook,
                codec,
                target_rel_err,
                shard_tokens,
                contexts_per_batch: 64,
                quiet: false,
            };
            let t0 = std::time::Instant::now();
            let rec = clt::cache::cache(&m, &cfg)?;
            let s = t0.elapsed().as_secs_f64();
            println!(
                "{} tokens in {} ({:.1} s, {:.0} tokens/s)",
                rec.n_tokens,
                out.display(),
                s,
                rec.n_tokens as f64 / s
            );
            if let Some(end) = rec.documents_end {
                println!(
                    "documents {}..{end} of the corpus (a held-out store from the same corpus: --skip-documents {end})",
                    rec.skip_documents
                );
            }
            Ok(())
        }
        Command::Eval {
            checkpoint,
            data,
            tokens,
            json,
        } => {
            // Native or sharded checkpoints (`clt::dist::checkpoint` reads both), or converted ones.
            let t = clt::dist::checkpoint::load_transcoder(&checkpoint)?;
            let trained_on = clt::dist::checkpoint::data_config(&checkpoint)?;
            let r = match (data, &trained_on) {
                (Some(path), trained_on) => {
                    if let Some(clt::train::DataConfig::Store(s)) = trained_on
                        && same_dir(&s.path, &path)
                    {
                        eprintln!(
                            "warning: {} is the store this run trained on: these figures are not held out",
                            path.display()
                        );
                    }
                    let mut src = clt::store::ShardLoader::open(&path, Default::default())?;
                    // The loader would start another epoch past the store's end and count tokens twice.
                    let held = usize::try_from(src.epoch_tokens(0)).unwrap_or(usize::MAX);
                    if tokens > held {
                        eprintln!(
                            "{} holds {held} tokens (fewer than --tokens {tokens}): evaluating on all of them",
                            path.display()
                        );
                    }
                    clt::eval::evaluate(&t, &mut src, tokens.min(held), 0)?
                }
                (None, Some(synthetic @ clt::train::DataConfig::Synthetic(_))) => {
                    let dims = clt::data::ActDims {
                        n_layers: t.cfg.n_layers,
                        d_model: t.cfg.d_model,
                    };
                    let mut src = clt::train::trainer::data_source(dims, synthetic)?;
                    clt::eval::evaluate(&t, src.as_mut(), tokens, 1u64 << 40)?
                }
                (None, Some(clt::train::DataConfig::Store(_))) => {
                    return Err(clt::Error::config(
                        "data",
                        "a run trained on a store dataset needs --data DIR with held-out activations",
                    ));
                }
                (None, None) => {
                    return Err(clt::Error::config(
                        "data",
                        format!(
                            "{} records no training data (an imported transcoder): pass --data DIR \
                             with held-out activations",
                            checkpoint.display()
                        ),
                    ));
                }
            };
            print_layers(&r.nmse_per_layer, &r.l0_per_layer, &r.dead_per_layer);
            println!("NMSE {:.4} over {} tokens", r.nmse, r.n_tokens);
            if let Some(path) = json {
                let mut v = serde_json::to_value(&r)
                    .map_err(|e| clt::Error::Unsupported(format!("the evaluation as JSON: {e}")))?;
                v["explained_variance"] = serde_json::json!(1.0 - r.nmse);
                v["checkpoint"] = serde_json::json!(checkpoint.display().to_string());
                clt::clt::checkpoint::write_atomic(&path, format!("{v:#}\n").as_bytes())?;
            }
            Ok(())
        }
        Command::Export {
            checkpoint,
            format: ExportFormat::CircuitTracer,
            out,
            model_name,
            input_hook,
            output_hook,
        } => {
            // Native or sharded (assembled from its shards).
            let t = clt::dist::checkpoint::load_transcoder(&checkpoint)?;
            let input_hook = match input_hook {
                Some(h) => h,
                None => match clt::attribution::exported_input_hook(&checkpoint)? {
                    Some(h) => h,
                    None => {
                        let h = clt::cache::InputHook::default()
                            .circuit_tracer_name(clt::attribution::linear::NormKind::Rms)
                            .unwrap_or_default();
                        eprintln!(
                            "no cache.json found for the store this run trained on, and not \
                             imported: writing feature_input_hook {h} (pass --input-hook to choose)"
                        );
                        h.to_string()
                    }
                },
            };
            let meta = ExportMeta {
                model_name,
                feature_input_hook: input_hook,
                feature_output_hook: output_hook,
            };
            export_circuit_tracer(&t, &out, &meta)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Import { from, out } => {
            let t = import_circuit_tracer(&from)?;
            save_transcoder(&out, &t)?;
            // The hook names, so that attribute and export read and write the hooks it was made for.
            let meta = clt::clt::export::read_export_meta(&from)?;
            clt::clt::export::write_imported_hooks(&out, &meta)?;
            println!(
                "imported {} layers × {} features (d = {}) into {}",
                t.cfg.n_layers,
                t.cfg.n_features,
                t.cfg.d_model,
                out.display()
            );
            Ok(())
        }
        Command::ConvertBatchtopk {
            checkpoint,
            out,
            batches,
            batch_size,
        } => {
            let t = clt::dist::checkpoint::load_transcoder(&checkpoint)?;
            let run = clt::dist::checkpoint::run_config(&checkpoint)?;
            let mut source = make_source(&run)?;
            let (j, rep) =
                clt::clt::convert::batchtopk_to_jumprelu(&t, source.as_mut(), batch_size, batches)?;
            save_transcoder(&out, &j)?;
            // What it trained on goes with it: eval's synthetic held-out region, the hook its store recorded.
            clt::dist::checkpoint::write_source_data(&out, &run.data)?;
            println!("layer  target L0  JumpReLU L0  threshold scale");
            for l in 0..rep.scale.len() {
                println!(
                    "{l:>5} {:>10.2} {:>12.2} {:>16.4}",
                    rep.target_l0[l], rep.jumprelu_l0[l], rep.scale[l]
                );
            }
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Bench {
            preset,
            l0,
            bandwidth,
            steps,
            dense_steps,
            json,
            cuda,
            cuda_rows,
        } => {
            if cuda {
                return clt::bench::cuda_kernels(preset, cuda_rows, json.as_deref());
            }
            let (l_n, d, f, b) = preset.dims();
            println!(
                "problem: {l_n} layers, d = {d}, {f} features per layer, batch {b}, target L0 {l0}, ε = {bandwidth}"
            );
            let p = clt::bench::Problem::new(l_n, d, f, b, l0, bandwidth, 0);
            let ceiling = clt::bench::gemm_ceiling(b, d, f, 3);
            let mut rows = vec![clt::bench::time_steps(&p, BackendKind::Cpu, steps)?];
            if dense_steps > 0 {
                rows.push(clt::bench::time_steps(
                    &p,
                    BackendKind::CpuDense,
                    dense_steps,
                )?);
            }
            println!(
                "{:<10} {:>10} {:>12} {:>10} {:>12} {:>8} {:>12}",
                "backend", "step s", "tokens/s", "encode s", "enc GFLOP/s", "L0", "near-θ"
            );
            for r in &rows {
                println!(
                    "{:<10} {:>10.3} {:>12.0} {:>10} {:>12} {:>8.1} {:>12.1}",
                    r.backend,
                    r.step_s,
                    r.tokens_per_s,
                    r.encode_s
                        .map(|v| format!("{v:.3}"))
                        .unwrap_or_else(|| "-".into()),
                    r.encoder_gflops
                        .map(|v| format!("{v:.1}"))
                        .unwrap_or_else(|| "-".into()),
                    r.l0_per_layer,
                    r.near_threshold_per_layer
                );
            }
            let bandwidth_gbs = clt::bench::copy_bandwidth(512 << 20, 3);
            println!(
                "GEMM ceiling ({b}×{d}·{d}×{f}, all threads): {ceiling:.1} GFLOP/s; copy bandwidth {bandwidth_gbs:.1} GB/s"
            );
            if let Some(e) = rows[0].encoder_gflops {
                println!("encoder at {:.0}% of the GEMM ceiling", 100.0 * e / ceiling);
            }
            if let Some(ph) = &rows[0].phases {
                println!(
                    "sparse phases (s): encode {:.3}, decode {:.3} (token by token {:.3}: {:.1} GB of decoder \
                     rows, {:.1} GB/s), backward {:.3}, clipping norm {:.3}, Adam {:.3} ({:.1} GB, {:.1} GB/s)",
                    ph.encode_s,
                    ph.decode_s,
                    ph.decode_by_token_s,
                    ph.decode_gb,
                    ph.decode_gb / ph.decode_by_token_s,
                    ph.backward_s,
                    ph.norm_s,
                    ph.adam_s,
                    ph.adam_gb,
                    ph.adam_gb / ph.adam_s
                );
            }
            if rows.len() == 2 {
                println!(
                    "sparse step speed-up over dense: {:.1}×",
                    rows[1].step_s / rows[0].step_s
                );
            }
            if let Some(path) = json {
                let v = serde_json::json!({ "preset": format!("{preset:?}"), "l0": l0, "bandwidth": bandwidth, "gemm_ceiling_gflops": ceiling, "copy_gbs": bandwidth_gbs, "rows": rows });
                std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap_or_default())
                    .map_err(|e| clt::Error::io(&path, e))?;
            }
            Ok(())
        }
        Command::Store(cmd) => clt::store::cli::run(cmd),
        Command::Attribute(args) => clt::attribution::cli::run_attribute(&args),
        Command::Intervene(args) => clt::attribution::cli::run_intervene(&args),
        Command::Activations(args) => clt::attribution::cli::run_activations(&args),
        Command::Splice(args) => clt::attribution::cli::run_splice(&args).map(|_| ()),
        Command::Run(args) => clt::model::cli::run(args),
        Command::Features(args) => {
            clt::features::cli::run(&args).map(|p| println!("wrote {}", p.display()))
        }
        Command::Serve(args) => clt::viewer::cli::run(&args),
        Command::Explain(args) => {
            clt::features::explain::run(&args).map(|n| println!("labelled {n} features"))
        }
        Command::Info { checkpoint } => {
            let dir = clt::dist::checkpoint::resolve(&checkpoint)?;
            let t = clt::dist::checkpoint::load_transcoder(&dir)?;
            println!("{}", dir.display());
            println!(
                "{}",
                serde_json::to_string_pretty(&t.cfg).unwrap_or_default()
            );
            println!("parameters: {}", t.params.len());
            Ok(())
        }
    }
}

/// Whether two paths name the same directory (as given, when either cannot be resolved).
fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn print_layers(nmse: &[f64], l0: &[f64], dead: &[usize]) {
    println!("layer    NMSE     EV      L0   dead");
    for l in 0..nmse.len() {
        let d = dead
            .get(l)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{l:>5} {:>7.4} {:>6.3} {:>7.2} {:>6}",
            nmse[l],
            1.0 - nmse[l],
            l0[l],
            d
        );
    }
}
