//! Offloaded inference: a fixed set of worker threads fed by a bounded queue. A full queue is
//! answered `Busy` at once; memory never grows with load. Each call's working memory is known
//! before it runs (from the model's graph): a call over the per-call bound (`[inference]
//! working_memory_mb` shared by the workers) runs in row parts that fit, one whose single row
//! does not fit is refused, so the workers together never hold more than the working memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_config::InferenceSection;
use outpost_runtime::memory;
use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_runtime::{RunError, ShapePlans};
use outpost_shared::{ErrorKind, Tensor};
use tokio::sync::oneshot;

use crate::error::RegistryError;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// A finished inference: the version that ran and its outputs, or why it failed.
pub type Outcome = Result<(u64, Vec<Tensor>), (ErrorKind, String)>;

/// One inference request for the pool.
pub struct Job {
    /// The model.
    pub model: String,
    /// A version, or the stable one.
    pub version: Option<u64>,
    /// The inputs.
    pub inputs: Vec<Tensor>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Outcome>,
}

/// The calls each device has in the pool, queued or running.
type Shares = Arc<Mutex<std::collections::HashMap<String, u32>>>;

/// One device's place in the pool, given back when its job is done or dropped.
struct DeviceShare {
    shares: Shares,
    device: String,
}

impl Drop for DeviceShare {
    fn drop(&mut self) {
        if let Ok(mut shares) = self.shares.lock()
            && let Some(n) = shares.get_mut(&self.device)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                shares.remove(&self.device);
            }
        }
    }
}

/// Why the pool did not take a job.
#[derive(Debug)]
pub enum Refused {
    /// Every queue place is taken.
    Full(Job),
    /// The device already has its share of the pool (`[inference] device_calls`).
    DeviceShare(Job),
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("model", &self.model)
            .field("version", &self.version)
            .field("inputs", &self.inputs.len())
            .finish_non_exhaustive()
    }
}

/// The pool's handle: submitting never blocks.
#[derive(Clone)]
pub struct InferencePool {
    queue: SyncSender<(Job, DeviceShare)>,
    metrics: Arc<Metrics>,
    shares: Shares,
    device_calls: u32,
}

impl std::fmt::Debug for InferencePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferencePool").finish_non_exhaustive()
    }
}

/// Loaded models by (model, version), shared by the workers; the least recently used one is
/// dropped past [`LOADED_MODELS`].
type Plans = Mutex<ShapePlans<(String, u64), Arc<Loaded>>>;

/// A loaded model version and the rows one call of it may carry.
struct Loaded {
    engine: TractModel,
    max_batch: Option<u64>,
}

/// Model versions kept loaded for offloaded calls (a stable and a candidate of a few models).
const LOADED_MODELS: usize = 16;

/// How the workers run a model: one thread each (the pool is the parallelism), on the symbolic
/// plan only (per-shape plans would optimise on threads outside the pool, per loaded model).
const WORKER_ENGINE: TractOptions = TractOptions {
    threads: 1,
    shape_plans: 0,
};

/// The worker threads, to stop at shutdown.
#[derive(Debug)]
pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Stops the workers after their current job and waits for them (blocking).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl InferencePool {
    /// Starts `section.workers` threads behind a queue of `section.queue_depth` waiting jobs,
    /// each call within `section`'s per-call working memory.
    pub fn start(
        section: &InferenceSection,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> (Self, Workers) {
        let (workers, per_call) = (section.workers, section.call_memory_bytes());
        let (queue, jobs) = sync_channel::<(Job, DeviceShare)>(section.queue_depth as usize);
        let jobs = Arc::new(Mutex::new(jobs));
        let plans: Arc<Plans> = Arc::new(Mutex::new(ShapePlans::new(LOADED_MODELS)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let (jobs, plans, registry, metrics, stop) = (
                jobs.clone(),
                plans.clone(),
                registry.clone(),
                metrics.clone(),
                stop.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || work(&jobs, &plans, &registry, &metrics, &stop, per_call));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "could not start an inference worker"),
            }
        }
        let pool = Self {
            queue,
            metrics,
            shares: Arc::default(),
            device_calls: section.device_calls.max(1),
        };
        (pool, Workers { stop, threads })
    }

    /// Queues `device`'s job; gives it back when the queue is full or the device already has
    /// its share of the pool (answer `Busy`).
    pub fn submit(&self, device: &str, job: Job) -> Result<(), Refused> {
        {
            let Ok(mut shares) = self.shares.lock() else {
                return Err(Refused::Full(job));
            };
            let n = shares.entry(device.to_owned()).or_insert(0);
            if *n >= self.device_calls {
                return Err(Refused::DeviceShare(job));
            }
            *n += 1;
        }
        let share = DeviceShare {
            shares: Arc::clone(&self.shares),
            device: device.to_owned(),
        };
        match self.queue.try_send((job, share)) {
            Ok(()) => {
                self.metrics
                    .queue_depth
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full((job, _)) | TrySendError::Disconnected((job, _))) => {
                Err(Refused::Full(job))
            }
        }
    }
}

