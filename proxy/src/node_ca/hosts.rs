//! Which server names pullproxy terminates TLS for (the well-known public registries, every host
//! the configuration adds, or everything with `"*"`), and the X.509 name constraints that follow
//! from them.

use std::{collections::BTreeSet, fmt, str::FromStr};

use rustls_pki_types::DnsName;

/// A configured intercepted host that is not a usable pattern.
#[derive(Debug, thiserror::Error)]
#[error("intercepted host {pattern:?}: {reason}")]
pub struct HostPatternError {
    pattern: String,
    reason: &'static str,
}

/// Registries intercepted without any configuration. Only hosts that serve the distribution API
/// themselves: token services (`auth.docker.io`) and blob CDNs are reached by the runtime on their
/// own connections, which must stay spliced so credentials and redirects pass untouched.
///
/// `*.gcr.io` covers the regional Container Registry hosts (`us.gcr.io`, ...), `*.pkg.dev` the
/// Artifact Registry hosts (`us-docker.pkg.dev`, ...), which cannot be listed exhaustively.
pub(crate) const DEFAULT_REGISTRY_HOSTS: &[&str] = &[
    "docker.io",
    "registry-1.docker.io",
    "index.docker.io",
    "quay.io",
    "registry.k8s.io",
    "k8s.gcr.io",
    "gcr.io",
    "*.gcr.io",
    "*.pkg.dev",
    "ghcr.io",
    "public.ecr.aws",
    "mcr.microsoft.com",
    "nvcr.io",
    "docker.elastic.co",
    "registry.gitlab.com",
];

/// Hosts that a `*.suffix` pattern never sweeps in, nor a name constraint derived from an
/// intercepted parent domain: `docker.io` is intercepted, but its token service holds the
/// runtime's credentials and must be neither terminated nor impersonable with the node CA.
/// Naming one exactly still intercepts it: that is an explicit decision.
pub(crate) const NEVER_BY_SUFFIX: &[&str] = &["auth.docker.io"];

/// One entry of the intercepted-hosts list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum HostPattern {
    /// `"*"`: every server name.
    Any,
    /// An exact name, lowercased.
    Exact(String),
    /// `*.example.com`: every name below `example.com` (any depth), not `example.com` itself.
    /// Holds `example.com`.
    Suffix(String),
}

impl FromStr for HostPattern {
    type Err = HostPatternError;

    fn from_str(pattern: &str) -> Result<Self, HostPatternError> {
        let err = |reason| HostPatternError {
            pattern: pattern.to_owned(),
            reason,
        };
        let p = pattern.trim().to_ascii_lowercase();
        if p == "*" {
            return Ok(Self::Any);
        }
        if p.contains(':') {
            return Err(err(
                "a server name has no port (and IP addresses are not intercepted by name)",
            ));
        }
        let (suffix, name) = match p.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, p.as_str()),
        };
        if name.contains('*') {
            return Err(err(
                "only a leading `*.` label is supported, or `*` alone for everything",
            ));
        }
        if name.ends_with('.') {
            return Err(err("write the name without a trailing dot"));
        }
        if DnsName::try_from(name).is_err() {
            return Err(err(
                "not a valid DNS name (IP addresses cannot be intercepted by name)",
            ));
        }
        if suffix {
            if !name.contains('.') {
                return Err(err(
                    "a suffix needs at least two labels; use `*` to intercept everything",
                ));
            }
            Ok(Self::Suffix(name.to_owned()))
        } else {
            Ok(Self::Exact(name.to_owned()))
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(name) => f.write_str(name),
            Self::Suffix(name) => write!(f, "*.{name}"),
        }
    }
}

/// The set of server names whose TLS is terminated. Everything else is spliced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InterceptSet {
    any: bool,
    exact: BTreeSet<String>,
    suffixes: BTreeSet<String>,
}

impl InterceptSet {
    /// [`DEFAULT_REGISTRY_HOSTS`] plus the configured patterns.
    pub(crate) fn with_defaults(configured: &[String]) -> Result<Self, HostPatternError> {
        Self::from_patterns(
            DEFAULT_REGISTRY_HOSTS
                .iter()
                .copied()
                .chain(configured.iter().map(String::as_str)),
        )
    }

