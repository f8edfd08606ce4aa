//! Documents from an Arrow IPC file (`.arrow`): what Hugging Face datasets' `save_to_disk` writes
//! (`data-00000-of-00001.arrow`) and what its cache holds, in the IPC stream format, or the IPC file format
//! (Feather v2, told apart by its `ARROW1` magic, whose messages are a stream too). One document per row of
//! the text column (strings) or the token-id column (lists of integers), read a record batch at a time.
//!
//! A text column is `Utf8`, `LargeUtf8` or `Utf8View`; a token column is a `List`, `LargeList` or
//! `FixedSizeList` of 8- to 64-bit integers, signed or not. Null rows, empty strings and empty lists are
//! skipped; a null element inside a list, or an id outside the vocabulary, is an error naming the row.
//!
//! The messages are framed here and checked before `arrow-ipc`'s decoder sees them, because it trusts sizes
//! it reads: a message's metadata and body must lie inside the file, and every compressed buffer's
//! advertised decompressed length (which the decoder allocates at once) must be the length its zstd frame
//! declares, or for LZ4 at most what LZ4 can expand to (255 bytes per byte, plus a block). Every call into the
//! decoder also runs under [`super::guarded`], so a panic on damaged bytes is an error naming the file.

use super::{CorpusOptions, Counted, Document, format_error, guarded};
use crate::{Error, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::{CompressionType, MessageHeader};
use arrow_schema::DataType;
use std::collections::VecDeque;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The IPC file format's leading magic and its padding (the stream format starts with a message instead).
const FILE_MAGIC: &[u8; 6] = b"ARROW1";
const FILE_HEADER: u64 = 8;
/// A message's leading marker (older writers omit it).
const CONTINUATION: [u8; 4] = [0xff; 4];

/// The documents of one Arrow IPC file, in row order.
pub(super) struct ArrowDocuments {
    path: PathBuf,
    options: CorpusOptions,
    reader: BufReader<Counted>,
    decoder: StreamDecoder,
    /// The documents' column (its index in the schema) and its name.
    index: usize,
    name: String,
    /// The file's size, and where the message being decoded starts.
    file_len: u64,
    at: u64,
    disk_read: Arc<AtomicU64>,
    done: bool,
    /// Record batches decoded, and the file's row index of the next batch's first row.
    batch: usize,
    row: u64,
    pending: VecDeque<Document>,
}

impl ArrowDocuments {
    /// Opens the file and finds the documents' column (the schema, its first message, read now).
    pub(super) fn open(
        path: &Path,
        options: CorpusOptions,
        disk_read: Arc<AtomicU64>,
    ) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut docs = ArrowDocuments {
            path: path.to_path_buf(),
            options,
            reader: BufReader::with_capacity(
                1 << 20,
                Counted {
                    file,
                    count: disk_read.clone(),
                    read: 0,
                },
            ),
            decoder: StreamDecoder::new(),
            index: 0,
            name: String::new(),
            file_len,
            at: 0,
            disk_read,
            done: false,
            batch: 0,
            row: 0,
            pending: VecDeque::new(),
        };
        let not_arrow =
            |e: String| format_error(path, 0, format!("not a readable Arrow IPC file: {e}"));
        // The file format: its messages follow the magic and padding, a stream up to the footer.
        let mut head = [0u8; FILE_HEADER as usize];
        let n = docs.fill(&mut head).map_err(|e| Error::io(path, e))?;
        let mut first: Vec<u8> = head[..n].to_vec();
        if n == head.len() && head.starts_with(FILE_MAGIC) {
            first.clear();
        }
        // The schema, read from the first message here (the decoder takes a message without a body only
        // once the next one arrives), then handed to the decoder too.
        let Some(mut message) = docs.next_message(first).map_err(not_arrow)? else {
            return Err(not_arrow("it holds no message".into()));
        };
        let schema = guarded(|| {
            let m = arrow_ipc::root_as_message(&message[8..]).map_err(|e| e.to_string())?;
            let fb = m
                .header_as_schema()
                .ok_or("its first message is not a schema")?;
            arrow_ipc::convert::try_fb_to_schema(fb).map_err(|e| e.to_string())
        })
        .map_err(not_arrow)?;
        let decoder = &mut docs.decoder;
        guarded(|| decoder.decode(&mut message)).map_err(not_arrow)?;
        let fields = schema.fields();
        let have: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
        let index = docs.options.pick_column(path, &have)?;
        let field = &fields[index];
        if !usable(field.data_type()) {
            return Err(format_error(
                path,
                0,
                format!(
                    "column \"{}\" is {}, not strings or lists of integer token ids",
                    field.name(),
                    field.data_type()
                ),
            ));
        }
        docs.index = index;
        docs.name = field.name().clone();
        Ok(docs)
    }

    /// Bytes of the file consumed: read from disk, less what the buffer holds.
    fn pos(&self) -> u64 {
        self.reader.get_ref().read - self.reader.buffer().len() as u64
    }

    /// Reads into `buf` until it is full or the file ends; the bytes read.
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.reader.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }

    /// The next message's bytes as the decoder takes them (marker, length, metadata, body), checked (see
    /// the module docs); `None` at the end-of-stream marker or the file's end. `first` holds bytes of it
    /// already read.
    fn next_message(
        &mut self,
        first: Vec<u8>,
    ) -> std::result::Result<Option<arrow_buffer::Buffer>, String> {
        self.at = self.pos() - first.len() as u64;
        let mut word = [0u8; 4];
        let mut have = first;
        let mut take = |docs: &mut Self, out: &mut [u8]| -> std::result::Result<bool, String> {
            let from_first = have.len().min(out.len());
            out[..from_first].copy_from_slice(&have[..from_first]);
            have.drain(..from_first);
            let n = docs
                .fill(&mut out[from_first..])
                .map_err(|e| e.to_string())?;
            Ok(from_first + n == out.len())
        };
        if !take(self, &mut word)? {
            return Ok(None); // the file ends (a stream may omit the end-of-stream marker)
        }
        if word == CONTINUATION && !take(self, &mut word)? {
            return Err("the file ends inside a message's length".into());
        }
        let meta_len = u32::from_le_bytes(word) as u64;
        if meta_len == 0 {
            return Ok(None);
        }
        let left = |docs: &Self| docs.file_len.saturating_sub(docs.pos());
        if meta_len > left(self) {
            return Err(format!(
                "a message's metadata of {meta_len} bytes runs past the file's end"
            ));
        }
        let mut bytes = vec![0u8; 8 + meta_len as usize];
        bytes[..4].copy_from_slice(&CONTINUATION);
        bytes[4..8].copy_from_slice(&word);
        if !take(self, &mut bytes[8..])? {
            return Err("the file ends inside a message's metadata".into());
        }
        let message = arrow_ipc::root_as_message(&bytes[8..])
            .map_err(|e| format!("damaged message metadata ({e})"))?;
        let body_len = u64::try_from(message.bodyLength())
            .ok()
            .filter(|&b| b <= left(self))
            .ok_or_else(|| {
                format!(
                    "a message body of {} bytes runs past the file's end",
                    message.bodyLength()
                )
            })?;
        let start = bytes.len();
        bytes.resize(start + body_len as usize, 0);
        if !take(self, &mut bytes[start..])? {
            return Err("the file ends inside a message's body".into());
        }
        let message = arrow_ipc::root_as_message(&bytes[8..start]).expect("checked above");
        check_compressed(&message, &bytes[start..])?;
        Ok(Some(arrow_buffer::Buffer::from_vec(bytes)))
    }

    /// The next document; `None` after the last record batch.
    pub(super) fn next_document(&mut self) -> Result<Option<Document>> {
        loop {
            if let Some(d) = self.pending.pop_front() {
                return Ok(Some(d));
            }
            if self.done {
                return Ok(None);
            }
            let Some(batch) = self.next_batch()? else {
                // The footer of the file format, or anything after the end-of-stream marker.
                let rest = self.file_len.saturating_sub(self.reader.get_ref().read);
                self.disk_read.fetch_add(rest, Ordering::Relaxed);
                self.done = true;
                return Ok(None);
            };
            let column = batch.column(self.index).clone();
            guarded(|| Ok::<_, String>(self.documents(&column)))
                .and_then(|r| r)
                .map_err(|e| self.error(e))?;
            self.batch += 1;
            self.row += batch.num_rows() as u64;
        }
    }

    /// The next record batch; `None` at the stream's end.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            let Some(mut message) = self.next_message(Vec::new()).map_err(|e| self.error(e))?
            else {
                return Ok(None);
            };
            let decoder = &mut self.decoder;
            if let Some(batch) =
                guarded(|| decoder.decode(&mut message)).map_err(|e| self.error(e))?
            {
                return Ok(Some(batch));
            }
        }
    }

    /// An error in the current record batch, at the offset of the message being read.
    fn error(&self, reason: String) -> Error {
        format_error(
            &self.path,
            self.at,
            format!("record batch {}: {reason}", self.batch),
        )
    }

    /// The documents of one batch's column into `pending`.
    fn documents(&mut self, column: &ArrayRef) -> std::result::Result<(), String> {
        match column.data_type() {
            DataType::Utf8 => self.texts(column.as_string::<i32>().iter()),
            DataType::LargeUtf8 => self.texts(column.as_string::<i64>().iter()),
            DataType::Utf8View => self.texts(column.as_string_view().iter()),
            DataType::List(_) => {
                let l = column.as_list::<i32>();
                self.lists((0..l.len()).map(|i| l.is_valid(i).then(|| l.value(i))))
            }
            DataType::LargeList(_) => {
                let l = column.as_list::<i64>();
                self.lists((0..l.len()).map(|i| l.is_valid(i).then(|| l.value(i))))
            }
            DataType::FixedSizeList(_, _) => {
                let l = column.as_fixed_size_list();
                self.lists((0..l.len()).map(|i| l.is_valid(i).then(|| l.value(i))))
            }
            t => Err(format!("column \"{}\" changed to {t}", self.name)),
        }
    }

    /// One text document per row, null and empty rows skipped.
    fn texts<'a>(
        &mut self,
        rows: impl Iterator<Item = Option<&'a str>>,
    ) -> std::result::Result<(), String> {
        for text in rows.flatten() {
            if !text.is_empty() {
                self.pending.push_back(Document::Text(text.to_string()));
            }
        }
        Ok(())
    }

    /// One token document per row, null and empty lists skipped.
    fn lists(
        &mut self,
        rows: impl Iterator<Item = Option<ArrayRef>>,
    ) -> std::result::Result<(), String> {
        for (r, list) in rows.enumerate() {
            let Some(list) = list else { continue };
            let row = self.row + r as u64;
            let ids = ids(&list)
                .map_err(|e| format!("row {row}: \"{}\": {e}", self.name))?
                .into_iter()
                .enumerate()
                .map(|(at, id)| {
                    let id = id.ok_or_else(|| {
                        format!("row {row}: \"{}\"[{at}] is null, not a token id", self.name)
                    })?;
                    self.options
                        .token(id)
                        .map_err(|e| format!("row {row}: \"{}\"[{at}]: {e}", self.name))
                })
                .collect::<std::result::Result<Vec<u32>, String>>()?;
            if !ids.is_empty() {
                self.pending.push_back(Document::Tokens(ids));
            }
        }
        Ok(())
    }
}

