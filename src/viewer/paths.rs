//! Resolving a client-supplied file name inside a served folder, refusing anything that could leave it.
//!
//! Names are single path components: no separators, no `..`, nothing hidden, no NUL. The result is
//! canonicalised and must still lie inside the canonical folder, which also stops symbolic links that point
//! outside it.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The file `name` inside `root`, or an error when `name` is not a plain file name or the file lies outside
/// `root` (after following links) or does not exist.
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf> {
    let bad = |reason: &str| Error::InvalidData {
        what: format!("file name {name:?}"),
        reason: reason.into(),
    };
    if name.is_empty() || name.len() > 255 {
        return Err(bad("empty or too long"));
    }
    if name.starts_with('.') {
        return Err(bad("hidden names and `..` are refused"));
    }
    if name.contains(['/', '\\', '\0', ':']) {
        return Err(bad("only plain file names are served, not paths"));
    }
    let root = root.canonicalize().map_err(|e| Error::io(root, e))?;
    let path = root.join(name);
    let path = path.canonicalize().map_err(|e| Error::io(&path, e))?;
    if !path.starts_with(&root) || !path.is_file() {
        return Err(bad("not a file inside the served folder"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn traversal_and_odd_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("graphs");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("ok.json"), "{}").unwrap();
        std::fs::write(dir.path().join("secret.json"), "{}").unwrap();
        assert!(resolve(&root, "ok.json").is_ok());
        for name in [
            "",
            "..",
            "../secret.json",
            "..%2Fsecret.json/..",
            "sub/ok.json",
            "..\\secret.json",
            "/etc/passwd",
            ".hidden",
            "ok.json\0",
            "missing.json",
            "C:secret.json",
        ] {
            assert!(resolve(&root, name).is_err(), "{name:?} was accepted");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret.json"), root.join("link.json"))
                .unwrap();
            assert!(
                resolve(&root, "link.json").is_err(),
                "a link leaving the folder was followed"
            );
        }
    }
}
