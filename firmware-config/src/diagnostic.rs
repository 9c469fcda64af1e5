//! Configuration errors that point at the file, line, column and key, and suggest the nearest
//! valid key or value when a name is misspelt.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Where in the file (1-based line and column), when known.
    pub position: Option<(usize, usize)>,
    /// The dotted key the problem is about (`device.id`), when known.
    pub key: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// The source text of a configuration file, for turning spans and keys into positions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    pub(crate) file: &'a Path,
    pub(crate) text: &'a str,
}

impl<'a> Source<'a> {
    /// An error about the file as a whole.
    pub(crate) fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            position: None,
            key: None,
            message: message.into(),
        }
    }

    /// An error about `key` (dotted path), placed at the key if it is in the file, else at its
    /// table's header.
    pub(crate) fn key_error(&self, key: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            position: self.locate(key),
            key: Some(key.to_owned()),
            message: format!("{key}: {message}"),
        }
    }

    /// Turns a TOML/serde error into a located message, rewriting serde's "unknown field" and
    /// "unknown variant" messages into ones that suggest the nearest valid name.
    pub(crate) fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let position = span.as_ref().map(|s| self.position(s.start));
        let key = span.as_ref().and_then(|s| self.key_at(s.clone()));
        let raw = error.message().trim_end_matches('\n');
        let message = if let Some((name, expected)) = parse_unknown(raw, "unknown field `") {
            let full = match key.as_deref().and_then(|k| k.rsplit_once('.')) {
                Some((table, _)) => format!("{table}.{name}"),
                None => name.clone(),
            };
            format!("unknown key {full:?}{}", suggestion(&name, &expected))
        } else if let Some((value, expected)) = parse_unknown(raw, "unknown variant `") {
            let at = key
                .as_deref()
                .map(|k| format!(" for {k}"))
                .unwrap_or_default();
            format!(
                "unknown value {value:?}{at}{}",
                suggestion(&value, &expected)
            )
        } else if let Some(field) = raw
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            let table = key.as_deref().unwrap_or_default();
            let full = if table.is_empty() {
                field.to_owned()
            } else {
                format!("{table}.{field}")
            };
            format!("missing key {full:?}")
        } else {
            match &key {
                Some(k) => format!("{k}: {raw}"),
                None => raw.to_owned(),
            }
        };
        ConfigError {
            file: self.file.to_owned(),
            position,
            key,
            message,
        }
    }

    /// 1-based line and column (in characters) of byte `offset`.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..floor_char_boundary(self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    /// The dotted key at a span: the table header above it and the key on its line.
    fn key_at(&self, span: Range<usize>) -> Option<String> {
        let start = floor_char_boundary(self.text, span.start);
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next().unwrap_or_default();
        let table = self.text[..line_start].lines().rev().find_map(table_header);
        if let Some(header) = table_header(line) {
            return Some(header);
        }
        let key = line
            .split_once('=')
            .map(|(k, _)| clean_key(k))
            .filter(|k| !k.is_empty());
        match (table, key) {
            (Some(t), Some(k)) => Some(format!("{t}.{k}")),
            (None, Some(k)) => Some(k),
            (Some(t), None) => Some(t),
            (None, None) => None,
        }
    }

    /// Where dotted `key` is written: its `key =` line inside its table, or the table header.
    fn locate(&self, key: &str) -> Option<(usize, usize)> {
        let (table, leaf) = match key.rsplit_once('.') {
            Some((t, l)) => (Some(t), l),
            None => (None, key),
        };
        let mut in_table = table.is_none();
        let mut header_at = None;
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            if let Some(header) = table_header(line) {
                in_table = Some(header.as_str()) == table;
                if in_table {
                    header_at = Some(offset + (line.len() - line.trim_start().len()));
                }
            } else if in_table
                && let Some((k, _)) = line.split_once('=')
                && clean_key(k) == leaf
            {
                return Some(self.position(offset + (line.len() - line.trim_start().len())));
            }
            offset += line.len();
        }
        header_at.map(|o| self.position(o))
    }
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

fn clean_key(raw: &str) -> String {
    raw.trim().trim_matches('"').trim_matches('\'').to_owned()
}

/// `[a.b]` or `[[a.b]]` → `a.b`.
fn table_header(line: &str) -> Option<String> {
    let line = line.split('#').next()?.trim();
    let inner = line
        .strip_prefix("[[")
        .and_then(|l| l.strip_suffix("]]"))
        .or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')))?;
    Some(
        inner
            .split('.')
            .map(clean_key)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`", or "there
/// are no fields") into the name and the valid names.
fn parse_unknown(message: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(prefix)?;
    let (name, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((name.to_owned(), expected))
}

/// ", did you mean "x"?" for the closest of `valid`, or the list of valid names.
pub(crate) fn suggestion(name: &str, valid: &[String]) -> String {
    let best = valid
        .iter()
        .map(|v| {
            (
                strsim::damerau_levenshtein(&name.to_lowercase(), &v.to_lowercase()),
                v,
            )
        })
        .min_by_key(|(d, _)| *d);
    match best {
        Some((distance, v)) if distance <= (v.chars().count() / 3).max(1) + 1 => {
            format!(", did you mean {v:?}?")
        }
        _ if valid.is_empty() => String::new(),
        _ => format!(" (expected one of: {})", valid.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_nearest_name() {
        let valid: Vec<String> = ["device", "fleet", "coordinator", "mqtt"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            suggestion("coordinater", &valid),
            ", did you mean \"coordinator\"?"
        );
        assert_eq!(suggestion("mqt", &valid), ", did you mean \"mqtt\"?");
        assert!(suggestion("zzzzzz", &valid).contains("expected one of: device, fleet"));
    }

    #[test]
    fn positions_are_one_based_in_characters() {
        let src = Source {
            file: Path::new("a.toml"),
            text: "x = 1\n[t]\n  ü = 2\n",
        };
        assert_eq!(src.position(0), (1, 1));
        assert_eq!(src.position(6), (2, 1));
        assert_eq!(src.position(14), (3, 4));
        assert_eq!(src.locate("t.ü"), Some((3, 3)));
        assert_eq!(src.locate("t.missing"), Some((2, 1)));
        assert_eq!(src.locate("x"), Some((1, 1)));
    }

    #[test]
    fn parses_serde_unknown_messages() {
        let (name, expected) = parse_unknown(
            "unknown field `coordinater`, expected one of `device`, `coordinator`",
            "unknown field `",
        )
        .unwrap();
        assert_eq!(name, "coordinater");
        assert_eq!(expected, vec!["device", "coordinator"]);
        let (name, expected) =
            parse_unknown("unknown field `x`, there are no fields", "unknown field `").unwrap();
        assert_eq!(name, "x");
        assert!(expected.is_empty());
    }
}
