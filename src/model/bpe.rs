//! Tokenizers built with the `tokenizers` crate: the byte-level BPE (GPT-2 style) of a GGUF file's vocabulary
//! and merges, and any Hugging Face `tokenizer.json`.

use std::path::Path;

use tokenizers::SplitDelimiterBehavior;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
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
