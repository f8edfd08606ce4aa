//! Tokenizers built with the `tokenizers` crate: the byte-level BPE (GPT-2 style) of a GGUF file's vocabulary
//! and merges, the SentencePiece BPE of a GGUF file's `llama` vocabulary and scores (Llama 1/2, Mistral,
//! Gemma), and any Hugging Face `tokenizer.json`.

use std::path::Path;

use tokenizers::SplitDelimiterBehavior;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Tokenizer};

use crate::{Error, Result};

/// A byte-level BPE tokenizer and the special tokens the model uses.
#[derive(Clone)]
pub struct BpeTokenizer {
    inner: Tokenizer,
    /// Prepended to every encoding when set (the GGUF's `add_bos_token`).
    pub bos: Option<u32>,
    /// Ends generation.
    pub eos: Option<u32>,
    /// Whether encoding runs the tokenizer's own post-processor (which adds BOS for `tokenizer.json` files).
    add_special: bool,
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// Llama 3's pre-tokenizer pattern (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3`, the `Split` of Llama 3's
/// `tokenizer.json`): contractions, letters with one leading non-letter, digits in threes, punctuation
/// runs with their line breaks, line breaks, and spaces (the last one left to the next word).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a GGUF `tokenizer.ggml.pre` name splits text before BPE.
fn pre_tokenizer(path: &Path, pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        // Llama 3's pattern, then bytes mapped without GPT-2's regex.
        "llama3" | "llama-v3" | "llama-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_PATTERN.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Format {
                path: path.to_path_buf(),
                offset: 0,
                reason: format!("Llama 3 pre-tokenizer: {e}"),
            })?;
            let bytes = ByteLevel::new(false, true, false);
            Ok(Sequence::new(vec![split.into(), bytes.into()]).into())
        }
        // GPT-2's regex alone.
        "default" | "gpt2" | "gpt-2" => Ok(byte_level.into()),
        // Digits one by one, then GPT-2's regex (llama.cpp: "\p{N}" then the GPT-2 pattern).
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into())
        }
        other => Err(Error::Format {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!("unsupported BPE pre-tokenizer `{other}` (tokenizer.ggml.pre)"),
        }),
    }
}

