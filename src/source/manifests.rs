//! The `--manifests DIR` source (placeholder until the real loader lands).

use std::path::PathBuf;

use tokio::sync::mpsc;

use super::Update;

/// Placeholder error.
#[derive(Debug, thiserror::Error)]
#[error("manifests source not implemented")]
pub struct ManifestsError;

/// Placeholder.
pub async fn run(
    _dir: PathBuf,
    _node: String,
    _tx: mpsc::Sender<Update>,
) -> Result<(), ManifestsError> {
    Err(ManifestsError)
}
