//! The model registry: versions, their variants as chunks, and the signed release of each model.
//!
//! sled holds one record per model (`models` tree) and its current signed manifest (`manifests`
//! tree); model bytes live in the [`ChunkStore`]. Writes are serialised by one lock and flushed
//! before they are announced, so a crash never announces what was not stored.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use outpost_shared::cbor;
use outpost_shared::release::{Candidate, ChunkRef};
use outpost_shared::{
    ChunkId, Manifest, ManifestSigner, ModelFormat, ModelVersion, Placement, Target, TensorSpec,
    Variant,
};
use serde::{Deserialize, Serialize};

use crate::error::RegistryError;
use firmware_config::RegistrySection;
use outpost_runtime::ChunkStore;
use outpost_runtime::accuracy::Tolerance;
use outpost_runtime::tract::TractModel;

mod edge;
mod finetune;
mod report;
mod rollout;
mod shared;
mod text;

use edge::CHECK_ONLY;
pub use finetune::FinetuneSource;
pub use report::{
    Delta, EdgeReport, Fallback, Int8Overrides, KeptWeight, ModelSummary, OffloadCounts, Outcome,
    Published, PushRequest, Quantize, Stage, TextOptions, VariantSummary,
};
use report::{delta, summary};
pub use rollout::{GatedRollout, HISTORY, RolloutAction, RolloutEvent};
pub use shared::{Followed, MAX_SHARED_MODELS, RELEASES_KEPT, SharedStore, follow};
pub use text::{DEFAULT_MAX_TOKENS, DEFAULT_TEXT_INPUT};

const RECORD_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ModelRecord {
    name: String,
    release: u64,
    next_version: u64,
    stable: u64,
    candidate: Option<(u64, u8, String)>,
    versions: Vec<ModelVersion>,
    /// Quantisation figures by version (records written before int8 existed have none).
    #[serde(default)]
    edge_reports: BTreeMap<u64, EdgeReport>,
    /// When the current release was signed (Unix seconds; 0 for records written before
    /// releases expired, which are signed again at start).
    #[serde(default)]
    signed_at: u64,
    /// The last steps of its rollouts (see [`rollout`]).
    #[serde(default)]
    rollout_history: Vec<RolloutEvent>,
    /// The health gate of the candidate's rollout, when it was pushed with `--canary`.
    #[serde(default)]
    gate: Option<firmware_config::RolloutSection>,
    /// The `[[backend]]` that serves each version's offloaded calls, for versions pushed with
    /// `--backend` (the others: the worker pool, or a backend whose `models` list the model).
    #[serde(default)]
    backends: BTreeMap<u64, String>,
}

impl ModelRecord {
    fn version(&self, v: u64) -> Option<&ModelVersion> {
        self.versions.iter().find(|m| m.version == v)
    }

    fn manifest(&self, now: u64, ttl: u64) -> Result<Manifest, RegistryError> {
        let missing = |v| RegistryError::Storage(format!("model {} lost version {v}", self.name));
        let stable = self
            .version(self.stable)
            .ok_or_else(|| missing(self.stable))?
            .clone();
        let candidate = match &self.candidate {
            Some((v, pct, salt)) => Some(Candidate {
                version: self.version(*v).ok_or_else(|| missing(*v))?.clone(),
                rollout_percent: *pct,
                salt: salt.clone(),
            }),
            None => None,
        };
        Ok(Manifest {
            model: self.name.clone(),
            release: self.release,
            created_at: now,
            expires_at: Some(now.saturating_add(ttl)),
            stable,
            candidate,
        })
    }
}

