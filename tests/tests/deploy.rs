//! The deployment: the Helm chart in deploy/helm/pullproxy rendered by real helm (installed by
//! `cargo xtask setup --test` like the other test tools), parsed into typed Kubernetes objects,
//! and checked against what pullproxy needs on a node: host network, the host's cgroupfs and
//! bpffs, the state directory, the measured capabilities and nothing more, probes on the admin
//! port, a configuration pullproxy's own loader accepts, Secrets mounted as directories with
//! modes pullproxy accepts. The checked-in plain manifests must be exactly what the chart renders.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        batch::v1::Job,
        core::v1::{ConfigMap, Container, PodSpec, Secret, Service, Volume},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use pullproxy::{origins::hub::PasswordSource, settings::Config};
use serde_json::Value;

/// The capabilities measured to be enough (tests/tests/capabilities.rs measures whatever the chart
/// grants; this pins what it grants).
const MEASURED_CAPS: [&str; 3] = ["BPF", "PERFMON", "NET_ADMIN"];

/// Metric names the dashboard may use: the metrics contract of pullproxy's admin listener.
const METRICS: &[&str] = &[
    "pullproxy_requests_total",
    "pullproxy_served_bytes_total",
    "pullproxy_request_duration_seconds",
    "pullproxy_hub_lookups_total",
    "pullproxy_hub_up",
    "pullproxy_upstream_fetches_total",
    "pullproxy_upstream_errors_total",
    "pullproxy_cache_bytes",
    "pullproxy_cache_entries",
    "pullproxy_cache_evictions_total",
    "pullproxy_cache_hits_total",
    "pullproxy_digest_mismatches_total",
    "pullproxy_redirect_connections_total",
    "pullproxy_connections_total",
    "pullproxy_connections_closed_total",
    "pullproxy_connections_open",
    "pullproxy_accept_errors_total",
    "pullproxy_tls_certificates_minted_total",
    "pullproxy_tls_mint_failures_total",
    "pullproxy_invalid_requests_total",
    "pullproxy_build_info",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// helm: `$PULLPROXY_HELM`, where `cargo xtask setup --test` puts it, or on PATH. Without one the
/// tests are skipped loudly, except in CI, where they fail.
fn helm() -> Option<PathBuf> {
    let candidates = std::env::var_os("PULLPROXY_HELM")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/pullproxy/helm-v4.1.4/helm")),
        )
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("helm"))
                .collect::<Vec<_>>()
        }));
    let found = candidates.into_iter().find(|p| p.is_file());
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("helm not found and CI=true: run `cargo xtask setup --test` (it installs helm)");
        }
        eprintln!(
            "\n*** SKIPPED: helm not found. `cargo xtask setup --test` installs it, or set PULLPROXY_HELM. ***\n"
        );
    }
    found
}

/// Returns from the test when helm is missing (outside CI).
macro_rules! require_helm {
    () => {
        match helm() {
            Some(h) => h,
            None => return,
        }
    };
}

