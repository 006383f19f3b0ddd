//! `pullproxy doctor`: checks this node and prints what needs fixing.

use std::path::PathBuf;

use pullproxy::{
    doctor::{self, DoctorArgs},
    settings::Config,
};

pub(crate) fn run(config: Option<PathBuf>, args: &DoctorArgs) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    if doctor::run(&config, args, &mut std::io::stdout().lock())? {
        Ok(())
    } else {
        anyhow::bail!("the node needs the fixes listed above")
    }
}
