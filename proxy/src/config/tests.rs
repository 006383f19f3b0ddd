//! The loader end to end: layering, and every refusal named with its key and where it was set.

use super::*;
use crate::{origins::hub::PasswordSource, redirect::Targets, settings::Config};

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn defaults() -> Config {
    Config::defaults_with(no_env()).unwrap()
}

fn error(text: &str, vars: &[(&str, &str)]) -> String {
    let err = Config::from_yaml(text, "x.yaml", env(vars)).unwrap_err();
    crate::telemetry::error_chain(&err)
}

#[test]
fn embedded_default_is_valid() {
    let c = defaults();
    assert_eq!(c.redirect.ports, vec![443, 80]);
    assert_eq!(c.redirect.targets, Targets::Auto);
    let again = Config::from_yaml(DEFAULT_YAML, "default", no_env()).unwrap();
    assert_eq!(again.cache.dir, c.cache.dir);
}

#[test]
fn a_file_setting_one_key_of_a_section_keeps_the_other_defaults() {
    let d = defaults();
    let c = Config::from_yaml("cache: {max_size: 1GiB}\n", "x.yaml", no_env()).unwrap();
    assert_eq!(c.cache.max_bytes, 1 << 30);
    assert_eq!(c.cache.dir, d.cache.dir);

    let c = Config::from_yaml("log:\n  level: debug\n", "x.yaml", no_env()).unwrap();
    assert_eq!(
        (c.log.level.as_str(), c.log.format),
        ("debug", d.log.format)
    );

    let text = "admin:\n  listen: 0.0.0.0:9090\nhub:\n  mapping:\n    overrides:\n      quay.io: \"quay.io/{repo}\"\n";
    let c = Config::from_yaml(text, "x.yaml", no_env()).unwrap();
    assert_eq!(c.admin.listen.port(), 9090);
    assert_eq!(c.admin.hub_check_interval, d.admin.hub_check_interval);
    let (hub, default_hub) = (c.hub.unwrap(), d.hub.unwrap());
    assert_eq!(hub.mapping.default, "{repo}");
    assert_eq!(hub.mapping.overrides["quay.io"], "quay.io/{repo}");
    assert_eq!(hub.url, default_hub.url);

    // Lists replace, they do not append.
    let c = Config::from_yaml("redirect: {ports: [8443]}\n", "x.yaml", no_env()).unwrap();
    assert_eq!(c.redirect.ports, vec![8443]);

    // A file of comments only is the defaults.
    let c = Config::from_yaml("# nothing yet\n", "x.yaml", no_env()).unwrap();
    assert_eq!(c.listen.port, d.listen.port);
}

#[test]
fn the_guard_covers_the_proxy_and_admin_ports_once_each() {
    let c = Config::from_yaml("# defaults\n", "x.yaml", no_env()).unwrap();
    assert_eq!(c.redirect.guarded_ports, vec![15090, 15443]);
    let text = "listen: {port: 9000}\nadmin: {listen: \"0.0.0.0:9000\"}\n";
    let c = Config::from_yaml(text, "x.yaml", no_env()).unwrap();
    assert_eq!(c.redirect.guarded_ports, vec![9000]);
}

#[test]
fn hub_templates_must_give_repository_names() {
    let err = error("hub:\n  mapping:\n    default: \"../{repo}\"\n", &[]);
    assert!(
        err.starts_with("x.yaml line 2 column 3: hub.mapping"),
        "{err}"
    );
    assert!(
        err.contains("default") && err.contains("../library/nginx"),
        "{err}"
    );
    let err = error(
        "hub:\n  mapping:\n    overrides:\n      quay.io: \"{repo}/\"\n",
        &[],
    );
    assert!(
        err.contains("quay.io") && err.contains("not a repository name"),
        "{err}"
    );
    let c = Config::from_yaml(
        "hub: {mapping: {overrides: {quay.io: \"{host}/{repo}\"}}}\n",
        "x.yaml",
        no_env(),
    )
    .unwrap();
    let mapping = c.hub.unwrap().mapping;
    let repo = "coreos/etcd".parse().unwrap();
    assert_eq!(
        mapping.hub_repo("quay.io", &repo).unwrap().as_str(),
        "quay.io/coreos/etcd"
    );
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let err = error("cache:\n  max_size: 1GiB\n  max_sise: 2GiB\n", &[]);
    assert!(err.starts_with("x.yaml line 3 column 3: cache"), "{err}");
    assert!(err.contains("max_sise"), "{err}");

    let err = error("log: {level: debug}\ncahce:\n  dir: /x\n", &[]);
    assert!(err.starts_with("x.yaml line 2 column 1"), "{err}");
    assert!(err.contains("cahce"), "{err}");

    let text = DEFAULT_YAML.replace("  kernel_log: false", "  kernel_logs: false");
    let line = text
        .lines()
        .position(|l| l.contains("kernel_logs"))
        .unwrap()
        + 1;
    let err = error(&text, &[]);
    assert!(
        err.starts_with(&format!("x.yaml line {line} column 3")),
        "{err}"
    );
    assert!(err.contains("kernel_logs"), "{err}");
}

