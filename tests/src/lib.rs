//! The end-to-end test harness: network namespaces, cgroups and processes that clean up after
//! themselves (guards with `Drop`, also when a test panics), and handles on real `pullproxy`
//! processes. Tests here need root; [`require_root!`] skips them loudly outside CI and fails
//! them in CI.
//!
//! On top of those: real registries (`registry`, Debian's docker-registry), a registry client
//! (`registry_client`), image content built in Rust (`images`), test CAs (`testca`), and
//! unmodified clients (`skopeo`, `podman`, `containerd` with `ctr` and a CRI client in `cri`)
//! that see fake registries through a private mount namespace (`mountns`: hosts file and CA
//! bundle). `world` puts a node, the hub, the fake upstreams and pullproxy together; `cluster`
//! puts several nodes, each with its own pullproxy and containerd, on one bridge with a shared
//! hub and a fake internet. `squatter` tries to take pullproxy's ports, or poses as a container
//! runtime. `systemd` drives the machine's own units (the real `containerd.service`,
//! `pullproxy.service`) where a test may change them: the VM of `cargo xtask vm-test`. `ktls`
//! says whether this kernel can run the kernel TLS tests (the VM's can).
//!
//! For the benchmarks (the `pullproxy-bench` crate): a load generator that every measured system
//! is pulled with (`loadgen`) and nginx as a caching TLS reverse proxy (`nginx`), a peer of
//! pullproxy.
//!
//! `unsafe` appears only where a child must join a namespace and a cgroup between fork and exec
//! (`process.rs`, `mountns.rs`), a thread must enter a network namespace (`netns.rs`,
//! `registry_client.rs`), a process started indirectly is signalled (`process.rs`,
//! `containerd.rs`), bpffs is mounted and unmounted (`bpffs.rs`), the effective uid is read
//! (`privileged.rs`), or systemd's delegation mark on a cgroup is read (`cgroup.rs`): syscalls
//! that std does not wrap.
#![expect(
    unsafe_code,
    reason = "syscalls that std does not wrap; see the crate doc"
)]

pub mod bpffs;
pub mod cgroup;
pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod images;
pub mod ktls;
pub mod loadgen;
pub mod mountns;
pub mod netns;
pub mod nginx;
pub mod node;
pub mod origin;
pub mod podman;
pub mod privileged;
pub mod probe;
pub mod process;
pub mod pullproxy;
pub mod registry;
pub mod registry_client;
pub mod skopeo;
pub mod squatter;
pub mod systemd;
pub mod testca;
pub mod world;

/// A short unique suffix for names of namespaces, cgroups and pin directories.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
