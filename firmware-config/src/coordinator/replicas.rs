//! `[registry.shared]`: the object store that coordinator replicas share, so that every
//! replica serves every model's chunks and releases.

use outpost_shared::PublicKey;
use serde::{Deserialize, Serialize};

/// `[registry.shared]`: chunks and signed release records in an object store, shared by several
/// coordinators. S3 credentials come from the environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, and `AWS_SESSION_TOKEN` where used), never from this file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStoreSection {
    /// `file:///ABSOLUTE/PATH` (a local or network file system every replica mounts) or
    /// `s3://BUCKET` / `s3://BUCKET/PREFIX` (an S3 or S3-compatible store).
    pub url: String,
    /// How often the store is looked at for releases other replicas wrote, milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// How long one request to the store may take, milliseconds.
    #[serde(default = "default_store_timeout_ms")]
    pub timeout_ms: u64,
    /// S3: the endpoint of an S3-compatible store (`http://127.0.0.1:9000`); AWS's when unset.
    pub endpoint: Option<String>,
    /// S3: the region.
    #[serde(default = "default_region")]
    pub region: String,
    /// The manifest-signing public keys (hex) of the other replicas, when each signs with its own
    /// key (list the same keys in the agents' `fleet.manifest_keys`). Replicas that share this
    /// coordinator's signing key need nothing here.
    #[serde(default)]
    pub manifest_keys: Vec<PublicKey>,
}

const fn default_poll_ms() -> u64 {
    1000
}

const fn default_store_timeout_ms() -> u64 {
    10_000
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

/// Where a shared store is, as its URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedStoreLocation {
    /// A folder (absolute path).
    Folder(std::path::PathBuf),
    /// An S3 bucket and a key prefix (empty, or ending without '/').
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix inside it.
        prefix: String,
    },
}

impl SharedStoreSection {
    /// Where the store is, or what is wrong with `url`.
    pub fn location(&self) -> Result<SharedStoreLocation, String> {
        let url = self.url.as_str();
        if let Some(path) = url.strip_prefix("file://") {
            let path = std::path::Path::new(path);
            if !path.is_absolute() {
                return Err(format!(
                    "{url:?}: a file:// URL needs an absolute path (file:///srv/outpost/registry)"
                ));
            }
            return Ok(SharedStoreLocation::Folder(path.to_owned()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c))
                && !bucket.starts_with(['.', '-'])
                && !bucket.ends_with(['.', '-'])
                && !bucket.contains("..")
                && bucket.parse::<std::net::Ipv4Addr>().is_err();
            if !valid {
                return Err(format!(
                    "{url:?}: {bucket:?} is not an S3 bucket name (3 to 63 lowercase letters, digits, '.', '-')"
                ));
            }
            let prefix = prefix.trim_end_matches('/');
            if prefix.starts_with('/')
                || prefix.split('/').any(|p| p == "." || p == "..")
                || prefix.contains("//")
                || prefix
                    .chars()
                    .any(|c| c.is_control() || c == '\\' || c == '*')
            {
                return Err(format!("{url:?}: {prefix:?} is not a usable key prefix"));
            }
            return Ok(SharedStoreLocation::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        Err(format!(
            "{url:?}: the shared store must be file:///PATH or s3://BUCKET[/PREFIX]"
        ))
    }

    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.location() {
            Err(problem) => problems.push(problem),
            Ok(SharedStoreLocation::Folder(_)) if self.endpoint.is_some() => {
                problems.push("endpoint is for s3:// stores only".to_owned())
            }
            Ok(_) => {}
        }
        if let Some(endpoint) = &self.endpoint {
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"));
            let host = rest.map(|r| r.strip_suffix('/').unwrap_or(r));
            if host.is_none_or(|h| {
                h.is_empty() || h.contains(|c: char| c.is_whitespace() || "/?#@".contains(c))
            }) {
                problems.push(format!(
                    "endpoint {endpoint:?} must be http://HOST:PORT or https://HOST[:PORT], without a path"
                ));
            }
        }
        if !(100..=3_600_000).contains(&self.poll_ms) {
            problems.push("poll_ms must be from 100 to 3600000".to_owned());
        }
        if !(100..=600_000).contains(&self.timeout_ms) {
            problems.push("timeout_ms must be from 100 to 600000".to_owned());
        }
        if self.region.is_empty() {
            problems.push("region must not be empty".to_owned());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(url: &str) -> SharedStoreSection {
        SharedStoreSection {
            url: url.to_owned(),
            poll_ms: default_poll_ms(),
            timeout_ms: default_store_timeout_ms(),
            endpoint: None,
            region: default_region(),
            manifest_keys: Vec::new(),
        }
    }

    #[test]
    fn locations_are_read_and_bad_ones_named() {
        assert_eq!(
            section("file:///srv/registry").location(),
            Ok(SharedStoreLocation::Folder("/srv/registry".into()))
        );
        assert_eq!(
            section("s3://models/fleet-a/").location(),
            Ok(SharedStoreLocation::S3 {
                bucket: "models".into(),
                prefix: "fleet-a".into()
            })
        );
        assert_eq!(
            section("s3://models").location(),
            Ok(SharedStoreLocation::S3 {
                bucket: "models".into(),
                prefix: String::new()
            })
        );
        for (url, says) in [
            ("file://relative/path", "absolute path"),
            ("s3://A_Bucket/x", "not an S3 bucket name"),
            ("s3://models/../x", "not a usable key prefix"),
            ("s3://models//x", "not a usable key prefix"),
            ("s3://a..b", "not an S3 bucket name"),
            ("s3://-models", "not an S3 bucket name"),
            ("s3://10.0.0.1", "not an S3 bucket name"),
            ("gs://models", "file:///PATH or s3://"),
        ] {
            let problems = section(url).problems();
            assert!(
                problems.iter().any(|p| p.contains(says)),
                "{url}: {problems:?}"
            );
        }
    }

    #[test]
    fn endpoints_and_intervals_are_checked() {
        let mut s = section("s3://models");
        s.endpoint = Some("127.0.0.1:9000".into());
        s.poll_ms = 10;
        s.timeout_ms = 0;
        let problems = s.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        for bad in ["http://h:9000/path", "https://h/?x=1", "http://user@h"] {
            s.endpoint = Some(bad.into());
            assert!(
                s.problems().iter().any(|p| p.contains("without a path")),
                "{bad}"
            );
        }
        s.endpoint = Some("https://s3.eu-central-1.amazonaws.com/".into());
        s.poll_ms = 1000;
        s.timeout_ms = 1000;
        assert!(s.problems().is_empty(), "{:?}", s.problems());
        let mut f = section("file:///srv/registry");
        f.endpoint = Some("http://127.0.0.1:9000".into());
        assert_eq!(f.problems(), vec!["endpoint is for s3:// stores only"]);
    }
}