/// `helm template pullproxy deploy/helm/pullproxy --namespace kube-system <args>`.
fn template(helm: &Path, args: &[&str]) -> String {
    let out = Command::new(helm)
        .args([
            "template",
            "pullproxy",
            "deploy/helm/pullproxy",
            "--namespace",
            "kube-system",
        ])
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm template {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The objects of a multi-document YAML stream.
struct Objects(Vec<Value>);

impl Objects {
    fn parse(yaml: &str) -> Self {
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("helm output is YAML");
        Self(docs.into_iter().filter(|d| !d.is_null()).collect())
    }

    fn render(helm: &Path, args: &[&str]) -> Self {
        Self::parse(&template(helm, args))
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        let v = self
            .find(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", self.names()));
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
    }

    fn names(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
            .collect()
    }

    fn daemonset(&self) -> DaemonSet {
        self.get("DaemonSet", "pullproxy")
    }

    /// The rendered pullproxy.yaml, parsed and validated by pullproxy's own loader with the
    /// daemon container's environment (which is not all overrides: `PULLPROXY_CONFIG`, ...).
    fn config(&self) -> (String, Config) {
        let cm: ConfigMap = self.get("ConfigMap", "pullproxy");
        let text = cm
            .data
            .and_then(|d| d.get("pullproxy.yaml").cloned())
            .expect("pullproxy.yaml in the ConfigMap");
        let ds = self.daemonset();
        let env: Vec<(String, String)> = container(pod_spec(&ds), "pullproxy")
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        assert!(
            env.iter().any(|(k, _)| k == "PULLPROXY_CONFIG"),
            "the daemon finds its file through PULLPROXY_CONFIG: {env:?}"
        );
        let config = Config::from_yaml(&text, "ConfigMap pullproxy", env).unwrap_or_else(|e| {
            panic!(
                "the chart's configuration is refused: {}\n{text}",
                pullproxy::telemetry::error_chain(&e)
            )
        });
        (text, config)
    }
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The mount of the volume `name` in container `c`: (mountPath, readOnly, propagation, subPath).
fn mount(c: &Container, name: &str) -> (String, bool, Option<String>, Option<String>) {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{} does not mount {name}", c.name));
    (
        m.mount_path.clone(),
        m.read_only.unwrap_or(false),
        m.mount_propagation.clone(),
        m.sub_path.clone(),
    )
}

fn host_path(pod: &PodSpec, name: &str) -> (String, Option<String>) {
    let hp = volume(pod, name)
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("{name} is not a hostPath"));
    (hp.path.clone(), hp.type_.clone())
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// The capabilities a container adds, and whether it drops ALL.
fn caps(c: &Container) -> (BTreeSet<String>, bool) {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities set");
    (
        caps.add.iter().flatten().cloned().collect(),
        caps.drop.iter().flatten().any(|d| d == "ALL"),
    )
}

fn assert_unprivileged_root(c: &Container) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(
        sc.privileged,
        Some(true),
        "{} must not be privileged",
        c.name
    );
    assert_eq!(sc.run_as_user, Some(0), "{}: pins are root's", c.name);
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
}

#[test]
fn checked_in_manifests_are_what_the_chart_renders() {
    let helm = require_helm!();
    // The same renders as `cargo xtask manifests`.
    let header = "# Rendered from deploy/helm/pullproxy with its default values by `cargo xtask \
                  manifests`; do not edit.\n";
    for (file, args) in [
        ("pullproxy.yaml", vec!["--no-hooks"]),
        (
            "uninstall.yaml",
            vec![
                "--set",
                "uninstall.standalone=true",
                "--show-only",
                "templates/uninstall-standalone.yaml",
            ],
        ),
    ] {
        let path = workspace().join("deploy/manifests").join(file);
        let checked_in = std::fs::read_to_string(&path).expect("checked-in manifest");
        let rendered = format!("{header}{}", template(&helm, &args));
        assert!(
            checked_in == rendered,
            "{} differs from the chart's rendering: run `cargo xtask manifests`",
            path.display()
        );
    }
    // Applying the plain manifests must never run the uninstall.
    let plain = std::fs::read_to_string(workspace().join("deploy/manifests/pullproxy.yaml"))
        .expect("manifest");
    assert!(!plain.contains("helm.sh/hook"), "hooks in pullproxy.yaml");
    assert!(!plain.contains("pullproxy-uninstall"), "{plain}");
}

#[test]
fn daemonset_runs_on_the_host_with_only_the_measured_capabilities() {
    let helm = require_helm!();
    let objects = Objects::render(&helm, &[]);
    let ds = objects.daemonset();
    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.host_pid,
        Some(false),
        "hostPID is off unless the values ask"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_ref().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint: {tolerations:?}"
    );
    // The kubelet would add group read to Secret files, and pullproxy refuses such a CA key.
    assert!(
        pod.security_context
            .as_ref()
            .is_none_or(|s| s.fs_group.is_none())
    );
    assert_eq!(pod.automount_service_account_token, Some(false));

    let main = container(pod, "pullproxy");
    assert_unprivileged_root(main);
    let (added, drops_all) = caps(main);
    assert!(drops_all);
    assert_eq!(
        added,
        MEASURED_CAPS.iter().map(|c| c.to_string()).collect(),
        "exactly the measured set"
    );
    let resources = main.resources.as_ref().expect("resources");
    assert!(
        resources
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );

    // The trust init container writes root-owned files only: no capability at all.
    let trust = container(pod, "trust-node-ca");
    assert_unprivileged_root(trust);
    assert_eq!(caps(trust), (BTreeSet::new(), true));
    assert_eq!(
        trust.args.as_deref(),
        Some(&["ca", "install", "--root", "/host"].map(String::from)[..])
    );
    for (i, path) in ["/usr/local/share/ca-certificates", "/etc/ssl/certs"]
        .iter()
        .enumerate()
    {
        let name = format!("trust-{i}");
        assert_eq!(
            host_path(pod, &name),
            (path.to_string(), Some("Directory".into()))
        );
        assert_eq!(mount(trust, &name).0, format!("/host{path}"));
        // The daemon sees the same store read-only, for `pullproxy doctor`.
        let (at, ro, _, _) = mount(main, &name);
        assert_eq!((at, ro), (format!("/host{path}"), true));
    }
    assert_eq!(env(main, "PULLPROXY_HOST_ROOT"), Some("/host"));
}

#[test]
fn host_mounts_hold_the_cgroups_the_pins_and_the_state() {
    let helm = require_helm!();
    let objects = Objects::render(&helm, &[]);
    let (_, config) = objects.config();
    let ds = objects.daemonset();
    let pod = pod_spec(&ds);
    let main = container(pod, "pullproxy");

    assert_eq!(
        host_path(pod, "cgroup"),
        ("/sys/fs/cgroup".into(), Some("Directory".into()))
    );
    let (path, ro, _, sub) = mount(main, "cgroup");
    assert_eq!((path.as_str(), ro, sub), ("/sys/fs/cgroup", true, None));

    assert_eq!(
        host_path(pod, "bpffs"),
        ("/sys/fs/bpf".into(), Some("Directory".into()))
    );
    let (path, ro, propagation, _) = mount(main, "bpffs");
    assert_eq!(path, "/sys/fs/bpf");
    assert!(!ro, "pins are written");
    assert_eq!(propagation.as_deref(), Some("HostToContainer"));
    assert!(config.redirect.pin_dir.starts_with(&path));

    assert_eq!(
        host_path(pod, "state"),
        (
            "/var/lib/pullproxy".into(),
            Some("DirectoryOrCreate".into())
        )
    );
    let (state, ro, _, _) = mount(main, "state");
    assert!(!ro);
    assert!(config.cache.dir.starts_with(&state), "cache on the host");
    assert!(
        config.tls.state_dir.starts_with(&state),
        "node CA on the host"
    );

    // The configuration is a mounted directory the binary is pointed at.
    let (config_dir, ro, _, sub) = mount(main, "config");
    assert!(ro && sub.is_none());
    assert_eq!(
        env(main, "PULLPROXY_CONFIG"),
        Some(format!("{config_dir}/pullproxy.yaml").as_str())
    );
    assert_eq!(
        volume(pod, "config")
            .config_map
            .as_ref()
            .map(|c| c.name.as_str()),
        Some("pullproxy")
    );
}

#[test]
fn probes_and_the_metrics_service_use_the_configured_admin_port() {
    let helm = require_helm!();
    let objects = Objects::render(&helm, &[]);
    let (_, config) = objects.config();
    let admin = config.admin.listen;
    assert!(
        !admin.ip().is_loopback(),
        "the kubelet and Prometheus cannot reach {admin}"
    );
    let ds = objects.daemonset();
    let pod = pod_spec(&ds);
    let main = container(pod, "pullproxy");
    let port = main
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("admin"))
        .expect("admin port");
    assert_eq!(port.container_port, i32::from(admin.port()));

    let resolve = |p: &IntOrString| match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            assert_eq!(name, "admin");
            port.container_port
        }
    };
    for (probe, path) in [
        (main.liveness_probe.as_ref(), "/healthz"),
        (main.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe.and_then(|p| p.http_get.as_ref()).expect("HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(resolve(&get.port), i32::from(admin.port()));
        assert!(get.host.is_none(), "probes go to the pod (= node) address");
    }

    let svc: Service = objects.get("Service", "pullproxy-metrics");
    let spec = svc.spec.expect("service spec");
    assert_eq!(
        spec.cluster_ip.as_deref(),
        Some("None"),
        "every node is scraped"
    );
    let ports = spec.ports.expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(ports[0].port, i32::from(admin.port()));
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String("admin".into()))
    );
    let pod_labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    for (k, v) in spec.selector.expect("selector") {
        assert_eq!(pod_labels.get(&k), Some(&v), "the Service selects the pods");
    }

    // Monitors are off by default and point at the same port when on.
    assert!(objects.find("ServiceMonitor", "pullproxy").is_none());
    let on = Objects::render(
        &helm,
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.podMonitor.enabled=true",
        ],
    );
    let sm = on
        .find("ServiceMonitor", "pullproxy")
        .expect("ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    let svc_labels = &on.find("Service", "pullproxy-metrics").expect("svc")["metadata"]["labels"];
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("labels")
    {
        assert_eq!(&svc_labels[k], v, "the ServiceMonitor selects the Service");
    }
    let pm = on.find("PodMonitor", "pullproxy").expect("PodMonitor");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "admin");
}

