//! Device-class profiles: what a phone, a laptop and an edge box can afford, as defaults a
//! config names (`device.class`) and overrides key by key (`[profile]`).

use serde::{Deserialize, Serialize};

/// The kinds of device Outpost ships profiles for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceClass {
    /// A phone: little memory, runs on battery.
    Phone,
    /// A laptop.
    #[default]
    Laptop,
    /// An always-on edge box on mains power.
    EdgeBox,
}

/// Whether the agent runs models on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuPreference {
    /// Use a GPU when one exists and covers the model.
    Prefer,
    /// Never use a GPU (CPU only).
    Never,
}

/// What the agent does with locally placed calls while the device runs on battery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatteryPolicy {
    /// Keep each model's placement.
    AsPlaced,
    /// Offload to the coordinator whenever it is reachable, to save battery.
    Offload,
}

/// The budgets and preferences an agent works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Memory for loaded models, MiB.
    pub memory_budget_mb: u64,
    /// Disk for the model cache, MiB.
    pub storage_budget_mb: u64,
    /// The largest single model variant the device accepts, MiB.
    pub max_model_mb: u64,
    /// Threads for one local inference's matrix products (capped by the CPUs present).
    pub inference_threads: u32,
    /// GPU use.
    pub gpu: GpuPreference,
    /// Offload policy on battery.
    pub on_battery: BatteryPolicy,
    /// Open connections to the local API at once (past it, new ones wait to be accepted).
    pub api_connections: u32,
    /// Local inferences of one model running at once.
    pub inference_concurrency: u32,
    /// Local inferences of one model waiting for a running slot; past it a call is answered
    /// 503 with `Retry-After`.
    pub inference_queue: u32,
    /// Working memory for running calls (what models build from their inputs), MiB, shared by
    /// every call at once: calls are admitted by their estimated bytes. One call may take a
    /// share of [`Profile::inference_concurrency`]; a larger one runs in row parts that fit.
    #[serde(default = "default_working_memory_mb")]
    pub working_memory_mb: u64,
    /// Request bodies held in memory at once, across every connection to the local API, MiB;
    /// past it a new body waits, then is answered 503 with `Retry-After`.
    #[serde(default = "default_body_memory_mb")]
    pub body_memory_mb: u64,
}

const fn default_working_memory_mb() -> u64 {
    DeviceClass::Laptop.profile().working_memory_mb
}

const fn default_body_memory_mb() -> u64 {
    DeviceClass::Laptop.profile().body_memory_mb
}

impl Profile {
    /// The most elements one inference request may carry: its tensors, at 4 bytes an element
    /// (FP32, the common case), take at most the memory budget shared by twice the calls that
    /// run at once (a request's tensors are copied once into the engine). The phone profile
    /// allows 32 Mi elements (128 MiB of FP32).
    pub fn max_request_elements(&self) -> u64 {
        let budget = self.memory_budget_mb.saturating_mul(1 << 20);
        let share = budget / (2 * u64::from(self.inference_concurrency.max(1)));
        (share / 4).max(1)
    }

    /// The process-wide working memory for calls, bytes.
    pub fn working_memory_bytes(&self) -> u64 {
        self.working_memory_mb.saturating_mul(1 << 20)
    }

    /// The most working memory one call may take, bytes: the working memory shared by the
    /// calls of one model that may run at once.
    pub fn call_memory_bytes(&self) -> u64 {
        (self.working_memory_bytes() / u64::from(self.inference_concurrency.max(1))).max(1)
    }
}