fn work(
    jobs: &Mutex<Receiver<(Job, DeviceShare)>>,
    plans: &Plans,
    registry: &Registry,
    metrics: &Metrics,
    stop: &AtomicBool,
    per_call: u64,
) {
    while !stop.load(Ordering::Relaxed) {
        // The lock is held only while waiting for the next job.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv_timeout(Duration::from_millis(100)),
            Err(_) => return,
        };
        // The share is held until the job's answer is sent.
        let (job, _share) = match job {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        metrics
            .queue_depth
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = run_job(&job, plans, registry, per_call, metrics);
        metrics.observe_inference(started.elapsed(), result.is_ok());
        // The requester may have gone away; nothing to do then.
        let _ = job.reply.send(result);
    }
}

/// A call (or part) estimated at this much working memory or more gives what it freed back to
/// the system when it ends: glibc keeps freed memory in its arenas, and the coordinator would
/// stay at its peak.
const GIVE_BACK_AFTER: u64 = 64 << 20;

fn give_back_after(bytes: u64) {
    if bytes >= GIVE_BACK_AFTER {
        outpost_heap::give_back();
    }
}

fn run_job(
    job: &Job,
    plans: &Plans,
    registry: &Registry,
    per_call: u64,
    metrics: &Metrics,
) -> Result<(u64, Vec<Tensor>), (ErrorKind, String)> {
    let version = match job.version {
        Some(v) => v,
        None => registry
            .stable_version(&job.model)
            .map_err(|e| (ErrorKind::UnknownModel, e.to_string()))?,
    };
    let key = (job.model.clone(), version);
    let cached = plans.lock().ok().and_then(|mut p| p.get(&key));
    let loaded = match cached {
        Some(loaded) => loaded,
        None => {
            let (bytes, max_batch) =
                registry.serving(&job.model, version).map_err(|e| match e {
                    RegistryError::NotFound(m) => (ErrorKind::UnknownModel, m),
                    other => (ErrorKind::Internal, other.to_string()),
                })?;
            let engine = TractModel::load_with(&bytes, WORKER_ENGINE)
                .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
            let loaded = Arc::new(Loaded { engine, max_batch });
            if let Ok(mut p) = plans.lock() {
                p.insert(key, Arc::clone(&loaded));
            }
            loaded
        }
    };
    if let Some(max_batch) = loaded.max_batch {
        for input in &job.inputs {
            match input.shape().first() {
                Some(&rows) if rows > max_batch => {
                    return Err((
                        ErrorKind::InvalidInput,
                        format!(
                            "input {:?} has {rows} rows, more than model {:?} version {version}'s max_batch of {max_batch}",
                            input.name(),
                            job.model
                        ),
                    ));
                }
                _ => {}
            }
        }
    }
    let run = |inputs: &[Tensor]| {
        loaded.engine.run(inputs).map_err(|e| match e {
            RunError::Input(m) => (ErrorKind::InvalidInput, m),
            other => (ErrorKind::Internal, other.to_string()),
        })
    };
    let Ok(graph) = &loaded.engine.memory else {
        // A graph whose memory cannot be read: bounded by the frame size only.
        return Ok((version, run(&job.inputs)?));
    };
    let rows = job
        .inputs
        .iter()
        .find_map(|t| t.shape().first().copied())
        .unwrap_or(1);
    let cost = graph.cost(graph.sequence_of(&job.inputs));
    let too_large = |needs: u64| {
        metrics
            .inference_too_large
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (
            ErrorKind::InvalidInput,
            format!(
                "this call of model {:?} needs {} MiB of working memory, more than the {} MiB one offloaded call may take (inference.working_memory_mb / inference.workers); send fewer rows or shorter inputs",
                job.model,
                needs.div_ceil(1 << 20),
                per_call >> 20
            ),
        )
    };
    if cost.bytes(rows) <= per_call {
        let out = run(&job.inputs);
        give_back_after(cost.bytes(rows));
        return Ok((version, out?));
    }
    if !graph.splits() {
        return Err(too_large(cost.bytes(rows)));
    }
    let per_part = cost
        .rows_within(per_call)
        .map_err(|_| too_large(cost.bytes(1)))?;
    metrics
        .inference_split
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut answers: Vec<Vec<Tensor>> = Vec::new();
    for (start, end) in memory::parts(rows, per_part) {
        let part = job
            .inputs
            .iter()
            .map(|t| match t.shape().first() {
                Some(&n) if n == rows => t.rows(start, end),
                _ => Ok(t.clone()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (ErrorKind::InvalidInput, e.to_string()))?;
        let out = run(&part);
        drop(part);
        give_back_after(cost.bytes(end - start));
        answers.push(out?);
    }
    let width = answers.first().map_or(0, Vec::len);
    let outputs = (0..width)
        .map(|i| {
            let pieces: Vec<Tensor> = answers.iter().filter_map(|a| a.get(i).cloned()).collect();
            Tensor::concat_rows(&pieces).map_err(|e| {
                (
                    ErrorKind::Internal,
                    format!("the parts of the answer do not join: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((version, outputs))
}