#[test]
fn secrets_are_directories_the_configuration_points_into() {
    let helm = require_helm!();
    let password = "hub-password-for-the-chart-test";
    let objects = Objects::render(
        &helm,
        &[
            "--set",
            &format!("hubCredentials.password={password}"),
            "--set",
            "nodeCA.cert=CERT-PEM",
            "--set",
            "nodeCA.key=KEY-PEM",
        ],
    );
    let (text, config) = objects.config();
    assert!(!text.contains(password), "no secret in the ConfigMap");
    let ds = objects.daemonset();
    let pod = pod_spec(&ds);
    let main = container(pod, "pullproxy");

    let hub = volume(pod, "hub-credentials")
        .secret
        .as_ref()
        .expect("secret");
    assert_eq!(hub.secret_name.as_deref(), Some("pullproxy-hub"));
    assert_eq!(hub.default_mode, Some(0o400));
    let (hub_dir, ro, _, sub) = mount(main, "hub-credentials");
    assert!(ro);
    assert_eq!(sub, None, "a subPath mount never sees rotated Secrets");
    match &config
        .hub
        .as_ref()
        .expect("the chart sets hub.url")
        .password
    {
        PasswordSource::File(f) => assert_eq!(f, Path::new(&format!("{hub_dir}/password"))),
        other => panic!("the hub password comes from {other:?}, not the mounted Secret"),
    }
    let secret: Secret = objects.get("Secret", "pullproxy-hub");
    let data = secret.data.expect("data");
    assert_eq!(data["password"].0, password.as_bytes());

    let ca = volume(pod, "node-ca").secret.as_ref().expect("secret");
    assert_eq!(
        ca.default_mode,
        Some(0o400),
        "pullproxy refuses a readable key"
    );
    let (ca_dir, _, _, sub) = mount(main, "node-ca");
    assert_eq!(sub, None);
    assert_eq!(
        config.tls.ca_key.as_deref(),
        Some(Path::new(&format!("{ca_dir}/tls.key")))
    );
    assert_eq!(
        config.tls.ca_cert.as_deref(),
        Some(Path::new(&format!("{ca_dir}/tls.crt")))
    );
    // The init container installs the same CA into the trust store.
    assert_eq!(mount(container(pod, "trust-node-ca"), "node-ca").0, ca_dir);
    let secret: Secret = objects.get("Secret", "pullproxy-node-ca");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));

    // A dockerconfigjson Secret of the operator's own.
    let objects = Objects::render(
        &helm,
        &[
            "--set",
            "hubCredentials.existingSecret=sealos-hub",
            "--set",
            "hubCredentials.type=dockerconfigjson",
        ],
    );
    let (_, config) = objects.config();
    assert!(objects.find("Secret", "pullproxy-hub").is_none());
    let ds = objects.daemonset();
    let spec = pod_spec(&ds);
    let hub = volume(spec, "hub-credentials")
        .secret
        .as_ref()
        .expect("secret");
    assert_eq!(hub.secret_name.as_deref(), Some("sealos-hub"));
    let (hub_dir, _, _, _) = mount(container(spec, "pullproxy"), "hub-credentials");
    match &config
        .hub
        .as_ref()
        .expect("the chart sets hub.url")
        .password
    {
        PasswordSource::DockerConfigJson(f) => {
            assert_eq!(f, Path::new(&format!("{hub_dir}/.dockerconfigjson")));
        }
        other => panic!("the hub password comes from {other:?}, not the operator's Secret"),
    }

    // No credentials: no Secret volume at all.
    let objects = Objects::render(&helm, &[]);
    let ds = objects.daemonset();
    assert!(
        pod_spec(&ds)
            .volumes
            .iter()
            .flatten()
            .all(|v| v.secret.is_none())
    );
}

