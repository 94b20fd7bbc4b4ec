//! Inventory filters: the condition behind a dynamic group and a filtered device list.
//!
//! A [`Filter`] is an AND of [`Term`]s over a device's [`Inventory`]. Its text form is
//! small and readable, e.g. `device_type=acme-board and region in (eu,us) and ram_mb >= 512`:
//!
//! ```text
//! filter    := term ("and" term)*
//! term      := attribute "=" value          any value equals
//!            | attribute "!=" value         no value equals (also true when absent)
//!            | attribute "in" "(" value ("," value)* ")"
//!            | attribute "not" "in" "(" value ("," value)* ")"
//!            | attribute "exists" | attribute "not" "exists"
//!            | attribute ("<" | "<=" | ">" | ">=") number
//! attribute := word | quoted
//! value     := word | quoted
//! word      := one or more characters other than white space and = ! < > ( ) , "
//! quoted    := '"' characters, with \" and \\ as the only escapes '"'
//! ```
//!
//! Keywords (`and`, `in`, `not`, `exists`) are case-insensitive and only keywords where
//! the grammar expects one, so `and=1` is a term on an attribute named `and`. An
//! attribute may have several values (inventory scripts may print a key more than once,
//! as with Mender): `=`, `in` and the comparisons hold when *any* value satisfies them,
//! `!=` and `not in` when *none* does. A comparison holds only for values that parse as
//! finite decimal numbers. [`Filter`]'s `Display` writes the canonical text form, which
//! parses back to an equal filter; serde stores a filter as that text, so a stored filter
//! is checked again when it is loaded.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most bytes a filter's text may have.
pub const TEXT_LEN_MAX: usize = 4096;
/// The most terms one filter may have.
pub const TERMS_MAX: usize = 32;
/// The most values one `in (...)` list may have.
pub const LIST_LEN_MAX: usize = 256;

/// A device's inventory: attribute name → values (usually one), as the device last
/// reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Inventory(BTreeMap<String, Vec<String>>);

impl Inventory {
    /// An empty inventory.
    pub fn new() -> Inventory {
        Inventory::default()
    }

    /// Add `value` to attribute `name` (after any values it already has).
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.entry(name.into()).or_default().push(value.into());
    }

    /// The values of attribute `name` (empty if absent).
    pub fn get(&self, name: &str) -> &[String] {
        self.0.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// All attributes in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Inventory {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Inventory {
        let mut inventory = Inventory::new();
        for (k, v) in iter {
            inventory.insert(k, v);
        }
        inventory
    }
}

/// What one term requires of an attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Some value equals this one.
    Eq(String),
    /// No value equals this one (true when the attribute is absent).
    Ne(String),
    /// Some value is one of these.
    In(Vec<String>),
    /// No value is one of these (true when the attribute is absent).
    NotIn(Vec<String>),
    /// The attribute has at least one value.
    Exists,
    /// The attribute is absent.
    NotExists,
    /// Some value is a number less than this one.
    Lt(f64),
    /// Some value is a number less than or equal to this one.
    Le(f64),
    /// Some value is a number greater than this one.
    Gt(f64),
    /// Some value is a number greater than or equal to this one.
    Ge(f64),
}

/// One condition on one attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Term {
    /// The inventory attribute's name.
    pub attribute: String,
    /// What its values must satisfy.
    pub condition: Condition,
}

impl Term {
    /// Whether `inventory` satisfies this term.
    pub fn matches(&self, inventory: &Inventory) -> bool {
        let values = inventory.get(&self.attribute);
        let numbers = || values.iter().filter_map(|v| parse_number(v));
        match &self.condition {
            Condition::Eq(want) => values.iter().any(|v| v == want),
            Condition::Ne(want) => values.iter().all(|v| v != want),
            Condition::In(set) => values.iter().any(|v| set.contains(v)),
            Condition::NotIn(set) => values.iter().all(|v| !set.contains(v)),
            Condition::Exists => !values.is_empty(),
            Condition::NotExists => values.is_empty(),
            Condition::Lt(n) => numbers().any(|v| v < *n),
            Condition::Le(n) => numbers().any(|v| v <= *n),
            Condition::Gt(n) => numbers().any(|v| v > *n),
            Condition::Ge(n) => numbers().any(|v| v >= *n),
        }
    }
}

