//! Documents from a Parquet file (Hugging Face datasets' format): one per row of its text column (strings)
//! or token-id column (lists of 32- or 64-bit integers), read a row group at a time through that column's
//! own reader, its levels and values decoded directly: only that column's pages are read, and no row is
//! assembled as a record.
//!
//! A text column is a top-level `BYTE_ARRAY` (UTF-8 checked per row); a token column is one level of list
//! over `INT32`/`INT64`: the standard three-level `LIST` (what pyarrow writes for `list<int>`) or the legacy
//! repeated primitive. Null rows and empty lists are skipped; a null element inside a list is an error,
//! as is an id outside the vocabulary (the error names the row).
//!
//! The `parquet` crate panics on some damaged files (a dictionary-encoded page with no dictionary, among
//! others, found by flipping bits in the fixtures); every call into it goes through [`guarded`], which
//! turns such a panic into an error naming the file and the column chunk.

use super::{CorpusOptions, Document, format_error, guarded};
use crate::{Error, Result};
use ::parquet::basic::{Repetition, Type as Physical};
use ::parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use ::parquet::data_type::{ByteArray, ByteArrayType, DataType, Int32Type, Int64Type};
use ::parquet::file::reader::{FileReader, SerializedFileReader};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Records decoded per read.
const BATCH: usize = 256;

/// The column's reader in the current row group, by physical type.
enum Leaf {
    Text(ColumnReaderImpl<ByteArrayType>),
    I32(ColumnReaderImpl<Int32Type>),
    I64(ColumnReaderImpl<Int64Type>),
}

/// The documents of one Parquet file, in row order.
pub(super) struct ParquetDocuments {
    path: PathBuf,
    options: CorpusOptions,
    reader: SerializedFileReader<std::fs::File>,
    /// The column's name and its leaf's index among the file's leaf columns.
    name: String,
    leaf_index: usize,
    max_def: i16,
    /// The definition level of a null element of a token list whose elements are optional.
    null_element: Option<i16>,
    /// The next row group to open, the current one's reader and its column chunk's byte offset.
    row_group: usize,
    leaf: Option<Leaf>,
    chunk_offset: u64,
    /// Documents decoded, not yet handed out.
    pending: VecDeque<Document>,
    /// Rows of the file decoded so far (the next row's index).
    row: u64,
    disk_read: Arc<AtomicU64>,
    /// This file's bytes counted in `disk_read` so far, and its size.
    counted: u64,
    file_len: u64,
    def: Vec<i16>,
    rep: Vec<i16>,
}