#[test]
fn uninstall_hook_reaches_every_node_without_capabilities() {
    let helm = require_helm!();
    let objects = Objects::render(&helm, &[]);
    let hook: DaemonSet = objects.get("DaemonSet", "pullproxy-uninstall");
    let annotations = hook.metadata.annotations.clone().expect("annotations");
    assert_eq!(annotations["helm.sh/hook"], "pre-delete");
    let pod = pod_spec(&hook);
    let main_pod = objects
        .daemonset()
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod");
    assert_eq!(pod.tolerations, main_pod.tolerations, "the same nodes");
    assert_eq!(pod.node_selector, main_pod.node_selector, "the same nodes");
    let uninstall = container(pod, "uninstall");
    assert_eq!(
        uninstall.args.as_deref(),
        Some(&["uninstall".to_owned()][..])
    );
    assert_eq!(
        uninstall.image,
        container(&main_pod, "pullproxy").image,
        "the same image"
    );
    assert_unprivileged_root(uninstall);
    assert_eq!(caps(uninstall), (BTreeSet::new(), true));
    assert_eq!(mount(uninstall, "bpffs").0, "/sys/fs/bpf");
    assert_eq!(
        env(uninstall, "PULLPROXY_CONFIG"),
        Some("/etc/pullproxy/config/pullproxy.yaml"),
        "reads the pin directory from the same configuration"
    );

    let job: Job = objects.get("Job", "pullproxy-uninstall");
    assert_eq!(
        job.metadata.annotations.expect("annotations")["helm.sh/hook"],
        "pre-delete"
    );
    let job_pod = job.spec.and_then(|s| s.template.spec).expect("job pod");
    let args = job_pod.containers[0].args.clone().expect("args");
    assert_eq!(
        &args[..3],
        ["rollout", "status", "daemonset/pullproxy-uninstall"]
    );
    assert!(args.contains(&"--namespace=kube-system".to_owned()));
    let hook_weight = |v: &Value| -> i32 {
        v["metadata"]["annotations"]["helm.sh/hook-weight"]
            .as_str()
            .expect("weight")
            .parse()
            .expect("number")
    };
    assert!(
        hook_weight(objects.find("DaemonSet", "pullproxy-uninstall").unwrap())
            < hook_weight(objects.find("Job", "pullproxy-uninstall").unwrap()),
        "the DaemonSet exists before the Job waits for it"
    );
    assert!(objects.find("RoleBinding", "pullproxy-uninstall").is_some());

    let off = Objects::render(&helm, &["--set", "uninstall.enabled=false"]);
    assert!(off.find("Job", "pullproxy-uninstall").is_none());
}