/// A finite decimal number, or nothing (`nan`, `inf` and non-numbers are not numbers).
fn parse_number(text: &str) -> Option<f64> {
    let looks_decimal = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
    if !looks_decimal {
        return None;
    }
    text.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// An AND of at least one [`Term`]. Parse one with [`str::parse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Filter {
    terms: Vec<Term>,
}

impl Filter {
    /// A filter from terms; `None` if there are none or more than [`TERMS_MAX`].
    pub fn new(terms: Vec<Term>) -> Option<Filter> {
        (!terms.is_empty() && terms.len() <= TERMS_MAX).then_some(Filter { terms })
    }

    /// The terms, in the order written.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// Whether `inventory` satisfies every term.
    pub fn matches(&self, inventory: &Inventory) -> bool {
        self.terms.iter().all(|t| t.matches(inventory))
    }
}

impl TryFrom<String> for Filter {
    type Error = ParseError;

    fn try_from(text: String) -> Result<Filter, ParseError> {
        text.parse()
    }
}

impl From<Filter> for String {
    fn from(filter: Filter) -> String {
        filter.to_string()
    }
}

/// Why a filter's text was refused, with the byte offset where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text has no terms (a filter that matches every device must be explicit).
    #[error("the filter is empty; write at least one term such as `device_type=acme-board`")]
    Empty,
    /// The text is longer than [`TEXT_LEN_MAX`].
    #[error("the filter is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More than [`TERMS_MAX`] terms.
    #[error("the filter has more than {max} terms")]
    TooManyTerms {
        /// The limit.
        max: usize,
    },
    /// An `in (...)` list with more than [`LIST_LEN_MAX`] values.
    #[error("the list at byte {at} has more than {max} values")]
    TooManyValues {
        /// Where the list starts.
        at: usize,
        /// The limit.
        max: usize,
    },
    /// A term does not start with an attribute name.
    #[error("expected an attribute name at byte {at}, found {found}")]
    ExpectedAttribute {
        /// Byte offset.
        at: usize,
        /// What was there.
        found: String,
    },
    /// An attribute is not followed by an operator.
    #[error(
        "expected one of = != < <= > >= in, not in, exists, not exists at byte {at}, found {found}"
    )]
    ExpectedOperator {
        /// Byte offset.
        at: usize,
        /// What was there.
        found: String,
    },
    /// An operator is not followed by a value.
    #[error("expected a value at byte {at}, found {found}")]
    ExpectedValue {
        /// Byte offset.
        at: usize,
        /// What was there.
        found: String,
    },
    /// A comparison's operand is not a finite decimal number.
    #[error("expected a number at byte {at}, found {found}")]
    ExpectedNumber {
        /// Byte offset.
        at: usize,
        /// What was there.
        found: String,
    },
    /// Two terms not joined by `and` (only AND is supported).
    #[error("expected `and` or the end of the filter at byte {at}, found {found}")]
    ExpectedAnd {
        /// Byte offset.
        at: usize,
        /// What was there.
        found: String,
    },
    /// `in` or `not in` not followed by `(`.
    #[error("expected `(` to open the list at byte {at}, found {found}")]
    ExpectedList {
        /// Byte offset.
        at: usize,
        /// What was there.
        found: String,
    },
    /// A list with no values: `in ()`.
    #[error("the list at byte {at} is empty")]
    EmptyList {
        /// Where the list starts.
        at: usize,
    },
    /// A list value not followed by `,` or `)`.
    #[error("expected `,` or `)` in the list at byte {at}, found {found}")]
    UnclosedList {
        /// Byte offset.
        at: usize,
        /// What was there.
        found: String,
    },
    /// A `"` without its closing `"`.
    #[error("the quoted string starting at byte {at} is not closed")]
    UnterminatedString {
        /// Where the string starts.
        at: usize,
    },
    /// A backslash in a quoted string not followed by `"` or `\`.
    #[error("invalid escape at byte {at}; only \\\" and \\\\ are allowed")]
    InvalidEscape {
        /// Where the backslash is.
        at: usize,
    },
    /// A `!` not followed by `=`.
    #[error("unexpected `!` at byte {at}; did you mean `!=`?")]
    LoneBang {
        /// Byte offset.
        at: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Quoted(String),
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Open,
    Close,
    Comma,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("`{w}`"),
            Token::Quoted(q) => format!("\"{q}\""),
            Token::Eq => "`=`".into(),
            Token::Ne => "`!=`".into(),
            Token::Lt => "`<`".into(),
            Token::Le => "`<=`".into(),
            Token::Gt => "`>`".into(),
            Token::Ge => "`>=`".into(),
            Token::Open => "`(`".into(),
            Token::Close => "`)`".into(),
            Token::Comma => "`,`".into(),
        }
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(keyword))
    }
}

