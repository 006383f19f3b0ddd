//! skopeo as an unmodified registry client: `inspect` and `copy` run as processes in a test's
//! network namespace, cgroup (a redirect target or not) and mount namespace (hosts, CA bundle),
//! with a private home, policy and registries.conf so the host's configuration and credentials
//! never leak in. Also checks that a `dir:` copy holds exactly the expected blobs.

use std::{
    fs::{self, File},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{
    images::{Digest, Image},
    process::{Placement, Proc},
};

/// The binary from Debian's `skopeo` package.
pub const SKOPEO: &str = "/usr/bin/skopeo";

/// A skopeo that runs in one placement.
pub struct Skopeo {
    placement: Placement,
    home: TempDir,
    timeout: Duration,
    tls_verify: bool,
}

/// What one skopeo run did.
#[derive(Debug)]
pub struct SkopeoOutput {
    /// The arguments, credentials redacted.
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl SkopeoOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics with the command and its stderr unless it succeeded.
    pub fn expect_success(&self) -> &Self {
        assert!(
            self.success(),
            "skopeo {} failed ({}):\n{}",
            self.args.join(" "),
            self.status,
            self.stderr
        );
        self
    }

    /// Panics unless it failed; returns stderr for matching the reason.
    pub fn expect_failure(&self) -> &str {
        assert!(
            !self.success(),
            "skopeo {} was expected to fail:\n{}",
            self.args.join(" "),
            self.stdout_text()
        );
        &self.stderr
    }

    /// stdout as JSON (`inspect`).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "skopeo {} printed no JSON ({e}):\n{}",
                self.args.join(" "),
                self.stdout_text()
            )
        })
    }
}

