//! `cargo xtask bench`: builds the benchmarks and pullproxy in release, runs the kernel hook
//! benchmark (`pp-hookbench`), the pull suite (`pp-bench`: its figures, then on its own the TLS
//! fast path figure), containerd through pullproxy vs a mirror (`pp-pullbench`) and the cluster
//! figure (`pp-clusterbench`) as root, and writes their
//! JSON, a Markdown report and PNG plots under `results/`.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{cmd, is_root, root, run, say, target_dir},
    report, setup,
};

/// What `cargo xtask bench` was asked for.
pub struct BenchArgs {
    /// Rounds per measurement (`None`: the suite's default).
    pub rounds: Option<usize>,
    /// A smoke run: one small blob, one round, few clients.
    pub quick: bool,
    /// Only render the report again from the JSON already in `results/`.
    pub report_only: bool,
    /// Run only these benchmarks ([`BENCHMARKS`]; empty: all), keeping the others' JSON.
    pub only: Vec<String>,
}

/// The benchmarks `--only` selects from: the hook benchmark, the pull suite, the TLS fast path
/// figure (not in `--quick` unless named), containerd through pullproxy vs a mirror, the cluster
/// figure.
pub const BENCHMARKS: [&str; 5] = ["hook", "suite", "fastpath", "containerd", "cluster"];

/// The blob size of the fast path figure, MiB: the size of the targets.
const FASTPATH_MIB: &str = "256";

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if args.report_only {
        return render(&root().join("results"));
    }
    if let Some(unknown) = args.only.iter().find(|b| !BENCHMARKS.contains(&b.as_str())) {
        bail!(
            "--only {unknown}: the benchmarks are {}",
            BENCHMARKS.join(", ")
        );
    }
    let runs = |name: &str| args.only.is_empty() || args.only.iter().any(|b| b == name);
    setup::build_deps()?;
    setup::test_deps()?;
    // One cargo invocation, so the proxy and the benchmarks share one feature resolution.
    run(cmd("cargo").args([
        "build",
        "--release",
        "--package",
        "proxy",
        "--bin",
        "pullproxy",
        "--package",
        "pullproxy-bench",
        "--bin",
        "pp-bench",
        "--bin",
        "pp-hookbench",
        "--bin",
        "pp-pullbench",
        "--bin",
        "pp-clusterbench",
    ]))?;
    let bin = target_dir().join("release");
    let results = root().join("results");
    std::fs::create_dir_all(&results)?;
    warn_if_busy();

    let pullproxy = bin.join("pullproxy");
    let env = [("PULLPROXY_BIN", pullproxy.as_path())];

    if runs("hook") {
        let mut hook_args = rounds(args, 7);
        if args.quick {
            hook_args.extend(["--connections".to_owned(), "2000".to_owned()]);
        }
        say("running pp-hookbench (the kernel hook's connect cost)");
        let hook = run_as_root(&bin.join("pp-hookbench"), &hook_args, &[])?;
        std::fs::write(results.join("hook.json"), stamped(&hook)?)?;
    }

    if runs("suite") {
        let mut suite_args = Vec::new();
        if args.quick {
            suite_args.push("--quick".to_owned());
        }
        if let Some(r) = args.rounds {
            suite_args.extend(["--rounds".to_owned(), r.to_string()]);
        }
        say("running pp-bench (the pull suite; progress below)");
        let suite = run_as_root(&bin.join("pp-bench"), &suite_args, &env)?;
        std::fs::write(results.join("bench.json"), stamped(&suite)?)?;
    }

    // The TLS fast path: hub and cache hits of one large blob against the hub, with the load
    // generator and curl, TLS in user space and in the kernel where it has `tls`.
    if runs("fastpath") && (!args.quick || !args.only.is_empty()) {
        let mut fastpath_args = vec![
            "--only".to_owned(),
            "fastpath".to_owned(),
            "--sizes".to_owned(),
            FASTPATH_MIB.to_owned(),
        ];
        if let Some(r) = args.rounds {
            fastpath_args.extend(["--rounds".to_owned(), r.to_string()]);
        }
        say("running pp-bench --only fastpath (the TLS fast path)");
        let fastpath = run_as_root(&bin.join("pp-bench"), &fastpath_args, &env)?;
        std::fs::write(results.join("fastpath.json"), stamped(&fastpath)?)?;
    }

    // Figure 3: an unmodified containerd pulling a multi-layer image from the hub through
    // pullproxy vs with a hosts.toml mirror (the containerd harness's own benchmark).
    if runs("containerd") {
        let pull_args = rounds(args, 5);
        say("running pp-pullbench (containerd: pullproxy vs a hosts.toml mirror)");
        let pull = run_as_root(&bin.join("pp-pullbench"), &pull_args, &env)?;
        std::fs::write(results.join("containerd.json"), stamped(&pull)?)?;
    }

    // Figure 4: a cluster of nodes pulling one image, pullproxy with the hub vs a hosts.toml
    // mirror pointing at distribution's pull-through proxy (`--quick`: one round, 2 nodes, a
    // 32 MiB image).
    if runs("cluster") {
        let mut cluster_args = rounds(args, 3);
        if args.quick {
            cluster_args.push("--quick".to_owned());
        }
        say("running pp-clusterbench (a cluster: pullproxy with the hub vs a registry mirror)");
        let cluster = run_as_root(&bin.join("pp-clusterbench"), &cluster_args, &env)?;
        std::fs::write(results.join("cluster.json"), stamped(&cluster)?)?;
    }

    render(&results)
}

