//! The query string of a push (`POST /v1/models/{name}?…`), which the client writes and the
//! server reads: [`PushQuery`], its placement ([`PlacementArg`]), and percent-encoding.

use std::collections::HashMap;

use outpost_shared::{Placement, TextInput};

use outpost_runtime::accuracy::OutputKind;

use crate::registry::{Int8Overrides, Quantize, TextOptions};

/// The query of a push, `POST /v1/models/{name}?…`: written by the client, read by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct PushQuery {
    /// Where inference runs (`placement`, default `local`).
    pub placement: Placement,
    /// The share of devices that get the version first (`rollout`, default 100).
    pub rollout_percent: u8,
    /// The most rows one request may carry (`max_batch`; default: no limit but the device's
    /// memory budget).
    pub max_batch: Option<u64>,
    /// The edge variant's weights (`quantize`: `none` or `int8`; default: int8 when devices run
    /// the model).
    pub quantize: Option<Quantize>,
    /// What outputs are, for the int8 gate (`output_kinds=NAME:KIND,…`, KIND one of
    /// classifier, embedding, score, hidden); the others' kind is read from the model.
    pub output_kinds: Vec<(String, OutputKind)>,
    /// Overrides of the int8 gate's tolerance (`int8_max_abs_error`, `int8_max_prob_error`,
    /// `int8_min_cosine`, `int8_min_top1_agreement`, `int8_max_kept_share`: as in `[registry]`).
    pub int8: Int8Overrides,
    /// Measure and report only (`dry_run`).
    pub dry_run: bool,
    /// The cloud model's size at the end of the body, before the samples (`cloud_size`).
    pub cloud_size: Option<usize>,
    /// The gate's sample file's size at the very end of the body (`samples_size`).
    pub samples_size: Option<usize>,
    /// The tokenizer's size (`tokenizer_size`): a HuggingFace `tokenizer.json` after the cloud
    /// model, before the samples.
    pub tokenizer_size: Option<usize>,
    /// The text input the tokenizer serves (`text_input`, `max_tokens`, `truncate`).
    pub text: TextOptions,
    /// A rollout gated on health (`canary`: the candidate's first share, 1 to 99); the other
    /// keys override `[rollout]` for this rollout.
    pub canary: Option<u8>,
    /// How long each step must stay within the limits (`bake_s`).
    pub bake_s: Option<u64>,
    /// The candidate's largest error rate (`max_error_rate`, 0.01 is 1 %).
    pub max_error_rate: Option<f64>,
    /// The largest p99 rise over stable (`max_p99_regression`, 0.2 is 20 %).
    pub max_p99_regression: Option<f64>,
    /// The largest rise of the offloaded share over stable (`max_offload_increase`, in points
    /// of share: 0.1 is 10 points).
    pub max_offload_increase: Option<f64>,
    /// The `[[backend]]` that serves the model's offloaded calls (`backend`).
    pub backend: Option<String>,
}

impl Default for PushQuery {
    fn default() -> Self {
        PushQuery {
            placement: Placement::Local,
            rollout_percent: 100,
            max_batch: None,
            quantize: None,
            output_kinds: Vec::new(),
            int8: Int8Overrides::default(),
            dry_run: false,
            cloud_size: None,
            samples_size: None,
            tokenizer_size: None,
            text: TextOptions::default(),
            canary: None,
            bake_s: None,
            max_error_rate: None,
            max_p99_regression: None,
            max_offload_increase: None,
            backend: None,
        }
    }
}