fn is_special(c: char) -> bool {
    c.is_whitespace() || matches!(c, '=' | '!' | '<' | '>' | '(' | ')' | ',' | '"')
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, ParseError> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '=' => Token::Eq,
            '(' => Token::Open,
            ')' => Token::Close,
            ',' => Token::Comma,
            '!' => match chars.next_if(|&(_, c)| c == '=') {
                Some(_) => Token::Ne,
                None => return Err(ParseError::LoneBang { at }),
            },
            '<' => match chars.next_if(|&(_, c)| c == '=') {
                Some(_) => Token::Le,
                None => Token::Lt,
            },
            '>' => match chars.next_if(|&(_, c)| c == '=') {
                Some(_) => Token::Ge,
                None => Token::Gt,
            },
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err(ParseError::UnterminatedString { at }),
                        Some((_, '"')) => break,
                        Some((esc, '\\')) => match chars.next() {
                            Some((_, c @ ('"' | '\\'))) => s.push(c),
                            _ => return Err(ParseError::InvalidEscape { at: esc }),
                        },
                        Some((_, c)) => s.push(c),
                    }
                }
                Token::Quoted(s)
            }
            c => {
                let mut s = String::from(c);
                while let Some((_, c)) = chars.next_if(|&(_, c)| !is_special(c)) {
                    s.push(c);
                }
                Token::Word(s)
            }
        };
        tokens.push((at, token));
    }
    Ok(tokens)
}

struct Parser {
    tokens: std::vec::IntoIter<(usize, Token)>,
    peeked: Option<(usize, Token)>,
    end: usize,
}

const END: &str = "the end of the filter";

impl Parser {
    fn peek(&mut self) -> Option<&(usize, Token)> {
        if self.peeked.is_none() {
            self.peeked = self.tokens.next();
        }
        self.peeked.as_ref()
    }

    fn next(&mut self) -> Option<(usize, Token)> {
        self.peek();
        self.peeked.take()
    }

    /// The next token, or the end position and a description of the end.
    fn next_or_end(&mut self) -> Result<(usize, Token), (usize, String)> {
        self.next().ok_or((self.end, END.to_owned()))
    }

    fn term(&mut self) -> Result<Term, ParseError> {
        let attribute = match self.next_or_end() {
            Ok((_, Token::Word(w) | Token::Quoted(w))) => w,
            Ok((at, t)) => {
                return Err(ParseError::ExpectedAttribute {
                    at,
                    found: t.describe(),
                });
            }
            Err((at, found)) => return Err(ParseError::ExpectedAttribute { at, found }),
        };
        let (at, op) = match self.next_or_end() {
            Ok(t) => t,
            Err((at, found)) => return Err(ParseError::ExpectedOperator { at, found }),
        };
        let condition = match op {
            Token::Eq => Condition::Eq(self.value()?),
            Token::Ne => Condition::Ne(self.value()?),
            Token::Lt => Condition::Lt(self.number()?),
            Token::Le => Condition::Le(self.number()?),
            Token::Gt => Condition::Gt(self.number()?),
            Token::Ge => Condition::Ge(self.number()?),
            ref t if t.is_keyword("exists") => Condition::Exists,
            ref t if t.is_keyword("in") => Condition::In(self.list()?),
            ref t if t.is_keyword("not") => match self.next_or_end() {
                Ok((_, t)) if t.is_keyword("exists") => Condition::NotExists,
                Ok((_, t)) if t.is_keyword("in") => Condition::NotIn(self.list()?),
                Ok((at, t)) => {
                    return Err(ParseError::ExpectedOperator {
                        at,
                        found: t.describe(),
                    });
                }
                Err((at, found)) => return Err(ParseError::ExpectedOperator { at, found }),
            },
            t => {
                return Err(ParseError::ExpectedOperator {
                    at,
                    found: t.describe(),
                });
            }
        };
        Ok(Term {
            attribute,
            condition,
        })
    }

