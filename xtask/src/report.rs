//! The benchmark report: `results/bench.md` (tables of ratios with min/median/max over rounds)
//! and PNG plots, from the results that `pp-bench`, `pp-pullbench`, `pp-clusterbench` and
//! `pp-hookbench` print, read through their schema (`pullproxy-bench`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use plotters::{
    coord::{Shift, types::RangedCoordf64},
    prelude::*,
    style::{FontStyle, register_font},
};
use pullproxy_bench::{
    BenchResults, ClusterResults, ContainerdResults, Fastpath, HookResults, Machine, MeasuredAt,
    MemoryReport, Pattern, Spread, System, size_label,
};

/// The plots' font: Debian's DejaVu Sans (`fonts-dejavu-core`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const MIB: f64 = 1024.0 * 1024.0;

/// Everything the report shows.
pub struct Report {
    /// The pull suite (`bench.json`), its targets joined by the other benchmarks'.
    pub suite: BenchResults,
    /// Figure 3 (`containerd.json`), if measured.
    pub containerd: Option<ContainerdResults>,
    /// Figure 4 (`cluster.json`), if measured.
    pub cluster: Option<ClusterResults>,
    /// The fast path figure's runs (`fastpath*.json`), by file name.
    pub fastpath_runs: Vec<FastpathRun>,
    /// The kernel hook's cost (`hook.json`).
    pub hook: HookResults,
}

/// One run of the fast path figure.
pub struct FastpathRun {
    /// Its file under `results/`.
    pub file: String,
    /// The run (machine, settings, stamp).
    pub run: BenchResults,
    /// Its fast path figure.
    pub figure: Fastpath,
}

