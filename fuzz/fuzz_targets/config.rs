//! The configuration loader: an operator's YAML file layered over the embedded defaults, then
//! `PULLPROXY_*` environment overrides.
//!
//! Input: the file's text, then any number of `NUL NAME=VALUE` overrides; each NAME gets the
//! `PULLPROXY_` prefix (e.g. `cache: {max_size: 1GiB}\n` `\0HUB__PASSWORD=s3cret`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullproxy::{
    config::{Config, ConfigError, ENV_PREFIX},
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
            let shown = format!("{config:?} {:?}", config.hub_settings());
            assert!(!shown.contains(CANARY), "the hub password leaked: {shown}");
            if !other_spellings {
                // Taken verbatim, whatever it looks like.
                let password = config.hub.password.as_ref().map(|p| p.expose());
                assert_eq!(password, Some(CANARY));
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

/// Loads and, when valid, derives every settings struct the application builds from it: those
/// `expect` what validation promised.
fn load(yaml: &str, env: Vec<(String, String)>) -> Result<Config, ConfigError> {
    let config = Config::from_yaml(yaml, "fuzz.yaml", env)?;
    assert!(config.listen.port != 0);
    assert!(config.listen.addresses.iter().all(|a| a.is_loopback()));
    assert!(config.cache.max_size.0 >= 1 << 20);
    let _ = config.hub_settings();
    let _ = config.redirect_settings();
    let _ = config.tls_settings();
    let _ = config.cache_settings();
    Ok(config)
}
