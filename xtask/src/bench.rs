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
use pullproxy_bench::{
    BenchResults, ClusterResults, ContainerdResults, Document, HookResults, MeasuredAt, Pattern,
    System, Target,
};

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
        store::<HookResults>(&results, "hook.json", &hook, None)?;
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
        store::<BenchResults>(&results, "bench.json", &suite, None)?;
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
        store::<BenchResults>(&results, "fastpath.json", &fastpath, None)?;
    }

    // Figure 3: an unmodified containerd pulling a multi-layer image from the hub through
    // pullproxy vs with a hosts.toml mirror (the containerd harness's own benchmark).
    if runs("containerd") {
        let pull_args = rounds(args, 5);
        say("running pp-pullbench (containerd: pullproxy vs a hosts.toml mirror)");
        let pull = run_as_root(&bin.join("pp-pullbench"), &pull_args, &env)?;
        store::<ContainerdResults>(&results, "containerd.json", &pull, None)?;
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
        store::<ClusterResults>(&results, "cluster.json", &cluster, None)?;
    }

    render(&results)
}

/// `--rounds N` for a benchmark: the rounds asked for, else one for `--quick` and `full`
/// otherwise.
fn rounds(args: &BenchArgs, full: usize) -> Vec<String> {
    let n = args.rounds.unwrap_or(if args.quick { 1 } else { full });
    vec!["--rounds".to_owned(), n.to_string()]
}

/// Reads `results/<name>` as the document `T`; a file that does not match the schema is an
/// error naming the file and the field.
fn read<T: Document>(results: &Path, name: &str) -> anyhow::Result<T> {
    let path = results.join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} does not match the schema of {}'s results (pullproxy-bench)",
            path.display(),
            T::BENCHMARK
        )
    })
}

/// [`read`] of a file that may be absent (a benchmark never run here).
fn read_if_present<T: Document>(results: &Path, name: &str) -> anyhow::Result<Option<T>> {
    if results.join(name).exists() {
        read(results, name).map(Some)
    } else {
        Ok(None)
    }
}

/// Writes the Markdown report and the plots from the results in `results`.
fn render(results: &Path) -> anyhow::Result<()> {
    let mut suite: BenchResults = read(results, "bench.json")?;
    let containerd: Option<ContainerdResults> = read_if_present(results, "containerd.json")?;
    if let Some(c) = &containerd {
        suite.targets.extend(containerd_targets(c));
    }
    let cluster: Option<ClusterResults> = read_if_present(results, "cluster.json")?;
    if let Some(c) = &cluster {
        suite.targets.extend(cluster_targets(c));
    }
    // The fast path figure: this machine's run (its targets join the table), then any run in
    // a guest (`fastpath-<kernel>.json`, from the kernel TLS suite under `vm-test`).
    let mut fastpath_runs = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(results)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("fastpath") && n.ends_with(".json"))
        .collect();
    names.sort();
    for name in names {
        let run: BenchResults = read(results, &name)?;
        let Some(figure) = run.fastpath.clone() else {
            bail!(
                "{} has no fast path figure (`pp-bench --only fastpath` writes one)",
                results.join(&name).display()
            );
        };
        if name == "fastpath.json" {
            suite.targets.extend(run.targets.iter().cloned());
        }
        fastpath_runs.push(report::FastpathRun {
            file: name,
            run,
            figure,
        });
    }
    let report = report::Report {
        suite,
        containerd,
        cluster,
        fastpath_runs,
        hook: read(results, "hook.json")?,
    };
    let written = report::write(results, &report)?;
    for path in written {
        say(format!("wrote {}", path.display()));
    }
    Ok(())
}

/// Figure 3's targets (from `pp-pullbench`): a containerd pull through pullproxy takes at most
/// 1.1 times as long as through a mirror, for either client.
fn containerd_targets(pull: &ContainerdResults) -> Vec<Target> {
    [(&pull.ctr, "ctr"), (&pull.cri, "CRI")]
        .into_iter()
        .map(|(r, who)| {
            let ratio = r.ratio_pullproxy_over_mirror;
            Target {
                name: format!("containerd pull ({who}) via pullproxy vs a hosts.toml mirror"),
                goal: "<= 1.1x".to_owned(),
                value: ratio,
                met: ratio.median <= 1.1,
            }
        })
        .collect()
}

