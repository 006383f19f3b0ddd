//! The kernel redirect's metrics: the programs' per-CPU counters, summed at each scrape: connect
//! outcomes as one family with the outcome as a label, and the bind guard's refusals on their own
//! (a refused bind is not a connection, so it would break the family's sum).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
    registry::Registry,
};

use proxy_common::Counter;

use super::Redirector;
use crate::telemetry::{encode_counter, encode_gauge};

struct KernelCollector(Arc<Mutex<Redirector>>);

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (counters, targets, unmarked) = {
            let r = self.0.lock().expect("redirector lock");
            (r.counters(), r.target_cgroups().len(), r.unmarked_targets())
        };
        let mut family = e.encode_descriptor(
            "redirect_connections",
            "connect() calls to a redirected port seen by the kernel programs, by outcome \
             (redirected, or why not)",
            None,
            MetricType::Counter,
        )?;
        for (counter, value) in counters.iter().filter(|(c, _)| c.is_connection()) {
            let labels = [("outcome", counter.name())];
            ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
        }
        let refused = counters
            .iter()
            .find(|(c, _)| *c == Counter::BindRefused)
            .map_or(0, |(_, v)| *v);
        encode_counter(
            &mut e,
            "guard_refused_binds",
            "bind() calls to a guarded port (the proxy's, the admin listener's) refused by the \
             kernel because the caller is not pullproxy",
            refused,
        )?;
        encode_gauge(
            &mut e,
            "redirect_target_cgroups",
            "Cgroups whose connections are redirected (the container runtimes found)",
            i64::try_from(targets).unwrap_or(i64::MAX),
        )?;
        encode_gauge(
            &mut e,
            "redirect_target_cgroups_unmarked",
            "Target cgroups found but not redirected because the kernel's cgroup map is full",
            i64::try_from(unmarked).unwrap_or(i64::MAX),
        )
    }
}

/// Registers the kernel counters (names get the registry's `pullproxy_` prefix).
pub(crate) fn register(reg: &mut Registry, redirector: Arc<Mutex<Redirector>>) {
    reg.register_collector(Box::new(KernelCollector(redirector)));
}
