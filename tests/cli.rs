//! The `clt` binary end to end: train (and resume), eval, export, import, info, and errors on bad input.

use std::path::Path;
use std::process::Command;

fn clt(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clt"))
        .args(args)
        .output()
        .expect("run clt");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn train_resume_eval_export_import_info() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/synthetic.toml");
    let (ok, out, err) = clt(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "40",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("NMSE") && out.contains("step_00000040"),
        "{out}"
    );
    let (ok, out, err) = clt(&[
        "train",
        "--resume",
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "60",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("resuming at step 40 of 60") && out.contains("step_00000060"),
        "{out}{err}"
    );
    let (ok, out, err) = clt(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--tokens",
        "512",
    ]);
    assert!(ok && out.contains("over 512 tokens"), "{out}{err}");
    let ct = tmp.path().join("ct");
    let (ok, _, err) = clt(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        ct.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(ct.join("W_dec_3.safetensors").exists());
    // A synthetic run has no store to name its hook: the MLP's input is written, and said so.
    let yaml = std::fs::read_to_string(ct.join("config.yaml")).unwrap();
    assert!(yaml.contains("feature_input_hook: mlp.hook_in\n"), "{yaml}");
    assert!(yaml.contains("\nscan: unknown\n"), "{yaml}");
    assert!(
        yaml.contains("feature_output_hook: hook_mlp_out\n"),
        "{yaml}"
    );
    assert!(err.contains("no cache.json found"), "{err}");
    // Imported with other hook names, the native checkpoint keeps them: attribution reads `resid_mid`
    // and export writes the names back.
    let yaml = yaml.replace("mlp.hook_in", "hook_resid_mid");
    std::fs::write(ct.join("config.yaml"), &yaml).unwrap();
    let native = tmp.path().join("native");
    let (ok, out, err) = clt(&[
        "import",
        "--from",
        ct.to_str().unwrap(),
        "--out",
        native.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("4 layers × 64 features"), "{out}{err}");
    let (ok, out, _) = clt(&["info", "--checkpoint", native.to_str().unwrap()]);
    assert!(ok && out.contains("\"n_features\": 64"), "{out}");
    let norm = clt::attribution::linear::NormKind::Rms;
    let lt = clt::attribution::load_transcoder(&native, None, norm).unwrap();
    assert_eq!(lt.input_hook, clt::cache::InputHook::ResidMid);
    assert_eq!(lt.output_hook.unwrap().0, "hook_mlp_out");
    let back = tmp.path().join("ct2");
    let (ok, _, err) = clt(&[
        "export",
        "--checkpoint",
        native.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(ok && !err.contains("no cache.json"), "{err}");
    let again = std::fs::read_to_string(back.join("config.yaml")).unwrap();
    assert!(
        again.contains("feature_input_hook: hook_resid_mid\n"),
        "{again}"
    );
}

#[test]
fn bad_input_is_reported_not_panicked() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[model]\nn_layers = 2\nd_model = 8\nn_features = 0\n[data]\nkind = \"synthetic\"\n",
    )
    .unwrap();
    let (ok, _, err) = clt(&[
        "train",
        "--config",
        bad.to_str().unwrap(),
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("model.n_features") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = clt(&["info", "--checkpoint", tmp.path().to_str().unwrap()]);
    assert!(!ok && err.contains("LATEST"), "{err}");
    let (ok, _, err) = clt(&["run", "--model", bad.to_str().unwrap(), "--prompt", "hi"]);
    assert!(
        !ok && err.contains("bad.toml") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = clt(&[
        "train",
        "--config",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs/synthetic.toml")
            .to_str()
            .unwrap(),
        "--backend",
        "cuda",
        "--out",
        tmp.path().join("c").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("CUDA"), "{err}");
}

/// `clt eval --data`: every token of a held-out store once, across the evaluator's 4,096-token batches,
/// however many `--tokens` asks for; the figures match one direct pass over all tokens.
#[test]
fn eval_reads_each_held_out_token_once() {
    use clt::data::ActDims;
    use clt::store::{Codec, DatasetWriter, WriterConfig, format::ShardMeta};
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/synthetic.toml");
    let (ok, _, err) = clt(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "30",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let t = clt::dist::checkpoint::load_transcoder(&run).unwrap();
    let (l_n, d) = (t.cfg.n_layers, t.cfg.d_model);
    // Targets with a per-layer offset, which the variance about the mean must remove.
    let n = 5_000;
    let mut rng = clt::rng::Rng::seed(3);
    let x: Vec<f32> = (0..n * l_n * d).map(|_| rng.normal() as f32).collect();
    let y: Vec<f32> = (0..n * l_n * d)
        .map(|i| 3.0 * ((i / d) % l_n) as f32 + rng.normal() as f32)
        .collect();
    let store = tmp.path().join("held-out");
    let wcfg = WriterConfig {
        codec: Codec::F32,
        block_tokens: 256,
        ..WriterConfig::default()
    };
    let dims = ActDims {
        n_layers: l_n,
        d_model: d,
    };
    let mut w = DatasetWriter::create(&store, dims, wcfg, ShardMeta::default(), 2_000).unwrap();
    w.push(&x, &y, None).unwrap();
    w.finish().unwrap();

    let json = tmp.path().join("eval.json");
    let (ok, out, err) = clt(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        store.to_str().unwrap(),
        "--tokens",
        "100000",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("over 5000 tokens"), "{out}");
    assert!(err.contains("holds 5000 tokens"), "{err}");
    assert!(!err.contains("not held out"), "{err}");

    // One pass over all 5,000 tokens, in store order.
    let (mut xn, mut yn) = (x.clone(), y.clone());
    t.norms.apply(d, &mut xn, &mut yn);
    let (codes, yhat) = clt::backend::cpu::sparse::forward(&t.cfg, &t.params, &xn, n, 1.0);
    let (_, sq) = clt::backend::cpu::sparse::residual(&yhat, &yn, n, l_n, d);
    let var = clt::backend::grads::target_variance(&yn, n, l_n, d);
    let want = sq.iter().sum::<f64>() / var.iter().sum::<f64>();
    let got: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("NMSE "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (got - want).abs() < 1e-4,
        "NMSE {got} printed, {want} in one pass"
    );
    for (l, line) in out
        .lines()
        .skip_while(|l| !l.starts_with("layer"))
        .skip(1)
        .take(l_n)
        .enumerate()
    {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let printed: f64 = cols[1].parse().unwrap();
        let want = sq[l] / var[l];
        assert!(
            (printed - want).abs() < 1e-4,
            "layer {l}: {printed} vs {want}"
        );
        // Dead: features that fired on none of the 5,000 tokens.
        let dead = codes[l].active_count.iter().filter(|c| **c == 0).count();
        assert_eq!(cols[4], dead.to_string(), "layer {l}: {line}");
    }
    // The same report as JSON, unrounded.
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["n_tokens"], 5000);
    assert!((v["nmse"].as_f64().unwrap() - want).abs() < 1e-6, "{v}");
    assert!((v["explained_variance"].as_f64().unwrap() - (1.0 - want)).abs() < 1e-6);
    for l in 0..l_n {
        let nmse = v["nmse_per_layer"][l].as_f64().unwrap();
        assert!((nmse - sq[l] / var[l]).abs() < 1e-6, "layer {l}: {nmse}");
        let dead = codes[l].active_count.iter().filter(|c| **c == 0).count();
        assert_eq!(v["dead_per_layer"][l], dead, "layer {l}");
        assert!(v["l0_per_layer"][l].as_f64().unwrap() >= 0.0);
    }
}

/// `clt convert-batchtopk`'s output keeps what its run trained on: `eval` finds the synthetic held-out
/// region or asks for a store, `export` and `attribute` read the hook the store recorded (here
/// `resid_mid`, not the default); an imported transcoder, which records nothing, is told to pass --data.
#[test]
fn a_converted_checkpoint_keeps_its_runs_data_and_hook() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        shared.is_dir(),
        "../shared is missing: this test needs the stories260K fixture and the corpus"
    );
    let s = |p: &str| shared.join(p).to_str().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let (ok, _, err) = clt(&[
        "cache",
        "--model",
        &s("models/stories260K/stories260K.bin"),
        "--tokenizer",
        &s("models/stories260K/tok512.bin"),
        "--corpus",
        &s("corpus/tinystories_valid_head.txt"),
        "--out",
        &p("acts"),
        "--max-tokens",
        "3000",
        "--input-hook",
        "resid-mid",
    ]);
    assert!(ok, "{err}");
    let toml = "[model]\nn_layers = 5\nd_model = 64\nn_features = 128\n\
                [model.activation]\nkind = \"batchtopk\"\nk = 8\n\
                [train]\nsteps = 20\nbatch_size = 256\n\
                [data]\nkind = \"store\"\npath = \"ACTS\"\n"
        .replace("ACTS", &p("acts"));
    std::fs::write(tmp.path().join("btk.toml"), toml).unwrap();
    let (ok, _, err) = clt(&[
        "train",
        "--config",
        &p("btk.toml"),
        "--out",
        &p("btk"),
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = clt(&[
        "convert-batchtopk",
        "--checkpoint",
        &p("btk"),
        "--out",
        &p("j"),
        "--batches",
        "2",
        "--batch-size",
        "512",
    ]);
    assert!(ok, "{out}{err}");

    let (ok, _, err) = clt(&["eval", "--checkpoint", &p("j")]);
    assert!(!ok && err.contains("needs --data"), "{err}");
    let (ok, out, err) = clt(&["eval", "--checkpoint", &p("j"), "--data", &p("acts")]);
    assert!(ok && out.contains("over 3000 tokens"), "{out}{err}");
    assert!(err.contains("not held out"), "{err}");
    let (ok, _, err) = clt(&["export", "--checkpoint", &p("j"), "--out", &p("ct")]);
    assert!(ok && !err.contains("no cache.json"), "{err}");
    let yaml = std::fs::read_to_string(tmp.path().join("ct/config.yaml")).unwrap();
    assert!(
        yaml.contains("feature_input_hook: hook_resid_mid\n"),
        "{yaml}"
    );
    let norm = clt::attribution::linear::NormKind::Rms;
    let lt = clt::attribution::load_transcoder(&tmp.path().join("j"), None, norm).unwrap();
    assert_eq!(lt.input_hook, clt::cache::InputHook::ResidMid);

    let (ok, _, err) = clt(&["import", "--from", &p("ct"), "--out", &p("imported")]);
    assert!(ok, "{err}");
    let (ok, _, err) = clt(&["eval", "--checkpoint", &p("imported")]);
    assert!(!ok && err.contains("records no training data"), "{err}");
    let (ok, out, err) = clt(&["eval", "--checkpoint", &p("imported"), "--data", &p("acts")]);
    assert!(ok && out.contains("over 3000 tokens"), "{out}{err}");

    // A converted synthetic run is evaluated on its generator's held-out region.
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/synthetic.toml");
    let synth = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("kind = \"jumprelu\"", "kind = \"topk\"\nk = 4");
    std::fs::write(tmp.path().join("synth.toml"), synth).unwrap();
    let (ok, _, err) = clt(&[
        "train",
        "--config",
        &p("synth.toml"),
        "--out",
        &p("topk"),
        "--steps",
        "20",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = clt(&[
        "convert-batchtopk",
        "--checkpoint",
        &p("topk"),
        "--out",
        &p("tj"),
        "--batches",
        "2",
        "--batch-size",
        "256",
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = clt(&["eval", "--checkpoint", &p("tj"), "--tokens", "300"]);
    assert!(ok && out.contains("over 300 tokens"), "{out}{err}");
}
