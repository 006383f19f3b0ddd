//! `pullproxy run`: builds every part from the configuration, in the order that keeps a failed
//! start harmless, and runs until a signal. The kernel programs are installed after everything
//! that can fail on configuration or state (TLS, cache) and before the listeners are bound: the
//! bind guard must know pullproxy's own cgroup before pullproxy binds, so that nobody else can
//! take the port. Without a listener the programs let every connection go direct.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    metrics::{gauge::Gauge, info::Info},
    registry::Registry,
};
use tracing::{error, info, warn};

use crate::{
    accept::conn::{self, ConnMetrics, Gate, ListenerKind},
    accept::listen::{self, BindError},
    accept::original_dst::{MemoryOriginalDst, OriginalDstSource},
    accept::port_holder,
    accept::server::{OnDistrust, Server, ServerMetrics},
    admin::{self, Readiness},
    cache::{Cache, CacheError},
    config::WriteBackPolicy as Policy,
    node_ca::{self, LeafMinter, NodeCa, ca::CaError, hosts::HostPatternError},
    origins::client::{self, AddressPolicy, Connector, UpstreamClients},
    origins::hub::{HubClient, HubOutcome},
    origins::tls::{UpstreamTlsError, upstream_client_config},
    origins::upstream::Upstream,
    origins::writeback::{Jobs, WriteBack},
    redirect::{LoaderError, Redirector},
    registry::RegistryProxy,
    settings::Config,
    warm::Warmer,
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("setting up TLS")]
    TlsHosts(#[from] HostPatternError),
    #[error("setting up TLS")]
    TlsCa(#[from] CaError),
    #[error("setting up TLS")]
    TlsUpstream(#[from] UpstreamTlsError),
    #[error("opening the cache in {dir}")]
    Cache {
        dir: std::path::PathBuf,
        #[source]
        source: CacheError,
    },
    #[error("binding {addr}{hint}")]
    Bind {
        addr: std::net::SocketAddr,
        /// Who holds the port, or that the bind guard refused it (empty when neither).
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "port {port} is already in use, and the kernel would send the container runtimes' \
         connections there: {holders}. Stop it, then start pullproxy again"
    )]
    PortTaken { port: u16, holders: String },
    #[error("installing the kernel redirect")]
    Redirect(#[from] LoaderError),
    #[error("waiting for signals")]
    Signal(#[source] std::io::Error),
    #[error("all proxy listeners stopped")]
    ListenersStopped,
}

/// Runs the proxy until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), RunError> {
    let fd_limit = match conn::raise_fd_limit() {
        Ok(l) => {
            info!(
                inherited = l.inherited,
                soft = l.soft,
                hard = l.hard,
                "open file limit"
            );
            Some(l)
        }
        Err(e) => {
            warn!(error = %e, "cannot read or raise the open file limit");
            None
        }
    };
    if config.redirect.enabled {
        crate::redirect::preflight::check()?;
    }
    let mut registry = Registry::with_prefix("pullproxy");
    registry.register(
        "build",
        "pullproxy build information",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    let readiness = Arc::new(Readiness {
        hub_optional: config.hub.as_ref().is_none_or(|h| h.optional),
        ..Readiness::default()
    });

    let tls_settings = &config.tls;
    let intercept = tls_settings.intercept_set()?;
    let (ca, notices) = NodeCa::load_or_generate(tls_settings, &intercept)?;
    for notice in notices {
        warn!("{notice}");
    }
    let ca = Arc::new(ca);
    let minter = Arc::new(LeafMinter::new(ca.clone(), Arc::new(intercept)));
    let (client_tls, roots) = upstream_client_config(&tls_settings.extra_upstream_cas, Some(&ca))?;
    info!(
        system = roots.system,
        extra = roots.extra,
        node_ca_skipped = roots.node_ca_skipped,
        "upstream trust roots"
    );
    let hub_http = client::build(Connector::new(
        client_tls.clone(),
        AddressPolicy::Any,
        config.upstream.connect_timeout,
    ));
    let upstream_clients = UpstreamClients::new(Connector::new(
        client_tls,
        AddressPolicy::Remote {
            admin_port: config.admin.listen.port(),
        },
        config.upstream.connect_timeout,
    ));
    let hub = config
        .hub
        .clone()
        .map(|s| Arc::new(HubClient::new(hub_http, s)));
    let cache_settings = &config.cache;
    let cache = Arc::new(
        Cache::open(cache_settings)
            .await
            .map_err(|source| RunError::Cache {
                dir: cache_settings.dir.clone(),
                source,
            })?,
    );
    crate::cache::metrics::register(&mut registry, cache.clone());
    crate::node_ca::mint::register(&mut registry, minter.clone());
    let mut proxy = RegistryProxy::new(
        hub.clone(),
        Arc::new(Upstream::new(
            upstream_clients,
            config.upstream.manifest_timeout,
            config.upstream.blob_idle_timeout,
        )),
        cache.clone(),
        config.upstream.blob_idle_timeout,
    );
    if let (Some(hub), Some(settings)) = (&hub, &config.hub)
        && settings.write_back != Policy::Off
    {
        let dir = cache_settings.dir.clone();
        let jobs = tokio::task::spawn_blocking(move || Jobs::open(&dir))
            .await
            .map_err(|e| RunError::Cache {
                dir: cache_settings.dir.clone(),
                source: crate::cache::CacheError::Task(e.to_string()),
            })?
            .map_err(|source| RunError::Cache {
                dir: cache_settings.dir.clone(),
                source,
            })?;
        let write_back = WriteBack::start(
            hub.clone(),
            cache,
            settings.write_back,
            jobs,
            settings.write_back_rate,
        );
        write_back.register(&mut registry);
        proxy = proxy.with_write_back(write_back);
    }
    let proxy = Arc::new(proxy);
    proxy.metrics.register(&mut registry);
    let tls_config = node_ca::server_config(minter.clone());
    let kernel_tls = Arc::new(crate::accept::ktls::KernelTls::new(
        config.listen.kernel_tls,
        minter.clone(),
        &tls_config,
    ));
    kernel_tls.register(&mut registry);
    let server_metrics = Arc::new(ServerMetrics::default());
    server_metrics.register(&mut registry);
    let conn_metrics = Arc::new(ConnMetrics::default());
    conn_metrics.register(&mut registry);
    let admin_limits = config.admin.limits;
    let mut proxy_limits = config.listen.limits;
    if let Some(fd) = fd_limit {
        let fitted = proxy_limits.within(fd.connections().saturating_sub(admin_limits.total));
        if fitted != proxy_limits {
            warn!(
                configured = proxy_limits.total,
                max_connections = fitted.total,
                fd_limit = fd.soft,
                "listen.max_connections lowered to what the open file limit allows"
            );
            proxy_limits = fitted;
        }
    }
    let admin_gate = Arc::new(Gate::new(
        ListenerKind::Admin,
        config.listen.deadlines,
        admin_limits,
        conn_metrics.clone(),
    ));

    let (records, on_distrust): (Arc<dyn OriginalDstSource>, OnDistrust) = if config
        .redirect
        .enabled
    {
        check_ports_free(&config)?;
        let (redirector, records) = Redirector::install(config.redirect.clone())?;
        let redirector = Arc::new(Mutex::new(redirector));
        crate::redirect::metrics::register(&mut registry, redirector.clone());
        tokio::spawn(Redirector::watch_targets(redirector.clone()));
        let on_distrust: OnDistrust = Box::new(move |pid| {
            if let Err(e) = redirector.lock().expect("redirector lock").distrust(pid) {
                warn!(pid, error = %crate::telemetry::error_chain(&e), "cannot stop redirecting a client that distrusts the node CA");
            }
        });
        (Arc::new(records), on_distrust)
    } else {
        warn!("redirect.enabled is false: no connection is redirected to the proxy");
        (Arc::new(MemoryOriginalDst::default()), Box::new(|_| {}))
    };
    let guarded = config.redirect.enabled;
    let admin_listener = admin::bind(config.admin.listen)
        .await
        .map_err(|e| bind_failed(e, guarded))?;
    let listeners = listen::bind(&config.listen.addresses, config.listen.port)
        .map_err(|e| bind_failed(e, guarded))?;
    readiness.listening.store(true, Ordering::Relaxed);
    info!(port = config.listen.port, admin = %config.admin.listen, "listening");
    readiness.attached.store(true, Ordering::Relaxed);
    if !config.warm.images.is_empty() || config.source.is_some() {
        match Warmer::new(&(&config).into(), None) {
            Ok(warmer) => {
                tokio::spawn(crate::warm::run_daemon(
                    Arc::new(warmer),
                    config.warm.images.clone(),
                    config.source.clone(),
                ));
            }
            Err(e) => warn!(error = %crate::telemetry::error_chain(&e), "warm-up unavailable"),
        }
    }

    let hub_up = Gauge::<i64, AtomicI64>::default();
    registry.register(
        "hub_up",
        "1 when the last hub check succeeded (reachable, credentials accepted), else 0",
        hub_up.clone(),
    );
    match hub {
        Some(hub) => {
            tokio::spawn(watch_hub(
                hub,
                readiness.clone(),
                hub_up,
                config.admin.hub_check_interval,
            ));
        }
        None => readiness.hub_up.store(true, Ordering::Relaxed),
    }
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(registry),
        readiness.clone(),
        admin_gate,
    ));

    let server = Arc::new(Server {
        metrics: server_metrics,
        gate: Gate::new(
            ListenerKind::Proxy,
            config.listen.deadlines,
            proxy_limits,
            conn_metrics,
        ),
        on_distrust,
        records,
        acceptor: tokio_rustls::TlsAcceptor::from(tls_config),
        kernel_tls,
        minter,
        insecure: config.registries.insecure.clone(),
        proxy,
    });
    info!("ready");
    tokio::select! {
        () = server.serve(listeners) => {
            error!("all listeners stopped");
            Err(RunError::ListenersStopped)
        }
        signal = shutdown_signal() => {
            signal.map_err(RunError::Signal)?;
            info!("shutting down; the kernel programs stay pinned and fail open while pullproxy is down");
            Ok(())
        }
    }
}

/// Refuses to start when something already listens where pullproxy is about to (a process that
/// bound a guarded port before any guard existed): once the programs are attached, the runtimes'
/// connections would go to it. Names the holder so the operator knows what to stop.
fn check_ports_free(config: &Config) -> Result<(), RunError> {
    let proc_root = std::path::Path::new("/proc");
    for (port, ours) in [
        (config.listen.port, config.listen.addresses.clone()),
        (config.admin.listen.port(), vec![config.admin.listen.ip()]),
    ] {
        let taken: Vec<String> = port_holder::holders(proc_root, port)
            .into_iter()
            .filter(|h| h.listening && port_holder::intercepts(h.addr.ip(), &ours))
            .map(|h| h.to_string())
            .collect();
        if !taken.is_empty() {
            return Err(RunError::PortTaken {
                port,
                holders: taken.join("; "),
            });
        }
    }
    Ok(())
}

/// A bind error with who holds the port, or with the bind guard named when it refused.
fn bind_failed(e: BindError, guarded: bool) -> RunError {
    let hint = match e.source.kind() {
        std::io::ErrorKind::AddrInUse => {
            let holders: Vec<String> =
                port_holder::holders(std::path::Path::new("/proc"), e.addr.port())
                    .into_iter()
                    .map(|h| h.to_string())
                    .collect();
            if holders.is_empty() {
                String::new()
            } else {
                format!(
                    " ({}; stop it, then start pullproxy again)",
                    holders.join("; ")
                )
            }
        }
        std::io::ErrorKind::PermissionDenied if guarded => " (refused by the bind guard: this \
            process's cgroup is not the one marked as pullproxy's; `pullproxy doctor` shows the \
            marks)"
            .to_owned(),
        _ => String::new(),
    };
    RunError::Bind {
        addr: e.addr,
        hint,
        source: e.source,
    }
}

/// Keeps `readiness.hub_up` current, logging when the hub's state changes.
async fn watch_hub(
    hub: Arc<HubClient>,
    readiness: Arc<Readiness>,
    gauge: Gauge<i64, AtomicI64>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    let mut last: Option<&'static str> = None;
    loop {
        tick.tick().await;
        let outcome = hub.ping().await;
        let up = matches!(outcome, HubOutcome::Found(_));
        readiness.hub_up.store(up, Ordering::Relaxed);
        gauge.set(i64::from(up));
        if last != Some(outcome.label()) {
            match &outcome {
                HubOutcome::Found(_) => info!(hub = %hub.url(), "hub reachable"),
                HubOutcome::Refused(s) => {
                    warn!(hub = %hub.url(), status = s.as_u16(), "the hub refuses pullproxy's credentials")
                }
                HubOutcome::NotFound => warn!(hub = %hub.url(), "the hub has no /v2/ API"),
                HubOutcome::NoCredentials(reason) => {
                    warn!(hub = %hub.url(), %reason, "cannot read the hub credentials")
                }
                HubOutcome::Unreachable(reason) => {
                    warn!(hub = %hub.url(), %reason, "hub unreachable")
                }
            }
            last = Some(outcome.label());
        }
    }
}

async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
