//! What the agent serves and keeps: the loaded models (in memory) and their durable record (sled:
//! the last accepted release and the active and previous versions of each model; the bytes are
//! chunk files).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use outpost_gpu::{GpuContext, GpuModel};
use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_runtime::{ChunkStore, Engine};
use outpost_shared::{Manifest, ModelVersion, Placement, Target, Variant, cbor};
use serde::{Deserialize, Serialize};

const RECORD_LIMIT: usize = 64 * 1024 * 1024;

/// One version of a model, ready to answer.
#[derive(Debug)]
pub struct Serving {
    /// The version and its signature, placement and variants.
    pub version: ModelVersion,
    /// The local engine; `None` for a cloud-only model.
    pub engine: Option<Arc<dyn Engine>>,
    /// The GPU adapter running it (`"name (backend)"`), when the engine is the GPU.
    pub adapter: Option<String>,
    /// Why a locally run model is not on the GPU.
    pub gpu_fallback: Option<String>,
}

/// The GPU this agent may use, or why it uses none.
#[derive(Debug, Clone)]
pub enum LocalGpu {
    /// Models go to the GPU when its kernels cover them.
    Ready(Arc<GpuContext>),
    /// Every local model runs on tract, for this reason.
    Absent(String),
}

/// A model's slot: what serves now, what served before, and what went wrong last.
#[derive(Debug, Clone, Default)]
pub struct Slot {
    /// Serving now.
    pub active: Option<Arc<Serving>>,
    /// Kept for rollback.
    pub previous: Option<Arc<Serving>>,
    /// Being fetched or loaded.
    pub pending: Option<u64>,
    /// Why the last release was not installed (or was refused).
    pub last_error: Option<String>,
}

/// The durable record of a model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// The last release accepted (verified when received).
    pub manifest: Option<Manifest>,
    /// The active version.
    pub active: Option<ModelVersion>,
    /// The previous version.
    pub previous: Option<ModelVersion>,
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Inferences answered on the device.
    pub local: AtomicU64,
    /// Inferences (or rows) answered by the coordinator.
    pub offloaded: AtomicU64,
    /// Failed inferences.
    pub errors: AtomicU64,
    /// Refused manifests.
    pub rejected: AtomicU64,
    /// Chunks fetched.
    pub chunks: AtomicU64,
    /// Bytes fetched.
    pub bytes: AtomicU64,
}

/// Models in memory and on disk.
#[derive(Debug)]
pub struct Store {
    /// In memory, by name.
    pub slots: RwLock<BTreeMap<String, Slot>>,
    /// sled: name → [`Record`].
    pub records: sled::Tree,
    /// The database (flushed after every change).
    pub db: sled::Db,
    /// Model bytes.
    pub chunks: ChunkStore,
    /// Counters.
    pub counters: Counters,
    /// How local models run on tract (threads from the device profile).
    pub engine_options: TractOptions,
    /// The GPU, if local models may use one.
    pub gpu: LocalGpu,
}

/// The variant a device runs locally, if any.
pub fn local_variant(version: &ModelVersion) -> Option<&Variant> {
    if version.placement == Placement::Cloud {
        return None;
    }
    version
        .variant(Target::EdgeInt8)
        .or_else(|| version.variant(Target::EdgeFp32))
}

impl Store {
    /// The record of `model`.
    pub fn record(&self, model: &str) -> Result<Record, String> {
        match self.records.get(model).map_err(|e| e.to_string())? {
            Some(bytes) => {
                cbor::decode("model record", &bytes, RECORD_LIMIT).map_err(|e| e.to_string())
            }
            None => Ok(Record::default()),
        }
    }

