//! Inventory filters: the conditions that pick devices for a dynamic group, a
//! deployment or a device listing. A filter is a list of conditions that must all
//! hold, each written as text:
//!
//! | text            | holds when the attribute                 |
//! |-----------------|------------------------------------------|
//! | `name=value`    | is `value`                               |
//! | `name!=value`   | is missing or not `value`                |
//! | `name^=prefix`  | starts with `prefix`                     |
//! | `name?`         | is present                               |
//!
//! Attribute names are 1 to 128 characters of `A-Z a-z 0-9 _ . - :`.

use std::collections::BTreeMap;
use std::fmt;

/// The most conditions one filter may have.
pub const CONDITIONS_MAX: usize = 32;

/// How a condition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Equal.
    Eq,
    /// Missing or not equal.
    Ne,
    /// Starts with.
    Prefix,
    /// Present.
    Exists,
}

/// One condition on one inventory attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The attribute's name.
    pub attribute: String,
    /// The comparison.
    pub op: Op,
    /// The value compared with (empty for [`Op::Exists`]).
    pub value: String,
}

/// Why a condition's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// No operator (`=`, `!=`, `^=`, trailing `?`) in the text.
    #[error("condition {0:?} has no operator (use name=value, name!=value, name^=prefix or name?)")]
    NoOperator(String),
    /// The attribute name is empty, too long or has other characters.
    #[error("condition {0:?}: attribute names are 1 to 128 characters of A-Z a-z 0-9 _ . - :")]
    BadName(String),
    /// The value is longer than 1024 bytes.
    #[error("condition {0:?}: the value is longer than 1024 bytes")]
    ValueTooLong(String),
    /// More conditions than [`CONDITIONS_MAX`].
    #[error("a filter has at most {CONDITIONS_MAX} conditions")]
    TooMany,
}

/// Whether `name` is a valid attribute name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

impl Condition {
    /// Parses one condition's text.
    pub fn parse(text: &str) -> Result<Condition, FilterError> {
        let (attribute, op, value) = if let Some(name) = text.strip_suffix('?') {
            (name, Op::Exists, "")
        } else if let Some((name, value)) = text.split_once("!=") {
            (name, Op::Ne, value)
        } else if let Some((name, value)) = text.split_once("^=") {
            (name, Op::Prefix, value)
        } else if let Some((name, value)) = text.split_once('=') {
            (name, Op::Eq, value)
        } else {
            return Err(FilterError::NoOperator(text.to_owned()));
        };
        if !valid_name(attribute) {
            return Err(FilterError::BadName(text.to_owned()));
        }
        if value.len() > 1024 {
            return Err(FilterError::ValueTooLong(text.to_owned()));
        }
        Ok(Condition {
            attribute: attribute.to_owned(),
            op,
            value: value.to_owned(),
        })
    }

    /// Whether the condition holds for a device's inventory.
    pub fn matches(&self, inventory: &BTreeMap<String, String>) -> bool {
        let v = inventory.get(&self.attribute);
        match self.op {
            Op::Eq => v.is_some_and(|v| *v == self.value),
            Op::Ne => v.is_none_or(|v| *v != self.value),
            Op::Prefix => v.is_some_and(|v| v.starts_with(&self.value)),
            Op::Exists => v.is_some(),
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Op::Eq => write!(f, "{}={}", self.attribute, self.value),
            Op::Ne => write!(f, "{}!={}", self.attribute, self.value),
            Op::Prefix => write!(f, "{}^={}", self.attribute, self.value),
            Op::Exists => write!(f, "{}?", self.attribute),
        }
    }
}

/// Parses a filter (all conditions must hold).
pub fn parse(texts: &[String]) -> Result<Vec<Condition>, FilterError> {
    if texts.len() > CONDITIONS_MAX {
        return Err(FilterError::TooMany);
    }
    texts.iter().map(|t| Condition::parse(t)).collect()
}

/// Whether every condition holds.
pub fn matches(filter: &[Condition], inventory: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|c| c.matches(inventory))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_and_matches_each_operator() {
        let i = inv(&[("device_type", "rpi4"), ("site", "berlin-2")]);
        let t = |s: &str| Condition::parse(s).unwrap().matches(&i);
        assert!(t("device_type=rpi4"));
        assert!(!t("device_type=rpi3"));
        assert!(t("device_type!=rpi3"));
        assert!(t("missing!=x"));
        assert!(!t("device_type!=rpi4"));
        assert!(t("site^=berlin"));
        assert!(!t("site^=paris"));
        assert!(t("site?"));
        assert!(!t("missing?"));
        // A value may hold operator characters.
        assert_eq!(Condition::parse("a=b=c").unwrap().value, "b=c");
    }

    #[test]
    fn display_round_trips() {
        for s in ["a=b", "a!=b", "a^=b", "a?", "a="] {
            assert_eq!(Condition::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn malformed_conditions_are_refused_with_the_reason() {
        assert_eq!(
            Condition::parse("noop"),
            Err(FilterError::NoOperator("noop".into()))
        );
        assert_eq!(
            Condition::parse("=x"),
            Err(FilterError::BadName("=x".into()))
        );
        assert_eq!(
            Condition::parse("a b=x"),
            Err(FilterError::BadName("a b=x".into()))
        );
        let long = format!("a={}", "x".repeat(1025));
        assert_eq!(
            Condition::parse(&long),
            Err(FilterError::ValueTooLong(long.clone()))
        );
        let many: Vec<String> = (0..33).map(|i| format!("a{i}=x")).collect();
        assert_eq!(parse(&many), Err(FilterError::TooMany));
    }
}
