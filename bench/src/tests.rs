//! The schema against its own output and against the results committed under `results/`.

use std::{collections::BTreeMap, path::Path};

use serde::de::DeserializeOwned;

use crate::*;

fn spread(median: f64) -> Spread {
    Spread {
        min: median - 0.5,
        median,
        max: median + 0.25,
    }
}

fn quartiles(median: f64) -> Quartiles {
    Quartiles {
        min: median - 1.0,
        p25: median - 0.5,
        median,
        p75: median + 0.5,
        max: median + 1.0,
    }
}

fn stamp() -> Option<MeasuredAt> {
    Some(MeasuredAt {
        commit: "abc1234-dirty".into(),
        date: "2026-11-30 15:00 UTC".into(),
    })
}

fn machine() -> Machine {
    Machine {
        cpus: 2,
        kernel: "6.18.0".into(),
        load_before: vec![1.5, 1.25, 1.0],
        load_after: vec![2.0, 1.5, 1.0],
        load_1m_during: None,
    }
}

/// `value` written and read back is `value`.
fn round_trip<T: Document + PartialEq + std::fmt::Debug>(value: &T) {
    let text = serde_json::to_string_pretty(value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{}'s document does not read back: {e}\n{text}",
            T::BENCHMARK
        )
    });
    assert_eq!(&back, value);
}

fn suite() -> BenchResults {
    BenchResults {
        settings: Settings {
            rounds: 3,
            concurrency_rounds: 2,
            sizes: vec![16 << 20, 256 << 20],
            clients: vec![1, 16],
            head_requests: 100,
            small_blobs: 32,
            quick: true,
            only: Some(vec!["throughput".into(), "fastpath".into()]),
        },
        machine: machine(),
        elapsed_s: 812.5,
        throughput: vec![ThroughputRow {
            size: 16 << 20,
            system: "pullproxy cache".into(),
            state: State::Warm,
            mib_s: vec![400.0, 420.5],
            mib_s_spread: spread(410.0),
            vs_hub: spread(0.9),
            vs_upstream: spread(1.5),
        }],
        head_latency: vec![LatencyRow {
            system: "pullproxy hub hit".into(),
            what: "tag on the hub".into(),
            p50_ms: spread(1.5),
            p99_ms: spread(3.0),
            p50_vs_hub: spread(1.25),
            p99_vs_hub: spread(1.125),
            added_p99_ms: spread(0.5),
        }],
        concurrency: vec![ConcurrencyRow {
            clients: 16,
            system: "pullproxy".into(),
            upstream_x: spread(1.0),
            wall_s: spread(2.5),
            wall_vs_hub: spread(1.75),
        }],
        memory: MemoryReport {
            idle_start_rss: 12 << 20,
            cold_peak: BTreeMap::from([("16 MiB".into(), vec![20 << 20, 21 << 20])]),
            warm_peak: BTreeMap::from([("16 MiB".into(), vec![18 << 20])]),
            concurrent_peak: BTreeMap::from([("nginx proxy_cache".into(), vec![30 << 20])]),
            concurrent_clients: 16,
            full_cache: Some(FullCache {
                max_size: "320MiB".into(),
                files: 3,
                bytes_on_disk: 300 << 20,
                peak: 40 << 20,
                rss_after: 25 << 20,
                rss_restarted: 14 << 20,
            }),
            idle_end_rss: 13 << 20,
        },
        fastpath: Some(Fastpath {
            kernel_tls: "kernel TLS in use".into(),
            rows: vec![FastpathRow {
                size: 256 << 20,
                system: "pullproxy cache".into(),
                tls: Tls::Kernel,
                client: Client::Curl,
                mib_s: vec![900.0],
                mib_s_spread: spread(900.0),
                vs_hub: spread(0.875),
                cpu_s_per_gib: Some(spread(0.75)),
                client_cpu_s_per_gib: Some(spread(0.7)),
                vs_user: Some(spread(1.25)),
                cpu_vs_user: None,
            }],
        }),
        containerd: NotMeasured {
            measured: false,
            why: "pp-pullbench measures it".into(),
        },
        targets: vec![Target {
            name: "16 MiB cache hit vs direct plain-HTTP hub".into(),
            goal: ">= 0.8x".into(),
            value: spread(0.9),
            met: true,
        }],
        measured_at: stamp(),
    }
}

