//! Helpers shared by Shoal's black-box integration tests (in `tests/tests/`).
//!
//! The tests run the real `shoal` binary built by cargo as a separate process.
