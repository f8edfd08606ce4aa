//! Per-layer transcoder sets in the layouts circuit-tracer reads (`clt::clt::transcoder_set`): Gemma Scope's
//! NumPy archives, Gemma Scope 2's safetensors and circuit-tracer's own, named by paths or `hf://` URIs.

mod common;

use clt::clt::export::import_circuit_tracer;
use clt::clt::transcoder_set::{read_layer, resolve};
use clt::clt::{DecoderKind, checkpoint::TensorOut};
use common::npz::{Layer, npy, transpose, write_gemma_scope_set, write_npz};

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 - n as f32 / 3.0) * scale)
        .collect()
}

/// Writes `(name, shape, data)` tensors as an f32 safetensors file.
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let out: Vec<TensorOut> = tensors
        .iter()
        .map(|(n, s, data)| TensorOut {
            name: n.to_string(),
            shape: s.clone(),
            data,
        })
        .collect();
    clt::clt::checkpoint::write_tensors(path, &out, None).unwrap();
}

/// A Gemma Scope archive (encoder stored [d, F]; one member Fortran-ordered, one float64; stored or
/// deflated) reads back in circuit-tracer's shapes, the encoder transposed, element for element.
#[test]
fn gemma_scope_archives_read_transposed() {
    // Wider than the reader's 64 × 64 transpose tiles, and not a multiple of them.
    let (f, d) = (150, 67);
    let w_enc = ramp(f * d, 0.5); // [F, d], what circuit-tracer holds
    let w_dec = ramp(f * d, -0.25);
    let stored_enc = transpose(&w_enc, f, d); // [d, F], as Gemma Scope stores it
    let dir = tempfile::tempdir().unwrap();
    for deflate in [false, true] {
        let path = dir.path().join(format!("params{deflate}.npz"));
        write_npz(
            &path,
            &[
                ("W_enc", npy(&[d, f], &stored_enc, true, false)),
                ("W_dec", npy(&[f, d], &w_dec, false, true)),
                ("b_enc", npy(&[f], &ramp(f, 0.1), false, false)),
                ("b_dec", npy(&[d], &ramp(d, 0.2), false, false)),
                ("threshold", npy(&[f], &ramp(f, 0.01), false, false)),
            ],
            deflate,
        );
        let l = read_layer(&path).unwrap();
        assert_eq!((l.n_features, l.d_model), (f, d));
        assert_eq!(l.w_enc, w_enc);
        assert_eq!(l.w_dec, w_dec);
        assert_eq!(l.b_enc, ramp(f, 0.1));
        assert_eq!(l.b_dec, ramp(d, 0.2));
        assert_eq!(l.threshold, Some(ramp(f, 0.01)));
        assert_eq!(l.w_skip, None);
    }
}

/// Truncated data, a header without its keys, an integer dtype, a misshapen decoder and a file that is not
/// an archive are errors that name the file and the member.
#[test]
fn bad_archives_name_the_member() {
    let (f, d) = (4, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("params.npz");
    let good = |name: &'static str, shape: &[usize]| {
        let n = shape.iter().product();
        (name, npy(shape, &ramp(n, 1.0), false, false))
    };
    let mut truncated = good("W_dec", &[f, d]);
    truncated.1.truncate(truncated.1.len() - 3);
    let mut no_keys = good("b_dec", &[d]);
    let at = no_keys.1.windows(5).position(|w| w == b"descr").unwrap();
    no_keys.1[at] = b'x';
    let mut ints = good("b_enc", &[f]);
    let at = ints.1.windows(3).position(|w| w == b"<f4").unwrap();
    ints.1[at + 1] = b'i';
    let cases = vec![
        (
            vec![good("W_enc", &[d, f]), truncated, good("b_enc", &[f])],
            "member W_dec.npy: 29 data bytes for shape [4, 2]",
        ),
        (
            vec![good("b_enc", &[f]), no_keys],
            "member b_dec.npy: header",
        ),
        (vec![ints], "dtype <i4 is not float"),
        (
            vec![
                good("W_enc", &[d, f]),
                good("W_dec", &[f, d + 1]),
                good("b_enc", &[f]),
                good("b_dec", &[d]),
                good("threshold", &[f]),
            ],
            "shape [4, 3], expected [4, 2]",
        ),
    ];
    for (members, want) in cases {
        write_npz(&path, &members, false);
        let e = read_layer(&path).unwrap_err().to_string();
        assert!(e.contains("params.npz") && e.contains(want), "{want}: {e}");
    }
    // Gemma Scope's archives are JumpReLU: a missing threshold is an error, not a ReLU transcoder.
    let no_threshold = vec![
        good("W_enc", &[d, f]),
        good("W_dec", &[f, d]),
        good("b_enc", &[f]),
        good("b_dec", &[d]),
    ];
    write_npz(&path, &no_threshold, false);
    let e = read_layer(&path).unwrap_err().to_string();
    assert!(e.contains("threshold") && e.contains("missing"), "{e}");
    // A shape whose size overflows is an error, not an allocation or a wrapped size.
    let mut huge = npy(&[2], &[1.0, 2.0], false, false);
    let end = 10 + u16::from_le_bytes([huge[8], huge[9]]) as usize;
    let header = String::from_utf8(huge[10..end].to_vec()).unwrap();
    let (from, to) = ("(2,), }", "(4294967296, 4294967296, 4294967296), }");
    let spaces = to.len() - from.len();
    let header = header
        .replacen(from, to, 1)
        .replacen(&" ".repeat(spaces), "", 1);
    huge.splice(10..end, header.into_bytes());
    write_npz(&path, &[("b_enc", huge)], false);
    let e = read_layer(&path).unwrap_err().to_string();
    assert!(
        e.contains("member b_enc.npy") && e.contains("shape overflows"),
        "{e}"
    );
    std::fs::write(&path, b"not a zip").unwrap();
    let e = read_layer(&path).unwrap_err().to_string();
    assert!(e.contains("not a NumPy archive"), "{e}");
}

