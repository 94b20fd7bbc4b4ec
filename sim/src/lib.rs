//! The deterministic fleet simulator.
//!
//! This crate will drive the real `shoal-engine` for thousands of simulated devices on
//! a virtual clock from one seed. It is intentionally empty until the simulator issue
//! fills it: nothing here pretends to simulate anything yet.
