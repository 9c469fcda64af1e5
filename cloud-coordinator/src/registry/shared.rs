//! Replicas over shared storage: the registry's chunks and signed release records in an object
//! store (a file system every replica mounts, or S3), used by several coordinators at once.
//!
//! Layout under the store's root (or the `s3://` URL's prefix):
//! - `chunks/<hex id>`: a chunk's bytes. Content-addressed, so any writer's copy is the same;
//!   written with a create (an existing one is left as it is) and never deleted (another
//!   replica's kept versions may name it).
//! - `releases/<model>/<release, 20 digits>`: a release record: the model record and the signed
//!   manifest devices get, signed together by the writer's key. Written with a conditional
//!   create, so one writer wins each release number; the newest [`RELEASES_KEPT`] are kept.
//!
//! Each coordinator keeps serving from its own sled record and chunk files. A write uploads the
//! chunks first and then creates the release, so a release in the store always has its chunks
//! there; only then is it written locally and announced. Other replicas look at the store every
//! `poll_ms` (and before each write of their own), check the record's signature, the manifest's
//! signature and agreement with the record, and every chunk's digest, store the chunks locally
//! and then the record. Nothing in the store is trusted without those checks: it is a network
//! channel like the others.
//!
//! Who announces: the writer, always. A replica that imports a release announces it too only
//! when its broker is its own embedded one (its devices would not hear the writer's); replicas
//! on one broker (cluster) announce nothing twice.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use firmware_config::{SharedStoreLocation, SharedStoreSection};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use outpost_shared::release::ManifestError;
use outpost_shared::{ChunkId, DetachedSignature, ManifestVerifier, SignedManifest, cbor, hex};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ModelRecord, RECORD_LIMIT, Registry, now};
use crate::error::RegistryError;
use crate::mqtt::Announcer;

/// Release records kept per model in the store (older ones are deleted by the writer).
pub const RELEASES_KEPT: u64 = 64;
/// The most models read from the store.
pub const MAX_SHARED_MODELS: usize = 10_000;
/// Chunk uploads or downloads in flight at once (and read into memory at once).
const TRANSFERS_AT_ONCE: usize = 32;
/// What a release record's signature is for.
const PURPOSE: &str = "replica release record";
const FORMAT: u16 = 1;
const OBJECT_LIMIT: usize = RECORD_LIMIT + outpost_shared::signing::MAX_MANIFEST_BYTES + 64 * 1024;

/// A release record as stored.
#[derive(Serialize, Deserialize)]
struct ReleaseObject {
    format: u16,
    /// CBOR of the model record.
    #[serde(with = "serde_bytes")]
    record: Vec<u8>,
    /// The signed manifest, as announced.
    #[serde(with = "serde_bytes")]
    manifest: Vec<u8>,
    /// Over [`signed_bytes`] of the two.
    signature: DetachedSignature,
    /// Random for each write (not signed): two replicas that sign the same release in the
    /// same second with one key write the same bytes but for this, so a writer reading back
    /// a number it was refused knows whether its own earlier attempt made it.
    #[serde(default, with = "serde_bytes")]
    writer: Vec<u8>,
}

/// 16 random bytes.
fn nonce() -> Result<[u8; 16], RegistryError> {
    let mut n = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
        .map_err(|_| RegistryError::Storage("the system random generator failed".into()))?;
    Ok(n)
}

fn signed_bytes(record: &[u8], manifest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + record.len() + manifest.len());
    out.extend_from_slice(&(record.len() as u64).to_be_bytes());
    out.extend_from_slice(record);
    out.extend_from_slice(manifest);
    out
}

