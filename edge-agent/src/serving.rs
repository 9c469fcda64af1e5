//! What the agent serves: the table of loaded models, by name. The installer owns it
//! ([`ServingTable`]) and is its only writer; after every change it publishes the whole table as
//! one immutable snapshot ([`Models`]) on a `watch` channel. The API and the status read a
//! snapshot, so a reader sees a switch entirely or not at all, and no write can be lost to a
//! poisoned lock.

use std::collections::BTreeMap;
use std::sync::Arc;

use outpost_runtime::Engine;
use outpost_runtime::admission::{Admission, AdmissionLimits};
use outpost_runtime::graph_memory::GraphMemory;
use outpost_runtime::text::TextTokenizer;
use outpost_shared::ModelVersion;
use tokio::sync::watch;

/// A cloud-only version runs nothing locally (the offload client bounds its own calls).
const CLOUD_ONLY: AdmissionLimits = AdmissionLimits {
    running: 1,
    waiting: 0,
};

/// What a loaded engine is taken to hold, as a multiple of its model file: the weights as the
/// engine keeps them, and its plans and buffers. An estimate (engines do not report their
/// memory); it is what the profile's `memory_budget_mb` is held against.
pub(crate) const ENGINE_MEMORY_FACTOR: u64 = 2;

/// One version of a model, ready to answer.
#[derive(Debug)]
pub(crate) struct Serving {
    /// The version and its signature, placement and variants.
    pub(crate) version: ModelVersion,
    /// The local engine; `None` for a cloud-only model.
    pub(crate) engine: Option<Arc<dyn Engine>>,
    /// The GPU adapter running it (`"name (backend)"`), when the engine is the GPU.
    pub(crate) adapter: Option<String>,
    /// Why a locally run model is not on the GPU.
    pub(crate) gpu_fallback: Option<String>,
    /// Why a model the CPU runs is on tract though the config names ONNX Runtime.
    pub(crate) cpu_fallback: Option<String>,
    /// How many local calls of this version run and wait at once.
    pub(crate) admission: Admission,
    /// The memory its engine is taken to hold ([`ENGINE_MEMORY_FACTOR`]), bytes; 0 in the cloud.
    pub(crate) memory: u64,
    /// The tokenizer of its text input, when the version takes text.
    pub(crate) text: Option<Arc<TextTokenizer>>,
    /// What its graph says of a call's working memory and id ranges, or why it cannot say
    /// (then calls are bounded by their size only); `None` in the cloud.
    pub(crate) graph: Option<Result<Arc<GraphMemory>, String>>,
    /// The class names the model carries (`outpost.labels`), for the classification extension.
    pub(crate) labels: Vec<String>,
}

impl Serving {
    /// A version that runs only in the cloud.
    pub(crate) fn cloud_only(version: &ModelVersion) -> Self {
        Self::local(version, None, CLOUD_ONLY)
    }

    /// A version answered by `engine` (`None`: in the cloud), within `limits`.
    pub(crate) fn local(
        version: &ModelVersion,
        engine: Option<Arc<dyn Engine>>,
        limits: AdmissionLimits,
    ) -> Self {
        let memory = match &engine {
            Some(_) => crate::engines::local_variant(version)
                .map_or(0, |v| v.size.saturating_mul(ENGINE_MEMORY_FACTOR)),
            None => 0,
        };
        Self {
            version: version.clone(),
            engine,
            adapter: None,
            gpu_fallback: None,
            cpu_fallback: None,
            admission: Admission::new(limits),
            memory,
            text: None,
            graph: None,
            labels: Vec::new(),
        }
    }

    /// The engine that runs this version, as status and metadata name it.
    pub(crate) fn engine_name(&self) -> &'static str {
        self.engine.as_ref().map_or("cloud", |e| e.name())
    }
}