impl PushQuery {
    /// The query string, without the `?`.
    pub fn to_query(&self) -> String {
        let mut query = format!(
            "placement={}&dry_run={}",
            encode(&PlacementArg(self.placement.clone()).to_string()),
            self.dry_run
        );
        // A canary's share is its own key.
        if self.canary.is_none() {
            query.push_str(&format!("&rollout={}", self.rollout_percent));
        }
        if let Some(q) = self.quantize {
            query.push_str(match q {
                Quantize::None => "&quantize=none",
                Quantize::Int8 => "&quantize=int8",
            });
        }
        for (key, size) in [
            ("max_batch", self.max_batch),
            ("cloud_size", self.cloud_size.map(|n| n as u64)),
            ("samples_size", self.samples_size.map(|n| n as u64)),
            ("tokenizer_size", self.tokenizer_size.map(|n| n as u64)),
            ("max_tokens", self.text.max_tokens.map(u64::from)),
        ] {
            if let Some(n) = size {
                query.push_str(&format!("&{key}={n}"));
            }
        }
        if let Some(name) = &self.text.name {
            query.push_str(&format!("&text_input={}", encode(name)));
        }
        if let Some(name) = &self.backend {
            query.push_str(&format!("&backend={}", encode(name)));
        }
        if self.text.truncate {
            query.push_str("&truncate=true");
        }
        if !self.output_kinds.is_empty() {
            let kinds: Vec<String> = self
                .output_kinds
                .iter()
                .map(|(name, kind)| format!("{name}:{kind}"))
                .collect();
            query.push_str(&format!("&output_kinds={}", encode(&kinds.join(","))));
        }
        for (key, value) in self.int8.entries() {
            if let Some(v) = value {
                query.push_str(&format!("&{key}={v}"));
            }
        }
        if let Some(p) = self.canary {
            query.push_str(&format!("&canary={p}"));
        }
        if let Some(s) = self.bake_s {
            query.push_str(&format!("&bake_s={s}"));
        }
        for (key, value) in [
            ("max_error_rate", self.max_error_rate),
            ("max_p99_regression", self.max_p99_regression),
            ("max_offload_increase", self.max_offload_increase),
        ] {
            if let Some(v) = value {
                query.push_str(&format!("&{key}={v}"));
            }
        }
        query
    }

    /// The health gate this push asks for: `[rollout]` (`defaults`) with this push's overrides,
    /// when it is a canary.
    pub fn gate(
        &self,
        defaults: &firmware_config::RolloutSection,
    ) -> Option<firmware_config::RolloutSection> {
        self.canary?;
        let mut gate = defaults.clone();
        if let Some(s) = self.bake_s {
            gate.bake_s = s;
        }
        if let Some(v) = self.max_error_rate {
            gate.max_error_rate = v;
        }
        if let Some(v) = self.max_p99_regression {
            gate.max_p99_regression = v;
        }
        if let Some(v) = self.max_offload_increase {
            gate.max_offload_increase = v;
        }
        // Steps past the canary's share only.
        let canary = self.canary.unwrap_or(0);
        gate.steps.retain(|p| *p > canary);
        Some(gate)
    }