/// Whether a column of this type holds documents.
fn usable(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            f.data_type().is_integer()
        }
        _ => false,
    }
}

/// A list's integers, widened (`None` for a null element).
fn ids(a: &ArrayRef) -> std::result::Result<Vec<Option<i128>>, String> {
    fn widen<T>(a: &ArrayRef) -> Vec<Option<i128>>
    where
        T: arrow_array::ArrowPrimitiveType,
        T::Native: Into<i128>,
    {
        a.as_primitive::<T>()
            .iter()
            .map(|v| v.map(Into::into))
            .collect()
    }
    Ok(match a.data_type() {
        DataType::Int8 => widen::<Int8Type>(a),
        DataType::Int16 => widen::<Int16Type>(a),
        DataType::Int32 => widen::<Int32Type>(a),
        DataType::Int64 => widen::<Int64Type>(a),
        DataType::UInt8 => widen::<UInt8Type>(a),
        DataType::UInt16 => widen::<UInt16Type>(a),
        DataType::UInt32 => widen::<UInt32Type>(a),
        DataType::UInt64 => widen::<UInt64Type>(a),
        t => return Err(format!("a list of {t}, not of integers")),
    })
}

/// Checks a record batch's (or dictionary batch's) compressed buffers before the decoder allocates what
/// they advertise: each must lie inside the body, and its decompressed length must be the one its zstd
/// frame declares, or for LZ4 within what LZ4 can expand to.
fn check_compressed(
    message: &arrow_ipc::Message<'_>,
    body: &[u8],
) -> std::result::Result<(), String> {
    let batch = match message.header_type() {
        MessageHeader::RecordBatch => message.header_as_record_batch(),
        MessageHeader::DictionaryBatch => {
            message.header_as_dictionary_batch().and_then(|d| d.data())
        }
        _ => None,
    };
    let Some(batch) = batch else {
        return Ok(());
    };
    let Some(compression) = batch.compression() else {
        return Ok(());
    };
    let codec = compression.codec();
    for (i, b) in batch.buffers().into_iter().flatten().enumerate() {
        let range = usize::try_from(b.offset())
            .ok()
            .zip(usize::try_from(b.length()).ok())
            .and_then(|(o, l)| Some(o..o.checked_add(l)?))
            .filter(|r| r.end <= body.len())
            .ok_or_else(|| format!("buffer {i} lies outside its message's body"))?;
        let data = &body[range];
        if data.len() < 8 {
            continue; // empty, or too short for the prefix, which the decoder refuses
        }
        let claimed = i64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        if claimed <= 0 {
            continue; // 0: empty; -1: stored uncompressed (the decoder refuses the rest)
        }
        let frame = &data[8..];
        let ok = match codec {
            CompressionType::ZSTD => {
                let declared = zstd::zstd_safe::get_frame_content_size(frame)
                    .ok()
                    .flatten();
                declared == Some(claimed as u64)
            }
            CompressionType::LZ4_FRAME => match lz4_content_size(frame) {
                Some(declared) => declared == claimed as u64,
                None => (claimed as u64) <= 255 * frame.len() as u64 + (64 << 10),
            },
            _ => false,
        };
        if !ok {
            return Err(format!(
                "compressed buffer {i} claims {claimed} bytes, which its {} bytes of {:?} data do not hold",
                frame.len(),
                codec
            ));
        }
    }
    Ok(())
}

/// The content size an LZ4 frame's header declares, if it does.
fn lz4_content_size(frame: &[u8]) -> Option<u64> {
    const MAGIC: u32 = 0x184D_2204;
    if frame.len() < 14 || u32::from_le_bytes(frame[..4].try_into().ok()?) != MAGIC {
        return None;
    }
    let flags = frame[4];
    // FLG bit 3: the 8-byte content size follows FLG and BD.
    (flags & 0x08 != 0).then(|| u64::from_le_bytes(frame[6..14].try_into().expect("8 bytes")))
}
