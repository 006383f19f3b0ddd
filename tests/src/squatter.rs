//! A process that tries to listen on ports (`pp-listen`), as a chosen user, under a chosen name, in
//! a test's network namespace and cgroup: what pullproxy's bind guard must stop, and what a
//! process pretending to be a container runtime looks like.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{ChildStdin, Command, Stdio},
};

use crate::process::{Placement, Proc, sibling_binary};

/// The uid and gid of `nobody`.
pub const NOBODY: u32 = 65534;
/// `EPERM`: what a refused `bind()` returns.
pub const EPERM: i32 = 1;

/// How to start one.
#[derive(Debug, Clone)]
pub struct Squat {
    at: Placement,
    exe: PathBuf,
    uid: Option<u32>,
    comm: Option<String>,
}

/// One bind attempt and how it ended (`None`: it worked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub addr: String,
    pub errno: Option<i32>,
}

/// A running squatter, holding whatever it bound until dropped.
pub struct Squatter {
    pub pid: u32,
    pub attempts: Vec<Attempt>,
    _stdin: ChildStdin,
    _proc: Proc,
}

impl Squat {
    /// `pp-listen` at `at`, as root, under its own name.
    pub fn at(at: Placement) -> Self {
        Self {
            at,
            exe: sibling_binary("pp-listen"),
            uid: None,
            comm: None,
        }
    }

    /// Runs as `uid` (same gid, no supplementary groups, no capabilities) through `setpriv`.
    pub fn user(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Renames itself (`/proc/self/comm`) before binding.
    pub fn comm(mut self, name: &str) -> Self {
        self.comm = Some(name.to_owned());
        self
    }

    /// Runs this copy of `pp-listen` instead of the one built next to the tests.
    pub fn exe(mut self, path: impl Into<PathBuf>) -> Self {
        self.exe = path.into();
        self
    }

    /// Starts it, tries `addrs` (`tcp:127.0.0.1:15443`, `udp:[::]:15443`) and waits for the
    /// outcome.
    pub fn bind(self, addrs: &[&str]) -> Squatter {
        let mut cmd = match self.uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args(["--clear-groups", "--inh-caps=-all"])
                    .arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        if let Some(comm) = &self.comm {
            cmd.args(["--comm", comm]);
        }
        cmd.args(addrs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = Proc::spawn_at(cmd, &self.at);
        let stdin = proc.child_mut().stdin.take().expect("stdin");
        let stdout = proc.child_mut().stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading pp-listen");
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("pp-listen said {line:?} ({e}): {:?}", self.exe));
        let attempts = v["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| Attempt {
                addr: r["addr"].as_str().expect("addr").to_owned(),
                errno: r["errno"].as_i64().map(|e| e as i32),
            })
            .collect();
        Squatter {
            pid: v["pid"].as_u64().expect("pid") as u32,
            attempts,
            _stdin: stdin,
            _proc: proc,
        }
    }
}

impl Squatter {
    /// The attempts that did not end with `errno` (for assertion messages: empty is good).
    pub fn not(&self, errno: Option<i32>) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| a.errno != errno).collect()
    }
}
