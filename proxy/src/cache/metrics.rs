//! The cache's metrics, read from its live statistics at each scrape.

use std::sync::Arc;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};

use super::Cache;
use crate::telemetry::{encode_counter, encode_gauge};

/// Reports [`super::CacheStats`] on each scrape.
#[derive(Debug)]
struct CacheCollector(Arc<Cache>);

impl Collector for CacheCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.blobs().stats();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        encode_gauge(
            &mut e,
            "cache_bytes",
            "Bytes of cached blobs and manifests",
            gauge(s.bytes),
        )?;
        encode_gauge(
            &mut e,
            "cache_entries",
            "Cached blobs and manifests",
            gauge(s.entries),
        )?;
        encode_gauge(
            &mut e,
            "cache_in_flight_bytes",
            "Bytes reserved for downloads being written, counted against the size limit",
            gauge(s.in_flight_bytes),
        )?;
        encode_counter(
            &mut e,
            "cache_evictions",
            "Entries evicted to stay under the size limit",
            s.evictions,
        )?;
        encode_counter(
            &mut e,
            "cache_hits",
            "Blob requests served from the cache",
            s.hits,
        )?;
        encode_counter(
            &mut e,
            "cache_joins",
            "Blob requests that joined a download in progress",
            s.joins,
        )?;
        encode_counter(
            &mut e,
            "cache_write_errors",
            "Downloads served but not cached because the disk failed",
            s.write_errors,
        )?;
        encode_counter(
            &mut e,
            "cache_no_room",
            "Downloads served but not cached because they did not fit in the size limit",
            s.no_room,
        )?;
        encode_counter(
            &mut e,
            "cache_corrupt",
            "Cached files that failed re-verification and were dropped",
            s.corrupt,
        )
    }
}

/// Registers the cache's metrics (names get the registry's `pullproxy_` prefix).
pub fn register(reg: &mut Registry, cache: Arc<Cache>) {
    reg.register_collector(Box::new(CacheCollector(cache)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_cache_metrics() {
        let mut reg = Registry::with_prefix("pullproxy");
        register(&mut reg, Arc::new(Cache::in_memory(1 << 20)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            "pullproxy_cache_bytes 0",
            "pullproxy_cache_entries 0",
            "pullproxy_cache_in_flight_bytes 0",
            "pullproxy_cache_no_room_total 0",
            "pullproxy_cache_evictions_total 0",
            "pullproxy_cache_hits_total 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
