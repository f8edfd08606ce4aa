//! A text corpus read one document at a time, so that caching a few tokens of a large corpus reads only
//! the start of it, and memory holds one document (or one Parquet page), not the files.
//!
//! Documents are, in file order (their index in that order is the store's document id):
//! - the blocks of plain-text files between blank lines (a line of only whitespace is blank, so
//!   WikiText's `" \n"` lines and a `\r\n` file's empty lines separate documents too; each block trimmed,
//!   empty ones dropped);
//! - one per non-blank line of a `.jsonl` file: its text field, a string, or its token ids, a list of
//!   integers (a pretokenised dataset);
//! - one per row of a `.parquet` file (Hugging Face datasets' own format): its text column (strings) or
//!   token-id column (lists of integers), read a row group at a time (`corpus/parquet.rs`); null and empty rows
//!   are skipped;
//! - likewise one per row of an `.arrow` file (Arrow IPC, stream or file format: what datasets'
//!   `save_to_disk` writes and its cache holds), read a record batch at a time (`corpus/arrow.rs`).
//!
//! The field or column is [`CorpusOptions::column`]; by default the first of `text`, `input_ids` and
//! `tokens` present (SAELens's and Hugging Face's names). Token ids must be below
//! [`CorpusOptions::vocab`] (the model's vocabulary), checked as read, so a dataset tokenised for another
//! model fails naming the file and row, not deep in the forward. A file ending in `.zst` or `.gz` is
//! decompressed as it is read (`pile.jsonl.zst` is JSON lines; Parquet compresses its own pages). (Before
//! 2026-12-02 only an empty line separated documents, so a whole WikiText file was one document; a cache
//! begun then over such a corpus resumes with other document boundaries.)

mod arrow;
mod parquet;

use crate::{Error, Result};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One document of the corpus: text for the model's tokenizer, or the token ids of a pretokenised dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Document {
    Text(String),
    Tokens(Vec<u32>),
}

impl Document {
    /// The text of a text document.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Document::Text(t) => Some(t),
            Document::Tokens(_) => None,
        }
    }
}

/// The names tried, in order, for the field or column holding each document when none is given.
pub const DEFAULT_COLUMNS: [&str; 3] = ["text", "input_ids", "tokens"];

/// How the corpus's records are read.
#[derive(Clone, Debug, Default)]
pub struct CorpusOptions {
    /// The JSON field or Parquet/Arrow column holding each document; `None`: the first of [`DEFAULT_COLUMNS`]
    /// present.
    pub column: Option<String>,
    /// Token ids must be below this (the model's vocabulary size); `None` checks only that they fit `u32`.
    pub vocab: Option<u32>,
}

impl CorpusOptions {
    /// The names to look for, in order.
    fn columns(&self) -> Vec<&str> {
        match &self.column {
            Some(c) => vec![c.as_str()],
            None => DEFAULT_COLUMNS.to_vec(),
        }
    }

    /// The index in `have` (a file's column names) of the documents' column: the first of the names to look
    /// for that is there; else an error naming `path` and listing its columns.
    fn pick_column(&self, path: &Path, have: &[&str]) -> Result<usize> {
        let names = self.columns();
        names
            .iter()
            .find_map(|n| have.iter().position(|h| h == n))
            .ok_or_else(|| {
                format_error(
                    path,
                    0,
                    format!(
                        "no {} column (its columns: {}; name one with --column)",
                        quoted(&names),
                        have.join(", ")
                    ),
                )
            })
    }

    /// Checks a document's token id; `Err` says why it is not one.
    fn token(&self, id: i128) -> std::result::Result<u32, String> {
        let bound = self.vocab.map_or(u32::MAX as i128 + 1, |v| v as i128);
        if (0..bound).contains(&id) {
            Ok(id as u32)
        } else if self.vocab.is_some() && id >= 0 {
            Err(format!(
                "token id {id} is outside the model's vocabulary of {bound} (a dataset tokenised for another model?)"
            ))
        } else {
            Err(format!("{id} is not a token id"))
        }
    }
}

