//! The registry proxy's metrics: requests by registry, kind, source and status; bytes served by
//! source; durations; hub lookups; upstream fetch outcomes and errors; digest mismatches; refused
//! (malformed) requests. Outcomes are labels, not separate metrics.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::served::{Kind, Source};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    registry: String,
    kind: &'static str,
    source: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindSourceLabels {
    kind: &'static str,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryOutcomeLabels {
    registry: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabels {
    registry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryReasonLabels {
    registry: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Seconds: from a local manifest hit (sub-millisecond) to a large cold blob (minutes).
const DURATION_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// The registry proxy's instruments.
#[derive(Debug)]
pub(crate) struct RegistryMetrics {
    requests: Family<RequestLabels, Counter>,
    bytes: Family<SourceLabels, Counter>,
    duration: Family<KindSourceLabels, Histogram>,
    hub_lookups: Family<OutcomeLabels, Counter>,
    upstream_fetches: Family<RegistryOutcomeLabels, Counter>,
    upstream_errors: Family<RegistryReasonLabels, Counter>,
    digest_mismatches: Counter,
    invalid_requests: Family<ReasonLabels, Counter>,
    saved: Counter,
    ratelimit: Family<RegistryLabels, Gauge>,
}

impl Default for RegistryMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            hub_lookups: Family::default(),
            upstream_fetches: Family::default(),
            upstream_errors: Family::default(),
            digest_mismatches: Counter::default(),
            invalid_requests: Family::default(),
            saved: Counter::default(),
            ratelimit: Family::default(),
        }
    }
}

impl RegistryMetrics {
    /// Registers every instrument (names get the registry's `pullproxy_` prefix).
    pub(crate) fn register(&self, reg: &mut Registry) {
        reg.register(
            "requests",
            "Registry requests answered, by registry, kind, source and HTTP status",
            self.requests.clone(),
        );
        reg.register(
            "served_bytes",
            "Response body bytes sent to clients, by source",
            self.bytes.clone(),
        );
        reg.register_with_unit(
            "request_duration",
            "Time from request to the last byte of the response, by kind and source",
            Unit::Seconds,
            self.duration.clone(),
        );
        reg.register(
            "hub_lookups",
            "Hub lookups by outcome: found, not_found, unreachable, refused (our credentials), \
             no_credentials (unreadable credentials file), invalid_name (the mapping gives no \
             valid repository name; the hub is not asked)",
            self.hub_lookups.clone(),
        );
        reg.register(
            "upstream_fetches",
            "Blob downloads from an upstream registry, by how they ended",
            self.upstream_fetches.clone(),
        );
        reg.register(
            "upstream_errors",
            "Upstream registries that could not be asked, by reason",
            self.upstream_errors.clone(),
        );
        reg.register(
            "digest_mismatches",
            "Manifests and blobs from an upstream whose bytes did not match their digest",
            self.digest_mismatches.clone(),
        );
        reg.register(
            "invalid_requests",
            "Requests refused before routing (bad names, digests, paths), by reason",
            self.invalid_requests.clone(),
        );
        reg.register_with_unit(
            "upstream_saved",
            "Response body bytes served from the hub, this node or the cache instead of an \
             upstream registry",
            Unit::Bytes,
            self.saved.clone(),
        );
        reg.register(
            "upstream_ratelimit_remaining",
            "Requests an upstream registry says are left in its rate-limit window (its \
             RateLimit-Remaining header, as Docker Hub sends it), by registry",
            self.ratelimit.clone(),
        );
    }

    /// Records an upstream's `RateLimit-Remaining` (`76;w=21600`), if it sent one.
    pub(crate) fn ratelimit(&self, registry: &str, headers: &http::HeaderMap) {
        let remaining = headers
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .and_then(|n| n.trim().parse::<i64>().ok());
        if let Some(n) = remaining {
            self.ratelimit
                .get_or_create(&RegistryLabels {
                    registry: registry.to_owned(),
                })
                .set(n);
        }
    }

    /// A request is done: `bytes` of body were sent in `seconds`.
    pub(crate) fn request(
        &self,
        registry: &str,
        kind: Kind,
        source: Source,
        status: u16,
        bytes: u64,
        seconds: f64,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                registry: registry.to_owned(),
                kind: kind.label(),
                source: source.label(),
                status,
            })
            .inc();
        self.bytes
            .get_or_create(&SourceLabels {
                source: source.label(),
            })
            .inc_by(bytes);
        if matches!(
            source,
            Source::Hub | Source::Node | Source::Cache | Source::Stale
        ) {
            self.saved.inc_by(bytes);
        }
        self.duration
            .get_or_create(&KindSourceLabels {
                kind: kind.label(),
                source: source.label(),
            })
            .observe(seconds);
    }

    pub(crate) fn hub_lookup(&self, outcome: &'static str) {
        self.hub_lookups
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn upstream_fetch(&self, registry: &str, outcome: &'static str) {
        self.upstream_fetches
            .get_or_create(&RegistryOutcomeLabels {
                registry: registry.to_owned(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn upstream_error(&self, registry: &str, reason: &'static str) {
        self.upstream_errors
            .get_or_create(&RegistryReasonLabels {
                registry: registry.to_owned(),
                reason,
            })
            .inc();
    }

    pub(crate) fn digest_mismatch(&self) {
        self.digest_mismatches.inc();
    }

    pub(crate) fn invalid_request(&self, reason: &'static str) {
        self.invalid_requests
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names_and_labels() {
        let m = RegistryMetrics::default();
        let mut reg = Registry::with_prefix("pullproxy");
        m.register(&mut reg);
        m.request("quay.io", Kind::Blob, Source::Cache, 200, 1024, 0.003);
        m.hub_lookup("refused");
        m.upstream_fetch("quay.io", "cached");
        m.upstream_error("quay.io", "unreachable");
        m.digest_mismatch();
        m.invalid_request("digest");
        let mut h = http::HeaderMap::new();
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        m.ratelimit("registry-1.docker.io", &h);
        m.request("quay.io", Kind::Blob, Source::Upstream, 200, 5000, 0.003);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            r#"pullproxy_requests_total{registry="quay.io",kind="blob",source="cache",status="200"} 1"#,
            r#"pullproxy_served_bytes_total{source="cache"} 1024"#,
            r#"pullproxy_request_duration_seconds_count{kind="blob",source="cache"} 1"#,
            r#"pullproxy_hub_lookups_total{outcome="refused"} 1"#,
            r#"pullproxy_upstream_fetches_total{registry="quay.io",outcome="cached"} 1"#,
            r#"pullproxy_upstream_errors_total{registry="quay.io",reason="unreachable"} 1"#,
            "pullproxy_digest_mismatches_total 1",
            "pullproxy_upstream_saved_bytes_total 1024",
            r#"pullproxy_upstream_ratelimit_remaining{registry="registry-1.docker.io"} 76"#,
            r#"pullproxy_invalid_requests_total{reason="digest"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
