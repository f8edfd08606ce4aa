//! Loading llama2.c models: "v0" checkpoints and `tokenizer.bin` tokenizers.
//!
//! The checkpoint is a header of seven little-endian `i32` (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
//! vocab_size, seq_len; a negative vocab_size means a separate classifier follows) and then `f32` arrays in a
//! fixed order (see `../shared/models/stories260K/README.md`). The tokenizer is a SentencePiece-style vocabulary
//! with scores; [`Llama2cTokenizer::encode`] reproduces the reference `run.c` algorithm exactly: BOS, a dummy
//! space prefix, UTF-8 characters with byte fallback, then repeated merging of the best-scoring adjacent pair.

use std::collections::HashMap;
use std::path::Path;

use super::llama::{LayerWeights, LlamaConfig, LlamaModel, RopeStyle};
use crate::{Error, Result};

/// Size of the llama2.c v0 header in bytes.
pub const HEADER_BYTES: usize = 7 * 4;

/// Reads the seven header integers, or `None` if the file is shorter than a header.
fn header(bytes: &[u8]) -> Option<[i32; 7]> {
    if bytes.len() < HEADER_BYTES {
        return None;
    }
    let mut h = [0i32; 7];
    for (i, v) in h.iter_mut().enumerate() {
        *v = i32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().ok()?);
    }
    Some(h)
}

/// The config a v0 header describes, and whether the classifier is tied; errors name `path`.
fn config_from_header(path: &Path, bytes: &[u8]) -> Result<(LlamaConfig, bool)> {
    let h = header(bytes).ok_or_else(|| Error::Format {
        path: path.to_path_buf(),
        offset: bytes.len() as u64,
        reason: "file shorter than the 28-byte llama2.c header".into(),
    })?;
    let [dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len] = h;
    let bad = |what: &str, v: i32, i: usize| Error::Format {
        path: path.to_path_buf(),
        offset: (i * 4) as u64,
        reason: format!("llama2.c header field {what} = {v} is out of range"),
    };
    let pos = |what: &str, v: i32, i: usize| -> Result<usize> {
        if v <= 0 || v > 1 << 24 {
            Err(bad(what, v, i))
        } else {
            Ok(v as usize)
        }
    };
    let d = pos("dim", dim, 0)?;
    let hidden = pos("hidden_dim", hidden, 1)?;
    let n_layers = pos("n_layers", n_layers, 2)?;
    let n_heads = pos("n_heads", n_heads, 3)?;
    let n_kv = pos("n_kv_heads", n_kv_heads, 4)?;
    let vocab_abs = pos("vocab_size", vocab.saturating_abs(), 5)?;
    let seq = pos("seq_len", seq_len, 6)?;
    if !d.is_multiple_of(n_heads) {
        return Err(bad("dim (not a multiple of n_heads)", dim, 0));
    }
    let c = LlamaConfig {
        d_model: d,
        hidden_dim: hidden,
        n_layers,
        n_heads,
        n_kv_heads: n_kv,
        head_dim: d / n_heads,
        vocab_size: vocab_abs,
        max_seq_len: seq,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_style: RopeStyle::AdjacentPairs,
        rope_freq_factors: Vec::new(),
    };
    c.validate(path)?;
    Ok((c, vocab > 0))
}

/// Whether `bytes` (a file's start and its total length) look like a llama2.c v0 checkpoint: a sane header
/// and a length that matches it.
pub fn looks_like_checkpoint(bytes: &[u8], file_len: u64) -> bool {
    match config_from_header(Path::new(""), bytes) {
        Ok((c, tied)) => expected_len(&c, tied) == Some(file_len),
        Err(_) => false,
    }
}

/// The length of a checkpoint of config `c`; `None` where it does not fit in a `u64` (each size in a header
/// may be 2^24, so the sum is taken in `u128`, where it cannot overflow).
fn expected_len(c: &LlamaConfig, tied: bool) -> Option<u64> {
    let [d, h, l, kv, v, t, hd] = [
        c.d_model,
        c.hidden_dim,
        c.n_layers,
        c.kv_dim(),
        c.vocab_size,
        c.max_seq_len,
        c.head_dim,
    ]
    .map(|x| x as u128);
    let floats = v * d
        + l * (d + d * d + 2 * kv * d + d * d + d + 3 * h * d)
        + d
        + t * hd
        + if tied { 0 } else { v * d };
    u64::try_from(HEADER_BYTES as u128 + 4 * floats).ok()
}

/// Loads a llama2.c v0 checkpoint.
pub fn load_checkpoint(path: &Path) -> Result<LlamaModel> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_checkpoint(path, &bytes)
}

