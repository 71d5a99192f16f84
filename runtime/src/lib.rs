//! What both allot binaries run around the domain: logs, traces and
//! metrics (`telemetry`), the shutdown signal (`signal`), files only their
//! owner may read (`private_files`) and configuration layered from a file,
//! the environment and flags (`layered`).
//!
//! The `allot` crate stays pure: sockets, files, signals and process
//! environment are here or in the binaries, never there.
#![forbid(unsafe_code)]

pub mod layered;
pub mod pem;
pub mod private_files;
pub mod signal;
pub mod telemetry;
