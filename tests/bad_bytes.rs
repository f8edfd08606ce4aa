//! Corrupt input files never panic nor abort: random byte edits, planted extreme integers and truncations of
//! valid files (a GGUF model with its vocabulary, a llama2.c checkpoint and tokenizer, a Gemma Scope
//! `params.npz` layer, a circuit-tracer `layer_0.safetensors`, pyarrow's Parquet corpus files) give a value
//! or a typed error, and whatever loads also runs (a forward, a tokenisation). An allocation sized by a corrupted count aborts the process
//! (this binary's allocator refuses anything over 64 MiB): these tests then fail by dying, not by returning.
//!
//! The edits go mostly where the counts and sizes are (headers, metadata, tensor index), so that the loaders'
//! checks, not only the checksums and the magic bytes, are what stands between the bytes and the model.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};

use clt::corpus::Documents;
use clt::model::{CausalLm, gguf::GgufFile, llama2c};
use proptest::prelude::*;

/// The largest allocation this test binary grants. The inputs are a few kilobytes (the stories260K
/// checkpoint 1 MB), so a larger request is memory sized by a corrupted count: refused, it aborts the
/// process (the test fails loudly) even where the machine could have given it.
const ALLOC_CAP: usize = 64 << 20;

/// The system allocator, refusing requests over [`ALLOC_CAP`].
struct Capped;

// SAFETY: every call is forwarded to the system allocator with the caller's own arguments (whose contracts
// the caller upholds), or answered with null, which `GlobalAlloc` allows for any request it cannot serve.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` was allocated by `System` (every grant above is), with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// One change to a file's bytes; positions are fractions of the region they fall in.
#[derive(Clone, Debug)]
enum Edit {
    /// Overwrite one byte (in the head region when `head`, else anywhere).
    Byte { at: f64, head: bool, value: u8 },
    /// Write an extreme value as a little-endian integer: into one of the file's integer fields when they
    /// are known (then `width` is the field's), else of `width` bytes at a 4-aligned place in the head.
    Word { at: f64, width: usize, value: u64 },
    /// Cut the file short.
    Cut { at: f64 },
}

/// Values a corrupted count or size tends to take.
const EXTREMES: [u64; 14] = [
    0,
    1,
    2,
    3,
    7,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    u64::MAX,
];

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (0.0..1.0f64, prop::bool::weighted(0.8), any::<u8>())
            .prop_map(|(at, head, value)| Edit::Byte { at, head, value }),
        3 => (0.0..1.0f64, prop_oneof![Just(4usize), Just(8)], prop::sample::select(EXTREMES.to_vec()))
            .prop_map(|(at, width, value)| Edit::Word { at, width, value }),
        1 => (0.0..1.0f64).prop_map(|at| Edit::Cut { at }),
    ]
}

/// `bytes` with `edits` applied; `head` is the length of the region where the counts and sizes are.
fn apply(bytes: &[u8], head: usize, edits: &[Edit]) -> Vec<u8> {
    apply_to_fields(bytes, head, &[], edits)
}

/// The same, with the file's integer fields as (offset, width) for the `Word` edits.
fn apply_to_fields(
    bytes: &[u8],
    head: usize,
    fields: &[(usize, usize)],
    edits: &[Edit],
) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for e in edits {
        if b.is_empty() {
            break;
        }
        let head = head.min(b.len());
        let pick = |at: f64, n: usize| ((at * n as f64) as usize).min(n.saturating_sub(1));
        match *e {
            Edit::Byte { at, head: h, value } => {
                let i = pick(at, if h { head } else { b.len() });
                b[i] = value;
            }
            Edit::Word { at, width, value } => {
                let (i, width) = match fields.len() {
                    0 => (pick(at, head) / 4 * 4, width),
                    n => fields[pick(at, n)],
                };
                let i = i.min(b.len());
                let end = (i + width).min(b.len());
                b[i..end].copy_from_slice(&value.to_le_bytes()[..end - i]);
            }
            Edit::Cut { at } => b.truncate(pick(at, b.len())),
        }
    }
    b
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- GGUF ----------------------------------------------------------------------------------------------

const D: usize = 8;
const VOCAB: usize = 16;

