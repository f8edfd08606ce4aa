//! Training-loop properties: resume is bit-for-bit, checkpoints and exports round-trip, bad configurations and
//! bad files give errors that name the culprit.

use clt::Error;
use clt::backend::BackendKind;
use clt::clt::checkpoint::{load_transcoder, save_transcoder};
use clt::clt::export::{ExportMeta, export_circuit_tracer, fold_norms, import_circuit_tracer};
use clt::clt::{Activation, DecoderKind, NormScales, Transcoder};
use clt::data::synthetic::SyntheticGenerator;
use clt::data::{ActDims, ActivationSource, Batch};
use clt::train::{RunConfig, Trainer};

fn small_run(decoder: DecoderKind, skip: bool) -> RunConfig {
    let mut run = clt::demo::synthetic_config();
    run.model.n_features = 24;
    run.model.decoder = decoder;
    run.model.skip = skip;
    run.train.steps = 12;
    run.train.batch_size = 64;
    run.train.warmup_steps = 3;
    run.train.log_every = 4;
    run.train.calibration_batches = 2;
    run
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bit_for_bit() {
    for (decoder, skip) in [
        (DecoderKind::CrossLayer, false),
        (DecoderKind::PerLayer, true),
    ] {
        let run = small_run(decoder, skip);
        let full_dir = tempfile::tempdir().unwrap();
        let mut full = Trainer::new(run.clone()).unwrap();
        full.train(full_dir.path(), true).unwrap();

        let part_dir = tempfile::tempdir().unwrap();
        let mut first = Trainer::new(RunConfig {
            train: clt::train::TrainConfig {
                checkpoint_every: 5,
                ..run.train.clone()
            },
            ..run.clone()
        })
        .unwrap();
        for _ in 0..5 {
            first.step().unwrap();
        }
        first.save_checkpoint(part_dir.path()).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(part_dir.path(), None).unwrap();
        assert_eq!(resumed.step, 5);
        resumed.train(part_dir.path(), true).unwrap();
        assert_eq!(resumed.step, 12);
        assert!(
            resumed.params == full.params,
            "parameters differ after resume ({decoder:?}, skip {skip})"
        );
        assert_eq!(resumed.tokens_seen, full.tokens_seen);
    }
}

#[test]
fn checkpoint_round_trips() {
    let run = small_run(DecoderKind::CrossLayer, true);
    let mut t = Trainer::new(run).unwrap();
    t.step().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tc = t.transcoder();
    save_transcoder(dir.path(), &tc).unwrap();
    assert_eq!(load_transcoder(dir.path()).unwrap(), tc);
}

/// The raw-unit reconstruction of a transcoder on raw activations.
fn raw_reconstruction(t: &Transcoder, x: &[f32], n: usize) -> Vec<f32> {
    let d = t.cfg.d_model;
    let mut xs = x.to_vec();
    let mut dummy = vec![0.0; x.len()];
    t.norms.apply(d, &mut xs, &mut dummy);
    let (_, mut yhat) = clt::backend::cpu::sparse::forward(&t.cfg, &t.params, &xs, n, 1.0);
    for (i, row) in yhat.chunks_exact_mut(d).enumerate() {
        let s = t.norms.target[i % t.cfg.n_layers];
        row.iter_mut().for_each(|v| *v /= s);
    }
    yhat
}

#[test]
fn circuit_tracer_export_import_round_trips_with_norms_folded() {
    for (decoder, skip) in [
        (DecoderKind::CrossLayer, false),
        (DecoderKind::CrossLayer, true),
        (DecoderKind::PerLayer, true),
    ] {
        let run = small_run(decoder, skip);
        let mut tr = Trainer::new(run.clone()).unwrap();
        for _ in 0..3 {
            tr.step().unwrap();
        }
        let t = tr.transcoder();
        assert!(
            t.norms.input.iter().any(|s| (s - 1.0).abs() > 1e-3),
            "the test needs non-trivial norms"
        );
        let dir = tempfile::tempdir().unwrap();
        export_circuit_tracer(&t, dir.path(), &ExportMeta::default()).unwrap();
        let back = import_circuit_tracer(dir.path()).unwrap();
        assert_eq!(back.cfg, t.cfg);
        assert_eq!(back.norms, NormScales::identity(t.cfg.n_layers));
        let folded = fold_norms(&t);
        for (a, b) in back.params.tensors().iter().zip(folded.tensors()) {
            for (u, v) in a.iter().zip(b.iter()) {
                assert!((u - v).abs() <= 1e-6 * (1.0 + v.abs()), "{u} vs {v}");
            }
        }
        // Same reconstruction of raw activations.
        let dims = ActDims {
            n_layers: t.cfg.n_layers,
            d_model: t.cfg.d_model,
        };
        let clt::train::DataConfig::Synthetic(s) = &run.data else {
            unreachable!()
        };
        let mut source = SyntheticGenerator::new(dims, s.clone());
        let mut batch = Batch::default();
        source.next_batch(50, &mut batch).unwrap();
        let a = raw_reconstruction(&t, &batch.x, 50);
        let b = raw_reconstruction(&back, &batch.x, 50);
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "{u} vs {v}");
        }
    }
}

