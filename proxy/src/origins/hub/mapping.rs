//! Which hub repository holds an image: the templates, checked at load and expanded per request.

use std::collections::BTreeMap;

use crate::oci::{NameError, RepositoryName};

/// Repository on the hub for an image `{host}/{repo}`.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub(crate) default: String,
    pub(crate) overrides: BTreeMap<String, String>,
}

/// The registry host a default template is checked with when the configuration loads.
const PROBE_HOST: &str = "docker.io";
/// The repository every template is checked with when the configuration loads. Valid names start
/// and end with `[a-z0-9]`, so a template that gives a valid name for this one gives one for every
/// name short enough.
const PROBE_REPO: &str = "library/nginx";

/// A hub repository the mapping cannot give: the template, the host or the length make it an
/// invalid repository name, which must never reach the hub's URL (a `..` or an empty segment
/// would address something else). The hub is skipped for that image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "hub mapping {template:?} gives no valid repository name for an image from {registry}: {reason}"
)]
pub struct MappingError {
    pub(crate) template: String,
    pub(crate) registry: String,
    pub(crate) reason: NameError,
}

/// A template the configuration must not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("must contain {{repo}}")]
    NoRepo,
    #[error("only {{host}} and {{repo}} may be used")]
    UnknownPlaceholder,
    #[error("gives {example:?} for {host}/{PROBE_REPO}, which is not a repository name: {reason}")]
    InvalidName {
        host: String,
        example: String,
        reason: NameError,
    },
}

impl Mapping {
    #[cfg(test)]
    /// The sealos convention: the registry host is dropped.
    pub(crate) fn sealos() -> Self {
        Self {
            default: "{repo}".into(),
            overrides: BTreeMap::new(),
        }
    }

    /// The hub repository for `repo` from `registry` (`docker.io/library/nginx` ->
    /// `library/nginx` by default). `registry` may be an alias (`registry-1.docker.io`); overrides
    /// match the alias or its canonical name. Fails when the result is not a valid repository
    /// name (a host that is no name component, or a name too long once the template adds to it).
    pub fn hub_repo(
        &self,
        registry: &str,
        repo: &RepositoryName,
    ) -> Result<RepositoryName, MappingError> {
        let canonical = canonical_registry(registry);
        let template = self
            .overrides
            .get(registry)
            .or_else(|| self.overrides.get(canonical))
            .unwrap_or(&self.default);
        expand(template, canonical, repo.as_str())
            .parse()
            .map_err(|reason| MappingError {
                template: template.clone(),
                registry: registry.to_owned(),
                reason,
            })
    }
}

/// Checks a template for the configuration: `{repo}` present, no other placeholder, and a valid
/// repository name for an image from `registry` (an override's host; `None` for the default
/// template, which is checked with `docker.io`).
pub(super) fn check_template(template: &str, registry: Option<&str>) -> Result<(), TemplateError> {
    if !template.contains("{repo}") {
        return Err(TemplateError::NoRepo);
    }
    let rest = template.replace("{repo}", "").replace("{host}", "");
    if rest.contains(['{', '}']) {
        return Err(TemplateError::UnknownPlaceholder);
    }
    let host = canonical_registry(registry.unwrap_or(PROBE_HOST));
    let example = expand(template, host, PROBE_REPO);
    match example.parse::<RepositoryName>() {
        Ok(_) => Ok(()),
        Err(reason) => Err(TemplateError::InvalidName {
            host: host.to_owned(),
            example,
            reason,
        }),
    }
}

