//! Keeping the cgroup map current: targets re-resolved as runtimes restart, pullproxy bypassed.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Mutex},
};

use proxy_common::{CgroupRole, maps};
use tracing::{debug, warn};

use super::{
    LoaderError, Redirector, Targets,
    cgroup::{self, CgroupError},
    marks::{self, Marks},
};
use crate::{runtimes::RuntimeProc, telemetry::error_chain};

impl Redirector {
    /// Re-resolves target and bypass cgroups and writes the changes to the kernel map. A full
    /// map leaves targets out (logged, and counted in `pullproxy_redirect_target_cgroups_unmarked`)
    /// but never stops the rescan; failing to mark pullproxy's own cgroup is an error.
    pub(super) fn refresh_targets(&mut self) -> Result<(), LoaderError> {
        let mut desired = Marks::new();
        let paths: BTreeSet<String> = match &self.settings.targets {
            Targets::Auto => {
                let found = self.cgroup2.detect_runtimes(Path::new("/proc"));
                self.log_skipped(&found.skipped);
                found.cgroups
            }
            Targets::Paths(p) => p.iter().cloned().collect(),
        };
        for path in paths {
            match self.cgroup2.id(&path) {
                Ok(id) => {
                    desired.insert(id, (CgroupRole::Target, path));
                }
                Err(CgroupError::Missing { .. }) => {
                    debug!(cgroup = %path, "target cgroup does not exist (yet)")
                }
                Err(e) => {
                    warn!(cgroup = %path, error = error_chain(&e), "cannot resolve target cgroup")
                }
            }
        }
        let own = cgroup::own_cgroup(&self.cgroup2, self.own.as_deref())?;
        self.own = Some(own.clone());
        let own_id = self.cgroup2.id(&own)?;
        if desired.contains_key(&own_id) {
            return Err(LoaderError::ProxyInTarget { cgroup: own });
        }
        desired.insert(own_id, (CgroupRole::Bypass, own.clone()));

        if desired == self.applied {
            return Ok(());
        }
        let outcome = marks::sync(&mut self.cgroups, &self.applied, &desired);
        if let Some(source) = outcome.bypass_failed {
            return Err(LoaderError::OwnCgroup {
                cgroup: own,
                source,
            });
        }
        if outcome.full != self.unmarked {
            if !outcome.full.is_empty() {
                let paths: Vec<&str> = outcome
                    .full
                    .iter()
                    .filter_map(|id| desired.get(id).map(|(_, p)| p.as_str()))
                    .collect();
                warn!(
                    count = paths.len(),
                    cgroups = ?paths,
                    capacity = proxy_common::MAX_CGROUPS,
                    "the cgroup map is full: these target cgroups are not redirected"
                );
            }
            self.unmarked = outcome.full;
        }
        if outcome.changed {
            let next = self.generation.get(&0, 0).unwrap_or(0).wrapping_add(1);
            self.generation
                .set(0, &next, 0)
                .map_err(|source| LoaderError::Map {
                    map: maps::GENERATION,
                    source,
                })?;
        }
        if !desired.values().any(|(r, _)| *r == CgroupRole::Target) {
            warn!("no target cgroup found: nothing is redirected until a container runtime starts");
        }
        self.applied = outcome.applied;
        Ok(())
    }

    /// Logs processes named like a runtime that do not count, once per process.
    fn log_skipped(&mut self, skipped: &[RuntimeProc]) {
        let now: BTreeSet<u32> = skipped.iter().map(|p| p.pid).collect();
        for p in skipped.iter().filter(|p| !self.skipped.contains(&p.pid)) {
            warn!(pid = p.pid, comm = %p.comm, verdict = %p.vetting, "process named like a container runtime is not redirected");
        }
        self.skipped = now;
    }

    /// Re-resolves targets every `rescan_interval`, so a runtime restarted into a new cgroup is
    /// redirected again without restarting pullproxy.
    pub(crate) async fn watch_targets(this: Arc<Mutex<Self>>) {
        let interval = this
            .lock()
            .expect("redirector lock")
            .settings
            .rescan_interval;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut guard = this.lock().expect("redirector lock");
            if let Err(e) = guard.refresh_targets() {
                warn!(error = error_chain(&e), "refreshing target cgroups failed");
            }
        }
    }
}
