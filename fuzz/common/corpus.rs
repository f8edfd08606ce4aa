//! What the corpus fuzz targets share: the input written as a corpus file of the target's kind, read to its
//! last document. The decoders' own panics on damaged data are caught by `clt::corpus` and turned into
//! errors, so the targets replace libFuzzer's abort-on-panic hook with a silent one: a panic that escapes
//! the reader still fails the input.

/// Reads `data` as the corpus file `name` (its extension picks the reader) to its end or first error.
pub fn read_to_end(data: &[u8], name: &str) {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let dir = std::env::temp_dir().join(format!("clt-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the fuzz input's folder");
    let path = dir.join(name);
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
}