impl BpeTokenizer {
    /// Builds the tokenizer from byte-level token strings, `"a b"` merges, the ids of special tokens,
    /// and the pre-tokenizer name; `path` names the file for errors.
    pub fn from_vocab(
        path: &Path,
        tokens: Vec<String>,
        merges: &[String],
        special: &[u32],
        pre: &str,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self> {
        let err = |reason: String| Error::Format {
            path: path.to_path_buf(),
            offset: 0,
            reason,
        };
        let mut pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                err(format!(
                    "merge {i} `{m}` is not two tokens separated by a space"
                ))
            })?;
            pairs.push((a.to_string(), b.to_string()));
        }
        let specials: Vec<AddedToken> = special
            .iter()
            .filter_map(|&id| tokens.get(id as usize))
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .build()
            .map_err(|e| err(format!("cannot build the BPE model: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(path, pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner
            .add_special_tokens(specials)
            .map_err(|e| err(format!("cannot add the special tokens: {e}")))?;
        Ok(BpeTokenizer {
            inner,
            bos,
            eos,
            add_special: false,
        })
    }

    /// Builds a SentencePiece BPE tokenizer (a GGUF file's `tokenizer.ggml.model = "llama"`) from its pieces
    /// (`▁` for a space, `<0xAB>` byte pieces), their scores and their types (1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 6 byte), as llama.cpp's SPM tokenizer runs it: spaces become `▁` (and one is put first
    /// when `add_space_prefix`), then adjacent pieces merge, the merge whose result has the highest score
    /// first, and characters with no piece fall back to their bytes. The merges are every split of a normal
    /// piece into two pieces, ranked by the whole piece's score (how `transformers` converts SentencePiece
    /// models); control and user-defined pieces are matched as whole strings.
    #[allow(clippy::too_many_arguments)]
    pub fn from_spm(
        path: &Path,
        pieces: Vec<String>,
        scores: &[f32],
        types: &[u32],
        add_space_prefix: bool,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self> {
        let err = |reason: String| Error::Format {
            path: path.to_path_buf(),
            offset: 0,
            reason,
        };
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(err(format!(
                "{} tokens but {} scores and {} token types",
                pieces.len(),
                scores.len(),
                types.len()
            )));
        }
        let index: std::collections::HashMap<&str, u32> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), i as u32))
            .collect();
        // (score of the merged piece, left id, right id).
        let mut ranked: Vec<(f32, u32, u32)> = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            if types[i] != 1 {
                continue;
            }
            for (k, _) in p.char_indices().skip(1) {
                if let (Some(&a), Some(&b)) = (index.get(&p[..k]), index.get(&p[k..])) {
                    ranked.push((scores[i], a, b));
                }
            }
        }
        ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let merges: Vec<(String, String)> = ranked
            .iter()
            .map(|&(_, a, b)| (pieces[a as usize].clone(), pieces[b as usize].clone()))
            .collect();
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, 3 | 4))
            .map(|(i, _)| AddedToken::from(pieces[i].clone(), true))
            .collect();
        let unk = types
            .iter()
            .position(|&t| t == 2)
            .map(|i| pieces[i].clone());
        let vocab: tokenizers::models::bpe::Vocab = pieces
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true);
        if let Some(u) = unk {
            builder = builder.unk_token(u);
        }
        let bpe = builder
            .build()
            .map_err(|e| err(format!("cannot build the SentencePiece BPE model: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let space = Replace::new(" ", "▁").map_err(|e| err(format!("normalizer: {e}")))?;
        let mut normalizers = Vec::new();
        if add_space_prefix {
            normalizers.push(Prepend::new("▁".into()).into());
        }
        normalizers.push(space.into());
        inner
            .with_normalizer(Some(NormalizerSequence::new(normalizers)))
            .map_err(|e| err(format!("normalizer: {e}")))?;
        let unspace = Replace::new("▁", " ").map_err(|e| err(format!("decoder: {e}")))?;
        let mut decoders = vec![
            unspace.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        inner.with_decoder(Some(DecoderSequence::new(decoders)));
        inner
            .add_special_tokens(specials)
            .map_err(|e| err(format!("cannot add the special tokens: {e}")))?;
        Ok(BpeTokenizer {
            inner,
            bos,
            eos,
            add_special: false,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`; its post-processor decides about BOS.
    pub fn from_file(path: &Path, eos: Option<u32>) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!("cannot load the tokenizer: {e}"),
        })?;
        Ok(BpeTokenizer {
            inner,
            bos: None,
            eos,
            add_special: true,
        })
    }

    /// Token ids of `text` (special-token strings in the text are recognised), with BOS when the model adds it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, self.add_special)
            .map_err(|e| Error::Unsupported(format!("tokenising {text:?}: {e}")))?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Whether `token` is BOS, EOS or a special added token.
    pub fn is_special(&self, token: u32) -> bool {
        Some(token) == self.bos
            || Some(token) == self.eos
            || self
                .inner
                .get_added_tokens_decoder()
                .get(&token)
                .is_some_and(|t| t.special)
    }

    /// The text of `tokens`, special tokens dropped.
    pub fn decode(&self, tokens: &[u32]) -> String {
        self.inner.decode(tokens, true).unwrap_or_default()
    }

    /// One token as the text it stands for.
    pub fn piece(&self, token: u32) -> String {
        self.inner.decode(&[token], false).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn split(pre: &str, text: &str) -> Vec<String> {
        let p = pre_tokenizer(Path::new("t.gguf"), pre).unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect()
    }

    /// Llama 3's pre-tokenizer: a contraction on its own, digits in threes, a space before digits on its
    /// own, punctuation with its line breaks, and of two spaces the last one kept for the next word (bytes
    /// shown as byte-level BPE maps them: space `Ġ`, line feed `Ċ`). GPT-2's splits the same text otherwise,
    /// and an unknown name is refused.
    #[test]
    fn llama3_pre_tokenizer_splits_as_its_pattern_says() {
        let text = "Hello world's 12345 test!!\n\nok  x";
        assert_eq!(
            split("llama-bpe", text),
            [
                "Hello", "Ġworld", "'s", "Ġ", "123", "45", "Ġtest", "!!ĊĊ", "ok", "Ġ", "Ġx"
            ]
        );
        assert_eq!(split("llama3", "I'LL 7"), ["I", "'LL", "Ġ", "7"]);
        assert_ne!(split("gpt2", text), split("llama-bpe", text));
        let e = pre_tokenizer(Path::new("t.gguf"), "tekken")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tekken") && e.contains("t.gguf"), "{e}");
    }
}