/// A tiny GGUF model of architecture `arch` (`llama`: 2 layers, d 8, 2 heads of width 4 sharing one
/// key/value head, linear RoPE scaling; `gpt2`: 2 layers, d 8, 2 heads, learned positions) with a byte-level
/// BPE vocabulary of 16, and the length of its header (metadata and tensor index).
fn tiny_gguf(arch: &str) -> (Vec<u8>, usize) {
    use common::gguf::{Meta, write_gguf};
    let (h, n_pos) = (16usize, 16usize);
    let mut r = common::hf::Rng(7);
    let mut t: Vec<(String, Vec<u64>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, ne: &[usize]| {
        let n = ne.iter().product();
        t.push((name, ne.iter().map(|&x| x as u64).collect(), r.vals(n, 0.5)));
    };
    add("token_embd.weight".into(), &[D, VOCAB]);
    add("output_norm.weight".into(), &[D]);
    let u = |v: usize| Meta::U32(v as u32);
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta = vec![
        (k("context_length"), u(n_pos)),
        (k("embedding_length"), u(D)),
        (k("feed_forward_length"), u(h)),
        (k("block_count"), u(2)),
        (k("attention.head_count"), u(2)),
    ];
    if arch == "gpt2" {
        add("position_embd.weight".into(), &[D, n_pos]);
        add("output_norm.bias".into(), &[D]);
        for l in 0..2 {
            for (name, ne) in [
                ("attn_norm", vec![D]),
                ("attn_qkv", vec![D, 3 * D]),
                ("attn_output", vec![D, D]),
                ("ffn_norm", vec![D]),
                ("ffn_up", vec![D, h]),
                ("ffn_down", vec![h, D]),
            ] {
                let out = ne.last().copied().unwrap();
                add(format!("blk.{l}.{name}.weight"), &ne);
                add(format!("blk.{l}.{name}.bias"), &[out]);
            }
        }
        meta.push((k("attention.layer_norm_epsilon"), Meta::F32(1e-5)));
    } else {
        let (q, kv) = (D, 4usize);
        for l in 0..2 {
            for (name, ne) in [
                ("attn_norm", vec![D]),
                ("attn_q", vec![D, q]),
                ("attn_k", vec![D, kv]),
                ("attn_v", vec![D, kv]),
                ("attn_output", vec![q, D]),
                ("ffn_norm", vec![D]),
                ("ffn_gate", vec![D, h]),
                ("ffn_up", vec![D, h]),
                ("ffn_down", vec![h, D]),
            ] {
                add(format!("blk.{l}.{name}.weight"), &ne);
            }
        }
        meta.extend([
            (k("attention.head_count_kv"), u(1)),
            (k("attention.key_length"), u(4)),
            (k("attention.layer_norm_rms_epsilon"), Meta::F32(1e-5)),
            (k("rope.freq_base"), Meta::F32(10000.0)),
            (k("rope.scaling.type"), Meta::Str("linear".into())),
            (k("rope.scaling.factor"), Meta::F32(2.0)),
        ]);
    }
    let mut pieces: Vec<String> = ["a", "b", "ab", "Ġ", "Ġab", "Ċ"]
        .map(str::to_string)
        .to_vec();
    while pieces.len() < VOCAB - 1 {
        pieces.push(format!("x{}", pieces.len()));
    }
    pieces.push("<|eot|>".into());
    meta.extend([
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("llama-bpe".into())),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(pieces)),
        (
            "tokenizer.ggml.token_type".into(),
            Meta::I32s(
                (0..VOCAB as i32)
                    .map(|i| if i == 15 { 3 } else { 1 })
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Meta::Strs(vec!["a b".into(), "Ġ ab".into()]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(VOCAB - 1)),
        ("tokenizer.ggml.eos_token_id".into(), u(VOCAB - 1)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true)),
    ]);
    meta.insert(0, ("general.architecture".into(), Meta::Str(arch.into())));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &meta, &t);
    let bytes = std::fs::read(&path).unwrap();
    let data: usize = t
        .iter()
        .map(|(_, _, v)| (v.len() * 4).div_ceil(32) * 32)
        .sum();
    (bytes.clone(), bytes.len() - data)
}

/// The two architectures whose GGUF files [`tiny_gguf`] writes.
const ARCHS: [&str; 2] = ["llama", "gpt2"];

/// The integer fields of a GGUF file's header as (offset, width): the counts, every key's and string's
/// length, the value types, the numbers, the arrays' types and lengths, each tensor's name length,
/// dimension count, dimensions, type and offset (the format's layout, walked independently of the crate).
fn gguf_fields(b: &[u8]) -> Vec<(usize, usize)> {
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) as usize;
    let mut f = vec![(8, 8), (16, 8)];
    let (n_tensors, n_kv) = (u64_at(8), u64_at(16));
    let mut i = 24;
    let string = |f: &mut Vec<(usize, usize)>, i: &mut usize| {
        f.push((*i, 8));
        *i += 8 + u64_at(*i);
    };
    // The size of a scalar of each value type (0–7 and 10–12); 8 is a string, 9 an array.
    let scalar = |t: u32| [1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8][t as usize];
    for _ in 0..n_kv {
        string(&mut f, &mut i);
        let t = u32_at(i);
        f.push((i, 4));
        i += 4;
        match t {
            8 => string(&mut f, &mut i),
            9 => {
                let et = u32_at(i);
                f.extend([(i, 4), (i + 4, 8)]);
                let n = u64_at(i + 4);
                i += 12;
                for _ in 0..n {
                    if et == 8 {
                        string(&mut f, &mut i);
                    } else {
                        f.push((i, scalar(et)));
                        i += scalar(et);
                    }
                }
            }
            t => {
                f.push((i, scalar(t)));
                i += scalar(t);
            }
        }
    }
    for _ in 0..n_tensors {
        string(&mut f, &mut i);
        let nd = u32_at(i) as usize;
        f.push((i, 4));
        i += 4;
        for _ in 0..nd {
            f.push((i, 8));
            i += 8;
        }
        f.extend([(i, 4), (i + 4, 8)]);
        i += 12;
    }
    f
}

