//! `RecordDir`: a small persistent map, one JSON file per key, kept in memory and rewritten a
//! record at a time (tag mappings and manifest media types).
//!
//! File names are the sha256 of the key, so nothing a client sends ever becomes a path. Writes
//! go through the cache's `tmp/` and a rename; they are not fsynced: losing the latest mapping
//! in a crash only costs a re-validation, and a torn file fails to parse and is deleted at load.
//! Directories are 0700 and files 0600, like the rest of the cache.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tracing::warn;

use super::CacheError;
use crate::{oci::Digest, private_state};

/// Records larger than this are not ours (unless the directory says otherwise).
pub(crate) const MAX_RECORD_BYTES: u64 = 64 * 1024;

#[derive(Serialize, Deserialize)]
struct Record<V> {
    key: String,
    value: V,
}

/// Where a record directory keeps its files; `None` for memory only.
struct Files {
    dir: PathBuf,
    tmp: PathBuf,
}

pub(crate) struct RecordDir<V> {
    files: Option<Files>,
    /// Files larger than this are not loaded.
    max_bytes: u64,
    map: RwLock<HashMap<String, V>>,
    /// Serialises writers so the file on disk and the map agree on the last value.
    write: tokio::sync::Mutex<()>,
    seq: AtomicU64,
}

fn file_name(key: &str) -> String {
    format!("{}.json", Digest::sha256_of(key.as_bytes()).encoded())
}

impl<V> RecordDir<V>
where
    V: Serialize + DeserializeOwned + Clone + PartialEq + Send + Sync + 'static,
{
    /// Records kept in memory only, each at most `max_bytes` serialized (as on disk).
    pub(crate) fn in_memory(max_bytes: u64) -> Self {
        RecordDir {
            files: None,
            max_bytes,
            map: RwLock::default(),
            write: tokio::sync::Mutex::new(()),
            seq: AtomicU64::new(0),
        }
    }

    /// Loads every record in `dir` (files up to `max_bytes`), deleting files that are not valid
    /// records and narrowing the modes of the rest. Blocking.
    pub(crate) fn open(dir: PathBuf, tmp: PathBuf, max_bytes: u64) -> Result<Self, CacheError> {
        let io_err = |op, path: &Path| {
            let path = path.to_owned();
            move |source| CacheError::Io { op, path, source }
        };
        private_state::create_dir(&dir).map_err(io_err("creating", &dir))?;
        let mut map = HashMap::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let path = entry.map_err(io_err("listing", &dir))?.path();
            match load(&path, max_bytes) {
                Ok(Some((record, meta)))
                    if path.file_name() == Some(file_name(&record.key).as_ref()) =>
                {
                    private_state::restrict(&path, &meta, private_state::FILE_MODE)
                        .map_err(io_err("restricting", &path))?;
                    map.insert(record.key, record.value);
                }
                result => {
                    if let Err(e) = &result {
                        warn!(path = %path.display(), error = %e, "dropping unreadable record");
                    }
                    if let Err(e) = fs::remove_file(&path) {
                        warn!(path = %path.display(), error = %e, "cannot delete stray record");
                    }
                }
            }
        }
        Ok(RecordDir {
            files: Some(Files { dir, tmp }),
            max_bytes,
            map: RwLock::new(map),
            write: tokio::sync::Mutex::new(()),
            seq: AtomicU64::new(0),
        })
    }

    pub(crate) fn get(&self, key: &str) -> Option<V> {
        self.map.read().expect("records lock").get(key).cloned()
    }

    /// `f` of the record under `key`, without copying it.
    pub(super) fn with<T>(&self, key: &str, f: impl FnOnce(Option<&V>) -> T) -> T {
        f(self.map.read().expect("records lock").get(key))
    }

    /// Deletes the record under `key`, if any.
    pub(crate) async fn remove(&self, key: &str) -> Result<(), CacheError> {
        let _writer = self.write.lock().await;
        if self
            .map
            .write()
            .expect("records lock")
            .remove(key)
            .is_none()
        {
            return Ok(());
        }
        if let Some(files) = &self.files {
            let path = files.dir.join(file_name(key));
            tokio::task::spawn_blocking(move || match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CacheError::Io {
                    op: "removing",
                    path,
                    source: e,
                }),
                _ => Ok(()),
            })
            .await
            .map_err(|e| CacheError::Task(e.to_string()))??;
        }
        Ok(())
    }

    /// Stores `value` under `key`; a no-op when it is already there.
    pub(crate) async fn put(&self, key: String, value: V) -> Result<(), CacheError> {
        let _writer = self.write.lock().await;
        if self.get(&key).as_ref() == Some(&value) {
            return Ok(());
        }
        let record = Record {
            key: key.clone(),
            value: value.clone(),
        };
        let text = serde_json::to_vec(&record).expect("records serialize");
        if text.len() as u64 > self.max_bytes {
            return Err(CacheError::RecordTooLarge {
                len: text.len(),
                max: self.max_bytes,
            });
        }
        if let Some(files) = &self.files {
            let dest = files.dir.join(file_name(&key));
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let tmp = files
                .tmp
                .join(format!("record.{}.{seq}", std::process::id()));
            tokio::task::spawn_blocking(move || {
                let result = private_state::new_file()
                    .open(&tmp)
                    .and_then(|mut file| file.write_all(&text))
                    .map_err(|source| CacheError::Io {
                        op: "writing",
                        path: tmp.clone(),
                        source,
                    })
                    .and_then(|()| {
                        fs::rename(&tmp, &dest).map_err(|source| CacheError::Io {
                            op: "renaming into",
                            path: dest.clone(),
                            source,
                        })
                    });
                if result.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                result
            })
            .await
            .map_err(|e| CacheError::Task(e.to_string()))??;
        }
        self.map.write().expect("records lock").insert(key, value);
        Ok(())
    }

    /// Every record, in no particular order.
    pub(crate) fn entries(&self) -> Vec<(String, V)> {
        self.map
            .read()
            .expect("records lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.read().expect("records lock").len()
    }
}

