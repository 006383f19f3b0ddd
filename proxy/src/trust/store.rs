//! The system trust store: puts the node CA where the host's TLS clients (the container runtimes
//! among them) read their roots, on Debian/Ubuntu and RHEL/Fedora layouts, optionally under a
//! prefix such as a DaemonSet's view of the host at `/host`.

use std::{
    ffi::CString,
    fmt, fs,
    io::{self, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{MetadataExt, OpenOptionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::node_ca::{FileError, ca::pem_of};

/// Errors of finding and editing the system trust store.
#[derive(Debug, thiserror::Error)]
pub enum TrustStoreError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error(
        "no system trust store under {root}: looked for {looked_for}; install ca-certificates or \
         point --root at the host's root directory"
    )]
    NoTrustStore { root: PathBuf, looked_for: String },
}

/// First line of the block pullproxy appends to a bundle when the distribution's tool cannot
/// run; the block is replaced, never duplicated.
pub(crate) const BLOCK_BEGIN: &str =
    "# BEGIN pullproxy node CA (managed by `pullproxy ca install`; do not edit)";
/// Last line of that block.
pub(crate) const BLOCK_END: &str = "# END pullproxy node CA";

/// A search path for the refresh tool inside the (possibly prefixed) root.
const TOOL_DIRS: &[&str] = &["usr/sbin", "usr/bin", "sbin", "bin"];
const TOOL_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How a distribution arranges its trust store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Debian, Ubuntu (and Alpine): `update-ca-certificates`.
    Debian,
    /// RHEL, CentOS, Fedora, Rocky, Alma: `update-ca-trust`.
    Rhel,
}

impl Layout {
    /// Directory for locally added CAs, relative to the root.
    fn anchor_dir(self) -> &'static str {
        match self {
            Self::Debian => "usr/local/share/ca-certificates",
            Self::Rhel => "etc/pki/ca-trust/source/anchors",
        }
    }

    /// The file pullproxy puts there (`update-ca-certificates` only picks up `.crt`).
    fn anchor_file(self) -> &'static str {
        match self {
            Self::Debian => "pullproxy-node-ca.crt",
            Self::Rhel => "pullproxy-node-ca.pem",
        }
    }

    /// The PEM bundle TLS clients read (Go's first candidate on each distribution), relative to
    /// the root.
    fn bundle(self) -> &'static str {
        match self {
            Self::Debian => "etc/ssl/certs/ca-certificates.crt",
            Self::Rhel => "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        }
    }

    /// The tool that rebuilds the bundle from the anchors, and its arguments.
    fn tool(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Self::Debian => ("update-ca-certificates", &[]),
            Self::Rhel => ("update-ca-trust", &["extract"]),
        }
    }
}

/// A system trust store under a root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrustStore {
    root: PathBuf,
    layout: Layout,
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Installed {
    /// The anchor file holding the CA.
    pub(crate) anchor: PathBuf,
    /// Whether the anchor file was written (false: it already held this CA).
    pub(crate) anchor_changed: bool,
    pub(crate) refresh: Refresh,
}

/// How the bundle came to contain the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refresh {
    /// The bundle already contained the CA; nothing was run.
    AlreadyCurrent { bundle: PathBuf },
    /// The distribution's tool rebuilt the bundle.
    Tool { command: String },
    /// The tool could not run (`why`); pullproxy put the CA into the bundle in a marked block.
    /// The anchor file keeps it there when the tool next rebuilds the bundle.
    Block {
        bundle: PathBuf,
        changed: bool,
        why: String,
    },
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.anchor_changed {
            writeln!(f, "wrote the node CA to {}", self.anchor.display())?;
        } else {
            writeln!(f, "{} already holds the node CA", self.anchor.display())?;
        }
        match &self.refresh {
            Refresh::AlreadyCurrent { bundle } => {
                write!(f, "{} already contains it; nothing to do", bundle.display())
            }
            Refresh::Tool { command } => write!(f, "ran `{command}`"),
            Refresh::Block {
                bundle,
                changed,
                why,
            } => write!(
                f,
                "could not run the refresh tool ({why}); {} the node CA in {} in a marked block \
                 (the anchor file keeps it there when the tool next runs)",
                if *changed { "put" } else { "kept" },
                bundle.display()
            ),
        }
    }
}