/// Loads what it can of `bytes` as a GGUF file and runs it: a forward of three tokens, a tokenisation and
/// its decoding.
fn exercise_gguf(bytes: Vec<u8>) {
    let Ok(g) = GgufFile::parse(Path::new("fuzzed.gguf"), bytes) else {
        return;
    };
    if let Ok(m) = g.model() {
        let _ = m.forward(&[0, 1, 2]);
    }
    if let Ok(t) = g.tokenizer()
        && let Ok(ids) = t.encode("ab ab\n")
    {
        let _ = t.decode(&ids);
    }
}

#[test]
fn the_unedited_ggufs_load_run_and_tokenise() {
    for arch in ARCHS {
        let (bytes, head) = tiny_gguf(arch);
        assert!(head > 0 && head < bytes.len());
        // The walk of the header ends where the tensor index does (before the alignment padding).
        let (at, width) = *gguf_fields(&bytes).last().unwrap();
        assert!(
            at + width <= head && head - (at + width) < 32,
            "{at} {width} {head}"
        );
        let g = GgufFile::parse(Path::new("tiny.gguf"), bytes).unwrap();
        let m = g.model().unwrap();
        assert_eq!(m.architecture(), arch);
        assert_eq!(m.forward(&[0, 1, 2]).unwrap().len(), 3 * VOCAB);
        assert_eq!(g.tokenizer().unwrap().encode("ab ab").unwrap(), [15, 2, 4]);
    }
}