/// Writes `bench.md` and the plots into `dir`; returns the paths written.
pub fn write(dir: &Path, report: &Report) -> anyhow::Result<Vec<PathBuf>> {
    let font = std::fs::read(FONT).with_context(|| format!("{FONT} (fonts-dejavu-core)"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let suite = &report.suite;
    let mut written = Vec::new();
    for (name, plot) in [
        (
            "throughput.png",
            plot_throughput as fn(&Path, &BenchResults) -> anyhow::Result<()>,
        ),
        ("latency.png", plot_latency),
        ("concurrency.png", plot_concurrency),
        ("memory.png", plot_memory),
    ] {
        let path = dir.join(name);
        plot(&path, suite).with_context(|| format!("plotting {}", path.display()))?;
        written.push(path);
    }
    if let Some(cluster) = &report.cluster {
        let path = dir.join("cluster.png");
        plot_cluster(&path, cluster).with_context(|| format!("plotting {}", path.display()))?;
        written.push(path);
    }
    let md = dir.join("bench.md");
    std::fs::write(&md, markdown(report))?;
    written.push(md);
    Ok(written)
}

/// `(min, median, max)` of a spread.
fn spread(v: &Spread) -> (f64, f64, f64) {
    (v.min, v.median, v.max)
}

/// `0.92 (0.88–0.95)`: median, then min–max.
fn fmt_spread(v: &Spread, digits: usize) -> String {
    let (lo, med, hi) = spread(v);
    format!("{med:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

fn mib(bytes: f64) -> f64 {
    bytes / MIB
}

/// `<commit>, <date>` of a stamped benchmark output.
fn measured_at(at: &Option<MeasuredAt>) -> String {
    match at {
        Some(at) => format!("{}, {}", at.commit, at.date),
        None => "an unrecorded commit and time".to_owned(),
    }
}

/// A machine's recorded load averages (1, 5, 15 minutes) as `a b c`.
fn load_average(v: &[f64]) -> String {
    v.iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `load average a b c before and d e f after` of a run's machine.
fn loads(m: &Machine) -> (String, String) {
    (load_average(&m.load_before), load_average(&m.load_after))
}

fn markdown(report: &Report) -> String {
    let suite = &report.suite;
    let hook = &report.hook;
    let mut md = String::new();
    let m = &suite.machine;
    let (before, after) = loads(m);
    md += "# pullproxy benchmarks\n\n";
    md += &format!(
        "`cargo xtask bench{}` at {}: {} CPUs, kernel {}, load average {before} before and \
         {after} after, {:.0} s.\n\n",
        if suite.settings.quick { " --quick" } else { "" },
        measured_at(&suite.measured_at),
        m.cpus,
        m.kernel,
        suite.elapsed_s,
    );
    md += "Every figure is a ratio against a baseline measured in the same round of the same run, \
           with the same images and the same client (`harness::loadgen`, keep-alive HTTP/1.1) for \
           every system; cells read `median (min–max)` over rounds. MiB/s and milliseconds are \
           given for orientation only: they describe this machine, not others. pullproxy's clients \
           are redirected by the real kernel programs (they sit in the node's target cgroup and \
           resolve the registry's name to the upstream); the other systems are asked directly.\n\n";

    let met = |yes: bool| if yes { "yes" } else { "**no**" };
    md += "## Targets\n\n| target | goal | measured | met |\n|---|---|---|---|\n";
    for t in &suite.targets {
        md += &format!(
            "| {} | {} | {} | {} |\n",
            t.name,
            t.goal,
            fmt_spread(&t.value, 2),
            met(t.met),
        );
    }

    for (h, what) in [
        (&hook.non_matching_port, "a port no registry uses"),
        (
            &hook.registry_port_not_target,
            "a registry port, from outside the target cgroups",
        ),
    ] {
        let r = h.ratio_with_programs.spread();
        md += &format!(
            "| connect()+accept() rate to {what}: kernel programs attached vs none | >= 0.95x | {} | {} |\n",
            fmt_spread(&r, 3),
            met(r.median >= 0.95),
        );
    }
    let added = hook.redirected_connect.added_us_p50;
    md += &format!(
        "| added connect() latency of a redirected connection, p50 (µs) | < 10 µs | {added:.1} | {} |\n",
        met(added < 10.0),
    );

    md += "\n## 1. Blob throughput\n\n![throughput](throughput.png)\n\n";
    md += "One `GET` of the blob per measurement (warm: repeated up to 256 MiB, on one \
           connection); cold means the caching system was restarted with an empty cache just \
           before. `× hub` is against the hub (docker-registry, plain HTTP, direct) and \
           `× upstream` against the upstream (docker-registry, TLS, direct), same round.\n\n";
    md += "| blob | system | state | × hub | × upstream | MiB/s |\n|---|---|---|---|---|---|\n";
    for r in &suite.throughput {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            size_label(r.size),
            r.system,
            r.state.name(),
            fmt_spread(&r.vs_hub, 2),
            fmt_spread(&r.vs_upstream, 2),
            fmt_spread(&r.mib_s_spread, 0),
        );
    }

    md += "\n### Manifest HEAD latency\n\n![latency](latency.png)\n\n";
    md += &format!(
        "{} sequential `HEAD`s of a tag on one kept-alive connection per round (after 20 \
         untimed). The hub (and so pullproxy's hub lookup) checks a bcrypt htpasswd on every \
         request, as a sealos hub does.\n\n",
        suite.settings.head_requests
    );
    md += "| system | request | p50 ms | p99 ms | p50 × hub | p99 × hub | added p99 ms |\n\
           |---|---|---|---|---|---|---|\n";
    for r in &suite.head_latency {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.system,
            r.what,
            fmt_spread(&r.p50_ms, 2),
            fmt_spread(&r.p99_ms, 2),
            fmt_spread(&r.p50_vs_hub, 2),
            fmt_spread(&r.p99_vs_hub, 2),
            fmt_spread(&r.added_p99_ms, 2),
        );
    }

    md += "\n## 2. N clients pulling the same cold blob\n\n![concurrency](concurrency.png)\n\n";
    md += &format!(
        "{} clients connect (and finish their TLS handshakes), then all send `GET` of the {} blob \
         at once; the caching systems start with an empty cache. Upstream bytes are the blob \
         `GET` bytes in the upstream's access log over the blob's size; wall time is from the \
         common start to the last byte of the last client, against the hub serving the same N \
         clients.\n\n",
        suite
            .settings
            .clients
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        size_label(suite.settings.sizes.first().copied().unwrap_or(0)),
    );
    md += "| clients | system | upstream bytes / blob | wall s | wall × hub |\n|---|---|---|---|---|\n";
    for r in &suite.concurrency {
        md += &format!(
            "| {} | {} | {} | {} | {} |\n",
            r.clients,
            r.system,
            fmt_spread(&r.upstream_x, 1),
            fmt_spread(&r.wall_s, 3),
            fmt_spread(&r.wall_vs_hub, 2),
        );
    }

    md += "\n## 3. containerd pull via pullproxy vs a hosts.toml mirror\n\n";
    if let Some(c) = &report.containerd {
        md += &format!(
            "{} (`pp-pullbench` at {}, {} rounds; image of {} layers, {:.0} MiB of blobs, on the \
             hub). Each round starts a fresh containerd with an empty content store per \
             variant.\n\n",
            c.what,
            measured_at(&c.measured_at),
            c.rounds,
            c.image.layers,
            mib(c.image.blob_bytes as f64),
        );
        md += "| who fetches | pullproxy ÷ mirror | pullproxy s | mirror s |\n|---|---|---|---|\n";
        for (r, who) in [
            (&c.ctr, "`ctr images pull`"),
            (&c.cri, "CRI `PullImage` (daemon)"),
        ] {
            md += &format!(
                "| {who} | {} | {} | {} |\n",
                fmt_spread(&r.ratio_pullproxy_over_mirror, 2),
                fmt_spread(&r.pullproxy_s, 3),
                fmt_spread(&r.mirror_s, 3),
            );
        }
    } else {
        md += &format!("Not measured: {}.\n", suite.containerd.why);
    }

    md += &cluster_section(report.cluster.as_ref());

    md += "\n## 5. The kernel hook's connect cost (`pp-hookbench`)\n\n";
    md += &format!(
        "Measured at {}. {} connections per round, {} rounds, each in {} blocks measured once \
         with the programs attached and once detached, back to back; ratios are over those block \
         pairs.\n\n",
        measured_at(&hook.measured_at),
        hook.connections_per_round,
        hook.rounds,
        hook.blocks_per_round
    );
    md += "| what | baseline connections/s | rate with the programs: median (min–max) | middle half of the pairs | in-kernel ns per connection (BPF stats) | implied slowdown |\n|---|---|---|---|---|---|\n";
    for h in [&hook.non_matching_port, &hook.registry_port_not_target] {
        let k = &h.from_kernel_stats;
        md += &format!(
            "| {} | {} | × {} | {:.3}–{:.3} | {:.0} | {:.4} |\n",
            h.what,
            fmt_spread(&h.baseline_rate_per_s.spread(), 0),
            fmt_spread(&h.ratio_with_programs.spread(), 3),
            h.ratio_with_programs.p25,
            h.ratio_with_programs.p75,
            k.in_kernel_ns_per_connection,
            k.implied_slowdown,
        );
    }
    let r = &hook.redirected_connect;
    md += &format!(
        "\n{}: direct p50 {:.1} µs, p99 {:.1} µs; redirected p50 {:.1} µs, p99 {:.1} µs \
         (+{:.1} µs at p50).\n",
        r.what,
        r.direct_us.p50,
        r.direct_us.p99,
        r.redirected_us.p50,
        r.redirected_us.p99,
        r.added_us_p50,
    );

    md += "\n## 6. pullproxy's memory\n\n![memory](memory.png)\n\n";
    md += "`VmRSS` / `VmHWM` from `/proc/<pid>/status`; peaks are reset (`clear_refs`) before each \
           measured pull. The peers' peaks under the same concurrent load are given for \
           comparison (nginx: master and workers added up).\n\n";
    md += "| state | MiB |\n|---|---|\n";
    for (label, bytes) in memory_rows(&suite.memory) {
        md += &format!("| {label} | {:.1} |\n", mib(bytes));
    }
    if let Some(fc) = &suite.memory.full_cache {
        md += &format!(
            "\nFull cache: `cache.max_size` {}, {} blobs ({:.0} MiB) on disk after the fill.\n",
            fc.max_size,
            fc.files,
            mib(fc.bytes_on_disk as f64),
        );
    }
    md += &fastpath(&report.fastpath_runs);
    md
}

/// Section 7, one table per fast path run (this machine's, and guests').
fn fastpath(runs: &[FastpathRun]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut md = String::from("\n## 7. The TLS fast path\n\n");
    md += "Warm `GET`s of one blob (repeated up to 256 MiB per measurement, on one connection, \
           after one untimed) by the load generator and by curl (OpenSSL, `--http1.1`), through \
           pullproxy with its TLS in user space and, where the kernel has `tls`, in the kernel \
           (pullproxy restarted between the two, its cache kept). `× hub` is against the hub \
           (plain HTTP) with the same client in the same round; CPU is pullproxy's user plus \
           system seconds per GiB it served, and the client's per GiB it received (with curl it \
           is the process; the load generator runs as one too); `kernel ÷ user` compares kernel TLS with user-space \
           TLS, same client, same round.\n";
    for FastpathRun { file, run, figure } in runs {
        let m = &run.machine;
        let (before, after) = loads(m);
        md += &format!(
            "\n### `{file}`: kernel {}, {} CPUs, load average {before} before and {after} after, {} rounds, {}\n\n{}.\n\n",
            m.kernel,
            m.cpus,
            run.settings.rounds,
            measured_at(&run.measured_at),
            figure.kernel_tls,
        );
        md += "| blob | system | client | TLS | × hub | MiB/s | pullproxy CPU s/GiB | client CPU s/GiB | kernel ÷ user: MiB/s | kernel ÷ user: CPU s/GiB |\n\
               |---|---|---|---|---|---|---|---|---|---|\n";
        let opt = |v: &Option<Spread>, digits| match v {
            Some(v) => fmt_spread(v, digits),
            None => "–".to_owned(),
        };
        for r in &figure.rows {
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                size_label(r.size),
                r.system,
                r.client.name(),
                r.tls.name(),
                fmt_spread(&r.vs_hub, 2),
                fmt_spread(&r.mib_s_spread, 0),
                opt(&r.cpu_s_per_gib, 3),
                opt(&r.client_cpu_s_per_gib, 3),
                opt(&r.vs_user, 2),
                opt(&r.cpu_vs_user, 2),
            );
        }
    }
    md
}

/// Section 4, from `pp-clusterbench`: a cluster pulling one image, pullproxy vs a mirror.
fn cluster_section(c: Option<&ClusterResults>) -> String {
    let mut md =
        "\n## 4. A cluster pulling one image: pullproxy vs a registry mirror\n\n".to_owned();
    let Some(c) = c else {
        md += "Not measured (`pp-clusterbench`; `cargo xtask bench --only cluster`).\n";
        return md;
    };
    let layers: Vec<String> = c
        .image
        .layers
        .iter()
        .map(|l| format!("{:.0}", mib(*l as f64)))
        .collect();
    let settle_wait = |system: System| {
        c.results
            .iter()
            .find(|r| r.system == system && r.pattern == Pattern::Staggered)
            .map_or_else(
                || "not measured".to_owned(),
                |r| fmt_spread(&r.settle_wait_s, 1),
            )
    };
    md += "![cluster](cluster.png)\n\n";
    md += &format!(
        "`pp-clusterbench` at {}, {} rounds: {} nodes (each its own network namespace, cgroups \
         and unmodified containerd 1.6) on one bridge with a shared hub and a fake Docker Hub \
         pull the same public image, {} MiB of blobs in {} layers ({} MiB), with CRI \
         `PullImage` (the kubelet's path). **pullproxy**: pullproxy on every node with the \
         shared hub and write-back (the default). **mirror**: pullproxy stopped, containerd \
         with a `hosts.toml` mirror for docker.io pointing at docker-registry in pull-through \
         proxy mode (distribution's proxy) beside the hub. Every measurement starts empty: \
         caches, hub, the mirror's storage, containerd's content store. **Staggered**: node 1, \
         then 2, 3, ..., each pull after the one before finished; node 2 starts only once what \
         node 1 pulled settled into the shared store, as in a rollout whose pulls are minutes \
         apart (pullproxy's write-back into the hub: {} s; the mirror's storage: {} s; these \
         waits are not in the total). **Simultaneous**: all nodes at \
         once. Internet bytes are the blob `GET` bytes in the fake Docker Hub's access log \
         over the image's blob bytes; served bytes those the hub (pullproxy) or the mirror \
         served the nodes. Total time is from the first pull's start to the last pull's end. \
         Load average (1 min) during the run: {} (cluster up in {:.1} s, the whole benchmark \
         {:.0} s).\n\n",
        measured_at(&c.measured_at),
        c.rounds,
        c.nodes,
        mib(c.image.blob_bytes as f64).round(),
        layers.len(),
        layers.join(" + "),
        settle_wait(System::Pullproxy),
        settle_wait(System::Mirror),
        c.machine
            .load_1m_during
            .as_ref()
            .map_or_else(|| "not recorded".to_owned(), |l| fmt_spread(l, 1)),
        c.bring_up_s,
        c.elapsed_s,
    );
    md += "| system | pattern | internet bytes (× image) | internet MiB | served by hub / mirror (× image) | total s | per node s (median) |\n\
           |---|---|---|---|---|---|---|\n";
    for r in &c.results {
        let (lo, med, hi) = spread(&r.upstream_bytes);
        let nodes: Vec<String> = r
            .node_s
            .iter()
            .map(|n| format!("{:.1}", n.median))
            .collect();
        md += &format!(
            "| {} | {} | {} | {:.0} ({:.0}–{:.0}) | {} | {} | {} |\n",
            r.system.name(),
            r.pattern.name(),
            fmt_spread(&r.upstream_x, 2),
            mib(med),
            mib(lo),
            mib(hi),
            fmt_spread(&r.served_x, 2),
            fmt_spread(&r.total_s, 1),
            nodes.join(", "),
        );
    }
    md
}

/// (label, bytes) for the memory table and plot: medians of peaks over rounds.
fn memory_rows(m: &MemoryReport) -> Vec<(String, f64)> {
    let median = |v: &[u64]| {
        let mut xs: Vec<f64> = v.iter().map(|&b| b as f64).collect();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut rows = vec![(
        "pullproxy idle, just started".to_owned(),
        m.idle_start_rss as f64,
    )];
    for (map, what) in [(&m.cold_peak, "cold pull"), (&m.warm_peak, "cache hits")] {
        let mut entries: Vec<_> = map.iter().collect();
        entries.sort_by_key(|(k, _)| size_order(k));
        for (size, v) in entries {
            rows.push((format!("pullproxy peak, {what} of {size}"), median(v)));
        }
    }
    for (system, v) in &m.concurrent_peak {
        rows.push((
            format!(
                "{system} peak, {} concurrent cold pulls",
                m.concurrent_clients
            ),
            median(v),
        ));
    }
    if let Some(fc) = &m.full_cache {
        rows.push((
            "pullproxy peak while filling the cache past its limit".into(),
            fc.peak as f64,
        ));
        rows.push((
            "pullproxy with a full cache, idle".into(),
            fc.rss_after as f64,
        ));
        rows.push((
            "pullproxy restarted over a full cache, idle".into(),
            fc.rss_restarted as f64,
        ));
    }
    rows.push((
        "pullproxy idle after the run (restarted)".into(),
        m.idle_end_rss as f64,
    ));
    rows
}

/// `16 MiB` < `256 MiB` < `1 GiB`.
fn size_order(label: &str) -> u64 {
    let n: u64 = label
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if label.ends_with("GiB") {
        n << 30
    } else {
        n << 20
    }
}

/// One bar: a median with a min–max whisker.
struct Bar {
    group: usize,
    series: usize,
    value: (f64, f64, f64),
}

/// Colours for up to ten series.
const COLOURS: [RGBColor; 10] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x81, 0x72, 0xb2),
    RGBColor(0xcc, 0xb9, 0x74),
    RGBColor(0x64, 0xb5, 0xcd),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x8c, 0x8c, 0x8c),
    RGBColor(0xda, 0x8b, 0xc3),
    RGBColor(0x93, 0x78, 0x60),
];