#[test]
fn bad_values_are_named_with_their_line() {
    let err = error("listen:\n  port: many\n", &[]);
    assert!(
        err.starts_with("x.yaml line 2 column 3: listen.port: "),
        "{err}"
    );

    let err = error("redirect:\n  targets: [relative/path]\n", &[]);
    assert!(
        err.starts_with("x.yaml line 2 column 3: redirect.targets: "),
        "{err}"
    );
    let err = error("redirect:\n  targets: everything\n", &[]);
    assert!(err.contains("`auto` or a list"), "{err}");

    let err = error("listen:\n  addresses:\n  - 10.0.0.1\n", &[]);
    assert!(
        err.starts_with("x.yaml line 2 column 3: listen.addresses: "),
        "{err}"
    );
    assert!(err.contains("not a loopback"), "{err}");

    let err = error("- a\n- b\n", &[]);
    assert!(err.contains("mapping of sections"), "{err}");
}

#[test]
fn environment_overrides_layer_over_the_file() {
    let vars = env(&[
        ("PULLPROXY_LISTEN__PORT", "16000"),
        ("PULLPROXY_REDIRECT__TARGETS", "[/a, /b]"),
        ("PULLPROXY_REDIRECT__KERNEL_LOG", "true"),
        ("PULLPROXY_CACHE__MAX_SIZE", "2GiB"),
        ("PULLPROXY_UPSTREAM__BLOB_IDLE_TIMEOUT", "90s"),
        ("UNRELATED", "x"),
    ]);
    let c = Config::from_yaml("cache: {max_size: 1GiB}\n", "x.yaml", vars).unwrap();
    assert_eq!(c.listen.port, 16000);
    assert_eq!(
        c.redirect.targets,
        Targets::Paths(vec!["/a".into(), "/b".into()])
    );
    assert!(c.redirect.kernel_log);
    assert_eq!(c.cache.max_bytes, 2 << 30);
    assert_eq!(c.upstream.blob_idle_timeout, Duration::from_secs(90));
    assert!(c.ignored_env.is_empty(), "{:?}", c.ignored_env);

    // An empty variable unsets an optional key.
    let c = Config::defaults_with(env(&[("PULLPROXY_HUB__URL", "")])).unwrap();
    assert!(c.hub.is_none());

    let err = error("", &[("PULLPROXY_LISTEN__PROT", "1")]);
    assert!(
        err.contains("PULLPROXY_LISTEN__PROT") && err.contains("listen.prot"),
        "{err}"
    );
    let err = error("", &[("PULLPROXY_LISTEN__PORT", "many")]);
    assert!(err.contains("PULLPROXY_LISTEN__PORT"), "{err}");
    // A semantic error in an overridden key names the variable, not the file.
    let err = error(
        "listen: {port: 15443}\n",
        &[("PULLPROXY_REDIRECT__PIN_DIR", "/sys/fs/bpf/a.b")],
    );
    assert!(
        err.starts_with("environment override PULLPROXY_REDIRECT__PIN_DIR: redirect.pin_dir"),
        "{err}"
    );
}

#[test]
fn connection_deadlines_and_limits_are_layered_and_validated() {
    let d = defaults();
    assert_eq!(d.listen.deadlines.idle, Duration::from_secs(60));
    assert!(d.listen.limits.direct < d.listen.limits.total);
    assert!(d.admin.limits.total < d.listen.limits.direct);
    let c = Config::from_yaml(
        "listen: {idle_timeout: 2s, max_direct_connections: 5}\n",
        "x.yaml",
        env(&[
            ("PULLPROXY_LISTEN__WRITE_TIMEOUT", "90s"),
            ("PULLPROXY_ADMIN__MAX_CONNECTIONS_PER_CLIENT", "3"),
        ]),
    )
    .unwrap();
    assert_eq!(c.listen.deadlines.idle, Duration::from_secs(2));
    assert_eq!(c.listen.deadlines.write, Duration::from_secs(90));
    assert_eq!(c.listen.deadlines.header, d.listen.deadlines.header);
    assert_eq!(c.listen.limits.direct, 5);
    assert_eq!(c.listen.limits.total, d.listen.limits.total);
    assert_eq!(c.admin.limits.per_client, 3);

    let err = error("listen:\n  header_timeout: 0s\n", &[]);
    assert!(
        err.starts_with("x.yaml line 2 column 3: listen.header_timeout: must be longer"),
        "{err}"
    );
    let err = error("", &[("PULLPROXY_LISTEN__MAX_CONNECTIONS_PER_CLIENT", "0")]);
    assert!(
        err.contains("PULLPROXY_LISTEN__MAX_CONNECTIONS_PER_CLIENT")
            && err.contains("must be at least 1"),
        "{err}"
    );
    // Lowering the listener's limit alone caps the per-client ones.
    let c = Config::from_yaml("listen: {max_connections: 100}\n", "x.yaml", no_env()).unwrap();
    let l = c.listen.limits;
    assert_eq!((l.total, l.per_client, l.direct), (100, 100, 100));
    let c = Config::from_yaml("admin: {max_connections: 4}\n", "x.yaml", no_env()).unwrap();
    assert_eq!(c.admin.limits.per_client, 4);
}

