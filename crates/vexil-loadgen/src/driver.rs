//! Driving load: a fixed number of workers in a closed loop, or a fixed arrival rate (open loop,
//! latency measured from each request's intended start so queueing is not hidden), with a warm-up
//! that is not recorded.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::workload::{Client, Req};

/// How hard and how long.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LoadSpec {
    pub concurrency: usize,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
    /// Requests per second in total (open loop); `None`: as fast as the workers go.
    pub rate: Option<f64>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What a run measured (after the warm-up).
#[derive(Debug, Clone)]
pub struct Measured {
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Latency in nanoseconds.
    pub latency: Histogram<u64>,
}

impl Measured {
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

struct Worker {
    requests: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

/// One worker's arrivals: open loop, `interval` apart and offset so `workers` workers interleave
/// evenly (latency is then measured from the intended start: coordinated-omission-safe); closed
/// loop (now, every time) without an interval.
#[derive(Debug)]
pub struct Pacer {
    next: Option<Instant>,
    interval: Option<Duration>,
}

impl Pacer {
    pub fn new(start: Instant, interval: Option<Duration>, worker: usize, workers: usize) -> Pacer {
        let next = interval.map(|iv| start + iv.mul_f64(worker as f64 / workers.max(1) as f64));
        Pacer { next, interval }
    }

    /// Waits for the next arrival and returns its intended time.
    pub async fn next(&mut self) -> Instant {
        match (self.next, self.interval) {
            (Some(at), Some(iv)) => {
                tokio::time::sleep_until(at).await;
                self.next = Some(at + iv);
                at
            }
            _ => Instant::now(),
        }
    }
}

/// Runs `spec` with `requests` (used round-robin) against `client`. `measuring` is called once when
/// the warm-up ends (to sample CPU counters) and its result returned beside the measurement.
pub async fn drive<T: Send + 'static>(
    client: Arc<Client>,
    requests: Arc<Vec<Req>>,
    spec: LoadSpec,
    measuring: impl FnOnce() -> T + Send + 'static,
) -> (Measured, T) {
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let per_worker_interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.concurrency as f64 / r.max(1e-6)));
    let mut tasks = Vec::new();
    for w in 0..spec.concurrency {
        let (client, requests) = (client.clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            let mut me = Worker {
                requests: 0,
                errors: 0,
                first_error: None,
                latency: histogram(),
            };
            let mut i = w;
            let mut pacer = Pacer::new(start, per_worker_interval, w, spec.concurrency);
            loop {
                let intended = pacer.next().await;
                if intended >= end {
                    break;
                }
                let result = client.send(&requests[i % requests.len()]).await;
                i += spec.concurrency;
                let done = Instant::now();
                if intended >= measure_from {
                    me.requests += 1;
                    let _ = me
                        .latency
                        .record((done - intended).as_nanos().min(u128::from(u64::MAX)) as u64);
                    if let Err(e) = result {
                        me.errors += 1;
                        me.first_error.get_or_insert(e);
                    }
                }
            }
            me
        }));
    }
    tokio::time::sleep_until(measure_from).await;
    let sampled = measuring();
    let mut total = Measured {
        requests: 0,
        errors: 0,
        first_error: None,
        elapsed: spec.duration,
        latency: histogram(),
    };
    for t in tasks {
        let w = t.await.expect("worker task");
        total.requests += w.requests;
        total.errors += w.errors;
        if total.first_error.is_none() {
            total.first_error = w.first_error;
        }
        let _ = total.latency.add(&w.latency);
    }
    (total, sampled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_in_microseconds() {
        let mut h = histogram();
        for ns in [1_000u64, 2_000, 3_000, 4_000] {
            h.record(ns).unwrap();
        }
        let m = Measured {
            requests: 4,
            errors: 0,
            first_error: None,
            elapsed: Duration::from_secs(2),
            latency: h,
        };
        assert_eq!(m.throughput(), 2.0);
        assert!((m.quantile_us(0.5) - 2.0).abs() < 0.01);
        assert!((m.quantile_us(1.0) - 4.0).abs() < 0.01);
    }
}
