//! Root-only tests: skipped loudly on a developer machine, never skipped in CI.

/// Whether this process is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when the privileged test `name` may run. Without root: panics when `CI=true` (CI must
/// never skip these), otherwise prints a loud SKIPPED line and returns false.
pub fn may_run(name: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{name}: needs root, and CI=true forbids skipping privileged tests");
    }
    eprintln!(
        "\n*** SKIPPED {name}: needs root (BPF, namespaces, cgroups). Run `cargo xtask test`. ***\n"
    );
    false
}

/// Returns from the calling test (after a loud message) when it cannot run without root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::privileged::may_run(module_path!()) {
            return;
        }
    };
}