    /// Reads a decoded query; the error names the key and what it must be.
    pub fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let placement = query
            .get("placement")
            .map(String::as_str)
            .unwrap_or("local")
            .parse::<PlacementArg>()?
            .0;
        let rollout_percent = match query.get("rollout").map(|v| v.parse::<u8>()) {
            None => 100,
            Some(Ok(p)) if p <= 100 => p,
            Some(_) => return Err("rollout must be a percentage from 0 to 100".to_owned()),
        };
        let quantize = match query.get("quantize").map(String::as_str) {
            None => None,
            Some("none") => Some(Quantize::None),
            Some("int8") => Some(Quantize::Int8),
            Some(other) => return Err(format!("quantize must be none or int8, not {other:?}")),
        };
        let dry_run = match query.get("dry_run").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(format!("dry_run must be true or false, not {other:?}")),
        };
        let size = |key: &str| -> Result<Option<usize>, String> {
            query
                .get(key)
                .map(|text| {
                    text.parse()
                        .map_err(|_| format!("{key} must be a byte count, not {text:?}"))
                })
                .transpose()
        };
        let max_batch = match query.get("max_batch").map(|v| v.parse::<u64>()) {
            None => None,
            Some(Ok(n)) if n > 0 => Some(n),
            Some(_) => {
                return Err("max_batch must be a row count of at least 1".to_owned());
            }
        };
        let samples_size = size("samples_size")?;
        let cloud_size = size("cloud_size")?;
        let tokenizer_size = size("tokenizer_size")?;
        let text = TextOptions {
            name: query.get("text_input").cloned(),
            max_tokens: match query.get("max_tokens").map(|v| v.parse::<u32>()) {
                None => None,
                Some(Ok(n)) if n >= TextInput::MIN_TOKENS => Some(n),
                Some(_) => {
                    return Err(format!(
                        "max_tokens must be a token count of at least {}",
                        TextInput::MIN_TOKENS
                    ));
                }
            },
            truncate: match query.get("truncate").map(String::as_str) {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    return Err(format!("truncate must be true or false, not {other:?}"));
                }
            },
        };
        if tokenizer_size.is_none()
            && (text.name.is_some() || text.max_tokens.is_some() || text.truncate)
        {
            return Err(
                "text_input, max_tokens and truncate describe a tokenizer: send one (tokenizer_size)"
                    .to_owned(),
            );
        }
        let canary = match query.get("canary").map(|v| v.parse::<u8>()) {
            None => None,
            Some(Ok(p)) if (1..=99).contains(&p) => Some(p),
            Some(_) => return Err("canary must be a percentage from 1 to 99".to_owned()),
        };
        if canary.is_some() && query.contains_key("rollout") {
            return Err(
                "give either rollout (a share the operator moves) or canary (a share the health gate moves), not both"
                    .to_owned(),
            );
        }
        let bake_s = match query.get("bake_s").map(|v| v.parse::<u64>()) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(_)) => return Err("bake_s must be a number of seconds".to_owned()),
        };
        let share = |key: &str| -> Result<Option<f64>, String> {
            match query.get(key).map(|v| v.parse::<f64>()) {
                None => Ok(None),
                Some(Ok(v)) if v >= 0.0 && v.is_finite() => Ok(Some(v)),
                Some(_) => Err(format!(
                    "{key} must be a number of at least 0 (0.01 is 1 %)"
                )),
            }
        };
        let (max_error_rate, max_p99_regression, max_offload_increase) = (
            share("max_error_rate")?,
            share("max_p99_regression")?,
            share("max_offload_increase")?,
        );
        let output_kinds = match query.get("output_kinds") {
            None => Vec::new(),
            Some(text) => parse_output_kinds(text)?,
        };
        let mut int8 = Int8Overrides::default();
        for (key, _) in Int8Overrides::default().entries() {
            let Some(text) = query.get(key) else { continue };
            let value: f64 = text
                .parse()
                .map_err(|_| format!("{key} must be a number, not {text:?}"))?;
            if let Some(problem) = firmware_config::int8_tolerance_problem(key, value) {
                return Err(format!("{key} {problem}"));
            }
            if let Some(slot) = int8.entry_mut(key) {
                *slot = Some(value);
            }
        }
        Ok(PushQuery {
            output_kinds,
            int8,
            placement,
            rollout_percent: canary.unwrap_or(rollout_percent),
            max_batch,
            quantize,
            dry_run,
            cloud_size,
            samples_size,
            tokenizer_size,
            text,
            canary,
            bake_s,
            max_error_rate,
            max_p99_regression,
            max_offload_increase,
            backend: query.get("backend").cloned(),
        })
    }
}

/// `NAME:KIND,NAME:KIND`: the last `:` of each item splits the output's name from its kind.
pub fn parse_output_kinds(text: &str) -> Result<Vec<(String, OutputKind)>, String> {
    text.split(',')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (name, kind) = item.rsplit_once(':').ok_or_else(|| {
                format!("output_kinds item {item:?} must be NAME:KIND (e.g. sentence_embedding:embedding)")
            })?;
            if name.is_empty() {
                return Err(format!("output_kinds item {item:?} has no output name"));
            }
            Ok((name.to_owned(), kind.parse::<OutputKind>()?))
        })
        .collect()
}

/// `local`, `cloud`, or `cascade:OUTPUT:THRESHOLD`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementArg(pub Placement);

impl std::str::FromStr for PlacementArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "placement {text:?} must be local, cloud or cascade:OUTPUT:THRESHOLD (e.g. cascade:intent_probs:0.7)"
            )
        };
        match text {
            "local" => Ok(PlacementArg(Placement::Local)),
            "cloud" => Ok(PlacementArg(Placement::Cloud)),
            _ => {
                let rest = text.strip_prefix("cascade:").ok_or_else(bad)?;
                let (output, threshold) = rest.rsplit_once(':').ok_or_else(bad)?;
                let threshold: f32 = threshold.parse().map_err(|_| bad())?;
                if output.is_empty() || !(0.0..=1.0).contains(&threshold) {
                    return Err(bad());
                }
                Ok(PlacementArg(Placement::Cascade {
                    output: output.to_owned(),
                    threshold,
                }))
            }
        }
    }
}

impl std::fmt::Display for PlacementArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Placement::Local => f.write_str("local"),
            Placement::Cloud => f.write_str("cloud"),
            Placement::Cascade { output, threshold } => write!(f, "cascade:{output}:{threshold}"),
        }
    }
}

