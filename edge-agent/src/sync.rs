//! Model sync: MQTT manifests in, verified releases installed.
//!
//! One task handles releases in order. For each: verify the signature and that it moves forward
//! (anything else changes nothing and is counted and reported), pick stable or candidate by the
//! rollout cohort, fetch over QUIC only the chunks not already stored (so a restarted agent
//! resumes), verify and assemble, load and warm up, then switch the active version in one
//! flushed write. The previous version keeps serving until the switch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_shared::rollout::check_forward;
use outpost_shared::{DeviceStatus, Health, ModelStatus, Topic, topic};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::Context;
use crate::state::{Record, Serving, local_variant};

/// Chunks asked for in one request.
const CHUNKS_PER_REQUEST: usize = 32;

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// MQTT options with the device's last will (offline status, retained).
pub(crate) fn mqtt_options(ctx: &Context) -> MqttOptions {
    let id = ctx.config.device.id.to_string();
    let broker = &ctx.config.mqtt.broker;
    let mut options = MqttOptions::new(
        format!("outpost-agent-{id}"),
        broker.host.clone(),
        broker.port,
    );
    options.set_keep_alive(Duration::from_secs(15));
    let limit = outpost_shared::signing::MAX_MANIFEST_BYTES + 64 * 1024;
    options.set_max_packet_size(limit, limit);
    if let (Ok(topic), Ok(offline)) = (
        Topic::device_status(&id),
        DeviceStatus::offline(&id, env!("CARGO_PKG_VERSION"), now()).to_cbor(),
    ) {
        options.set_last_will(LastWill::new(topic.name(), offline, QoS::AtLeastOnce, true));
    }
    options
}