/// A model's slot: what serves now, what served before, and what went wrong last.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot {
    /// Serving now.
    pub(crate) active: Option<Arc<Serving>>,
    /// Kept loaded for rollback (and for calls that name it), while the memory budget allows.
    pub(crate) previous: Option<Arc<Serving>>,
    /// The previous version kept on disk for rollback, loaded or not (what the status reports).
    pub(crate) stored_previous: Option<u64>,
    /// Being fetched or loaded.
    pub(crate) pending: Option<u64>,
    /// Why the last release was not installed (or was refused).
    pub(crate) last_error: Option<String>,
    /// When the pending version's failed install is tried again.
    pub(crate) retry_at: Option<std::time::Instant>,
    /// When the newest release accepted for the model expires (Unix seconds).
    pub(crate) release_expires_at: Option<u64>,
}

impl Slot {
    /// The active and the previous version, in that order, those there are.
    pub(crate) fn versions(&self) -> impl Iterator<Item = &Arc<Serving>> {
        self.active.iter().chain(self.previous.iter())
    }
}

/// One snapshot of the serving table: every model's slot, and the last refusal of any release.
#[derive(Debug, Clone, Default)]
pub(crate) struct Models {
    slots: BTreeMap<String, Slot>,
    last_error: Option<String>,
}

impl Models {
    /// The slot of `model`.
    pub(crate) fn get(&self, model: &str) -> Option<&Slot> {
        self.slots.get(model)
    }

    /// Every slot, by name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Slot)> {
        self.slots.iter()
    }

    /// The names of the models with a slot.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// The active version of `model`, if it serves.
    pub(crate) fn active_version(&self, model: &str) -> Option<u64> {
        self.get(model)?.active.as_ref().map(|s| s.version.version)
    }

    /// Why the last release refused (of any model, or unreadable) was refused.
    pub(crate) fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// The serving table, owned by the installer: each change makes a new [`Models`] and publishes
/// it whole. Loaded engines are held to a memory budget: when a switch takes the table over
/// it, previous versions are unloaded, the largest first (they stay on disk; a rollback is a
/// release that loads the version again).
#[derive(Debug)]
pub(crate) struct ServingTable {
    publish: watch::Sender<Arc<Models>>,
    memory_budget: u64,
}

