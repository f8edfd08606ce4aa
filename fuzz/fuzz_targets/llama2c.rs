//! Fuzz target: llama2.c's checkpoint (7 header integers, then the weights) and tokenizer (a header
//! integer, then score, length and bytes per piece) must give a value or a typed error, never a panic or
//! an allocation sized by a corrupted count. The first byte picks the file; whatever loads is run.
//! Seeds: `seeds/llama2c/` (a tiny checkpoint, stories260K's tokenizer; kept in step by `tests/bad_bytes.rs`).
#![no_main]

use clt::model::CausalLm;
use clt::model::llama2c;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz.bin");
    if pick & 1 == 0 {
        let _ = llama2c::looks_like_checkpoint(bytes, bytes.len() as u64);
        if let Ok(m) = llama2c::parse_checkpoint(path, bytes) {
            let _ = m.forward(&[1, 2, 3]);
        }
    } else if let Ok(t) = llama2c::Llama2cTokenizer::parse(path, bytes, 512) {
        let ids = t.encode("ab ab\n é", true);
        let _ = t.decode(&ids);
        for i in 0..ids.len() as u32 + 2 {
            let _ = t.piece(i);
            let _ = t.decode_piece(1, i);
        }
    }
});