impl Skopeo {
    /// skopeo in `placement` (give it a [`crate::mountns::MountSpec`] to resolve and trust
    /// fake registries; a cgroup that pullproxy targets makes its connections redirected).
    pub fn new(placement: Placement) -> Self {
        let home = tempfile::Builder::new()
            .prefix("pp-skopeo-")
            .tempdir()
            .expect("skopeo home");
        // Accept any image: signatures are not what these tests are about.
        fs::write(
            home.path().join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("policy.json");
        // No mirrors, no short-name aliases, whatever the host's /etc/containers says.
        fs::write(
            home.path().join("registries.conf"),
            "unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n",
        )
        .expect("registries.conf");
        Self {
            placement,
            home,
            timeout: Duration::from_secs(120),
            tls_verify: true,
        }
    }

    /// Kill a run after `timeout` (default 120 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Allows plain HTTP and unverified TLS for the source (`--tls-verify=false`): how skopeo
    /// reaches an HTTP-only registry such as the sealos hub. HTTPS is still tried first.
    pub fn insecure(mut self) -> Self {
        self.tls_verify = false;
        self
    }

    /// Runs `skopeo <args>` (global `--policy` added) and waits for it.
    pub fn run(&self, args: &[&str]) -> SkopeoOutput {
        let home = self.home.path();
        let stdout_path = home.join(format!("{}.out", crate::unique("run")));
        let stderr_path = stdout_path.with_extension("err");
        let mut all = vec![
            "--policy".to_owned(),
            home.join("policy.json").display().to_string(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let mut cmd = Command::new(SKOPEO);
        cmd.args(&all)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", home)
            .env("TMPDIR", home)
            .env("CONTAINERS_REGISTRIES_CONF", home.join("registries.conf"))
            // An auth file that does not exist: no host credentials are ever sent.
            .env("REGISTRY_AUTH_FILE", home.join("auth.json"))
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("skopeo stdout file"))
            .stderr(File::create(&stderr_path).expect("skopeo stderr file"));
        let started = Instant::now();
        let mut proc = Proc::spawn_at(cmd, &self.placement);
        let status = loop {
            if let Some(status) = proc.child_mut().try_wait().expect("wait for skopeo") {
                break status;
            }
            if started.elapsed() > self.timeout {
                proc.kill();
                panic!(
                    "skopeo {} still running after {:?}:\n{}",
                    redacted(&all).join(" "),
                    self.timeout,
                    fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = SkopeoOutput {
            args: redacted(&all),
            status,
            stdout: fs::read(&stdout_path).unwrap_or_default(),
            stderr: fs::read_to_string(&stderr_path).unwrap_or_default(),
            elapsed: started.elapsed(),
        };
        let _ = fs::remove_file(stdout_path);
        let _ = fs::remove_file(stderr_path);
        out
    }

    /// `skopeo inspect [--raw] [--creds u:p] <image>` (`docker://registry-1.docker.io/...`).
    pub fn inspect(&self, image: &str, creds: Option<(&str, &str)>, raw: bool) -> SkopeoOutput {
        let creds = creds.map(|(u, p)| format!("{u}:{p}"));
        let mut args = vec!["inspect", "--retry-times", "0"];
        if raw {
            args.push("--raw");
        }
        if let Some(c) = &creds {
            args.extend(["--creds", c]);
        }
        if !self.tls_verify {
            args.push("--tls-verify=false");
        }
        args.push(image);
        self.run(&args)
    }

    /// `skopeo copy [--all] [--src-creds u:p] <src> dir:<dest>`: the blobs land in `dest`
    /// named by their hex digest, the manifest as `manifest.json`.
    pub fn copy_to_dir(
        &self,
        src: &str,
        dest: &Path,
        creds: Option<(&str, &str)>,
        all: bool,
    ) -> SkopeoOutput {
        let creds = creds.map(|(u, p)| format!("{u}:{p}"));
        let dest = format!("dir:{}", dest.display());
        let mut args = vec!["copy", "--retry-times", "0"];
        if all {
            args.push("--all");
        }
        if let Some(c) = &creds {
            args.extend(["--src-creds", c]);
        }
        if !self.tls_verify {
            args.push("--src-tls-verify=false");
        }
        args.extend([src, &dest]);
        self.run(&args)
    }
}

/// `args` with the value of every credentials flag replaced: they end up in panic messages.
fn redacted(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut secret_next = false;
    for a in args {
        if secret_next {
            out.push("<redacted>".to_owned());
            secret_next = false;
            continue;
        }
        secret_next = matches!(a.as_str(), "--creds" | "--src-creds" | "--dest-creds");
        match a.split_once('=') {
            Some((flag, _)) if flag.ends_with("creds") => out.push(format!("{flag}=<redacted>")),
            _ => out.push(a.clone()),
        }
    }
    out
}

/// Checks a `skopeo copy ... dir:<dir>` of `image`: the manifest is byte for byte the pushed
/// one, and every config and layer file is there with the expected digest and size.
pub fn verify_dir_copy(dir: &Path, image: &Image) -> Result<(), String> {
    let manifest = fs::read(dir.join("manifest.json"))
        .map_err(|e| format!("{}/manifest.json: {e}", dir.display()))?;
    if Digest::of(&manifest) != *image.digest() {
        return Err(format!(
            "manifest.json has digest {}, expected {} (converted?)",
            Digest::of(&manifest),
            image.digest()
        ));
    }
    for blob in image.blobs() {
        let path = dir.join(blob.digest.hex());
        let got = Digest::of_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if got != blob.digest {
            return Err(format!("{} holds {got}", path.display()));
        }
        let size = fs::metadata(&path).map_err(|e| e.to_string())?.len();
        if size != blob.size {
            return Err(format!(
                "{}: {size} bytes, expected {}",
                path.display(),
                blob.size
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_messages() {
        let args: Vec<String> = [
            "copy",
            "--src-creds",
            "admin:pw",
            "--dest-creds=u:p",
            "a",
            "b",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            redacted(&args),
            [
                "copy",
                "--src-creds",
                "<redacted>",
                "--dest-creds=<redacted>",
                "a",
                "b"
            ]
        );
    }
}
