//! The device's status, as it publishes it on MQTT and answers `/v1/status`: built from one
//! snapshot of the serving table and the counters, so the versions it reports belong together.

use outpost_shared::{DeviceStatus, Health, ModelStatus};

use crate::counters::Counters;
use crate::serving::Models;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The status of device `device_id` serving `models`, at `updated_at`.
pub(crate) fn device_status(
    device_id: &str,
    models: &Models,
    counters: &Counters,
    updated_at: u64,
) -> DeviceStatus {
    let last_error = models.last_error().map(str::to_owned);
    let models: Vec<ModelStatus> = models
        .iter()
        .map(|(name, slot)| ModelStatus {
            model: name.clone(),
            active: slot.active.as_ref().map(|s| s.version.version),
            previous: slot.stored_previous,
            pending: slot.pending,
            engine: slot.active.as_ref().map(|s| s.engine_name().to_owned()),
            adapter: slot.active.as_ref().and_then(|s| s.adapter.clone()),
            gpu_fallback: slot.active.as_ref().and_then(|s| s.gpu_fallback.clone()),
            last_error: slot.last_error.clone(),
            retry_in_ms: slot.retry_at.map(|at| {
                u64::try_from(
                    at.saturating_duration_since(std::time::Instant::now())
                        .as_millis(),
                )
                .unwrap_or(u64::MAX)
            }),
        })
        .collect();
    let degraded = models.iter().any(|m| m.last_error.is_some());
    DeviceStatus {
        device_id: device_id.to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        health: if degraded {
            Health::Degraded
        } else {
            Health::Ready
        },
        updated_at,
        models,
        counters: counters.snapshot(),
        last_error,
        broker_error: None,
    }
}

#[cfg(test)]
mod tests {
    use outpost_shared::{ModelVersion, Placement};

    use super::*;
    use crate::serving::{Serving, ServingTable};

    #[test]
    fn a_refused_release_degrades_the_device_and_says_why() {
        let (mut table, _) = ServingTable::new(u64::MAX);
        let version = ModelVersion {
            version: 4,
            inputs: vec![],
            outputs: vec![],
            placement: Placement::Cloud,
            max_batch: None,
            variants: vec![],
        };
        table.serve_cached("m", Serving::cloud_only(&version), None);
        let counters = Counters::default();
        Counters::count(&counters.local);
        let ready = device_status("dev-0001", &table.snapshot(), &counters, 7);
        assert_eq!(ready.health, Health::Ready);
        assert_eq!(ready.updated_at, 7);
        assert_eq!(ready.counters.inferences_local, 1);
        let m = &ready.models[0];
        assert_eq!((m.active, m.engine.as_deref()), (Some(4), Some("cloud")));
        table.refuse(Some("m"), "too big".into());
        let refused = device_status("dev-0001", &table.snapshot(), &counters, 8);
        assert_eq!(refused.health, Health::Degraded);
        assert_eq!(refused.models[0].last_error.as_deref(), Some("too big"));
        assert_eq!(refused.models[0].active, Some(4));
        assert_eq!(refused.last_error.as_deref(), Some("too big"));
    }
}
