//! The two A/B slots.

use std::fmt;
use std::str::FromStr;

/// One of the two A/B slots. The *active* slot runs; the *inactive* one is written.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `"A"` or `"B"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a slot (expected A or B)")]
pub struct ParseSlotError(pub String);

impl FromStr for Slot {
    type Err = ParseSlotError;

    /// Accepts `A`/`B` in either case.
    fn from_str(s: &str) -> Result<Slot, ParseSlotError> {
        match s {
            "A" | "a" => Ok(Slot::A),
            "B" | "b" => Ok(Slot::B),
            other => Err(ParseSlotError(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_flips_and_display_round_trips() {
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.other(), Slot::A);
        for slot in Slot::ALL {
            assert_eq!(slot.to_string().parse::<Slot>(), Ok(slot));
        }
        assert_eq!("b".parse::<Slot>(), Ok(Slot::B));
        assert_eq!("C".parse::<Slot>(), Err(ParseSlotError("C".into())));
        assert_eq!("".parse::<Slot>(), Err(ParseSlotError(String::new())));
    }
}