#[test]
fn every_document_round_trips() {
    let mut s = suite();
    round_trip(&s);
    // As the binary prints it: no stamp yet, figures left out.
    s.measured_at = None;
    s.fastpath = None;
    s.memory.full_cache = None;
    s.settings.only = None;
    round_trip(&s);

    let rate = |what: &str| HookRate {
        what: what.into(),
        baseline_rate_per_s: quartiles(9000.0),
        ratio_with_programs: quartiles(0.875),
        from_kernel_stats: ImpliedSlowdown {
            in_kernel_ns_per_connection: 120.0,
            baseline_ns_per_connection: 110_000.0,
            implied_slowdown: 0.0009765625,
        },
    };
    let programs = BTreeMap::from([(
        "pp_connect4".to_owned(),
        ProgramCost {
            ns_per_run: 60.0,
            runs_per_connection: 1.0,
        },
    )]);
    round_trip(&HookResults {
        connections_per_round: 20_000,
        rounds: 7,
        blocks_per_round: 10,
        non_matching_port: rate("a port no registry uses"),
        registry_port_not_target: rate("a registry port"),
        kernel_program_cost: KernelProgramCost {
            what: "in-kernel time per run".into(),
            phases: KernelPhases {
                non_matching_port: programs.clone(),
                registry_port_not_target: programs.clone(),
                redirected: BTreeMap::new(),
            },
        },
        redirected_connect: RedirectedConnect {
            what: "connect() latency".into(),
            direct_us: LatencyPercentiles {
                p50: 20.0,
                p99: 50.0,
            },
            redirected_us: LatencyPercentiles {
                p50: 22.5,
                p99: 55.0,
            },
            added_us_p50: 2.5,
        },
        measured_at: stamp(),
    });

    let comparison = PullComparison {
        pullproxy_s: spread(0.75),
        mirror_s: spread(0.7),
        ratio_pullproxy_over_mirror: spread(1.0625),
        first_round_ratio: 1.125,
        samples: PullSamples {
            pullproxy_s: vec![0.75, 0.8],
            mirror_s: vec![0.7, 0.75],
        },
    };
    round_trip(&ContainerdResults {
        what: "cold pull wall time".into(),
        image: ContainerdImage {
            digest: "sha256:00".into(),
            layers: 5,
            blob_bytes: 40 << 20,
        },
        rounds: 2,
        ctr: comparison.clone(),
        cri: comparison,
        measured_at: None,
    });

    let sample = ClusterSample {
        round: 0,
        position: 1,
        upstream_bytes: 100 << 20,
        upstream_x: 1.0,
        upstream_requests: 4,
        served_x: 3.0,
        total_s: 10.5,
        wall_s: 15.25,
        settle_wait_s: 4.75,
        node_start_s: vec![0.0, 7.5],
        node_s: vec![2.5, 1.75],
        sources: vec![BTreeMap::from([("upstream".into(), 4)])],
        writeback: "pullproxy_writebacks_total{outcome=\"pushed\"} 1".into(),
        load_1m: 3.5,
    };
    round_trip(&ClusterResults {
        what: "N nodes pull the same public image".into(),
        nodes: 2,
        rounds: 1,
        quick: true,
        pull: "CRI PullImage".into(),
        staggered: "one after the other".into(),
        simultaneous: "all at once".into(),
        image: ClusterImage {
            digest: "sha256:11".into(),
            layers: vec![16 << 20, 16 << 20],
            blob_bytes: 32 << 20,
        },
        bring_up_s: 12.5,
        machine: Machine {
            load_1m_during: Some(spread(3.5)),
            ..machine()
        },
        elapsed_s: 300.0,
        results: vec![ClusterRow {
            system: System::Mirror,
            pattern: Pattern::Staggered,
            upstream_x: spread(1.0),
            upstream_bytes: spread(100.0 * 1024.0 * 1024.0),
            served_x: spread(2.0),
            total_s: spread(10.5),
            wall_s: spread(15.25),
            settle_wait_s: spread(4.75),
            node_s: vec![spread(2.5), spread(1.75)],
            samples: vec![sample],
        }],
        measured_at: stamp(),
    });
}

/// The enums are written as the lowercase words the report and older results use.
#[test]
fn enums_are_lowercase_words() {
    let json = |v: &dyn erased::Json| v.json();
    assert_eq!(json(&State::Cold), r#""cold""#);
    assert_eq!(json(&Tls::None), r#""none""#);
    assert_eq!(json(&Client::Loadgen), r#""loadgen""#);
    assert_eq!(json(&System::Pullproxy), r#""pullproxy""#);
    assert_eq!(json(&Pattern::Simultaneous), r#""simultaneous""#);
    for (word, name) in [
        (json(&State::Warm), State::Warm.name()),
        (json(&Tls::Kernel), Tls::Kernel.name()),
        (json(&Client::Curl), Client::Curl.name()),
        (json(&System::Mirror), System::Mirror.name()),
        (json(&Pattern::Staggered), Pattern::Staggered.name()),
    ] {
        assert_eq!(word, format!("\"{name}\""));
    }
}

mod erased {
    //! `serde_json::to_string` behind a trait object, for a list of differently typed values.

    pub trait Json {
        fn json(&self) -> String;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap()
        }
    }
}

/// A renamed, missing or extra field is an error naming the field, not a silent default.
#[test]
fn unknown_and_missing_fields_are_errors() {
    let text = serde_json::to_string(&suite()).unwrap();
    let renamed = text.replace("\"vs_hub\"", "\"vs_the_hub\"");
    let err = serde_json::from_str::<BenchResults>(&renamed)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vs_the_hub"), "{err}");
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["machine"]
        .as_object_mut()
        .unwrap()
        .remove("kernel")
        .unwrap();
    let err = serde_json::from_value::<BenchResults>(value)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing field `kernel`"), "{err}");
    // A quantity of the wrong type (a string for seconds) is no number.
    let err = serde_json::from_str::<BenchResults>(&text.replace("812.5", "\"812.5\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid type"), "{err}");
}

fn parses<T: DeserializeOwned>(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    if let Err(e) = serde_json::from_str::<T>(&text) {
        panic!("{}: {e}", path.display());
    }
}

/// Every result committed under `results/` (the record of past runs) reads as its document type,
/// and every JSON file there has one.
#[test]
fn committed_results_parse() {
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("../results");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&results).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if !name.ends_with(".json") {
            continue;
        }
        match name.as_str() {
            "bench.json" => parses::<BenchResults>(&path),
            "hook.json" => parses::<HookResults>(&path),
            "containerd.json" => parses::<ContainerdResults>(&path),
            "cluster.json" => parses::<ClusterResults>(&path),
            n if n.starts_with("fastpath") => parses::<BenchResults>(&path),
            n => panic!("results/{n}: no document type reads it"),
        }
        seen.push(name);
    }
    seen.sort();
    for expected in [
        "bench.json",
        "cluster.json",
        "containerd.json",
        "fastpath.json",
        "hook.json",
    ] {
        assert!(
            seen.iter().any(|n| n == expected),
            "results/{expected} is missing"
        );
    }
}