/// Every integer field of the header, one at a time, set to every extreme value (a sweep, so that no count
/// is left to chance).
#[test]
fn every_gguf_header_field_at_every_extreme_gives_a_model_or_an_error() {
    for arch in ARCHS {
        let (bytes, head) = tiny_gguf(arch);
        let fields = gguf_fields(&bytes);
        for at in 0..fields.len() {
            for value in EXTREMES {
                let edit = Edit::Word {
                    at: (at as f64 + 0.5) / fields.len() as f64,
                    width: 0,
                    value,
                };
                exercise_gguf(apply_to_fields(&bytes, head, &fields, &[edit]));
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]
    #[test]
    fn edited_gguf_files_give_a_model_or_an_error(
        arch in prop::sample::select(ARCHS.to_vec()),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let (bytes, head) = tiny_gguf(arch);
        exercise_gguf(apply_to_fields(&bytes, head, &gguf_fields(&bytes), &edits));
    }
}

// ---- llama2.c ------------------------------------------------------------------------------------------

/// A file of the stories260K fixture (read-only, shared with CI); a missing one fails the test, naming it.
fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/models/stories260K")
        .join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{} is needed by this test: {e}", path.display()))
}

/// Each of the checkpoint's 7 header integers at every extreme value.
#[test]
fn every_llama2c_header_field_at_every_extreme_gives_a_model_or_an_error() {
    let bytes = fixture("stories260K.bin");
    for i in 0..7 {
        for value in EXTREMES {
            let edit = Edit::Word {
                at: (i as f64 + 0.5) / 7.0,
                width: 4,
                value,
            };
            let b = apply(&bytes, 28, &[edit]);
            if let Ok(m) = llama2c::parse_checkpoint(Path::new("fuzzed.bin"), &b) {
                let _ = m.forward(&[1, 2, 3]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..config() })]
    /// The checkpoint's header is 7 integers (28 bytes); the edits go there, and some anywhere.
    #[test]
    fn edited_llama2c_checkpoints_give_a_model_or_an_error(
        edits in prop::collection::vec(edit(), 1..4)
    ) {
        let bytes = apply(&fixture("stories260K.bin"), 28, &edits);
        if let Ok(m) = llama2c::parse_checkpoint(Path::new("fuzzed.bin"), &bytes) {
            let _ = m.forward(&[1, 2, 3]);
        }
    }

    /// The tokenizer file is a header integer, then (score, length, bytes) per piece.
    #[test]
    fn edited_llama2c_tokenizers_give_a_tokenizer_or_an_error(
        edits in prop::collection::vec(edit(), 1..6)
    ) {
        let bytes = apply(&fixture("tok512.bin"), 256, &edits);
        if let Ok(t) = llama2c::Llama2cTokenizer::parse(Path::new("fuzzed.bin"), &bytes, 512) {
            let ids = t.encode("ab ab\n", true);
            let _ = t.decode(&ids);
        }
    }
}

// ---- transcoder layers ---------------------------------------------------------------------------------

/// A Gemma Scope layer's members (`.npy` bytes, encoder stored `[d, F]`) for d 4 and F 6.
fn npz_members() -> Vec<(&'static str, Vec<u8>)> {
    use common::npz::npy;
    let (d, f) = (4, 6);
    let mut r = common::hf::Rng(11);
    vec![
        ("W_enc", npy(&[d, f], &r.vals(d * f, 1.0), false, false)),
        ("W_dec", npy(&[f, d], &r.vals(f * d, 1.0), true, false)),
        ("b_enc", npy(&[f], &r.vals(f, 1.0), false, true)),
        ("b_dec", npy(&[d], &r.vals(d, 1.0), false, false)),
        ("threshold", npy(&[f], &r.vals(f, 1.0), false, false)),
    ]
}

fn read_layer_of(bytes: &[u8], name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let _ = clt::clt::transcoder_set::read_layer(&path);
}

#[test]
fn the_unedited_layers_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("params.npz");
    common::npz::write_npz(&path, &npz_members(), false);
    let l = clt::clt::transcoder_set::read_layer(&path).unwrap();
    assert_eq!((l.n_features, l.d_model), (6, 4));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..config() })]
    /// Edits inside one `.npy` member (its header first: magic, version, header length, the dictionary),
    /// archived intact, so the archive's checksums do not stop them before the NumPy parser.
    #[test]
    fn edited_npy_members_give_a_layer_or_an_error(
        member in 0usize..5,
        edits in prop::collection::vec(edit(), 1..5),
        deflate in any::<bool>(),
    ) {
        let mut members = npz_members();
        members[member].1 = apply(&members[member].1, 80, &edits);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("params.npz");
        common::npz::write_npz(&path, &members, deflate);
        let _ = clt::clt::transcoder_set::read_layer(&path);
    }

    /// Edits to the archive itself (local headers, central directory at the end).
    #[test]
    fn edited_npz_archives_give_a_layer_or_an_error(edits in prop::collection::vec(edit(), 1..5)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("params.npz");
        common::npz::write_npz(&path, &npz_members(), true);
        let mut bytes = std::fs::read(&path).unwrap();
        // The central directory is at the end: reverse, edit the head, reverse back.
        let half = edits.len() / 2;
        bytes = apply(&bytes, 256, &edits[..half]);
        bytes.reverse();
        bytes = apply(&bytes, 256, &edits[half..]);
        bytes.reverse();
        read_layer_of(&bytes, "params.npz");
    }

    /// Edits to a circuit-tracer `layer_0.safetensors` (its JSON header first).
    #[test]
    fn edited_safetensors_layers_give_a_layer_or_an_error(edits in prop::collection::vec(edit(), 1..5)) {
        let bytes = safetensors_layer();
        read_layer_of(&apply(&bytes, 400, &edits), "layer_0.safetensors");
    }
}

