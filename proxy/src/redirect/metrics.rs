//! The kernel redirect's metrics: the programs' per-CPU counters, summed at each scrape, as one
//! family with the outcome as a label.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
    registry::Registry,
};

use super::Redirector;
use crate::telemetry::encode_gauge;

struct KernelCollector(Arc<Mutex<Redirector>>);

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (counters, targets) = {
            let r = self.0.lock().expect("redirector lock");
            (r.counters(), r.target_cgroups().len())
        };
        let mut family = e.encode_descriptor(
            "redirect_connections",
            "connect() calls to a redirected port seen by the kernel programs, by outcome \
             (redirected, or why not)",
            None,
            MetricType::Counter,
        )?;
        for (counter, value) in counters {
            let labels = [("outcome", counter.name())];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        encode_gauge(
            &mut e,
            "redirect_target_cgroups",
            "Cgroups whose connections are redirected (the container runtimes found)",
            i64::try_from(targets).unwrap_or(i64::MAX),
        )
    }
}

/// Registers the kernel counters (names get the registry's `pullproxy_` prefix).
pub fn register(reg: &mut Registry, redirector: Arc<Mutex<Redirector>>) {
    reg.register_collector(Box::new(KernelCollector(redirector)));
}