/// The label of the group at `x` (groups sit at 0, 1, 2, …; nothing in between).
fn group_label(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 {
        labels.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

type BarChart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A bar chart's frame on `root`: the caption, a y axis from 0 to `top` and one x label per
/// group.
fn bar_frame<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    y_desc: &str,
    groups: &[String],
    top: f64,
) -> anyhow::Result<BarChart<'a, 'b>> {
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| group_label(groups, *x))
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    Ok(chart)
}

/// Draws the chart's legend at `position`.
fn legend<'a, 'b: 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, CT>,
    position: SeriesLabelPosition,
    font_size: u32,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", font_size))
        .draw()?;
    Ok(())
}

/// A legend entry's coloured square.
fn swatch(colour: RGBColor) -> impl Fn((i32, i32)) -> Rectangle<(i32, i32)> {
    move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], colour.filled())
}

/// Grouped bars with whiskers in a PNG of `size`; `lines` are horizontal reference lines
/// (value, label).
#[expect(
    clippy::too_many_arguments,
    reason = "one plot's description, each argument a different part of it"
)]
fn bars(
    path: &Path,
    size: (u32, u32),
    title: &str,
    y_desc: &str,
    groups: &[String],
    series: &[String],
    data: &[Bar],
    lines: &[(f64, &str)],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    bars_on(&root, title, y_desc, groups, series, data, lines)?;
    root.present()?;
    Ok(())
}