    /// Exactly the given patterns (see [`HostPattern`]).
    pub(crate) fn from_patterns<'a>(
        patterns: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, HostPatternError> {
        let mut set = Self {
            any: false,
            exact: BTreeSet::new(),
            suffixes: BTreeSet::new(),
        };
        for pattern in patterns {
            match pattern.parse()? {
                HostPattern::Any => set.any = true,
                HostPattern::Exact(name) => {
                    set.exact.insert(name);
                }
                HostPattern::Suffix(name) => {
                    set.suffixes.insert(name);
                }
            }
        }
        Ok(set)
    }

    /// Whether `"*"` was configured: every server name is intercepted and the node CA cannot
    /// carry name constraints.
    pub(crate) fn intercepts_all(&self) -> bool {
        self.any
    }

    /// Whether TLS for `server_name` (as in SNI; compared case-insensitively, a trailing dot
    /// ignored) is terminated.
    pub(crate) fn contains(&self, server_name: &str) -> bool {
        let name = normalize(server_name);
        if self.any || self.exact.contains(&name) {
            return true;
        }
        let swept = self
            .suffixes
            .iter()
            .any(|suffix| is_strictly_below(&name, suffix));
        swept
            && !NEVER_BY_SUFFIX
                .iter()
                .any(|never| name == *never || is_strictly_below(&name, never))
    }

    /// A bounded metric label for `server_name`: the name when it is listed exactly, the
    /// `*.suffix` pattern that sweeps it in, or `other` (unlisted names, `"*"`).
    pub(crate) fn label(&self, server_name: &str) -> String {
        let name = normalize(server_name);
        if self.exact.contains(&name) {
            return name;
        }
        if self.contains(&name)
            && let Some(suffix) = self
                .suffixes
                .iter()
                .filter(|suffix| is_strictly_below(&name, suffix))
                .max_by_key(|suffix| suffix.len())
        {
            return format!("*.{suffix}");
        }
        "other".to_owned()
    }

    /// The patterns, sorted; for logs and error messages.
    pub(crate) fn patterns(&self) -> Vec<HostPattern> {
        let mut all: Vec<HostPattern> = self
            .exact
            .iter()
            .cloned()
            .map(HostPattern::Exact)
            .chain(self.suffixes.iter().cloned().map(HostPattern::Suffix))
            .collect();
        if self.any {
            all.insert(0, HostPattern::Any);
        }
        all
    }

    /// The DNS name constraints a CA minting for this set needs, or `None` for `"*"`.
    ///
    /// A dNSName constraint always admits the name and everything below it (RFC 5280 4.2.1.10),
    /// so `registry-1.docker.io` also admits `x.registry-1.docker.io` and `*.pkg.dev` becomes
    /// `pkg.dev`. Names below another permitted name are dropped as redundant; hosts in
    /// [`NEVER_BY_SUFFIX`] that a permitted subtree would admit are excluded.
    pub(crate) fn name_constraints(&self) -> Option<DnsConstraints> {
        if self.any {
            return None;
        }
        let candidates: BTreeSet<&str> = self
            .exact
            .iter()
            .chain(self.suffixes.iter())
            .map(String::as_str)
            .collect();
        let permitted: Vec<String> = candidates
            .iter()
            .filter(|name| {
                !candidates
                    .iter()
                    .any(|other| is_strictly_below(name, other))
            })
            .map(|name| (*name).to_owned())
            .collect();
        let excluded = NEVER_BY_SUFFIX
            .iter()
            .filter(|never| !self.exact.contains(**never))
            .filter(|never| permitted.iter().any(|p| dns_subtree_contains(p, never)))
            .map(|never| (*never).to_owned())
            .collect();
        Some(DnsConstraints {
            permitted,
            excluded,
        })
    }

    #[cfg(test)]
    /// Whether a CA with `constraints` (`None`: no name constraints) may mint for every name this
    /// set intercepts. `"*"` is covered only by an unconstrained CA.
    pub(crate) fn covered_by(&self, constraints: Option<&DnsConstraints>) -> bool {
        self.uncovered(constraints).is_empty()
    }