/// `--rounds N` for a benchmark: the rounds asked for, else one for `--quick` and `full`
/// otherwise.
fn rounds(args: &BenchArgs, full: usize) -> Vec<String> {
    let n = args.rounds.unwrap_or(if args.quick { 1 } else { full });
    vec!["--rounds".to_owned(), n.to_string()]
}

/// Writes the Markdown report and the plots from `bench.json` and `hook.json` in `results`.
fn render(results: &Path) -> anyhow::Result<()> {
    let read = |name: &str| -> anyhow::Result<serde_json::Value> {
        let path = results.join(name);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
    };
    let mut suite = read("bench.json")?;
    if results.join("containerd.json").exists() {
        merge_containerd(&mut suite, read("containerd.json")?);
    }
    if results.join("cluster.json").exists() {
        merge_cluster(&mut suite, read("cluster.json")?);
    }
    // The fast path figure: this machine's run (its targets join the table), then any run in
    // a guest (`fastpath-<kernel>.json`, from the kernel TLS suite under `vm-test`).
    let mut runs = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(results)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("fastpath") && n.ends_with(".json"))
        .collect();
    names.sort();
    for name in names {
        let mut run = read(&name)?;
        if name == "fastpath.json"
            && let (Some(targets), Some(new)) =
                (suite["targets"].as_array_mut(), run["targets"].as_array())
        {
            targets.extend(new.iter().cloned());
        }
        run["file"] = name.into();
        runs.push(run);
    }
    suite["fastpath_runs"] = runs.into();
    let written = report::write(results, &suite, &read("hook.json")?)?;
    for path in written {
        say(format!("wrote {}", path.display()));
    }
    Ok(())
}

/// Figure 3 (from `pp-pullbench`) joins the suite's report, with its target.
fn merge_containerd(suite: &mut serde_json::Value, mut pull: serde_json::Value) {
    pull["measured"] = true.into();
    for (key, who) in [("ctr", "ctr"), ("cri", "CRI")] {
        let ratio = pull[key]["ratio_pullproxy_over_mirror"].clone();
        if let Some(median) = ratio["median"].as_f64() {
            let target = serde_json::json!({
                "name": format!("containerd pull ({who}) via pullproxy vs a hosts.toml mirror"),
                "goal": "<= 1.1x",
                "value": ratio,
                "met": median <= 1.1,
            });
            if let Some(targets) = suite["targets"].as_array_mut() {
                targets.push(target);
            }
        }
    }
    suite["containerd"] = pull;
}

