//! The install decision, free of I/O: given a verified release, the model's record, this device
//! and its profile, the chunks the device keeps and which chunks it has, what to do. Every rule
//! the installer applies is here (subscription, forward only, cohort, largest model, storage
//! budget, already active, what to fetch); the installer reads what this needs, calls
//! [`plan_install`] and carries out the answer.

use std::collections::HashMap;

use firmware_config::Profile;
use outpost_shared::rollout::check_forward;
use outpost_shared::{ChunkId, Manifest, ManifestError, ModelVersion};

use crate::engines::{local_variant, stored_chunks};
use crate::store::Record;

/// The device a release is judged for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Device<'a> {
    /// The device id (decides the rollout cohort).
    pub(crate) id: &'a str,
    /// The models it follows (`sync.models`); empty follows every model.
    pub(crate) follows: &'a [String],
}

/// What to do with a release.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Install {
    /// Not a model this device follows: nothing changes.
    Ignore,
    /// The version for this device already serves: record the release, nothing else.
    RecordRelease,
    /// Fetch the `missing` chunks (in order; possibly none), load `target`, and switch to it.
    Switch {
        /// The version this device runs: the candidate in its cohort, else stable.
        target: Box<ModelVersion>,
        /// The chunks of its local variant not stored yet.
        missing: Vec<ChunkId>,
    },
}

/// Why a release is refused; nothing changes but the status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The release does not move forward from the one accepted before (or names another model).
    #[error(transparent)]
    NotForward(ManifestError),
    /// The version's local variant is larger than the profile allows.
    #[error(
        "version {version} needs {:.1} MB, more than this device's largest model ({} MB, profile.max_model_mb)",
        megabytes(*.bytes),
        .limit >> 20
    )]
    TooLarge {
        /// The version.
        version: u64,
        /// Its local variant's size.
        bytes: u64,
        /// The largest variant allowed, in bytes.
        limit: u64,
    },
    /// With the version, the models kept would pass the storage budget.
    #[error(
        "version {version} does not fit the storage budget: with it, this device would keep {:.1} MB of models (the active and previous version of each), over its {} MB (profile.storage_budget_mb)",
        megabytes(*.kept),
        .budget >> 20
    )]
    OverBudget {
        /// The version.
        version: u64,
        /// The bytes of model chunks kept with it.
        kept: u64,
        /// The budget, in bytes.
        budget: u64,
    },
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// The chunks a device would keep beside a new version of one model: the active and previous
/// local variants of every other model, and the active one of this model (it turns previous;
/// this model's previous is dropped). Sizes by chunk, so a chunk shared by versions counts once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeptChunks(HashMap<ChunkId, u32>);

impl KeptChunks {
    /// The chunks kept beside a new version of `model`, from every model's record.
    pub(crate) fn beside<'a>(
        model: &str,
        records: impl IntoIterator<Item = (&'a str, &'a Record)>,
    ) -> Self {
        let mut kept = Self::default();
        for (name, record) in records {
            let previous = if name == model {
                None
            } else {
                record.previous.as_ref()
            };
            for version in record.active.iter().chain(previous) {
                kept.add(version);
            }
        }
        kept
    }

    fn add(&mut self, version: &ModelVersion) {
        for c in stored_chunks(version) {
            self.0.insert(c.id, c.size);
        }
    }

    /// The bytes kept once `version` is kept too.
    pub(crate) fn bytes_with(&self, version: &ModelVersion) -> u64 {
        let mut all = self.clone();
        all.add(version);
        all.0.values().map(|&n| u64::from(n)).sum()
    }
}