/// The object store, reached from the registry's blocking code.
pub struct SharedStore {
    store: Arc<dyn ObjectStore>,
    prefix: Option<Key>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    url: String,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// What went wrong with one request to the store.
struct StoreError(String);

impl SharedStore {
    /// Opens the store `section` names; its requests run on `runtime`. S3 credentials come
    /// from the environment.
    pub fn open(
        section: &SharedStoreSection,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, RegistryError> {
        Self::open_with(
            section,
            runtime,
            object_store::aws::AmazonS3Builder::from_env(),
        )
    }

    /// [`Self::open`] with S3 settings (credentials) from `s3` rather than the environment.
    fn open_with(
        section: &SharedStoreSection,
        runtime: tokio::runtime::Handle,
        s3: object_store::aws::AmazonS3Builder,
    ) -> Result<Self, RegistryError> {
        let bad = |e: String| RegistryError::Storage(format!("shared store {}: {e}", section.url));
        let (store, prefix): (Arc<dyn ObjectStore>, Option<Key>) =
            match section.location().map_err(bad)? {
                SharedStoreLocation::Folder(path) => {
                    std::fs::create_dir_all(&path)
                        .map_err(|e| bad(format!("creating {}: {e}", path.display())))?;
                    // Synced: a release record lost to a crash of the store's host could be
                    // written again with other content under the same number.
                    let local = object_store::local::LocalFileSystem::new_with_prefix(&path)
                        .map_err(|e| bad(e.to_string()))?
                        .with_fsync(true);
                    (Arc::new(local), None)
                }
                SharedStoreLocation::S3 { bucket, prefix } => {
                    // reqwest's rustls takes the process's provider: ring, as everywhere else.
                    let _ = rustls::crypto::ring::default_provider().install_default();
                    let mut builder = s3
                        .with_bucket_name(bucket)
                        .with_region(section.region.clone());
                    if let Some(endpoint) = &section.endpoint {
                        builder = builder
                            .with_endpoint(endpoint.clone())
                            .with_allow_http(endpoint.starts_with("http://"));
                    }
                    let s3 = builder.build().map_err(|e| bad(e.to_string()))?;
                    let prefix = (!prefix.is_empty())
                        .then(|| Key::parse(&prefix))
                        .transpose()
                        .map_err(|e| bad(e.to_string()))?;
                    (Arc::new(s3), prefix)
                }
            };
        Ok(Self {
            store,
            prefix,
            runtime,
            timeout: Duration::from_millis(section.timeout_ms),
            url: section.url.clone(),
        })
    }

    fn key(&self, parts: &[&str]) -> Key {
        let base = self.prefix.clone().unwrap_or_default();
        parts.iter().fold(base, |k, p| k.join(*p))
    }

    fn chunk_key(&self, id: &ChunkId) -> Key {
        self.key(&["chunks", &hex::encode(id.as_bytes())])
    }

    fn release_key(&self, model: &str, release: u64) -> Key {
        self.key(&["releases", model, &format!("{release:020}")])
    }

    /// Runs `request` on the runtime and waits for it (at most the store's timeout).
    fn block<T: Send + 'static>(
        &self,
        request: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout = self.timeout;
        self.runtime.spawn(async move {
            let _ = tx.send(tokio::time::timeout(timeout, request).await);
        });
        match rx.recv() {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
            Err(_) => Err(StoreError("the coordinator is stopping".into())),
        }
    }

    fn fail(&self, what: &str, e: StoreError) -> RegistryError {
        RegistryError::Storage(format!("shared store {}: {what}: {}", self.url, e.0))
    }

    /// Checks that the store answers (a listing) and honours a conditional create (a probe
    /// object created twice: the second must be refused), so a wrong URL, credentials or a
    /// store that would let two replicas write one release number stop the start.
    pub fn check(&self) -> Result<(), RegistryError> {
        self.models()?;
        let probe = self.key(&["probes", &hex::encode(&nonce()?[..])]);
        let first = self
            .create(probe.clone(), b"probe".to_vec())
            .map_err(|e| self.fail("creating a probe object", e))?;
        let second = self
            .create(probe.clone(), b"probe again".to_vec())
            .map_err(|e| self.fail("creating a probe object again", e))?;
        let store = self.store.clone();
        let deleted = self.block(async move {
            store
                .delete(&probe)
                .await
                .map_err(|e| StoreError(e.to_string()))
        });
        if let Err(e) = deleted {
            tracing::warn!(
                error = e.0,
                "could not delete the shared store's probe object"
            );
        }
        if !first || second {
            return Err(RegistryError::Storage(format!(
                "shared store {}: it does not honour a conditional create (If-None-Match), so two replicas could publish one release number",
                self.url
            )));
        }
        Ok(())
    }

    /// The models with releases in the store (at most [`MAX_SHARED_MODELS`]).
    pub fn models(&self) -> Result<Vec<String>, RegistryError> {
        let store = self.store.clone();
        let prefix = self.key(&["releases"]);
        let listed = self
            .block(async move {
                match store.list_with_delimiter(Some(&prefix)).await {
                    Ok(list) => Ok(list.common_prefixes),
                    Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                    Err(e) => Err(StoreError(e.to_string())),
                }
            })
            .map_err(|e| self.fail("listing releases", e))?;
        let mut models: Vec<String> = listed
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        models.sort();
        models.truncate(MAX_SHARED_MODELS);
        Ok(models)
    }

    /// The release numbers of `model` in the store.
    pub fn releases(&self, model: &str) -> Result<Vec<u64>, RegistryError> {
        let store = self.store.clone();
        let prefix = self.key(&["releases", model]);
        let listed = self
            .block(async move {
                match store.list_with_delimiter(Some(&prefix)).await {
                    Ok(list) => Ok(list.objects),
                    Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                    Err(e) => Err(StoreError(e.to_string())),
                }
            })
            .map_err(|e| self.fail(&format!("listing the releases of {model}"), e))?;
        // Exactly the names this code writes (20 digits): another name would not be read back
        // under the key its number makes.
        let mut releases: Vec<u64> = listed
            .iter()
            .filter_map(|m| m.location.filename())
            .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|n| n.parse().ok())
            .collect();
        releases.sort_unstable();
        Ok(releases)
    }

    /// The bytes of `key`, if it is there and at most `limit` bytes.
    fn get(&self, key: Key, limit: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let store = self.store.clone();
        self.block(async move {
            let found = match store.get(&key).await {
                Ok(found) => found,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(StoreError(e.to_string())),
            };
            if found.meta.size > limit as u64 {
                return Err(StoreError(format!(
                    "{key} is {} bytes, over the {limit} read",
                    found.meta.size
                )));
            }
            let bytes = found.bytes().await.map_err(|e| StoreError(e.to_string()))?;
            Ok(Some(bytes.to_vec()))
        })
    }

