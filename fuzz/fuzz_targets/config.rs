//! The configuration loader: an operator's YAML file layered over the embedded defaults, then
//! `PULLPROXY_*` environment overrides.
//!
//! Input: the file's text, then any number of `NUL NAME=VALUE` overrides; each NAME gets the
//! `PULLPROXY_` prefix (e.g. `cache: {max_size: 1GiB}\n` `\0HUB__PASSWORD=s3cret`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullproxy::{
    config::{ConfigError, ENV_PREFIX},
    origins::hub::PasswordSource,
    settings::Config,
    telemetry::error_chain,
};

/// A password no input contains by chance: when an error or a `Debug` shows it, the loader leaked
/// the secret.
const CANARY: &str = "Zq7vCanaryHubPassw0rd-4f1e9b";
const PASSWORD_VAR: &str = "PULLPROXY_HUB__PASSWORD";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let yaml = parts.next().unwrap_or_default();
    let env: Vec<(String, String)> = parts
        .map(|var| {
            let (name, value) = var.split_once('=').unwrap_or((var, ""));
            (format!("{ENV_PREFIX}{name}"), value.to_owned())
        })
        .collect();

    // As given: loading never panics, whatever the file and the variables say.
    let as_given = load(yaml, env.clone());

    // The same input with the hub password set to the canary, replacing the input's own value
    // (the environment has one value per name). The key is matched case-insensitively, so another
    // spelling of the variable could come later and win: those inputs only check for leaks.
    if text.contains(CANARY) {
        return;
    }
    let other_spellings = env
        .iter()
        .any(|(k, _)| k != PASSWORD_VAR && k.eq_ignore_ascii_case(PASSWORD_VAR));
    let had_password = env.iter().any(|(k, v)| k == PASSWORD_VAR && !v.is_empty());
    let mut with_canary: Vec<(String, String)> =
        env.into_iter().filter(|(k, _)| k != PASSWORD_VAR).collect();
    with_canary.push((PASSWORD_VAR.to_owned(), CANARY.to_owned()));
    let with_canary = load(yaml, with_canary);
    match &with_canary {
        Err(e) => {
            let shown = format!("{} | {e:?}", error_chain(e));
            assert!(!shown.contains(CANARY), "the hub password leaked: {shown}");
        }
        Ok(config) => {
            let shown = format!("{config:?}");
            assert!(!shown.contains(CANARY), "the hub password leaked: {shown}");
            // Taken verbatim, whatever it looks like (kept only when there is a hub to send it to).
            if let (Some(hub), false) = (&config.hub, other_spellings) {
                match &hub.password {
                    PasswordSource::Inline(p) => assert_eq!(p.expose(), CANARY),
                    other => panic!("the hub password comes from {other:?}"),
                }
            }
        }
    }
    // Which text a password is does not decide whether the configuration is valid.
    if had_password && !other_spellings {
        assert_eq!(
            as_given.as_ref().map(drop).map_err(|e| error_chain(e)),
            with_canary.as_ref().map(drop).map_err(|e| error_chain(e)),
            "the password's value changed the outcome"
        );
    }
});

/// Loads, and checks a few promises of a loaded configuration.
fn load(yaml: &str, env: Vec<(String, String)>) -> Result<Config, ConfigError> {
    let config = Config::from_yaml(yaml, "fuzz.yaml", env)?;
    assert!(config.listen.port != 0);
    assert!(config.listen.addresses.iter().all(|a| a.is_loopback()));
    assert!(config.cache.max_bytes >= 1 << 20);
    assert!(config.redirect.guarded_ports.contains(&config.listen.port));
    Ok(config)
}
