//! Short human-readable labels of features (`labels.json` beside the features file), as `clt explain` writes
//! them and the viewer shows them.

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The name of the labels file inside a features directory.
pub const LABELS_FILE: &str = "labels.json";

/// Labels keyed by `"{layer}/{feature}"`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Labels {
    pub labels: BTreeMap<String, String>,
}

impl Labels {
    pub fn key(layer: usize, feature: usize) -> String {
        format!("{layer}/{feature}")
    }

    pub fn get(&self, layer: usize, feature: usize) -> Option<&str> {
        self.labels
            .get(&Self::key(layer, feature))
            .map(String::as_str)
    }

    pub fn insert(&mut self, layer: usize, feature: usize, label: String) {
        self.labels.insert(Self::key(layer, feature), label);
    }

    /// The labels of the features directory `dir` (empty when it has none).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(LABELS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Format {
                path: path.clone(),
                offset: e.column() as u64,
                reason: format!("bad labels JSON (line {}): {e}", e.line()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Labels::default()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Writes the labels into `dir`, atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::InvalidData {
            what: "labels".into(),
            reason: e.to_string(),
        })?;
        crate::clt::checkpoint::write_atomic(&dir.join(LABELS_FILE), &json)
    }
}
