//! `pullproxy run` (the default): the proxy and the kernel redirect.

use std::path::PathBuf;

use anyhow::Context as _;
use pullproxy::{app, settings::Config, telemetry};

pub(crate) fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    // Whatever the daemon creates is root's alone, also where a library or a future file forgets
    // to say so (the cache and the node CA set their modes explicitly). Only here: `ca install`
    // writes the system trust store, which everyone must be able to read.
    // SAFETY: umask only replaces the process's file mode creation mask; it touches no memory
    // and cannot fail.
    unsafe { libc::umask(0o077) };
    let config = Config::load(config.as_deref())?;
    telemetry::init(&config.log);
    for var in &config.ignored_env {
        tracing::warn!(
            var,
            "environment variable is not a PULLPROXY_<SECTION>__<KEY> override; ignored"
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(app::run(config))
        .map_err(anyhow::Error::from)
}
