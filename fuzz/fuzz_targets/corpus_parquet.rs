//! Fuzz target: a Parquet corpus file (footer, schema, page headers, levels, dictionaries, values, each
//! compression) must give documents or a typed error, never an uncaught panic nor an allocation sized by a
//! corrupted count (libFuzzer's `-malloc_limit_mb` reports those). The `parquet` crate's own panics on
//! damaged data are caught as errors (see `common/corpus.rs`).
//! Seeds: `seeds/corpus_parquet/` (copies of `tests/fixtures/*.parquet`).
#![no_main]

#[path = "../common/corpus.rs"]
mod corpus;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corpus::read_to_end(data, "corpus.parquet"));