    /// Writes `record` and flushes, so it survives a crash.
    pub fn save(&self, model: &str, record: &Record) -> Result<(), String> {
        let bytes =
            cbor::encode("model record", record, RECORD_LIMIT).map_err(|e| e.to_string())?;
        self.records
            .insert(model, bytes)
            .map_err(|e| e.to_string())?;
        self.db.flush().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Every record.
    pub fn records(&self) -> Result<Vec<(String, Record)>, String> {
        self.records
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| e.to_string())?;
                let record =
                    cbor::decode("model record", &v, RECORD_LIMIT).map_err(|e| e.to_string())?;
                Ok((String::from_utf8_lossy(&k).into_owned(), record))
            })
            .collect()
    }

    /// Assembles a variant from stored chunks and checks its digest.
    pub fn assemble(&self, variant: &Variant) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::with_capacity(usize::try_from(variant.size).unwrap_or(0));
        for c in &variant.chunks {
            let data = self
                .chunks
                .get(&c.id)
                .ok_or_else(|| format!("chunk {} is missing", c.id))?;
            bytes.extend_from_slice(&data);
        }
        variant.digest.verify(&bytes).map_err(|e| e.to_string())?;
        Ok(bytes)
    }

    /// Loads a version for serving: its local engine (warmed up), or none for cloud-only.
    pub fn load(&self, version: &ModelVersion) -> Result<Serving, String> {
        let Some(variant) = local_variant(version) else {
            return Ok(Serving {
                version: version.clone(),
                engine: None,
                adapter: None,
                gpu_fallback: None,
            });
        };
        let bytes = self.assemble(variant)?;
        let fallback = match &self.gpu {
            LocalGpu::Ready(gpu) => match GpuModel::load(&bytes, Arc::clone(gpu)) {
                // The warm-up also proves the GPU runs it before it serves.
                Ok(model) => match model.warm_up() {
                    Ok(()) => {
                        let a = model.adapter();
                        return Ok(Serving {
                            version: version.clone(),
                            adapter: Some(format!("{} ({})", a.name, a.backend)),
                            engine: Some(Arc::new(model)),
                            gpu_fallback: None,
                        });
                    }
                    Err(e) => format!("the GPU failed the warm-up: {e}"),
                },
                Err(e) => e.to_string(),
            },
            LocalGpu::Absent(why) => why.clone(),
        };
        if matches!(self.gpu, LocalGpu::Ready(_)) {
            tracing::info!(version = version.version, reason = %fallback, "running on tract, not the GPU");
        }
        let model: Arc<dyn Engine> = Arc::new(TractModel::load_with(&bytes, self.engine_options)?);
        // A model that cannot run zeros is not worth serving.
        model.warm_up()?;
        Ok(Serving {
            version: version.clone(),
            engine: Some(model),
            adapter: None,
            gpu_fallback: Some(fallback),
        })
    }

    /// The bytes of model chunks this device would keep once `variant` becomes the active
    /// version of `model`: its active version turns previous, its previous is dropped, every
    /// other model keeps both. A chunk shared by versions counts once.
    pub fn bytes_kept_after(&self, model: &str, variant: &Variant) -> Result<u64, String> {
        let mut kept: std::collections::HashMap<outpost_shared::ChunkId, u32> =
            std::collections::HashMap::new();
        let mut add = |v: &Variant| {
            for c in &v.chunks {
                kept.insert(c.id, c.size);
            }
        };
        add(variant);
        for (name, record) in self.records()? {
            let versions: Vec<&ModelVersion> = if name == model {
                record.active.iter().collect()
            } else {
                record.active.iter().chain(record.previous.iter()).collect()
            };
            for v in versions.into_iter().filter_map(local_variant) {
                add(v);
            }
        }
        Ok(kept.values().map(|&n| u64::from(n)).sum())
    }

    /// Deletes chunks that no active or previous version references.
    pub fn collect_garbage(&self) -> Result<usize, String> {
        let mut keep = std::collections::HashSet::new();
        for (_, record) in self.records()? {
            for v in record.active.iter().chain(record.previous.iter()) {
                for variant in &v.variants {
                    keep.extend(variant.chunks.iter().map(|c| c.id));
                }
            }
        }
        self.chunks
            .retain(|id| keep.contains(id))
            .map_err(|e| e.to_string())
    }
}