#[test]
fn dashboard_uses_only_contract_metrics_and_valid_queries() {
    let helm = require_helm!();
    let path = workspace().join("deploy/grafana/pullproxy.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("pullproxy_") {
                let base = word.strip_suffix("_bucket").unwrap_or(word);
                assert!(
                    METRICS.contains(&base),
                    "{word} is not a pullproxy metric: {expr}"
                );
                used.insert(base.to_owned());
            }
        }
    }
    for wanted in [
        "pullproxy_requests_total",
        "pullproxy_served_bytes_total",
        "pullproxy_request_duration_seconds",
        "pullproxy_hub_up",
        "pullproxy_hub_lookups_total",
        "pullproxy_cache_bytes",
        "pullproxy_cache_entries",
        "pullproxy_cache_evictions_total",
        "pullproxy_redirect_connections_total",
        "pullproxy_digest_mismatches_total",
        "pullproxy_upstream_errors_total",
    ] {
        assert!(used.contains(wanted), "the dashboard must show {wanted}");
    }

    // Every query parses as PromQL (Grafana's variables replaced by what they expand to).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "  - record: pullproxy:dashboard:q{i}\n    expr: {}\n",
            serde_json::to_string(&expr).expect("quoted")
        ));
    }
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, &rules).expect("write rules");
    match Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool rejects a dashboard query: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("promtool (Debian: prometheus) is needed in CI: {e}")
        }
        Err(e) => {
            eprintln!("*** promtool not run ({e}); `cargo xtask setup --test` installs it ***")
        }
    }

    // The chart ships the same file as a ConfigMap for Grafana's sidecar, when asked.
    let objects = Objects::render(&helm, &["--set", "grafanaDashboard.enabled=true"]);
    let cm: ConfigMap = objects.get("ConfigMap", "pullproxy-dashboard");
    assert_eq!(
        cm.metadata.labels.expect("labels")["grafana_dashboard"],
        "1"
    );
    let shipped = cm.data.expect("data")["pullproxy.json"].clone();
    assert_eq!(shipped.trim_end(), text.trim_end());
    assert!(
        Objects::render(&helm, &[])
            .find("ConfigMap", "pullproxy-dashboard")
            .is_none()
    );
}