/// A circuit-tracer per-layer transcoder file for d 4 and F 6, as bytes.
fn safetensors_layer() -> Vec<u8> {
    let (d, f) = (4, 6);
    let mut r = common::hf::Rng(13);
    let tensors: Vec<common::hf::Tensor> = vec![
        ("W_enc".into(), r.vals(f * d, 1.0), vec![f, d]),
        ("W_dec".into(), r.vals(f * d, 1.0), vec![f, d]),
        ("b_enc".into(), r.vals(f, 1.0), vec![f]),
        ("b_dec".into(), r.vals(d, 1.0), vec![d]),
        (
            "activation_function.threshold".into(),
            r.vals(f, 1.0),
            vec![f],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    common::hf::write_safetensors(dir.path(), &tensors, "", &[]);
    std::fs::read(dir.path().join("model.safetensors")).unwrap()
}

#[test]
fn the_unedited_safetensors_layer_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer_0.safetensors");
    std::fs::write(&path, safetensors_layer()).unwrap();
    let l = clt::clt::transcoder_set::read_layer(&path).unwrap();
    assert_eq!((l.n_features, l.d_model), (6, 4));
    assert!(l.threshold.is_some());
}

// ---- native checkpoints --------------------------------------------------------------------------------

/// A native checkpoint directory of a 3-layer cross-layer transcoder (d 4, F 6, skip connections).
fn checkpoint() -> tempfile::TempDir {
    use clt::clt::{Activation, CltConfig, DecoderKind, NormScales, Transcoder};
    let cfg = CltConfig {
        n_layers: 3,
        d_model: 4,
        n_features: 6,
        decoder: DecoderKind::CrossLayer,
        activation: Activation::JumpRelu,
        skip: true,
    };
    let params = common::random_params(&cfg, &mut clt::rng::Rng::seed(5));
    let t = Transcoder {
        norms: NormScales::identity(3),
        cfg,
        params,
    };
    let dir = tempfile::tempdir().unwrap();
    clt::clt::checkpoint::save_transcoder(dir.path(), &t).unwrap();
    dir
}

/// Each size in `config.json` at every extreme value: the checkpoint loads or is refused, never sized by
/// the claim.
#[test]
fn every_checkpoint_size_at_every_extreme_gives_a_transcoder_or_an_error() {
    let dir = checkpoint();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(clt::clt::checkpoint::load_transcoder(dir.path()).is_ok());
    let mut refused = 0;
    for key in ["n_layers", "d_model", "n_features"] {
        for value in EXTREMES {
            let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["model"][key] = value.into();
            std::fs::write(&path, v.to_string()).unwrap();
            if clt::clt::checkpoint::load_transcoder(dir.path()).is_err() {
                refused += 1;
            }
        }
    }
    // Every value but the checkpoint's own is refused.
    assert!(refused >= 3 * (EXTREMES.len() - 1), "{refused}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..config() })]
    /// Edits to a native checkpoint's `model.safetensors` (its JSON header first).
    #[test]
    fn edited_checkpoint_tensors_give_a_transcoder_or_an_error(
        edits in prop::collection::vec(edit(), 1..5)
    ) {
        let dir = checkpoint();
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, apply(&bytes, 1200, &edits)).unwrap();
        let _ = clt::clt::checkpoint::load_transcoder(dir.path());
    }
}

// ---- Hugging Face directories --------------------------------------------------------------------------

/// The three architectures a Hugging Face directory may hold.
const HF_TYPES: [&str; 3] = ["llama", "gemma2", "gpt2"];

/// A tiny Hugging Face directory of `model_type` (2 layers, d 8, 2 heads of width 4, vocabulary 16; Llama
/// with one key/value head and Llama 3's RoPE scaling, Gemma-2 with a window of 4) and a toy tokenizer.
fn hf_dir(model_type: &str) -> tempfile::TempDir {
    let (d, h, v, n_pos) = (8usize, 16usize, 16usize, 16usize);
    let mut r = common::hf::Rng(17);
    let mut t: Vec<common::hf::Tensor> = Vec::new();
    let mut add = |name: String, shape: &[usize]| {
        t.push((name, r.vals(shape.iter().product(), 0.5), shape.to_vec()));
    };
    let cfg = if model_type == "gpt2" {
        add("wte.weight".into(), &[v, d]);
        add("wpe.weight".into(), &[n_pos, d]);
        for l in 0..2 {
            for (name, n_in, n_out) in [
                ("ln_1", 0, d),
                ("attn.c_attn", d, 3 * d),
                ("attn.c_proj", d, d),
                ("ln_2", 0, d),
                ("mlp.c_fc", d, 4 * d),
                ("mlp.c_proj", 4 * d, d),
            ] {
                let w = if n_in == 0 {
                    vec![n_out]
                } else {
                    vec![n_in, n_out]
                };
                add(format!("h.{l}.{name}.weight"), &w);
                add(format!("h.{l}.{name}.bias"), &[n_out]);
            }
        }
        add("ln_f.weight".into(), &[d]);
        add("ln_f.bias".into(), &[d]);
        serde_json::json!({
            "model_type": "gpt2", "n_embd": d, "n_layer": 2, "n_head": 2, "n_inner": null,
            "vocab_size": v, "n_positions": n_pos, "layer_norm_epsilon": 1e-5, "eos_token_id": 15
        })
    } else {
        let gemma = model_type == "gemma2";
        let (q, kv) = (8usize, if gemma { 8 } else { 4 });
        add("model.embed_tokens.weight".into(), &[v, d]);
        add("model.norm.weight".into(), &[d]);
        for l in 0..2 {
            let mut names = vec![
                ("input_layernorm", vec![d]),
                ("self_attn.q_proj", vec![q, d]),
                ("self_attn.k_proj", vec![kv, d]),
                ("self_attn.v_proj", vec![kv, d]),
                ("self_attn.o_proj", vec![d, q]),
                ("post_attention_layernorm", vec![d]),
                ("mlp.gate_proj", vec![h, d]),
                ("mlp.up_proj", vec![h, d]),
                ("mlp.down_proj", vec![d, h]),
            ];
            if gemma {
                names.push(("pre_feedforward_layernorm", vec![d]));
                names.push(("post_feedforward_layernorm", vec![d]));
            }
            for (name, shape) in names {
                add(format!("model.layers.{l}.{name}.weight"), &shape);
            }
        }
        let mut c = serde_json::json!({
            "model_type": model_type, "hidden_size": d, "num_attention_heads": 2, "head_dim": 4,
            "num_key_value_heads": if gemma { 2 } else { 1 }, "intermediate_size": h,
            "num_hidden_layers": 2, "vocab_size": v, "max_position_embeddings": n_pos,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true, "eos_token_id": 15
        });
        if gemma {
            c["query_pre_attn_scalar"] = 4.into();
            c["sliding_window"] = 4.into();
            c["hidden_activation"] = "gelu_pytorch_tanh".into();
        } else {
            c["hidden_act"] = "silu".into();
            c["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8
            });
        }
        c
    };
    let dir = tempfile::tempdir().unwrap();
    common::hf::write_safetensors(dir.path(), &t, "", &[]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    common::hf::write_toy_tokenizer(dir.path());
    dir
}

/// The integer keys of a `config.json` (top level and one object deep), as JSON pointers.
fn integer_keys(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for (k, x) in v.as_object().unwrap() {
        if x.is_u64() {
            out.push(format!("/{k}"));
        }
        if let Some(o) = x.as_object() {
            out.extend(
                o.iter()
                    .filter(|(_, y)| y.is_u64())
                    .map(|(k2, _)| format!("/{k}/{k2}")),
            );
        }
    }
    out
}

#[test]
fn the_unedited_hf_dirs_load_and_run() {
    for t in HF_TYPES {
        let dir = hf_dir(t);
        let m = clt::model::load(dir.path(), None).unwrap();
        assert_eq!(m.model.architecture(), t);
        assert_eq!(m.model.forward(&[0, 1, 2]).unwrap().len(), 3 * 16);
    }
}

/// Every integer of each `config.json` at every extreme value: the model loads (and runs) or is refused,
/// never sized by the claim.
#[test]
fn every_hf_config_integer_at_every_extreme_gives_a_model_or_an_error() {
    for t in HF_TYPES {
        let dir = hf_dir(t);
        let path = dir.path().join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let original: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys = integer_keys(&original);
        assert!(keys.len() >= 6, "{t}: {keys:?}");
        for key in &keys {
            for value in EXTREMES {
                let mut v = original.clone();
                *v.pointer_mut(key).unwrap() = value.into();
                std::fs::write(&path, v.to_string()).unwrap();
                if let Ok(m) = clt::model::load(dir.path(), None) {
                    let _ = m.model.forward(&[0, 1, 2]);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..config() })]
    /// Edits to a Hugging Face directory's `model.safetensors` (memory-mapped; its JSON header first).
    #[test]
    fn edited_hf_weights_give_a_model_or_an_error(
        model_type in prop::sample::select(HF_TYPES.to_vec()),
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        let dir = hf_dir(model_type);
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, apply(&bytes, 2000, &edits)).unwrap();
        if let Ok(m) = clt::model::load(dir.path(), None) {
            let _ = m.model.forward(&[0, 1, 2]);
        }
    }
}

// ---- activation import ---------------------------------------------------------------------------------

/// `.npy` inputs and targets `[8, 2, 4]`, as bytes.
fn npy_activations() -> (Vec<u8>, Vec<u8>) {
    let (n, l, d) = (8, 2, 4);
    let mut r = common::hf::Rng(19);
    let x = common::npz::npy(&[n, l, d], &r.vals(n * l * d, 1.0), false, false);
    let y = common::npz::npy(&[n, l, d], &r.vals(n * l * d, 1.0), false, false);
    (x, y)
}

/// `clt store import` of these inputs and targets into a new store; its token count.
fn import_npy(x: &[u8], y: &[u8]) -> clt::Result<u64> {
    use clt::store::cli::{EncodeArgs, import};
    use clt::store::import::ImportSource;
    let dir = tempfile::tempdir().unwrap();
    let (xp, yp) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
    std::fs::write(&xp, x).unwrap();
    std::fs::write(&yp, y).unwrap();
    let args = EncodeArgs {
        codec: clt::store::Codec::Int8,
        no_byte_planes: false,
        block_tokens: 4,
        shard_tokens: 100,
        zstd_level: 1,
        threads: 1,
        outlier_dims: 0,
        target_rel_err: None,
    };
    let src = ImportSource::npy(&xp, &yp, None)?;
    Ok(import(&[src], &dir.path().join("out"), &args, "m")?.n_tokens)
}

#[test]
fn unedited_npy_activations_import() {
    let (x, y) = npy_activations();
    assert_eq!(import_npy(&x, &y).unwrap(), 8);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..config() })]
    /// `clt store import` of `.npy` activations whose input file is edited (its header first): the import
    /// writes a store or is refused.
    #[test]
    fn edited_npy_activations_import_or_give_an_error(edits in prop::collection::vec(edit(), 1..4)) {
        let (x, y) = npy_activations();
        let _ = import_npy(&apply(&x, 128, &edits), &y);
    }
}

