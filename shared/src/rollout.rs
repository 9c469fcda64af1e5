//! Rollout rules: which version of a release each device runs, and which release may replace
//! the one a device (or the coordinator) last accepted.

use crate::release::{Manifest, ManifestError, ModelVersion};

impl Manifest {
    /// The version a device runs: the candidate when the device is in its cohort, else stable.
    pub fn version_for(&self, device_id: &str) -> &ModelVersion {
        match &self.candidate {
            Some(c) if in_cohort(device_id, &c.salt, c.rollout_percent) => &c.version,
            _ => &self.stable,
        }
    }
}

/// Whether `device_id` falls in a rollout cohort of `percent` percent salted with `salt`:
/// `sha256(device_id, 0, salt)` read as a big-endian u64, modulo 100, is below `percent`.
pub fn in_cohort(device_id: &str, salt: &str, percent: u8) -> bool {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(device_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(salt.as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first) % 100 < u64::from(percent)
}

/// Checks that `next` moves forward from `current`, the last release accepted for the model:
/// a higher release number and a stable version that does not go back.
pub fn check_forward(current: Option<&Manifest>, next: &Manifest) -> Result<(), ManifestError> {
    let Some(current) = current else {
        return Ok(());
    };
    if current.model != next.model {
        return Err(ManifestError::Invalid {
            model: next.model.clone(),
            reason: format!("it was offered in place of model {:?}", current.model),
        });
    }
    if next.release <= current.release || next.stable.version < current.stable.version {
        return Err(ManifestError::Stale {
            model: next.model.clone(),
            current: current.release,
            offered: next.release,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::tests::manifest;

    #[test]
    fn releases_only_move_forward() {
        let m = manifest();
        assert!(check_forward(None, &m).is_ok());
        let mut next = m.clone();
        next.release += 1;
        assert!(check_forward(Some(&m), &next).is_ok());
        let err = check_forward(Some(&next), &m).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::Stale {
                    current: 4,
                    offered: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            check_forward(Some(&m), &m).is_err(),
            "a replay of the same release is refused"
        );
        let mut regressed = next.clone();
        regressed.release += 1;
        regressed.stable.version = 1;
        assert!(check_forward(Some(&next), &regressed).is_err());
    }

    #[test]
    fn cohort_is_stable_and_proportional() {
        let ids: Vec<String> = (0..2000).map(|i| format!("device-{i}")).collect();
        let share = |p| ids.iter().filter(|id| in_cohort(id, "salt-a", p)).count();
        assert_eq!(share(0), 0);
        assert_eq!(share(100), ids.len());
        let ten = share(10);
        assert!((120..=280).contains(&ten), "10% picked {ten} of 2000");
        // Growing a rollout only adds devices.
        assert!(
            ids.iter()
                .all(|id| !in_cohort(id, "salt-a", 10) || in_cohort(id, "salt-a", 50))
        );
        // Another salt picks other devices.
        let overlap = ids
            .iter()
            .filter(|id| in_cohort(id, "salt-a", 10) && in_cohort(id, "salt-b", 10))
            .count();
        assert!(overlap < ten / 2, "{overlap} of {ten} overlap");
        let m = manifest();
        let in_candidate = ids
            .iter()
            .filter(|id| m.version_for(id).version == 3)
            .count();
        assert_eq!(
            in_candidate,
            ids.iter().filter(|id| in_cohort(id, "r3", 10)).count()
        );
    }
}
