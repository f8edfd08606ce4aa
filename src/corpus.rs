//! A text corpus read one document at a time, so that caching a few tokens of a large corpus reads only
//! the start of it, and memory holds one document, not the files.
//!
//! Documents are the blocks of plain-text files between blank lines (a line of only whitespace is blank,
//! so WikiText's `" \n"` lines and a `\r\n` file's empty lines separate documents too; each block
//! trimmed, empty ones dropped), or the `"text"` field of each non-blank line of a `.jsonl` file, in file
//! order; their index in that order is the store's document id. A file ending in `.zst` or `.gz` is
//! decompressed as it is read (`pile.jsonl.zst` is JSON lines). (Before 2026-12-02 only an empty line
//! separated documents, so a whole WikiText file was one document; a cache begun then over such a corpus
//! resumes with other document boundaries.)

use crate::{Error, Result};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A file's bytes as read from disk, counted (the progress of a compressed file is its compressed bytes).
struct Counted {
    file: std::fs::File,
    count: Arc<AtomicU64>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
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

/// The file's compression and whether its (decompressed) text is JSON lines.
fn kind(path: &Path) -> (Compression, bool) {
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
    (c, ext(&inner).as_deref() == Some("jsonl"))
}

/// The documents of a list of corpus files, in order (an iterator; see the module documentation).
pub struct Documents {
    paths: Vec<PathBuf>,
    /// The index of the file being read, its reader and whether it is JSON lines.
    file: usize,
    reader: Option<Box<dyn BufRead + Send>>,
    jsonl: bool,
    /// Lines and (decompressed) bytes of the current file read so far.
    line: u64,
    offset: u64,
    /// Bytes read from disk, all files so far, and the files' total size.
    disk_read: Arc<AtomicU64>,
    total_bytes: u64,
    buf: String,
}

impl Documents {
    /// Opens the corpus: every file must exist (checked now, so a typo fails before any work).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
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
            total_bytes += meta.len();
        }
        Ok(Documents {
            paths: paths.to_vec(),
            file: 0,
            reader: None,
            jsonl: false,
            line: 0,
            offset: 0,
            disk_read: Arc::new(AtomicU64::new(0)),
            total_bytes,
            buf: String::new(),
        })
    }

    /// Bytes of the corpus files read from disk so far.
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
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let raw = Counted {
            file,
            count: self.disk_read.clone(),
        };
        let (compression, jsonl) = kind(path);
        const BUF: usize = 1 << 20;
        self.reader = Some(match compression {
            Compression::None => Box::new(std::io::BufReader::with_capacity(BUF, raw)),
            Compression::Zstd => {
                let d = zstd::Decoder::new(raw).map_err(|e| Error::io(path, e))?;
                Box::new(std::io::BufReader::with_capacity(BUF, d))
            }
            Compression::Gzip => Box::new(std::io::BufReader::with_capacity(
                BUF,
                flate2::read::MultiGzDecoder::new(std::io::BufReader::new(raw)),
            )),
        });
        self.jsonl = jsonl;
        self.line = 0;
        self.offset = 0;
        Ok(())
    }

    /// The next line of the current file into `self.buf` (newline kept); `false` at its end.
    fn read_line(&mut self) -> Result<bool> {
        self.buf.clear();
        let reader = self.reader.as_mut().expect("a file is open");
        let n = reader.read_line(&mut self.buf).map_err(|e| Error::Format {
            path: self.paths[self.file].clone(),
            offset: self.offset,
            reason: format!("line {}: {e}", self.line + 1),
        })?;
        self.offset += n as u64;
        self.line += 1;
        Ok(n > 0)
    }

    /// The next document of the current file; `None` at its end.
    fn next_in_file(&mut self) -> Result<Option<String>> {
        if self.jsonl {
            while self.read_line()? {
                if self.buf.trim().is_empty() {
                    continue;
                }
                // The error names the line and the (decompressed) byte offset of its start.
                let at = |reason: String| Error::Format {
                    path: self.paths[self.file].clone(),
                    offset: self.offset - self.buf.len() as u64,
                    reason,
                };
                let v: serde_json::Value = serde_json::from_str(&self.buf)
                    .map_err(|e| at(format!("line {}: not JSON: {e}", self.line)))?;
                let Some(text) = v.get("text").and_then(|t| t.as_str()) else {
                    return Err(at(format!("line {}: no \"text\" string field", self.line)));
                };
                return Ok(Some(text.to_string()));
            }
            return Ok(None);
        }
        // Plain text: a blank line ends a document.
        let mut doc = String::new();
        loop {
            let more = self.read_line()?;
            if !more || self.buf.trim().is_empty() {
                let text = doc.trim();
                if !text.is_empty() {
                    return Ok(Some(text.to_string()));
                }
                if !more {
                    return Ok(None);
                }
                doc.clear();
            } else {
                doc.push_str(&self.buf);
            }
        }
    }
}

impl Iterator for Documents {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        while self.file < self.paths.len() {
            let step = match self.reader {
                None => self.open_file().and_then(|()| self.next_in_file()),
                Some(_) => self.next_in_file(),
            };
            match step {
                Ok(Some(doc)) => return Some(Ok(doc)),
                Ok(None) => {
                    self.reader = None;
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

/// Reads every document of the corpus files into memory.
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<String>> {
    Documents::open(paths)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(read_documents(&[p]).unwrap(), want, "{t:?}");
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
        let docs = read_documents(&paths).unwrap();
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
        let want = read_documents(std::slice::from_ref(&plain)).unwrap();
        assert_eq!(want.len(), 3000);
        assert_eq!(read_documents(std::slice::from_ref(&zst)).unwrap(), want);
        assert_eq!(
            read_documents(std::slice::from_ref(&gz)).unwrap(),
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
            let err = read_documents(&[cut]).unwrap_err().to_string();
            assert!(err.contains("cut-"), "{err}");
        }
        let mut z = std::fs::read(&zst).unwrap();
        let mid = z.len() / 2;
        z[mid] ^= 0xff;
        z.truncate(z.len() - 3);
        std::fs::write(&zst, z).unwrap();
        let err = read_documents(&[zst]).unwrap_err().to_string();
        assert!(err.contains("a.txt.zst"), "{err}");
    }

    #[test]
    fn bad_jsonl_lines_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first.txt");
        std::fs::write(&first, "some text\n\nmore\n").unwrap();
        let j = dir.path().join("c.jsonl");
        std::fs::write(&j, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
        let err = read_documents(&[first.clone(), j.clone()])
            .unwrap_err()
            .to_string();
        // The offset is within the file named (the line's start), not counted across files.
        assert!(
            err.contains("c.jsonl") && err.contains("byte 15") && err.contains("line 2"),
            "{err}"
        );
        std::fs::write(&j, "{\"text\": \"ok\"}\n\nnot json\n").unwrap();
        let err = read_documents(std::slice::from_ref(&j))
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
        let err = read_documents(&[bad]).unwrap_err().to_string();
        assert!(
            err.contains("latin1.txt") && err.contains("line 3"),
            "{err}"
        );
    }
}