impl ParquetDocuments {
    /// Opens the file and finds the documents' column (its footer and schema read now).
    pub(super) fn open(
        path: &Path,
        options: CorpusOptions,
        disk_read: Arc<AtomicU64>,
    ) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let reader = guarded(|| SerializedFileReader::new(file))
            .map_err(|e| format_error(path, 0, format!("not a readable Parquet file: {e}")))?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let fields = schema.root_schema().get_fields();
        let have: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        let name = have[options.pick_column(path, &have)?].to_string();
        let leaves: Vec<usize> = (0..schema.num_columns())
            .filter(|&i| schema.column(i).path().parts().first() == Some(&name))
            .collect();
        let unusable = |what: &str| {
            format_error(
                path,
                0,
                format!("column \"{name}\" is {what}, not strings or lists of integer token ids"),
            )
        };
        let [leaf_index] = leaves[..] else {
            return Err(unusable("a group of several columns"));
        };
        let col = schema.column(leaf_index);
        let depth = col.path().parts().len();
        let tokens = match (col.physical_type(), col.max_rep_level(), depth) {
            (Physical::BYTE_ARRAY, 0, 1) => false,
            (Physical::INT32 | Physical::INT64, 1, _) => true,
            (Physical::BYTE_ARRAY, _, _) => return Err(unusable("nested strings")),
            (Physical::INT32 | Physical::INT64, 0, _) => {
                return Err(unusable("one integer per row"));
            }
            (t, _, _) => return Err(unusable(&format!("of type {t}"))),
        };
        let element = col.self_type().get_basic_info().repetition();
        let null_element =
            (tokens && element == Repetition::OPTIONAL).then(|| col.max_def_level() - 1);
        Ok(ParquetDocuments {
            path: path.to_path_buf(),
            options,
            name,
            leaf_index,
            max_def: col.max_def_level(),
            null_element,
            reader,
            row_group: 0,
            leaf: None,
            chunk_offset: 0,
            pending: VecDeque::new(),
            row: 0,
            disk_read,
            counted: 0,
            file_len,
            def: Vec::new(),
            rep: Vec::new(),
        })
    }

    /// The next document; `None` after the last row group.
    pub(super) fn next_document(&mut self) -> Result<Option<Document>> {
        loop {
            if let Some(d) = self.pending.pop_front() {
                return Ok(Some(d));
            }
            if !self.decode_batch()? {
                return Ok(None);
            }
        }
    }

    /// An error at the current column chunk.
    fn error(&self, reason: String) -> Error {
        format_error(
            &self.path,
            self.chunk_offset,
            format!("row group {}: {reason}", self.row_group.saturating_sub(1)),
        )
    }

    /// Decodes up to [`BATCH`] rows into `pending`; `false` when the file has none left.
    fn decode_batch(&mut self) -> Result<bool> {
        loop {
            if self.leaf.is_none() {
                if self.row_group >= self.reader.num_row_groups() {
                    // The whole file read: its footer and headers count too.
                    self.count(self.file_len.saturating_sub(self.counted));
                    return Ok(false);
                }
                let g = self.row_group;
                self.row_group += 1;
                let (reader, leaf_index) = (&self.reader, self.leaf_index);
                let (size, offset, column) = guarded(|| {
                    let rg = reader.get_row_group(g)?;
                    let meta = rg.metadata();
                    let chunk = meta.column(leaf_index);
                    let start = chunk
                        .dictionary_page_offset()
                        .unwrap_or(chunk.data_page_offset());
                    let size = meta.compressed_size();
                    Ok::<_, ::parquet::errors::ParquetError>((
                        size,
                        start,
                        rg.get_column_reader(leaf_index)?,
                    ))
                })
                .map_err(|e| format_error(&self.path, 0, format!("row group {g}: {e}")))?;
                self.chunk_offset = offset.max(0) as u64;
                self.count((size.max(0) as u64).min(self.file_len.saturating_sub(self.counted)));
                self.leaf = Some(match column {
                    ColumnReader::ByteArrayColumnReader(r) => Leaf::Text(r),
                    ColumnReader::Int32ColumnReader(r) => Leaf::I32(r),
                    ColumnReader::Int64ColumnReader(r) => Leaf::I64(r),
                    _ => return Err(self.error("unexpected column type".into())),
                });
            }
            self.def.clear();
            self.rep.clear();
            let (def, rep) = (&mut self.def, &mut self.rep);
            let leaf = self.leaf.as_mut().expect("a row group is open");
            let read = guarded(|| match leaf {
                Leaf::Text(r) => {
                    let mut v: Vec<ByteArray> = Vec::new();
                    let (n, _, levels) = r.read_records(BATCH, Some(def), Some(rep), &mut v)?;
                    Ok((n, levels, Values::Text(v)))
                }
                Leaf::I32(r) => read_ids(r, def, rep),
                Leaf::I64(r) => read_ids(r, def, rep),
            });
            let (records, levels, values) = read.map_err(|e| self.error(e))?;
            if records == 0 {
                self.leaf = None;
                continue;
            }
            match values {
                Values::Text(v) => self.texts(levels, v)?,
                Values::Ids(v) => self.token_lists(levels, v)?,
            }
            self.row += records as u64;
            return Ok(true);
        }
    }

    /// Adds `n` bytes of this file to the corpus's progress.
    fn count(&mut self, n: u64) {
        self.counted += n;
        self.disk_read.fetch_add(n, Ordering::Relaxed);
    }

    /// The definition level of level `i` (the maximum when the column has no levels stored).
    fn def_at(&self, i: usize) -> i16 {
        self.def.get(i).copied().unwrap_or(self.max_def)
    }

    /// One text document per row (a flat column: a level per row), nulls skipped.
    fn texts(&mut self, levels: usize, values: Vec<ByteArray>) -> Result<()> {
        let mut values = values.into_iter();
        for i in 0..levels {
            if self.def_at(i) < self.max_def {
                continue; // a null row
            }
            let v = values
                .next()
                .ok_or_else(|| self.error("fewer values than levels".into()))?;
            let text = std::str::from_utf8(v.data()).map_err(|e| {
                self.error(format!(
                    "row {}: column \"{}\" is not UTF-8 ({e})",
                    self.row + i as u64,
                    self.name
                ))
            })?;
            if !text.is_empty() {
                self.pending.push_back(Document::Text(text.to_string()));
            }
        }
        Ok(())
    }

    /// One token document per row (a list column: a row starts at each repetition level 0), empty and
    /// null lists skipped.
    fn token_lists(&mut self, levels: usize, values: Vec<i128>) -> Result<()> {
        let mut values = values.into_iter();
        let mut current: Option<Vec<u32>> = None;
        let mut row = self.row;
        for i in 0..levels {
            if self.rep.get(i).copied().unwrap_or(0) == 0 {
                if let Some(ids) = current.take() {
                    row += 1;
                    if !ids.is_empty() {
                        self.pending.push_back(Document::Tokens(ids));
                    }
                }
                current = Some(Vec::new());
            }
            let d = self.def_at(i);
            let Some(ids) = current.as_mut() else {
                return Err(self.error(format!(
                    "row {row}: a list continues no row (damaged repetition levels)"
                )));
            };
            if d == self.max_def {
                let id = values
                    .next()
                    .ok_or_else(|| self.error("fewer values than levels".into()))?;
                let at = ids.len();
                let id = self
                    .options
                    .token(id)
                    .map_err(|e| self.error(format!("row {row}: \"{}\"[{at}]: {e}", self.name)))?;
                ids.push(id);
            } else if Some(d) == self.null_element {
                let at = ids.len();
                return Err(self.error(format!(
                    "row {row}: \"{}\"[{at}] is null, not a token id",
                    self.name
                )));
            }
        }
        if let Some(ids) = current.filter(|ids| !ids.is_empty()) {
            self.pending.push_back(Document::Tokens(ids));
        }
        Ok(())
    }
}

/// Up to [`BATCH`] rows of a token-id column: rows, levels, and the ids widened (i32 and i64 alike).
fn read_ids<T: DataType>(
    r: &mut ColumnReaderImpl<T>,
    def: &mut Vec<i16>,
    rep: &mut Vec<i16>,
) -> ::parquet::errors::Result<(usize, usize, Values)>
where
    T::T: Into<i128>,
{
    let mut v: Vec<T::T> = Vec::new();
    let (n, _, levels) = r.read_records(BATCH, Some(def), Some(rep), &mut v)?;
    Ok((
        n,
        levels,
        Values::Ids(v.into_iter().map(Into::into).collect()),
    ))
}

/// A batch's values.
enum Values {
    Text(Vec<ByteArray>),
    Ids(Vec<i128>),
}
