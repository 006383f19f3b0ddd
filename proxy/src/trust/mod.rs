//! Operator tooling off the data path: the node CA in the system trust store, which container
//! runtimes started before they could trust it, and the `pullproxy ca` commands.

pub mod ca_command;
pub(crate) mod runtimes;
pub(crate) mod store;
