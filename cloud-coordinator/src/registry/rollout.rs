//! Moving a model's candidate along: widen its cohort, promote it to stable, or abort it. Each
//! is a new signed release. Widening keeps the candidate's salt (it comes from the candidate
//! version), so a device in the cohort at 10 % is still in it at 50 %; promoting makes the
//! candidate every device's version; aborting publishes a release without the candidate, so no
//! device stays on it. The record keeps the last [`HISTORY`] steps, with who took each and why.

use serde::{Deserialize, Serialize};

use super::{ModelRecord, Outcome, Registry, Stage};
use crate::error::RegistryError;

/// Steps of a model's rollout history kept in its record.
pub const HISTORY: usize = 32;

/// What to do with a model's candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    /// Give the candidate to this share of devices (1 to 99; the cohort only grows or shrinks,
    /// it never changes which devices come first).
    Percent(u8),
    /// Make the candidate the stable version, on every device.
    Promote,
    /// Drop the candidate: every device goes back to the stable version.
    Abort,
}

/// One step of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// When (Unix seconds).
    pub at: u64,
    /// The candidate version it was about.
    pub version: u64,
    /// `candidate`, `widen`, `promote` or `abort`.
    pub step: String,
    /// The candidate's share after the step (100 once promoted, 0 once aborted).
    pub percent: u8,
    /// Who or what took it, and on which figures.
    pub reason: String,
}

/// Adds a step to `record`'s history, keeping the last [`HISTORY`].
pub(super) fn note(record: &mut ModelRecord, version: u64, step: &str, percent: u8, reason: &str) {
    record.rollout_history.push(RolloutEvent {
        at: super::now(),
        version,
        step: step.to_owned(),
        percent,
        reason: reason.to_owned(),
    });
    let excess = record.rollout_history.len().saturating_sub(HISTORY);
    record.rollout_history.drain(..excess);
}

impl Registry {
    /// Applies `action` to model `name`'s candidate (`reason` goes in its history) and signs the
    /// new release; the outcome to announce. Refused when the model has no candidate, or (for
    /// `by_gate`) when it is no longer `version` under a gate: the operator or a push got there
    /// first. An operator's step takes the rollout off its gate.
    pub fn rollout(
        &self,
        name: &str,
        action: RolloutAction,
        reason: &str,
        by_gate: Option<u64>,
    ) -> Result<Outcome, RegistryError> {
        let _guard = self
            .write
            .lock()
            .map_err(|_| RegistryError::Storage("registry lock poisoned".into()))?;
        self.catch_up_locked(name)?;
        let mut record = self
            .record(name)?
            .ok_or_else(|| RegistryError::NotFound(format!("no model {name:?}")))?;
        let Some((candidate, percent, salt)) = record.candidate.clone() else {
            return Err(RegistryError::BadRequest(format!(
                "model {name:?} has no candidate to roll out (stable is version {})",
                record.stable
            )));
        };
        if let Some(gated) = by_gate
            && (gated != candidate || record.gate.is_none())
        {
            return Err(RegistryError::BadRequest(format!(
                "model {name:?}'s gated rollout of version {gated} is over"
            )));
        }
        if by_gate.is_none() {
            record.gate = None;
        }
        record.release += 1;
        let (version, stage) = match action {
            RolloutAction::Percent(p) if (1..=99).contains(&p) => {
                let step = if p > percent { "widen" } else { "narrow" };
                record.candidate = Some((candidate, p, salt));
                note(&mut record, candidate, step, p, reason);
                (candidate, Stage::Candidate)
            }
            RolloutAction::Percent(p) => {
                return Err(RegistryError::BadRequest(format!(
                    "rollout percent {p} is not 1 to 99 (promote for every device, abort for none)"
                )));
            }
            RolloutAction::Promote => {
                record.stable = candidate;
                record.candidate = None;
                record.gate = None;
                note(&mut record, candidate, "promote", 100, reason);
                (candidate, Stage::Stable)
            }
            RolloutAction::Abort => {
                record.candidate = None;
                record.gate = None;
                note(&mut record, candidate, "abort", 0, reason);
                (record.stable, Stage::Stable)
            }
        };
        let (published, signed) = self.commit(record, version, stage, 0)?;
        Ok((published, Some(signed)))
    }

    /// The rollouts under a health gate now.
    pub fn gated(&self) -> Result<Vec<GatedRollout>, RegistryError> {
        Ok(self
            .records()?
            .into_iter()
            .filter_map(|r| {
                let (candidate, percent, _) = r.candidate.clone()?;
                let gate = r.gate.clone()?;
                // The step began at the last event about this candidate.
                let step_started_at = r
                    .rollout_history
                    .iter()
                    .rev()
                    .find(|e| e.version == candidate)
                    .map_or(0, |e| e.at);
                Some(GatedRollout {
                    model: r.name,
                    stable: r.stable,
                    candidate,
                    percent,
                    gate,
                    step_started_at,
                })
            })
            .collect())
    }
}

/// A candidate rolling out under a health gate.
#[derive(Debug, Clone, PartialEq)]
pub struct GatedRollout {
    /// The model.
    pub model: String,
    /// Its stable version.
    pub stable: u64,
    /// The candidate version.
    pub candidate: u64,
    /// The candidate's share of devices now.
    pub percent: u8,
    /// The gate.
    pub gate: firmware_config::RolloutSection,
    /// When the current step began (Unix seconds).
    pub step_started_at: u64,
}