    /// Creates `key` with `bytes` unless it exists; whether this call created it.
    fn create(&self, key: Key, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let store = self.store.clone();
        self.block(async move {
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match store.put_opts(&key, PutPayload::from(bytes), options).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(StoreError(e.to_string())),
            }
        })
    }

    /// A stored release record's bytes (none when it is gone: pruned meanwhile).
    fn release(&self, model: &str, release: u64) -> Result<Option<Vec<u8>>, RegistryError> {
        self.get(self.release_key(model, release), OBJECT_LIMIT)
            .map_err(|e| self.fail(&format!("reading release {release} of {model}"), e))
    }

    /// Uploads chunks (an existing one is left as it is), [`TRANSFERS_AT_ONCE`] at a time.
    fn put_chunks(&self, chunks: Vec<(ChunkId, Vec<u8>)>) -> Result<(), RegistryError> {
        let store = self.store.clone();
        let keyed: Vec<(Key, Vec<u8>)> = chunks
            .into_iter()
            .map(|(id, bytes)| (self.chunk_key(&id), bytes))
            .collect();
        self.block(async move {
            let mut uploads = tokio::task::JoinSet::new();
            for (key, bytes) in keyed {
                let store = store.clone();
                uploads.spawn(async move {
                    let options = PutOptions {
                        mode: PutMode::Create,
                        ..PutOptions::default()
                    };
                    match store.put_opts(&key, bytes.into(), options).await {
                        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
                        Err(e) => Err(StoreError(format!("{key}: {e}"))),
                    }
                });
            }
            while let Some(done) = uploads.join_next().await {
                done.map_err(|e| StoreError(e.to_string()))??;
            }
            Ok(())
        })
        .map_err(|e| self.fail("uploading chunks", e))
    }

    /// Downloads chunks, each checked against its digest and size.
    fn get_chunks(
        &self,
        wanted: Vec<(ChunkId, u32)>,
    ) -> Result<Vec<(ChunkId, Vec<u8>)>, RegistryError> {
        let store = self.store.clone();
        let keyed: Vec<(ChunkId, u32, Key)> = wanted
            .into_iter()
            .map(|(id, size)| (id, size, self.chunk_key(&id)))
            .collect();
        self.block(async move {
            let mut downloads = tokio::task::JoinSet::new();
            for (id, size, key) in keyed {
                let store = store.clone();
                downloads.spawn(async move {
                    let found = store.get(&key).await.map_err(|e| match e {
                        object_store::Error::NotFound { .. } => {
                            StoreError(format!("chunk {key} is missing"))
                        }
                        e => StoreError(format!("{key}: {e}")),
                    })?;
                    if found.meta.size != u64::from(size) {
                        return Err(StoreError(format!(
                            "chunk {key} is {} bytes, the record says {size}",
                            found.meta.size
                        )));
                    }
                    let bytes = found
                        .bytes()
                        .await
                        .map_err(|e| StoreError(format!("{key}: {e}")))?;
                    id.verify(&bytes)
                        .map_err(|_| StoreError(format!("chunk {key} fails its digest")))?;
                    Ok((id, bytes.to_vec()))
                });
            }
            let mut got = Vec::new();
            while let Some(done) = downloads.join_next().await {
                got.push(done.map_err(|e| StoreError(e.to_string()))??);
            }
            Ok(got)
        })
        .map_err(|e| self.fail("downloading chunks", e))
    }

    /// Deletes `model`'s release records older than `below`.
    fn prune(&self, model: &str, below: u64) -> Result<(), RegistryError> {
        for old in self.releases(model)?.into_iter().filter(|r| *r < below) {
            let store = self.store.clone();
            let key = self.release_key(model, old);
            self.block(async move {
                match store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(StoreError(e.to_string())),
                }
            })
            .map_err(|e| self.fail(&format!("deleting release {old} of {model}"), e))?;
        }
        Ok(())
    }
}

/// The registry's side of sharing: the store, the keys that may sign what is in it, and which
/// chunks are known to be there.
pub(super) struct Replication {
    pub(super) store: SharedStore,
    pub(super) verifier: ManifestVerifier,
    /// Chunk ids known to be in the store (uploaded or imported).
    pub(super) known: sled::Tree,
}

/// What one look at the shared store did.
#[derive(Debug, Default)]
pub struct Followed {
    /// The releases taken over: each model and its signed manifest (to announce).
    pub taken: Vec<(String, Vec<u8>)>,
    /// The releases left out, and why (a bad signature, a chunk failing its digest...).
    pub refused: Vec<String>,
}

/// A release read from the store and checked, not yet installed.
struct Fetched {
    record: ModelRecord,
    record_bytes: Vec<u8>,
    manifest: Vec<u8>,
}