/// [`bars`] drawn on `root` (a whole picture or a panel of one).
fn bars_on(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    y_desc: &str,
    groups: &[String],
    series: &[String],
    data: &[Bar],
    lines: &[(f64, &str)],
) -> anyhow::Result<()> {
    let top = data
        .iter()
        .map(|b| b.value.2)
        .chain(lines.iter().map(|l| l.0))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        // Room above the bars for the legend.
        * (1.2 + 0.04 * series.len() as f64);
    let n = groups.len() as f64;
    let mut chart = bar_frame(root, title, y_desc, groups, top.max(1e-9))?;
    let width = 0.8 / series.len() as f64;
    for (si, name) in series.iter().enumerate() {
        let colour = COLOURS[si % COLOURS.len()];
        let mine: Vec<&Bar> = data.iter().filter(|b| b.series == si).collect();
        let x0 = |b: &Bar| b.group as f64 - 0.4 + width * si as f64;
        chart
            .draw_series(mine.iter().map(|b| {
                Rectangle::new(
                    [(x0(b), 0.0), (x0(b) + width * 0.9, b.value.1)],
                    colour.filled(),
                )
            }))?
            .label(name.as_str())
            .legend(swatch(colour));
        chart.draw_series(mine.iter().map(|b| {
            let mid = x0(b) + width * 0.45;
            PathElement::new(
                vec![(mid, b.value.0), (mid, b.value.2)],
                BLACK.stroke_width(1),
            )
        }))?;
    }
    for (i, (y, label)) in lines.iter().enumerate() {
        let style = if i == 0 {
            BLACK.stroke_width(1)
        } else {
            RED.stroke_width(1)
        };
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(-0.5, *y), (n - 0.5, *y)],
            style,
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            label.to_string(),
            (-0.48, *y),
            ("sans-serif", 13).into_font().color(&style.color),
        )))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight, 13)?;
    Ok(())
}

