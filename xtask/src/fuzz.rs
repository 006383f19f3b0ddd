//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` with the eBPF nightly and runs each
//! for a bounded time over its committed corpus, reporting executions, coverage, new corpus
//! entries and crashes (a crash fails the command and names the reproducer).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{nightly_cmd, output, root, run, say, target_dir},
    setup,
};

/// What `cargo xtask fuzz` was asked for.
pub struct FuzzArgs {
    /// libFuzzer's `-max_total_time` for each target.
    pub seconds: u64,
    /// Targets run at the same time (each is one process on one core).
    pub jobs: usize,
    /// Targets to run; every target in `fuzz/Cargo.toml` when empty.
    pub targets: Vec<String>,
}

/// One input that runs longer than this is a hang, reported like a crash. Generous: the machine
/// may be busy, and no parser here should take more than milliseconds.
const UNIT_TIMEOUT_SECS: u64 = 30;

/// Codegen units for the fuzz build. cargo-fuzz defaults to 1 for the fastest executions; 16
/// builds the proxy's dependency tree several times faster on 2 cores, which is what bounds a CI
/// run of a few seconds per target.
const CODEGEN_UNITS: &str = "16";

/// What one target's run showed.
struct Outcome {
    target: String,
    stats: Stats,
    /// The input that crashed (or hung) the target.
    crash: Option<PathBuf>,
    log: PathBuf,
}

/// libFuzzer's final figures.
#[derive(Default)]
struct Stats {
    executions: Option<u64>,
    exec_per_sec: Option<u64>,
    new_units: Option<u64>,
    /// Code coverage (edges) and features (edges, counters, comparisons) at the end.
    cov: Option<u64>,
    ft: Option<u64>,
    corpus: Option<String>,
}

pub fn fuzz(args: &FuzzArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let toolchain = setup::fuzz_deps()?;
    let fuzz_dir = root().join("fuzz");
    let all = list_targets(&toolchain)?;
    let targets = if args.targets.is_empty() {
        all.clone()
    } else {
        if let Some(unknown) = args.targets.iter().find(|t| !all.contains(t)) {
            bail!(
                "no fuzz target {unknown:?}; the targets are: {}",
                all.join(", ")
            );
        }
        args.targets.clone()
    };

    let triple = host_triple(&toolchain)?;
    let target = target_dir().join("fuzz");
    let mut build = nightly_cmd("cargo", &toolchain);
    build
        .args(["fuzz", "build", "--fuzz-dir"])
        .arg(&fuzz_dir)
        // The parsers are safe Rust: AddressSanitizer would find nothing that the panics and
        // assertions (overflow checks included) do not, and costs build time and executions.
        .args(["--sanitizer", "none", "--debug-assertions"])
        .args(["--codegen-units", CODEGEN_UNITS, "--target", &triple])
        .arg("--target-dir")
        .arg(&target);
    // `cargo fuzz build` builds one target or all of them.
    if let [only] = targets.as_slice() {
        build.arg(only);
    }
    run(&mut build)?;
    let built = started.elapsed();
    let bin_dir = target.join(&triple).join("release");

    let outcomes = run_targets(&targets, args.jobs, |t| {
        run_target(&bin_dir.join(t), t, &fuzz_dir, &target, args.seconds)
    })?;

    report(&outcomes);
    say(format!(
        "fuzzing took {}s: {}s to build, {} target(s) for {}s each, {} at a time",
        started.elapsed().as_secs(),
        built.as_secs(),
        targets.len(),
        args.seconds,
        args.jobs
    ));
    let crashes: Vec<&Outcome> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    if !crashes.is_empty() {
        let mut msg = String::from("fuzzing found crashes:");
        for c in crashes {
            let input = c.crash.as_ref().expect("filtered");
            print_tail(&c.target, &c.log);
            msg.push_str(&format!(
                "\n  {}: reproducer {} (replay: `{} {}`; log {})",
                c.target,
                input.display(),
                bin_dir.join(&c.target).display(),
                input.display(),
                c.log.display()
            ));
        }
        bail!(msg);
    }
    // A run that did nothing (a broken binary, an unreadable corpus) must not pass as clean.
    if let Some(dead) = outcomes
        .iter()
        .find(|o| o.stats.executions.unwrap_or(0) == 0)
    {
        bail!(
            "fuzz target {} executed nothing; see {}",
            dead.target,
            dead.log.display()
        );
    }
    Ok(())
}

/// Runs `run` for every target, `jobs` at a time; outcomes in the targets' order.
fn run_targets(
    targets: &[String],
    jobs: usize,
    run: impl Fn(&str) -> anyhow::Result<Outcome> + Sync,
) -> anyhow::Result<Vec<Outcome>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<anyhow::Result<Outcome>>>> =
        Mutex::new(targets.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, targets.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(t) = targets.get(i) else { break };
                    let outcome = run(t);
                    results.lock().expect("results lock")[i] = Some(outcome);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("results lock")
        .into_iter()
        .map(|r| r.expect("every target ran"))
        .collect()
}

/// The end of a target's log: the panic message and where it happened.
fn print_tail(target: &str, log: &Path) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    eprintln!("--- {target}: the last lines of {}", log.display());
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}