impl Replication {
    /// Checks a stored release record of `model` `release`: both signatures by trusted keys,
    /// the record's name and number, and the manifest agreeing with the record.
    fn open(&self, model: &str, release: u64, bytes: &[u8]) -> Result<Fetched, String> {
        let object: ReleaseObject =
            cbor::decode("release record", bytes, OBJECT_LIMIT).map_err(|e| e.to_string())?;
        if object.format != FORMAT {
            return Err(format!(
                "format {} (this build reads {FORMAT})",
                object.format
            ));
        }
        self.verifier
            .verify_detached(
                PURPOSE,
                &signed_bytes(&object.record, &object.manifest),
                &object.signature,
            )
            .map_err(|e| e.to_string())?;
        let record: ModelRecord = cbor::decode("model record", &object.record, RECORD_LIMIT)
            .map_err(|e| e.to_string())?;
        if record.name != model || record.release != release {
            return Err(format!(
                "it holds release {} of {:?}",
                record.release, record.name
            ));
        }
        let signed = SignedManifest::from_cbor(&object.manifest).map_err(|e| e.to_string())?;
        let manifest = match self.verifier.verify(&signed, now()) {
            Ok(manifest) => manifest,
            // An expired release is still the newest: imported, and signed again by the refresh.
            Err(ManifestError::Expired { .. }) => {
                expired_manifest(&signed).ok_or("its manifest cannot be read")?
            }
            Err(e) => return Err(e.to_string()),
        };
        let agrees = manifest.model == record.name
            && manifest.release == record.release
            && record.version(record.stable) == Some(&manifest.stable)
            && match (&manifest.candidate, &record.candidate) {
                (None, None) => true,
                (Some(c), Some((v, pct, salt))) => {
                    record.version(*v) == Some(&c.version)
                        && c.rollout_percent == *pct
                        && &c.salt == salt
                }
                _ => false,
            };
        if !agrees {
            return Err("its manifest does not match its record".into());
        }
        Ok(Fetched {
            record,
            record_bytes: object.record,
            manifest: object.manifest,
        })
    }
}

/// The manifest inside a signed manifest whose signature checked out but which has expired.
fn expired_manifest(signed: &SignedManifest) -> Option<outpost_shared::Manifest> {
    #[derive(Deserialize)]
    struct Payload {
        manifest: outpost_shared::Manifest,
    }
    let payload: Payload = cbor::decode(
        "manifest payload",
        &signed.payload,
        outpost_shared::signing::MAX_MANIFEST_BYTES,
    )
    .ok()?;
    Some(payload.manifest)
}

impl Registry {
    /// Publishes `record` (encoded as `encoded`, its signed manifest `manifest`) to the shared
    /// store: its chunks, then its release record with a conditional create. Another replica
    /// that took the release number first is a [`RegistryError::Conflict`].
    pub(super) fn publish_shared(
        &self,
        shared: &Replication,
        record: &ModelRecord,
        encoded: &[u8],
        manifest: &[u8],
    ) -> Result<(), RegistryError> {
        let mut missing = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in record_chunks(record) {
            if seen.insert(c.id) && !shared.known.contains_key(c.id.as_bytes())? {
                missing.push(c.id);
            }
        }
        for batch in missing.chunks(TRANSFERS_AT_ONCE) {
            let mut upload = Vec::with_capacity(batch.len());
            for id in batch {
                let bytes = self.chunks.get(id).ok_or_else(|| {
                    RegistryError::Storage(format!(
                        "chunk {} of model {} is not stored here",
                        hex::encode(id.as_bytes()),
                        record.name
                    ))
                })?;
                upload.push((*id, bytes));
            }
            shared.store.put_chunks(upload)?;
            for id in batch {
                shared.known.insert(id.as_bytes(), &[])?;
            }
        }
        let signature = self
            .signer
            .sign_detached(PURPOSE, &signed_bytes(encoded, manifest));
        let object = cbor::encode(
            "release record",
            &ReleaseObject {
                format: FORMAT,
                record: encoded.to_vec(),
                manifest: manifest.to_vec(),
                signature,
                writer: nonce()?.to_vec(),
            },
            OBJECT_LIMIT,
        )
        .map_err(|e| RegistryError::Storage(e.to_string()))?;
        let key = shared.store.release_key(&record.name, record.release);
        let what = format!("writing release {} of {}", record.release, record.name);
        let created = match shared.store.create(key.clone(), object.clone()) {
            Ok(true) => true,
            // A retried request, or one whose answer was lost, may have written it after all:
            // then it is ours (the writer nonce makes the bytes this write's alone).
            Ok(false) | Err(_)
                if shared
                    .store
                    .get(key.clone(), OBJECT_LIMIT)
                    .ok()
                    .flatten()
                    .as_ref()
                    == Some(&object) =>
            {
                true
            }
            Ok(false) => false,
            Err(e) => return Err(shared.store.fail(&what, e)),
        };
        if !created {
            return Err(RegistryError::Conflict(format!(
                "another coordinator published release {} of model {:?} first; it is taken over here within [registry.shared] poll_ms: try again",
                record.release, record.name
            )));
        }
        if record.release > RELEASES_KEPT
            && let Err(e) = shared
                .store
                .prune(&record.name, record.release - RELEASES_KEPT + 1)
        {
            tracing::warn!(model = record.name, error = %e, "could not delete old release records");
        }
        Ok(())
    }

