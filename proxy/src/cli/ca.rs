//! `pullproxy ca ...`: the node CA in the system trust store.

use std::path::PathBuf;

use pullproxy::{
    settings::Config,
    trust::ca_command::{self, CaCommand},
};

/// Runs `command` with the node CA the configuration names.
pub(crate) fn run(config: Option<PathBuf>, command: CaCommand) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    Ok(ca_command::run(command, &config.tls)?)
}
