//! Inventory filters in the API: the language is `shoal_fleet::filter`'s (so the
//! server and the fleet simulator pick devices alike), e.g.
//! `device_type=acme-board and region in (eu,us) and ram_mb >= 512`, also `!=`,
//! `not in (...)`, `exists`, `not exists`, `<`, `<=`, `>`. The API takes a list of
//! such texts (repeated `filter=` query parameters, `--where` options, a JSON list):
//! a device matches when every one holds.

use std::collections::BTreeMap;

use shoal_fleet::filter::{Filter, Inventory, ParseError, TERMS_MAX};

/// The longest filter text the API takes (each of a list), in bytes: 32 of them
/// still fit in a URL.
pub const TEXT_LEN_MAX: usize = 1024;

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// One text does not parse.
    #[error("filter {text:?}: {source}")]
    Parse {
        /// The text.
        text: String,
        /// Why.
        source: ParseError,
    },
    /// One text is longer than [`TEXT_LEN_MAX`] bytes.
    #[error("a filter text is at most {TEXT_LEN_MAX} bytes")]
    TooLong,
    /// More terms in all than a filter may have.
    #[error("a filter has at most {TERMS_MAX} terms in all")]
    TooMany,
}

/// Whether `name` is a valid attribute (or group) name: 1 to 128 characters of
/// `A-Z a-z 0-9 _ . - :`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

/// Parses a list of filter texts into one filter (`None`: the list is empty and
/// every device matches).
pub fn parse(texts: &[String]) -> Result<Option<Filter>, FilterError> {
    let mut terms = Vec::new();
    for text in texts {
        if text.len() > TEXT_LEN_MAX {
            return Err(FilterError::TooLong);
        }
        let f: Filter = text.parse().map_err(|source| FilterError::Parse {
            text: text.clone(),
            source,
        })?;
        terms.extend_from_slice(f.terms());
    }
    if terms.is_empty() {
        return Ok(None);
    }
    Filter::new(terms).map(Some).ok_or(FilterError::TooMany)
}

/// Whether a device's inventory satisfies `filter` (`None` matches every device).
pub fn matches(filter: &Option<Filter>, inventory: &BTreeMap<String, String>) -> bool {
    let Some(filter) = filter else {
        return true;
    };
    let mut inv = Inventory::new();
    for (k, v) in inventory {
        inv.insert(k.clone(), v.clone());
    }
    filter.matches(&inv)
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

    fn texts(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_text_must_hold() {
        let i = inv(&[
            ("device_type", "rpi4"),
            ("site", "berlin"),
            ("ram_mb", "1024"),
        ]);
        let f = |t: &[&str]| matches(&parse(&texts(t)).unwrap(), &i);
        assert!(f(&[]));
        assert!(f(&["device_type=rpi4"]));
        assert!(f(&["device_type=rpi4", "site in (berlin,paris)"]));
        assert!(!f(&["device_type=rpi4", "site=paris"]));
        assert!(f(&["ram_mb >= 512 and site exists"]));
        assert!(!f(&["missing exists"]));
        assert!(f(&["missing!=x"]));
    }

    #[test]
    fn malformed_filters_are_refused_with_the_text() {
        match parse(&texts(&["device_type=rpi4", "nonsense"])) {
            Err(FilterError::Parse { text, .. }) => assert_eq!(text, "nonsense"),
            other => panic!("{other:?}"),
        }
        let long = format!("a={}", "x".repeat(TEXT_LEN_MAX));
        assert_eq!(parse(&[long]), Err(FilterError::TooLong));
        let many: Vec<String> = (0..33).map(|i| format!("a{i}=x")).collect();
        assert_eq!(parse(&many), Err(FilterError::TooMany));
    }
}
