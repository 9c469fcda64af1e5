//! Bounded CBOR: every payload Outpost sends (manifests, status, frames) goes through here, so the
//! size limit and the "one value, nothing after it" rule are checked in one place.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why bytes could not be read or written as CBOR.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CborError {
    /// The payload is larger than the limit for its kind.
    #[error("{what} is {len} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// What was being read or written.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not a valid CBOR encoding of the expected type.
    #[error("{what} is not valid: {reason}")]
    Invalid {
        /// What was being read.
        what: &'static str,
        /// The decoder's reason.
        reason: String,
    },
    /// The bytes hold one valid value followed by more bytes.
    #[error("{what} has {extra} unexpected bytes after its end")]
    TrailingBytes {
        /// What was being read.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// The value could not be encoded (a serializer error; not caused by input).
    #[error("could not encode {what}: {reason}")]
    Encode {
        /// What was being written.
        what: &'static str,
        /// The encoder's reason.
        reason: String,
    },
}

/// Encodes `value`, refusing results over `limit` bytes.
pub fn encode<T: Serialize>(
    what: &'static str,
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, CborError> {
    let mut out = Vec::new();
    encode_into(what, value, &mut out)?;
    if out.len() > limit {
        return Err(CborError::TooLarge {
            what,
            len: out.len(),
            limit,
        });
    }
    Ok(out)
}

/// Appends the encoding of `value` to `out` (no limit; callers check).
pub(crate) fn encode_into<T: Serialize>(
    what: &'static str,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CborError> {
    ciborium::into_writer(value, out).map_err(|e| CborError::Encode {
        what,
        reason: e.to_string(),
    })
}

/// Decodes exactly one value from `bytes`, which must be at most `limit` bytes long.
///
/// The decoder never allocates much more than the input's size: byte strings grow as they are
/// read, and nesting is bounded by ciborium's recursion limit.
pub fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    limit: usize,
) -> Result<T, CborError> {
    if bytes.len() > limit {
        return Err(CborError::TooLarge {
            what,
            len: bytes.len(),
            limit,
        });
    }
    let mut rest = bytes;
    let value = ciborium::from_reader(&mut rest).map_err(|e| CborError::Invalid {
        what,
        reason: describe(e),
    })?;
    if !rest.is_empty() {
        return Err(CborError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

fn describe<E: std::fmt::Debug>(error: ciborium::de::Error<E>) -> String {
    match error {
        ciborium::de::Error::Io(e) => format!("truncated or unreadable ({e:?})"),
        ciborium::de::Error::Syntax(offset) => format!("malformed CBOR at byte {offset}"),
        ciborium::de::Error::Semantic(Some(offset), msg) => format!("{msg} (at byte {offset})"),
        ciborium::de::Error::Semantic(None, msg) => msg,
        ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".to_owned(),
    }
}
