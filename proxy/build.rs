//! Builds the kernel programs (`proxy-ebpf`) with the pinned nightly and embeds the object in the
//! `pullproxy` binary, so one file is all a node needs. `cargo xtask setup` installs what this needs.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};

fn main() -> anyhow::Result<()> {
    // cargo-fuzz builds with `--cfg fuzzing`, which cargo passes to build scripts as
    // CARGO_CFG_FUZZING. The fuzz targets (fuzz/) call parsers and never load the kernel programs,
    // so their build embeds an empty object instead of compiling proxy-ebpf a second time, in
    // the fuzz target directory, with the nightly: that would double the fuzz build's time in CI.
    // (Built anyway, it comes out right: aya-build sets the eBPF build's own
    // CARGO_ENCODED_RUSTFLAGS, so cargo-fuzz's coverage flags in RUSTFLAGS never reach it.)
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR is not set"))?;
        fs::write(Path::new(&out).join("pullproxy"), [])?;
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
    let toolchain_file = root.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"').to_owned())
        .ok_or_else(|| anyhow!("no `channel = ...` in {}", toolchain_file.display()))?;

    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!(
            "bpf-linker is not on PATH: run `cargo xtask setup` once (it builds bpf-linker against {channel}'s LLVM)"
        );
    }
    let root = root.canonicalize()?;
    let package = aya_build::Package {
        name: "proxy-ebpf",
        root_dir: root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&channel))
        .with_context(|| format!("building the kernel programs with {channel}; `cargo xtask setup` installs the toolchain and bpf-linker"))
}
