//! Fuzz target: a GGUF file (header, metadata, tensor index, tensor data of every GGML type, the model and
//! tokenizer built from them) must give a value or a typed error, never a panic or an allocation sized by a
//! corrupted count (libFuzzer's `-malloc_limit_mb` reports those). Whatever loads is run: each tensor is
//! dequantised, the model runs three tokens, the tokenizer encodes and decodes a line.
//! Seeds: `seeds/gguf/` (a tiny Llama and a tiny GPT-2 file, kept in step by `tests/bad_bytes.rs`).
#![no_main]

use clt::model::CausalLm;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = clt::model::gguf::GgufFile::parse(Path::new("fuzz.gguf"), data.to_vec()) else {
        return;
    };
    for t in &g.tensors {
        let _ = g.tensor_f32(&t.name);
    }
    if let Ok(m) = g.model() {
        let _ = m.forward(&[0, 1, 2]);
    }
    if let Ok(t) = g.tokenizer()
        && let Ok(ids) = t.encode("ab ab\n<|eot|> Ġ é")
    {
        let _ = t.decode(&ids);
    }
});
