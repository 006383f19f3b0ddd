//! Running commands loudly: every command is echoed before it runs, and a failure names it.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root (the parent of this crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, or `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root().join(p) })
        .unwrap_or_else(|| root().join("target"))
}

/// Prints a progress line for a newcomer watching the set-up.
pub fn say(msg: impl AsRef<str>) {
    eprintln!("xtask: {}", msg.as_ref());
}

/// A command rooted at the workspace.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root());
    c
}

/// A command in `proxy-ebpf/`, where rust-toolchain.toml selects the eBPF nightly.
pub fn ebpf_cmd(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root().join("proxy-ebpf"));
    clear_toolchain(&mut c);
    c
}

/// A command at the workspace root run with `toolchain` (the eBPF nightly, by its rustup name)
/// rather than the one rust-toolchain.toml pins there.
pub fn nightly_cmd(program: impl AsRef<OsStr>, toolchain: &str) -> Command {
    let mut c = cmd(program);
    clear_toolchain(&mut c);
    c.env("RUSTUP_TOOLCHAIN", toolchain);
    c
}

/// cargo exports the outer toolchain to its children (`RUSTUP_TOOLCHAIN`, `RUSTC`, ...), which
/// would override the toolchain a command is meant to use: remove them.
fn clear_toolchain(c: &mut Command) {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
    ] {
        c.env_remove(var);
    }
}

/// Runs a command, echoing it; fails with its exit status.
pub fn run(c: &mut Command) -> anyhow::Result<()> {
    say(format!("running {}", describe(c)));
    let status = c
        .status()
        .with_context(|| format!("starting {}", describe(c)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(c));
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout, or None if it could not run or failed.
pub fn output(c: &mut Command) -> Option<String> {
    let out = c.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}