    /// The patterns a CA with `constraints` cannot mint for.
    pub(crate) fn uncovered(&self, constraints: Option<&DnsConstraints>) -> Vec<HostPattern> {
        let Some(c) = constraints else {
            return Vec::new();
        };
        self.patterns()
            .into_iter()
            .filter(|pattern| match pattern {
                HostPattern::Any => !c.permitted.is_empty() || !c.excluded.is_empty(),
                HostPattern::Exact(name) => !c.permits(name),
                HostPattern::Suffix(suffix) => !c.permits_below(suffix),
            })
            .collect()
    }
}

/// The dNSName part of a CA's name constraints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DnsConstraints {
    /// Permitted subtrees; empty means DNS names are not restricted by a permitted list.
    pub(crate) permitted: Vec<String>,
    /// Excluded subtrees.
    pub(crate) excluded: Vec<String>,
}

impl DnsConstraints {
    /// Whether a certificate for `name` chains to a CA with these constraints.
    pub(crate) fn permits(&self, name: &str) -> bool {
        let name = normalize(name);
        (self.permitted.is_empty()
            || self
                .permitted
                .iter()
                .any(|p| dns_subtree_contains(p, &name)))
            && !self.excluded.iter().any(|e| dns_subtree_contains(e, &name))
    }

    /// Whether every name strictly below `suffix` is permitted, except the subtrees of
    /// [`NEVER_BY_SUFFIX`] hosts (which a suffix pattern leaves out anyway).
    fn permits_below(&self, suffix: &str) -> bool {
        let subtree_permitted = self.permitted.is_empty()
            || self
                .permitted
                .iter()
                .any(|p| dns_subtree_contains(p, suffix));
        let nothing_excluded = self.excluded.iter().all(|e| {
            let cuts_into_suffix = dns_subtree_contains(e, suffix) || is_strictly_below(e, suffix);
            !cuts_into_suffix
                || NEVER_BY_SUFFIX
                    .iter()
                    .any(|never| dns_subtree_contains(never, e))
        });
        subtree_permitted && nothing_excluded
    }
}

/// RFC 5280 dNSName constraint matching, as webpki, Go and OpenSSL do it: `example.com` matches
/// itself and every name below it; `.example.com` only names below it; the empty constraint
/// everything. Case-insensitive.
pub(crate) fn dns_subtree_contains(constraint: &str, name: &str) -> bool {
    let constraint = constraint.to_ascii_lowercase();
    let name = name.to_ascii_lowercase();
    if constraint.is_empty() {
        return true;
    }
    if constraint.starts_with('.') {
        return name.len() > constraint.len() && name.ends_with(&constraint);
    }
    name == constraint || is_strictly_below(&name, &constraint)
}

/// `a.example.com` is strictly below `example.com`; `badexample.com` is not.
fn is_strictly_below(name: &str, parent: &str) -> bool {
    name.len() > parent.len() + 1
        && name.ends_with(parent)
        && name.as_bytes()[name.len() - parent.len() - 1] == b'.'
}

