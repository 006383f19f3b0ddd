//! `pullproxy warm IMAGE...`: fills this node's cache through the running pullproxy.

use std::path::PathBuf;

use anyhow::Context as _;
use pullproxy::{settings::Config, telemetry, warm};

/// Prints warm-up progress, one line per step.
struct Printed;

impl warm::Progress for Printed {
    fn step(&self, image: &pullproxy::oci::ImageRef, message: &str) {
        println!("{image}: {message}");
    }
}

pub(crate) fn run(
    config: Option<PathBuf>,
    images: &[String],
    user: Option<String>,
    password_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let refs = images
        .iter()
        .map(|i| i.parse().with_context(|| format!("{i:?}")))
        .collect::<anyhow::Result<Vec<pullproxy::oci::ImageRef>>>()?;
    let password = match &password_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
        None => String::new(),
    };
    let warmer = warm::Warmer::new(
        &(&config).into(),
        user.as_deref().map(|u| (u, password.as_str())),
    )?;
    let failed = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async {
            let mut failed = 0;
            for image in &refs {
                if let Err(e) = warmer.warm(image, &Printed).await {
                    eprintln!("{image}: {}", telemetry::error_chain(&e));
                    failed += 1;
                }
            }
            failed
        });
    if failed > 0 {
        anyhow::bail!("{failed} of {} image(s) could not be warmed", refs.len());
    }
    Ok(())
}