    /// Reads `model`'s newest release in the store when it is newer than the one here, checks it
    /// and fetches the chunks it names that are not here. `None`: nothing newer.
    fn fetch_newer(
        &self,
        shared: &Replication,
        model: &str,
    ) -> Result<Option<Fetched>, RegistryError> {
        let here = self.record(model)?.map(|r| r.release).unwrap_or(0);
        // The newest record that passes its checks: one refused (tampered, or signed by a key
        // not listed) must not hide the good ones below it. Each refusal is reported.
        let mut refused = Vec::new();
        for release in shared.store.releases(model)?.into_iter().rev() {
            if release <= here {
                break;
            }
            let Some(bytes) = shared.store.release(model, release)? else {
                continue;
            };
            match shared.open(model, release, &bytes) {
                Ok(fetched) => {
                    for why in &refused {
                        tracing::error!(model, why, "a shared release record was refused");
                    }
                    self.fetch_chunks(shared, &fetched.record)?;
                    return Ok(Some(fetched));
                }
                Err(e) => refused.push(format!(
                    "shared store {}: release {release} of model {model:?} is refused: {e}",
                    shared.store.url
                )),
            }
        }
        match refused.is_empty() {
            true => Ok(None),
            false => Err(RegistryError::Storage(refused.join("; "))),
        }
    }

    /// Stores here every chunk `record` names that is not here yet.
    fn fetch_chunks(
        &self,
        shared: &Replication,
        record: &ModelRecord,
    ) -> Result<(), RegistryError> {
        let mut wanted: Vec<(ChunkId, u32)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in record_chunks(record) {
            if seen.insert(c.id) && !self.chunks.contains(&c.id) {
                wanted.push((c.id, c.size));
            }
        }
        for batch in wanted.chunks(TRANSFERS_AT_ONCE) {
            for (id, bytes) in shared.store.get_chunks(batch.to_vec())? {
                self.chunks
                    .put(&id, &bytes)
                    .map_err(|e| RegistryError::Storage(e.to_string()))?;
                shared.known.insert(id.as_bytes(), &[])?;
            }
        }
        Ok(())
    }

    /// Writes a fetched release here (under the write lock), unless one as new is here already;
    /// returns its signed manifest when it was written.
    fn install(
        &self,
        shared: &Replication,
        fetched: Fetched,
    ) -> Result<Option<(String, Vec<u8>)>, RegistryError> {
        let name = fetched.record.name.clone();
        let here = self.record(&name)?.map(|r| r.release).unwrap_or(0);
        if fetched.record.release <= here {
            return Ok(None);
        }
        // A push's garbage collection may have dropped chunks fetched before the lock.
        self.fetch_chunks(shared, &fetched.record)?;
        use sled::Transactional as _;
        (&self.models, &self.manifests)
            .transaction(|(models, manifests)| {
                models.insert(name.as_bytes(), fetched.record_bytes.as_slice())?;
                manifests.insert(name.as_bytes(), fetched.manifest.as_slice())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| RegistryError::Storage(format!("writing model record: {e:?}")))?;
        self.db.flush()?;
        self.collect_garbage()?;
        tracing::info!(
            model = name,
            release = fetched.record.release,
            "took over a release another coordinator published"
        );
        Ok(Some((name, fetched.manifest)))
    }

    /// With the write lock held: brings `model` up to the store's newest release, so a write
    /// builds on it. Does nothing without a shared store.
    pub(super) fn catch_up_locked(&self, model: &str) -> Result<(), RegistryError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        if let Some(fetched) = self.fetch_newer(shared, model)? {
            self.install(shared, fetched)?;
        }
        Ok(())
    }

    /// Takes over every release in the shared store newer than the one here (the chunks are
    /// fetched before the write lock is taken). Does nothing without a shared store. A release
    /// that fails its checks is left out and named in [`Followed::refused`]; the others are
    /// still taken. An error: the store could not be listed.
    pub fn follow_shared(&self) -> Result<Followed, RegistryError> {
        let mut followed = Followed::default();
        let Some(shared) = &self.shared else {
            return Ok(followed);
        };
        for model in shared.store.models()? {
            if outpost_shared::topic::validate_name(outpost_shared::topic::NameKind::Model, &model)
                .is_err()
            {
                followed
                    .refused
                    .push(format!("releases/{model}: not a model name"));
                continue;
            }
            let fetched = match self.fetch_newer(shared, &model) {
                Ok(Some(fetched)) => fetched,
                Ok(None) => continue,
                Err(e) => {
                    followed.refused.push(e.to_string());
                    continue;
                }
            };
            let _guard = self
                .write
                .lock()
                .map_err(|_| RegistryError::Storage("registry lock poisoned".into()))?;
            match self.install(shared, fetched) {
                Ok(Some(done)) => followed.taken.push(done),
                Ok(None) => {}
                Err(e) => followed.refused.push(e.to_string()),
            }
        }
        for problem in &followed.refused {
            tracing::error!(problem, "a shared release was not taken over");
        }
        Ok(followed)
    }