impl DeviceClass {
    /// The class's default profile.
    pub const fn profile(self) -> Profile {
        match self {
            DeviceClass::Phone => Profile {
                memory_budget_mb: 512,
                storage_budget_mb: 1024,
                max_model_mb: 64,
                inference_threads: 2,
                gpu: GpuPreference::Prefer,
                on_battery: BatteryPolicy::Offload,
                api_connections: 64,
                inference_concurrency: 2,
                inference_queue: 16,
                working_memory_mb: 256,
                body_memory_mb: 128,
            },
            DeviceClass::Laptop => Profile {
                memory_budget_mb: 2048,
                storage_budget_mb: 8192,
                max_model_mb: 512,
                inference_threads: 4,
                gpu: GpuPreference::Prefer,
                on_battery: BatteryPolicy::AsPlaced,
                api_connections: 256,
                inference_concurrency: 4,
                inference_queue: 64,
                working_memory_mb: 1024,
                body_memory_mb: 256,
            },
            DeviceClass::EdgeBox => Profile {
                memory_budget_mb: 8192,
                storage_budget_mb: 65536,
                max_model_mb: 4096,
                inference_threads: 8,
                gpu: GpuPreference::Prefer,
                on_battery: BatteryPolicy::AsPlaced,
                api_connections: 512,
                inference_concurrency: 8,
                inference_queue: 256,
                working_memory_mb: 4096,
                body_memory_mb: 1024,
            },
        }
    }
}

/// `[profile]` in an agent config: each key overrides the class's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileOverrides {
    /// Overrides [`Profile::memory_budget_mb`].
    pub memory_budget_mb: Option<u64>,
    /// Overrides [`Profile::storage_budget_mb`].
    pub storage_budget_mb: Option<u64>,
    /// Overrides [`Profile::max_model_mb`].
    pub max_model_mb: Option<u64>,
    /// Overrides [`Profile::inference_threads`].
    pub inference_threads: Option<u32>,
    /// Overrides [`Profile::gpu`].
    pub gpu: Option<GpuPreference>,
    /// Overrides [`Profile::on_battery`].
    pub on_battery: Option<BatteryPolicy>,
    /// Overrides [`Profile::api_connections`].
    pub api_connections: Option<u32>,
    /// Overrides [`Profile::inference_concurrency`].
    pub inference_concurrency: Option<u32>,
    /// Overrides [`Profile::inference_queue`].
    pub inference_queue: Option<u32>,
    /// Overrides [`Profile::working_memory_mb`].
    pub working_memory_mb: Option<u64>,
    /// Overrides [`Profile::body_memory_mb`].
    pub body_memory_mb: Option<u64>,
}

impl ProfileOverrides {
    /// `base` with these overrides applied.
    pub fn apply(&self, base: Profile) -> Profile {
        Profile {
            memory_budget_mb: self.memory_budget_mb.unwrap_or(base.memory_budget_mb),
            storage_budget_mb: self.storage_budget_mb.unwrap_or(base.storage_budget_mb),
            max_model_mb: self.max_model_mb.unwrap_or(base.max_model_mb),
            inference_threads: self.inference_threads.unwrap_or(base.inference_threads),
            gpu: self.gpu.unwrap_or(base.gpu),
            on_battery: self.on_battery.unwrap_or(base.on_battery),
            api_connections: self.api_connections.unwrap_or(base.api_connections),
            inference_concurrency: self
                .inference_concurrency
                .unwrap_or(base.inference_concurrency),
            inference_queue: self.inference_queue.unwrap_or(base.inference_queue),
            working_memory_mb: self.working_memory_mb.unwrap_or(base.working_memory_mb),
            body_memory_mb: self.body_memory_mb.unwrap_or(base.body_memory_mb),
        }
    }

    /// Problems with the overrides, as (key, message).
    pub(crate) fn problems(&self) -> Vec<(&'static str, String)> {
        [
            ("profile.memory_budget_mb", self.memory_budget_mb),
            ("profile.storage_budget_mb", self.storage_budget_mb),
            ("profile.max_model_mb", self.max_model_mb),
            (
                "profile.inference_threads",
                self.inference_threads.map(u64::from),
            ),
            (
                "profile.api_connections",
                self.api_connections.map(u64::from),
            ),
            (
                "profile.inference_concurrency",
                self.inference_concurrency.map(u64::from),
            ),
            ("profile.working_memory_mb", self.working_memory_mb),
            ("profile.body_memory_mb", self.body_memory_mb),
        ]
        .into_iter()
        .filter(|(_, v)| *v == Some(0))
        .map(|(k, _)| (k, "must be at least 1".to_owned()))
        .collect()
    }
}