/// Whether the node CA is in the trust store, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InstallState {
    /// Neither the anchor nor the bundle holds the CA.
    NotInstalled { bundle: PathBuf },
    /// The anchor holds it but the bundle TLS clients read does not yet.
    AnchorOnly { anchor: PathBuf, bundle: PathBuf },
    /// The bundle holds it. `since` is the modification time of `evidence`: the anchor file when
    /// the distribution's tool put the CA into the bundle (later unrelated bundle rebuilds do not
    /// move it), the bundle when pullproxy's marked block did.
    Installed {
        evidence: PathBuf,
        since: SystemTime,
    },
}

impl TrustStore {
    /// Finds the trust store layout under `root` (`/` for this system).
    pub(crate) fn detect(root: &Path) -> Result<Self, TrustStoreError> {
        let layouts = [Layout::Debian, Layout::Rhel];
        // A layout whose bundle exists wins over one that only has the anchor directory.
        let found = layouts
            .iter()
            .find(|l| root.join(l.anchor_dir()).is_dir() && root.join(l.bundle()).exists())
            .or_else(|| layouts.iter().find(|l| root.join(l.anchor_dir()).is_dir()));
        match found {
            Some(layout) => Ok(Self {
                root: root.to_owned(),
                layout: *layout,
            }),
            None => Err(TrustStoreError::NoTrustStore {
                root: root.to_owned(),
                looked_for: layouts
                    .iter()
                    .map(|l| l.anchor_dir())
                    .collect::<Vec<_>>()
                    .join(" and "),
            }),
        }
    }

    #[cfg(test)]
    /// The distribution layout found.
    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    /// The anchor file pullproxy writes.
    pub(crate) fn anchor_path(&self) -> PathBuf {
        self.root
            .join(self.layout.anchor_dir())
            .join(self.layout.anchor_file())
    }

    /// The bundle TLS clients read.
    pub(crate) fn bundle_path(&self) -> PathBuf {
        resolve_in_root(&self.root, self.layout.bundle())
    }