/// An error in the corpus file `path` at byte `offset`.
fn format_error(path: &Path, offset: u64, reason: String) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        offset,
        reason,
    }
}

/// Runs a call into a file-format decoder (the `parquet` and `arrow-ipc` crates), its panic on damaged
/// bytes caught and returned as an error, like the errors it returns.
fn guarded<T, E: std::fmt::Display>(
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("the decoder failed on damaged data ({what})"))
        }
    }
}

/// A file's bytes as read from disk, counted (the progress of a compressed file is its compressed bytes).
struct Counted {
    file: std::fs::File,
    count: Arc<AtomicU64>,
    /// This file's bytes read so far.
    read: u64,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// How a corpus file is compressed, by its name.
#[derive(Clone, Copy, PartialEq)]
enum Compression {
    None,
    Zstd,
    Gzip,
}

/// What a corpus file holds, by its name.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Text,
    JsonLines,
    Parquet,
    Arrow,
}

/// The file's compression and layout.
fn kind(path: &Path) -> (Compression, Layout) {
    let ext = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
    };
    let (c, inner) = match ext(path).as_deref() {
        Some("zst") => (Compression::Zstd, path.with_extension("")),
        Some("gz") => (Compression::Gzip, path.with_extension("")),
        _ => (Compression::None, path.to_path_buf()),
    };
    let layout = match ext(&inner).as_deref() {
        Some("jsonl") => Layout::JsonLines,
        Some("parquet") => Layout::Parquet,
        Some("arrow") => Layout::Arrow,
        _ => Layout::Text,
    };
    (c, layout)
}

/// The file being read.
enum Open {
    /// Plain text or JSON lines: the (decompressed) reader, whether it is JSON lines, and the lines and
    /// bytes read so far.
    Lines {
        reader: Box<dyn BufRead + Send>,
        jsonl: bool,
        line: u64,
        offset: u64,
    },
    Parquet(Box<parquet::ParquetDocuments>),
    Arrow(Box<arrow::ArrowDocuments>),
}

/// The documents of a list of corpus files, in order (an iterator; see the module documentation).
pub struct Documents {
    paths: Vec<PathBuf>,
    options: CorpusOptions,
    /// The index of the file being read and its reader.
    file: usize,
    open: Option<Open>,
    /// Bytes read from disk, all files so far, and the files' total size.
    disk_read: Arc<AtomicU64>,
    total_bytes: u64,
    buf: String,
}

