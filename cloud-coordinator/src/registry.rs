//! The model registry: versions, their variants as chunks, and the signed release of each model.
//!
//! sled holds one record per model (`models` tree) and its current signed manifest (`manifests`
//! tree); model bytes live in the [`ChunkStore`]. Writes are serialised by one lock and flushed
//! before they are announced, so a crash never announces what was not stored.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use outpost_shared::cbor;
use outpost_shared::manifest::Candidate;
use outpost_shared::{
    ChunkId, Manifest, ManifestSigner, ModelFormat, ModelVersion, Placement, Target, TensorSpec,
    Variant, chunk,
};
use serde::{Deserialize, Serialize};

use crate::error::RegistryError;
use outpost_runtime::ChunkStore;
use outpost_runtime::tract as onnx;

const RECORD_LIMIT: usize = 64 * 1024 * 1024;

/// What an operator asks to publish.
#[derive(Debug, Clone)]
pub struct PushRequest {
    /// The model's name.
    pub name: String,
    /// The model file (runs on devices, or in the cloud for `cloud` placement).
    pub model: Vec<u8>,
    /// An optional bigger model with the same signature, run by the coordinator.
    pub cloud_model: Option<Vec<u8>>,
    /// Where inference runs.
    pub placement: Placement,
    /// The share of devices that get this version first (100: everyone, at once).
    pub rollout_percent: u8,
    /// Weight quantisation of the edge variant.
    pub quantize: Quantize,
}

/// Weight quantisation of the edge variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// Keep fp32 weights.
    None,
    /// Weight-only int8 (not built yet).
    Int8,
}

/// The answer to a push or rollback.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// The model.
    pub model: String,
    /// The new model version.
    pub version: u64,
    /// The release number of the new manifest.
    pub release: u64,
    /// Whether the version is stable or a candidate.
    pub stage: &'static str,
    /// Each variant's target and size.
    pub variants: Vec<VariantSummary>,
    /// Chunks stored by this push that were not stored before.
    pub new_chunks: usize,
}

/// A variant in listings.
#[derive(Debug, Clone, Serialize)]
pub struct VariantSummary {
    /// Its target.
    pub target: Target,
    /// Its size in bytes.
    pub size: u64,
    /// How many chunks.
    pub chunks: usize,
}

/// A model in `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// The model.
    pub name: String,
    /// Current release number.
    pub release: u64,
    /// The stable version.
    pub stable: u64,
    /// The candidate version and its rollout share.
    pub candidate: Option<(u64, u8)>,
    /// Kept versions, oldest first.
    pub versions: Vec<u64>,
    /// The signature.
    pub inputs: Vec<TensorSpec>,
    /// The outputs.
    pub outputs: Vec<TensorSpec>,
    /// The stable version's placement.
    pub placement: Placement,
    /// The stable version's variants.
    pub variants: Vec<VariantSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ModelRecord {
    name: String,
    release: u64,
    next_version: u64,
    stable: u64,
    candidate: Option<(u64, u8, String)>,
    versions: Vec<ModelVersion>,
}

impl ModelRecord {
    fn version(&self, v: u64) -> Option<&ModelVersion> {
        self.versions.iter().find(|m| m.version == v)
    }