    /// The shared store's poll interval, when there is one.
    pub fn shared_poll(&self) -> Option<Duration> {
        self.shared.as_ref().map(|_| self.shared_poll)
    }
}

/// Every chunk a record's kept versions name.
fn record_chunks(record: &ModelRecord) -> impl Iterator<Item = &outpost_shared::release::ChunkRef> {
    record.versions.iter().flat_map(|v| {
        v.variants
            .iter()
            .flat_map(|variant| variant.chunks.iter())
            .chain(v.extra_chunks())
    })
}

/// Takes over other replicas' releases every poll interval until `shutdown`; announces them
/// only when `announce` (this coordinator's broker is its own embedded one).
pub async fn follow(
    registry: Arc<Registry>,
    announcer: Announcer,
    announce: bool,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
        let registry_ = Arc::clone(&registry);
        match tokio::task::spawn_blocking(move || registry_.follow_shared()).await {
            Ok(Ok(followed)) if announce => {
                for (model, signed) in followed.taken {
                    if let Err(e) = announcer.announce(&model, signed).await {
                        tracing::warn!(model, error = %e, "could not announce a release taken over");
                    }
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not read the shared store"),
            Err(e) => tracing::error!(error = %e, "following the shared store failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use firmware_config::RegistrySection;
    use model_zoo::DemoModel;
    use outpost_runtime::ChunkStore;
    use outpost_shared::{ManifestSigner, Placement};

    use super::*;
    use crate::registry::{PushRequest, Quantize};

    struct Replica {
        registry: Registry,
        _dir: tempfile::TempDir,
    }

    fn new_key() -> Vec<u8> {
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    /// Where the replicas of a test share: a folder, or a bucket of moto's S3 server.
    enum At<'a> {
        Folder(&'a Path),
        S3(&'a Moto),
    }

    fn section(store: &At<'_>, keys: Vec<outpost_shared::PublicKey>) -> SharedStoreSection {
        let (url, endpoint) = match store {
            At::Folder(path) => (format!("file://{}", path.display()), None),
            At::S3(moto) => (
                "s3://outpost-test/replicas".to_owned(),
                Some(format!("http://127.0.0.1:{}", moto.port)),
            ),
        };
        SharedStoreSection {
            url,
            poll_ms: 100,
            timeout_ms: 10_000,
            endpoint,
            region: "us-east-1".into(),
            manifest_keys: keys,
        }
    }

    /// moto's S3-compatible server (`bash tests/support/python/install` puts it in
    /// `.oip-servers/moto`) with bucket `outpost-test`, killed when dropped: a protocol check
    /// of the S3 path (conditional create, listing), not a claim about AWS itself.
    struct Moto {
        port: u16,
        child: std::process::Child,
    }

    impl Moto {
        fn start() -> Self {
            let server =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../.oip-servers/moto/bin/moto_server");
            assert!(
                server.exists(),
                "{} is missing: run `bash tests/support/python/install` (CI does)",
                server.display()
            );
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            // Guarded at once: dropped (killed and waited for) on every path.
            let moto = Self {
                port,
                child: std::process::Command::new(server)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                use std::io::{Read as _, Write as _};
                let made = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
                    c.write_all(
                        b"PUT /outpost-test HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )?;
                    let mut answer = String::new();
                    c.read_to_string(&mut answer)?;
                    Ok(answer)
                });
                if made.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
                    return moto;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "moto did not make its bucket: {made:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn replica(
        runtime: &tokio::runtime::Runtime,
        store: &At<'_>,
        key: &[u8],
        trusted: Vec<outpost_shared::PublicKey>,
    ) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let chunks = ChunkStore::open(&dir.path().join("chunks")).unwrap();
        let section = section(store, trusted);
        let options = RegistrySection {
            shared: Some(section.clone()),
            ..RegistrySection::default()
        };
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_access_key_id("outpost-test")
            .with_secret_access_key("outpost-test-secret");
        let store = SharedStore::open_with(&section, runtime.handle().clone(), s3).unwrap();
        store.check().unwrap();
        let signer = ManifestSigner::from_pkcs8(key).unwrap();
        Replica {
            registry: Registry::open(db, chunks, signer, &options, Some(store)).unwrap(),
            _dir: dir,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn push(name: &str, seed: u64) -> PushRequest {
        PushRequest {
            name: name.into(),
            model: DemoModel::VideoRanker.bytes(seed),
            cloud_model: None,
            placement: Placement::Cloud,
            rollout_percent: 100,
            max_batch: None,
            quantize: Some(Quantize::None),
            samples: None,
            tokenizer: None,
            text: Default::default(),
            output_kinds: Vec::new(),
            int8: Default::default(),
            dry_run: false,
            gate: None,
            known_devices: Vec::new(),
            backend: None,
        }
    }

    /// `n` replicas sharing one key on a fresh folder: the runtime, the folder, the key.
    fn on_a_folder(
        n: usize,
    ) -> (
        tokio::runtime::Runtime,
        tempfile::TempDir,
        Vec<u8>,
        Vec<Replica>,
    ) {
        let rt = runtime();
        let folder = tempfile::tempdir().unwrap();
        let key = new_key();
        let replicas = (0..n)
            .map(|_| replica(&rt, &At::Folder(folder.path()), &key, Vec::new()))
            .collect();
        (rt, folder, key, replicas)
    }

    fn release_of(r: &Registry, model: &str) -> u64 {
        r.record(model).unwrap().map_or(0, |r| r.release)
    }

    #[test]
    fn a_release_written_by_one_replica_is_served_by_the_others() {
        let (_rt, _folder, _key, replicas) = on_a_folder(3);
        let [a, b, c] = replicas.as_slice() else {
            unreachable!()
        };

        a.registry.push(push("ranker", 1)).unwrap();
        for other in [&b, &c] {
            let followed = other.registry.follow_shared().unwrap();
            assert_eq!(followed.taken.len(), 1, "{followed:?}");
            assert!(followed.refused.is_empty(), "{followed:?}");
            assert_eq!(
                other.registry.signed_manifest("ranker").unwrap(),
                a.registry.signed_manifest("ranker").unwrap()
            );
            // Every chunk is here: the model is served from this replica's own copy.
            let (bytes, _) = other.registry.serving("ranker", 1).unwrap();
            assert_eq!(bytes, DemoModel::VideoRanker.bytes(1));
            // Nothing newer: a second look takes nothing.
            assert!(other.registry.follow_shared().unwrap().taken.is_empty());
        }

        // B writes the next release; A and C take it over, and a write on A builds on it.
        b.registry.push(push("ranker", 2)).unwrap();
        assert_eq!(release_of(&b.registry, "ranker"), 2);
        c.registry.follow_shared().unwrap();
        assert_eq!(release_of(&c.registry, "ranker"), 2);
        let (published, _) = a.registry.rollback("ranker", 1).unwrap();
        assert_eq!(published.release, 3, "A caught up before writing");
        assert_eq!(published.version, 3);
        for other in [&b, &c] {
            other.registry.follow_shared().unwrap();
            assert_eq!(other.registry.stable_version("ranker").unwrap(), 3);
            let (bytes, _) = other.registry.serving("ranker", 3).unwrap();
            assert_eq!(bytes, DemoModel::VideoRanker.bytes(1));
        }
    }

    #[test]
    fn one_writer_wins_each_release_number_on_a_folder() {
        let folder = tempfile::tempdir().unwrap();
        one_writer_wins_each_release_number(At::Folder(folder.path()));
    }

    #[test]
    fn one_writer_wins_each_release_number_on_s3() {
        let moto = Moto::start();
        one_writer_wins_each_release_number(At::S3(&moto));
    }

    fn one_writer_wins_each_release_number(store: At<'_>) {
        let rt = runtime();
        let key = new_key();
        let a = replica(&rt, &store, &key, Vec::new());
        let b = replica(&rt, &store, &key, Vec::new());
        a.registry.push(push("ranker", 1)).unwrap();
        b.registry.follow_shared().unwrap();

        // B about to write release 2 from release 1 while A already wrote release 2.
        let mut stale = b.registry.record("ranker").unwrap().unwrap();
        a.registry.rollback("ranker", 1).unwrap();
        stale.release += 1;
        let refused = b.registry.sign_and_store(&mut stale).unwrap_err();
        assert!(
            matches!(&refused, RegistryError::Conflict(m) if m.contains("release 2")),
            "{refused}"
        );
        assert_eq!(release_of(&b.registry, "ranker"), 1, "nothing written here");
        b.registry.follow_shared().unwrap();
        assert_eq!(
            b.registry.signed_manifest("ranker").unwrap(),
            a.registry.signed_manifest("ranker").unwrap()
        );

        // Two replicas writing at once, many times: every number is written once, by one.
        let won: Vec<Vec<u64>> = std::thread::scope(|s| {
            let writers: Vec<_> = [&a, &b]
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut won = Vec::new();
                        for _ in 0..12 {
                            let stable = r.registry.stable_version("ranker").unwrap();
                            match r.registry.rollback("ranker", stable) {
                                Ok((published, _)) => won.push(published.release),
                                // Lost the race, or the version was dropped meanwhile.
                                Err(RegistryError::Conflict(_) | RegistryError::NotFound(_)) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        won
                    })
                })
                .collect();
            writers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let mut all: Vec<u64> = won.concat();
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        assert_eq!(all.len(), before, "a release number won twice: {won:?}");
        let stored = a
            .registry
            .shared
            .as_ref()
            .unwrap()
            .store
            .releases("ranker")
            .unwrap();
        assert_eq!(stored.len(), 2 + all.len(), "{stored:?} {won:?}");
        // Afterwards both replicas hold the same newest release.
        a.registry.follow_shared().unwrap();
        b.registry.follow_shared().unwrap();
        assert_eq!(
            a.registry.signed_manifest("ranker").unwrap(),
            b.registry.signed_manifest("ranker").unwrap()
        );
        assert_eq!(release_of(&a.registry, "ranker"), *stored.last().unwrap());
    }

    fn release_file(store: &Path, model: &str, release: u64) -> std::path::PathBuf {
        store
            .join("releases")
            .join(model)
            .join(format!("{release:020}"))
    }

    #[test]
    fn tampered_records_and_chunks_and_strangers_keys_are_refused() {
        let (rt, folder, key, replicas) = on_a_folder(2);
        let store = At::Folder(folder.path());
        let [a, b] = replicas.as_slice() else {
            unreachable!()
        };
        a.registry.push(push("ranker", 1)).unwrap();

        // A flipped byte anywhere in the release record, the signature included (only the
        // writer nonce, the last 24 bytes, is not signed: it decides nothing served).
        let path = release_file(folder.path(), "ranker", 1);
        let good = std::fs::read(&path).unwrap();
        for at in [good.len() / 3, good.len() / 2, good.len() - 40] {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            let followed = b.registry.follow_shared().unwrap();
            assert!(followed.taken.is_empty(), "byte {at}");
            assert!(
                followed.refused.iter().any(|r| r.contains("is refused")),
                "byte {at}: {followed:?}"
            );
            assert_eq!(release_of(&b.registry, "ranker"), 0);
        }
        std::fs::write(&path, &good).unwrap();

        // A chunk whose bytes were swapped.
        let record = a.registry.record("ranker").unwrap().unwrap();
        let chunk = record_chunks(&record).next().unwrap();
        let chunk_path = folder
            .path()
            .join("chunks")
            .join(hex::encode(chunk.id.as_bytes()));
        let good_chunk = std::fs::read(&chunk_path).unwrap();
        let mut bad_chunk = good_chunk.clone();
        bad_chunk[0] ^= 1;
        std::fs::write(&chunk_path, &bad_chunk).unwrap();
        let followed = b.registry.follow_shared().unwrap();
        assert!(
            followed
                .refused
                .iter()
                .any(|r| r.contains("fails its digest")),
            "{followed:?}"
        );
        assert_eq!(release_of(&b.registry, "ranker"), 0);
        std::fs::write(&chunk_path, &good_chunk).unwrap();
        assert_eq!(b.registry.follow_shared().unwrap().taken.len(), 1);

        // A replica with a key of its own: refused until its key is listed.
        let other_key = new_key();
        let stranger = replica(&rt, &store, &other_key, Vec::new());
        stranger.registry.push(push("other", 3)).unwrap();
        let followed = b.registry.follow_shared().unwrap();
        assert!(
            followed
                .refused
                .iter()
                .any(|r| r.contains("not a trusted fleet key")),
            "{followed:?}"
        );
        let stranger_key = ManifestSigner::from_pkcs8(&other_key).unwrap().public_key();
        let listing = replica(&rt, &store, &key, vec![stranger_key]);
        let followed = listing.registry.follow_shared().unwrap();
        assert_eq!(followed.taken.len(), 2, "{followed:?}");
    }

    #[test]
    fn a_refused_newest_record_does_not_hide_the_good_ones_below() {
        let (_rt, folder, _key, replicas) = on_a_folder(2);
        let [a, b] = replicas.as_slice() else {
            unreachable!()
        };
        a.registry.push(push("ranker", 1)).unwrap();
        a.registry.rollback("ranker", 1).unwrap();
        let path = release_file(folder.path(), "ranker", 2);
        let mut bad = std::fs::read(&path).unwrap();
        let at = bad.len() / 2;
        bad[at] ^= 0x20;
        std::fs::write(&path, &bad).unwrap();
        // A name this code never writes is not a release (it would not be read back).
        std::fs::write(folder.path().join("releases/ranker/99"), b"junk").unwrap();
        let followed = b.registry.follow_shared().unwrap();
        assert_eq!(followed.taken.len(), 1, "{followed:?}");
        assert_eq!(release_of(&b.registry, "ranker"), 1);
        let store = &b.registry.shared.as_ref().unwrap().store;
        assert_eq!(store.releases("ranker").unwrap(), vec![1, 2]);
    }

    #[test]
    fn old_release_records_are_deleted_past_the_bound() {
        let rt = runtime();
        let folder = tempfile::tempdir().unwrap();
        let store = At::Folder(folder.path());
        let key = new_key();
        let a = replica(&rt, &store, &key, Vec::new());
        a.registry.push(push("ranker", 1)).unwrap();
        for _ in 0..RELEASES_KEPT + 5 {
            let stable = a.registry.stable_version("ranker").unwrap();
            a.registry.rollback("ranker", stable).unwrap();
        }
        let newest = RELEASES_KEPT + 6;
        assert_eq!(release_of(&a.registry, "ranker"), newest);
        let stored = a
            .registry
            .shared
            .as_ref()
            .unwrap()
            .store
            .releases("ranker")
            .unwrap();
        assert_eq!(stored.len() as u64, RELEASES_KEPT, "{stored:?}");
        assert_eq!(stored.first(), Some(&(newest - RELEASES_KEPT + 1)));
        // A replica starting now still gets the newest.
        let b = replica(&rt, &store, &key, Vec::new());
        b.registry.follow_shared().unwrap();
        assert_eq!(release_of(&b.registry, "ranker"), newest);
    }
}