#[test]
fn variables_that_are_not_overrides_are_ignored() {
    let vars = env(&[
        ("PULLPROXY_BIN", "/usr/bin/pullproxy"),
        ("PULLPROXY_CONFIG", "/etc/pullproxy.yaml"),
        ("PULLPROXY_METRICS_SERVICE_HOST", "10.96.0.7"),
        ("PULLPROXY_METRICS_PORT_9090_TCP", "tcp://10.96.0.7:9090"),
        ("PULLPROXY_NOSUCH__KEY", "1"),
        ("PULLPROXY___X", "1"),
        ("PULLPROXY_LOG__LEVEL", "debug"),
    ]);
    let c = Config::defaults_with(vars).unwrap();
    assert_eq!(c.log.level, "debug");
    assert_eq!(c.ignored_env.len(), 6, "{:?}", c.ignored_env);
    assert!(c.ignored_env.contains(&"PULLPROXY_BIN".to_owned()));
}

#[test]
fn secrets_are_taken_verbatim_and_never_shown() {
    for pw in [
        "123456", "null", "pw #x", "true", "[a]", "{x: 1}", "~", " lead",
    ] {
        let c = Config::defaults_with(env(&[("PULLPROXY_HUB__PASSWORD", pw)])).unwrap();
        let got = match &c.hub.unwrap().password {
            PasswordSource::Inline(p) => p.expose().to_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(got, pw, "PULLPROXY_HUB__PASSWORD={pw:?}");
    }
    let c = Config::defaults_with(env(&[("PULLPROXY_HUB__PASSWORD", "s3cr3t #x")])).unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cr3t"), "{debug}");
    let c = Config::defaults_with(env(&[("PULLPROXY_HUB__USERNAME", "0123")])).unwrap();
    assert_eq!(c.hub.unwrap().username.as_deref(), Some("0123"));

    // In a file, YAML types apply: an unquoted number is refused, without repeating it.
    let err = error("hub:\n  password: 918273645\n", &[]);
    assert!(
        err.starts_with("x.yaml line 2 column 3: hub.password"),
        "{err}"
    );
    assert!(!err.contains("918273645"), "{err}");
    let err = error("hub:\n  password: [918273645]\n", &[]);
    assert!(!err.contains("918273645"), "{err}");
    // Nor does a syntax error on its line.
    let err = error("hub:\n  password: \"918273645\n  url: x\n", &[]);
    assert!(
        err.starts_with("x.yaml: ") && err.contains("line 2"),
        "{err}"
    );
    assert!(!err.contains("918273645"), "{err}");
    // A semantic error about the password does not show it either.
    let err = error(
        "hub:\n  password: \"s3cr3t-value\"\n  password_file: /x\n",
        &[],
    );
    assert!(err.contains("at most one"), "{err}");
    assert!(!err.contains("s3cr3t-value"), "{err}");
}

#[test]
fn each_section_refuses_with_its_key_and_the_same_words() {
    for (var, value, want) in [
        (
            "LISTEN__PORT",
            "0",
            "listen.port: must be a port number, not 0",
        ),
        (
            "LISTEN__ADDRESSES",
            "[]",
            "listen.addresses: needs at least one address",
        ),
        (
            "LISTEN__MAX_DIRECT_CONNECTIONS",
            "0",
            "listen.max_direct_connections: must be at least 1",
        ),
        (
            "LISTEN__IDLE_TIMEOUT",
            "0s",
            "listen.idle_timeout: must be longer than 0s",
        ),
        (
            "ADMIN__MAX_CONNECTIONS",
            "0",
            "admin.max_connections: must be at least 1",
        ),
        (
            "REDIRECT__PORTS",
            "[]",
            "redirect.ports: needs at least one port when enabled",
        ),
        (
            "REDIRECT__PORTS",
            "[443, 0]",
            "redirect.ports: 0 is not a port",
        ),
        (
            "REDIRECT__ATTACH_CGROUP",
            "system.slice",
            "redirect.attach_cgroup: \"system.slice\" must be an absolute cgroup path such as \"/\"",
        ),
        (
            "REDIRECT__TARGETS",
            "[]",
            "redirect.targets: an empty list redirects nothing; use `auto` or name cgroups",
        ),
        (
            "REDIRECT__TARGETS",
            "[/a, b]",
            "redirect.targets: \"b\" must be an absolute cgroup path",
        ),
        (
            "REDIRECT__RESCAN_INTERVAL",
            "99ms",
            "redirect.rescan_interval: must be at least 100ms",
        ),
        (
            "HUB__URL",
            "ftp://hub",
            "hub.url: \"ftp://hub\" must be http://host[:port] or https://host[:port]",
        ),
        (
            "HUB__URL",
            "http://a b",
            "hub.url: \"http://a b\": invalid uri character",
        ),
        (
            "HUB__URL",
            "http://admin:s3cr3t@sealos.hub:5000",
            "hub.url: \"http://…@sealos.hub:5000\" must not carry credentials (they would show \
             in logs): set hub.username and hub.password, hub.password_file or hub.dockerconfigjson",
        ),
        (
            "HUB__URL",
            "ftp://admin:s3cr3t@hub/x@y",
            "hub.url: \"ftp://…@hub/x@y\" must be http://host[:port] or https://host[:port]",
        ),
        (
            "HUB__URL",
            "http://admin:s3cr3t@a b",
            "hub.url: \"http://…@a b\": invalid uri character",
        ),
        (
            "HUB__URL",
            "admin:s3cr3t@hub",
            "hub.url: \"…@hub\" must be http://host[:port] or https://host[:port]",
        ),
        (
            "HUB__PASSWORD",
            "s3cr3t",
            "hub.password: set at most one of hub.password, hub.password_file and hub.dockerconfigjson",
        ),
        (
            "HUB__WRITE_BACK_RATE",
            "1023",
            "hub.write_back_rate: must be at least 1KiB (per second)",
        ),
        ("HUB__TIMEOUT", "0s", "hub.timeout: must be longer than 0s"),
        (
            "ADMIN__HUB_CHECK_INTERVAL",
            "0s",
            "admin.hub_check_interval: must be longer than 0s",
        ),
        (
            "CACHE__MAX_SIZE",
            "1023KiB",
            "cache.max_size: must be at least 1MiB",
        ),
        (
            "TLS__CA_CERT",
            "/x",
            "tls.ca_cert: set both tls.ca_cert and tls.ca_key, or neither",
        ),
        (
            "UPSTREAM__MANIFEST_TIMEOUT",
            "0s",
            "upstream.manifest_timeout: must be longer than 0s",
        ),
        (
            "WARM__IMAGES",
            "[\"\"]",
            "warm.images: \"\": empty image reference",
        ),
    ] {
        let var = format!("{ENV_PREFIX}{var}");
        // A password file set in the file, so that the password override is a second source.
        let text = "hub: {password_file: /run/hub/password}\n";
        let err = error(text, &[(&var, value)]);
        assert_eq!(
            err,
            format!("environment override {var}: {want}"),
            "{var}={value}"
        );
    }
}

#[test]
fn sections_without_their_subsystem_are_still_checked_whole() {
    // No hub: no client is built, but a bad value under `hub` is still an error.
    let c = Config::from_yaml("hub: {url: null}\n", "x.yaml", no_env()).unwrap();
    assert!(c.hub.is_none());
    let err = error("hub:\n  url: null\n  write_back_rate: 10\n", &[]);
    assert!(
        err.starts_with("x.yaml line 3 column 3: hub.write_back_rate: must be at least 1KiB"),
        "{err}"
    );
    // No redirect: its section is still checked, and a port of 0 is never guarded.
    let err = error("redirect:\n  enabled: false\n  pin_dir: relative\n", &[]);
    assert!(
        err.starts_with("x.yaml line 3 column 3: redirect.pin_dir: relative must be "),
        "{err}"
    );
    let text = "redirect: {enabled: false, ports: []}\nadmin: {listen: \"127.0.0.1:0\"}\n";
    let c = Config::from_yaml(text, "x.yaml", no_env()).unwrap();
    assert!(!c.redirect.enabled);
    assert_eq!(c.redirect.guarded_ports, vec![c.listen.port]);
}
