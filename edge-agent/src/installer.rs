//! The installer: the one task that changes what the agent serves. It owns the serving table
//! ([`ServingTable`]) and writes the model records. For each release, in order: verify the
//! signature, decide with [`plan_install`] (anything refused changes nothing and is counted and
//! reported), fetch over QUIC only the chunks not already stored (so a restarted agent resumes),
//! assemble, load and warm up, then switch: the record first, flushed, then the table, in one
//! published snapshot. The previous version keeps serving until the switch.

use std::sync::Arc;

use outpost_shared::{ChunkId, Manifest, ManifestError, ManifestVerifier, ModelVersion};
use rumqttc::AsyncClient;
use tokio::sync::mpsc;

use crate::Context;
use crate::counters::Counters;
use crate::engines::{Engines, LoadError, local_variant};
use crate::offload::OffloadError;
use crate::plan::{Device, Install, KeptChunks, Refusal, plan_install};
use crate::serving::ServingTable;
use crate::status::now;
use crate::store::{Record, StoreError};

/// Chunks asked for in one request.
const CHUNKS_PER_REQUEST: usize = 32;

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
    /// longer serve is dropped from its record (the next release brings one). Blocking.
    pub(crate) fn load_cached(&mut self) -> Result<(), StoreError> {
        let store = &self.ctx.store;
        for (model, record) in store.records()? {
            let Some(active) = &record.active else {
                continue;
            };
            match self.engines.load(active, store.chunks()) {
                Ok(serving) => {
                    self.table.serve_cached(&model, serving);
                    tracing::info!(model, version = active.version, "serving from cache");
                }
                Err(e) => {
                    tracing::warn!(model, error = %e, "cached model cannot serve; waiting for the next release");
                    let record = Record {
                        active: None,
                        ..record.clone()
                    };
                    store.save(&model, &record)?;
                }
            }
        }
        Ok(())
    }

    /// Installs releases one at a time, publishing the status after each.
    pub(crate) async fn run(mut self, client: AsyncClient, mut manifests: mpsc::Receiver<Vec<u8>>) {
        while let Some(payload) = manifests.recv().await {
            let outcome = match self.verify(&payload) {
                Ok(manifest) => {
                    let model = manifest.model.clone();
                    self.install(manifest).await.map_err(|e| (Some(model), e))
                }
                Err(e) => Err((None, e)),
            };
            if let Err((model, error)) = outcome {
                Counters::count(&self.ctx.counters.rejected);
                tracing::warn!(model = model.as_deref().unwrap_or("?"), %error, "release not installed");
                self.table.refuse(model.as_deref(), error.to_string());
            }
            crate::sync::publish_status(&self.ctx, &client).await;
        }
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
        match plan {
            Install::Ignore => Ok(()),
            Install::RecordRelease => {
                record.manifest = Some(manifest);
                Ok(store.save(&model, &record)?)
            }
            Install::Switch { target, missing } => {
                self.switch(record, manifest, target, missing).await
            }
        }
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
        tracing::info!(
            model,
            version,
            chunks = local_variant(&target).map_or(0, |v| v.chunks.len()),
            missing = missing.len(),
            "fetching"
        );
        self.fetch(version, &missing).await?;

        let (engines, chunks, loading) = (
            Arc::clone(&self.engines),
            self.ctx.store.chunks().clone(),
            target.clone(),
        );
        let serving = tokio::task::spawn_blocking(move || engines.load(&loading, &chunks))
            .await?
            .map_err(|source| InstallError::Load { version, source })?;

        // Switch: durable record first, then what serves.
        record.previous = record.active.take();
        record.active = Some(target);
        record.manifest = Some(manifest);
        self.ctx.store.save(&model, &record)?;
        self.table.switch(&model, serving);
        tracing::info!(model, version, "serving");

        let store = Arc::clone(&self.ctx.store);
        match tokio::task::spawn_blocking(move || store.collect_garbage()).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!(deleted = n, "deleted chunks no kept version uses")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not delete old chunks"),
            _ => {}
        }
        Ok(())
    }

    /// Fetches `missing` chunks of `version` from the coordinator and stores them.
    async fn fetch(&self, version: u64, missing: &[ChunkId]) -> Result<(), InstallError> {
        for batch in missing.chunks(CHUNKS_PER_REQUEST) {
            let got = self.ctx.offload.get_chunks(batch.to_vec()).await?;
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
                self.ctx.counters.fetched(data.len());
            }
        }
        Ok(())
    }
}