    /// The command that refreshes the bundle, for messages.
    pub(crate) fn refresh_command(&self) -> String {
        let (tool, args) = self.layout.tool();
        std::iter::once(tool)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Installs the CA: the anchor file, then the bundle (through the distribution's tool, or
    /// by editing the bundle when the tool cannot run in this root). Idempotent: a second call
    /// changes nothing, so modification times keep telling when the CA was installed.
    pub(crate) fn install(&self, ca: &CertificateDer<'_>) -> Result<Installed, TrustStoreError> {
        let anchor = self.anchor_path();
        let pem = pem_of(ca);
        let anchor_changed = write_if_changed(&anchor, pem.as_bytes(), 0o644)?;
        let bundle = self.bundle_path();
        // Already in the bundle (an earlier install, or the tool ran since): running anything
        // would only move modification times.
        if bundle_contains(&bundle, ca)? {
            return Ok(Installed {
                anchor,
                anchor_changed,
                refresh: Refresh::AlreadyCurrent { bundle },
            });
        }
        let refresh = match self.run_tool() {
            Ok(command) if bundle_contains(&bundle, ca)? => Refresh::Tool { command },
            Ok(command) => self.edit_bundle(
                ca,
                format!("`{command}` ran but the bundle still lacks the CA"),
            )?,
            Err(why) => self.edit_bundle(ca, why)?,
        };
        Ok(Installed {
            anchor,
            anchor_changed,
            refresh,
        })
    }

    /// Whether and since when the CA is installed.
    pub(crate) fn state(&self, ca: &CertificateDer<'_>) -> Result<InstallState, TrustStoreError> {
        let anchor = self.anchor_path();
        let bundle = self.bundle_path();
        let anchor_has = file_contains(&anchor, ca)?;
        let bundle_text = match fs::read_to_string(&bundle) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(FileError::at("reading", &bundle)(e).into()),
        };
        if !text_contains(&bundle_text, ca) {
            return Ok(if anchor_has {
                InstallState::AnchorOnly { anchor, bundle }
            } else {
                InstallState::NotInstalled { bundle }
            });
        }
        let in_block = text_contains(&block_of(&bundle_text), ca);
        let evidence = if anchor_has && !in_block {
            anchor
        } else {
            bundle
        };
        let since = fs::metadata(&evidence)
            .and_then(|m| m.modified())
            .map_err(FileError::at("inspecting", &evidence))?;
        Ok(InstallState::Installed { evidence, since })
    }

    /// Runs the refresh tool inside the root: directly for `/`, through chroot(2) for a prefix
    /// (a privileged DaemonSet can). The error says why it could not, for the operator.
    fn run_tool(&self) -> Result<String, String> {
        let (tool, args) = self.layout.tool();
        let Some(inside) = TOOL_DIRS
            .iter()
            .map(|dir| Path::new("/").join(dir).join(tool))
            .find(|p| self.root.join(p.strip_prefix("/").unwrap_or(p)).is_file())
        else {
            return Err(format!("{tool} not found under {}", self.root.display()));
        };
        let mut command = Command::new(&inside);
        command.args(args).env("PATH", TOOL_PATH_ENV);
        let is_system_root = self.root.canonicalize().is_ok_and(|r| r == Path::new("/"));
        if !is_system_root {
            let root = CString::new(self.root.as_os_str().as_bytes())
                .map_err(|_| "the root path contains a NUL byte".to_owned())?;
            // SAFETY: runs in the forked child before exec; chroot(2) and chdir(2) are
            // async-signal-safe and nothing here allocates (the path was prepared above).
            unsafe {
                command.pre_exec(move || {
                    if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let shown = format!("{} {}", inside.display(), args.join(" "))
            .trim_end()
            .to_owned();
        let output = command
            .output()
            .map_err(|e| format!("running {shown} in {}: {e}", self.root.display()))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!(
                "{shown} failed ({}): {}",
                output.status,
                stderr.trim()
            ));
        }
        Ok(shown)
    }

    /// Puts the CA into the bundle in a marked block, replacing an earlier block; leaves a bundle
    /// that already holds the CA elsewhere alone. Never creates a bundle: one holding only the
    /// node CA would distrust every public CA on the host.
    fn edit_bundle(
        &self,
        ca: &CertificateDer<'_>,
        why: String,
    ) -> Result<Refresh, TrustStoreError> {
        let bundle = self.bundle_path();
        let current = fs::read_to_string(&bundle).map_err(FileError::at("reading", &bundle))?;
        let mut next = strip_blocks(&current);
        if !text_contains(&next, ca) {
            if !next.is_empty() && !next.ends_with('\n') {
                next.push('\n');
            }
            next.push_str(BLOCK_BEGIN);
            next.push('\n');
            next.push_str(&pem_of(ca));
            next.push_str(BLOCK_END);
            next.push('\n');
        }
        let changed = write_if_changed(&bundle, next.as_bytes(), 0o644)?;
        Ok(Refresh::Block {
            bundle,
            changed,
            why,
        })
    }
}

/// Follows symlinks of the last path component inside `root`: an absolute link target such as
/// `/etc/pki/...` means the root's `/etc`, not the one of the process reading it.
fn resolve_in_root(root: &Path, relative: &str) -> PathBuf {
    let mut path = root.join(relative);
    for _ in 0..8 {
        let Ok(target) = fs::read_link(&path) else {
            break;
        };
        path = match target.strip_prefix("/") {
            Ok(inside) => root.join(inside),
            Err(_) => path.parent().unwrap_or(root).join(target),
        };
    }
    path
}

/// Writes `contents` to `path` unless it already holds exactly that, through a temporary file
/// and a rename so readers never see half a bundle. Keeps the existing file's mode.
fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<bool, TrustStoreError> {
    let mode = match fs::read(path) {
        Ok(existing) if existing == contents => return Ok(false),
        Ok(_) => fs::metadata(path)
            .map(|m| m.mode() & 0o7777)
            .unwrap_or(mode),
        Err(e) if e.kind() == io::ErrorKind::NotFound => mode,
        Err(e) => return Err(FileError::at("reading", path)(e).into()),
    };
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".pullproxy-tmp");
    let tmp = path.with_file_name(name);
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(FileError::at("creating", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(FileError::at("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(FileError::at("renaming into", path))?;
    Ok(true)
}

fn file_contains(path: &Path, ca: &CertificateDer<'_>) -> Result<bool, TrustStoreError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text_contains(&text, ca)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(FileError::at("reading", path)(e).into()),
    }
}

fn bundle_contains(bundle: &Path, ca: &CertificateDer<'_>) -> Result<bool, TrustStoreError> {
    file_contains(bundle, ca)
}

fn text_contains(text: &str, ca: &CertificateDer<'_>) -> bool {
    CertificateDer::pem_slice_iter(text.as_bytes())
        .filter_map(Result::ok)
        .any(|cert| cert.as_ref() == ca.as_ref())
}

/// The bundle without pullproxy's blocks. A BEGIN without its END loses only the marker line, so
/// a damaged block can never swallow the certificates after it.
fn strip_blocks(text: &str) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() == BLOCK_BEGIN {
            match lines[i..].iter().position(|l| l.trim_end() == BLOCK_END) {
                Some(end) => i += end + 1,
                None => i += 1,
            }
            continue;
        }
        out.push_str(lines[i]);
        i += 1;
    }
    out
}

/// The text inside pullproxy's blocks.
fn block_of(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        match line.trim_end() {
            BLOCK_BEGIN => inside = true,
            BLOCK_END => inside = false,
            _ if inside => out.push_str(line),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

    use super::*;

    /// A stand-in for the public CAs already in a bundle.
    pub(crate) fn some_cert_pem() -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        CertificateParams::new(vec!["public-ca.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem()
    }

    pub(crate) fn node_ca_der() -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        CertificateParams::new(vec!["node-ca.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .der()
            .clone()
    }

    /// A fake host root with a distribution's trust store layout and a bundle of public CAs.
    pub(crate) fn fake_root(layout: Layout) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(layout.anchor_dir())).unwrap();
        let bundle = dir.path().join(layout.bundle());
        fs::create_dir_all(bundle.parent().unwrap()).unwrap();
        let public = format!("{}{}", some_cert_pem(), some_cert_pem());
        fs::write(&bundle, &public).unwrap();
        (dir, public)
    }

    fn install_twice(layout: Layout, anchor: &str, bundle: &str) {
        let (root, public) = fake_root(layout);
        let store = TrustStore::detect(root.path()).unwrap();
        assert_eq!(store.layout(), layout);
        let ca = node_ca_der();
        assert!(matches!(
            store.state(&ca).unwrap(),
            InstallState::NotInstalled { .. }
        ));

        let first = store.install(&ca).unwrap();
        assert_eq!(first.anchor, root.path().join(anchor));
        assert!(first.anchor_changed);
        match &first.refresh {
            Refresh::Block {
                changed: true, why, ..
            } => {
                assert!(why.contains("not found"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(first.to_string().contains("marked block"), "{first}");
        let bundle_path = root.path().join(bundle);
        let after_first = fs::read_to_string(&bundle_path).unwrap();
        assert!(
            after_first.starts_with(&public),
            "public CAs kept, in order"
        );
        assert!(text_contains(&after_first, &ca));
        assert_eq!(fs::read(&first.anchor).unwrap(), pem_of(&ca).as_bytes());
        let since = match store.state(&ca).unwrap() {
            InstallState::Installed { evidence, since } => {
                assert_eq!(evidence, bundle_path, "the block is the evidence");
                since
            }
            other => panic!("{other:?}"),
        };

        std::thread::sleep(Duration::from_millis(20));
        let second = store.install(&ca).unwrap();
        assert!(!second.anchor_changed);
        assert!(matches!(second.refresh, Refresh::AlreadyCurrent { .. }));
        assert_eq!(fs::read_to_string(&bundle_path).unwrap(), after_first);
        assert!(
            matches!(store.state(&ca).unwrap(), InstallState::Installed { since: s, .. } if s == since),
            "an idempotent install does not move the install time"
        );

        // A new CA (regenerated) replaces the block instead of adding a second one.
        let new_ca = node_ca_der();
        let third = store.install(&new_ca).unwrap();
        assert!(third.anchor_changed);
        let after_third = fs::read_to_string(&bundle_path).unwrap();
        assert_eq!(after_third.matches(BLOCK_BEGIN).count(), 1);
        assert!(text_contains(&after_third, &new_ca));
        assert!(!text_contains(&after_third, &ca));
        assert!(after_third.starts_with(&public));
    }

    #[test]
    fn debian_install_into_a_prefix_is_idempotent() {
        install_twice(
            Layout::Debian,
            "usr/local/share/ca-certificates/pullproxy-node-ca.crt",
            "etc/ssl/certs/ca-certificates.crt",
        );
    }

    #[test]
    fn rhel_install_into_a_prefix_is_idempotent() {
        install_twice(
            Layout::Rhel,
            "etc/pki/ca-trust/source/anchors/pullproxy-node-ca.pem",
            "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        );
    }

    #[test]
    fn a_bundle_the_tool_already_rebuilt_is_not_edited() {
        let (root, public) = fake_root(Layout::Debian);
        let store = TrustStore::detect(root.path()).unwrap();
        let ca = node_ca_der();
        // As if update-ca-certificates had run: the CA sits in the bundle, no block.
        let bundle = root.path().join(Layout::Debian.bundle());
        fs::write(&bundle, format!("{public}{}", pem_of(&ca))).unwrap();
        let installed = store.install(&ca).unwrap();
        assert!(installed.anchor_changed);
        assert!(matches!(installed.refresh, Refresh::AlreadyCurrent { .. }));
        assert!(!fs::read_to_string(&bundle).unwrap().contains(BLOCK_BEGIN));
        // Evidence is the anchor: the tool put it there.
        assert!(matches!(
            store.state(&ca).unwrap(),
            InstallState::Installed { evidence, .. } if evidence == store.anchor_path()
        ));
    }

    #[test]
    fn anchor_without_bundle_entry_is_reported() {
        let (root, _) = fake_root(Layout::Rhel);
        let store = TrustStore::detect(root.path()).unwrap();
        let ca = node_ca_der();
        fs::write(store.anchor_path(), pem_of(&ca)).unwrap();
        assert!(matches!(
            store.state(&ca).unwrap(),
            InstallState::AnchorOnly { .. }
        ));
    }

    #[test]
    fn no_layout_and_no_bundle_are_errors() {
        let empty = tempfile::tempdir().unwrap();
        let err = TrustStore::detect(empty.path()).unwrap_err().to_string();
        assert!(err.contains("usr/local/share/ca-certificates"), "{err}");

        // A layout without a bundle: never create one that would trust only the node CA.
        let bare = tempfile::tempdir().unwrap();
        fs::create_dir_all(bare.path().join(Layout::Debian.anchor_dir())).unwrap();
        let store = TrustStore::detect(bare.path()).unwrap();
        assert!(store.install(&node_ca_der()).is_err());
        assert!(!store.bundle_path().exists());
    }

    #[test]
    fn bundle_symlinks_resolve_inside_the_root() {
        let (root, _) = fake_root(Layout::Rhel);
        // RHEL's /etc/pki/tls/certs/ca-bundle.crt style: an absolute link.
        let link = root.path().join("etc/ssl/link.pem");
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(Path::new("/").join(Layout::Rhel.bundle()), &link).unwrap();
        assert_eq!(
            resolve_in_root(root.path(), "etc/ssl/link.pem"),
            root.path().join(Layout::Rhel.bundle())
        );
    }

    #[test]
    fn a_damaged_block_never_swallows_certificates() {
        let text = format!("{BLOCK_BEGIN}\nA\n{BLOCK_END}\nB\n{BLOCK_BEGIN}\nC\n");
        assert_eq!(strip_blocks(&text), "B\nC\n");
    }
}
