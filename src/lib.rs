//! Moat: a Kubernetes operator that makes secure model serving the default.
//!
//! The crate is a functional core ([`render`], [`core`]: pure, tested on data) inside an
//! imperative shell ([`controller`]: reads, applies, prunes and reports). See
//! `docs/architecture.md`.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod api;
pub mod controller;
pub mod core;
pub mod fixture;
pub mod gate;
pub mod image;
pub mod model;
pub mod pki;
pub mod quantity;
pub mod render;
pub mod telemetry;
