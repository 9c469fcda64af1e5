//! Offloaded inference: a fixed set of worker threads fed by a bounded queue. A full queue is
//! answered `Busy` at once; memory never grows with load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_runtime::{Engine, RunError, ShapePlans};
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
    queue: SyncSender<Job>,
    metrics: Arc<Metrics>,
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
    engine: Box<dyn Engine>,
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
    /// Starts `workers` threads behind a queue of `depth` waiting jobs.
    pub fn start(
        workers: u32,
        depth: u32,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> (Self, Workers) {
        let (queue, jobs) = sync_channel::<Job>(depth as usize);
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
                .spawn(move || work(&jobs, &plans, &registry, &metrics, &stop));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "could not start an inference worker"),
            }
        }
        (Self { queue, metrics }, Workers { stop, threads })
    }

    /// Queues a job; gives it back when the queue is full (answer `Busy`).
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match self.queue.try_send(job) {
            Ok(()) => {
                self.metrics
                    .queue_depth
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Err(job),
        }
    }
}

fn work(
    jobs: &Mutex<Receiver<Job>>,
    plans: &Plans,
    registry: &Registry,
    metrics: &Metrics,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        // The lock is held only while waiting for the next job.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv_timeout(Duration::from_millis(100)),
            Err(_) => return,
        };
        let job = match job {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        metrics
            .queue_depth
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = run_job(&job, plans, registry);
        metrics.observe_inference(started.elapsed(), result.is_ok());
        // The requester may have gone away; nothing to do then.
        let _ = job.reply.send(result);
    }
}

fn run_job(
    job: &Job,
    plans: &Plans,
    registry: &Registry,
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
            let loaded = Arc::new(Loaded {
                engine: Box::new(engine),
                max_batch,
            });
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
    let out = loaded.engine.run(&job.inputs).map_err(|e| match e {
        RunError::Input(m) => (ErrorKind::InvalidInput, m),
        other => (ErrorKind::Internal, other.to_string()),
    })?;
    Ok((version, out))
}