impl Documents {
    /// Opens the corpus, documents in the default field or column: every file must exist (checked now, so
    /// a typo fails before any work).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        Self::open_with(paths, CorpusOptions::default())
    }

    /// Opens the corpus, reading records as `options` says.
    pub fn open_with(paths: &[PathBuf], options: CorpusOptions) -> Result<Self> {
        let mut total_bytes = 0;
        for p in paths {
            let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
            if !meta.is_file() {
                return Err(Error::Format {
                    path: p.clone(),
                    offset: 0,
                    reason: "not a file (name each corpus file)".into(),
                });
            }
            let (c, layout) = kind(p);
            if c != Compression::None {
                let what = match layout {
                    Layout::Parquet => "a Parquet file compresses its own pages",
                    Layout::Arrow => {
                        "an Arrow IPC file is read as written (its buffers may be compressed)"
                    }
                    Layout::Text | Layout::JsonLines => "",
                };
                if !what.is_empty() {
                    return Err(Error::Format {
                        path: p.clone(),
                        offset: 0,
                        reason: format!("{what}: decompress the file first"),
                    });
                }
            }
            total_bytes += meta.len();
        }
        Ok(Documents {
            paths: paths.to_vec(),
            options,
            file: 0,
            open: None,
            disk_read: Arc::new(AtomicU64::new(0)),
            total_bytes,
            buf: String::new(),
        })
    }

    /// Bytes of the corpus files read from disk so far (a Parquet file's row groups count as they start).
    pub fn bytes_read(&self) -> u64 {
        self.disk_read.load(Ordering::Relaxed)
    }

    /// The corpus files' size on disk.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Opens file `self.file`.
    fn open_file(&mut self) -> Result<()> {
        let path = &self.paths[self.file];
        let (compression, layout) = kind(path);
        if layout == Layout::Parquet {
            let docs = parquet::ParquetDocuments::open(
                path,
                self.options.clone(),
                self.disk_read.clone(),
            )?;
            self.open = Some(Open::Parquet(Box::new(docs)));
            return Ok(());
        }
        if layout == Layout::Arrow {
            let docs =
                arrow::ArrowDocuments::open(path, self.options.clone(), self.disk_read.clone())?;
            self.open = Some(Open::Arrow(Box::new(docs)));
            return Ok(());
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let raw = Counted {
            file,
            count: self.disk_read.clone(),
            read: 0,
        };
        const BUF: usize = 1 << 20;
        let reader: Box<dyn BufRead + Send> = match compression {
            Compression::None => Box::new(std::io::BufReader::with_capacity(BUF, raw)),
            Compression::Zstd => {
                let d = zstd::Decoder::new(raw).map_err(|e| Error::io(path, e))?;
                Box::new(std::io::BufReader::with_capacity(BUF, d))
            }
            Compression::Gzip => Box::new(std::io::BufReader::with_capacity(
                BUF,
                flate2::read::MultiGzDecoder::new(std::io::BufReader::new(raw)),
            )),
        };
        self.open = Some(Open::Lines {
            reader,
            jsonl: layout == Layout::JsonLines,
            line: 0,
            offset: 0,
        });
        Ok(())
    }

    /// The next document of the current file; `None` at its end.
    fn next_in_file(&mut self) -> Result<Option<Document>> {
        let path = &self.paths[self.file];
        let Some(open) = self.open.as_mut() else {
            return Ok(None);
        };
        let (reader, jsonl, line, offset) = match open {
            Open::Parquet(p) => return p.next_document(),
            Open::Arrow(a) => return a.next_document(),
            Open::Lines {
                reader,
                jsonl,
                line,
                offset,
            } => (reader, *jsonl, line, offset),
        };
        let buf = &mut self.buf;
        if jsonl {
            while read_line(&mut **reader, buf, path, line, offset)? {
                if buf.trim().is_empty() {
                    continue;
                }
                // The error names the line and the (decompressed) byte offset of its start.
                let (line, start) = (*line, *offset - buf.len() as u64);
                let at = |reason: String| Error::Format {
                    path: path.clone(),
                    offset: start,
                    reason: format!("line {line}: {reason}"),
                };
                let v: serde_json::Value =
                    serde_json::from_str(buf).map_err(|e| at(format!("not JSON: {e}")))?;
                return json_document(&v, &self.options).map(Some).map_err(at);
            }
            return Ok(None);
        }
        // Plain text: a blank line ends a document.
        let mut doc = String::new();
        loop {
            let more = read_line(&mut **reader, buf, path, line, offset)?;
            if !more || buf.trim().is_empty() {
                let text = doc.trim();
                if !text.is_empty() {
                    return Ok(Some(Document::Text(text.to_string())));
                }
                if !more {
                    return Ok(None);
                }
                doc.clear();
            } else {
                doc.push_str(buf);
            }
        }
    }
}

/// The next line of `reader` into `buf` (newline kept), counting lines and bytes; `false` at its end.
fn read_line(
    reader: &mut dyn BufRead,
    buf: &mut String,
    path: &Path,
    line: &mut u64,
    offset: &mut u64,
) -> Result<bool> {
    buf.clear();
    let n = reader.read_line(buf).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        offset: *offset,
        reason: format!("line {}: {e}", *line + 1),
    })?;
    *offset += n as u64;
    *line += 1;
    Ok(n > 0)
}

