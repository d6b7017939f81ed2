//! The metrics recorder's memory stays bounded when nobody scrapes `/metrics`: the upkeep task
//! drains queued histogram samples on a timer. Deterministic: a paused clock drives the timer and
//! the heap is measured by dhat (live bytes), not by time or RSS.
//!
//! One test in this binary: dhat's profiler and the global recorder are process-wide.

use std::time::Duration;

use vexil_core::{Resolution, Selector};
use vexil_server::metrics;
use vexil_service::{Evaluation, Observer as _};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const ROUNDS: usize = 100;
const SAMPLES_PER_ROUND: usize = 10_000;

/// Records a round of latency samples, then lets the paused clock pass one upkeep interval.
async fn round() {
    let resolution = Resolution::not_found("flag");
    for i in 0..SAMPLES_PER_ROUND {
        metrics::Evaluations.evaluation(&Evaluation {
            protocol: "test",
            key: "flag",
            selector: &Selector::All,
            flag: None,
            resolution: &resolution,
            version: 0,
            took: Duration::from_nanos(500 + i as u64),
        });
    }
    tokio::time::sleep(metrics::UPKEEP_INTERVAL).await;
}

fn live_bytes() -> u64 {
    dhat::HeapStats::get().curr_bytes as u64
}

#[tokio::test(start_paused = true)]
async fn histogram_samples_are_drained_without_scrapes() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let handle = metrics::install().unwrap();
    let upkeep = metrics::spawn_upkeep(handle.clone());

    // Warm up: handles, buckets and the runtime's own allocations.
    for _ in 0..5 {
        round().await;
    }
    let before = live_bytes();
    for _ in 0..ROUNDS {
        round().await;
    }
    let with_upkeep = live_bytes().saturating_sub(before);
    let recorded = (ROUNDS * SAMPLES_PER_ROUND) as u64;
    assert!(
        with_upkeep < 64 * 1024,
        "{recorded} samples with the upkeep running grew the heap by {with_upkeep} bytes"
    );

    // The same load with the upkeep stopped: the samples pile up (this is what the test guards).
    upkeep.abort();
    let before = live_bytes();
    for _ in 0..ROUNDS {
        round().await;
    }
    let without_upkeep = live_bytes().saturating_sub(before);
    assert!(
        without_upkeep > recorded * 4,
        "without upkeep {recorded} samples should be queued (8 bytes each), grew only {without_upkeep} bytes"
    );

    // Every sample is counted, whether drained by the upkeep or by the scrape.
    let text = handle.render();
    let count_line = text
        .lines()
        .find(|l| l.starts_with("vexil_evaluation_duration_seconds_count{protocol=\"test\"}"))
        .unwrap_or_else(|| panic!("no count line in\n{text}"));
    let count: u64 = count_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(count, ((2 * ROUNDS + 5) * SAMPLES_PER_ROUND) as u64);
}
