//! skopeo as an unmodified registry client: `inspect` and `copy` run as processes in a test's
//! network namespace, cgroup (a redirect target or not) and mount namespace (hosts, CA bundle),
//! with a private home, policy and registries.conf so the host's configuration and credentials
//! never leak in. Also checks that a `dir:` copy holds exactly the expected blobs.

use std::{fs, path::Path, process::Command, time::Duration};

use tempfile::TempDir;

use crate::{
    images::{Digest, Image},
    process::{Placement, ToolRun, redacted, run_at},
};

/// The binary from Debian's `skopeo` package.
pub const SKOPEO: &str = "/usr/bin/skopeo";

/// skopeo flags whose value holds credentials.
const SKOPEO_SECRET_FLAGS: &[&str] = &["--creds", "--src-creds", "--dest-creds"];

/// A skopeo that runs in one placement.
pub struct Skopeo {
    placement: Placement,
    home: TempDir,
    timeout: Duration,
    tls_verify: bool,
}

impl Skopeo {
    /// skopeo in `placement` (give it a [`crate::mountns::MountSpec`] to resolve and trust
    /// fake registries; a cgroup that pullproxy targets makes its connections redirected).
    pub fn new(placement: Placement) -> Self {
        let home = tempfile::Builder::new()
            .prefix("pp-skopeo-")
            .tempdir()
            .expect("skopeo home");
        write_containers_config(home.path());
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
    pub fn run(&self, args: &[&str]) -> ToolRun {
        let home = self.home.path();
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
            .env("REGISTRY_AUTH_FILE", home.join("auth.json"));
        let args = redacted(&all, SKOPEO_SECRET_FLAGS);
        let finished = run_at(cmd, &self.placement, self.timeout)
            .unwrap_or_else(|e| panic!("skopeo {}: {e}", args.join(" ")));
        ToolRun {
            tool: "skopeo",
            args,
            finished,
        }
    }

    /// `skopeo inspect [--raw] [--creds u:p] <image>` (`docker://registry-1.docker.io/...`).
    pub fn inspect(&self, image: &str, creds: Option<(&str, &str)>, raw: bool) -> ToolRun {
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
    ) -> ToolRun {
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

/// Writes the containers/image files that skopeo and podman are pointed at into `dir`:
/// `policy.json` accepting any image (signatures are not what these tests are about) and a
/// `registries.conf` with no mirrors and no short-name aliases, whatever the host's
/// `/etc/containers` says.
pub fn write_containers_config(dir: &Path) {
    fs::write(
        dir.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("policy.json");
    fs::write(
        dir.join("registries.conf"),
        "unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n",
    )
    .expect("registries.conf");
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
            redacted(&args, SKOPEO_SECRET_FLAGS),
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