/// The document of one JSON line: its first field among the options' names, a string or a list of token ids.
fn json_document(
    v: &serde_json::Value,
    options: &CorpusOptions,
) -> std::result::Result<Document, String> {
    let names = options.columns();
    let Some((name, field)) = names.iter().find_map(|n| v.get(*n).map(|f| (n, f))) else {
        return Err(format!("no {} field", quoted(&names)));
    };
    if let Some(text) = field.as_str() {
        return Ok(Document::Text(text.to_string()));
    }
    let Some(list) = field.as_array() else {
        return Err(format!(
            "field \"{name}\" is neither a string nor a list of token ids"
        ));
    };
    let ids = list
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let id = x
                .as_i64()
                .map(i128::from)
                .or_else(|| x.as_u64().map(i128::from))
                .ok_or_else(|| format!("\"{name}\"[{i}] = {x} is not a token id"))?;
            options
                .token(id)
                .map_err(|e| format!("\"{name}\"[{i}]: {e}"))
        })
        .collect::<std::result::Result<Vec<u32>, String>>()?;
    Ok(Document::Tokens(ids))
}

/// `"a"`, `"a", "b" or "c"`.
fn quoted(names: &[&str]) -> String {
    let q: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    match q.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => q.join(""),
    }
}

impl Iterator for Documents {
    type Item = Result<Document>;

