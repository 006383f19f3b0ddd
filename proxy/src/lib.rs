//! pullproxy: makes container image pulls local on every node. A cgroup/connect eBPF program
//! redirects the container runtime's registry connections to this proxy, which serves manifests
//! and blobs from the cluster's hub, a local cache, or the real upstream.
//!
//! This crate touches eBPF and raw sockets, so it allows `unsafe` where a syscall needs it; each
//! use carries a `SAFETY:` comment.

pub mod admin;
pub mod app;
pub mod cache;
pub mod client;
pub mod config;
pub mod conn;
pub mod doctor;
pub mod hub;
pub mod oci;
pub mod original_dst;
pub mod port_holder;
pub mod private_state;
pub mod redirect;
pub mod registry;
pub mod runtimes;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod warm;
pub mod writeback;
