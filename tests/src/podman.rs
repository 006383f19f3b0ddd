//! Debian's podman 4.3 (rootful) as another unmodified client: each run in a test's network
//! namespace, cgroup and private mount namespace (hosts file, CA bundle), with its storage,
//! run state, temp files, locks, registries.conf, policy and auth file all in per-test
//! directories, so neither the host's images nor its configuration or credentials are involved.
//! podman has no daemon: it fetches in its own process.

use std::{fs, path::PathBuf, process::Command, time::Duration};

use serde_json::Value;
use tempfile::TempDir;

use crate::process::{Placement, ToolRun, redacted, run_at};

/// The binary from Debian's `podman` package.
pub const PODMAN: &str = "/usr/bin/podman";

/// A podman with its own storage, used from one placement.
pub struct Podman {
    placement: Placement,
    dir: TempDir,
}

impl Podman {
    /// podman at `placement` (its mounts get the per-test `/dev/shm` added, where podman keeps
    /// its locks).
    pub fn new(placement: Placement) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pp-podman-")
            .tempdir()
            .expect("podman temp dir");
        for d in ["root", "runroot", "tmp", "home", "shm"] {
            fs::create_dir(dir.path().join(d)).expect("podman dir");
        }
        crate::skopeo::write_containers_config(dir.path());
        // An empty auth file (podman insists that the file it is pointed at exists): no host
        // credentials are ever sent.
        fs::write(dir.path().join("auth.json"), r#"{"auths":{}}"#).expect("auth.json");
        // No host containers.conf settings (network backends, events, cgroup manager) apply.
        fs::write(
            dir.path().join("containers.conf"),
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .expect("containers.conf");
        let mut placement = placement;
        let mounts = placement.mounts.take().unwrap_or_default();
        placement.mounts = Some(mounts.bind(dir.path().join("shm"), "/dev/shm"));
        Self { placement, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `podman <global flags> <args>`.
    pub fn run(&self, args: &[&str]) -> ToolRun {
        let mut all: Vec<String> = vec![
            "--root".into(),
            self.path("root").display().to_string(),
            "--runroot".into(),
            self.path("runroot").display().to_string(),
            "--tmpdir".into(),
            self.path("tmp").display().to_string(),
            "--cgroup-manager".into(),
            "cgroupfs".into(),
            "--events-backend".into(),
            "file".into(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let mut cmd = Command::new(PODMAN);
        cmd.args(&all)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", self.path("home"))
            .env("TMPDIR", self.path("tmp"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"));
        let args = redacted(&all, &["--creds"]);
        let finished = run_at(cmd, &self.placement, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("podman {}: {e}", args.join(" ")));
        ToolRun {
            tool: "podman",
            args,
            finished,
        }
    }

    /// `podman pull [--creds u:p] <reference>` with this podman's policy.
    pub fn pull(&self, reference: &str, creds: Option<(&str, &str)>) -> ToolRun {
        let creds = creds.map(|(u, p)| format!("{u}:{p}"));
        let policy = self.path("policy.json").display().to_string();
        let mut args = vec!["pull", "--signature-policy", &policy];
        if let Some(c) = &creds {
            args.extend(["--creds", c]);
        }
        args.push(reference);
        self.run(&args)
    }

    /// `podman image inspect <reference>`: the stored image's JSON, if podman has it.
    pub fn inspect(&self, reference: &str) -> Option<Value> {
        let out = self.run(&["image", "inspect", reference]);
        if !out.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.finished.stdout).ok()?;
        v.as_array()?.first().cloned()
    }
}