/// `hf://` entries are read from their path under the set's directory (the revision dropped), and a missing
/// one says where it was looked for; plain entries are relative to the directory.
#[test]
fn hf_uris_resolve_under_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let uri =
        "hf://google/gemma-scope-2b-pt-transcoders/layer_0/width_16k/params.npz?revision=main";
    let local = dir.path().join("layer_0/width_16k/params.npz");
    let e = resolve(dir.path(), uri).unwrap_err().to_string();
    assert!(e.contains(&local.display().to_string()), "{e}");
    std::fs::create_dir_all(local.parent().unwrap()).unwrap();
    std::fs::write(&local, b"").unwrap();
    assert_eq!(resolve(dir.path(), uri).unwrap(), local);
    assert_eq!(
        resolve(dir.path(), "layer_3.safetensors").unwrap(),
        dir.path().join("layer_3.safetensors")
    );
    assert!(resolve(dir.path(), "hf://just-a-repo").is_err());
}

/// A whole Gemma Scope set imports as a per-layer transcoder: thresholds as log-thresholds, every layer's
/// weights in place; a layer of another width is refused naming its file.
#[test]
fn a_gemma_scope_set_imports_layer_by_layer() {
    let (f, d, l_n) = (6, 4, 3);
    let w: Vec<Vec<f32>> = (0..l_n).map(|l| ramp(f * d, 0.1 + l as f32)).collect();
    let b: Vec<Vec<f32>> = (0..l_n).map(|l| ramp(f, 0.3 - l as f32)).collect();
    let bd: Vec<Vec<f32>> = (0..l_n).map(|l| ramp(d, 0.7 + l as f32)).collect();
    let th: Vec<Vec<f32>> = (0..l_n)
        .map(|l| (0..f).map(|i| 0.05 * (1 + i + l) as f32).collect())
        .collect();
    let dec: Vec<Vec<f32>> = w.iter().map(|w| w.iter().map(|v| -v).collect()).collect();
    let layers: Vec<Layer> = (0..l_n)
        .map(|l| Layer {
            w_enc: &w[l],
            w_dec: &dec[l],
            b_enc: &b[l],
            b_dec: &bd[l],
            threshold: &th[l],
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_gemma_scope_set(dir.path(), &layers, "ln2.hook_normalized");
    let t = import_circuit_tracer(dir.path()).unwrap();
    assert_eq!(
        (t.cfg.n_layers, t.cfg.d_model, t.cfg.n_features, t.cfg.skip),
        (l_n, d, f, false)
    );
    assert_eq!(t.cfg.decoder, DecoderKind::PerLayer);
    for l in 0..l_n {
        assert_eq!(t.params.w_enc[l], w[l]);
        assert_eq!(t.params.w_dec[l], dec[l]);
        assert_eq!(t.params.b_enc[l], b[l]);
        assert_eq!(t.params.b_dec[l], bd[l]);
        let back: Vec<f32> = t.params.log_theta[l].iter().map(|v| v.exp()).collect();
        for (a, b) in back.iter().zip(&th[l]) {
            assert!((a - b).abs() <= 1e-6 * b, "layer {l}: {a} vs {b}");
        }
    }
    // Layer 1 of another width.
    let wide = ramp((f + 1) * d, 1.0);
    let (wb, wt) = (ramp(f + 1, 1.0), vec![0.1; f + 1]);
    let mut bad = layers;
    bad[1] = Layer {
        w_enc: &wide,
        w_dec: &wide,
        b_enc: &wb,
        b_dec: &bd[1],
        threshold: &wt,
    };
    let dir = tempfile::tempdir().unwrap();
    write_gemma_scope_set(dir.path(), &bad, "ln2.hook_normalized");
    let e = import_circuit_tracer(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("layer_1/width_7/params.npz") && e.contains("layer 1 has 7 features"),
        "{e}"
    );
}

/// Gemma Scope 2's safetensors (lowercase names, encoder and affine skip stored transposed) and
/// circuit-tracer's own ReLU layer files (no threshold) read in circuit-tracer's shapes.
#[test]
fn gemma_scope_2_and_relu_layer_files_read() {
    let (f, d) = (5, 3);
    let w_enc = ramp(f * d, 0.5);
    let skip = ramp(d * d, 0.3);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]| {
        let path = dir.path().join(name);
        write_safetensors(&path, tensors);
        path
    };
    let path = write(
        "params.safetensors",
        &[
            ("w_enc", vec![d, f], transpose(&w_enc, f, d)),
            ("w_dec", vec![f, d], ramp(f * d, 2.0)),
            ("b_enc", vec![f], ramp(f, 0.1)),
            ("b_dec", vec![d], ramp(d, 0.2)),
            ("threshold", vec![f], ramp(f, 0.01)),
            ("affine_skip_connection", vec![d, d], transpose(&skip, d, d)),
        ],
    );
    let l = read_layer(&path).unwrap();
    assert_eq!(l.w_enc, w_enc);
    assert_eq!(l.w_dec, ramp(f * d, 2.0));
    assert_eq!(l.threshold, Some(ramp(f, 0.01)));
    assert_eq!(l.w_skip, Some(skip.clone()));
    let path = write(
        "layer_0.safetensors",
        &[
            ("W_enc", vec![f, d], w_enc.clone()),
            ("W_dec", vec![f, d], ramp(f * d, 2.0)),
            ("b_enc", vec![f], ramp(f, 0.1)),
            ("b_dec", vec![d], ramp(d, 0.2)),
            ("W_skip", vec![d, d], skip.clone()),
        ],
    );
    let l = read_layer(&path).unwrap();
    assert_eq!((l.w_enc, l.threshold, l.w_skip), (w_enc, None, Some(skip)));
}

/// circuit-tracer's `activation` key: `topk` with `k` imports a TopK set (which attribution then refuses
/// with its message, not as a ReLU), `relu` ignores thresholds the files hold, and an unknown activation
/// or a `topk` without `k` is an error naming the config.
#[test]
fn the_activation_key_decides_the_activation() {
    use clt::clt::Activation;
    let (f, d) = (4, 3);
    let dir = tempfile::tempdir().unwrap();
    for l in 0..2 {
        let w = ramp(f * d, 0.5);
        write_safetensors(
            &dir.path().join(format!("layer_{l}.safetensors")),
            &[
                ("W_enc", vec![f, d], w.clone()),
                ("W_dec", vec![f, d], w),
                ("b_enc", vec![f], ramp(f, 0.1)),
                ("b_dec", vec![d], ramp(d, 0.2)),
                ("activation_function.threshold", vec![f], vec![0.25f32; f]),
            ],
        );
    }
    let config = |extra: &str| {
        let yaml = format!(
            "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n\
             feature_output_hook: mlp.hook_out\n{extra}"
        );
        std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
        import_circuit_tracer(dir.path())
    };
    let t = config("").unwrap();
    assert_eq!(t.cfg.activation, Activation::JumpRelu);
    // The graph's scan: the config's own where it has one (as circuit-tracer's graphs carry it).
    let norm = clt::attribution::linear::NormKind::Rms;
    let lt = clt::attribution::load_transcoder(dir.path(), None, norm).unwrap();
    assert_ne!(lt.name, "llama-3.2-1b");
    config("scan: llama-3.2-1b\n").unwrap();
    let lt = clt::attribution::load_transcoder(dir.path(), None, norm).unwrap();
    assert_eq!(lt.name, "llama-3.2-1b");
    assert!(
        t.params.log_theta[1]
            .iter()
            .all(|v| (v.exp() - 0.25).abs() < 1e-6)
    );
    let t = config("activation: relu\n").unwrap();
    assert!(
        t.params
            .log_theta
            .iter()
            .flatten()
            .all(|v| *v == f32::NEG_INFINITY)
    );
    let t = config("activation: topk\nk: 3\n").unwrap();
    assert_eq!(t.cfg.activation, Activation::TopK { k: 3 });
    // Attributed as TopK, as circuit-tracer does (its thresholds unused).
    let r = clt::attribution::ReplacementTranscoder::new(&t, clt::cache::InputHook::MlpInNormed)
        .unwrap();
    assert_eq!(r.topk, Some(3));
    assert!(r.thresholds.iter().flatten().all(|&v| v == 0.0));
    for bad in ["activation: topk\n", "activation: gelu\n"] {
        let e = config(bad).unwrap_err().to_string();
        assert!(
            e.contains("config.yaml") && e.contains("activation"),
            "{bad}: {e}"
        );
    }
    let e = config("activation: topk\nk: 9\n").unwrap_err().to_string();
    assert!(e.contains("must be in 1..=4"), "{e}");
}
