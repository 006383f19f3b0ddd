//! `cargo xtask bench`: builds the benchmarks and pullproxy in release, runs the pull suite
//! (`pp-bench`: its figures, then on its own the TLS fast path figure), containerd's pulls
//! (`pp-pullbench`) and the kernel hook benchmark (`pp-hookbench`) as root, and writes their
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
    /// Only the fast path figure (`results/fastpath.json`), then the report.
    pub fastpath: bool,
}

/// The blob size of the fast path figure, MiB: the size of the targets.
const FASTPATH_MIB: &str = "256";

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if args.report_only {
        return render(&root().join("results"));
    }
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
        "pullproxy-tests",
        "--bin",
        "pp-bench",
        "--bin",
        "pp-hookbench",
        "--bin",
        "pp-pullbench",
    ]))?;
    let bin = target_dir().join("release");
    let results = root().join("results");
    std::fs::create_dir_all(&results)?;
    warn_if_busy();
    let pullproxy = bin.join("pullproxy");

    let mut fastpath_args = vec![
        "--only".to_owned(),
        "fastpath".to_owned(),
        "--sizes".to_owned(),
        FASTPATH_MIB.to_owned(),
    ];
    if let Some(r) = args.rounds {
        fastpath_args.extend(["--rounds".to_owned(), r.to_string()]);
    }
    let fastpath = |args: &[String]| -> anyhow::Result<()> {
        say("running pp-bench --only fastpath (the TLS fast path)");
        let out = run_as_root(
            &bin.join("pp-bench"),
            args,
            &[("PULLPROXY_BIN", pullproxy.as_path())],
        )?;
        std::fs::write(results.join("fastpath.json"), stamped(&out)?)?;
        Ok(())
    };
    if args.fastpath {
        fastpath(&fastpath_args)?;
        return render(&results);
    }

    let mut hook_args = vec!["--rounds".to_owned()];
    hook_args.push(
        args.rounds
            .unwrap_or(if args.quick { 1 } else { 7 })
            .to_string(),
    );
    if args.quick {
        hook_args.extend(["--connections".to_owned(), "2000".to_owned()]);
    }
    say("running pp-hookbench (the kernel hook's connect cost)");
    let hook = run_as_root(&bin.join("pp-hookbench"), &hook_args, &[])?;
    std::fs::write(results.join("hook.json"), stamped(&hook)?)?;

    let mut suite_args = Vec::new();
    if args.quick {
        suite_args.push("--quick".to_owned());
    }
    if let Some(r) = args.rounds {
        suite_args.extend(["--rounds".to_owned(), r.to_string()]);
    }
    say("running pp-bench (the pull suite; progress below)");
    let suite = run_as_root(
        &bin.join("pp-bench"),
        &suite_args,
        &[("PULLPROXY_BIN", pullproxy.as_path())],
    )?;
    std::fs::write(results.join("bench.json"), stamped(&suite)?)?;
    if !args.quick {
        fastpath(&fastpath_args)?;
    }

    // Figure 3: an unmodified containerd pulling a multi-layer image from the hub through
    // pullproxy vs with a hosts.toml mirror (the containerd harness's own benchmark).
    let mut pull_args = vec!["--rounds".to_owned()];
    pull_args.push(
        args.rounds
            .unwrap_or(if args.quick { 1 } else { 5 })
            .to_string(),
    );
    say("running pp-pullbench (containerd: pullproxy vs a hosts.toml mirror)");
    let pull = run_as_root(
        &bin.join("pp-pullbench"),
        &pull_args,
        &[("PULLPROXY_BIN", pullproxy.as_path())],
    )?;
    std::fs::write(results.join("containerd.json"), stamped(&pull)?)?;

    render(&results)
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
