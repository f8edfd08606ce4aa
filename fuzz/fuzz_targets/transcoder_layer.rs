//! Fuzz target: one layer of a per-layer transcoder set as circuit-tracer reads it, a
//! `layer_0.safetensors` (first byte even) or a Gemma Scope `params.npz` (odd), must give a layer or a
//! typed error, never a panic or an allocation sized by a corrupted shape. For the archive the input is the
//! members' `.npy` bytes one after the other, split before each `.npy` magic and named `W_enc`, `W_dec`,
//! `b_enc`, `b_dec`, `threshold` in that order, then archived intact (stored), so that mutations reach the
//! NumPy parser and the shape checks rather than the archive's checksums.
//! Seeds: `seeds/transcoder_layer/`, kept in step by `tests/bad_bytes.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;

const MAGIC: &[u8] = b"\x93NUMPY";
const NAMES: [&str; 5] = ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("clt-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the fuzz input's folder");
    let path = if pick & 1 == 0 {
        let path = dir.join("layer_0.safetensors");
        std::fs::write(&path, bytes).expect("the fuzz input's file");
        path
    } else {
        let mut starts: Vec<usize> = (1..bytes.len().saturating_sub(MAGIC.len() - 1))
            .filter(|&i| bytes[i..].starts_with(MAGIC))
            .collect();
        starts.insert(0, 0);
        starts.push(bytes.len());
        let path = dir.join("params.npz");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).expect("the archive"));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, w) in NAMES.iter().zip(starts.windows(2)) {
            z.start_file(format!("{name}.npy"), opts).expect("a member");
            z.write_all(&bytes[w[0]..w[1]]).expect("a member's bytes");
        }
        z.finish().expect("the archive's directory");
        path
    };
    let _ = clt::clt::transcoder_set::read_layer(&path);
});
