//! What a registry request was and where its answer came from: the vocabulary shared by the
//! request log (`respond`) and the metrics' labels (`metrics`).

/// Where a response's content came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The cluster's hub.
    Hub,
    /// This node's copy of what the hub served (the node tier).
    Node,
    /// The local cache, after the upstream confirmed (or recently confirmed) access.
    Cache,
    /// The local cache because the upstream could not be asked (stale-if-error).
    Stale,
    /// The upstream registry.
    Upstream,
    /// Forwarded untouched (writes, unknown paths).
    Passthrough,
    /// Answered by pullproxy itself (errors, `/v2/` while the upstream is down).
    Local,
}

impl Source {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Source::Hub => "hub",
            Source::Node => "node",
            Source::Cache => "cache",
            Source::Stale => "stale",
            Source::Upstream => "upstream",
            Source::Passthrough => "passthrough",
            Source::Local => "local",
        }
    }
}

/// What kind of registry request it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Manifest,
    Blob,
    Other,
}

impl Kind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
            Kind::Other => "other",
        }
    }
}
