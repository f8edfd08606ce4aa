//! Fuzz target: a whole shard, its blocks included. Under `--cfg fuzzing` neither the header's nor the
//! blocks' checksums are enforced, so mutated blocks reach zstd and the codecs' own checks (quantisation
//! steps, outlier and escape indices, prediction coefficients); every block that reads is decoded (inputs,
//! targets, both at once, token ids). Nothing may panic, whatever the bytes. Seeds: `seeds/shard_blocks/`, one
//! shard per codec, kept in step by `tests/store.rs`.
#![no_main]

use clt::store::reader::{BlockReader, Shard};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The reader maps a file: each input is written to this process's own one.
    let path = std::env::temp_dir().join(format!("clt-fuzz-{}.clts", std::process::id()));
    std::fs::write(&path, data).expect("the fuzz input's file");
    let Ok(shard) = Shard::open(&path) else {
        return;
    };
    let mut reader = BlockReader::new().expect("a zstd context");
    let dims = shard.dims();
    let td = dims.n_layers * dims.d_model;
    for b in 0..shard.blocks().len() {
        let Ok(block) = reader.read(&shard, b) else {
            continue;
        };
        let n = block.n_tokens();
        let (mut x, mut y) = (vec![0.0f32; n * td], vec![0.0f32; n * td]);
        block.x_rows(0, &mut x);
        block.y_rows(0, &mut y);
        block.xy_rows(0, &mut x, &mut y);
        if n > 1 {
            block.x_rows(n - 1, &mut x[..td]);
            block.y_rows(n - 1, &mut y[..td]);
        }
        let _ = (
            block.tokens().count(),
            block.positions().count(),
            block.doc_ids().count(),
        );
    }
});
