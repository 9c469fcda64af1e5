//! The coordinator as a gateway: `[[backend]]` (Open Inference Protocol servers that run models
//! for offloaded calls instead of the worker pool) and `[gateway]` (rate limits on offloaded
//! calls).

use serde::{Deserialize, Serialize};

/// `[[backend]]`: an Open Inference Protocol v2 HTTP server (Triton, KServe, MLServer) with one
/// or more replicas, serving some models' offloaded calls. Models pushed with `--backend NAME`
/// are served by it as well as those `models` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    /// The name pushes refer to (`push --backend NAME`).
    pub name: String,
    /// The replicas' base URLs, `http://HOST:PORT` (a path prefix is kept: `http://gw/triton`).
    pub replicas: Vec<String>,
    /// The models it serves: exact names, or a prefix ending in `*` (`"search-*"`).
    #[serde(default)]
    pub models: Vec<String>,
    /// Calls one replica may have in flight; a call that finds every ready replica full is
    /// answered `Busy`.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// How long a call may take on a replica, milliseconds (then it fails, not retried: it may
    /// have reached the model).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long connecting to a replica may take, milliseconds (a call that could not connect
    /// is retried on another replica).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How often each replica's `/v2/health/ready` (and its models' ready) is checked,
    /// milliseconds.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Consecutive failed calls that open a replica's circuit (it gets no calls).
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    /// How long an open circuit keeps calls off a replica before a trial call, milliseconds.
    #[serde(default = "default_circuit_open_ms")]
    pub circuit_open_ms: u64,
    /// How tensors travel: `auto` (binary when the server lists the `binary_tensor_data`
    /// extension at `GET /v2`), `binary` or `json`.
    #[serde(default)]
    pub encoding: BackendEncoding,
    /// The largest answer read from a replica, MiB.
    #[serde(default = "default_max_response_mb")]
    pub max_response_mb: u64,
}

/// How a backend's tensors travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendEncoding {
    /// Binary when the server lists the extension, JSON otherwise.
    #[default]
    Auto,
    /// Always the binary tensor extension (servers that support it without listing it, such as
    /// KServe's).
    Binary,
    /// Always JSON.
    Json,
}

impl BackendSection {
    /// Whether this backend serves `model` by its `models` list.
    pub fn lists(&self, model: &str) -> bool {
        self.models.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => p == model,
        })
    }

    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let name = &self.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            problems.push(format!(
                "backend {name:?}: the name must be letters, digits, '-', '_' or '.'"
            ));
        }
        if self.replicas.is_empty() {
            problems.push(format!(
                "backend {name:?}: replicas must list at least one URL"
            ));
        }
        for url in &self.replicas {
            if let Some(problem) = url_problem(url) {
                problems.push(format!("backend {name:?}: replica {url:?}: {problem}"));
            }
        }
        for pattern in &self.models {
            if pattern.is_empty() || pattern.trim_end_matches('*').contains('*') {
                problems.push(format!(
                    "backend {name:?}: model pattern {pattern:?} must be a name, or a prefix ending in one '*'"
                ));
            }
        }
        if self.health_interval_ms < 100 {
            problems.push(format!(
                "backend {name:?}: health_interval_ms must be at least 100 (each replica is asked every interval)"
            ));
        }
        for (key, value) in [
            ("max_concurrency", u64::from(self.max_concurrency)),
            ("timeout_ms", self.timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("health_interval_ms", self.health_interval_ms),
            ("circuit_failures", u64::from(self.circuit_failures)),
            ("circuit_open_ms", self.circuit_open_ms),
            ("max_response_mb", self.max_response_mb),
        ] {
            if value == 0 {
                problems.push(format!("backend {name:?}: {key} must be at least 1"));
            }
        }
        problems
    }
}

