//! Paths the benches share: the project's `../shared` folder and the SmolLM2 model file.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn shared() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared"))
}

/// The SmolLM2-135M GGUF file, fetched by `scripts/fetch-smollm2.sh` when not cached.
pub fn smollm2() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-smollm2.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run fetch-smollm2.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}