#[test]
fn values_document_every_config_key_pullproxy_has() {
    let helm = require_helm!();
    // The chart's config block and the embedded default must name the same keys: a key added to
    // pullproxy but not to the chart would fail at start (pullproxy wants every key).
    let objects = Objects::render(&helm, &[]);
    let (text, _) = objects.config();
    let chart: Value = serde_saphyr::from_str(&text).expect("yaml");
    let default: Value =
        serde_saphyr::from_str(pullproxy::config::DEFAULT_YAML).expect("default yaml");
    fn keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        if let Some(map) = v.as_object() {
            for (k, v) in map {
                let path = format!("{prefix}{k}");
                out.insert(path.clone());
                // hub.mapping.overrides is a map of the user's hosts, not keys.
                if path != "hub.mapping.overrides" {
                    keys(v, &format!("{path}."), out);
                }
            }
        }
    }
    let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
    keys(&chart, "", &mut a);
    keys(&default, "", &mut b);
    assert_eq!(a, b);
}

/// Parses `v` as `T` and serializes it again: a field the typed object does not know (a typo, a
/// field of another API version) is dropped on the way and shows up as a difference.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Value {
    let typed: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| {
        panic!("{}/{}: {e}", v["kind"], v["metadata"]["name"]);
    });
    serde_json::to_value(typed).expect("serialize")
}

#[test]
fn every_object_has_only_fields_kubernetes_knows() {
    use k8s_openapi::api::{
        core::v1::ServiceAccount,
        rbac::v1::{Role, RoleBinding},
    };
    let helm = require_helm!();
    let everything = [
        "--set",
        "hubCredentials.password=x",
        "--set",
        "nodeCA.cert=c",
        "--set",
        "nodeCA.key=k",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "hostPID=true",
    ];
    let mut checked = BTreeSet::new();
    for args in [&[][..], &everything[..]] {
        for doc in &Objects::render(&helm, args).0 {
            let kind = doc["kind"].as_str().expect("kind");
            let again = match kind {
                "DaemonSet" => round_trip::<DaemonSet>(doc),
                "Job" => round_trip::<Job>(doc),
                "ConfigMap" => round_trip::<ConfigMap>(doc),
                "Secret" => round_trip::<Secret>(doc),
                "Service" => round_trip::<Service>(doc),
                "ServiceAccount" => round_trip::<ServiceAccount>(doc),
                "Role" => round_trip::<Role>(doc),
                "RoleBinding" => round_trip::<RoleBinding>(doc),
                // prometheus-operator CRDs: no typed model here.
                "ServiceMonitor" | "PodMonitor" => continue,
                other => panic!("unexpected kind {other}"),
            };
            assert_eq!(
                &again, doc,
                "{kind} {} has fields Kubernetes does not know",
                doc["metadata"]["name"]
            );
            checked.insert(kind.to_owned());
        }
    }
    assert!(checked.len() >= 8, "{checked:?}");

    // And the chart passes helm's own linter with everything switched on.
    let out = Command::new(&helm)
        .args(["lint", "--strict", "deploy/helm/pullproxy"])
        .args(everything)
        .current_dir(workspace())
        .output()
        .expect("helm lint");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
