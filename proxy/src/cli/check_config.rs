//! `pullproxy check-config FILE`: validates a configuration file.

use std::path::PathBuf;

use pullproxy::settings::Config;

pub(crate) fn run(file: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(Some(&file))?;
    for var in &config.ignored_env {
        println!("{var}: not a PULLPROXY_<SECTION>__<KEY> override; ignored");
    }
    println!("{}: ok", file.display());
    Ok(())
}
