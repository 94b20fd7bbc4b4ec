//! Device admission: which authentication state a device key is in, and which changes
//! are legal.
//!
//! A device identifies itself by its ed25519 public key (the same key is its LAN peer
//! id). The server keeps one [`State`] per key; this module decides what an
//! authentication request from that key gets ([`request`]) and what an administrator
//! may do to it ([`apply`]). The rules follow Mender's device authentication, with one
//! deliberate difference: a decommissioned key is remembered as such and stays out, so
//! a stolen or retired board cannot come back as a fresh pending device.
//!
//! | from \ action   | accept   | reject   | preauthorize | decommission |
//! |-----------------|----------|----------|--------------|--------------|
//! | (unknown)       | error    | error    | preauthorized| error        |
//! | pending         | accepted | rejected | error        | decommissioned |
//! | accepted        | (same)   | rejected | error        | decommissioned |
//! | rejected        | accepted | (same)   | error        | decommissioned |
//! | preauthorized   | error    | rejected | (same)       | decommissioned |
//! | decommissioned  | error    | error    | error        | (same)       |

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The authentication state of one device key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The key asked to authenticate and waits for an administrator.
    Pending,
    /// The key may authenticate and gets tokens.
    Accepted,
    /// An administrator refused the key; it gets no token until accepted.
    Rejected,
    /// An administrator admitted the key before the device ever asked; its first request
    /// accepts it.
    Preauthorized,
    /// The device was retired; the key never authenticates again.
    Decommissioned,
}

impl State {
    /// Every state, in declaration order.
    pub const ALL: [State; 5] = [
        State::Pending,
        State::Accepted,
        State::Rejected,
        State::Preauthorized,
        State::Decommissioned,
    ];

    /// The name used in the API and the database (`pending`, `accepted`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Accepted => "accepted",
            State::Rejected => "rejected",
            State::Preauthorized => "preauthorized",
            State::Decommissioned => "decommissioned",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no authentication state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown device authentication state {0:?} (expected pending, accepted, rejected, preauthorized or decommissioned)"
)]
pub struct ParseStateError(pub String);

impl FromStr for State {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<State, ParseStateError> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseStateError(s.to_owned()))
    }
}

/// What a device's authentication request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    /// Issue a token bound to this device.
    Token,
    /// Nothing yet: the key waits for an administrator (Mender answers 401).
    Pending,
    /// Nothing, ever, unless an administrator changes the state (401).
    Refused,
}

/// The outcome of an authentication request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The key's state before the request (`None`: never seen).
    pub from: Option<State>,
    /// The key's state after the request; store it if it differs from `from`.
    pub to: State,
    /// What to answer the device.
    pub answer: Answer,
}

impl Request {
    /// Whether the request changed the stored state.
    pub fn changed(&self) -> bool {
        self.from != Some(self.to)
    }
}

/// Decide an authentication request (already verified as signed by the key) from a key
/// whose current state is `current` (`None` if the server has never seen it).
///
/// Unknown keys become pending; a preauthorized key is accepted on its first request;
/// accepted keys get a token; pending keys keep waiting; rejected and decommissioned keys
/// stay out.
pub fn request(current: Option<State>) -> Request {
    let (to, answer) = match current {
        None | Some(State::Pending) => (State::Pending, Answer::Pending),
        Some(State::Preauthorized) | Some(State::Accepted) => (State::Accepted, Answer::Token),
        Some(State::Rejected) => (State::Rejected, Answer::Refused),
        Some(State::Decommissioned) => (State::Decommissioned, Answer::Refused),
    };
    Request {
        from: current,
        to,
        answer,
    }
}

/// An administrator's decision about a device key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Admit a pending or rejected key.
    Accept,
    /// Refuse a key (revokes its tokens if it was accepted).
    Reject,
    /// Admit a key the server has not seen yet.
    Preauthorize,
    /// Retire the device for good (revokes its tokens).
    Decommission,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Accept => "accept",
            Action::Reject => "reject",
            Action::Preauthorize => "preauthorize",
            Action::Decommission => "decommission",
        })
    }
}

/// A legal change of a key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The state before (`None`: unknown key, only for [`Action::Preauthorize`]).
    pub from: Option<State>,
    /// The state after. Equal to `from` when the action repeated an earlier one; the
    /// server then writes nothing and answers success (the action is idempotent).
    pub to: State,
    /// The device had tokens that must stop working now.
    pub revoke_tokens: bool,
}

impl Change {
    /// Whether the stored state changes.
    pub fn changed(&self) -> bool {
        self.from != Some(self.to)
    }
}

/// Why an administrator's action was refused. The stored state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The key is not known to the server; only `preauthorize` applies to new keys.
    #[error("no device with this key is known; only preauthorize admits a new key, not {action}")]
    UnknownDevice {
        /// The refused action.
        action: Action,
    },
    /// Preauthorizing a key the server already has in some state.
    #[error("the key is already known as {state}; use accept or reject instead of preauthorize")]
    AlreadyKnown {
        /// Its current state.
        state: State,
    },
    /// Accepting a preauthorized key: it is accepted when the device first asks.
    #[error("the key is preauthorized; it is accepted on the device's first request")]
    Preauthorized,
    /// The device was decommissioned; its key never comes back.
    #[error(
        "the device was decommissioned; its key cannot be {action}ed (decommissioning is final)"
    )]
    Decommissioned {
        /// The refused action.
        action: Action,
    },
}