// ---- Parquet and Arrow corpora -----------------------------------------------------------------------------

fn corpus_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Damaged Parquet corpus files (pyarrow's, truncated or with bits flipped anywhere: footer, page headers,
/// levels, dictionaries, values) give documents or an error naming the file, never a panic (the `parquet`
/// crate panics on some; `clt::corpus` catches them) nor an allocation over the cap.
#[test]
fn damaged_parquet_corpora_give_documents_or_an_error() {
    damaged_corpora_give_documents_or_an_error(&[
        "hf-text.parquet",
        "hf-input-ids.parquet",
        "legacy-tokens.parquet",
    ]);
}

/// Damaged Arrow IPC corpus files (datasets' streams, compressed buffers, the file format with its footer)
/// likewise.
#[test]
fn damaged_arrow_corpora_give_documents_or_an_error() {
    damaged_corpora_give_documents_or_an_error(&[
        "hf-text.arrow",
        "hf-input-ids.arrow",
        "tokens-file.arrow",
    ]);
}

/// 2,000 damaged copies of each fixture (a tenth truncated, the rest with one to three bits flipped), each
/// read to its end: documents or an error naming the file, no panic, no allocation over the cap; and
/// enough of them errors that the damage is seen.
fn damaged_corpora_give_documents_or_an_error(names: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = clt::rng::Rng::seed(7);
    let mut errors = 0;
    for name in names {
        let good = std::fs::read(corpus_fixture(name)).unwrap();
        let bad = dir.path().join(format!("bad-{name}"));
        for trial in 0..2000 {
            let mut bytes = good.clone();
            if trial % 10 == 0 {
                bytes.truncate(rng.below(good.len()));
            } else {
                for _ in 0..1 + trial % 3 {
                    let i = rng.below(good.len());
                    bytes[i] ^= 1 << rng.below(8);
                }
            }
            std::fs::write(&bad, &bytes).unwrap();
            let got = std::panic::catch_unwind(|| {
                Documents::open(std::slice::from_ref(&bad))?.collect::<clt::Result<Vec<_>>>()
            });
            match got {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    errors += 1;
                    assert!(e.to_string().contains(&format!("bad-{name}")), "{e}");
                }
                Err(_) => panic!("{name}, trial {trial}: the reader panicked"),
            }
        }
    }
    assert!(errors > 100, "{errors}");
}