fn plot_throughput(path: &Path, suite: &BenchResults) -> anyhow::Result<()> {
    let rows = &suite.throughput;
    let mut groups: Vec<u64> = rows.iter().map(|r| r.size).collect();
    groups.dedup();
    let mut series: Vec<String> = Vec::new();
    let mut data = Vec::new();
    for r in rows {
        let name = format!("{} ({})", r.system, r.state.name());
        let si = series.iter().position(|x| *x == name).unwrap_or_else(|| {
            series.push(name.clone());
            series.len() - 1
        });
        let gi = groups.iter().position(|g| *g == r.size).unwrap_or(0);
        data.push(Bar {
            group: gi,
            series: si,
            value: spread(&r.vs_hub),
        });
    }
    let groups: Vec<String> = groups.into_iter().map(size_label).collect();
    bars(
        path,
        (1400, 640),
        "Blob throughput vs the hub (direct, plain HTTP), same round",
        "× hub throughput (median, min–max)",
        &groups,
        &series,
        &data,
        &[(1.0, "hub = 1"), (0.8, "target 0.8 (cache hit)")],
    )
}

/// Figure 4: internet bytes and total pull time, grouped by pattern, a bar per system.
fn plot_cluster(path: &Path, c: &ClusterResults) -> anyhow::Result<()> {
    let rows = &c.results;
    let mut patterns: Vec<String> = Vec::new();
    let mut systems: Vec<String> = Vec::new();
    for r in rows {
        for (list, name) in [
            (&mut patterns, r.pattern.name()),
            (&mut systems, r.system.name()),
        ] {
            if !list.iter().any(|n| n == name) {
                list.push(name.to_owned());
            }
        }
    }
    // Staggered first, as pulls happen in a rollout.
    patterns.sort_by_key(|p| p != Pattern::Staggered.name());
    let bars_of = |value: fn(&pullproxy_bench::ClusterRow) -> &Spread| -> Vec<Bar> {
        rows.iter()
            .map(|r| Bar {
                group: patterns
                    .iter()
                    .position(|p| p == r.pattern.name())
                    .unwrap_or(0),
                series: systems
                    .iter()
                    .position(|x| x == r.system.name())
                    .unwrap_or(0),
                value: spread(value(r)),
            })
            .collect()
    };
    let nodes = c.nodes;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let every_node = format!("{nodes} copies: one per node");
    bars_on(
        &left,
        &format!("Internet bytes / image, {nodes} nodes"),
        "× image blob bytes (median, min–max)",
        &patterns,
        &systems,
        &bars_of(|r| &r.upstream_x),
        &[(1.0, "1 copy per cluster"), (nodes as f64, &every_node)],
    )?;
    bars_on(
        &right,
        &format!("Total pull time, {nodes} nodes"),
        "s, first start to last end (median, min–max)",
        &patterns,
        &systems,
        &bars_of(|r| &r.total_s),
        &[],
    )?;
    root.present()?;
    Ok(())
}

