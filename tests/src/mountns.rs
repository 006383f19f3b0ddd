//! A private mount namespace for a child process, with its own `/etc/hosts` and CA bundle: an
//! unmodified client (skopeo, podman, containerd) then resolves `registry-1.docker.io` to an
//! address inside the test's network namespace and trusts the test's CAs, while the host's files
//! stay untouched.

use std::{
    ffi::CString,
    fmt::Write as _,
    fs, io,
    net::IpAddr,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use tempfile::TempDir;

/// The PEM bundles TLS clients read their roots from (Debian's first, then the RHEL layouts);
/// each one that exists on the host is covered by [`MountSpec::ca_bundle`].
pub const CA_BUNDLE_PATHS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// What a child's private mount namespace looks like. Applied between fork and exec, after the
/// child joined its cgroup and network namespace.
#[derive(Debug, Clone, Default)]
pub struct MountSpec {
    /// Entries of the child's `/etc/hosts`, after `localhost`.
    pub hosts: Vec<(String, IpAddr)>,
    /// A PEM bundle mounted over every system bundle in [`CA_BUNDLE_PATHS`] that exists.
    pub ca_bundle: Option<PathBuf>,
    /// Further bind mounts, `(source, target)`; the target must exist.
    pub binds: Vec<(PathBuf, PathBuf)>,
}

impl MountSpec {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves each of `names` to `ip`.
    pub fn hosts<S: AsRef<str>>(mut self, names: &[S], ip: IpAddr) -> Self {
        self.hosts
            .extend(names.iter().map(|n| (n.as_ref().to_owned(), ip)));
        self
    }

    /// Trusts exactly the certificates in `bundle` (build one with [`crate::testca::ca_bundle`]).
    pub fn ca_bundle(mut self, bundle: impl Into<PathBuf>) -> Self {
        self.ca_bundle = Some(bundle.into());
        self
    }

    /// Bind-mounts `source` over `target`.
    pub fn bind(mut self, source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        self.binds.push((source.into(), target.into()));
        self
    }

    /// The `/etc/hosts` the child sees.
    pub fn hosts_file(&self) -> String {
        let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
        for (name, ip) in &self.hosts {
            let _ = writeln!(out, "{ip}\t{name}");
        }
        out
    }

    /// Writes the files and builds the C strings the child needs, so that nothing is allocated
    /// after the fork.
    pub(crate) fn prepare(&self) -> PreparedMounts {
        let dir = tempfile::Builder::new()
            .prefix("pp-mounts-")
            .tempdir()
            .expect("temp dir for mount sources");
        let hosts = dir.path().join("hosts");
        fs::write(&hosts, self.hosts_file()).expect("write hosts file");
        let mut binds = vec![(hosts, PathBuf::from("/etc/hosts"))];
        if let Some(bundle) = &self.ca_bundle {
            assert!(bundle.exists(), "CA bundle {} missing", bundle.display());
            binds.extend(
                CA_BUNDLE_PATHS
                    .iter()
                    .map(Path::new)
                    .filter(|p| p.exists())
                    .map(|p| (bundle.clone(), p.to_owned())),
            );
        }
        binds.extend(self.binds.iter().cloned());
        let binds = binds
            .into_iter()
            .map(|(src, dst)| (c_path(&src), c_path(&dst)))
            .collect();
        PreparedMounts {
            _dir: dir,
            binds,
            root: c_path(Path::new("/")),
        }
    }
}

/// A [`MountSpec`] made ready for `pre_exec`: files on disk, paths as C strings.
pub(crate) struct PreparedMounts {
    /// Holds the generated files until the child has mounted them (the mount pins the inode).
    _dir: TempDir,
    binds: Vec<(CString, CString)>,
    root: CString,
}

impl PreparedMounts {
    /// Enters a new mount namespace whose mounts no longer propagate to the host's, then bind
    /// mounts the prepared files.
    ///
    /// # Safety
    /// Call only in a forked child before exec: it changes the calling process's mount
    /// namespace. Only async-signal-safe syscalls are made, and nothing is allocated.
    pub(crate) unsafe fn apply(&self) -> io::Result<()> {
        // SAFETY: plain syscalls on NUL-terminated strings that outlive the calls.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Without this, on a host whose `/` is shared (systemd's default) the bind mounts
            // below would appear in the host's namespace too.
            if libc::mount(
                std::ptr::null(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            for (src, dst) in &self.binds {
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}

/// `p` as a C string for a syscall.
pub(crate) fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes())
        .unwrap_or_else(|_| panic!("path with a NUL byte: {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_lists_localhost_then_the_test_names() {
        let spec = MountSpec::new().hosts(
            &["registry-1.docker.io", "quay.io"],
            "10.204.0.1".parse().unwrap(),
        );
        let hosts = spec.hosts_file();
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(hosts.contains("10.204.0.1\tregistry-1.docker.io\n"));
        assert!(hosts.ends_with("10.204.0.1\tquay.io\n"));
    }
}