/// `a=b&c=d`, with `%XX` and `+` decoded.
pub(super) fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-encodes everything but `A-Z a-z 0-9 - _ .`, for a query value.
pub(crate) fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_parse_and_print() {
        for text in ["local", "cloud", "cascade:intent_probs:0.7"] {
            assert_eq!(text.parse::<PlacementArg>().unwrap().to_string(), text);
        }
        for bad in [
            "",
            "edge",
            "cascade:",
            "cascade:x",
            "cascade:x:2",
            "cascade::0.5",
        ] {
            assert!(bad.parse::<PlacementArg>().is_err(), "{bad}");
        }
    }

    #[test]
    fn push_queries_round_trip() {
        let query = PushQuery {
            placement: Placement::Cascade {
                output: "intent_probs".into(),
                threshold: 0.7,
            },
            rollout_percent: 10,
            max_batch: Some(64),
            quantize: Some(Quantize::None),
            dry_run: true,
            cloud_size: Some(5),
            samples_size: Some(3),
            ..PushQuery::default()
        };
        assert_eq!(
            PushQuery::parse(&parse_query(&query.to_query())).unwrap(),
            query
        );
        // A canary, with its gate's overrides, and the defaults it fills in.
        let canary = PushQuery {
            rollout_percent: 10,
            canary: Some(10),
            bake_s: Some(2),
            max_error_rate: Some(0.05),
            max_offload_increase: Some(0.25),
            ..PushQuery::default()
        };
        assert_eq!(
            PushQuery::parse(&parse_query(&canary.to_query())).unwrap(),
            canary
        );
        let gate = canary
            .gate(&firmware_config::RolloutSection::default())
            .unwrap();
        assert_eq!(
            (gate.bake_s, gate.max_error_rate, gate.max_offload_increase),
            (2, 0.05, 0.25)
        );
        assert_eq!(gate.max_p99_regression, 0.2);
        assert_eq!(gate.steps, vec![50]);
        assert!(
            PushQuery::default()
                .gate(&firmware_config::RolloutSection::default())
                .is_none()
        );
        for bad in [
            "canary=0",
            "canary=100",
            "canary=10&rollout=10",
            "max_error_rate=-1",
        ] {
            assert!(PushQuery::parse(&parse_query(bad)).is_err(), "{bad}");
        }
        for bad in ["max_batch=0", "max_batch=-1", "max_batch=many"] {
            let e = PushQuery::parse(&parse_query(bad)).unwrap_err();
            assert!(e.contains("max_batch must be a row count"), "{bad}: {e}");
        }
        assert_eq!(
            PushQuery::parse(&parse_query("")).unwrap(),
            PushQuery::default()
        );
    }

    #[test]
    fn gate_overrides_round_trip_and_bad_ones_are_named() {
        let query = PushQuery {
            output_kinds: vec![
                ("sentence_embedding".into(), OutputKind::Embedding),
                ("output:0".into(), OutputKind::Hidden),
            ],
            int8: Int8Overrides {
                min_cosine: Some(0.98),
                max_kept_share: Some(0.25),
                ..Int8Overrides::default()
            },
            ..PushQuery::default()
        };
        assert_eq!(
            PushQuery::parse(&parse_query(&query.to_query())).unwrap(),
            query
        );
        for (bad, names) in [
            ("output_kinds=probs:logits", "must be classifier, embedding"),
            ("output_kinds=probs", "must be NAME:KIND"),
            ("output_kinds=:score", "has no output name"),
            (
                "int8_min_cosine=2",
                "int8_min_cosine must be between -1 and 1",
            ),
            (
                "int8_max_abs_error=-0.1",
                "int8_max_abs_error must be a finite",
            ),
            (
                "int8_max_kept_share=x",
                "int8_max_kept_share must be a number",
            ),
        ] {
            let e = PushQuery::parse(&parse_query(bad)).unwrap_err();
            assert!(e.contains(names), "{bad}: {e}");
        }
    }

    #[test]
    fn queries_decode() {
        let q = parse_query("placement=cascade%3Aintent_probs%3A0.7&rollout=10&x=%zz&y=%4");
        assert_eq!(q["placement"], "cascade:intent_probs:0.7");
        assert_eq!(q["rollout"], "10");
        assert_eq!(q["x"], "%zz");
        assert_eq!(q["y"], "%4");
    }
}
