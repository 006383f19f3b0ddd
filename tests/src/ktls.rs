//! Where tests of pullproxy's kernel TLS path may run: as root, on a kernel whose `tls` takes
//! TLS 1.3 keys (the Debian guests of `cargo xtask vm-test`; not the development host, whose
//! kernel has no `tls` module). Elsewhere they are skipped loudly, unless [`OPT_IN`] says this
//! machine must have kernel TLS (vm-test sets it), which makes a missing `tls` an error.

/// The variable that says kernel TLS must be there.
pub const OPT_IN: &str = "PULLPROXY_KTLS_TESTS";

/// True when the kernel TLS test `name` may run.
pub fn may_run(name: &str) -> bool {
    if !crate::privileged::may_run(name) {
        return false;
    }
    match pullproxy::accept::ktls::probe() {
        Ok(_) => true,
        Err(e) if std::env::var(OPT_IN).is_ok() => {
            panic!("{name}: {OPT_IN} is set, but this kernel's TLS is not usable: {e}")
        }
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED {name}: this kernel has no usable kernel TLS ({e}); the test VM has \
                 it: `cargo xtask vm-test --suite ktls`. ***\n"
            );
            false
        }
    }
}

/// Returns from the calling test (after a loud message) unless [`may_run`] allows it.
#[macro_export]
macro_rules! require_kernel_tls {
    () => {
        if !$crate::ktls::may_run(module_path!()) {
            return;
        }
    };
}
