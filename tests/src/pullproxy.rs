//! A real `pullproxy` process under test: started with the embedded default configuration plus
//! `PULLPROXY_*` environment overrides, JSON logs collected for assertions, and its metrics text
//! read back ([`sample`]).

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    cgroup::Cgroup,
    netns::NetNs,
    process::{Placement, Proc},
};

/// The binary under test: `$PULLPROXY_BIN` when set, otherwise built here once per test
/// process, so a plain `cargo test` never runs a stale pullproxy (cargo does not rebuild another
/// package's binary for these tests). That build uses its own target directory, `target/harness`:
/// `cargo build -p proxy` and `cargo test -p pullproxy-tests` resolve features differently and
/// would otherwise keep invalidating each other's artifacts. (`cargo xtask test` builds pullproxy
/// with every test target in one invocation and sets `$PULLPROXY_BIN`.)
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("PULLPROXY_BIN", "proxy", "pullproxy"))
        .clone()
}

/// The pull benchmark, `pp-bench` (package `pullproxy-bench`, which builds on this harness):
/// `$PP_BENCH_BIN` when set (`cargo xtask test` and `vm-test` set it), otherwise built like
/// [`binary`].
pub fn bench_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("PP_BENCH_BIN", "pullproxy-bench", "pp-bench"))
        .clone()
}

/// `$env` when set, otherwise `bin` of the workspace's `package`, built into `target/harness`.
fn workspace_binary(env: &str, package: &str, bin: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = workspace.join("target/harness");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--package", package, "--bin", bin])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(&workspace)
        .status()
        .unwrap_or_else(|e| panic!("running cargo build for {bin}: {e}"));
    assert!(status.success(), "building {bin} failed");
    target.join("debug").join(bin)
}

/// Runs `pullproxy run` (optionally behind `wrapper`, e.g. `setpriv ...`) expecting it to exit
/// with an error; returns its stderr. Panics if it becomes ready instead or hangs.
pub fn run_expecting_failure(
    netns: &NetNs,
    cgroup: &Cgroup,
    env: &[(&str, String)],
    wrapper: &[&str],
) -> String {
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(binary());
            c
        }
        None => Command::new(binary()),
    };
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn(cmd, Some(netns), Some(cgroup));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.exited() {
        assert!(Instant::now() < deadline, "pullproxy did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = proc.child_mut().wait().expect("wait");
    let mut stderr = String::new();
    use std::io::Read;
    proc.child_mut()
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(
        !status.success(),
        "pullproxy was expected to fail:\n{stderr}"
    );
    stderr
}

/// A running pullproxy.
pub struct Pullproxy {
    proc: Proc,
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Pullproxy {
    /// Starts pullproxy at `at` (network namespace, cgroup, optional mounts) with these
    /// `PULLPROXY_*` overrides and waits for its "ready" line. Panics with the collected logs if
    /// it exits or is not ready in 20 s.
    pub fn start(at: &Placement, env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PULLPROXY_LOG__FORMAT", "json")
            .env("PULLPROXY_LOG__LEVEL", "info,pullproxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn_at(cmd, at);
        let stderr = proc.child_mut().stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().expect("logs").push(value);
            }
        });
        let mut me = Self { proc, logs };
        // Start-up takes well under a second; the margin is for a machine loaded by parallel
        // builds and tests.
        let started = Instant::now();
        while me.find("ready").is_none() {
            let status = me.proc.child_mut().try_wait().ok().flatten();
            if status.is_some() || started.elapsed() > Duration::from_secs(60) {
                // An exited process's last lines (its error) are read once its stderr ends: on
                // a loaded machine that can take longer than any fixed pause.
                let read_until = Instant::now() + Duration::from_secs(10);
                while status.is_some() && !reader.is_finished() && Instant::now() < read_until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                panic!(
                    "pullproxy did not become ready ({} after {:?}):\n{}",
                    status.map_or_else(|| "still running".to_owned(), |s| format!("exited: {s}")),
                    started.elapsed(),
                    me.dump()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The first log record whose message is `message`.
    pub fn find(&self, message: &str) -> Option<Value> {
        self.all(message).into_iter().next()
    }

    /// Every log record whose message is `message`.
    pub fn all(&self, message: &str) -> Vec<Value> {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|v| v["message"] == message)
            .cloned()
            .collect()
    }

    /// The per-request records ("pull") for a repository.
    pub fn pulls(&self, repository: &str) -> Vec<Value> {
        self.all("pull")
            .into_iter()
            .filter(|r| r["repository"] == repository)
            .collect()
    }

    /// Waits up to `timeout` until there are at least `at_least` "pull" records of `kind`
    /// (manifest, blob) for `repository` (a record is written when its response body is done, a
    /// moment after the client saw the last byte); returns the repository's records then.
    pub fn wait_pulls(
        &self,
        repository: &str,
        kind: &str,
        at_least: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.pulls(repository);
            let n = records.iter().filter(|r| r["kind"] == kind).count();
            if n >= at_least || Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for a record with `message` that `pred` accepts.
    pub fn wait_for(
        &self,
        message: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.all(message).into_iter().find(|v| pred(v)) {
                return Some(v);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything logged so far, one record per line (for panic messages).
    pub fn dump(&self) -> String {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILL: the proxy crashes.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM: a clean stop.
    pub fn stop(&mut self) {
        self.proc.terminate();
    }
}

/// The value of the sample whose name and labels start with `prefix` in a `/metrics` text,
/// summed over matches (`pullproxy_requests_total{registry="quay.io"` sums every kind, source
/// and status).
pub fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
