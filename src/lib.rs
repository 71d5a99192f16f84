//! The shared domain of allot: the wire protocol (`pb`), money, limits and
//! their windows, tariffs and pricing, keys, and the reservation bound that
//! admission takes before a request reaches a neuron.
//!
//! Everything here is plain data and pure functions: no sockets, no files, no
//! signals, no environment, no clocks read behind the caller's back (time is
//! always passed in), so the coordinator, the agent, unit tests, property
//! tests and benchmarks all call the same code. Money is
//! `rust_decimal::Decimal`, never a float. What the binaries share around it
//! (logs, traces, metrics, signals, private files, configuration layers)
//! lives in `allot-runtime`.
#![forbid(unsafe_code)]

pub mod amounts;
pub mod bounds;
pub mod clock;
pub mod error;
pub mod key;
pub mod limit;
pub mod money;
pub mod reservation;
pub mod tariff;
pub mod window;

pub use amounts::{Amounts, Unit};
pub use error::InvalidArgument;

/// Generated protocol code. The rest of the code converts to and from these
/// types at the edges, with validation.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("allot.v1");
    /// Encoded descriptor set of every allot proto, served through reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("allot_descriptor");
}
