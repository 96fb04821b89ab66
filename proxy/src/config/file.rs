//! The file config source: a YAML or JSON `ProxyConfig` read at start, on SIGHUP and whenever its
//! content changes (checked by polling, which also follows the symlink swaps Kubernetes uses for
//! mounted ConfigMaps). A file that fails to read, parse or validate leaves the running config in
//! place; the store records why.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weft_proto::v1::ProxyConfig;

use super::{Snapshot, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path} as JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("parsing {path} as YAML: {source}")]
    Yaml { path: PathBuf, source: serde_yaml::Error },
    #[error("invalid config in {path}: {source}")]
    Invalid { path: PathBuf, source: super::Error },
}

/// Parses a config file's bytes: JSON when the name ends in `.json`, else YAML.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<ProxyConfig, Error> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        serde_json::from_slice(bytes).map_err(|source| Error::Json { path: path.to_owned(), source })
    } else {
        serde_yaml::from_slice(bytes).map_err(|source| Error::Yaml { path: path.to_owned(), source })
    }
}

/// Watches one file and feeds a store.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    store: Store,
    /// The bytes of the last attempt, good or bad, so an unchanged file is not reloaded.
    last: Option<Vec<u8>>,
}

impl FileSource {
    pub fn new(path: PathBuf, store: Store) -> FileSource {
        FileSource { path, store, last: None }
    }

    /// Reads the file and applies it when it changed (or always, with `force`). Returns `None`
    /// when nothing changed.
    pub async fn reload(&mut self, force: bool) -> Option<Result<Arc<Snapshot>, Error>> {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(source) => {
                let e = Error::Read { path: self.path.clone(), source };
                // A missing file is reported once, not on every poll.
                if !force && self.last.as_deref() == Some(&[]) {
                    return None;
                }
                self.last = Some(Vec::new());
                self.store.reject(e.to_string());
                return Some(Err(e));
            }
        };
        if !force && self.last.as_deref() == Some(bytes.as_slice()) {
            return None;
        }
        let result = match parse(&self.path, &bytes) {
            Ok(config) => {
                self.store.apply(config).map_err(|source| Error::Invalid { path: self.path.clone(), source })
            }
            Err(e) => {
                self.store.reject(e.to_string());
                Err(e)
            }
        };
        self.last = Some(bytes);
        Some(result)
    }

    /// Reloads on every poll tick (when the content changed) and on every `reload` notification
    /// (always), until `stop` is cancelled.
    pub async fn run(mut self, poll: Duration, reload: Arc<Notify>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => false,
                _ = reload.notified() => true,
            };
            match self.reload(force).await {
                None => {}
                Some(Ok(snapshot)) => {
                    tracing::info!(version = %snapshot.version, services = snapshot.services.len(), "config loaded")
                }
                Some(Err(error)) => tracing::warn!(%error, "config rejected; keeping the running config"),
            }
        }
    }
}