/// Decides what to do with `manifest`, a verified release: `record` is the model's record,
/// `kept` what the device keeps beside a new version of it, `has_chunk` whether a chunk is
/// stored.
pub(crate) fn plan_install(
    record: &Record,
    manifest: &Manifest,
    device: Device<'_>,
    profile: &Profile,
    kept: &KeptChunks,
    has_chunk: impl Fn(&ChunkId) -> bool,
) -> Result<Install, Refusal> {
    if !device.follows.is_empty() && !device.follows.contains(&manifest.model) {
        return Ok(Install::Ignore);
    }
    // The release already accepted, delivered again (every reconnect and restart does): no
    // refusal. Installed: nothing to do; not installed yet (an install failed): try again.
    let redelivered = record.manifest.as_ref() == Some(manifest);
    if !redelivered {
        check_forward(record.manifest.as_ref(), manifest).map_err(Refusal::NotForward)?;
    }
    let target = manifest.version_for(device.id);
    if redelivered
        && record
            .active
            .as_ref()
            .is_some_and(|a| a.version == target.version)
    {
        return Ok(Install::Ignore);
    }
    if record
        .active
        .as_ref()
        .is_some_and(|a| a.version == target.version)
    {
        return Ok(Install::RecordRelease);
    }
    if let Some(variant) = local_variant(target) {
        let limit = profile.max_model_mb.saturating_mul(1 << 20);
        if variant.size > limit {
            return Err(Refusal::TooLarge {
                version: target.version,
                bytes: variant.size,
                limit,
            });
        }
        let budget = profile.storage_budget_mb.saturating_mul(1 << 20);
        let with = kept.bytes_with(target);
        if with > budget {
            return Err(Refusal::OverBudget {
                version: target.version,
                kept: with,
                budget,
            });
        }
    }
    let missing = stored_chunks(target)
        .map(|c| c.id)
        .filter(|id| !has_chunk(id))
        .collect();
    Ok(Install::Switch {
        target: Box::new(target.clone()),
        missing,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use outpost_shared::release::ChunkRef;
    use outpost_shared::{Candidate, Digest, ModelFormat, Placement, Target, Variant};

    use super::*;

    const DEVICE: &str = "dev-0001";
    const MB: u64 = 1 << 20;

    fn profile(max_model_mb: u64, storage_budget_mb: u64) -> Profile {
        Profile {
            max_model_mb,
            storage_budget_mb,
            ..firmware_config::DeviceClass::Laptop.profile()
        }
    }

    fn chunk(tag: &str, size: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId::of(tag.as_bytes()),
            size,
        }
    }

    fn variant(target: Target, chunks: &[ChunkRef]) -> Variant {
        Variant {
            target,
            format: ModelFormat::Onnx,
            size: chunks.iter().map(|c| u64::from(c.size)).sum(),
            digest: Digest::of(b"not checked by the plan"),
            chunks: chunks.to_vec(),
        }
    }

    fn version(v: u64, placement: Placement, variants: Vec<Variant>) -> ModelVersion {
        ModelVersion {
            version: v,
            inputs: vec![],
            outputs: vec![],
            placement,
            max_batch: None,
            text: None,
            variants,
        }
    }

    /// A local version with one int8 variant of the given chunks.
    fn local(v: u64, chunks: &[ChunkRef]) -> ModelVersion {
        version(v, Placement::Local, vec![variant(Target::EdgeInt8, chunks)])
    }

    fn release(model: &str, release: u64, stable: ModelVersion) -> Manifest {
        Manifest {
            model: model.into(),
            release,
            created_at: 0,
            expires_at: None,
            stable,
            candidate: None,
        }
    }

    fn with_candidate(mut m: Manifest, candidate: ModelVersion, percent: u8) -> Manifest {
        m.candidate = Some(Candidate {
            version: candidate,
            rollout_percent: percent,
            salt: "salt".into(),
        });
        m
    }

    fn device() -> Device<'static> {
        Device {
            id: DEVICE,
            follows: &[],
        }
    }

    /// The plan with a roomy profile, nothing kept and no chunk stored.
    fn plan(record: &Record, manifest: &Manifest) -> Result<Install, Refusal> {
        plan_install(
            record,
            manifest,
            device(),
            &profile(64, 1024),
            &KeptChunks::default(),
            |_| false,
        )
    }

    fn switch_target(install: Install) -> (u64, Vec<ChunkId>) {
        match install {
            Install::Switch { target, missing } => (target.version, missing),
            other => panic!("expected a switch, got {other:?}"),
        }
    }

    #[test]
    fn a_first_release_switches_and_fetches_every_chunk_in_order() {
        let (a, b) = (chunk("a", 10), chunk("b", 20));
        let m = release("m", 1, local(1, &[a, b]));
        let (v, missing) = switch_target(plan(&Record::default(), &m).unwrap());
        assert_eq!((v, missing), (1, vec![a.id, b.id]));
    }

    #[test]
    fn a_model_the_device_does_not_follow_is_ignored() {
        let m = release("other", 1, local(1, &[chunk("a", 10)]));
        let follows = ["m".to_owned()];
        let device = Device {
            id: DEVICE,
            follows: &follows,
        };
        let plan = |m: &Manifest| {
            plan_install(
                &Record::default(),
                m,
                device,
                &profile(64, 1024),
                &KeptChunks::default(),
                |_| false,
            )
        };
        assert_eq!(plan(&m).unwrap(), Install::Ignore);
        let followed = release("m", 1, local(1, &[chunk("a", 10)]));
        assert!(matches!(plan(&followed).unwrap(), Install::Switch { .. }));
    }

    #[test]
    fn releases_only_move_forward() {
        let accepted = release("m", 5, local(3, &[chunk("a", 10)]));
        let record = Record {
            manifest: Some(accepted),
            active: Some(local(3, &[chunk("a", 10)])),
            previous: None,
            installing: None,
        };
        // The same release again, an older one, and a stable version going back: refused.
        for (r, v) in [(5, 4), (4, 4), (6, 2)] {
            let m = release("m", r, local(v, &[chunk("b", 10)]));
            assert!(
                matches!(plan(&record, &m), Err(Refusal::NotForward(_))),
                "release {r}, version {v}"
            );
        }
        // Another model's release offered in this model's place: refused.
        let mut renamed = release("m", 6, local(4, &[chunk("b", 10)]));
        renamed.model = "n".into();
        assert!(matches!(
            plan(&record, &renamed),
            Err(Refusal::NotForward(_))
        ));
        let next = release("m", 6, local(4, &[chunk("b", 10)]));
        assert_eq!(switch_target(plan(&record, &next).unwrap()).0, 4);
    }

    #[test]
    fn the_accepted_release_delivered_again_is_no_refusal() {
        let v3 = local(3, &[chunk("a", 10)]);
        let accepted = release("m", 5, v3.clone());
        let installed = Record {
            manifest: Some(accepted.clone()),
            active: Some(v3),
            previous: None,
            installing: None,
        };
        assert_eq!(plan(&installed, &accepted).unwrap(), Install::Ignore);
        // Accepted, but its install failed (version 2 still active): delivered again, it is
        // tried again.
        let failed = Record {
            active: Some(local(2, &[chunk("old", 10)])),
            ..installed
        };
        assert_eq!(switch_target(plan(&failed, &accepted).unwrap()).0, 3);
    }

    #[test]
    fn the_cohort_picks_candidate_or_stable() {
        let stable = local(1, &[chunk("stable", 10)]);
        let candidate = local(2, &[chunk("candidate", 10)]);
        let everyone = with_candidate(release("m", 1, stable.clone()), candidate.clone(), 100);
        assert_eq!(
            switch_target(plan(&Record::default(), &everyone).unwrap()).0,
            2
        );
        let nobody = with_candidate(release("m", 1, stable), candidate, 0);
        assert_eq!(
            switch_target(plan(&Record::default(), &nobody).unwrap()).0,
            1
        );
    }

    #[test]
    fn the_version_already_active_only_records_the_release() {
        let v1 = local(1, &[chunk("a", 10)]);
        let record = Record {
            manifest: Some(release("m", 1, v1.clone())),
            active: Some(v1.clone()),
            previous: None,
            installing: None,
        };
        // A re-signed release of the same version (say, a candidate withdrawn).
        let m = with_candidate(release("m", 2, v1), local(2, &[chunk("b", 10)]), 0);
        assert_eq!(plan(&record, &m).unwrap(), Install::RecordRelease);
    }

    #[test]
    fn a_variant_larger_than_the_profile_allows_is_refused() {
        let big = chunk("big", u32::try_from(2 * MB).unwrap() + 1);
        let m = release("m", 1, local(1, &[big]));
        let refusal = plan_install(
            &Record::default(),
            &m,
            device(),
            &profile(2, 1024),
            &KeptChunks::default(),
            |_| false,
        )
        .unwrap_err();
        assert!(matches!(refusal, Refusal::TooLarge { version: 1, .. }));
        let why = refusal.to_string();
        assert!(
            why.contains("2.1 MB") && why.contains("(2 MB, profile.max_model_mb)"),
            "{why}"
        );
        // Exactly the limit fits.
        let fits = chunk("fits", u32::try_from(2 * MB).unwrap());
        let m = release("m", 1, local(1, &[fits]));
        let install = plan_install(
            &Record::default(),
            &m,
            device(),
            &profile(2, 1024),
            &KeptChunks::default(),
            |_| false,
        );
        assert!(matches!(install, Ok(Install::Switch { .. })));
    }

    #[test]
    fn the_storage_budget_counts_what_stays_once_each() {
        let half = u32::try_from(MB / 2).unwrap();
        let (shared, old, other, new) = (
            chunk("shared", half),
            chunk("old", half),
            chunk("other", half),
            chunk("new", half),
        );
        let this = Record {
            manifest: Some(release("m", 1, local(2, &[shared, old]))),
            active: Some(local(2, &[shared, old])),
            // Dropped once version 3 serves: not counted.
            previous: Some(local(1, &[chunk("gone", half)])),
            installing: None,
        };
        let neighbour = Record {
            manifest: None,
            active: Some(local(7, &[other])),
            previous: Some(local(6, &[other])),
            installing: None,
        };
        let kept = KeptChunks::beside("m", [("m", &this), ("n", &neighbour)]);
        let next = local(3, &[shared, new]);
        // shared + old + other + new: 2 MiB; `shared` and `other` count once.
        assert_eq!(kept.bytes_with(&next), 2 * MB);
        let m = release("m", 2, next);
        let judge = |budget_mb| {
            plan_install(&this, &m, device(), &profile(64, budget_mb), &kept, |_| {
                false
            })
        };
        assert!(matches!(judge(2), Ok(Install::Switch { .. })));
        let refusal = judge(1).unwrap_err();
        assert!(
            matches!(refusal, Refusal::OverBudget { version: 3, kept, budget } if kept == 2 * MB && budget == MB)
        );
        let why = refusal.to_string();
        assert!(
            why.contains("storage budget") && why.contains("profile.storage_budget_mb"),
            "{why}"
        );
    }

    #[test]
    fn only_the_chunks_not_stored_are_fetched() {
        let (a, b, c) = (chunk("a", 10), chunk("b", 10), chunk("c", 10));
        let stored: HashSet<ChunkId> = [b.id].into();
        let m = release("m", 1, local(1, &[a, b, c]));
        let install = plan_install(
            &Record::default(),
            &m,
            device(),
            &profile(64, 1024),
            &KeptChunks::default(),
            |id| stored.contains(id),
        );
        assert_eq!(switch_target(install.unwrap()).1, vec![a.id, c.id]);
    }

    #[test]
    fn a_cloud_only_version_fetches_nothing_and_needs_no_room() {
        let cloud = version(
            1,
            Placement::Cloud,
            vec![variant(Target::CloudFp32, &[chunk("huge", u32::MAX)])],
        );
        let m = release("m", 1, cloud);
        let install = plan_install(
            &Record::default(),
            &m,
            device(),
            &profile(0, 0),
            &KeptChunks::default(),
            |_| false,
        );
        assert_eq!(switch_target(install.unwrap()), (1, vec![]));
    }

    #[test]
    fn a_text_model_fetches_its_tokenizer_wherever_it_runs_and_counts_it_in_the_budget() {
        let (model, tok) = (
            chunk("model", 10 * MB as u32),
            chunk("tokenizer", MB as u32),
        );
        let text = |mut v: ModelVersion| {
            v.text = Some(outpost_shared::TextInput {
                name: "text".into(),
                input_ids: "input_ids".into(),
                attention_mask: None,
                token_type_ids: None,
                max_tokens: 16,
                truncate: false,
                tokenizer: outpost_shared::Blob {
                    size: u64::from(tok.size),
                    digest: Digest::of(b"not checked by the plan"),
                    chunks: vec![tok],
                },
            });
            v
        };
        let m = release("m", 1, text(local(1, &[model])));
        let (_, missing) = switch_target(plan(&Record::default(), &m).unwrap());
        assert_eq!(missing, vec![model.id, tok.id]);
        // A cloud-only text model: the device tokenizes, so it fetches the tokenizer alone.
        let cloud = text(version(
            1,
            Placement::Cloud,
            vec![variant(Target::CloudFp32, &[model])],
        ));
        let (_, missing) =
            switch_target(plan(&Record::default(), &release("m", 1, cloud)).unwrap());
        assert_eq!(missing, vec![tok.id]);
        // The tokenizer's megabyte counts: 10 MB of model fits a budget of 10, with it no more.
        let refused = plan_install(
            &Record::default(),
            &m,
            device(),
            &profile(64, 10),
            &KeptChunks::default(),
            |_| false,
        );
        assert!(
            matches!(refused, Err(Refusal::OverBudget { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn int8_is_preferred_and_fp32_taken_when_it_is_the_only_local_variant() {
        let (int8, fp32) = (chunk("int8", 10), chunk("fp32", 40));
        let both = version(
            1,
            Placement::Local,
            vec![
                variant(Target::EdgeFp32, &[fp32]),
                variant(Target::EdgeInt8, &[int8]),
            ],
        );
        let m = release("m", 1, both);
        assert_eq!(
            switch_target(plan(&Record::default(), &m).unwrap()).1,
            vec![int8.id]
        );
        let only_fp32 = version(
            1,
            Placement::Local,
            vec![variant(Target::EdgeFp32, &[fp32])],
        );
        let m = release("m", 1, only_fp32);
        assert_eq!(
            switch_target(plan(&Record::default(), &m).unwrap()).1,
            vec![fp32.id]
        );
    }
}