/// The fuzz targets declared in `fuzz/Cargo.toml`.
fn list_targets(toolchain: &str) -> anyhow::Result<Vec<String>> {
    let mut c = nightly_cmd("cargo", toolchain);
    c.args(["fuzz", "list", "--fuzz-dir"])
        .arg(root().join("fuzz"));
    let listed = output(&mut c).context("`cargo fuzz list` failed")?;
    let targets: Vec<String> = listed.split_whitespace().map(str::to_owned).collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` found no targets in fuzz/");
    }
    Ok(targets)
}

/// The nightly's host triple: cargo-fuzz builds for it, and the binaries live under it.
fn host_triple(toolchain: &str) -> anyhow::Result<String> {
    let version = output(nightly_cmd("rustc", toolchain).arg("-vV")).context("rustc -vV failed")?;
    version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host")
}

/// Runs one target for `seconds` over the committed corpus. New inputs go to a corpus of this
/// machine's own under `target/` (listed first, so libFuzzer writes there), never into `fuzz/`.
fn run_target(
    binary: &Path,
    name: &str,
    fuzz_dir: &Path,
    target: &Path,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    let found = target.join("corpus").join(name);
    let artifacts = target.join("artifacts").join(name);
    let logs = target.join("logs");
    for dir in [&found, &artifacts, &logs] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let committed = fuzz_dir.join("corpus").join(name);
    let log = logs.join(format!("{name}.log"));
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    say(format!(
        "fuzzing {name} for {seconds}s over {} (log: {})",
        committed.display(),
        log.display()
    ));
    let mut prefix = artifacts.into_os_string();
    prefix.push("/");
    let mut artifact_arg = std::ffi::OsString::from("-artifact_prefix=");
    artifact_arg.push(&prefix);
    let status = Command::new(binary)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={UNIT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .arg(artifact_arg)
        .arg(&found)
        .arg(&committed)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .with_context(|| format!("starting {}", binary.display()))?;
    let text = fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let crash = if status.success() {
        None
    } else {
        match reproducer(&text) {
            Some(p) => Some(p),
            None => {
                print_tail(name, &log);
                bail!(
                    "fuzz target {name} failed ({status}) without a reproducer; see {}",
                    log.display()
                )
            }
        }
    };
    Ok(Outcome {
        target: name.to_owned(),
        stats: parse_stats(&text),
        crash,
        log,
    })
}

/// The input libFuzzer saved when the target crashed, timed out or ran out of memory.
fn reproducer(log: &str) -> Option<PathBuf> {
    log.lines()
        .find_map(|l| l.split_once("Test unit written to "))
        .map(|(_, path)| PathBuf::from(path.trim()))
}

/// The final statistics (`-print_final_stats=1`) and the last coverage line of a libFuzzer log.
fn parse_stats(log: &str) -> Stats {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
    };
    // `#123456	DONE   cov: 812 ft: 2301 corp: 190/9841b lim: 4096 exec/s: 6172 rss: 61Mb`
    let last = log.lines().rev().find(|l| l.contains(" cov: "));
    let field = |name: &str| {
        last.and_then(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == name)?;
            words.next().map(str::to_owned)
        })
    };
    Stats {
        executions: stat("number_of_executed_units"),
        exec_per_sec: stat("average_exec_per_sec"),
        new_units: stat("new_units_added"),
        cov: field("cov:").and_then(|v| v.parse().ok()),
        ft: field("ft:").and_then(|v| v.parse().ok()),
        corpus: field("corp:"),
    }
}

fn report(outcomes: &[Outcome]) {
    let show = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    eprintln!(
        "{:<14} {:>12} {:>8} {:>6} {:>7} {:>14} {:>5}  result",
        "target", "executions", "exec/s", "cov", "ft", "corpus", "new"
    );
    for o in outcomes {
        eprintln!(
            "{:<14} {:>12} {:>8} {:>6} {:>7} {:>14} {:>5}  {}",
            o.target,
            show(o.stats.executions),
            show(o.stats.exec_per_sec),
            show(o.stats.cov),
            show(o.stats.ft),
            o.stats.corpus.as_deref().unwrap_or("?"),
            show(o.stats.new_units),
            match &o.crash {
                None => "ok".to_owned(),
                Some(p) => format!("CRASH {}", p.display()),
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_final_stats() {
        let log = "INFO: Seed: 1\n\
                   #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 90 ft: 200 corp: 20/300b lim: 4096 exec/s: 2048 rss: 40Mb\n\
                   #9000\tDONE   cov: 95 ft: 230 corp: 24/351b lim: 4096 exec/s: 3000 rss: 41Mb\n\
                   Done 9000 runs in 3 second(s)\n\
                   stat::number_of_executed_units: 9000\n\
                   stat::average_exec_per_sec:     3000\n\
                   stat::new_units_added:          23\n\
                   stat::slowest_unit_time_sec:    0\n\
                   stat::peak_rss_mb:              41\n";
        let s = parse_stats(log);
        assert_eq!(s.executions, Some(9000));
        assert_eq!(s.exec_per_sec, Some(3000));
        assert_eq!(s.new_units, Some(23));
        assert_eq!((s.cov, s.ft), (Some(95), Some(230)));
        assert_eq!(s.corpus.as_deref(), Some("24/351b"));
        let none = parse_stats("thread panicked\n");
        assert_eq!((none.executions, none.cov), (None, None));
    }

    #[test]
    fn finds_the_reproducer_of_a_crash() {
        let log = "thread '<unnamed>' panicked at fuzz_targets/hub_mapping.rs:70:9:\n\
                   ==4242== ERROR: libFuzzer: deadly signal\n\
                   MS: 2 CopyPart-InsertByte-; base unit: 0123\n\
                   artifact_prefix='/w/target/fuzz/artifacts/hub_mapping/'; Test unit written to \
                   /w/target/fuzz/artifacts/hub_mapping/crash-ea1508ce\n\
                   Base64: cXVheS5pbwo=\n";
        assert_eq!(
            reproducer(log),
            Some(PathBuf::from(
                "/w/target/fuzz/artifacts/hub_mapping/crash-ea1508ce"
            ))
        );
        assert_eq!(reproducer("Done 10 runs in 1 second(s)\n"), None);
    }
}
