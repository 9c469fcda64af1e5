//! What the agent keeps on disk: one sled record per model (the last release accepted, the active
//! and the previous version) and the chunk files that hold the models' bytes. Everything here
//! can be rebuilt from the chunk files and the retained releases; the record is written and
//! flushed before what serves changes, so a crash leaves the old version serving.

use std::collections::HashSet;
use std::path::Path;

use outpost_runtime::ChunkStore;
use outpost_shared::cbor::{self, CborError};
use outpost_shared::{Manifest, ModelVersion};
use serde::{Deserialize, Serialize};

/// The largest model record read or written (a release with its chunk lists).
const RECORD_LIMIT: usize = 64 * 1024 * 1024;

/// sled's page cache: the records are read once at start and written on each install.
const STORE_CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Why the local store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The data folder cannot be created or read.
    #[error("the data folder cannot be used: {0}")]
    Folder(#[source] std::io::Error),
    /// The database (`state.sled`) cannot be opened, read or written.
    #[error("the database (state.sled): {0}")]
    Database(#[from] sled::Error),
    /// The chunk files (`chunks/`) cannot be opened, listed or deleted.
    #[error("the chunk files: {0}")]
    Chunks(#[source] std::io::Error),
    /// A model's record cannot be decoded or encoded.
    #[error("the stored record of model {model:?}: {source}")]
    Record {
        /// The model.
        model: String,
        /// Why.
        #[source]
        source: CborError,
    },
}

/// The durable record of a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The last release accepted (verified when received).
    pub(crate) manifest: Option<Manifest>,
    /// The active version.
    pub(crate) active: Option<ModelVersion>,
    /// The previous version.
    pub(crate) previous: Option<ModelVersion>,
    /// The version being fetched, until it serves: its chunks are kept, so a restarted agent
    /// resumes its download, and the chunks of a download abandoned for a newer one are
    /// collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) installing: Option<ModelVersion>,
}

/// The sled records and the chunk files.
#[derive(Debug)]
pub(crate) struct Store {
    dir: std::path::PathBuf,
    db: sled::Db,
    /// name → [`Record`].
    records: sled::Tree,
    chunks: ChunkStore,
}

impl Store {
    /// Opens (creating) the store in the data folder `dir`: `state.sled` and `chunks/`.
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::Folder)?;
        // Every write flushes itself (`save`), so no background flusher thread is needed; the
        // records are a few hundred bytes a model, so a small cache holds them all.
        let config = sled::Config::new()
            .path(dir.join("state.sled"))
            .cache_capacity(STORE_CACHE_BYTES)
            .flush_every_ms(None);
        // A store closed a moment ago (an agent restarting) may still be letting go of its file
        // lock on sled's own threads: a held lock is tried again for up to 2 s, then reported
        // (another agent on the same data).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let records = db.open_tree("models")?;
        let chunks = ChunkStore::open(&dir.join("chunks")).map_err(StoreError::Chunks)?;
        Ok(Self {
            dir: dir.to_owned(),
            db,
            records,
            chunks,
        })
    }

    /// The chunk files.
    pub(crate) fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// The bytes free for the agent on the data folder's file system.
    pub(crate) fn available(&self) -> std::io::Result<u64> {
        fs2::available_space(&self.dir)
    }

    /// Writes `record` and flushes, so it survives a crash.
    pub(crate) fn save(&self, model: &str, record: &Record) -> Result<(), StoreError> {
        let bytes = cbor::encode("model record", record, RECORD_LIMIT).map_err(|source| {
            StoreError::Record {
                model: model.to_owned(),
                source,
            }
        })?;
        crash_point!("store.record_encoded");
        self.records.insert(model, bytes)?;
        crash_point!("store.record_inserted");
        self.db.flush()?;
        crash_point!("store.record_flushed");
        Ok(())
    }

    /// Every record, by model name.
    pub(crate) fn records(&self) -> Result<Vec<(String, Record)>, StoreError> {
        self.records
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let model = String::from_utf8_lossy(&k).into_owned();
                let record = decode(&model, &v)?;
                Ok((model, record))
            })
            .collect()
    }

    /// Deletes chunks that no active, previous or installing version references (any
    /// variant); returns how many were deleted.
    pub(crate) fn collect_garbage(&self) -> Result<usize, StoreError> {
        self.collect_garbage_installing(None)
    }

    /// [`Store::collect_garbage`], with `installing`'s model taken to be installing that version
    /// (not the one its record names): an install about to fetch collects the chunks of the
    /// download it abandons before it counts the free space.
    pub(crate) fn collect_garbage_installing(
        &self,
        installing: Option<(&str, &ModelVersion)>,
    ) -> Result<usize, StoreError> {
        let mut keep = HashSet::new();
        let records = self.records()?;
        for (model, record) in &records {
            let installs = match installing {
                Some((name, version)) if name == model => Some(version),
                _ => record.installing.as_ref(),
            };
            for v in record
                .active
                .iter()
                .chain(record.previous.iter())
                .chain(installs)
            {
                for variant in &v.variants {
                    keep.extend(variant.chunks.iter().map(|c| c.id));
                }
                keep.extend(v.extra_chunks().map(|c| c.id));
            }
        }
        if let Some((name, version)) = installing
            && !records.iter().any(|(model, _)| model == name)
        {
            for variant in &version.variants {
                keep.extend(variant.chunks.iter().map(|c| c.id));
            }
            keep.extend(version.extra_chunks().map(|c| c.id));
        }
        crash_point!("store.gc_kept_listed");
        let deleted = self
            .chunks
            .retain(|id| keep.contains(id))
            .map_err(StoreError::Chunks)?;
        crash_point!("store.gc_done");
        Ok(deleted)
    }

    /// Writes everything to disk (at shutdown).
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

