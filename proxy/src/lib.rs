//! pullproxy: makes container image pulls local on every node. A cgroup/connect eBPF program
//! redirects the container runtime's registry connections to this proxy, which serves manifests
//! and blobs from the cluster's hub, a local cache, or the real upstream.
//!
//! This crate touches eBPF and raw sockets, so it allows `unsafe` where a syscall has no safe
//! wrapper (bpf(2), getsockopt, statfs, preadv2, rlimits, mount, chroot before exec, the kernel
//! log's ring buffer fd; for kernel TLS setsockopt, recvmsg and sendmsg with a record type, and
//! sendfile); each block says why it is sound. As a daemon that parses what registries and
//! clients send, it does not `unwrap`: a panic site names its invariant with `expect`. Its output
//! goes through `tracing`; the command line (`main.rs`) prints.
#![expect(
    unsafe_code,
    reason = "syscalls without a safe wrapper in std or libc; see the module doc"
)]
#![deny(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

pub mod accept;
pub(crate) mod admin;
pub mod app;
pub mod cache;
pub mod config;
pub(crate) mod diagnosis;
pub mod doctor;
pub mod node_ca;
pub mod oci;
pub mod origins;
pub mod private_state;
pub mod redirect;
pub(crate) mod registry;
pub(crate) mod runtimes;
pub mod secret;
pub mod settings;
pub mod telemetry;
pub mod trust;
pub mod warm;