/// Apply an administrator's `action` to a key in state `current` (`None`: unknown).
pub fn apply(current: Option<State>, action: Action) -> Result<Change, TransitionError> {
    use State::*;
    let to = match (current, action) {
        (None, Action::Preauthorize) => Preauthorized,
        (None, action) => return Err(TransitionError::UnknownDevice { action }),
        (Some(Decommissioned), Action::Decommission) => Decommissioned,
        (Some(Decommissioned), action) => return Err(TransitionError::Decommissioned { action }),
        (Some(Preauthorized), Action::Preauthorize) => Preauthorized,
        (Some(state), Action::Preauthorize) => return Err(TransitionError::AlreadyKnown { state }),
        (Some(Preauthorized), Action::Accept) => return Err(TransitionError::Preauthorized),
        (Some(_), Action::Accept) => Accepted,
        (Some(_), Action::Reject) => Rejected,
        (Some(_), Action::Decommission) => Decommissioned,
    };
    Ok(Change {
        from: current,
        to,
        revoke_tokens: current == Some(Accepted) && to != Accepted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    #[test]
    fn requests_follow_the_state() {
        let new = request(None);
        assert_eq!(
            (new.to, new.answer, new.changed()),
            (Pending, Answer::Pending, true)
        );
        let again = request(Some(Pending));
        assert_eq!(
            (again.to, again.answer, again.changed()),
            (Pending, Answer::Pending, false)
        );
        let pre = request(Some(Preauthorized));
        assert_eq!(
            (pre.to, pre.answer, pre.changed()),
            (Accepted, Answer::Token, true)
        );
        let acc = request(Some(Accepted));
        assert_eq!(
            (acc.to, acc.answer, acc.changed()),
            (Accepted, Answer::Token, false)
        );
        for out in [Rejected, Decommissioned] {
            let r = request(Some(out));
            assert_eq!((r.to, r.answer, r.changed()), (out, Answer::Refused, false));
        }
    }

    #[test]
    fn the_whole_admin_table() {
        use Action::*;
        type Row = (Option<State>, [Result<State, TransitionError>; 4]);
        let table: [Row; 6] = [
            (
                None,
                [
                    Err(TransitionError::UnknownDevice { action: Accept }),
                    Err(TransitionError::UnknownDevice { action: Reject }),
                    Ok(Preauthorized),
                    Err(TransitionError::UnknownDevice {
                        action: Decommission,
                    }),
                ],
            ),
            (
                Some(Pending),
                [
                    Ok(Accepted),
                    Ok(Rejected),
                    Err(TransitionError::AlreadyKnown { state: Pending }),
                    Ok(Decommissioned),
                ],
            ),
            (
                Some(Accepted),
                [
                    Ok(Accepted),
                    Ok(Rejected),
                    Err(TransitionError::AlreadyKnown { state: Accepted }),
                    Ok(Decommissioned),
                ],
            ),
            (
                Some(Rejected),
                [
                    Ok(Accepted),
                    Ok(Rejected),
                    Err(TransitionError::AlreadyKnown { state: Rejected }),
                    Ok(Decommissioned),
                ],
            ),
            (
                Some(Preauthorized),
                [
                    Err(TransitionError::Preauthorized),
                    Ok(Rejected),
                    Ok(Preauthorized),
                    Ok(Decommissioned),
                ],
            ),
            (
                Some(Decommissioned),
                [
                    Err(TransitionError::Decommissioned { action: Accept }),
                    Err(TransitionError::Decommissioned { action: Reject }),
                    Err(TransitionError::Decommissioned {
                        action: Preauthorize,
                    }),
                    Ok(Decommissioned),
                ],
            ),
        ];
        for (from, expected) in table {
            for (action, want) in [Accept, Reject, Preauthorize, Decommission]
                .into_iter()
                .zip(expected)
            {
                let got = apply(from, action).map(|c| c.to);
                assert_eq!(got, want, "{from:?} + {action}");
            }
        }
    }

    #[test]
    fn tokens_are_revoked_only_when_leaving_accepted() {
        assert!(apply(Some(Accepted), Action::Reject).unwrap().revoke_tokens);
        assert!(
            apply(Some(Accepted), Action::Decommission)
                .unwrap()
                .revoke_tokens
        );
        assert!(!apply(Some(Accepted), Action::Accept).unwrap().revoke_tokens);
        assert!(!apply(Some(Pending), Action::Reject).unwrap().revoke_tokens);
        assert!(
            !apply(Some(Rejected), Action::Decommission)
                .unwrap()
                .revoke_tokens
        );
    }

    #[test]
    fn repeated_actions_are_idempotent() {
        assert!(!apply(Some(Accepted), Action::Accept).unwrap().changed());
        assert!(
            !apply(Some(Decommissioned), Action::Decommission)
                .unwrap()
                .changed()
        );
        assert!(apply(Some(Pending), Action::Accept).unwrap().changed());
        assert!(apply(None, Action::Preauthorize).unwrap().changed());
    }

    #[test]
    fn a_decommissioned_key_stays_out() {
        // The key asks again after it was retired: no token, no new pending entry.
        let r = request(Some(Decommissioned));
        assert_eq!(r.answer, Answer::Refused);
        assert_eq!(r.to, Decommissioned);
    }

    #[test]
    fn state_names_round_trip_and_unknown_names_are_refused() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(
            "Accepted".parse::<State>(),
            Err(ParseStateError("Accepted".into()))
        );
    }
}
