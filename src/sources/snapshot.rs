//! The static fallback catalog (`MONETA_FALLBACK_CATALOG_FILE`), loaded once at start.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::model::{ContentId, ContentPlayback};

#[derive(Debug, thiserror::Error)]
#[error("MONETA_FALLBACK_CATALOG_FILE: {0}")]
pub struct SnapshotError(String);

#[derive(Deserialize)]
struct Document {
    contents: Vec<ContentPlayback>,
}

#[derive(Default)]
pub struct Snapshot {
    contents: HashMap<ContentId, Arc<ContentPlayback>>,
}

impl Snapshot {
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn load(path: &Path) -> Result<Self, SnapshotError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SnapshotError(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, SnapshotError> {
        let doc: Document = serde_json::from_str(text)
            .map_err(|e| SnapshotError(format!("not a {{\"contents\":[…]}} document: {e}")))?;
        let contents = doc
            .contents
            .into_iter()
            .map(|c| (c.content_id.clone(), Arc::new(c)))
            .collect();
        Ok(Self { contents })
    }

    pub fn get(&self, content_id: &ContentId) -> Option<Arc<ContentPlayback>> {
        self.contents.get(content_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.contents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.contents.is_empty()
    }
}
