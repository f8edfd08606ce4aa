//! Fuzz target: an Arrow IPC corpus file (stream or file format: messages, schema, record batches, buffers,
//! each buffer compression) must give documents or a typed error, never an uncaught panic nor an allocation
//! sized by a corrupted count (libFuzzer's `-malloc_limit_mb` reports those). Panics of the `arrow-ipc`
//! crate on damaged data are caught as errors (see `common/corpus.rs`).
//! Seeds: `seeds/corpus_arrow/` (copies of `tests/fixtures/*.arrow`).
#![no_main]

#[path = "../common/corpus.rs"]
mod corpus;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corpus::read_to_end(data, "corpus.arrow"));