// ---- fuzz seeds ----------------------------------------------------------------------------------------

/// A llama2.c checkpoint of 2 layers, d 8, 2 query heads sharing one key/value head, hidden 16, a vocabulary
/// of 16 (tied) and 8 positions: the 7 header integers, then the weights in llama2.c's order.
fn tiny_llama2c() -> Vec<u8> {
    let (d, h, l, heads, kv_heads, vocab, seq) = (8usize, 16, 2, 2, 1, 16, 8);
    let kv = d / heads * kv_heads;
    let mut b: Vec<u8> = [d, h, l, heads, kv_heads, vocab, seq]
        .iter()
        .flat_map(|&v| (v as i32).to_le_bytes())
        .collect();
    let floats = vocab * d
        + l * d
        + l * d * d
        + 2 * l * kv * d
        + l * d * d
        + l * d
        + 3 * l * h * d
        + d
        + seq * (d / heads);
    let mut r = common::hf::Rng(17);
    b.extend(r.vals(floats, 0.5).iter().flat_map(|v| v.to_le_bytes()));
    b
}

/// The GGML types the loader dequantises (all but the element types).
const QUANT_TYPES: [u32; 12] = [2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23];

/// A GGUF file of no model: one 512-element tensor `t{type}` of each block type, of random bytes whose f16
/// scales are small numbers, so that the `gguf` fuzz target starts each dequantiser from a block it reads.
fn quant_gguf() -> Vec<u8> {
    use clt::model::ggml_quants::block_layout;
    use common::gguf::{Meta, RawTensor, write_gguf_raw};
    let mut r = common::hf::Rng(19);
    let tensors: Vec<RawTensor> = QUANT_TYPES
        .iter()
        .map(|&t| {
            let (block, bytes) = block_layout(t).unwrap();
            let n = (512 / block * bytes) as usize;
            // Bytes of the form 0x3?: any f16 made of two of them is between 0.1 and 1.1.
            let b = r
                .vals(n, 1.0)
                .iter()
                .map(|v| 0x30 | (v.to_bits() as u8 & 0x0f))
                .collect();
            (format!("t{t}"), vec![512], t, b)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quants.gguf");
    let meta = [("general.architecture", Meta::Str("llama".into()))];
    write_gguf_raw(&path, &meta, &tensors);
    std::fs::read(&path).unwrap()
}

/// The seeds of `fuzz/`'s targets `gguf`, `llama2c` and `transcoder_layer` (the first byte of a `llama2c`
/// input picks the checkpoint, even, or the tokenizer, odd; of a `transcoder_layer` input, a safetensors
/// layer or an archive's members), by file name under `fuzz/seeds/`.
fn fuzz_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = ARCHS
        .iter()
        .map(|arch| (format!("gguf/{arch}.gguf"), tiny_gguf(arch).0))
        .collect();
    seeds.push((
        "llama2c/checkpoint.bin".into(),
        [&[0u8][..], &tiny_llama2c()].concat(),
    ));
    seeds.push((
        "llama2c/tok512.bin".into(),
        [&[1u8][..], &fixture("tok512.bin")].concat(),
    ));
    seeds.push(("gguf/quants.gguf".into(), quant_gguf()));
    seeds.push((
        "transcoder_layer/layer_0.safetensors".into(),
        [&[0u8][..], &safetensors_layer()].concat(),
    ));
    let members: Vec<u8> = npz_members().into_iter().flat_map(|(_, b)| b).collect();
    seeds.push((
        "transcoder_layer/params.npz.members".into(),
        [&[1u8][..], &members].concat(),
    ));
    for name in [
        "hf-text.parquet",
        "hf-input-ids.parquet",
        "legacy-tokens.parquet",
    ] {
        let bytes = std::fs::read(corpus_fixture(name)).unwrap();
        seeds.push((format!("corpus_parquet/{name}"), bytes));
    }
    for name in ["hf-text.arrow", "hf-input-ids.arrow", "tokens-file.arrow"] {
        let bytes = std::fs::read(corpus_fixture(name)).unwrap();
        seeds.push((format!("corpus_arrow/{name}"), bytes));
    }
    seeds
}

/// What the `transcoder_layer` target makes of its input (after the first byte) for an archive: the bytes
/// split before each `.npy` magic, named in the order of [`npz_members`].
fn members_of(bytes: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    let mut starts: Vec<usize> = (1..bytes.len().saturating_sub(MAGIC.len() - 1))
        .filter(|&i| bytes[i..].starts_with(MAGIC))
        .collect();
    starts.insert(0, 0);
    starts.push(bytes.len());
    npz_members()
        .iter()
        .zip(starts.windows(2))
        .map(|((name, _), w)| (*name, bytes[w[0]..w[1]].to_vec()))
        .collect()
}

/// The committed fuzz seeds are the files these tests write, and each still loads, so a fuzzer starts from
/// inputs that reach the models, tokenizers and layers. `CLT_WRITE_FUZZ_SEEDS=1` rewrites them.
#[test]
fn the_fuzz_seeds_are_current_and_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = std::env::var_os("CLT_WRITE_FUZZ_SEEDS").is_some();
    for (name, bytes) in fuzz_seeds() {
        let path = dir.join(&name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (CLT_WRITE_FUZZ_SEEDS=1 writes it)", path.display())
        });
        assert!(
            committed == bytes,
            "{} is stale (CLT_WRITE_FUZZ_SEEDS=1 rewrites it)",
            path.display()
        );
        let p = Path::new("seed");
        if name == "gguf/quants.gguf" {
            let g = GgufFile::parse(p, bytes).unwrap();
            for t in QUANT_TYPES {
                let (v, _) = g.tensor_f32(&format!("t{t}")).unwrap();
                assert!(
                    v.len() == 512 && v.iter().all(|x| x.is_finite()),
                    "type {t}"
                );
            }
        } else if name.starts_with("gguf/") {
            let g = GgufFile::parse(p, bytes).unwrap();
            g.model().unwrap().forward(&[0, 1, 2]).unwrap();
        } else if name.starts_with("transcoder_layer/") {
            // As the target reads it: the file itself, or the members archived in order.
            let tmp = tempfile::tempdir().unwrap();
            let path = if bytes[0] == 0 {
                let path = tmp.path().join("layer_0.safetensors");
                std::fs::write(&path, &bytes[1..]).unwrap();
                path
            } else {
                assert_eq!(members_of(&bytes[1..]), npz_members());
                let path = tmp.path().join("params.npz");
                common::npz::write_npz(&path, &members_of(&bytes[1..]), false);
                path
            };
            let l = clt::clt::transcoder_set::read_layer(&path).unwrap();
            assert_eq!((l.n_features, l.d_model), (6, 4));
        } else if name.starts_with("corpus_parquet/") || name.starts_with("corpus_arrow/") {
            let docs = Documents::open(&[dir.join(&name)]).unwrap();
            let docs: Vec<_> = docs.collect::<clt::Result<_>>().unwrap();
            assert!(docs.len() > 5);
        } else if bytes[0] == 0 {
            llama2c::parse_checkpoint(p, &bytes[1..])
                .unwrap()
                .forward(&[1, 2, 3])
                .unwrap();
        } else {
            llama2c::Llama2cTokenizer::parse(p, &bytes[1..], 512).unwrap();
        }
    }
}