/// Parses a llama2.c v0 checkpoint held in memory; `path` is used for errors.
pub fn parse_checkpoint(path: &Path, bytes: &[u8]) -> Result<LlamaModel> {
    let (c, tied) = config_from_header(path, bytes)?;
    let mut r = Reader {
        path,
        bytes,
        pos: HEADER_BYTES,
    };
    let (d, h, l, kv, v) = (
        c.d_model,
        c.hidden_dim,
        c.n_layers,
        c.kv_dim(),
        c.vocab_size,
    );
    let tok_embeddings = r.floats("tok_embeddings", v * d)?;
    let rms_att = r.floats("rms_att_weight", l * d)?;
    let wq = r.floats("wq", l * d * d)?;
    let wk = r.floats("wk", l * kv * d)?;
    let wv = r.floats("wv", l * kv * d)?;
    let wo = r.floats("wo", l * d * d)?;
    let rms_ffn = r.floats("rms_ffn_weight", l * d)?;
    let w1 = r.floats("w1", l * h * d)?;
    let w2 = r.floats("w2", l * d * h)?;
    let w3 = r.floats("w3", l * h * d)?;
    let final_norm = r.floats("rms_final_weight", d)?;
    r.skip("freq_cis_real", c.max_seq_len * c.head_dim / 2)?;
    r.skip("freq_cis_imag", c.max_seq_len * c.head_dim / 2)?;
    let output = if tied {
        None
    } else {
        Some(r.floats("wcls", v * d)?)
    };
    let split = |all: &[f32], i: usize, size: usize| all[i * size..(i + 1) * size].to_vec();
    let layers = (0..l)
        .map(|i| LayerWeights {
            attn_norm: split(&rms_att, i, d),
            wq: split(&wq, i, d * d),
            wk: split(&wk, i, kv * d),
            wv: split(&wv, i, kv * d),
            wo: split(&wo, i, d * d),
            mlp_norm: split(&rms_ffn, i, d),
            w_gate: split(&w1, i, h * d),
            w_up: split(&w3, i, h * d),
            w_down: split(&w2, i, d * h),
        })
        .collect();
    let model = LlamaModel {
        config: c,
        tok_embeddings,
        layers,
        final_norm,
        output,
    };
    model.validate(path)?;
    Ok(model)
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, tensor: &str, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n * 4)
            .filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::Tensor {
                path: self.path.to_path_buf(),
                tensor: tensor.into(),
                reason: format!(
                    "truncated: needs {} bytes at offset {}, the file has {}",
                    n * 4,
                    self.pos,
                    self.bytes.len()
                ),
            }),
        }
    }

    fn floats(&mut self, tensor: &str, n: usize) -> Result<Vec<f32>> {
        let b = self.take(tensor, n)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn skip(&mut self, tensor: &str, n: usize) -> Result<()> {
        self.take(tensor, n).map(|_| ())
    }
}

/// A llama2.c `tokenizer.bin` vocabulary.
#[derive(Clone, Debug)]
pub struct Llama2cTokenizer {
    /// Raw bytes of each piece (byte-fallback tokens are the literal text `<0xAB>`).
    pub pieces: Vec<Vec<u8>>,
    pub scores: Vec<f32>,
    pub max_token_length: u32,
    lookup: HashMap<Vec<u8>, u32>,
}

/// Id of the beginning-of-sequence token.
pub const BOS: u32 = 1;
/// Id of the end-of-sequence token.
pub const EOS: u32 = 2;

