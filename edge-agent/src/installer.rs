//! The installer: the one task that changes what the agent serves. It owns the serving table
//! ([`ServingTable`]) and writes the model records. For each release, in order: verify the
//! signature, decide with [`plan_install`] (anything refused changes nothing and is counted and
//! reported), fetch over QUIC only the chunks not already stored (so a restarted agent resumes),
//! assemble, load and warm up, then switch: the record first, flushed, then the table, in one
//! published snapshot. The previous version keeps serving until the switch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::Backoff;
use outpost_shared::rollout::check_forward;
use outpost_shared::{ChunkId, Manifest, ManifestError, ManifestVerifier, ModelVersion};
use rumqttc::AsyncClient;
use tokio::sync::mpsc;

use crate::Context;
use crate::counters::Counters;
use crate::engines::{Engines, LoadError, stored_chunks};
use crate::offload::OffloadError;
use crate::plan::{Device, Install, KeptChunks, Refusal, plan_install};
use crate::serving::ServingTable;
use crate::status::now;
use crate::store::{Record, StoreError};

/// Chunks asked for in one request (the protocol allows up to
/// [`outpost_shared::frame::MAX_CHUNKS_PER_REQUEST`]).
const CHUNKS_PER_REQUEST: usize = 32;

/// Bytes left free on the data folder's file system beyond a download: the database and the
/// logs need room to write, and sled stops for good (until a restart) after one failed write,
/// so an install that would leave less waits instead of starting.
const DISK_RESERVE: u64 = 8 << 20;

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Why a release was not installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// The MQTT message had no payload.
    #[error("an empty manifest message")]
    Empty,
    /// The release is not signed by a fleet key, expired, or is not a manifest.
    #[error(transparent)]
    Unverified(ManifestError),
    /// The release breaks one of the install rules.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The chunks could not be fetched.
    #[error(transparent)]
    Fetch(#[from] OffloadError),
    /// The coordinator does not have every chunk of the version.
    #[error("the coordinator lacks {missing} chunks of version {version}")]
    Incomplete {
        /// The version.
        version: u64,
        /// Chunks it lacks.
        missing: usize,
    },
    /// The disk has no room for the version's chunks: nothing is fetched or written, the active
    /// version keeps serving, and the install is tried again.
    #[error(
        "the disk is full: version {version} needs {} more for its chunks, with {} kept free, and {} are free",
        megabytes(*.needed),
        megabytes(DISK_RESERVE),
        megabytes(*.available)
    )]
    DiskFull {
        /// The version.
        version: u64,
        /// The bytes of its chunks not stored yet.
        needed: u64,
        /// The bytes free.
        available: u64,
    },
    /// A fetched chunk could not be written.
    #[error("storing a chunk: {0}")]
    StoreChunk(#[source] std::io::Error),
    /// The version was fetched but cannot serve here.
    #[error("version {version} cannot serve: {source}")]
    Load {
        /// The version.
        version: u64,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// The task loading the version ended without an answer.
    #[error("the loading task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A failed install waiting for its next try.
#[derive(Debug)]
struct Retry {
    manifest: Manifest,
    backoff: Backoff,
    at: tokio::time::Instant,
}

/// Sleeps until `at` (never returns for `None`; the caller guards that branch).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl InstallError {
    /// Whether the same release may install on another try: the network, the coordinator, the
    /// disk or the loading failed, not the release itself.
    fn can_pass(&self) -> bool {
        matches!(
            self,
            InstallError::Store(_)
                | InstallError::Fetch(_)
                | InstallError::Incomplete { .. }
                | InstallError::DiskFull { .. }
                | InstallError::StoreChunk(_)
                | InstallError::Load { .. }
                | InstallError::Task(_)
        )
    }
}

/// The installer task's state.
#[derive(Debug)]
pub(crate) struct Installer {
    ctx: Arc<Context>,
    verifier: ManifestVerifier,
    engines: Arc<Engines>,
    table: ServingTable,
}

impl Installer {
    /// An installer writing `table`.
    pub(crate) fn new(
        ctx: Arc<Context>,
        verifier: ManifestVerifier,
        engines: Engines,
        table: ServingTable,
    ) -> Self {
        Self {
            ctx,
            verifier,
            engines: Arc::new(engines),
            table,
        }
    }

    /// Loads the cached models at start, before any network is up. A cached version that can no
    /// longer serve (a damaged chunk) gives way to the previous version, when that still loads;
    /// the release, delivered again at connect, brings it back. Blocking.
    pub(crate) fn load_cached(&mut self) -> Result<(), StoreError> {
        let store = &self.ctx.store;
        for (model, record) in store.records()? {
            if let Some(manifest) = &record.manifest {
                self.table.release_accepted(&model, manifest.expires_at);
            }
            let Some(active) = &record.active else {
                continue;
            };
            match self.engines.load(active, store.chunks()) {
                Ok(serving) => {
                    let previous = record.previous.as_ref().map(|v| v.version);
                    self.table.serve_cached(&model, serving, previous);
                    tracing::info!(model, version = active.version, "serving from cache");
                }
                Err(e) => {
                    // The previous version serves meanwhile, if it still loads; the release,
                    // delivered again at connect, fetches what is damaged (deleted on reading)
                    // and brings the active version back.
                    let fallback = record.previous.as_ref().and_then(|previous| {
                        match self.engines.load(previous, store.chunks()) {
                            Ok(serving) => Some((previous.clone(), serving)),
                            Err(e) => {
                                tracing::warn!(model, version = previous.version, error = %e, "the previous version cannot serve either");
                                None
                            }
                        }
                    });
                    let active = match fallback {
                        Some((previous, serving)) => {
                            tracing::warn!(model, version = active.version, fallback = previous.version, error = %e, "cached model cannot serve; serving the previous version until it is fetched again");
                            self.table.serve_cached(&model, serving, None);
                            Some(previous)
                        }
                        None => {
                            tracing::warn!(model, error = %e, "cached model cannot serve; waiting for its release");
                            None
                        }
                    };
                    let record = Record {
                        active,
                        previous: None,
                        manifest: record.manifest.clone(),
                        installing: record.installing.clone(),
                    };
                    store.save(&model, &record)?;
                }
            }
        }
        Ok(())
    }

    /// Installs releases one at a time, publishing the status after each. An install that
    /// failed for a reason that can pass (the network, the coordinator, the disk) is tried again
    /// after a jittered, growing wait, until it succeeds or a newer release of the model
    /// replaces it; a refused release is not.
    pub(crate) async fn run(
        mut self,
        client: AsyncClient,
        mut manifests: mpsc::Receiver<crate::sync::Queued>,
    ) {
        // One waiting retry per model at most: the map is bounded by the models followed.
        let mut retries: HashMap<String, Retry> = HashMap::new();
        loop {
            let next = retries.values().map(|r| r.at).min();
            tokio::select! {
                payload = manifests.recv() => {
                    let Some(queued) = payload else { break };
                    let verified = self.verify(&queued.payload);
                    drop(queued);
                    match verified {
                        Ok(manifest) => {
                            crash_point!("installer.verified");
                            self.offered(manifest, &mut retries).await
                        }
                        Err(error) => self.refused(None, &error),
                    }
                }
                () = sleep_until_some(next), if next.is_some() => {
                    let now = tokio::time::Instant::now();
                    let due: Vec<String> = retries
                        .iter()
                        .filter(|(_, r)| r.at <= now)
                        .map(|(m, _)| m.clone())
                        .collect();
                    for model in due {
                        if let Some(retry) = retries.remove(&model) {
                            self.attempt(retry.manifest, retry.backoff, &mut retries).await;
                        }
                    }
                }
            }
            crash_point!("installer.status_publishing");
            crate::sync::publish_status(&self.ctx, &client).await;
        }
    }

    /// A verified release came: it replaces a waiting retry of its model if it is newer (the
    /// same release again keeps the retry's back-off; an older one is refused).
    async fn offered(&mut self, manifest: Manifest, retries: &mut HashMap<String, Retry>) {
        let model = manifest.model.clone();
        let backoff = match retries.remove(&model) {
            Some(waiting) if waiting.manifest == manifest => waiting.backoff,
            Some(waiting) => {
                if let Err(e) = check_forward(Some(&waiting.manifest), &manifest) {
                    Counters::count(&self.ctx.counters.rejected);
                    tracing::warn!(model, error = %e, "release older than the one being installed");
                    retries.insert(model, waiting);
                    return;
                }
                self.install_backoff()
            }
            None => self.install_backoff(),
        };
        self.attempt(manifest, backoff, retries).await;
    }

    /// Tries to install `manifest`; on a failure that can pass, schedules the next try.
    async fn attempt(
        &mut self,
        manifest: Manifest,
        mut backoff: Backoff,
        retries: &mut HashMap<String, Retry>,
    ) {
        let model = manifest.model.clone();
        match self.install(manifest.clone()).await {
            Ok(()) => {}
            Err(error) if error.can_pass() => {
                let delay = backoff.fail();
                let version = manifest
                    .version_for(self.ctx.config.device.id.as_str())
                    .version;
                tracing::warn!(model, version, %error, retry_in_ms = delay.as_millis() as u64, "install failed; trying again");
                let at = tokio::time::Instant::now() + delay;
                self.table
                    .retry(&model, version, error.to_string(), at.into_std());
                retries.insert(
                    model,
                    Retry {
                        manifest,
                        backoff,
                        at,
                    },
                );
            }
            Err(error) => self.refused(Some(model), &error),
        }
    }

    fn refused(&mut self, model: Option<String>, error: &InstallError) {
        Counters::count(&self.ctx.counters.rejected);
        tracing::warn!(model = model.as_deref().unwrap_or("?"), %error, "release not installed");
        self.table.refuse(model.as_deref(), error.to_string());
    }

    /// The back-off of a new install: 1 s (or the config's longest wait, if less), doubling to
    /// `sync.install_retry_max_s`.
    fn install_backoff(&self) -> Backoff {
        let max = Duration::from_secs(self.ctx.config.sync.install_retry_max_s.max(1));
        Backoff::new(Duration::from_secs(1).min(max), max)
    }

    fn verify(&self, payload: &[u8]) -> Result<Manifest, InstallError> {
        if payload.is_empty() {
            return Err(InstallError::Empty);
        }
        self.verifier
            .verify_cbor(payload, now())
            .map_err(InstallError::Unverified)
    }

    /// Carries out the plan for a verified release.
    async fn install(&mut self, manifest: Manifest) -> Result<(), InstallError> {
        let store = &self.ctx.store;
        let model = manifest.model.clone();
        let records = store.records()?;
        let mut record = records
            .iter()
            .find(|(name, _)| *name == model)
            .map(|(_, r)| r.clone())
            .unwrap_or_default();
        let kept = KeptChunks::beside(&model, records.iter().map(|(n, r)| (n.as_str(), r)));
        let device = Device {
            id: self.ctx.config.device.id.as_str(),
            follows: &self.ctx.config.sync.models,
        };
        let chunks = store.chunks();
        let plan = plan_install(
            &record,
            &manifest,
            device,
            &self.ctx.config.profile(),
            &kept,
            |id| chunks.contains(id),
        )?;
        crash_point!("installer.planned");
        let expires_at = manifest.expires_at;
        let outcome = match plan {
            Install::Ignore => return Ok(()),
            Install::RecordRelease => {
                record.manifest = Some(manifest);
                store.save(&model, &record).map_err(InstallError::from)
            }
            Install::Switch { target, missing } => {
                self.switch(record, manifest, *target, missing).await
            }
        };
        if outcome.is_ok() {
            self.table.release_accepted(&model, expires_at);
        }
        outcome
    }

    /// Fetches what is missing, loads `target`, and makes it the active version.
    async fn switch(
        &mut self,
        mut record: Record,
        manifest: Manifest,
        target: ModelVersion,
        missing: Vec<ChunkId>,
    ) -> Result<(), InstallError> {
        let model = manifest.model.clone();
        let version = target.version;
        self.table.pending(&model, version);
        crash_point!("installer.switch_pending");
        tracing::info!(
            model,
            version,
            chunks = stored_chunks(&target).count(),
            missing = missing.len(),
            "fetching"
        );
        self.make_room(&model, &mut record, &target, &missing)
            .await?;
        self.fetch(version, &missing).await?;
        crash_point!("installer.fetched");

        let (engines, chunks, loading) = (
            Arc::clone(&self.engines),
            self.ctx.store.chunks().clone(),
            target.clone(),
        );
        let serving = tokio::task::spawn_blocking(move || engines.load(&loading, &chunks))
            .await?
            .map_err(|source| InstallError::Load { version, source })?;
        crash_point!("installer.loaded");

        // Switch: durable record first, then what serves.
        record.previous = record.active.take();
        record.active = Some(target);
        record.manifest = Some(manifest);
        record.installing = None;
        crash_point!("installer.record_saving");
        self.ctx.store.save(&model, &record)?;
        crash_point!("installer.record_saved");
        self.table.switch(&model, serving);
        crash_point!("installer.switched");
        tracing::info!(model, version, "serving");
        crash_point!("installer.gc_starting");

        let store = Arc::clone(&self.ctx.store);
        match tokio::task::spawn_blocking(move || store.collect_garbage()).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!(deleted = n, "deleted chunks no kept version uses")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not delete old chunks"),
            _ => {}
        }
        crash_point!("installer.installed");
        Ok(())
    }

    /// Before a fetch: deletes the chunks of a download this one replaces (and any other chunk
    /// no kept version uses), checks that the missing chunks fit with [`DISK_RESERVE`] to spare,
    /// and records `target` as installing, so its chunks are kept until it serves.
    async fn make_room(
        &self,
        model: &str,
        record: &mut Record,
        target: &ModelVersion,
        missing: &[ChunkId],
    ) -> Result<(), InstallError> {
        let store = Arc::clone(&self.ctx.store);
        let (name, version) = (model.to_owned(), target.clone());
        let collected = tokio::task::spawn_blocking(move || {
            store.collect_garbage_installing(Some((&name, &version)))
        })
        .await?;
        match collected {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "deleted chunks of abandoned downloads"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not delete old chunks"),
        }
        let missing: std::collections::HashSet<&ChunkId> = missing.iter().collect();
        let needed: u64 = stored_chunks(target)
            .filter(|c| missing.contains(&c.id))
            .map(|c| u64::from(c.size))
            .sum();
        match self.ctx.store.available() {
            Ok(available) if available < needed.saturating_add(DISK_RESERVE) => {
                return Err(InstallError::DiskFull {
                    version: target.version,
                    needed,
                    available,
                });
            }
            Ok(_) => {}
            // Where the file system cannot say, the writes will.
            Err(e) => tracing::debug!(error = %e, "free space unknown"),
        }
        if record.installing.as_ref() != Some(target) {
            record.installing = Some(target.clone());
            self.ctx.store.save(model, record)?;
        }
        Ok(())
    }

    /// Fetches `missing` chunks of `version` from the coordinator and stores them.
    async fn fetch(&self, version: u64, missing: &[ChunkId]) -> Result<(), InstallError> {
        for batch in missing.chunks(CHUNKS_PER_REQUEST) {
            crash_point!("installer.fetch_requesting");
            let got = self.ctx.offload.get_chunks(batch.to_vec()).await?;
            crash_point!("installer.fetch_received");
            if got.len() != batch.len() {
                return Err(InstallError::Incomplete {
                    version,
                    missing: batch.len() - got.len(),
                });
            }
            for (id, data) in got {
                self.ctx
                    .store
                    .chunks()
                    .put(&id, &data)
                    .map_err(InstallError::StoreChunk)?;
                crash_point!("installer.chunk_stored");
                self.ctx.counters.fetched(data.len());
            }
        }
        Ok(())
    }
}