/// Figure 4 (from `pp-clusterbench`) joins the suite's report, with its targets: pullproxy's
/// staggered pulls cost the internet one copy of the image, simultaneous ones at most one per
/// node (a later issue targets one per cluster there too).
fn merge_cluster(suite: &mut serde_json::Value, cluster: serde_json::Value) {
    let nodes = cluster["nodes"].as_u64().unwrap_or(0);
    let pullproxy = |pattern: &str| {
        cluster["results"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["system"] == "pullproxy" && r["pattern"] == pattern)
            .map(|r| r["upstream_x"].clone())
    };
    let mut targets = Vec::new();
    if let Some(x) = pullproxy("staggered") {
        let met = x["max"].as_f64().is_some_and(|m| m <= 1.0 + 1e-9);
        targets.push(serde_json::json!({
            "name": format!("{nodes} nodes, staggered pulls (pullproxy): internet bytes / image"),
            "goal": "= 1.0x",
            "value": x,
            "met": met,
        }));
    }
    if let Some(x) = pullproxy("simultaneous") {
        let met = x["median"].as_f64().is_some_and(|m| m <= nodes as f64);
        targets.push(serde_json::json!({
            "name": format!("{nodes} nodes, simultaneous pulls (pullproxy): internet bytes / image"),
            "goal": format!("<= {nodes}.0x (later: 1.0x)"),
            "value": x,
            "met": met,
        }));
    }
    if let Some(t) = suite["targets"].as_array_mut() {
        t.extend(targets);
    }
    suite["cluster"] = cluster;
}

/// Runs a benchmark binary as root (through `sudo` when needed) with `env`; returns its stdout.
/// Its stderr (progress) goes to the terminal.
fn run_as_root(bin: &Path, args: &[String], env: &[(&str, &Path)]) -> anyhow::Result<Vec<u8>> {
    let mut c = if is_root() {
        let mut c = Command::new(bin);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    } else {
        say(format!(
            "{} needs root: running it through sudo",
            bin.display()
        ));
        let mut c = Command::new("sudo");
        c.arg("env");
        for (k, v) in env {
            c.arg(format!("{k}={}", v.display()));
        }
        c.arg(bin);
        c
    };
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let out = c
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", bin.display(), out.status);
    }
    Ok(out.stdout)
}

/// Every number is relative to a baseline measured in the same round, but a busy machine still
/// adds noise: say so before starting.
fn warn_if_busy() {
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    if load > 1.0 {
        say(format!(
            "the 1-minute load average is {load:.1}: other work is running, and the spread of \
             the results will show it; re-run when the machine is quiet"
        ));
    }
}

/// A benchmark's JSON output with `measured_at` (commit and UTC time) added, so that a report
/// re-rendered later (`--report-only`) still says when and from what each figure was measured.
fn stamped(output: &[u8]) -> anyhow::Result<String> {
    let mut v: serde_json::Value =
        serde_json::from_slice(output).context("a benchmark printed something that is not JSON")?;
    let date = cmd("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    v["measured_at"] = serde_json::json!({ "commit": git_describe(), "date": date });
    Ok(serde_json::to_string_pretty(&v)?)
}

/// The commit the results belong to (`git describe --always --dirty`).
fn git_describe() -> String {
    let out = cmd("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    out.unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(staggered_max: f64, simultaneous_median: f64) -> serde_json::Value {
        let row = |pattern: &str, x: serde_json::Value| serde_json::json!({ "system": "pullproxy", "pattern": pattern, "upstream_x": x });
        serde_json::json!({
            "nodes": 4,
            "results": [
                row("staggered", serde_json::json!({"min": 1.0, "median": 1.0, "max": staggered_max})),
                row("simultaneous", serde_json::json!({"min": 2.0, "median": simultaneous_median, "max": 4.0})),
                { "system": "mirror", "pattern": "staggered", "upstream_x": {"min": 9.0, "median": 9.0, "max": 9.0} },
            ],
        })
    }

    fn merged(c: serde_json::Value) -> Vec<(String, bool)> {
        let mut suite = serde_json::json!({ "targets": [{ "name": "earlier", "met": true }] });
        merge_cluster(&mut suite, c);
        assert_eq!(suite["cluster"]["nodes"], 4, "the figure joins the suite");
        suite["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["goal"].as_str().unwrap_or("").to_owned(),
                    t["met"] == true,
                )
            })
            .collect()
    }

    #[test]
    fn cluster_targets_are_one_copy_staggered_and_one_per_node_at_once() {
        assert_eq!(
            merged(cluster(1.0, 3.5)),
            [
                (String::new(), true),
                ("= 1.0x".to_owned(), true),
                ("<= 4.0x (later: 1.0x)".to_owned(), true),
            ]
        );
        // One round over a single copy fails the staggered target; the mirror's rows never count.
        let t = merged(cluster(1.25, 4.5));
        assert_eq!((t[1].1, t[2].1), (false, false));
    }
}
