//! Content-addressed chunk files: `chunks/ab/abcdef…`, written to a temporary file, synced and
//! renamed, so a partly written chunk never has a valid name. Each chunk is stored once.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use outpost_shared::release::ChunkRef;
use outpost_shared::{Blob, ChunkId, Digest, Variant};

/// Why a variant could not be assembled from stored chunks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssembleError {
    /// Chunks are not stored, or their files are damaged (they fail their digest; damaged
    /// files are deleted, so they are fetched again).
    #[error("{count} chunks are missing or damaged (the first: {first})")]
    Missing {
        /// The first missing chunk.
        first: ChunkId,
        /// How many are missing.
        count: usize,
    },
    /// The chunks are all there, but together they are not the variant's bytes.
    #[error("the assembled variant fails its digest: {0}")]
    Digest(String),
}

/// Syncs a folder's entries to disk (a no-op where folders cannot be opened, as on Windows).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match fs::File::open(dir) {
        Ok(d) => d.sync_all(),
        Err(_) if cfg!(windows) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Chunk files, the agent's and the coordinator's.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
}

impl ChunkStore {
    /// Opens (creating) the store in `dir`, removing temporary files a crash left behind.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path)?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Stores `bytes` under their digest (no-op when already stored); returns whether it was new.
    pub fn put(&self, id: &ChunkId, bytes: &[u8]) -> std::io::Result<bool> {
        let path = self.path(id);
        if path.exists() {
            return Ok(false);
        }
        let tmp = self.dir.join(format!("{}.tmp", id.to_hex()));
        let written = fs::File::create(&tmp).and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        });
        let shard = path.parent().unwrap_or(&self.dir);
        let new_shard = !shard.exists();
        let renamed = written
            .and_then(|()| fs::create_dir_all(shard))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = renamed {
            // A full disk, most often: the partial file goes, so it holds no space.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // The rename is durable only once the folder that names the chunk is synced (and the
        // store's folder, when the shard is new): a crash then cannot lose a chunk the caller
        // was told is stored.
        sync_dir(shard)?;
        if new_shard {
            sync_dir(&self.dir)?;
        }
        Ok(true)
    }

    /// Whether a chunk is stored (without reading it).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.path(id).is_file()
    }

    /// A chunk's bytes, verified against its id; `None` when absent or damaged on disk. A
    /// damaged file is deleted, so the chunk counts as missing and is fetched again.
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let path = self.path(id);
        let bytes = fs::read(&path).ok()?;
        match id.verify(&bytes) {
            Ok(()) => Some(bytes),
            Err(e) => {
                tracing::error!(chunk = %id, error = %e, "chunk file is damaged; deleting it");
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(chunk = %id, error = %e, "could not delete a damaged chunk");
                }
                None
            }
        }
    }

    /// A variant's bytes from its stored chunks, checked against the variant's digest.
    pub fn assemble(&self, variant: &Variant) -> Result<Vec<u8>, AssembleError> {
        self.assemble_parts(variant.size, &variant.digest, &variant.chunks)
    }

    /// A file's bytes (the tokenizer) from its stored chunks, checked against its digest.
    pub fn assemble_blob(&self, blob: &Blob) -> Result<Vec<u8>, AssembleError> {
        self.assemble_parts(blob.size, &blob.digest, &blob.chunks)
    }

    fn assemble_parts(
        &self,
        size: u64,
        digest: &Digest,
        chunks: &[ChunkRef],
    ) -> Result<Vec<u8>, AssembleError> {
        // The declared size is only a hint (capped): the chunks decide what is allocated.
        let hint = usize::try_from(size).unwrap_or(0).min(1 << 30);
        let mut bytes = Vec::with_capacity(hint);
        let mut missing: Option<(ChunkId, usize)> = None;
        for c in chunks {
            // Every chunk is read, even after one is missing: each damaged file is found (and
            // deleted) now, so one fetch brings them all back.
            match self.get(&c.id) {
                Some(data) if missing.is_none() => bytes.extend_from_slice(&data),
                Some(_) => {}
                None => match &mut missing {
                    Some((_, count)) => *count += 1,
                    None => missing = Some((c.id, 1)),
                },
            }
        }
        if let Some((first, count)) = missing {
            return Err(AssembleError::Missing { first, count });
        }
        digest
            .verify(&bytes)
            .map_err(|e| AssembleError::Digest(e.to_string()))?;
        Ok(bytes)
    }

    /// Deletes every stored chunk for which `keep` is false; returns how many were deleted.
    pub fn retain(&self, keep: impl Fn(&ChunkId) -> bool) -> std::io::Result<usize> {
        let mut deleted = 0;
        for shard in fs::read_dir(&self.dir)? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&shard)? {
                let path = entry?.path();
                let Some(id) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<ChunkId>().ok())
                else {
                    continue;
                };
                if !keep(&id) {
                    fs::remove_file(&path)?;
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_damaged_chunk_is_deleted_so_it_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let id = ChunkId::of(b"chunk bytes");
        assert!(store.put(&id, b"chunk bytes").unwrap());
        assert_eq!(store.get(&id).as_deref(), Some(&b"chunk bytes"[..]));
        // A bit flipped on disk.
        fs::write(store.path(&id), b"chunk bytez").unwrap();
        assert_eq!(store.get(&id), None);
        assert!(!store.contains(&id), "the damaged file is gone");
        assert!(store.put(&id, b"chunk bytes").unwrap(), "stored again");
        assert!(store.get(&id).is_some());
    }
}