/// The registry: sled metadata, chunk files, the fleet's signer.
pub struct Registry {
    models: sled::Tree,
    manifests: sled::Tree,
    db: sled::Db,
    chunks: ChunkStore,
    signer: ManifestSigner,
    keep_versions: usize,
    tolerance: Tolerance,
    /// The share of quantisable weights the gate's fallback may keep in fp32.
    max_kept_share: f64,
    /// How long a signed release is valid, seconds.
    release_ttl: u64,
    /// The store shared with other coordinator replicas, if any (see [`shared`]).
    shared: Option<shared::Replication>,
    shared_poll: std::time::Duration,
    /// The keys whose releases count as the fleet's: this coordinator's and the other
    /// replicas' (`[registry.shared] manifest_keys`).
    verifier: outpost_shared::ManifestVerifier,
    write: Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_now() -> u64 {
    now()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// Opens the registry in `db` with chunk files in `chunks`, sharing releases through
    /// `shared` when given (the store `options.shared` names).
    pub fn open(
        db: sled::Db,
        chunks: ChunkStore,
        signer: ManifestSigner,
        options: &RegistrySection,
        shared: Option<SharedStore>,
    ) -> Result<Self, RegistryError> {
        let mut keys = vec![signer.public_key()];
        if let Some(section) = &options.shared {
            keys.extend(section.manifest_keys.iter().copied());
        }
        let verifier = outpost_shared::ManifestVerifier::new(keys);
        let shared = match shared {
            Some(store) => Some(shared::Replication {
                store,
                verifier: verifier.clone(),
                // Per store: chunks known to be in one store are not known to be in another.
                known: db.open_tree(format!(
                    "shared_chunks {}",
                    options.shared.as_ref().map_or("", |s| s.url.as_str())
                ))?,
            }),
            None => None,
        };
        Ok(Self {
            models: db.open_tree("models")?,
            manifests: db.open_tree("manifests")?,
            db,
            chunks,
            signer,
            keep_versions: options.keep_versions.max(2) as usize,
            tolerance: Tolerance {
                max_abs_error: options.int8_max_abs_error,
                max_prob_error: options.int8_max_prob_error,
                min_cosine: options.int8_min_cosine,
                min_top1_agreement: options.int8_min_top1_agreement,
            },
            max_kept_share: options.int8_max_kept_share,
            release_ttl: options.release_ttl_s.max(2),
            shared,
            verifier,
            shared_poll: std::time::Duration::from_millis(
                options.shared.as_ref().map_or(1000, |s| s.poll_ms),
            ),
            write: Mutex::new(()),
        })
    }

    /// The chunk files.
    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    fn record(&self, name: &str) -> Result<Option<ModelRecord>, RegistryError> {
        match self.models.get(name)? {
            Some(bytes) => Ok(Some(
                cbor::decode("model record", &bytes, RECORD_LIMIT)
                    .map_err(|e| RegistryError::Storage(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    fn records(&self) -> Result<Vec<ModelRecord>, RegistryError> {
        self.models
            .iter()
            .values()
            .map(|v| {
                let bytes = v?;
                cbor::decode("model record", &bytes, RECORD_LIMIT)
                    .map_err(|e| RegistryError::Storage(e.to_string()))
            })
            .collect()
    }

    /// Validates, optimises, stores, signs and records a new version; returns what happened and
    /// the signed manifest to announce (none for a dry run).
    pub fn push(&self, request: PushRequest) -> Result<Outcome, RegistryError> {
        outpost_shared::topic::validate_name(outpost_shared::topic::NameKind::Model, &request.name)
            .map_err(|e| RegistryError::BadRequest(e.to_string()))?;
        if request.rollout_percent > 100 {
            return Err(RegistryError::BadRequest(format!(
                "rollout {}% is over 100%",
                request.rollout_percent
            )));
        }
        // A model only a backend runs is not loaded here: its file declares the signature
        // (tract may not even load it). Anything devices run, or the push checks by running,
        // is loaded with tract.
        let backend_only = request.backend.is_some()
            && request.placement == Placement::Cloud
            && request.tokenizer.is_none()
            && request.cloud_model.is_none();
        let model = match backend_only {
            true => None,
            false => Some(
                TractModel::load_with(&request.model, CHECK_ONLY)
                    .map_err(|e| RegistryError::BadModel(format!("model: {e}")))?,
            ),
        };
        let (inputs, outputs) = match &model {
            Some(m) => (m.inputs.clone(), m.outputs.clone()),
            None => outpost_runtime::signature::declared_signature(&request.model)
                .map_err(|e| RegistryError::BadModel(format!("model: {e}")))?,
        };
        if let Some(cloud) = &request.cloud_model {
            let cloud = TractModel::load_with(cloud, CHECK_ONLY)
                .map_err(|e| RegistryError::BadModel(format!("cloud model: {e}")))?;
            if cloud.inputs != inputs || cloud.outputs != outputs {
                return Err(RegistryError::BadRequest(format!(
                    "the cloud model's signature differs: it takes {} and gives {}, the model takes {} and gives {}",
                    describe(&cloud.inputs),
                    describe(&cloud.outputs),
                    describe(&inputs),
                    describe(&outputs)
                )));
            }
        }
        if let Placement::Cascade { output, .. } = &request.placement
            && !outputs.iter().any(|o| &o.name == output)
        {
            return Err(RegistryError::BadRequest(format!(
                "cascade output {output:?} is not an output of the model ({})",
                describe(&outputs)
            )));
        }
        // A cascade sends rows to the cloud by their place in the answer.
        if matches!(request.placement, Placement::Cascade { .. })
            && let Some(Ok(graph)) = model.as_ref().map(|m| &m.memory)
            && !graph.answers_by_row()
        {
            return Err(RegistryError::BadRequest(format!(
                "a cascade model must answer a row for each input row, and this one's outputs ({}) do not have its inputs' rows ({})",
                describe(&outputs),
                describe(&inputs)
            )));
        }
        let on_devices = request.placement != Placement::Cloud;
        if let (Some(backend), Placement::Local) = (&request.backend, &request.placement) {
            return Err(RegistryError::BadRequest(format!(
                "backend {backend:?} serves offloaded calls, but placement=local offloads none (use cloud or cascade)"
            )));
        }
        let quantize = request.quantize.unwrap_or(if on_devices {
            Quantize::Int8
        } else {
            Quantize::None
        });
        if quantize == Quantize::Int8 && !on_devices {
            return Err(RegistryError::BadRequest(
                "quantize=int8 makes an edge variant, but placement=cloud runs nothing on devices"
                    .into(),
            ));
        }
        // Loaded above whenever a tokenizer or an edge variant needs it.
        let loaded = || {
            model.as_ref().ok_or_else(|| {
                RegistryError::Storage("the model was not loaded for a step that runs it".into())
            })
        };
        let text = match &request.tokenizer {
            Some(_) => {
                let facts = outpost_runtime::accuracy::GraphFacts::read(&request.model)
                    .map_err(RegistryError::BadModel)?;
                text::text_input(&request, loaded()?, &facts)?
            }
            None => None,
        };
        let (int8_bytes, edge_report) = match quantize {
            Quantize::Int8 => self
                .int8_variant(&request, loaded()?, text.as_ref().map(|(_, t)| t))?
                .unzip(),
            Quantize::None => (None, None),
        };
        drop(model);
        let text = text.map(|(spec, _)| spec);

        let mut sources: Vec<(Target, &[u8])> = Vec::new();
        if on_devices {
            match &int8_bytes {
                Some(bytes) => sources.push((Target::EdgeInt8, bytes)),
                None => sources.push((Target::EdgeFp32, &request.model)),
            }
        }
        match (&request.cloud_model, &request.placement) {
            (Some(cloud), _) => sources.push((Target::CloudFp32, cloud)),
            (None, Placement::Cloud | Placement::Cascade { .. }) => {
                sources.push((Target::CloudFp32, &request.model))
            }
            (None, Placement::Local) => {}
        }
        let variants: Vec<(Variant, &[u8])> = sources
            .iter()
            .map(|(target, bytes)| (Variant::describe(*target, ModelFormat::Onnx, bytes), *bytes))
            .collect();

        let _guard = self
            .write
            .lock()
            .map_err(|_| RegistryError::Storage("registry lock poisoned".into()))?;
        self.catch_up_locked(&request.name)?;
        let mut record = self.record(&request.name)?.unwrap_or(ModelRecord {
            name: request.name.clone(),
            release: 0,
            next_version: 1,
            stable: 0,
            candidate: None,
            versions: Vec::new(),
            edge_reports: BTreeMap::new(),
            signed_at: 0,
            rollout_history: Vec::new(),
            gate: None,
            backends: BTreeMap::new(),
        });
        let stable = record.version(record.stable).cloned();
        let delta: Vec<Delta> = variants
            .iter()
            .map(|(v, _)| delta(v, stable.as_ref()))
            .collect();
        let version = record.next_version;
        let as_candidate = request.rollout_percent < 100 && record.stable > 0;

        // Every file the version stores, as its chunks and bytes: the variants and the tokenizer.
        let mut files: Vec<(&[ChunkRef], &[u8])> = variants
            .iter()
            .map(|(v, bytes)| (v.chunks.as_slice(), *bytes))
            .collect();
        if let (Some(spec), Some(json)) = (&text, &request.tokenizer) {
            files.push((spec.tokenizer.chunks.as_slice(), json.as_slice()));
        }
        if request.dry_run {
            let mut new: HashSet<ChunkId> = HashSet::new();
            for (chunks, _) in &files {
                new.extend(
                    chunks
                        .iter()
                        .map(|c| c.id)
                        .filter(|id| !self.chunks.contains(id)),
                );
            }
            let published = Published {
                model: record.name,
                version,
                release: record.release + 1,
                stage: if as_candidate {
                    Stage::Candidate
                } else {
                    Stage::Stable
                },
                dry_run: true,
                variants: variants.iter().map(|(v, _)| summary(v)).collect(),
                new_chunks: new.len(),
                delta,
                edge: edge_report,
            };
            return Ok((published, None));
        }

        let mut new_chunks = 0;
        for (chunks, bytes) in &files {
            let mut offset = 0usize;
            for c in *chunks {
                let end = offset + c.size as usize;
                let data = bytes
                    .get(offset..end)
                    .ok_or_else(|| RegistryError::Storage("a chunk runs past its file".into()))?;
                if self
                    .chunks
                    .put(&c.id, data)
                    .map_err(|e| RegistryError::Storage(e.to_string()))?
                {
                    new_chunks += 1;
                }
                offset = end;
            }
        }
        crash_point!("registry.chunks_stored");
        record.versions.push(ModelVersion {
            version,
            inputs,
            outputs,
            placement: request.placement,
            max_batch: request.max_batch,
            variants: variants.into_iter().map(|(v, _)| v).collect(),
            text,
        });
        if let Some(report) = &edge_report {
            record.edge_reports.insert(version, report.clone());
        }
        let stage = self.promote(
            &mut record,
            version,
            as_candidate,
            request.rollout_percent,
            &request.known_devices,
        );
        record.gate = if as_candidate { request.gate } else { None };
        if let Some(backend) = request.backend {
            record.backends.insert(version, backend);
        }
        let (mut published, signed) = self.commit(record, version, stage, new_chunks)?;
        published.delta = delta;
        Ok((published, Some(signed)))
    }

    /// Publishes a new version whose content is kept version `to`'s, as stable.
    pub fn rollback(&self, name: &str, to: u64) -> Result<Outcome, RegistryError> {
        let _guard = self
            .write
            .lock()
            .map_err(|_| RegistryError::Storage("registry lock poisoned".into()))?;
        self.catch_up_locked(name)?;
        let mut record = self
            .record(name)?
            .ok_or_else(|| RegistryError::NotFound(format!("no model {name:?}")))?;
        let kept: Vec<u64> = record.versions.iter().map(|v| v.version).collect();
        let old = record.version(to).cloned().ok_or_else(|| {
            RegistryError::NotFound(format!(
                "model {name:?} has no kept version {to} (kept: {kept:?})"
            ))
        })?;
        let version = record.next_version;
        let stable = record.version(record.stable).cloned();
        let delta = old
            .variants
            .iter()
            .map(|v| delta(v, stable.as_ref()))
            .collect();
        if let Some(report) = record.edge_reports.get(&to).cloned() {
            record.edge_reports.insert(version, report);
        }
        if let Some(backend) = record.backends.get(&to).cloned() {
            record.backends.insert(version, backend);
        }
        record.versions.push(ModelVersion { version, ..old });
        let stage = self.promote(&mut record, version, false, 100, &[]);
        record.gate = None;
        let (mut published, signed) = self.commit(record, version, stage, 0)?;
        published.delta = delta;
        Ok((published, Some(signed)))
    }

    fn promote(
        &self,
        record: &mut ModelRecord,
        version: u64,
        as_candidate: bool,
        percent: u8,
        known_devices: &[String],
    ) -> Stage {
        record.next_version = version + 1;
        record.release += 1;
        if as_candidate {
            let devices: Vec<&str> = known_devices.iter().map(String::as_str).collect();
            let salt = outpost_shared::rollout::choose_salt(
                &format!("{}-{version}", record.name),
                &devices,
                percent,
            );
            record.candidate = Some((version, percent, salt));
            rollout::note(record, version, "candidate", percent, "pushed");
            Stage::Candidate
        } else {
            record.stable = version;
            record.candidate = None;
            Stage::Stable
        }
    }

    fn commit(
        &self,
        mut record: ModelRecord,
        version: u64,
        stage: Stage,
        new_chunks: usize,
    ) -> Result<(Published, Vec<u8>), RegistryError> {
        // Keep the newest versions, and always the stable and candidate ones.
        let live = |v: u64, r: &ModelRecord| {
            v == r.stable || r.candidate.as_ref().is_some_and(|c| c.0 == v)
        };
        while record.versions.len() > self.keep_versions {
            let Some(i) = record
                .versions
                .iter()
                .position(|v| !live(v.version, &record))
            else {
                break;
            };
            let gone = record.versions.remove(i);
            record.edge_reports.remove(&gone.version);
            record.backends.remove(&gone.version);
        }
        let bytes = self.sign_and_store(&mut record)?;
        crash_point!("registry.record_committed");
        self.db.flush()?;
        crash_point!("registry.flushed");
        self.collect_garbage()?;
        let stored = record
            .version(version)
            .map(|v| v.variants.clone())
            .unwrap_or_default();
        let published = Published {
            model: record.name.clone(),
            version,
            release: record.release,
            stage,
            dry_run: false,
            variants: stored.iter().map(summary).collect(),
            new_chunks,
            delta: Vec::new(),
            edge: record.edge_reports.get(&version).cloned(),
        };
        Ok((published, bytes))
    }

    /// Signs `record`'s current release (valid for the release TTL from now) and writes the
    /// record and its signed manifest together, or not at all: a crash between two inserts
    /// must not leave a manifest that announces a version the record lacks. The signed bytes.
    fn sign_and_store(&self, record: &mut ModelRecord) -> Result<Vec<u8>, RegistryError> {
        let now = now();
        record.signed_at = now;
        let manifest = record.manifest(now, self.release_ttl)?;
        let signed = self
            .signer
            .sign(&manifest)
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        let bytes = signed
            .to_cbor()
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        let encoded = cbor::encode("model record", &*record, RECORD_LIMIT)
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        if let Some(shared) = &self.shared {
            self.publish_shared(shared, record, &encoded, &bytes)?;
        }
        use sled::Transactional as _;
        (&self.models, &self.manifests)
            .transaction(|(models, manifests)| {
                models.insert(record.name.as_bytes(), encoded.as_slice())?;
                manifests.insert(record.name.as_bytes(), bytes.as_slice())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| RegistryError::Storage(format!("writing model record: {e:?}")))?;
        Ok(bytes)
    }

    /// How long a signed release is valid, seconds.
    pub fn release_ttl(&self) -> u64 {
        self.release_ttl
    }

    /// Signs again, as a new release number with the same content, every current release that
    /// has less than half its time left (and any signed before releases expired); returns them
    /// to announce. Agents record such a release without fetching or switching anything.
    pub fn refresh(&self) -> Result<Vec<(String, Vec<u8>)>, RegistryError> {
        let _guard = self
            .write
            .lock()
            .map_err(|_| RegistryError::Storage("registry lock poisoned".into()))?;
        let due = now().saturating_sub(self.release_ttl / 2);
        let mut refreshed = Vec::new();
        for record in self.records()? {
            if record.signed_at > due {
                continue;
            }
            // Another replica may have signed it again already. A model whose store records
            // cannot be read is still signed again here (its devices must not see it expire).
            if let Err(e) = self.catch_up_locked(&record.name) {
                tracing::error!(model = record.name, error = %e, "could not catch up before signing again");
            }
            let Some(mut record) = self.record(&record.name)? else {
                continue;
            };
            if record.signed_at > due {
                continue;
            }
            record.release += 1;
            match self.sign_and_store(&mut record) {
                Ok(bytes) => refreshed.push((record.name.clone(), bytes)),
                Err(RegistryError::Conflict(reason)) => {
                    tracing::info!(
                        model = record.name,
                        reason,
                        "another replica signed it again"
                    );
                }
                // The others are still signed again.
                Err(e) => {
                    tracing::error!(model = record.name, error = %e, "could not sign the release again");
                }
            }
        }
        if !refreshed.is_empty() {
            self.db.flush()?;
        }
        Ok(refreshed)
    }

    /// Deletes chunks that no kept version of any model references.
    fn collect_garbage(&self) -> Result<(), RegistryError> {
        let mut referenced = HashSet::new();
        for record in self.records()? {
            for v in &record.versions {
                for variant in &v.variants {
                    referenced.extend(variant.chunks.iter().map(|c| c.id));
                }
                referenced.extend(v.extra_chunks().map(|c| c.id));
            }
        }
        crash_point!("registry.gc_listed");
        let deleted = self
            .chunks
            .retain(|id| referenced.contains(id))
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        crash_point!("registry.gc_done");
        if let Some(shared) = &self.shared {
            for id in shared.known.iter().keys() {
                let id = id?;
                let known = <[u8; 32]>::try_from(id.as_ref())
                    .map(ChunkId::from_bytes)
                    .is_ok_and(|c| referenced.contains(&c));
                if !known {
                    shared.known.remove(id)?;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "deleted chunks no kept version references");
        }
        Ok(())
    }

    /// Whether `payload`, a signed manifest of `model` seen on the broker, is a newer release
    /// than the one here and signed by a trusted key: another replica's, not to be announced
    /// over (replicas would otherwise take turns replacing each other's release).
    pub fn is_newer_release(&self, model: &str, payload: &[u8]) -> bool {
        let Ok(manifest) = self.verifier.verify_cbor(payload, now()) else {
            return false;
        };
        let here = self.record(model).ok().flatten().map_or(0, |r| r.release);
        manifest.model == model && manifest.release > here
    }

    /// Model `model`'s current signed release, if it has one.
    pub fn signed_manifest(&self, model: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        Ok(self.manifests.get(model)?.map(|v| v.to_vec()))
    }

    /// Every model's current signed manifest (CBOR), to (re)publish.
    pub fn signed_manifests(&self) -> Result<Vec<(String, Vec<u8>)>, RegistryError> {
        self.manifests
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    /// The models, for listings.
    pub fn list(&self) -> Result<Vec<ModelSummary>, RegistryError> {
        self.records()?
            .into_iter()
            .map(|r| {
                let stable = r.version(r.stable).ok_or_else(|| {
                    RegistryError::Storage(format!("model {} lost its stable version", r.name))
                })?;
                Ok(ModelSummary {
                    name: r.name.clone(),
                    release: r.release,
                    stable: r.stable,
                    candidate: r.candidate.as_ref().map(|c| (c.0, c.1)),
                    versions: r.versions.iter().map(|v| v.version).collect(),
                    inputs: stable.inputs.clone(),
                    outputs: stable.outputs.clone(),
                    placement: stable.placement.clone(),
                    text: stable.text.clone(),
                    variants: stable.variants.iter().map(summary).collect(),
                    edge: r.edge_reports.get(&r.stable).cloned(),
                    rollout_history: r.rollout_history.clone(),
                    gate: r.gate.clone(),
                    backend: r.backends.get(&r.stable).cloned(),
                    offloaded: OffloadCounts::default(),
                })
            })
            .collect()
    }

    /// The stable version of `model`.
    pub fn stable_version(&self, model: &str) -> Result<u64, RegistryError> {
        self.record(model)?
            .map(|r| r.stable)
            .ok_or_else(|| RegistryError::NotFound(format!("no model {model:?}")))
    }

    /// Where a call of `model` `version` (default: the stable one) goes: the version, and the
    /// backend that version was pushed to (`None`: the worker pool, or a backend whose `models`
    /// list the model).
    pub fn routing(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<(u64, Option<String>), RegistryError> {
        let mut record = self
            .record(model)?
            .ok_or_else(|| RegistryError::NotFound(format!("no model {model:?}")))?;
        let version = version.unwrap_or(record.stable);
        if record.version(version).is_none() {
            return Err(RegistryError::NotFound(format!(
                "model {model:?} has no version {version}"
            )));
        }
        Ok((version, record.backends.remove(&version)))
    }

    /// The bytes the coordinator runs for `model` version `version` (its cloud variant, or its
    /// edge variant when it has no cloud one), and the version's `max_batch`.
    pub fn serving(
        &self,
        model: &str,
        version: u64,
    ) -> Result<(Vec<u8>, Option<u64>), RegistryError> {
        let record = self
            .record(model)?
            .ok_or_else(|| RegistryError::NotFound(format!("no model {model:?}")))?;
        let v = record.version(version).ok_or_else(|| {
            RegistryError::NotFound(format!("model {model:?} has no version {version}"))
        })?;
        let variant = v
            .variant(Target::CloudFp32)
            .or_else(|| v.variant(Target::EdgeFp32))
            .or_else(|| v.variant(Target::EdgeInt8))
            .or_else(|| v.variants.first())
            .ok_or_else(|| {
                RegistryError::NotFound(format!("model {model:?} version {version} has no variant"))
            })?;
        let bytes = self
            .chunks
            .assemble(variant)
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        Ok((bytes, v.max_batch))
    }

    /// A stored chunk.
    pub fn chunk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.chunks.get(id)
    }
}

fn describe(specs: &[TensorSpec]) -> String {
    let parts: Vec<String> = specs
        .iter()
        .map(|s| {
            let dims: Vec<String> = s.shape.iter().map(|d| i64::from(*d).to_string()).collect();
            format!("{} {}[{}]", s.name, s.datatype, dims.join(","))
        })
        .collect();
    parts.join(", ")
}