fn plot_latency(path: &Path, suite: &BenchResults) -> anyhow::Result<()> {
    let rows = &suite.head_latency;
    let groups: Vec<String> = rows.iter().map(|r| r.system.clone()).collect();
    let mut data = Vec::new();
    for (gi, r) in rows.iter().enumerate() {
        data.push(Bar {
            group: gi,
            series: 0,
            value: spread(&r.p50_ms),
        });
        data.push(Bar {
            group: gi,
            series: 1,
            value: spread(&r.p99_ms),
        });
    }
    bars(
        path,
        (1400, 560),
        "Manifest HEAD latency (one kept-alive connection)",
        "ms (median over rounds, min–max)",
        &groups,
        &["p50".to_owned(), "p99".to_owned()],
        &data,
        &[],
    )
}

fn plot_memory(path: &Path, suite: &BenchResults) -> anyhow::Result<()> {
    let rows = memory_rows(&suite.memory);
    let groups: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, _)| format!("{}", i + 1))
        .collect();
    let series: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, (label, _))| format!("{}: {label}", i + 1))
        .collect();
    let data: Vec<Bar> = rows
        .iter()
        .enumerate()
        .map(|(i, (_, b))| Bar {
            group: i,
            series: i,
            value: (mib(*b), mib(*b), mib(*b)),
        })
        .collect();
    // One series per bar, so the legend names each; bars are drawn full width.
    bars_single(path, &groups, &series, &data)
}

