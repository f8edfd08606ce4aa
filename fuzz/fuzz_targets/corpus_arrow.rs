//! Fuzz target: an Arrow IPC corpus file (stream or file format: messages, schema, record batches, buffers, each
//! buffer compression) must give documents or a typed error, never an uncaught panic nor an allocation sized by a
//! corrupted count (libFuzzer's `-malloc_limit_mb` reports those). Panics of the `arrow-ipc` crate on
//! damaged data are caught by `clt::corpus` and turned into errors, so this target replaces libFuzzer's
//! abort-on-panic hook with a silent one: a panic that escapes the reader still fails the input.
//! Seeds: `seeds/corpus_arrow/` (copies of `tests/fixtures/*.arrow`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let dir = std::env::temp_dir().join(format!("clt-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the fuzz input's folder");
    let path = dir.join("corpus.arrow");
    std::fs::write(&path, data).expect("the fuzz input's file");
    let options = clt::corpus::CorpusOptions {
        column: None,
        vocab: Some(512),
    };
    if let Ok(docs) = clt::corpus::Documents::open_with(std::slice::from_ref(&path), options) {
        for doc in docs {
            if doc.is_err() {
                break;
            }
        }
    }
});