fn normalize(server_name: &str) -> String {
    server_name
        .strip_suffix('.')
        .unwrap_or(server_name)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(patterns: &[&str]) -> InterceptSet {
        InterceptSet::from_patterns(patterns.iter().copied()).unwrap()
    }

    #[test]
    fn defaults_cover_public_registries_but_not_token_services_or_cdns() {
        let hosts = InterceptSet::with_defaults(&[]).unwrap();
        for yes in [
            "registry-1.docker.io",
            "REGISTRY-1.docker.io.",
            "quay.io",
            "us.gcr.io",
            "europe-west1-docker.pkg.dev",
            "ghcr.io",
        ] {
            assert!(hosts.contains(yes), "{yes}");
        }
        for no in [
            "auth.docker.io",
            "production.cloudflare.docker.com",
            "cdn01.quay.io",
            "pkg-containers.githubusercontent.com",
            "pkg.dev",
            "example.com",
            "evilquay.io",
        ] {
            assert!(!hosts.contains(no), "{no}");
        }
        assert!(!hosts.intercepts_all());
    }

    #[test]
    fn configured_hosts_add_to_the_defaults() {
        let hosts = InterceptSet::with_defaults(&[
            "Harbor.Example.com".to_owned(),
            "*.azurecr.io".to_owned(),
        ])
        .unwrap();
        assert!(hosts.contains("harbor.example.com"));
        assert!(hosts.contains("myteam.azurecr.io"));
        assert!(hosts.contains("quay.io"));
        assert!(!hosts.contains("azurecr.io"));
    }

    #[test]
    fn star_intercepts_everything() {
        let hosts = set(&["*"]);
        assert!(hosts.intercepts_all());
        assert!(hosts.contains("anything.example"));
        assert_eq!(hosts.name_constraints(), None);
    }

    #[test]
    fn suffixes_never_sweep_in_token_services_but_exact_names_do() {
        assert!(!set(&["*.docker.io"]).contains("auth.docker.io"));
        assert!(!set(&["*.docker.io"]).contains("x.auth.docker.io"));
        assert!(set(&["*.docker.io"]).contains("registry-1.docker.io"));
        assert!(set(&["auth.docker.io"]).contains("auth.docker.io"));
    }

    #[test]
    fn bad_patterns_are_named() {
        for bad in [
            "registry:5000",
            "10.0.0.1",
            "*",
            "reg*.example.com",
            "*.com",
            "bad name",
            "",
            "x.example.",
        ] {
            let result = InterceptSet::from_patterns([bad]);
            if bad == "*" {
                assert!(result.is_ok());
                continue;
            }
            let err = result.unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn name_constraints_are_minimal_and_exclude_token_services() {
        let c = InterceptSet::with_defaults(&[])
            .unwrap()
            .name_constraints()
            .unwrap();
        assert_eq!(
            c.permitted,
            vec![
                "docker.elastic.co",
                "docker.io",
                "gcr.io",
                "ghcr.io",
                "mcr.microsoft.com",
                "nvcr.io",
                "pkg.dev",
                "public.ecr.aws",
                "quay.io",
                "registry.gitlab.com",
                "registry.k8s.io",
            ]
        );
        assert_eq!(c.excluded, vec!["auth.docker.io"]);
        assert!(c.permits("registry-1.docker.io"));
        assert!(!c.permits("auth.docker.io"));
        assert!(!c.permits("github.com"));

        let explicit = set(&["docker.io", "auth.docker.io"])
            .name_constraints()
            .unwrap();
        assert!(explicit.excluded.is_empty());
    }

    #[test]
    fn coverage_follows_the_constraints() {
        let narrow = set(&["quay.io"]).name_constraints();
        assert!(set(&["quay.io"]).covered_by(narrow.as_ref()));
        assert!(set(&["*.quay.io"]).covered_by(narrow.as_ref()));
        assert_eq!(
            set(&["quay.io", "ghcr.io", "*.pkg.dev"]).uncovered(narrow.as_ref()),
            vec![
                HostPattern::Exact("ghcr.io".into()),
                HostPattern::Suffix("pkg.dev".into())
            ]
        );
        // The default constraints exclude auth.docker.io; a suffix pattern over docker.io is still
        // covered because it leaves auth.docker.io out too.
        let defaults = InterceptSet::with_defaults(&[]).unwrap();
        let c = defaults.name_constraints();
        assert!(defaults.covered_by(c.as_ref()));
        assert!(set(&["*.docker.io"]).covered_by(c.as_ref()));
        assert!(!set(&["auth.docker.io"]).covered_by(c.as_ref()));
        // "*" needs an unconstrained CA; an unconstrained CA covers anything.
        assert!(!set(&["*"]).covered_by(c.as_ref()));
        assert!(set(&["*"]).covered_by(None));
        assert!(defaults.covered_by(None));
    }

    #[test]
    fn dns_constraint_matching_follows_rfc_5280() {
        assert!(dns_subtree_contains("example.com", "example.com"));
        assert!(dns_subtree_contains("example.com", "a.b.EXAMPLE.com"));
        assert!(!dns_subtree_contains("example.com", "badexample.com"));
        assert!(!dns_subtree_contains(".example.com", "example.com"));
        assert!(dns_subtree_contains(".example.com", "a.example.com"));
        assert!(dns_subtree_contains("", "anything"));
    }
}