/// A record file and its metadata; `None` if it is not a record.
fn load<V: DeserializeOwned>(
    path: &Path,
    max_bytes: u64,
) -> io::Result<Option<(Record<V>, fs::Metadata)>> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.len() > max_bytes {
        return Ok(None);
    }
    let text = fs::read(path)?;
    Ok(serde_json::from_slice(&text).ok().map(|r| (r, meta)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> (PathBuf, PathBuf) {
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        (root.join("records"), tmp)
    }

    #[tokio::test]
    async fn records_survive_reopen_and_strays_are_deleted() {
        let root = tempfile::tempdir().unwrap();
        let (dir, tmp) = dirs(root.path());
        let records =
            RecordDir::<String>::open(dir.clone(), tmp.clone(), MAX_RECORD_BYTES).unwrap();
        records.put("a".into(), "1".into()).await.unwrap();
        records.put("b".into(), "2".into()).await.unwrap();
        records.put("a".into(), "3".into()).await.unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);

        fs::write(dir.join("garbage.json"), b"{not json").unwrap();
        fs::write(dir.join("x"), b"").unwrap();
        // A valid record under the wrong name (someone copied files around) is not trusted.
        fs::copy(dir.join(file_name("a")), dir.join(file_name("c"))).unwrap();

        let records = RecordDir::<String>::open(dir.clone(), tmp, MAX_RECORD_BYTES).unwrap();
        assert_eq!(records.get("a").as_deref(), Some("3"));
        assert_eq!(records.get("b").as_deref(), Some("2"));
        assert_eq!(records.get("c"), None);
        assert_eq!(records.len(), 2);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn in_memory_records_work_without_files() {
        let records = RecordDir::<u32>::in_memory(MAX_RECORD_BYTES);
        records.put("k".into(), 7).await.unwrap();
        assert_eq!(records.get("k"), Some(7));
    }
}
