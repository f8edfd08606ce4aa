//! A text corpus read one document at a time, so that caching a few tokens of a large corpus reads only
//! the start of it, and memory holds one document, not the files.
//!
//! Documents are the blocks of plain-text files between blank lines (a line of only whitespace is blank,
//! so WikiText's `" \n"` lines and a `\r\n` file's empty lines separate documents too; each block
//! trimmed, empty ones dropped), or the `"text"` field of each non-blank line of a `.jsonl` file, in file
//! order; their index in that order is the store's document id. (Before 2026-12-02 only an empty line
//! separated documents, so a whole WikiText file was one document; a cache begun then over such a corpus
//! resumes with other document boundaries.)

use crate::{Error, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// The documents of a list of corpus files, in order (an iterator; see the module documentation).
pub struct Documents {
    paths: Vec<PathBuf>,
    /// The index of the file being read, and its reader.
    file: usize,
    reader: Option<std::io::BufReader<std::fs::File>>,
    /// Lines of the current file read so far.
    line: u64,
    /// Bytes of all files read so far, and their total size.
    bytes_read: u64,
    total_bytes: u64,
    buf: String,
}

impl Documents {
    /// Opens the corpus: every file must exist (checked now, so a typo fails before any work).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut total_bytes = 0;
        for p in paths {
            let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
            total_bytes += meta.len();
        }
        Ok(Documents {
            paths: paths.to_vec(),
            file: 0,
            reader: None,
            line: 0,
            bytes_read: 0,
            total_bytes,
            buf: String::new(),
        })
    }

    /// Bytes of the corpus read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The corpus's size in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The next line of the current file into `self.buf` (newline kept); `false` at its end.
    fn read_line(&mut self, path: &Path) -> Result<bool> {
        self.buf.clear();
        let reader = self.reader.as_mut().expect("a file is open");
        let n = reader.read_line(&mut self.buf).map_err(|e| Error::Format {
            path: path.into(),
            offset: self.bytes_read,
            reason: format!("line {}: {e}", self.line + 1),
        })?;
        self.bytes_read += n as u64;
        self.line += 1;
        Ok(n > 0)
    }

    /// The next document of the current file; `None` at its end.
    fn next_in_file(&mut self) -> Result<Option<String>> {
        let path = self.paths[self.file].clone();
        if path.extension().is_some_and(|e| e == "jsonl") {
            while self.read_line(&path)? {
                if self.buf.trim().is_empty() {
                    continue;
                }
                // The error names the line and the byte offset of its start.
                let at = |reason: String| Error::Format {
                    path: path.clone(),
                    offset: self.bytes_read - self.buf.len() as u64,
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
            let more = self.read_line(&path)?;
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
            if self.reader.is_none() {
                let p = &self.paths[self.file];
                match std::fs::File::open(p) {
                    Ok(f) => self.reader = Some(std::io::BufReader::with_capacity(1 << 20, f)),
                    Err(e) => {
                        self.file = self.paths.len();
                        return Some(Err(Error::io(p, e)));
                    }
                }
                self.line = 0;
            }
            match self.next_in_file() {
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

    #[test]
    fn bad_jsonl_lines_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("c.jsonl");
        std::fs::write(&j, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
        let err = read_documents(std::slice::from_ref(&j))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.jsonl") && err.contains("line 2"), "{err}");
        std::fs::write(&j, "{\"text\": \"ok\"}\n\nnot json\n").unwrap();
        let err = read_documents(std::slice::from_ref(&j))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3: not JSON"), "{err}");
        let missing = dir.path().join("missing.txt");
        let err = Documents::open(&[j, missing]).err().unwrap().to_string();
        assert!(err.contains("missing.txt"), "{err}");
        let bad = dir.path().join("latin1.txt");
        std::fs::write(&bad, b"ok\n\ncaf\xe9\n").unwrap();
        let err = read_documents(&[bad]).unwrap_err().to_string();
        assert!(
            err.contains("latin1.txt") && err.contains("line 3"),
            "{err}"
        );
    }
}