impl Llama2cTokenizer {
    /// Loads `tokenizer.bin` with `vocab_size` entries (the model's vocabulary size).
    pub fn load(path: &Path, vocab_size: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &bytes, vocab_size)
    }

    /// Parses a tokenizer held in memory; `path` is used for errors.
    pub fn parse(path: &Path, bytes: &[u8], vocab_size: usize) -> Result<Self> {
        let mut pos = 0usize;
        let fmt = |offset: usize, reason: String| Error::Format {
            path: path.to_path_buf(),
            offset: offset as u64,
            reason,
        };
        let read4 = |pos: &mut usize, what: &str| -> Result<[u8; 4]> {
            let b = bytes
                .get(*pos..*pos + 4)
                .ok_or_else(|| fmt(*pos, format!("truncated while reading {what}")))?;
            *pos += 4;
            Ok([b[0], b[1], b[2], b[3]])
        };
        if vocab_size < 259 {
            return Err(fmt(
                0,
                format!(
                    "a vocabulary of {vocab_size} tokens cannot hold the 3 special and 256 byte tokens"
                ),
            ));
        }
        let max_token_length = u32::from_le_bytes(read4(&mut pos, "max_token_length")?);
        let mut pieces = Vec::with_capacity(vocab_size);
        let mut scores = Vec::with_capacity(vocab_size);
        for i in 0..vocab_size {
            let score = f32::from_le_bytes(read4(&mut pos, &format!("the score of token {i}"))?);
            let len = i32::from_le_bytes(read4(&mut pos, &format!("the length of token {i}"))?);
            if len < 0 || len as u32 > max_token_length.max(64) {
                return Err(fmt(pos - 4, format!("token {i} has length {len}")));
            }
            let piece = bytes
                .get(pos..pos + len as usize)
                .ok_or_else(|| fmt(pos, format!("truncated in the bytes of token {i}")))?;
            pos += len as usize;
            pieces.push(piece.to_vec());
            scores.push(score);
        }
        if pos != bytes.len() {
            return Err(fmt(
                pos,
                format!(
                    "{} trailing bytes after {vocab_size} tokens",
                    bytes.len() - pos
                ),
            ));
        }
        let mut lookup = HashMap::with_capacity(vocab_size);
        for (i, p) in pieces.iter().enumerate() {
            lookup.entry(p.clone()).or_insert(i as u32);
        }
        Ok(Llama2cTokenizer {
            pieces,
            scores,
            max_token_length,
            lookup,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Encodes `text` as `run.c` does, with BOS first when `bos`: the text's characters (a space first),
    /// unknown ones as their UTF-8 bytes, then, while any adjacent pair concatenates to a piece, the pair
    /// of the highest-scoring piece (the leftmost among equals) merged. `run.c` rescans every pair for each
    /// merge, O(n²) in the text's length (a 1 MB document did not finish in 15 minutes); here the pairs wait
    /// in a heap and a merge only rescores its two new neighbours, O(n log n), with the same merges in
    /// the same order ([`Self::encode_by_rescanning`] is run.c's loop, kept for the tests).
    pub fn encode(&self, text: &str, bos: bool) -> Vec<u32> {
        // BOS takes part in the merges, as in run.c (no piece of a real vocabulary starts with it).
        let mut tokens = Vec::with_capacity(text.len() + 3);
        if bos {
            tokens.push(BOS);
        }
        tokens.extend(self.symbols(text));
        self.merge(tokens)
    }

    /// The text's characters as pieces (a space first, as sentencepiece's dummy prefix), unknown
    /// characters as their UTF-8 byte tokens.
    fn symbols(&self, text: &str) -> Vec<u32> {
        let mut tokens = Vec::with_capacity(text.len() + 1);
        if !text.is_empty()
            && let Some(&id) = self.lookup.get(&b" "[..])
        {
            tokens.push(id);
        }
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup.get(s) {
                Some(&id) => tokens.push(id),
                None => tokens.extend(s.iter().map(|&b| b as u32 + 3)),
            }
        }
        tokens
    }

    /// The merge of symbols `l` and `r` (adjacent in `tok`) when their pieces concatenate to a piece, scored
    /// by it (`-0.0` read as `0.0`, as run.c's `>` does).
    fn candidate(&self, tok: &[u32], l: usize, r: usize, buf: &mut Vec<u8>) -> Option<Candidate> {
        let pair = (tok[l], tok[r]);
        buf.clear();
        buf.extend_from_slice(&self.pieces[pair.0 as usize]);
        buf.extend_from_slice(&self.pieces[pair.1 as usize]);
        let &id = self.lookup.get(buf.as_slice())?;
        Some(Candidate {
            score: self.scores[id as usize] + 0.0,
            left: l,
            right: r,
            pair,
            id,
        })
    }

    /// Merges the symbols as run.c does (see [`Self::encode`]), through a heap of candidate pairs.
    fn merge(&self, mut tok: Vec<u32>) -> Vec<u32> {
        let n = tok.len();
        if n < 2 {
            return tok;
        }
        const NONE: usize = usize::MAX;
        // The live symbols as a doubly linked list over their first positions (a merge keeps the left one,
        // so the list stays in text order and a smaller index is further left).
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut heap = std::collections::BinaryHeap::new();
        let mut buf = Vec::with_capacity(64);
        for i in 0..n - 1 {
            heap.extend(self.candidate(&tok, i, i + 1, &mut buf));
        }
        while let Some(c) = heap.pop() {
            let (i, j) = (c.left, c.right);
            // Stale: either symbol was merged since (a dead right symbol is no longer next to the left one;
            // a symbol that absorbed its neighbour has another token).
            if next[i] != j || (tok[i], tok[j]) != c.pair {
                continue;
            }
            tok[i] = c.id;
            let k = next[j];
            next[i] = k;
            next[j] = NONE;
            if k != NONE {
                prev[k] = i;
                heap.extend(self.candidate(&tok, i, k, &mut buf));
            }
            if prev[i] != NONE {
                heap.extend(self.candidate(&tok, prev[i], i, &mut buf));
            }
        }
        // Symbol 0 is never a right symbol, so it is always live: walk the list from it.
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        while i != NONE {
            out.push(tok[i]);
            i = next[i];
        }
        out
    }

    /// run.c's encoder as written: every pair rescanned for each merge (O(n²)); the reference
    /// [`Self::encode`] is tested against.
    pub fn encode_by_rescanning(&self, text: &str, bos: bool) -> Vec<u32> {
        let mut tokens = Vec::with_capacity(text.len() + 3);
        if bos {
            tokens.push(BOS);
        }
        tokens.extend(self.symbols(text));
        let mut merged = Vec::with_capacity(64);
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for i in 0..tokens.len().saturating_sub(1) {
                merged.clear();
                merged.extend_from_slice(&self.pieces[tokens[i] as usize]);
                merged.extend_from_slice(&self.pieces[tokens[i + 1] as usize]);
                if let Some(&id) = self.lookup.get(&merged) {
                    let score = self.scores[id as usize];
                    if best.is_none_or(|(b, _, _)| score > b) {
                        best = Some((score, i, id));
                    }
                }
            }
            match best {
                Some((_, i, id)) => {
                    tokens[i] = id;
                    tokens.remove(i + 1);
                }
                None => break,
            }
        }
        tokens
    }

    /// The bytes `token` prints as after `prev`, as `run.c` decodes: the leading space of a piece that
    /// follows BOS is dropped, and `<0xAB>` pieces are the raw byte.
    pub fn decode_piece(&self, prev: u32, token: u32) -> Vec<u8> {
        let Some(p) = self.pieces.get(token as usize) else {
            return Vec::new();
        };
        let p: &[u8] = if prev == BOS && p.first() == Some(&b' ') {
            &p[1..]
        } else {
            p
        };
        if p.len() == 6
            && p.starts_with(b"<0x")
            && p[5] == b'>'
            && let Ok(s) = std::str::from_utf8(&p[3..5])
            && let Ok(b) = u8::from_str_radix(s, 16)
        {
            return vec![b];
        }
        p.to_vec()
    }

    /// The text of `tokens` (which may start with BOS), decoded piece by piece.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let mut out = Vec::new();
        let mut prev = BOS;
        for &t in tokens {
            if t == BOS {
                prev = t;
                continue;
            }
            out.extend(self.decode_piece(prev, t));
            prev = t;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The piece of one token as text, for display.
    pub fn piece(&self, token: u32) -> String {
        self.pieces
            .get(token as usize)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    }
}

/// A pair of adjacent symbols that concatenate to a piece, waiting in the merge heap: the highest score
/// pops first, and among equal scores the leftmost pair.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    /// The two tokens when the pair was scored (a merge since makes the entry stale).
    pair: (u32, u32),
    id: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Candidate {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer of the 3 special and 256 byte tokens, then `extra` pieces with their scores.
    fn vocab(extra: &[(Vec<u8>, f32)]) -> Llama2cTokenizer {
        let mut bytes = 8u32.to_le_bytes().to_vec();
        let mut n = 0;
        let mut put = |p: &[u8], score: f32| {
            bytes.extend(score.to_le_bytes());
            bytes.extend((p.len() as i32).to_le_bytes());
            bytes.extend(p);
            n += 1;
        };
        for p in [&b"<unk>"[..], b"<s>", b"</s>"] {
            put(p, 0.0);
        }
        for b in 0..=255u8 {
            put(format!("<0x{b:02X}>").as_bytes(), 0.0);
        }
        for (p, score) in extra {
            put(p, *score);
        }
        Llama2cTokenizer::parse(Path::new("vocab.bin"), &bytes, n).unwrap()
    }

    proptest::proptest! {
        /// The heap's merges are run.c's rescanning merges, on a vocabulary of every piece of up to three
        /// letters over a small alphabet with scores from a set of four (ties everywhere, `-0.0` among them),
        /// with BOS and without, on texts with unknown characters (byte fallback).
        #[test]
        fn heap_merges_are_run_cs_merges(
            scores in proptest::collection::vec(0usize..4, 16 + 64),
            text in "[ab c\u{e9}]{0,60}",
            bos in proptest::bool::ANY,
        ) {
            let alphabet = [b' ', b'a', b'b', b'c'];
            let values = [0.0f32, -0.0, 1.0, -1.0];
            let mut pieces: Vec<(Vec<u8>, f32)> = alphabet.iter().map(|&a| (vec![a], -10.0)).collect();
            for &a in &alphabet {
                for &b in &alphabet {
                    pieces.push((vec![a, b], 0.0));
                    for &c in &alphabet {
                        pieces.push((vec![a, b, c], 0.0));
                    }
                }
            }
            // The single letters score lowest; pairs and triples take scores from the tied set.
            for (p, s) in pieces.iter_mut().skip(4).zip(&scores) {
                p.1 = values[*s];
            }
            let t = vocab(&pieces);
            proptest::prop_assert_eq!(t.encode(&text, bos), t.encode_by_rescanning(&text, bos));
        }
    }

    fn toy() -> Llama2cTokenizer {
        // 0 <unk>, 1 <s>, 2 </s>, 3..258 bytes, then " ", "a", "b", "ab", " ab".
        let mut pieces: Vec<Vec<u8>> = vec![b"<unk>".to_vec(), b"<s>".to_vec(), b"</s>".to_vec()];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>").into_bytes());
        }
        let extra: [&[u8]; 5] = [b" ", b"a", b"b", b"ab", b" ab"];
        pieces.extend(extra.iter().map(|p| p.to_vec()));
        let mut bytes = 8u32.to_le_bytes().to_vec();
        for (i, p) in pieces.iter().enumerate() {
            bytes.extend((i as f32 * -0.1).to_le_bytes());
            bytes.extend((p.len() as i32).to_le_bytes());
            bytes.extend(p);
        }
        Llama2cTokenizer::parse(Path::new("toy.bin"), &bytes, pieces.len()).unwrap()
    }

    /// A header of the largest sizes accepted describes more than 2^64 bytes: no length, so no file looks
    /// like it (the sum wrapped around before, and could have matched some file's length).
    #[test]
    fn the_largest_header_has_no_length() {
        let h: Vec<u8> = [1 << 24, 1 << 24, 1 << 24, 1, 1, -(1 << 24), 1 << 24]
            .iter()
            .flat_map(|v: &i32| v.to_le_bytes())
            .collect();
        let (c, tied) = config_from_header(Path::new("big.bin"), &h).unwrap();
        assert_eq!(expected_len(&c, tied), None);
        assert!(!looks_like_checkpoint(&h, u64::MAX));
        // A small one's length is the header and its floats.
        let small: Vec<u8> = [8, 16, 2, 2, 1, 16, 8]
            .iter()
            .flat_map(|v: &i32| v.to_le_bytes())
            .collect();
        let (c, tied) = config_from_header(Path::new("small.bin"), &small).unwrap();
        let floats = 16 * 8 + 2 * (8 + 64 + 2 * 4 * 8 + 64 + 8 + 3 * 16 * 8) + 8 + 8 * 4;
        assert_eq!(expected_len(&c, tied), Some(28 + 4 * floats));
    }

    #[test]
    fn encode_merges_and_falls_back_to_bytes() {
        let t = toy();
        // " ab" merges fully; "é" is two bytes of fallback.
        assert_eq!(t.encode("ab", true), vec![1, 263]);
        assert_eq!(t.encode("", true), vec![1]);
        assert_eq!(t.encode("é", false), vec![259, 0xC3 + 3, 0xA9 + 3]);
        assert_eq!(t.decode(&t.encode("abé", true)), "abé");
    }

    #[test]
    fn truncated_files_are_typed_errors() {
        let e = Llama2cTokenizer::parse(Path::new("t.bin"), &[1, 0, 0], 300).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{e}");
        let e = Llama2cTokenizer::parse(Path::new("t.bin"), &[1, 0, 0], 4).unwrap_err();
        assert!(e.to_string().contains("byte tokens"), "{e}");
        let mut ck = Vec::new();
        for v in [8i32, 16, 1, 2, 2, 4, 4] {
            ck.extend(v.to_le_bytes());
        }
        ck.extend([0u8; 170]);
        let e = parse_checkpoint(Path::new("m.bin"), &ck).unwrap_err();
        assert!(
            e.to_string().contains("m.bin") && e.to_string().contains("wq"),
            "{e}"
        );
        let e = parse_checkpoint(Path::new("m.bin"), b"GGUF\x03\0\0\0").unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{e}");
    }
}
