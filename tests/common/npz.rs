//! NumPy files as NumPy writes them, and Gemma Scope's transcoder sets (a `params.npz` per layer, named by
//! `hf://` URIs in circuit-tracer's `config.yaml`), for the importer's tests.

use std::path::Path;

/// `[r, c]` row-major into `[c, r]`.
pub fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; a.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = a[i * c + j];
        }
    }
    out
}

/// A `.npy` file of `values` (C order) with `shape` as `np.save` writes it (version 1, header padded to 64
/// bytes), little-endian float32, or float64 when `f64` is set; `fortran` stores a 2-D array column-major.
pub fn npy(shape: &[usize], values: &[f32], fortran: bool, f64: bool) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let descr = if f64 { "<f8" } else { "<f4" };
    let order = if fortran { "True" } else { "False" };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {tuple}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    let stored: Vec<f32> = match (fortran, shape) {
        (true, &[r, c]) => transpose(values, r, c),
        _ => values.to_vec(),
    };
    for v in stored {
        if f64 {
            out.extend((v as f64).to_le_bytes());
        } else {
            out.extend(v.to_le_bytes());
        }
    }
    out
}

/// Writes a NumPy archive of `members` (name, `.npy` bytes); `deflate` compresses them as
/// `np.savez_compressed` does.
pub fn write_npz(path: &Path, members: &[(&str, Vec<u8>)], deflate: bool) {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in members {
        z.start_file(format!("{name}.npy"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

/// One layer of a per-layer transcoder in circuit-tracer's shapes: `w_enc` and `w_dec` `[F, d]`.
pub struct Layer<'a> {
    pub w_enc: &'a [f32],
    pub w_dec: &'a [f32],
    pub b_enc: &'a [f32],
    pub b_dec: &'a [f32],
    pub threshold: &'a [f32],
}

/// Writes a Gemma Scope transcoder set into `dir`: `layer_{l}/width_{F}/params.npz` per layer (encoder
/// stored `[d, F]`, as Gemma Scope stores it) and a `config.yaml` naming them by `hf://` URIs of Gemma
/// Scope's repository, as circuit-tracer's Gemma config does, reading `feature_input_hook` (and a list of
/// two scans before them, which is not a list of files).
pub fn write_gemma_scope_set(dir: &Path, layers: &[Layer<'_>], feature_input_hook: &str) {
    let mut yaml = format!(
        "model_name: gemma-tiny\nmodel_kind: transcoder_set\nfeature_input_hook: \"{feature_input_hook}\"\n\
         feature_output_hook: \"hook_mlp_out\"\nscan:\n  - gemma-tiny\n  - gemma-tiny-2\ntranscoders:\n"
    );
    for (l, t) in layers.iter().enumerate() {
        let (f, d) = (t.b_enc.len(), t.b_dec.len());
        let sub = format!("layer_{l}/width_{f}");
        std::fs::create_dir_all(dir.join(&sub)).unwrap();
        write_npz(
            &dir.join(&sub).join("params.npz"),
            &[
                (
                    "W_enc",
                    npy(&[d, f], &transpose(t.w_enc, f, d), false, false),
                ),
                ("W_dec", npy(&[f, d], t.w_dec, false, false)),
                ("b_enc", npy(&[f], t.b_enc, false, false)),
                ("b_dec", npy(&[d], t.b_dec, false, false)),
                ("threshold", npy(&[f], t.threshold, false, false)),
            ],
            false,
        );
        yaml.push_str(&format!(
            "  - \"hf://google/gemma-scope-2b-pt-transcoders/{sub}/params.npz\"\n"
        ));
    }
    std::fs::write(dir.join("config.yaml"), yaml).unwrap();
}
