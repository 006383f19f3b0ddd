//! The hub mapping: which hub repository an image `{host}/{repo}` is looked up under, for any
//! template the configuration loader accepts and any registry host and repository.
//!
//! Input: lines `REGISTRY`, `REPOSITORY`, `DEFAULT TEMPLATE`, then any number of
//! `HOST=TEMPLATE` overrides, e.g. `quay.io\ncoreos/etcd\n{repo}\nquay.io=quay.io/{repo}`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullproxy::{oci::RepositoryName, origins::hub::canonical_registry, settings::Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let (Some(registry), Some(repo), Some(default)) = (lines.next(), lines.next(), lines.next())
    else {
        return;
    };
    // Requests only ever carry validated names.
    let Ok(repo) = repo.parse::<RepositoryName>() else {
        return;
    };
    let overrides: serde_json::Map<String, serde_json::Value> = lines
        .filter_map(|l| l.split_once('='))
        .map(|(host, template)| (host.to_owned(), template.into()))
        .collect();

    // The templates reach the mapping through the loader, as an operator's file (JSON is YAML).
    let file =
        serde_json::json!({"hub": {"mapping": {"default": default, "overrides": overrides}}});
    let Ok(config) = Config::from_yaml(&file.to_string(), "fuzz.yaml", Vec::new()) else {
        return;
    };
    let mapping = config.hub.expect("the default config has a hub").mapping;

    let canonical = canonical_registry(registry);
    let template = overrides
        .get(registry)
        .or_else(|| overrides.get(canonical))
        .and_then(|t| t.as_str())
        .unwrap_or(default);
    let want = expand(template, canonical, repo.as_str());

    match mapping.hub_repo(registry, &repo) {
        Ok(name) => {
            // Exactly the template's text with each placeholder replaced once, and a repository
            // name the hub's own router accepts: no `.`/`..` segment, no empty one, no escape.
            assert_eq!(name.as_str(), want, "template {template:?}");
            assert_eq!(name.as_str().parse::<RepositoryName>().as_ref(), Ok(&name));
        }
        Err(e) => {
            // Refused only when there is no valid name to give, and said so.
            assert!(
                want.parse::<RepositoryName>().is_err(),
                "{want:?} is a valid name, refused: {e}"
            );
        }
    }
    // The sealos convention keeps the repository as it is, for every registry.
    if template == "{repo}" {
        assert_eq!(mapping.hub_repo(registry, &repo).ok().as_ref(), Some(&repo));
    }
    // A template the loader accepted works for every registry host that is itself a valid name
    // and every repository, unless the result is too long.
    if canonical.parse::<RepositoryName>().is_ok() && want.len() <= pullproxy::oci::MAX_NAME_LEN {
        assert!(
            mapping.hub_repo(registry, &repo).is_ok(),
            "accepted template {template:?} fails for {canonical:?}/{repo}: {want:?}"
        );
    }
});

/// `{host}` and `{repo}` in `template` replaced, each occurrence once: what a template means,
/// written differently from the mapping's own expansion.
fn expand(template: &str, host: &str, repo: &str) -> String {
    template
        .split("{host}")
        .map(|piece| piece.replace("{repo}", repo))
        .collect::<Vec<_>>()
        .join(host)
}