/// Polls the MQTT event loop: subscribes on every (re)connect, hands manifests to the installer.
pub(crate) async fn run_mqtt(
    ctx: Arc<Context>,
    client: AsyncClient,
    mut events: EventLoop,
    manifests: mpsc::Sender<Vec<u8>>,
    mut shutdown: watch::Receiver<bool>,
) {
    events.network_options.set_tcp_nodelay(true);
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => return,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                let filters: Vec<String> = if ctx.config.sync.models.is_empty() {
                    vec![topic::ALL_MANIFESTS.to_owned()]
                } else {
                    ctx.config
                        .sync
                        .models
                        .iter()
                        .filter_map(|m| Topic::manifest(m).ok())
                        .map(|t| t.name())
                        .collect()
                };
                let (client, ctx) = (client.clone(), ctx.clone());
                // Subscribing and publishing wait on this loop: do them from another task.
                tokio::spawn(async move {
                    for filter in filters {
                        if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, "could not subscribe");
                        }
                    }
                    publish_status(&ctx, &client).await;
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if matches!(Topic::parse(&p.topic), Ok(Topic::Manifest { .. }))
                    && manifests.try_send(p.payload.to_vec()).is_err()
                {
                    tracing::warn!(topic = %p.topic, "manifest queue full; the retained copy comes again on reconnect");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "MQTT connection failed; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Installs releases one at a time.
pub(crate) async fn run_installer(
    ctx: Arc<Context>,
    client: AsyncClient,
    mut manifests: mpsc::Receiver<Vec<u8>>,
) {
    while let Some(payload) = manifests.recv().await {
        if let Err((model, error)) = install(&ctx, &payload).await {
            ctx.store.counters.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(model = model.as_deref().unwrap_or("?"), %error, "release not installed");
            if let Ok(mut last) = ctx.last_error.lock() {
                *last = Some(error.clone());
            }
            if let (Some(model), Ok(mut slots)) = (model, ctx.store.slots.write()) {
                let slot = slots.entry(model).or_default();
                slot.last_error = Some(error);
                slot.pending = None;
            }
        }
        publish_status(&ctx, &client).await;
    }
}

async fn install(ctx: &Arc<Context>, payload: &[u8]) -> Result<(), (Option<String>, String)> {
    if payload.is_empty() {
        return Err((None, "an empty manifest message".into()));
    }
    let manifest = ctx
        .verifier
        .verify_cbor(payload, now())
        .map_err(|e| (None, e.to_string()))?;
    let model = manifest.model.clone();
    let fail = |e: String| (Some(model.clone()), e);
    if !ctx.config.sync.models.is_empty() && !ctx.config.sync.models.contains(&model) {
        return Ok(());
    }
    let store = ctx.store.clone();
    let mut record = store.record(&model).map_err(fail)?;
    check_forward(record.manifest.as_ref(), &manifest).map_err(|e| fail(e.to_string()))?;
    let target = manifest.version_for(ctx.config.device.id.as_str()).clone();
    if record
        .active
        .as_ref()
        .is_some_and(|a| a.version == target.version)
    {
        record.manifest = Some(manifest);
        return store.save(&model, &record).map_err(fail);
    }
    if let Ok(mut slots) = store.slots.write() {
        slots.entry(model.clone()).or_default().pending = Some(target.version);
    }
    if let Some(variant) = local_variant(&target) {
        let limit = ctx.config.profile().max_model_mb.saturating_mul(1 << 20);
        if variant.size > limit {
            return Err(fail(format!(
                "version {} needs {:.1} MB, more than this device's largest model ({} MB, profile.max_model_mb)",
                target.version,
                variant.size as f64 / 1e6,
                limit >> 20
            )));
        }
        let budget = ctx
            .config
            .profile()
            .storage_budget_mb
            .saturating_mul(1 << 20);
        let kept = store
            .bytes_kept_after(&model, variant)
            .map_err(|e| fail(e.to_string()))?;
        if kept > budget {
            return Err(fail(format!(
                "version {} does not fit the storage budget: with it, this device would keep {:.1} MB of models (the active and previous version of each), over its {} MB (profile.storage_budget_mb)",
                target.version,
                kept as f64 / 1e6,
                budget >> 20
            )));
        }
        let missing: Vec<_> = variant
            .chunks
            .iter()
            .map(|c| c.id)
            .filter(|id| !store.chunks.contains(id))
            .collect();
        tracing::info!(
            model,
            version = target.version,
            chunks = variant.chunks.len(),
            missing = missing.len(),
            "fetching"
        );
        for batch in missing.chunks(CHUNKS_PER_REQUEST) {
            let got = ctx
                .offload
                .get_chunks(batch.to_vec())
                .await
                .map_err(|e| fail(e.to_string()))?;
            if got.len() != batch.len() {
                return Err(fail(format!(
                    "the coordinator lacks {} chunks of version {}",
                    batch.len() - got.len(),
                    target.version
                )));
            }
            for (id, data) in got {
                store
                    .chunks
                    .put(&id, &data)
                    .map_err(|e| fail(format!("storing a chunk: {e}")))?;
                ctx.store.counters.chunks.fetch_add(1, Ordering::Relaxed);
                ctx.store
                    .counters
                    .bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
    }
    let loading = target.clone();
    let loader = store.clone();
    let serving = tokio::task::spawn_blocking(move || loader.load(&loading))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(format!("version {} cannot serve: {e}", target.version)))?;

    // Switch: durable record first, then what serves.
    let previous = record.active.take();
    record.previous = previous;
    record.active = Some(target.clone());
    record.manifest = Some(manifest);
    store.save(&model, &record).map_err(fail)?;
    if let Ok(mut slots) = store.slots.write() {
        let slot = slots.entry(model.clone()).or_default();
        slot.previous = slot.active.take();
        slot.active = Some(Arc::new(serving));
        slot.pending = None;
        slot.last_error = None;
    }
    tracing::info!(model, version = target.version, "serving");
    let gc = store.clone();
    match tokio::task::spawn_blocking(move || gc.collect_garbage()).await {
        Ok(Ok(n)) if n > 0 => tracing::info!(deleted = n, "deleted chunks no kept version uses"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not delete old chunks"),
        _ => {}
    }
    Ok(())
}

/// Loads the cached models at start, before any network is up.
pub(crate) fn load_cached(ctx: &Context) -> Result<(), String> {
    for (model, record) in ctx.store.records()? {
        let Some(active) = &record.active else {
            continue;
        };
        match ctx.store.load(active) {
            Ok(serving) => {
                if let Ok(mut slots) = ctx.store.slots.write() {
                    slots.entry(model.clone()).or_default().active = Some(Arc::new(serving));
                }
                tracing::info!(model, version = active.version, "serving from cache");
            }
            Err(e) => {
                tracing::warn!(model, error = %e, "cached model cannot serve; waiting for the next release");
                let record = Record {
                    active: None,
                    ..record.clone()
                };
                ctx.store.save(&model, &record)?;
            }
        }
    }
    Ok(())
}

/// The device's status as it stands.
pub(crate) fn status(ctx: &Context) -> DeviceStatus {
    let c = &ctx.store.counters;
    let models: Vec<ModelStatus> = ctx
        .store
        .slots
        .read()
        .map(|slots| {
            slots
                .iter()
                .map(|(name, slot)| ModelStatus {
                    model: name.clone(),
                    active: slot.active.as_ref().map(|s| s.version.version),
                    previous: slot.previous.as_ref().map(|s| s.version.version),
                    pending: slot.pending,
                    engine: slot.active.as_ref().map(|s| engine_name(s).to_owned()),
                    adapter: slot.active.as_ref().and_then(|s| s.adapter.clone()),
                    gpu_fallback: slot.active.as_ref().and_then(|s| s.gpu_fallback.clone()),
                    last_error: slot.last_error.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let degraded = models.iter().any(|m| m.last_error.is_some());
    DeviceStatus {
        device_id: ctx.config.device.id.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        health: if degraded {
            Health::Degraded
        } else {
            Health::Ready
        },
        updated_at: now(),
        models,
        counters: outpost_shared::Counters {
            inferences_local: c.local.load(Ordering::Relaxed),
            inferences_offloaded: c.offloaded.load(Ordering::Relaxed),
            inference_errors: c.errors.load(Ordering::Relaxed),
            manifests_rejected: c.rejected.load(Ordering::Relaxed),
            chunks_fetched: c.chunks.load(Ordering::Relaxed),
            bytes_fetched: c.bytes.load(Ordering::Relaxed),
        },
        last_error: ctx.last_error.lock().ok().and_then(|e| e.clone()),
    }
}

/// The engine that runs a version.
pub(crate) fn engine_name(serving: &Serving) -> &'static str {
    serving.engine.as_ref().map_or("cloud", |e| e.name())
}

pub(crate) async fn publish_status(ctx: &Context, client: &AsyncClient) {
    let status = status(ctx);
    let Ok(topic) = Topic::device_status(&status.device_id) else {
        return;
    };
    match status.to_cbor() {
        Ok(bytes) => {
            if let Err(e) = client
                .publish(topic.name(), QoS::AtLeastOnce, true, bytes)
                .await
            {
                tracing::debug!(error = %e, "could not publish status");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not encode status"),
    }
}