/// `template` with each `{host}` and `{repo}` replaced once, left to right: a host or repository
/// that itself contains a placeholder's text is not expanded again.
fn expand(template: &str, host: &str, repo: &str) -> String {
    let mut out = String::with_capacity(template.len() + host.len() + repo.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("{host}") {
            out.push_str(host);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{repo}") {
            out.push_str(repo);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The name images use for a registry host: Docker Hub's API hosts are `docker.io`.
pub fn canonical_registry(host: &str) -> &str {
    match host {
        "registry-1.docker.io" | "index.docker.io" | "registry.hub.docker.com" => "docker.io",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RepositoryName {
        s.parse().unwrap()
    }

    fn mapped(m: &Mapping, registry: &str, repo: &str) -> String {
        m.hub_repo(registry, &name(repo)).unwrap().to_string()
    }

    #[test]
    fn sealos_mapping_drops_the_host() {
        let m = Mapping::sealos();
        assert_eq!(
            mapped(&m, "registry-1.docker.io", "library/nginx"),
            "library/nginx"
        );
        assert_eq!(mapped(&m, "registry.k8s.io", "pause"), "pause");
        assert_eq!(mapped(&m, "quay.io", "coreos/etcd"), "coreos/etcd");
    }

    #[test]
    fn overrides_keep_the_host_or_add_a_prefix() {
        let mut m = Mapping::sealos();
        m.overrides.insert("quay.io".into(), "{host}/{repo}".into());
        m.overrides
            .insert("docker.io".into(), "mirror/{repo}".into());
        assert_eq!(mapped(&m, "quay.io", "coreos/etcd"), "quay.io/coreos/etcd");
        // Docker Hub's API host matches an override written for docker.io.
        assert_eq!(
            mapped(&m, "registry-1.docker.io", "library/nginx"),
            "mirror/library/nginx"
        );
        assert_eq!(mapped(&m, "ghcr.io", "a/b"), "a/b");
    }

    /// Found by the `hub_mapping` fuzz target: the loader accepted any template holding `{repo}`,
    /// and the mapping put whatever it gave into the hub's URL (`/v2/../library/nginx/...`).
    #[test]
    fn templates_that_give_no_repository_name_are_refused_at_load() {
        for template in [
            "../{repo}",
            "./{repo}",
            "/{repo}",
            "{repo}/",
            "a//{repo}",
            "{repo}/..",
            "{repo}-",
            "Mirror/{repo}",
            "mirror {repo}",
            "{host}:5000/{repo}",
        ] {
            let err = check_template(template, Some("quay.io")).unwrap_err();
            assert!(
                matches!(err, TemplateError::InvalidName { .. }),
                "{template:?}: {err}"
            );
        }
        assert_eq!(check_template("{host}", None), Err(TemplateError::NoRepo));
        assert_eq!(
            check_template("{registry}/{repo}", None),
            Err(TemplateError::UnknownPlaceholder)
        );
        for template in ["{repo}", "{host}/{repo}", "mirror/{repo}", "{host}-{repo}"] {
            assert_eq!(check_template(template, None), Ok(()), "{template:?}");
        }
        // An override is checked with its own host: an IP literal cannot be a name component.
        assert!(check_template("{host}/{repo}", Some("[::1]")).is_err());
        assert!(check_template("{repo}", Some("[::1]")).is_ok());
    }

    #[test]
    fn a_name_the_template_cannot_give_is_an_error_not_a_path() {
        let mut m = Mapping::sealos();
        m.default = "{host}/{repo}".into();
        // An insecure registry named by an IPv6 literal: not a name component.
        let err = m.hub_repo("[fd00::1]", &name("app")).unwrap_err();
        assert_eq!(err.registry, "[fd00::1]");
        assert!(
            err.to_string().contains("no valid repository name"),
            "{err}"
        );
        // Within the limit as a request's name, over it once the host is added.
        let long = ["a"; 126].join("/");
        assert!(m.hub_repo("quay.io", &name(&long)).is_err());
        assert_eq!(mapped(&m, "10.0.0.7", "app"), "10.0.0.7/app");
    }

    #[test]
    fn placeholders_are_expanded_once() {
        // A host that spells a placeholder is not expanded again (hosts come from the Host
        // header of configured insecure registries too).
        assert_eq!(expand("{host}/{repo}", "{repo}", "a"), "{repo}/a");
        assert_eq!(expand("{repo}", "h", "{host}"), "{host}");
        assert_eq!(expand("{x}{{repo}}", "h", "r"), "{x}{r}");
    }
}