/// A bar per group, each its own legend entry (the memory plot).
fn bars_single(
    path: &Path,
    groups: &[String],
    series: &[String],
    data: &[Bar],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1400, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = data.iter().map(|b| b.value.1).fold(64.0, f64::max) * 1.15;
    let n = groups.len() as f64;
    let mut chart = bar_frame(&root, "Resident memory (MiB)", "MiB", groups, top)?;
    for b in data {
        let colour = COLOURS[b.series % COLOURS.len()];
        let x = b.group as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x - 0.35, 0.0), (x + 0.35, b.value.1)],
                colour.filled(),
            )))?
            .label(series[b.series].as_str())
            .legend(swatch(colour));
    }
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(-0.5, 64.0), (n - 0.5, 64.0)],
        RED.stroke_width(1),
    )))?;
    legend(&mut chart, SeriesLabelPosition::UpperRight, 12)?;
    root.present()?;
    Ok(())
}

fn plot_concurrency(path: &Path, suite: &BenchResults) -> anyhow::Result<()> {
    let rows = &suite.concurrency;
    let mut ns: Vec<usize> = rows.iter().map(|r| r.clients).collect();
    ns.dedup();
    let mut systems: Vec<String> = Vec::new();
    for r in rows {
        if !systems.contains(&r.system) {
            systems.push(r.system.clone());
        }
    }
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let n = ns.len() as f64;
    let labels: Vec<String> = ns.iter().map(|n| n.to_string()).collect();
    let x_fmt = |x: &f64| group_label(&labels, *x);
    let max_x = ns.iter().copied().max().unwrap_or(1) as f64;
    let mut up = ChartBuilder::on(&left)
        .caption("Upstream bytes / blob size", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3f64..n - 0.7, (0.5f64..(max_x + 2.0) * 1.5).log_scale())?;
    up.configure_mesh()
        .x_labels(ns.len() * 2 + 1)
        .x_label_formatter(&x_fmt)
        .x_desc("concurrent clients")
        .y_desc("× blob size (log)")
        .label_style(("sans-serif", 14))
        .draw()?;
    let wall_top = rows
        .iter()
        .map(|r| r.wall_vs_hub.max)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.15;
    let mut wall = ChartBuilder::on(&right)
        .caption(
            "Wall time vs the hub serving the same N",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3f64..n - 0.7, 0f64..wall_top)?;
    wall.configure_mesh()
        .x_labels(ns.len() * 2 + 1)
        .x_label_formatter(&x_fmt)
        .x_desc("concurrent clients")
        .y_desc("× hub wall time (median, min–max)")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (si, system) in systems.iter().enumerate() {
        let colour = COLOURS[si % COLOURS.len()];
        let points = |value: fn(&pullproxy_bench::ConcurrencyRow) -> &Spread| {
            ns.iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    rows.iter()
                        .find(|r| r.clients == *n && r.system == *system)
                        .map(|r| (i as f64, spread(value(r))))
                })
                .collect::<Vec<_>>()
        };
        let ups: Vec<(f64, f64)> = points(|r| &r.upstream_x)
            .into_iter()
            .filter(|(_, v)| v.1 > 0.0)
            .map(|(x, v)| (x, v.1))
            .collect();
        if !ups.is_empty() {
            up.draw_series(LineSeries::new(ups.clone(), colour.stroke_width(2)))?
                .label(system.as_str())
                .legend(swatch(colour));
            up.draw_series(ups.iter().map(|p| Circle::new(*p, 4, colour.filled())))?;
        }
        let walls = points(|r| &r.wall_vs_hub);
        wall.draw_series(LineSeries::new(
            walls.iter().map(|(x, v)| (*x, v.1)),
            colour.stroke_width(2),
        ))?
        .label(system.as_str())
        .legend(swatch(colour));
        wall.draw_series(
            walls
                .iter()
                .map(|(x, v)| PathElement::new(vec![(*x, v.0), (*x, v.2)], colour.stroke_width(1))),
        )?;
    }
    legend(&mut up, SeriesLabelPosition::UpperLeft, 13)?;
    legend(&mut wall, SeriesLabelPosition::UpperLeft, 13)?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_format_median_then_range() {
        let v = Spread {
            min: 0.8,
            median: 0.923,
            max: 1.0,
        };
        assert_eq!(fmt_spread(&v, 2), "0.92 (0.80–1.00)");
        assert_eq!(size_order("1 GiB"), 1 << 30);
        assert!(size_order("256 MiB") < size_order("1 GiB"));
        assert_eq!(size_label(16 << 20), "16 MiB");
    }
}