    fn next(&mut self) -> Option<Result<Document>> {
        while self.file < self.paths.len() {
            let step = match self.open {
                None => self.open_file().and_then(|()| self.next_in_file()),
                Some(_) => self.next_in_file(),
            };
            match step {
                Ok(Some(doc)) => return Some(Ok(doc)),
                Ok(None) => {
                    self.open = None;
                    self.file += 1;
                }
                Err(e) => {
                    self.file = self.paths.len();
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// Reads every document of the corpus files into memory (default field or column).
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<Document>> {
    Documents::open(paths)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The corpus's documents, all text.
    fn text_documents(paths: &[PathBuf]) -> Result<Vec<String>> {
        Ok(read_documents(paths)?
            .into_iter()
            .map(|d| d.as_text().expect("a text document").to_string())
            .collect())
    }

    /// Documents are the trimmed non-empty runs of lines between blank lines, on awkward separators.
    #[test]
    fn documents_split_as_blank_line_separated_blocks() {
        let texts = [
            "a\n\nb",
            "a\n\n\nb\n",
            "a\n\n\n\nb\n\n",
            "\n\nfirst\nsecond line\n\n  \n\nthird",
            "one\n \ntwo",
            "crlf\r\n\r\nsplits\r\ntoo",
            " = Title = \n \n Body of it . \n \n = = Part = = \n",
            "no newline at all",
            "",
            "\n",
            "x\n\n\n\n\n\ny\n\n\nz",
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, t) in texts.iter().enumerate() {
            let p = dir.path().join(format!("{i}.txt"));
            std::fs::write(&p, t).unwrap();
            let mut want = Vec::new();
            let mut doc = Vec::new();
            for line in t.split('\n').chain([""]) {
                if line.trim().is_empty() {
                    let d = doc.join("\n").trim().to_string();
                    if !d.is_empty() {
                        want.push(d);
                    }
                    doc.clear();
                } else {
                    doc.push(line);
                }
            }
            assert_eq!(text_documents(&[p]).unwrap(), want, "{t:?}");
        }
        // Files in order, a .jsonl among them, its blank lines skipped.
        let j = dir.path().join("c.jsonl");
        std::fs::write(
            &j,
            "{\"text\": \"j1\"}\n\n  \n{\"text\": \"j2\", \"id\": 3}\r\n",
        )
        .unwrap();
        let paths = [
            dir.path().join("0.txt"),
            j.clone(),
            dir.path().join("7.txt"),
        ];
        let docs = text_documents(&paths).unwrap();
        assert_eq!(docs, ["a", "b", "j1", "j2", "no newline at all"]);
        let mut it = Documents::open(&paths).unwrap();
        assert_eq!(it.total_bytes(), 4 + 44 + 17);
        it.by_ref().for_each(drop);
        assert_eq!(it.bytes_read(), it.total_bytes());
    }

    /// `.zst` and `.gz` files (gzip members concatenated too) read as their text; the progress counts
    /// their bytes on disk.
    #[test]
    fn compressed_files_read_as_their_text() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let text = "one\n\ntwo\nlines\n \nthree\n\n".repeat(1000);
        let jsonl = "{\"text\": \"first\"}\n{\"text\": \"second\"}\n";
        let plain = dir.path().join("a.txt");
        std::fs::write(&plain, &text).unwrap();
        let zst = dir.path().join("a.txt.zst");
        std::fs::write(&zst, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        let gz = dir.path().join("b.JSONL.GZ");
        let mut bytes = Vec::new();
        for half in [&jsonl[..18], &jsonl[18..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(half.as_bytes()).unwrap();
            bytes.extend(e.finish().unwrap());
        }
        std::fs::write(&gz, bytes).unwrap();
        let want = text_documents(std::slice::from_ref(&plain)).unwrap();
        assert_eq!(want.len(), 3000);
        assert_eq!(text_documents(std::slice::from_ref(&zst)).unwrap(), want);
        assert_eq!(
            text_documents(std::slice::from_ref(&gz)).unwrap(),
            ["first", "second"]
        );
        let mut it = Documents::open(&[zst.clone(), gz]).unwrap();
        it.by_ref().for_each(drop);
        assert_eq!(it.bytes_read(), it.total_bytes());
        // A truncated or damaged compressed file is an error naming it, not a short corpus.
        for p in [&zst, &dir.path().join("b.JSONL.GZ")] {
            let mut z = std::fs::read(p).unwrap();
            z.truncate(z.len() - 5);
            let cut = dir
                .path()
                .join(format!("cut-{}", p.file_name().unwrap().to_str().unwrap()));
            std::fs::write(&cut, z).unwrap();
            let err = text_documents(&[cut]).unwrap_err().to_string();
            assert!(err.contains("cut-"), "{err}");
        }
        let mut z = std::fs::read(&zst).unwrap();
        let mid = z.len() / 2;
        z[mid] ^= 0xff;
        z.truncate(z.len() - 3);
        std::fs::write(&zst, z).unwrap();
        let err = text_documents(&[zst]).unwrap_err().to_string();
        assert!(err.contains("a.txt.zst"), "{err}");
    }

    #[test]
    fn bad_jsonl_lines_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first.txt");
        std::fs::write(&first, "some text\n\nmore\n").unwrap();
        let j = dir.path().join("c.jsonl");
        std::fs::write(&j, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
        let err = text_documents(&[first.clone(), j.clone()])
            .unwrap_err()
            .to_string();
        // The offset is within the file named (the line's start), not counted across files.
        assert!(
            err.contains("c.jsonl") && err.contains("byte 15") && err.contains("line 2"),
            "{err}"
        );
        std::fs::write(&j, "{\"text\": \"ok\"}\n\nnot json\n").unwrap();
        let err = text_documents(std::slice::from_ref(&j))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3: not JSON"), "{err}");
        let missing = dir.path().join("missing.txt");
        let err = Documents::open(&[j, missing]).err().unwrap().to_string();
        assert!(err.contains("missing.txt"), "{err}");
        let err = Documents::open(&[dir.path().to_path_buf()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a file"), "{err}");
        let bad = dir.path().join("latin1.txt");
        std::fs::write(&bad, b"ok\n\ncaf\xe9\n").unwrap();
        let err = text_documents(&[bad]).unwrap_err().to_string();
        assert!(
            err.contains("latin1.txt") && err.contains("line 3"),
            "{err}"
        );
    }

    /// `tests/fixtures/NAME`: Parquet files written by pyarrow as Hugging Face datasets' are
    /// (`scripts/make-parquet-fixtures.py`; the Arrow ones by `scripts/make-arrow-fixtures.py`; their rows from
    /// `scripts/corpus_fixture_rows.py`, whose formulas `fixture_text` and `fixture_ids` repeat).
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn fixture_text(i: usize) -> String {
        format!(
            "Document {i}: the café ☕ opens at {} o'clock.\nSecond line {i}.",
            i % 12
        )
    }

    fn fixture_ids(i: usize) -> Vec<u32> {
        let n = if i == 0 { 3000 } else { i % 7 + 1 };
        (0..n).map(|j| ((i * 31 + j * 17) % 512) as u32).collect()
    }

    fn all(paths: &[PathBuf], options: CorpusOptions) -> Result<Vec<Document>> {
        Documents::open_with(paths, options)?.collect()
    }

    /// Parquet text and token-id columns read as pyarrow wrote them: every row in order across row groups
    /// and pages (a 3,000-id row spans pages), null rows and empty lists skipped, the default column found
    /// among others, the legacy list layout and int64 ids; the progress ends at the files' size.
    #[test]
    fn parquet_rows_are_documents() {
        let text = fixture("hf-text.parquet");
        let want: Vec<Document> = (0..50)
            .filter(|i| ![7, 9].contains(i))
            .map(|i| Document::Text(fixture_text(i)))
            .collect();
        assert_eq!(read_documents(std::slice::from_ref(&text)).unwrap(), want);

        let ids = fixture("hf-input-ids.parquet");
        let want: Vec<Document> = (0..40)
            .filter(|i| ![3, 5].contains(i))
            .map(|i| Document::Tokens(fixture_ids(i)))
            .collect();
        assert_eq!(read_documents(std::slice::from_ref(&ids)).unwrap(), want);

        let legacy = fixture("legacy-tokens.parquet");
        let want: Vec<Document> = (1..9).map(|i| Document::Tokens(fixture_ids(i))).collect();
        assert_eq!(read_documents(std::slice::from_ref(&legacy)).unwrap(), want);

        // Files of every kind in one corpus, in order; the progress counts each whole file once.
        let j = tempfile::NamedTempFile::with_suffix(".jsonl").unwrap();
        std::fs::write(j.path(), "{\"text\": \"between\"}\n").unwrap();
        let paths = [legacy, j.path().to_path_buf(), text.clone()];
        let mut it = Documents::open(&paths).unwrap();
        let docs: Vec<Document> = it.by_ref().map(|d| d.unwrap()).collect();
        assert_eq!(docs.len(), 8 + 1 + 48);
        assert_eq!(docs[8], Document::Text("between".into()));
        assert_eq!(docs[9], Document::Text(fixture_text(0)));
        assert_eq!(it.bytes_read(), it.total_bytes());

        // A column named: the attention mask's lists of ones are token documents too.
        let masks = all(
            std::slice::from_ref(&ids),
            CorpusOptions {
                column: Some("attention_mask".into()),
                vocab: Some(2),
            },
        )
        .unwrap();
        assert_eq!(masks.len(), 38);
        assert_eq!(masks[0], Document::Tokens(vec![1; 3000]));
    }

    /// The errors of one format's bad inputs, from its fixtures (`ext`: `parquet` or `arrow`).
    struct BadInputs {
        /// The first row (counting null and empty ones, as pyarrow numbers them) of hf-input-ids with an
        /// id ≥ 500, and that id's index.
        row: usize,
        at: usize,
        /// hf-input-ids read with a vocabulary of 500.
        vocab: String,
        /// null-token (a null inside a list) and nested-text (lists of strings).
        null_id: String,
        nested: String,
        /// hf-text's integer `id` column named, and a column it lacks.
        int_column: String,
        missing: String,
        /// The format's file compressed with gzip and with zstd, and JSON named as the format.
        compressed: [String; 2],
        foreign: String,
    }

    fn bad_inputs(ext: &str) -> BadInputs {
        let row = (0..40)
            .find(|&i| i != 3 && i != 5 && fixture_ids(i).iter().any(|&t| t >= 500))
            .unwrap();
        let at = fixture_ids(row).iter().position(|&t| t >= 500).unwrap();
        let error = |name: &str, column: Option<&str>, vocab: Option<u32>| {
            let options = CorpusOptions {
                column: column.map(str::to_string),
                vocab,
            };
            all(&[fixture(&format!("{name}.{ext}"))], options)
                .unwrap_err()
                .to_string()
        };
        let dir = tempfile::tempdir().unwrap();
        let compressed = ["gz", "zst"].map(|c| {
            let path = dir.path().join(format!("x.{ext}.{c}"));
            std::fs::write(&path, b"").unwrap();
            Documents::open(&[path]).err().unwrap().to_string()
        });
        let fake = dir.path().join(format!("fake.{ext}"));
        std::fs::write(&fake, format!("{{\"text\": \"json, named .{ext}\"}}\n")).unwrap();
        BadInputs {
            row,
            at,
            vocab: error("hf-input-ids", None, Some(500)),
            null_id: error("null-token", None, None),
            nested: error("nested-text", None, None),
            int_column: error("hf-text", Some("id"), None),
            missing: error("hf-text", Some("story"), None),
            compressed,
            foreign: text_documents(&[fake]).unwrap_err().to_string(),
        }
    }

    /// Ids outside the vocabulary, null ids, and columns that hold no documents are errors naming the file,
    /// the row and the column; a missing column lists those the file has; a compressed Parquet file, and a
    /// file that is not Parquet at all, are refused.
    #[test]
    fn parquet_errors_name_the_row_and_column() {
        let e = bad_inputs("parquet");
        let (row, at) = (e.row, e.at);
        assert!(
            e.vocab.contains("hf-input-ids.parquet")
                && e.vocab.contains(&format!("row {row}: \"input_ids\"[{at}]"))
                && e.vocab.contains("vocabulary of 500"),
            "{}",
            e.vocab
        );
        let ids = fixture("hf-input-ids.parquet");
        let vocab = CorpusOptions {
            column: None,
            vocab: Some(512),
        };
        assert_eq!(all(std::slice::from_ref(&ids), vocab).unwrap().len(), 38);
        assert!(
            e.null_id.contains("row 1: \"input_ids\"[1] is null"),
            "{}",
            e.null_id
        );
        assert!(e.nested.contains("nested strings"), "{}", e.nested);
        assert!(
            e.int_column.contains("one integer per row"),
            "{}",
            e.int_column
        );
        assert!(
            e.missing.contains("no \"story\" column") && e.missing.contains("columns: id, text"),
            "{}",
            e.missing
        );
        for err in &e.compressed {
            assert!(err.contains("decompress the file first"), "{err}");
        }
        assert!(
            e.foreign.contains("fake.parquet") && e.foreign.contains("not a readable Parquet"),
            "{}",
            e.foreign
        );
    }

    /// Arrow IPC files (datasets' `save_to_disk` streams, with zstd- or lz4-compressed buffers, and the IPC
    /// file format) give the documents of their Parquet twins, across record batches; the progress counts
    /// each file whole.
    #[test]
    fn arrow_rows_are_documents() {
        for name in ["hf-text", "hf-input-ids"] {
            let arrow = fixture(&format!("{name}.arrow"));
            let parquet = fixture(&format!("{name}.parquet"));
            let docs = read_documents(std::slice::from_ref(&arrow)).unwrap();
            assert_eq!(docs, read_documents(&[parquet]).unwrap(), "{name}");
            assert_eq!(docs.len(), if name == "hf-text" { 48 } else { 38 });
        }
        let file = fixture("tokens-file.arrow");
        let tokens = all(
            std::slice::from_ref(&file),
            CorpusOptions {
                column: Some("tokens".into()),
                vocab: Some(512),
            },
        )
        .unwrap();
        let want: Vec<Document> = (1..9).map(|i| Document::Tokens(fixture_ids(i))).collect();
        assert_eq!(tokens, want);
        // Its default column is the large_string text.
        let texts = read_documents(std::slice::from_ref(&file)).unwrap();
        assert_eq!(texts[2], Document::Text(fixture_text(3)));
        let paths = [file, fixture("hf-text.arrow")];
        let mut it = Documents::open(&paths).unwrap();
        assert_eq!(it.by_ref().count(), 8 + 48);
        assert_eq!(it.bytes_read(), it.total_bytes());
    }

    /// Arrow's errors name the file, the record batch, the row and the column, as Parquet's do.
    #[test]
    fn arrow_errors_name_the_row_and_column() {
        let e = bad_inputs("arrow");
        let (row, at) = (e.row, e.at);
        assert!(
            e.vocab.contains("hf-input-ids.arrow")
                && e.vocab.contains(&format!("record batch {}", row / 13))
                && e.vocab.contains(&format!("row {row}: \"input_ids\"[{at}]"))
                && e.vocab.contains("vocabulary of 500"),
            "{}",
            e.vocab
        );
        assert!(
            e.null_id.contains("record batch 1")
                && e.null_id.contains("row 1: \"input_ids\"[1] is null"),
            "{}",
            e.null_id
        );
        assert!(
            e.nested.contains("column \"text\" is List("),
            "{}",
            e.nested
        );
        assert!(
            e.int_column.contains("column \"id\" is Int64"),
            "{}",
            e.int_column
        );
        assert!(
            e.missing.contains("no \"story\" column") && e.missing.contains("columns: id, text"),
            "{}",
            e.missing
        );
        for err in &e.compressed {
            assert!(err.contains("decompress the file first"), "{err}");
        }
        assert!(
            e.foreign.contains("fake.arrow") && e.foreign.contains("not a readable Arrow IPC"),
            "{}",
            e.foreign
        );
    }

    /// A JSON line's field may hold token ids; bad ids are errors naming the line and the index.
    #[test]
    fn jsonl_token_lists_are_documents() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("t.jsonl");
        std::fs::write(
            &j,
            "{\"input_ids\": [1, 2, 3]}\n{\"text\": \"words\", \"input_ids\": [9]}\n{\"tokens\": []}\n",
        )
        .unwrap();
        assert_eq!(
            read_documents(std::slice::from_ref(&j)).unwrap(),
            [
                Document::Tokens(vec![1, 2, 3]),
                Document::Text("words".into()),
                Document::Tokens(vec![]),
            ]
        );
        for (line, want) in [
            (
                "{\"input_ids\": [1, -2]}",
                "\"input_ids\"[1]: -2 is not a token id",
            ),
            (
                "{\"input_ids\": [1, 2.5]}",
                "\"input_ids\"[1] = 2.5 is not a token id",
            ),
            (
                "{\"input_ids\": [4294967296]}",
                "token id 4294967296 is outside",
            ),
            (
                "{\"input_ids\": [600]}",
                "outside the model's vocabulary of 512",
            ),
            ("{\"input_ids\": {\"a\": 1}}", "neither a string nor a list"),
            (
                "{\"ids\": [1]}",
                "no \"text\", \"input_ids\" or \"tokens\" field",
            ),
        ] {
            std::fs::write(&j, format!("{{\"text\": \"ok\"}}\n{line}\n")).unwrap();
            let options = CorpusOptions {
                column: None,
                vocab: Some(512),
            };
            let err = all(std::slice::from_ref(&j), options)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("t.jsonl") && err.contains("line 2") && err.contains(want),
                "{line}: {err}"
            );
        }
    }
}
