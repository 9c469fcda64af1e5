//! MQTT topic names, and the model and device names they carry.
//!
//! Names are restricted to what is safe in a topic level, a URL path segment and a file name:
//! 1 to [`MAX_NAME_LEN`] ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit.

/// Every Outpost topic starts with this.
pub const PREFIX: &str = "outpost/v1/";
/// The longest model or device name.
pub const MAX_NAME_LEN: usize = 128;
/// Subscription filter for every model's manifest.
pub const ALL_MANIFESTS: &str = "outpost/v1/models/+/manifest";
/// Subscription filter for every device's status.
pub const ALL_DEVICE_STATUS: &str = "outpost/v1/devices/+/status";

/// What a name names, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A model name.
    Model,
    /// A device id.
    Device,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::Model => "model name",
            NameKind::Device => "device id",
        })
    }
}

/// A bad name or a topic that is not one of Outpost's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// A model or device name breaks the naming rule.
    #[error("{kind} {name:?} is invalid: {reason}")]
    BadName {
        /// What the name was for.
        kind: NameKind,
        /// The name, cut to 80 characters.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The topic does not have one of Outpost's shapes.
    #[error(
        "topic {topic:?} is not an Outpost topic (expected {PREFIX}models/NAME/manifest or {PREFIX}devices/ID/status)"
    )]
    Unknown {
        /// The topic, cut to 200 characters.
        topic: String,
    },
}

/// Checks `name` against the naming rule.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), TopicError> {
    let bad = |reason| TopicError::BadName {
        kind,
        name: name.chars().take(80).collect(),
        reason,
    };
    let first = name.chars().next().ok_or_else(|| bad("it is empty"))?;
    if name.len() > MAX_NAME_LEN {
        return Err(bad("it is longer than 128 characters"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(bad("it must start with a letter or a digit"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad(
            "only ASCII letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

/// A parsed Outpost topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `outpost/v1/models/{model}/manifest`: the model's signed release (retained).
    Manifest {
        /// The model's name.
        model: String,
    },
    /// `outpost/v1/devices/{device}/status`: the device's status (retained, last will).
    DeviceStatus {
        /// The device's id.
        device: String,
    },
}

impl Topic {
    /// The manifest topic of `model`.
    pub fn manifest(model: &str) -> Result<Self, TopicError> {
        validate_name(NameKind::Model, model)?;
        Ok(Topic::Manifest {
            model: model.to_owned(),
        })
    }

    /// The status topic of `device`.
    pub fn device_status(device: &str) -> Result<Self, TopicError> {
        validate_name(NameKind::Device, device)?;
        Ok(Topic::DeviceStatus {
            device: device.to_owned(),
        })
    }

    /// Parses a topic name received from a broker.
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let unknown = || TopicError::Unknown {
            topic: topic.chars().take(200).collect(),
        };
        let rest = topic.strip_prefix(PREFIX).ok_or_else(unknown)?;
        let mut levels = rest.split('/');
        let parsed = match (levels.next(), levels.next(), levels.next(), levels.next()) {
            (Some("models"), Some(model), Some("manifest"), None) => Topic::manifest(model)?,
            (Some("devices"), Some(device), Some("status"), None) => Topic::device_status(device)?,
            _ => return Err(unknown()),
        };
        Ok(parsed)
    }

    /// The topic's name on the broker.
    pub fn name(&self) -> String {
        match self {
            Topic::Manifest { model } => format!("{PREFIX}models/{model}/manifest"),
            Topic::DeviceStatus { device } => format!("{PREFIX}devices/{device}/status"),
        }
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn builds_the_documented_topics() {
        assert_eq!(
            Topic::manifest("video-ranker").unwrap().name(),
            "outpost/v1/models/video-ranker/manifest"
        );
        assert_eq!(
            Topic::device_status("demo-0001").unwrap().name(),
            "outpost/v1/devices/demo-0001/status"
        );
    }

    #[test]
    fn rejects_names_that_break_topics() {
        for bad in [
            "", "a/b", "a+b", "a#", "+", "#", ".hidden", "-x", "a b", "ü", "a\0b",
        ] {
            assert!(Topic::manifest(bad).is_err(), "{bad:?} accepted");
            assert!(Topic::device_status(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Topic::manifest(&"a".repeat(128)).is_ok());
        let err = Topic::manifest(&"a".repeat(129)).unwrap_err();
        assert!(err.to_string().contains("longer than 128"), "{err}");
    }

    #[test]
    fn rejects_foreign_topics() {
        for bad in [
            "outpost/v1/models/x",
            "outpost/v1/models/x/manifest/extra",
            "outpost/v2/models/x/manifest",
            "outpost/v1/devices/x/manifest",
            "outpost/v1/models/a+b/manifest",
            "",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn filters_match_the_builders() {
        assert_eq!(
            ALL_MANIFESTS.replace('+', "m"),
            Topic::manifest("m").unwrap().name()
        );
        assert_eq!(
            ALL_DEVICE_STATUS.replace('+', "d"),
            Topic::device_status("d").unwrap().name()
        );
    }

    proptest! {
        #[test]
        fn round_trips(name in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}") {
            let m = Topic::manifest(&name).unwrap();
            prop_assert_eq!(Topic::parse(&m.name()).unwrap(), m);
            let d = Topic::device_status(&name).unwrap();
            prop_assert_eq!(Topic::parse(&d.name()).unwrap(), d);
        }

        #[test]
        fn parse_never_panics(topic in ".{0,200}") {
            let _ = Topic::parse(&topic);
        }
    }
}
