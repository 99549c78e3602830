//! The functional core of the reconcilers: every decision the shell (`controller`) acts on, as
//! pure functions over data. Nothing here talks to the API server, reads the clock or depends on
//! the controller's error type (`tests/purity.rs` fails if it does); each module is tested on
//! data in milliseconds.
//!
//! - [`drift`]: what to write for a child, given the desired body, the live object and its
//!   managedFields; which differences are Moat's own new facts rather than drift.
//! - [`status`]: the kstatus conditions and status fields, given the facts of a reconcile.
//! - [`ca`]: what the CA is and when its Secret must be written.
//! - [`consent`]: whether a model consents to a ModelClient.
//! - [`model`]: storage-class checks and decrypt failures of encrypted weights.
//! - [`revision`]: revisions, their failures, and the rollback to the last known-good.
//! - [`approval`]: which approvals of a revision count, and whether it may go live.

pub mod approval;
pub mod ca;
pub mod consent;
pub mod drift;
pub mod model;
pub mod revision;
pub mod status;
