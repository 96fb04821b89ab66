//! The file config source: a YAML or JSON `ProxyConfig` read at start, on SIGHUP and whenever its
//! content changes (checked by polling, which also follows the symlink swaps Kubernetes uses for
//! mounted ConfigMaps). A file that fails to read, parse or validate leaves the running config in
//! place; the store records why.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use weft_proto::v1::ProxyConfig;

use super::{Snapshot, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Usually a file caught mid-write; replace config files atomically (write, then rename).
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path} as JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("parsing {path} as YAML: {source}")]
    Yaml { path: PathBuf, source: serde_yaml::Error },
    #[error("invalid config in {path}: {source}")]
    Invalid { path: PathBuf, source: super::Error },
}

/// Parses a config file's bytes: JSON when the name ends in `.json`, else YAML. An empty file is
/// an error, not an empty config.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<ProxyConfig, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::Empty { path: path.to_owned() });
    }
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
    /// What the last attempt read, good or bad, so an unchanged file is not reloaded.
    last: Seen,
}

#[derive(Debug, PartialEq)]
enum Seen {
    Nothing,
    /// The file could not be read (reported once, not on every poll).
    Unreadable,
    Bytes(Vec<u8>),
}

impl FileSource {
    pub fn new(path: PathBuf, store: Store) -> FileSource {
        FileSource { path, store, last: Seen::Nothing }
    }

    /// Reads the file and applies it when it changed (or always, with `force`). Returns `None`
    /// when nothing changed.
    pub async fn reload(&mut self, force: bool) -> Option<Result<Arc<Snapshot>, Error>> {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(source) => {
                let e = Error::Read { path: self.path.clone(), source };
                if !force && self.last == Seen::Unreadable {
                    return None;
                }
                self.last = Seen::Unreadable;
                self.store.reject(e.to_string());
                return Some(Err(e));
            }
        };
        if !force && matches!(&self.last, Seen::Bytes(b) if *b == bytes) {
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
        self.last = Seen::Bytes(bytes);
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_and_json_and_rejects_empty_files() {
        let yaml = parse(Path::new("c.yaml"), b"version: a\nservices: []\n").unwrap();
        assert_eq!(yaml.version, "a");
        let json = parse(Path::new("c.JSON"), br#"{"version":"b"}"#).unwrap();
        assert_eq!(json.version, "b");
        assert!(matches!(parse(Path::new("c.yaml"), b""), Err(Error::Empty { .. })));
        assert!(matches!(parse(Path::new("c.yaml"), b" \n\t"), Err(Error::Empty { .. })));
        assert!(matches!(parse(Path::new("c.json"), b"{"), Err(Error::Json { .. })));
        assert!(matches!(parse(Path::new("c.yml"), b"version: [1"), Err(Error::Yaml { .. })));
    }

    #[tokio::test]
    async fn unchanged_files_are_not_reloaded_and_bad_ones_keep_the_last_good() {
        let dir = std::env::temp_dir().join(format!("weft-file-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        std::fs::write(&path, "version: one\n").unwrap();
        let store = Store::default();
        let mut source = FileSource::new(path.clone(), store.clone());
        assert_eq!(source.reload(false).await.unwrap().unwrap().version, "one");
        assert!(source.reload(false).await.is_none(), "unchanged");
        assert!(source.reload(true).await.is_some(), "forced");
        std::fs::write(&path, "").unwrap();
        assert!(matches!(source.reload(false).await, Some(Err(Error::Empty { .. }))));
        assert_eq!(store.current().unwrap().version, "one");
        assert!(store.status().last_error.unwrap().contains("is empty"));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(source.reload(false).await, Some(Err(Error::Read { .. }))));
        assert!(source.reload(false).await.is_none(), "a missing file is reported once");
        assert_eq!(store.current().unwrap().version, "one");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
