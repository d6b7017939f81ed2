//! Evaluation speed of `vexil-core`, beside the same logic written as plain Rust (the "native"
//! limit), so the engine/native ratio is visible. Run: `cargo bench -p vexil-core --bench evaluation`.
//!
//! Each engine case evaluates one flag of a compiled snapshot for a 5-attribute context through the
//! public API (`Snapshot::evaluate`: lookup, targeting, variant selection, type check). Each native
//! case reads the same context (`serde_json::Map`) and returns the same variant value.
//! Allocations per evaluation are counted and printed before the timings.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Map, Value, json};
use vexil_core::parse::{self, Strictness};
use vexil_core::{Context, Engine, FractionalMode, Selector, Snapshot, SourceConfig, ValueType};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator; only counts calls.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn flags() -> Value {
    let ten_rules: Vec<Value> = (0..10)
        .flat_map(|i| {
            vec![
                json!({"==": [{"var": format!("attr{i}")}, format!("value-{i}")]}),
                json!(format!("v{i}")),
            ]
        })
        .chain(std::iter::once(json!("off")))
        .collect();
    let mut ten_variants = Map::new();
    for i in 0..10 {
        ten_variants.insert(format!("v{i}"), json!(i));
    }
    ten_variants.insert("off".into(), json!(-1));
    json!({
        "static": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"},
        "targeting": {
            "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
            "targeting": {"if": [
                {"in": ["@example.com", {"var": "email"}]}, "on",
                {"==": [{"var": "plan"}, "pro"]}, "on",
                "off"
            ]}
        },
        "fractional": {
            "state": "ENABLED", "variants": {"a": "a", "b": "b", "c": "c"}, "defaultVariant": "a",
            "targeting": {"fractional": [["a", 25], ["b", 25], ["c", 50]]}
        },
        "sem_ver": {
            "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
            "targeting": {"if": [{"sem_ver": [{"var": "version"}, ">=", "2.1.0"]}, "on", "off"]}
        },
        "ten_rules": {"state": "ENABLED", "variants": ten_variants, "defaultVariant": "off", "targeting": {"if": ten_rules}}
    })
}

fn snapshot(mode: FractionalMode) -> Snapshot {
    let config = parse::parse_value(&json!({ "flags": flags() }), Strictness::Strict)
        .unwrap()
        .config;
    Snapshot::build(
        Arc::new(Engine::new(mode)),
        vec![SourceConfig {
            name: "bench".into(),
            config,
        }],
    )
    .0
}

fn context() -> Map<String, Value> {
    json!({
        "targetingKey": "user-4711",
        "email": "ann@example.org",
        "plan": "pro",
        "version": "2.4.1",
        "attr9": "value-9"
    })
    .as_object()
    .unwrap()
    .clone()
}

/// The same decisions as the flags above, in plain Rust over the same context.
mod native {
    use super::*;

    pub fn targeting<'v>(ctx: &Map<String, Value>, on: &'v Value, off: &'v Value) -> &'v Value {
        let email = ctx.get("email").and_then(Value::as_str).unwrap_or("");
        if email.contains("@example.com") || ctx.get("plan").and_then(Value::as_str) == Some("pro") {
            on
        } else {
            off
        }
    }

    pub fn fractional<'v>(ctx: &Map<String, Value>, flag_key: &str, variants: &'v [Value; 3]) -> &'v Value {
        let key = ctx.get("targetingKey").and_then(Value::as_str).unwrap_or("");
        // Deterministic CBOR of [flagKey, targetingKey] (both short text strings), then v2 bucketing.
        let mut buf = Vec::with_capacity(2 + flag_key.len() + key.len() + 8);
        buf.push(0x82);
        for s in [flag_key, key] {
            if s.len() < 24 {
                buf.push(0x60 | s.len() as u8);
            } else {
                buf.extend_from_slice(&[0x78, s.len() as u8]);
            }
            buf.extend_from_slice(s.as_bytes());
        }
        let hash = murmur3::murmur3_32(&mut std::io::Cursor::new(&buf), 0).unwrap();
        let point = (u64::from(hash) * 100) >> 32;
        match point {
            0..25 => &variants[0],
            25..50 => &variants[1],
            _ => &variants[2],
        }
    }

    pub fn sem_ver<'v>(ctx: &Map<String, Value>, min: &semver::Version, on: &'v Value, off: &'v Value) -> &'v Value {
        let version = ctx
            .get("version")
            .and_then(Value::as_str)
            .and_then(|v| semver::Version::parse(v).ok());
        match version {
            Some(v) if v.cmp_precedence(min).is_ge() => on,
            _ => off,
        }
    }

    pub fn ten_rules<'v>(
        ctx: &Map<String, Value>,
        names: &[String; 10],
        expected: &[String; 10],
        values: &'v [Value; 11],
    ) -> &'v Value {
        for i in 0..10 {
            if ctx.get(&names[i]).and_then(Value::as_str) == Some(expected[i].as_str()) {
                return &values[i];
            }
        }
        &values[10]
    }
}