    fn value(&mut self) -> Result<String, ParseError> {
        match self.next_or_end() {
            Ok((_, Token::Word(w) | Token::Quoted(w))) => Ok(w),
            Ok((at, t)) => Err(ParseError::ExpectedValue {
                at,
                found: t.describe(),
            }),
            Err((at, found)) => Err(ParseError::ExpectedValue { at, found }),
        }
    }

    fn number(&mut self) -> Result<f64, ParseError> {
        match self.next_or_end() {
            Ok((at, Token::Word(w) | Token::Quoted(w))) => {
                parse_number(&w).ok_or(ParseError::ExpectedNumber {
                    at,
                    found: format!("`{w}`"),
                })
            }
            Ok((at, t)) => Err(ParseError::ExpectedNumber {
                at,
                found: t.describe(),
            }),
            Err((at, found)) => Err(ParseError::ExpectedNumber { at, found }),
        }
    }

    fn list(&mut self) -> Result<Vec<String>, ParseError> {
        let start = match self.next_or_end() {
            Ok((at, Token::Open)) => at,
            Ok((at, t)) => {
                return Err(ParseError::ExpectedList {
                    at,
                    found: t.describe(),
                });
            }
            Err((at, found)) => return Err(ParseError::ExpectedList { at, found }),
        };
        if matches!(self.peek(), Some((_, Token::Close))) {
            return Err(ParseError::EmptyList { at: start });
        }
        let mut values = Vec::new();
        loop {
            if values.len() == LIST_LEN_MAX {
                return Err(ParseError::TooManyValues {
                    at: start,
                    max: LIST_LEN_MAX,
                });
            }
            values.push(self.value()?);
            match self.next_or_end() {
                Ok((_, Token::Comma)) => continue,
                Ok((_, Token::Close)) => return Ok(values),
                Ok((at, t)) => {
                    return Err(ParseError::UnclosedList {
                        at,
                        found: t.describe(),
                    });
                }
                Err((at, found)) => return Err(ParseError::UnclosedList { at, found }),
            }
        }
    }
}

impl FromStr for Filter {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Filter, ParseError> {
        if text.len() > TEXT_LEN_MAX {
            return Err(ParseError::TooLong {
                len: text.len(),
                max: TEXT_LEN_MAX,
            });
        }
        let tokens = tokenize(text)?;
        if tokens.is_empty() {
            return Err(ParseError::Empty);
        }
        let mut parser = Parser {
            tokens: tokens.into_iter(),
            peeked: None,
            end: text.len(),
        };
        let mut terms = vec![parser.term()?];
        while let Some((at, token)) = parser.next() {
            if !token.is_keyword("and") {
                return Err(ParseError::ExpectedAnd {
                    at,
                    found: token.describe(),
                });
            }
            if terms.len() == TERMS_MAX {
                return Err(ParseError::TooManyTerms { max: TERMS_MAX });
            }
            terms.push(parser.term()?);
        }
        Ok(Filter { terms })
    }
}

/// Writes `s` bare when it reads back as the same word, quoted otherwise.
fn write_atom(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    if !s.is_empty() && !s.chars().any(is_special) {
        return f.write_str(s);
    }
    f.write_str("\"")?;
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

fn write_list(f: &mut fmt::Formatter<'_>, values: &[String]) -> fmt::Result {
    f.write_str("(")?;
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write_atom(f, v)?;
    }
    f.write_str(")")
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_atom(f, &self.attribute)?;
        match &self.condition {
            Condition::Eq(v) => {
                f.write_str("=")?;
                write_atom(f, v)
            }
            Condition::Ne(v) => {
                f.write_str("!=")?;
                write_atom(f, v)
            }
            Condition::In(vs) => {
                f.write_str(" in ")?;
                write_list(f, vs)
            }
            Condition::NotIn(vs) => {
                f.write_str(" not in ")?;
                write_list(f, vs)
            }
            Condition::Exists => f.write_str(" exists"),
            Condition::NotExists => f.write_str(" not exists"),
            Condition::Lt(n) => write!(f, "<{n}"),
            Condition::Le(n) => write!(f, "<={n}"),
            Condition::Gt(n) => write!(f, ">{n}"),
            Condition::Ge(n) => write!(f, ">={n}"),
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            write!(f, "{term}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
