//! Fuzz target: the shard header, index and metadata parser must return a value or a typed error, never panic,
//! on any bytes. Run with `cargo +nightly fuzz run shard_header` from the crate root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clt::store::format::parse(data, std::path::Path::new("fuzz.clts"));
});