fn decode(model: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    cbor::decode("model record", bytes, RECORD_LIMIT).map_err(|source| StoreError::Record {
        model: model.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use outpost_shared::ChunkId;

    use super::*;

    #[test]
    fn records_survive_a_reopen_and_garbage_keeps_what_versions_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.records().unwrap().is_empty());
        let kept = b"kept chunk";
        let dropped = b"dropped chunk";
        let kept_id = outpost_shared::ChunkId::of(kept);
        let dropped_id = outpost_shared::ChunkId::of(dropped);
        store.chunks().put(&kept_id, kept).unwrap();
        store.chunks().put(&dropped_id, dropped).unwrap();
        let record = Record {
            manifest: None,
            active: Some(version(1, kept)),
            previous: None,
            installing: None,
        };
        store.save("m", &record).unwrap();
        assert_eq!(store.collect_garbage().unwrap(), 1);
        assert!(store.chunks().contains(&kept_id));
        assert!(!store.chunks().contains(&dropped_id));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.records().unwrap(), vec![("m".to_owned(), record)]);
    }

    fn version(number: u64, bytes: &[u8]) -> ModelVersion {
        ModelVersion {
            version: number,
            inputs: vec![],
            outputs: vec![],
            placement: outpost_shared::Placement::Local,
            max_batch: None,
            text: None,
            variants: vec![outpost_shared::Variant::describe(
                outpost_shared::Target::EdgeInt8,
                outpost_shared::ModelFormat::Onnx,
                bytes,
            )],
        }
    }

    #[test]
    fn a_download_is_kept_until_a_newer_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (serving, fetched, newer) = (&b"serving"[..], &b"half fetched"[..], &b"newer"[..]);
        for bytes in [serving, fetched] {
            store.chunks().put(&ChunkId::of(bytes), bytes).unwrap();
        }
        let mut record = Record {
            active: Some(version(1, serving)),
            installing: Some(version(2, fetched)),
            ..Record::default()
        };
        store.save("m", &record).unwrap();
        // A restart: the download in progress resumes from what is stored.
        assert_eq!(store.collect_garbage().unwrap(), 0);
        assert!(store.chunks().contains(&ChunkId::of(fetched)));
        // Version 3 replaces it before it completes: its chunks go, before anything is fetched.
        let v3 = version(3, newer);
        assert_eq!(
            store.collect_garbage_installing(Some(("m", &v3))).unwrap(),
            1
        );
        assert!(!store.chunks().contains(&ChunkId::of(fetched)));
        assert!(store.chunks().contains(&ChunkId::of(serving)));
        // A model with no record yet keeps its download too.
        store.chunks().put(&ChunkId::of(newer), newer).unwrap();
        record.installing = Some(v3.clone());
        store.save("m", &record).unwrap();
        let other = version(1, b"other model");
        store
            .chunks()
            .put(&ChunkId::of(b"other model"), b"other model")
            .unwrap();
        assert_eq!(
            store
                .collect_garbage_installing(Some(("n", &other)))
                .unwrap(),
            0
        );
    }
}