    fn manifest(&self, now: u64) -> Result<Manifest, RegistryError> {
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
            expires_at: None,
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
    write: Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// Opens the registry in `db` with chunk files in `chunks`.
    pub fn open(
        db: sled::Db,
        chunks: ChunkStore,
        signer: ManifestSigner,
        keep_versions: u32,
    ) -> Result<Self, sled::Error> {
        Ok(Self {
            models: db.open_tree("models")?,
            manifests: db.open_tree("manifests")?,
            db,
            chunks,
            signer,
            keep_versions: keep_versions.max(2) as usize,
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

    /// Validates, stores, signs and records a new version; returns what to announce.
    pub fn push(&self, request: PushRequest) -> Result<(Published, Vec<u8>), RegistryError> {
        outpost_shared::topic::validate_name(outpost_shared::topic::NameKind::Model, &request.name)
            .map_err(|e| RegistryError::BadRequest(e.to_string()))?;
        if request.rollout_percent > 100 {
            return Err(RegistryError::BadRequest(format!(
                "rollout {}% is over 100%",
                request.rollout_percent
            )));
        }
        if request.quantize == Quantize::Int8 {
            return Err(RegistryError::NotBuilt(
                "int8 quantisation is not built yet (issue 5); push with quantize=none".into(),
            ));
        }
        let (_, inputs, outputs) = onnx::load(&request.model)
            .map_err(|e| RegistryError::BadModel(format!("model: {e}")))?;
        if let Some(cloud) = &request.cloud_model {
            let (_, cloud_inputs, cloud_outputs) = onnx::load(cloud)
                .map_err(|e| RegistryError::BadModel(format!("cloud model: {e}")))?;
            if cloud_inputs != inputs || cloud_outputs != outputs {
                return Err(RegistryError::BadRequest(format!(
                    "the cloud model's signature differs: it takes {} and gives {}, the model takes {} and gives {}",
                    describe(&cloud_inputs),
                    describe(&cloud_outputs),
                    describe(&inputs),
                    describe(&outputs)
                )));
            }
        }
        if let Placement::Cascade { output, .. } = &request.placement {
            if !outputs.iter().any(|o| &o.name == output) {
                return Err(RegistryError::BadRequest(format!(
                    "cascade output {output:?} is not an output of the model ({})",
                    describe(&outputs)
                )));
            }
        }
        let mut sources: Vec<(Target, &[u8])> = Vec::new();
        if request.placement != Placement::Cloud {
            sources.push((Target::EdgeFp32, &request.model));
        }
        match (&request.cloud_model, &request.placement) {
            (Some(cloud), _) => sources.push((Target::CloudFp32, cloud)),
            (None, Placement::Cloud | Placement::Cascade { .. }) => {
                sources.push((Target::CloudFp32, &request.model))
            }
            (None, Placement::Local) => {}
        }

        let _guard = self
            .write
            .lock()
            .map_err(|_| RegistryError::Storage("registry lock poisoned".into()))?;
        let mut new_chunks = 0;
        let mut variants = Vec::new();
        for (target, bytes) in sources {
            for span in chunk::split(bytes) {
                if self
                    .chunks
                    .put(&span.id, span.bytes(bytes))
                    .map_err(|e| RegistryError::Storage(e.to_string()))?
                {
                    new_chunks += 1;
                }
            }
            variants.push(Variant::describe(target, ModelFormat::Onnx, bytes));
        }
        let mut record = self.record(&request.name)?.unwrap_or(ModelRecord {
            name: request.name.clone(),
            release: 0,
            next_version: 1,
            stable: 0,
            candidate: None,
            versions: Vec::new(),
        });
        let version = record.next_version;
        let as_candidate = request.rollout_percent < 100 && record.stable > 0;
        record.versions.push(ModelVersion {
            version,
            inputs,
            outputs,
            placement: request.placement,
            variants,
        });
        let stage = self.promote(&mut record, version, as_candidate, request.rollout_percent);
        self.commit(record, version, stage, new_chunks)
    }

    /// Publishes a new version whose content is kept version `to`'s, as stable.
    pub fn rollback(&self, name: &str, to: u64) -> Result<(Published, Vec<u8>), RegistryError> {
        let _guard = self
            .write
            .lock()
            .map_err(|_| RegistryError::Storage("registry lock poisoned".into()))?;
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
        record.versions.push(ModelVersion { version, ..old });
        let stage = self.promote(&mut record, version, false, 100);
        self.commit(record, version, stage, 0)
    }

    fn promote(
        &self,
        record: &mut ModelRecord,
        version: u64,
        as_candidate: bool,
        percent: u8,
    ) -> &'static str {
        record.next_version = version + 1;
        record.release += 1;
        if as_candidate {
            record.candidate = Some((version, percent, format!("{}-{version}", record.name)));
            "candidate"
        } else {
            record.stable = version;
            record.candidate = None;
            "stable"
        }
    }

    fn commit(
        &self,
        mut record: ModelRecord,
        version: u64,
        stage: &'static str,
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
            record.versions.remove(i);
        }
        let manifest = record.manifest(now())?;
        let signed = self
            .signer
            .sign(&manifest)
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        let bytes = signed
            .to_cbor()
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        let encoded = cbor::encode("model record", &record, RECORD_LIMIT)
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        self.models.insert(record.name.as_bytes(), encoded)?;
        self.manifests
            .insert(record.name.as_bytes(), bytes.clone())?;
        self.db.flush()?;
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
            variants: stored.iter().map(summary).collect(),
            new_chunks,
        };
        Ok((published, bytes))
    }

    /// Deletes chunks that no kept version of any model references.
    fn collect_garbage(&self) -> Result<(), RegistryError> {
        let mut referenced = HashSet::new();
        for record in self.records()? {
            for v in &record.versions {
                for variant in &v.variants {
                    referenced.extend(variant.chunks.iter().map(|c| c.id));
                }
            }
        }
        let deleted = self
            .chunks
            .retain(|id| referenced.contains(id))
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        if deleted > 0 {
            tracing::info!(deleted, "deleted chunks no kept version references");
        }
        Ok(())
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
                    variants: stable.variants.iter().map(summary).collect(),
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

    /// The bytes the coordinator runs for `model` version `version`: its cloud variant, or its
    /// edge variant when it has no cloud one.
    pub fn serving_bytes(&self, model: &str, version: u64) -> Result<Vec<u8>, RegistryError> {
        let record = self
            .record(model)?
            .ok_or_else(|| RegistryError::NotFound(format!("no model {model:?}")))?;
        let v = record.version(version).ok_or_else(|| {
            RegistryError::NotFound(format!("model {model:?} has no version {version}"))
        })?;
        let variant = v
            .variant(Target::CloudFp32)
            .or_else(|| v.variant(Target::EdgeFp32))
            .or_else(|| v.variants.first())
            .ok_or_else(|| {
                RegistryError::NotFound(format!("model {model:?} version {version} has no variant"))
            })?;
        let mut bytes = Vec::with_capacity(usize::try_from(variant.size).unwrap_or(0));
        for c in &variant.chunks {
            let data = self
                .chunk(&c.id)
                .ok_or_else(|| RegistryError::Storage(format!("chunk {} is missing", c.id)))?;
            bytes.extend_from_slice(&data);
        }
        variant
            .digest
            .verify(&bytes)
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        Ok(bytes)
    }

    /// A stored chunk.
    pub fn chunk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.chunks.get(id)
    }
}

fn summary(v: &Variant) -> VariantSummary {
    VariantSummary {
        target: v.target,
        size: v.size,
        chunks: v.chunks.len(),
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
