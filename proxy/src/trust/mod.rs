//! Operator tooling off the data path: the node CA in the system trust store, which container
//! runtimes started before they could trust it, the `pullproxy ca` commands, and what
//! `pullproxy doctor` reports of both (`diagnose.rs`).

pub mod ca_command;
mod diagnose;
pub(crate) mod runtimes;
pub(crate) mod store;

pub(crate) use self::diagnose::diagnose;