impl ServingTable {
    /// An empty table whose engines may hold `memory_budget` bytes, and the receiver readers
    /// take snapshots from.
    pub(crate) fn new(memory_budget: u64) -> (Self, watch::Receiver<Arc<Models>>) {
        let (publish, snapshots) = watch::channel(Arc::new(Models::default()));
        (
            Self {
                publish,
                memory_budget,
            },
            snapshots,
        )
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Models> {
        Arc::clone(&self.publish.borrow())
    }

    /// Applies `change` to a copy of the table and publishes it (slots hold `Arc`s: the copy
    /// is a few pointers per model).
    fn change(&mut self, change: impl FnOnce(&mut Models)) {
        let mut next = Models::clone(&self.snapshot());
        change(&mut next);
        // `send_replace` stores the snapshot even while no one is subscribed.
        self.publish.send_replace(Arc::new(next));
    }

    /// `serving` is the active version of `model`, loaded from the cache at start.
    pub(crate) fn serve_cached(&mut self, model: &str, serving: Serving, previous: Option<u64>) {
        self.change(|m| {
            let slot = m.slots.entry(model.to_owned()).or_default();
            slot.active = Some(Arc::new(serving));
            slot.stored_previous = previous;
        });
    }

    /// The newest release accepted for `model` expires at `expires_at`.
    pub(crate) fn release_accepted(&mut self, model: &str, expires_at: Option<u64>) {
        self.change(|m| {
            m.slots
                .entry(model.to_owned())
                .or_default()
                .release_expires_at = expires_at;
        });
    }

    /// `version` of `model` is being fetched and loaded.
    pub(crate) fn pending(&mut self, model: &str, version: u64) {
        self.change(|m| {
            m.slots.entry(model.to_owned()).or_default().pending = Some(version);
        });
    }

    /// Switches `model` to `serving`: the active version becomes the previous one, in one step.
    pub(crate) fn switch(&mut self, model: &str, serving: Serving) {
        self.change(|m| {
            let slot = m.slots.entry(model.to_owned()).or_default();
            slot.previous = slot.active.take();
            slot.stored_previous = slot.previous.as_ref().map(|s| s.version.version);
            slot.active = Some(Arc::new(serving));
            slot.pending = None;
            slot.last_error = None;
            slot.retry_at = None;
        });
        self.fit_memory_budget();
    }

    /// Unloads previous versions, the largest first, until the loaded engines fit the budget
    /// (or none is left to unload: active versions always stay).
    fn fit_memory_budget(&mut self) {
        let budget = self.memory_budget;
        let loaded = |m: &Models| -> u64 {
            m.slots
                .values()
                .flat_map(Slot::versions)
                .map(|s| s.memory)
                .sum()
        };
        if loaded(&self.snapshot()) <= budget {
            return;
        }
        self.change(|m| {
            while loaded(m) > budget {
                let largest = m
                    .slots
                    .iter_mut()
                    .filter_map(|(name, slot)| {
                        let memory = slot.previous.as_ref()?.memory;
                        (memory > 0).then_some((memory, name, slot))
                    })
                    .max_by_key(|(memory, _, _)| *memory);
                let Some((memory, name, slot)) = largest else {
                    break;
                };
                tracing::info!(
                    model = name.as_str(),
                    version = slot.previous.as_ref().map(|s| s.version.version),
                    memory,
                    budget,
                    "unloaded the previous version to fit the memory budget (kept on disk)"
                );
                slot.previous = None;
            }
        });
    }

    /// Installing `version` of `model` failed for `why`, and is tried again at `at`: what
    /// serves is unchanged; the slot says what is pending, why, and when it is tried again.
    pub(crate) fn retry(&mut self, model: &str, version: u64, why: String, at: std::time::Instant) {
        self.change(|m| {
            let slot = m.slots.entry(model.to_owned()).or_default();
            slot.pending = Some(version);
            slot.last_error = Some(why.clone());
            slot.retry_at = Some(at);
            m.last_error = Some(why);
        });
    }

    /// A release was refused, for `model` when it could be read: nothing serves differently,
    /// and the slot and the status say why.
    pub(crate) fn refuse(&mut self, model: Option<&str>, why: String) {
        self.change(|m| {
            if let Some(model) = model {
                let slot = m.slots.entry(model.to_owned()).or_default();
                slot.last_error = Some(why.clone());
                slot.pending = None;
                slot.retry_at = None;
            }
            m.last_error = Some(why);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: u64) -> Serving {
        Serving::cloud_only(&ModelVersion {
            version: v,
            inputs: vec![],
            outputs: vec![],
            placement: outpost_shared::Placement::Cloud,
            max_batch: None,
            text: None,
            variants: vec![],
        })
    }

    #[test]
    fn a_snapshot_taken_before_a_switch_keeps_the_table_it_saw() {
        let (mut table, snapshots) = ServingTable::new(u64::MAX);
        table.serve_cached("m", version(1), None);
        let before = Arc::clone(&snapshots.borrow());
        table.pending("m", 2);
        table.switch("m", version(2));
        let after = Arc::clone(&snapshots.borrow());
        assert_eq!(before.active_version("m"), Some(1));
        assert!(before.get("m").unwrap().previous.is_none());
        let slot = after.get("m").unwrap();
        assert_eq!(after.active_version("m"), Some(2));
        assert_eq!(slot.previous.as_ref().map(|s| s.version.version), Some(1));
        assert_eq!(slot.pending, None);
        let versions: Vec<u64> = slot.versions().map(|s| s.version.version).collect();
        assert_eq!(versions, vec![2, 1]);
    }

    #[test]
    fn a_refusal_is_recorded_and_the_next_switch_clears_it() {
        let (mut table, snapshots) = ServingTable::new(u64::MAX);
        table.refuse(None, "unsigned".into());
        assert_eq!(snapshots.borrow().last_error(), Some("unsigned"));
        assert_eq!(snapshots.borrow().names().count(), 0);
        table.pending("m", 3);
        table.refuse(Some("m"), "too big".into());
        let refused = table.snapshot();
        let slot = refused.get("m").unwrap();
        assert_eq!(
            (slot.pending, slot.last_error.as_deref()),
            (None, Some("too big"))
        );
        table.switch("m", version(4));
        let slot = table.snapshot().get("m").cloned().unwrap();
        assert_eq!(slot.last_error, None);
        // The device's last refusal stays in the status, as before.
        assert_eq!(table.snapshot().last_error(), Some("too big"));
    }

    fn local(v: u64, size: u64) -> Serving {
        #[derive(Debug)]
        struct Nothing;
        impl Engine for Nothing {
            fn name(&self) -> &'static str {
                "none"
            }
            fn inputs(&self) -> &[outpost_shared::TensorSpec] {
                &[]
            }
            fn outputs(&self) -> &[outpost_shared::TensorSpec] {
                &[]
            }
            fn run(
                &self,
                _: &[outpost_shared::Tensor],
            ) -> Result<Vec<outpost_shared::Tensor>, outpost_runtime::RunError> {
                Ok(vec![])
            }
        }
        let version = ModelVersion {
            version: v,
            inputs: vec![],
            outputs: vec![],
            placement: outpost_shared::Placement::Local,
            max_batch: None,
            text: None,
            variants: vec![outpost_shared::Variant {
                target: outpost_shared::Target::EdgeInt8,
                format: outpost_shared::release::ModelFormat::Onnx,
                size,
                digest: outpost_shared::chunk::Digest::of(b""),
                chunks: vec![],
            }],
        };
        Serving::local(&version, Some(Arc::new(Nothing)), CLOUD_ONLY)
    }

    #[test]
    fn previous_versions_are_unloaded_to_fit_the_memory_budget() {
        // Engines take twice their file: a 100-byte model holds 200, a budget of 500 holds two.
        let (mut table, snapshots) = ServingTable::new(500);
        table.serve_cached("a", local(1, 100), None);
        table.switch("a", local(2, 100));
        let slot = snapshots.borrow().get("a").cloned().unwrap();
        assert_eq!(
            slot.previous.map(|s| s.version.version),
            Some(1),
            "within budget"
        );
        // A second model: 600 bytes loaded, so a's previous version goes.
        table.serve_cached("b", local(1, 50), None);
        table.switch("b", local(2, 50));
        let models = Arc::clone(&snapshots.borrow());
        assert!(
            models.get("a").unwrap().previous.is_none(),
            "a's previous version stayed"
        );
        assert_eq!(
            models.get("a").unwrap().stored_previous,
            Some(1),
            "unloaded, version 1 is still kept on disk for rollback"
        );
        assert_eq!(
            models
                .get("b")
                .unwrap()
                .previous
                .as_ref()
                .map(|s| s.version.version),
            Some(1)
        );
        assert_eq!(models.active_version("a"), Some(2));
        let loaded: u64 = models
            .iter()
            .flat_map(|(_, s)| s.versions())
            .map(|s| s.memory)
            .sum();
        assert!(loaded <= 500, "{loaded}");
        // Active versions stay even past the budget.
        let (mut small, snapshots) = ServingTable::new(10);
        small.serve_cached("a", local(1, 100), None);
        small.switch("a", local(2, 100));
        assert_eq!(snapshots.borrow().active_version("a"), Some(2));
        assert!(snapshots.borrow().get("a").unwrap().previous.is_none());
    }
}