/// Figure 4's targets (from `pp-clusterbench`): pullproxy's staggered pulls cost the internet
/// one copy of the image, simultaneous ones at most one per node (a later issue targets one per
/// cluster there too).
fn cluster_targets(cluster: &ClusterResults) -> Vec<Target> {
    let nodes = cluster.nodes;
    let pullproxy = |pattern: Pattern| {
        cluster
            .results
            .iter()
            .find(|r| r.system == System::Pullproxy && r.pattern == pattern)
            .map(|r| r.upstream_x)
    };
    let mut targets = Vec::new();
    if let Some(x) = pullproxy(Pattern::Staggered) {
        targets.push(Target {
            name: format!("{nodes} nodes, staggered pulls (pullproxy): internet bytes / image"),
            goal: "= 1.0x".to_owned(),
            value: x,
            met: x.max <= 1.0 + 1e-9,
        });
    }
    if let Some(x) = pullproxy(Pattern::Simultaneous) {
        targets.push(Target {
            name: format!("{nodes} nodes, simultaneous pulls (pullproxy): internet bytes / image"),
            goal: format!("<= {nodes}.0x (later: 1.0x)"),
            value: x,
            met: x.median <= nodes as f64,
        });
    }
    targets
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

/// Stores a benchmark's output as `results/<name>`, read as its document `T` and stamped with
/// `measured_at` (commit and UTC time, and `how` it ran where that is not `cargo xtask bench` on
/// this host), so that a report re-rendered later (`--report-only`) still says when and from
/// what each figure was measured. Output that does not match the schema is kept as
/// `<name>.unparsed` (a long run is not lost) and is an error.
pub fn store<T: Document>(
    results: &Path,
    name: &str,
    output: &[u8],
    how: Option<&str>,
) -> anyhow::Result<()> {
    let mut doc: T = match serde_json::from_slice(output) {
        Ok(doc) => doc,
        Err(e) => {
            let kept = results.join(format!("{name}.unparsed"));
            std::fs::write(&kept, output)?;
            bail!(
                "{} printed output that does not match its result schema ({e}); kept as {}",
                T::BENCHMARK,
                kept.display()
            );
        }
    };
    let date = cmd("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let commit = match how {
        Some(how) => format!("{} ({how})", git_describe()),
        None => git_describe(),
    };
    *doc.measured_at_mut() = Some(MeasuredAt { commit, date });
    std::fs::write(results.join(name), serde_json::to_string_pretty(&doc)?)?;
    Ok(())
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
    use pullproxy_bench::Spread;

    use super::*;

    /// The committed cluster figure, with pullproxy's internet bytes per image set per pattern.
    fn cluster(staggered: Spread, simultaneous: Spread) -> ClusterResults {
        let path = root().join("results/cluster.json");
        let mut c: ClusterResults =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        c.nodes = 4;
        for r in &mut c.results {
            match (r.system, r.pattern) {
                (System::Pullproxy, Pattern::Staggered) => r.upstream_x = staggered,
                (System::Pullproxy, Pattern::Simultaneous) => r.upstream_x = simultaneous,
                // The mirror's rows never count: far over any target.
                (System::Mirror, _) => r.upstream_x = spread(1.0, 9.0, 9.0),
            }
        }
        c
    }

    fn spread(min: f64, median: f64, max: f64) -> Spread {
        Spread { min, median, max }
    }

    fn judged(c: &ClusterResults) -> Vec<(String, bool)> {
        cluster_targets(c)
            .into_iter()
            .map(|t| (t.goal, t.met))
            .collect()
    }

    #[test]
    fn cluster_targets_are_one_copy_staggered_and_one_per_node_at_once() {
        let c = cluster(spread(1.0, 1.0, 1.0), spread(2.0, 3.5, 4.0));
        assert_eq!(
            judged(&c),
            [
                ("= 1.0x".to_owned(), true),
                ("<= 4.0x (later: 1.0x)".to_owned(), true),
            ]
        );
        // One round over a single copy fails the staggered target.
        let c = cluster(spread(1.0, 1.0, 1.25), spread(2.0, 4.5, 5.0));
        assert_eq!(
            judged(&c).iter().map(|t| t.1).collect::<Vec<_>>(),
            [false, false]
        );
        // A figure without pullproxy's rows has no targets.
        let mut c = cluster(spread(1.0, 1.0, 1.0), spread(1.0, 1.0, 1.0));
        c.results.retain(|r| r.system == System::Mirror);
        assert!(judged(&c).is_empty());
    }

    #[test]
    fn containerd_targets_judge_the_median_ratio_per_client() {
        let path = root().join("results/containerd.json");
        let mut pull: ContainerdResults =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        pull.ctr.ratio_pullproxy_over_mirror = spread(0.9, 1.1, 1.5);
        pull.cri.ratio_pullproxy_over_mirror = spread(1.0, 1.125, 1.25);
        let t = containerd_targets(&pull);
        assert_eq!(
            t.iter()
                .map(|t| (t.name.as_str(), t.met))
                .collect::<Vec<_>>(),
            [
                (
                    "containerd pull (ctr) via pullproxy vs a hosts.toml mirror",
                    true
                ),
                (
                    "containerd pull (CRI) via pullproxy vs a hosts.toml mirror",
                    false
                ),
            ]
        );
    }

    /// A stored result with a renamed or missing field is an error that names the file and the
    /// field, not a report with gaps.
    #[test]
    fn a_result_off_the_schema_is_an_error_naming_file_and_field() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hook = std::fs::read_to_string(root().join("results/hook.json")).unwrap();
        assert!(read::<HookResults>(&root().join("results"), "hook.json").is_ok());
        let mut missing: serde_json::Value = serde_json::from_str(&hook).unwrap();
        missing["redirected_connect"]
            .as_object_mut()
            .unwrap()
            .remove("added_us_p50")
            .unwrap();
        for (text, error) in [
            (
                hook.replace("\"added_us_p50\"", "\"added_p50_us\""),
                "unknown field `added_p50_us`",
            ),
            (missing.to_string(), "missing field `added_us_p50`"),
        ] {
            std::fs::write(dir.join("hook.json"), text).unwrap();
            let err = format!("{:#}", read::<HookResults>(&dir, "hook.json").unwrap_err());
            assert!(
                err.contains(&dir.join("hook.json").display().to_string()),
                "{err}"
            );
            assert!(err.contains(error), "{err}");
        }
        assert!(
            read_if_present::<ClusterResults>(&dir, "cluster.json")
                .unwrap()
                .is_none()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A benchmark's output is stored stamped; output off the schema is kept beside, not lost.
    #[test]
    fn store_stamps_the_output_and_keeps_what_it_cannot_read() {
        let dir = std::env::temp_dir().join(format!("xtask-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut pull: ContainerdResults = read(&root().join("results"), "containerd.json").unwrap();
        pull.measured_at = None;
        let output = serde_json::to_vec(&pull).unwrap();
        store::<ContainerdResults>(&dir, "containerd.json", &output, None).unwrap();
        let stored: ContainerdResults = read(&dir, "containerd.json").unwrap();
        let stamp = stored.measured_at.clone().expect("stamped");
        assert!(stamp.date.ends_with(" UTC"), "{stamp:?}");
        assert_eq!(
            ContainerdResults {
                measured_at: None,
                ..stored
            },
            pull
        );

        let bad = b"{\"what\": \"half a document\"}";
        let err = store::<ContainerdResults>(&dir, "cluster.json", bad, None).unwrap_err();
        assert!(err.to_string().contains("pp-pullbench"), "{err}");
        assert_eq!(
            std::fs::read(dir.join("cluster.json.unparsed")).unwrap(),
            bad
        );
        assert!(!dir.join("cluster.json").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
