//! Small validated value types shared by both configs.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A `host:port` address: a DNS name or an IP address (IPv6 in brackets), and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// The host name or IP address (without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl HostPort {
    /// Whether the host is an IP address rather than a name.
    pub fn is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Text that is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a HOST:PORT address ({reason})")]
pub struct BadHostPort {
    text: String,
    reason: &'static str,
}

impl FromStr for HostPort {
    type Err = BadHostPort;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason| BadHostPort {
            text: text.chars().take(80).collect(),
            reason,
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => {
                v6.parse::<std::net::Ipv6Addr>()
                    .map_err(|_| bad("bad IPv6 address in brackets"))?;
                v6
            }
            None if host.contains(':') => {
                return Err(bad("write IPv6 addresses in brackets, as [::1]:4433"));
            }
            None => host,
        };
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid_name && host.parse::<IpAddr>().is_err() {
            return Err(bad("the host must be a DNS name or an IP address"));
        }
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A model or device name, checked against Outpost's naming rule (see `outpost_shared::topic`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = outpost_shared::TopicError;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        outpost_shared::topic::validate_name(outpost_shared::topic::NameKind::Device, &id)?;
        Ok(DeviceId(id))
    }
}

impl FromStr for DeviceId {
    type Err = outpost_shared::TopicError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        Self::try_from(id.to_owned())
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_parse_and_print() {
        for (text, host, port) in [
            ("localhost:4433", "localhost", 4433),
            ("127.0.0.1:1883", "127.0.0.1", 1883),
            ("[::1]:4433", "::1", 4433),
            ("coord-1.example.com:0", "coord-1.example.com", 0),
        ] {
            let hp: HostPort = text.parse().unwrap();
            assert_eq!((hp.host.as_str(), hp.port), (host, port));
            assert_eq!(hp.to_string(), text);
        }
        for bad in [
            "localhost",
            "::1:4433",
            "host:99999",
            ":80",
            "a_b:1",
            "[nope]:1",
            "-a:1",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad} accepted");
        }
    }
}
