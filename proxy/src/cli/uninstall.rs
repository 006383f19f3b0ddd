//! `pullproxy uninstall`: detaches the kernel programs and removes what is pinned.

use std::path::PathBuf;

use anyhow::Context as _;
use pullproxy::{redirect, settings::Config};

pub(crate) fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let removed = redirect::uninstall(&config.redirect.pin_dir)
        .with_context(|| format!("removing pins under {}", config.redirect.pin_dir.display()))?;
    if removed.is_empty() {
        println!("nothing pinned under {}", config.redirect.pin_dir.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    Ok(())
}
