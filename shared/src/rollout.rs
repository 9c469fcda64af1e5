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

/// Fleets smaller than this get the plain salt from [`choose_salt`]: a device is more than a
/// percent of them, so no salt makes the share exact, and the candidate's devices are few.
pub const SALT_CHOICE_MIN_DEVICES: usize = 100;

/// Salts [`choose_salt`] tries.
pub const SALT_TRIES: u32 = 64;

/// The salt of a new candidate's cohort: `base`, or `{base}.{k}` for the first `k` below
/// [`SALT_TRIES`] that puts the most of `devices` (the fleet known now) in a `percent` cohort
/// without going over `percent` percent of them. A hash cohort alone is only proportional on
/// average (1000 devices at 10 % land anywhere from about 80 to 120); this bounds the share of
/// the known fleet that ever runs a canary, and devices that join later fall in it at
/// `percent`. Fleets under [`SALT_CHOICE_MIN_DEVICES`] get `base`.
pub fn choose_salt(base: &str, devices: &[&str], percent: u8) -> String {
    if devices.len() < SALT_CHOICE_MIN_DEVICES || percent >= 100 {
        return base.to_owned();
    }
    let most = devices.len() * usize::from(percent) / 100;
    let mut best: Option<(usize, String)> = None;
    for k in 0..SALT_TRIES {
        let salt = if k == 0 {
            base.to_owned()
        } else {
            format!("{base}.{k}")
        };
        let count = devices
            .iter()
            .filter(|d| in_cohort(d, &salt, percent))
            .count();
        if count == most {
            return salt;
        }
        if count < most && best.as_ref().is_none_or(|(c, _)| count > *c) {
            best = Some((count, salt));
        }
    }
    best.map_or_else(|| base.to_owned(), |(_, salt)| salt)
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
    fn a_chosen_salt_puts_at_most_the_percent_of_the_known_fleet_in_the_cohort() {
        let ids: Vec<String> = (0..1000).map(|i| format!("sim-{i:04}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        for percent in [1u8, 10, 25, 50] {
            let salt = choose_salt("ranker-2", &ids, percent);
            let count = ids.iter().filter(|d| in_cohort(d, &salt, percent)).count();
            assert!(count <= 10 * usize::from(percent), "{percent}%: {count}");
            assert!(
                count * 100 >= 9 * 10 * usize::from(percent),
                "{percent}%: {count}"
            );
            // The same fleet, the same salt.
            assert_eq!(choose_salt("ranker-2", &ids, percent), salt);
        }
        // A small fleet keeps the plain salt.
        assert_eq!(choose_salt("ranker-2", &ids[..99], 10), "ranker-2");
        assert_eq!(choose_salt("ranker-2", &ids, 100), "ranker-2");
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