fn allocations_per_evaluation(snap: &Snapshot, key: &str, attrs: &Map<String, Value>) -> f64 {
    const N: usize = 1_000;
    let ctx = Context {
        attributes: attrs,
        now: 1_700_000_000,
    };
    black_box(snap.evaluate(key, &Selector::All, ctx, ValueType::Any));
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..N {
        black_box(snap.evaluate(key, &Selector::All, ctx, ValueType::Any));
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64
}

fn bench(c: &mut Criterion) {
    let snap = snapshot(FractionalMode::V3);
    let snap_v2 = snapshot(FractionalMode::V2);
    let attrs = context();
    let ctx = Context {
        attributes: &attrs,
        now: 1_700_000_000,
    };

    for key in ["static", "targeting", "fractional", "sem_ver", "ten_rules"] {
        println!(
            "allocations per evaluation, {key}: {}",
            allocations_per_evaluation(&snap, key, &attrs)
        );
    }

    let (on, off) = (json!(true), json!(false));
    let abc = [json!("a"), json!("b"), json!("c")];
    let min = semver::Version::parse("2.1.0").unwrap();
    let names: [String; 10] = std::array::from_fn(|i| format!("attr{i}"));
    let expected: [String; 10] = std::array::from_fn(|i| format!("value-{i}"));
    let values: [Value; 11] = std::array::from_fn(|i| if i < 10 { json!(i) } else { json!(-1) });

    let mut g = c.benchmark_group("evaluate");
    g.bench_function("static/engine", |b| {
        b.iter(|| black_box(snap.evaluate(black_box("static"), &Selector::All, ctx, ValueType::Boolean)))
    });
    g.bench_function("static/native", |b| b.iter(|| black_box(&on)));
    g.bench_function("targeting/engine", |b| {
        b.iter(|| black_box(snap.evaluate(black_box("targeting"), &Selector::All, ctx, ValueType::Boolean)))
    });
    g.bench_function("targeting/native", |b| {
        b.iter(|| black_box(native::targeting(black_box(&attrs), &on, &off)))
    });
    g.bench_function("fractional/engine", |b| {
        b.iter(|| black_box(snap.evaluate(black_box("fractional"), &Selector::All, ctx, ValueType::String)))
    });
    g.bench_function("fractional-v2/engine", |b| {
        b.iter(|| black_box(snap_v2.evaluate(black_box("fractional"), &Selector::All, ctx, ValueType::String)))
    });
    g.bench_function("fractional/native", |b| {
        b.iter(|| black_box(native::fractional(black_box(&attrs), "fractional", &abc)))
    });
    g.bench_function("sem_ver/engine", |b| {
        b.iter(|| black_box(snap.evaluate(black_box("sem_ver"), &Selector::All, ctx, ValueType::Boolean)))
    });
    g.bench_function("sem_ver/native", |b| {
        b.iter(|| black_box(native::sem_ver(black_box(&attrs), &min, &on, &off)))
    });
    g.bench_function("ten_rules/engine", |b| {
        b.iter(|| black_box(snap.evaluate(black_box("ten_rules"), &Selector::All, ctx, ValueType::Integer)))
    });
    g.bench_function("ten_rules/native", |b| {
        b.iter(|| black_box(native::ten_rules(black_box(&attrs), &names, &expected, &values)))
    });
    g.finish();

    // An experiment's allocation hashes the unit three times (layer, traffic, variant).
    let unit = "3f2a9c1e-7b4d-4e8a-9c21-5d6f7a8b9c0d";
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    black_box(vexil_core::experiment::bucket("x0123456789abcdef", "variant", unit));
    println!(
        "allocations per experiment bucket: {}",
        ALLOCATIONS.load(Ordering::Relaxed) - before
    );
    c.bench_function("experiment bucket (id salt, 36-byte unit)", |b| {
        b.iter(|| {
            black_box(vexil_core::experiment::bucket(
                black_box("x0123456789abcdef"),
                "variant",
                black_box(unit),
            ))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