#[test]
fn import_names_missing_and_misshapen_tensors() {
    let run = small_run(DecoderKind::CrossLayer, false);
    let t = Trainer::new(run).unwrap().transcoder();
    let dir = tempfile::tempdir().unwrap();
    export_circuit_tracer(&t, dir.path(), &ExportMeta::default()).unwrap();
    // Misshapen: overwrite W_dec_1 with a wrong shape.
    let f = t.cfg.n_features;
    let bad = vec![0.0f32; f * 2];
    clt::clt::checkpoint::write_tensors(
        &dir.path().join("W_dec_1.safetensors"),
        &[clt::clt::checkpoint::TensorOut {
            name: "W_dec_1".into(),
            shape: vec![f, 2],
            data: &bad,
        }],
        None,
    )
    .unwrap();
    match import_circuit_tracer(dir.path()) {
        Err(Error::Tensor {
            tensor,
            reason,
            path,
        }) => {
            assert_eq!(tensor, "W_dec_1");
            assert!(reason.contains("shape"), "{reason}");
            assert!(path.ends_with("W_dec_1.safetensors"));
        }
        other => panic!("expected a tensor error, got {other:?}"),
    }
    // Missing: a file without b_enc_0.
    let w = vec![0.0f32; f * t.cfg.d_model];
    clt::clt::checkpoint::write_tensors(
        &dir.path().join("W_enc_0.safetensors"),
        &[clt::clt::checkpoint::TensorOut {
            name: "W_enc_0".into(),
            shape: vec![f, t.cfg.d_model],
            data: &w,
        }],
        None,
    )
    .unwrap();
    match import_circuit_tracer(dir.path()) {
        Err(Error::Tensor { tensor, reason, .. }) => {
            assert_eq!(tensor, "b_enc_0");
            assert_eq!(reason, "missing");
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let t = Trainer::new(small_run(DecoderKind::CrossLayer, false))
        .unwrap()
        .transcoder();
    let dir = tempfile::tempdir().unwrap();
    save_transcoder(dir.path(), &t).unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    match load_transcoder(dir.path()) {
        Err(Error::Format { path: p, .. }) => assert!(p.ends_with("model.safetensors")),
        other => panic!("expected a format error, got {other:?}"),
    }
    std::fs::write(
        dir.path().join("config.json"),
        b"{\"format\": \"something-else\"",
    )
    .unwrap();
    assert!(matches!(
        load_transcoder(dir.path()),
        Err(Error::Checkpoint { .. })
    ));
}

#[test]
fn bad_config_values_name_the_field() {
    let base = r#"
[model]
n_layers = 2
d_model = 8
n_features = 16

[train]
steps = 10
batch_size = 32

[data]
kind = "synthetic"
"#;
    assert!(RunConfig::from_toml(base).is_ok());
    let grid = base.replace(
        "steps = 10",
        "steps = 10\nparallel = \"grid\"\nfeature_shards = 2\noverlap = true",
    );
    assert!(RunConfig::from_toml(&grid).is_ok());
    // The CUDA kernel choices parse by the names their errors use (the CPU backends ignore them).
    use clt::backend::EncoderKernel;
    for k in [
        EncoderKernel::Mma,
        EncoderKernel::Wgmma,
        EncoderKernel::WgmmaNarrow,
        EncoderKernel::WgmmaTma,
    ] {
        let text = base.replace(
            "steps = 10",
            &format!(
                "steps = 10\nencoder_kernel = \"{}\"\nsparse_kernels = \"tiled\"",
                k.name()
            ),
        );
        let run = RunConfig::from_toml(&text).unwrap();
        assert_eq!(run.train.encoder_kernel, k);
    }
    assert!(
        RunConfig::from_toml(&base.replace("steps = 10", "steps = 10\nencoder_kernel = \"wmma\""))
            .is_err()
    );
    let cases = [
        ("n_features = 16", "n_features = 0", "model.n_features"),
        ("batch_size = 32", "batch_size = 0", "train.batch_size"),
        ("steps = 10", "steps = 10\nlr = -1.0", "train.lr"),
        (
            "steps = 10",
            "steps = 10\nbandwidth = 0.0",
            "train.bandwidth",
        ),
        (
            "steps = 10",
            "steps = 10\ndecay_fraction = 1.5",
            "train.decay_fraction",
        ),
        (
            "steps = 10",
            "steps = 10\nlambda_sparsity = -2.0",
            "train.lambda_sparsity",
        ),
        ("steps = 10", "steps = 10\nlearning_rate = 0.1", "train"),
        ("steps = 10", "steps = \"ten\"", "train.steps"),
        (
            "kind = \"synthetic\"",
            "kind = \"synthetic\"\nfire_prob = 2.0",
            "data.fire_prob",
        ),
        (
            "n_features = 16",
            "n_features = 16\n[model.activation]\nkind = \"topk\"\nk = 40",
            "model.activation.k",
        ),
        (
            "steps = 10",
            "steps = 10\nparallel = \"grid\"",
            "train.feature_shards",
        ),
        (
            "steps = 10",
            "steps = 10\nparallel = \"grid\"\nfeature_shards = 0",
            "train.feature_shards",
        ),
        (
            "steps = 10",
            "steps = 10\nfeature_shards = 2",
            "train.feature_shards",
        ),
        (
            "steps = 10",
            "steps = 10\nparallel = \"data\"\noverlap = true",
            "train.overlap",
        ),
        (
            "steps = 10",
            "steps = 10\ncollectives = \"nccl\"",
            "train.collectives",
        ),
        (
            "steps = 10",
            "steps = 10\ncollectives = \"nccl\"\nbackend = \"cuda_host\"\nparallel = \"data\"",
            "train.collectives",
        ),
    ];
    for (from, to, field) in cases {
        let text = base.replace(from, to);
        match RunConfig::from_toml(&text) {
            Err(Error::Config { field: f, reason }) => {
                assert!(
                    f.starts_with(field),
                    "for `{to}`: field `{f}` ({reason}), expected `{field}`"
                )
            }
            other => panic!("for `{to}`: expected a config error, got {other:?}"),
        }
    }
}

#[test]
fn cuda_backend_without_support_is_a_clear_error() {
    let mut run = small_run(DecoderKind::CrossLayer, false);
    run.train.backend = BackendKind::Cuda;
    match Trainer::new(run) {
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "cuda");
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("expected BackendUnavailable, got {other}"),
        Ok(_) => panic!("expected BackendUnavailable, got a trainer"),
    }
}

#[test]
fn topk_models_train_and_refuse_circuit_tracer_export_until_converted() {
    let mut run = small_run(DecoderKind::CrossLayer, false);
    run.model.activation = Activation::TopK { k: 3 };
    let mut tr = Trainer::new(run).unwrap();
    let rep = tr.step().unwrap();
    for l in 0..tr.run.model.n_layers {
        assert!(rep.stats.l0(l) <= 3.0);
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        export_circuit_tracer(&tr.transcoder(), dir.path(), &ExportMeta::default()),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn batchtopk_converts_to_jumprelu_with_matching_l0() {
    use clt::clt::convert::batchtopk_to_jumprelu;
    let mut run = small_run(DecoderKind::CrossLayer, false);
    run.model.activation = Activation::BatchTopK {
        k: 2,
        across_layers: false,
    };
    run.train.steps = 40;
    let mut tr = Trainer::new(run.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tr.train(dir.path(), true).unwrap();
    let t = tr.transcoder();
    let dims = ActDims {
        n_layers: t.cfg.n_layers,
        d_model: t.cfg.d_model,
    };
    let clt::train::DataConfig::Synthetic(s) = &run.data else {
        unreachable!()
    };
    let mut source = SyntheticGenerator::new(dims, s.clone());
    let (j, rep) = batchtopk_to_jumprelu(&t, &mut source, 256, 4).unwrap();
    assert_eq!(j.cfg.activation, Activation::JumpRelu);
    for l in 0..t.cfg.n_layers {
        assert!(
            (rep.target_l0[l] - 2.0).abs() < 1e-9,
            "BatchTopK L0 is k per token: {}",
            rep.target_l0[l]
        );
        assert!(
            (rep.jumprelu_l0[l] - rep.target_l0[l]).abs() <= 0.1 * rep.target_l0[l],
            "layer {l}: {rep:?}"
        );
    }
    // The converted model now exports.
    let out = tempfile::tempdir().unwrap();
    export_circuit_tracer(&j, out.path(), &ExportMeta::default()).unwrap();
}

/// Writes `n` synthetic tokens as an int8 store dataset.
fn synthetic_store(run: &RunConfig, dir: &std::path::Path, n: usize) {
    use clt::store::{DatasetWriter, WriterConfig};
    let dims = ActDims {
        n_layers: run.model.n_layers,
        d_model: run.model.d_model,
    };
    let clt::train::DataConfig::Synthetic(s) = &run.data else {
        unreachable!()
    };
    let mut source = SyntheticGenerator::new(dims, s.clone());
    let cfg = WriterConfig {
        block_tokens: 64,
        ..WriterConfig::default()
    };
    let mut w = DatasetWriter::create(dir, dims, cfg, Default::default(), 1000).unwrap();
    let mut batch = Batch::default();
    source.next_batch(n, &mut batch).unwrap();
    w.push(&batch.x, &batch.y, None).unwrap();
    w.finish().unwrap();
}

#[test]
fn trains_from_the_activation_store_and_resumes_bit_for_bit() {
    let data = tempfile::tempdir().unwrap();
    let mut run = small_run(DecoderKind::CrossLayer, false);
    synthetic_store(&run, data.path(), 3000);
    run.data = clt::train::DataConfig::Store(clt::train::config::StoreDataConfig {
        path: data.path().to_path_buf(),
        seed: 5,
        window_blocks: 4,
        workers: 2,
        prefetch: 2,
    });
    // Through TOML, as a user writes it.
    let text = format!(
        "[model]\nn_layers = 4\nd_model = 32\nn_features = 24\n[train]\nsteps = 12\nbatch_size = 64\nwarmup_steps = 3\nlog_every = 4\ncalibration_batches = 2\ntheta_init = 1.0\n[data]\nkind = \"store\"\npath = {:?}\nseed = 5\nwindow_blocks = 4\n",
        data.path().display().to_string()
    );
    let parsed = RunConfig::from_toml(&text).unwrap();
    assert!(matches!(parsed.data, clt::train::DataConfig::Store(_)));

    let full_dir = tempfile::tempdir().unwrap();
    let mut full = Trainer::new(run.clone()).unwrap();
    let last = full.train(full_dir.path(), true).unwrap().unwrap();
    assert!(last.nmse.is_finite());

    let part_dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(run).unwrap();
    for _ in 0..7 {
        first.step().unwrap();
    }
    first.save_checkpoint(part_dir.path()).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(part_dir.path(), None).unwrap();
    resumed.train(part_dir.path(), true).unwrap();
    assert!(
        resumed.params == full.params,
        "store-fed run differs after resume"
    );
}

#[test]
fn objective_alternatives_are_options() {
    let text = r#"
[model]
n_layers = 3
d_model = 16
n_features = 32

[train]
steps = 6
batch_size = 64
warmup_steps = 2
calibration_batches = 2
lambda_ramp = "linear"
preact_scope = "dead_only"
threshold_grad = "preact"
bandwidth = 0.1
dead_window = 1

[data]
kind = "synthetic"
"#;
    let run = RunConfig::from_toml(text).unwrap();
    assert_eq!(run.train.preact_scope, clt::train::PreactScope::DeadOnly);
    assert_eq!(
        run.train.threshold_grad,
        clt::backend::ThresholdGrad::Preact
    );
    let mut t = Trainer::new(run).unwrap();
    for _ in 0..6 {
        assert!(t.step().unwrap().stats.loss().is_finite());
    }
    let bad = text.replace(
        "threshold_grad = \"preact\"",
        "threshold_grad = \"sigmoid\"",
    );
    assert!(
        matches!(RunConfig::from_toml(&bad), Err(Error::Config { field, .. }) if field.starts_with("train"))
    );
}

#[test]
fn shipped_configs_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            RunConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2);
    // The synthetic config is the demo's.
    assert_eq!(
        RunConfig::from_file(&dir.join("synthetic.toml")).unwrap(),
        clt::demo::synthetic_config()
    );
}