/// Why `url` cannot be a replica's base URL.
fn url_problem(url: &str) -> Option<&'static str> {
    if url.starts_with("https://") {
        return Some(
            "https backends are not built yet: reach the server over a private network or a TLS sidecar on the coordinator's host, with http://",
        );
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Some("must start with http://");
    };
    if rest.contains(['?', '#']) {
        return Some("must be a base URL, without a query or fragment");
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Some("must not carry credentials");
    }
    // An IPv6 host is in brackets; the port, if any, follows them.
    let port = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((_, after)) => after.strip_prefix(':'),
            None => return Some("an IPv6 host needs its closing ']'"),
        },
        None => authority.rsplit_once(':').map(|(_, p)| p),
    };
    match port {
        _ if authority.is_empty() || authority.starts_with(':') => Some("has no host"),
        Some(p) if p.parse::<u16>().is_err() => Some("the port must be a number up to 65535"),
        _ => None,
    }
}

const fn default_max_concurrency() -> u32 {
    16
}

const fn default_timeout_ms() -> u64 {
    10_000
}

const fn default_connect_timeout_ms() -> u64 {
    1_000
}

const fn default_health_interval_ms() -> u64 {
    2_000
}

const fn default_circuit_failures() -> u32 {
    5
}

const fn default_circuit_open_ms() -> u64 {
    5_000
}

const fn default_max_response_mb() -> u64 {
    64
}

/// `[gateway]`: rate limits on offloaded calls, as token buckets: each call takes a token; an
/// empty bucket answers `Busy` with the time until the next token. Absent rates are unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Calls per second one device may offload (all models together).
    #[serde(default)]
    pub device_calls_per_s: Option<f64>,
    /// Calls a device may make at once above its rate (the bucket's size; default one second's
    /// worth, at least 1).
    #[serde(default)]
    pub device_burst: Option<u32>,
    /// Calls per second one model may take from all devices together.
    #[serde(default)]
    pub model_calls_per_s: Option<f64>,
    /// The model bucket's size (default one second's worth, at least 1).
    #[serde(default)]
    pub model_burst: Option<u32>,
}

impl GatewaySection {
    pub(super) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (key, rate) in [
            ("gateway.device_calls_per_s", self.device_calls_per_s),
            ("gateway.model_calls_per_s", self.model_calls_per_s),
        ] {
            if let Some(r) = rate
                && !((0.001..=1e9).contains(&r))
            {
                problems.push((key, "must be from 0.001 to 1e9 calls a second".to_owned()));
            }
        }
        for (key, burst, rate) in [
            (
                "gateway.device_burst",
                self.device_burst,
                self.device_calls_per_s,
            ),
            (
                "gateway.model_burst",
                self.model_burst,
                self.model_calls_per_s,
            ),
        ] {
            if burst == Some(0) {
                problems.push((key, "must be at least 1".to_owned()));
            }
            if burst.is_some() && rate.is_none() {
                problems.push((
                    key,
                    "has no rate to go with it (set the matching *_calls_per_s)".to_owned(),
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_urls_are_checked() {
        assert_eq!(url_problem("http://10.0.0.5:8000"), None);
        assert_eq!(url_problem("http://triton.internal/v2-gw"), None);
        assert!(url_problem("https://x:1").is_some_and(|p| p.contains("not built")));
        assert!(url_problem("ftp://x").is_some());
        assert!(url_problem("http://").is_some());
        assert!(url_problem("http://x:99999").is_some());
        assert_eq!(
            url_problem("http://u:p@x:1"),
            Some("must not carry credentials")
        );
        assert_eq!(url_problem("http://[::1]:8000"), None);
        assert_eq!(url_problem("http://[::1]"), None);
        assert!(url_problem("http://x:1/?a=b").is_some());
        assert!(url_problem("http://:80").is_some());
    }

    #[test]
    fn patterns_match_names_and_prefixes() {
        let b: BackendSection = toml::from_str(
            "name = \"t\"\nreplicas = [\"http://a:1\"]\nmodels = [\"ranker\", \"search-*\"]",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(b.lists("ranker") && b.lists("search-a") && b.lists("search-"));
        assert!(!b.lists("ranker2") && !b.lists("searc"));
        assert!(b.problems().is_empty(), "{:?}", b.problems());
        assert_eq!(b.max_concurrency, 16);
    }
}
