//! The event store: every case is written once, as a function of a fresh store, and runs against
//! both backends: a throwaway Postgres database (vexil-testkit) and a SQLite file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, json};
use sqlx::{AnyPool, AssertSqlSafe, Row};
use vexil_store::*;

/// A fresh store, its URL (for looking at the tables directly) and what keeps its database alive.
struct Fresh {
    store: SqlStore,
    url: String,
    _postgres: Option<vexil_testkit::TestDatabase>,
    _sqlite: Option<vexil_testkit::TestSqlite>,
}

async fn postgres() -> Fresh {
    let db = vexil_testkit::postgres().database().await;
    Fresh {
        store: SqlStore::open(db.url()).await.expect("open postgres store"),
        url: db.url().to_owned(),
        _postgres: Some(db),
        _sqlite: None,
    }
}

async fn sqlite() -> Fresh {
    let file = vexil_testkit::sqlite();
    Fresh {
        store: SqlStore::open(file.url()).await.expect("open sqlite store"),
        url: file.url().to_owned(),
        _postgres: None,
        _sqlite: Some(file),
    }
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fresh = super::postgres().await;
                super::$case(&fresh).await;
            })*
        }
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fresh = super::sqlite().await;
                super::$case(&fresh).await;
            })*
        }
    };
}

cases! {
    a_retried_batch_is_stored_once,
    events_of_several_days_land_in_day_partitions,
    units_exposed_to_two_variants_are_left_out,
    metric_totals_are_exact,
    pruned_ids_make_a_retry_new_again,
    old_events_are_deleted,
    a_large_batch_is_chunked,
    concurrent_inserts_store_each_event_once,
}

/// 2024-03-01T00:00:00Z.
const T: i64 = 1_709_251_200_000;
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

fn next_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("ev-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn event(kind: EventKind, unit: &str, at: i64) -> NewEvent {
    NewEvent {
        environment: "prod".into(),
        event_id: next_id(),
        kind,
        unit: unit.into(),
        flag: None,
        experiment: None,
        variant: None,
        metric: None,
        value: None,
        properties: Map::new(),
        client_time_ms: None,
        server_time_ms: at,
    }
}

fn exposure(unit: &str, variant: &str, at: i64) -> NewEvent {
    NewEvent {
        flag: Some("checkout-flag".into()),
        experiment: Some("checkout".into()),
        variant: Some(variant.into()),
        ..event(EventKind::Exposure, unit, at)
    }
}

fn metric(kind: EventKind, unit: &str, name: &str, value: Option<f64>, at: i64) -> NewEvent {
    NewEvent {
        metric: Some(name.into()),
        value,
        ..event(kind, unit, at)
    }
}

fn buy(unit: &str, value: Option<f64>, at: i64) -> NewEvent {
    metric(EventKind::Conversion, unit, "buy", value, at)
}

async fn raw(fresh: &Fresh) -> AnyPool {
    sqlx::any::install_default_drivers();
    AnyPool::connect(&fresh.url)
        .await
        .expect("connect to the test database")
}

/// One number a query answers.
async fn scalar(fresh: &Fresh, sql: &str) -> i64 {
    let pool = raw(fresh).await;
    let n: i64 = sqlx::query(AssertSqlSafe(sql.to_owned()))
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .try_get(0)
        .unwrap();
    pool.close().await;
    n
}

async fn event_count(fresh: &Fresh) -> i64 {
    scalar(fresh, "SELECT CAST(COUNT(*) AS BIGINT) FROM events").await
}

/// The day partitions of `events` with their row counts, and the default partition's count
/// (Postgres).
async fn partitions(fresh: &Fresh) -> (Vec<(String, i64)>, i64) {
    let pool = raw(fresh).await;
    let names: Vec<String> = sqlx::query(
        "SELECT CAST(c.relname AS TEXT) FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid \
         WHERE i.inhparent = CAST('events' AS regclass) ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|r| r.try_get(0).unwrap())
    .collect();
    let mut days = Vec::new();
    let mut default = None;
    for name in names {
        let n: i64 = sqlx::query(AssertSqlSafe(format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {name}")))
            .fetch_one(&pool)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        if name == "events_default" {
            default = Some(n);
        } else {
            days.push((name, n));
        }
    }
    pool.close().await;
    (days, default.expect("a default partition"))
}

fn counts(counts: &[ExposureCount]) -> Vec<(&str, u64)> {
    counts.iter().map(|c| (c.variant.as_str(), c.units)).collect()
}

async fn a_retried_batch_is_stored_once(fresh: &Fresh) {
    let store = &fresh.store;
    let mut batch = vec![
        exposure("u1", "a", T),
        buy("u1", Some(9.5), T + 10),
        NewEvent {
            properties: json!({"page": "/cart", "n": 2}).as_object().unwrap().clone(),
            client_time_ms: Some(T - 5),
            ..buy("u2", None, T + 20)
        },
    ];
    // The same id again inside the batch, and in another environment (a different event).
    let again = NewEvent {
        value: Some(100.0),
        ..batch[1].clone()
    };
    batch.push(again);
    batch.push(NewEvent {
        environment: "dev".into(),
        ..batch[1].clone()
    });
    let first = store.insert_events(batch.clone()).await.unwrap();
    assert_eq!(
        first,
        [
            Inserted::New,
            Inserted::New,
            Inserted::New,
            Inserted::Duplicate,
            Inserted::New
        ]
    );
    assert_eq!(event_count(fresh).await, 4);
    // The first occurrence is the one stored.
    let sum = scalar(
        fresh,
        "SELECT CAST(SUM(value) * 2 AS BIGINT) FROM events WHERE environment = 'prod' AND value IS NOT NULL",
    )
    .await;
    assert_eq!(sum, 19, "only the first occurrence (9.5) is stored");

    let retried = store.insert_events(batch.clone()).await.unwrap();
    assert_eq!(retried, vec![Inserted::Duplicate; 5]);
    assert_eq!(event_count(fresh).await, 4);

    // A retry mixed with new events: only those are stored.
    let mut mixed = batch[..2].to_vec();
    mixed.push(buy("u3", None, T + 30));
    let answers = store.insert_events(mixed).await.unwrap();
    assert_eq!(answers, [Inserted::Duplicate, Inserted::Duplicate, Inserted::New]);
    assert_eq!(event_count(fresh).await, 5);
    assert_eq!(store.insert_events(Vec::new()).await.unwrap(), []);

    // Everything stored as sent.
    let pool = raw(fresh).await;
    let properties_sql = match store.backend() {
        Backend::Postgres => "SELECT CAST(properties AS TEXT) FROM events WHERE unit = 'u2'",
        Backend::Sqlite => "SELECT properties FROM events WHERE unit = 'u2'",
    };
    let row = sqlx::query(properties_sql).fetch_one(&pool).await.unwrap();
    let properties: String = row.try_get(0).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&properties).unwrap(),
        json!({"page": "/cart", "n": 2})
    );
    let kinds = scalar(
        fresh,
        "SELECT CAST(COUNT(*) AS BIGINT) FROM events \
         WHERE kind = 'exposure' AND flag = 'checkout-flag' AND experiment = 'checkout' AND variant = 'a'",
    )
    .await;
    assert_eq!(kinds, 1);
    pool.close().await;
}

async fn events_of_several_days_land_in_day_partitions(fresh: &Fresh) {
    let store = &fresh.store;
    let batch = vec![
        exposure("u1", "a", T + HOUR),
        exposure("u2", "b", T + DAY - 1),
        exposure("u3", "a", T + DAY),
        exposure("u4", "b", T + 2 * DAY + 23 * HOUR),
        exposure("u5", "a", T + 2 * DAY + 1),
    ];
    assert_eq!(store.insert_events(batch).await.unwrap(), vec![Inserted::New; 5]);
    // Another batch into a day seen already.
    store.insert_events(vec![exposure("u6", "b", T + 5)]).await.unwrap();
    assert_eq!(event_count(fresh).await, 6);
    let all = store
        .exposure_counts("prod".into(), "checkout".into(), None, None)
        .await
        .unwrap();
    assert_eq!(counts(&all), [("a", 3), ("b", 3)]);
    let second_day = store
        .exposure_counts("prod".into(), "checkout".into(), Some(T + DAY), Some(T + 2 * DAY))
        .await
        .unwrap();
    assert_eq!(counts(&second_day), [("a", 1)]);

    if store.backend() == Backend::Postgres {
        let (days, default) = partitions(fresh).await;
        assert_eq!(
            days,
            [
                ("events_p20240301".to_owned(), 3),
                ("events_p20240302".to_owned(), 1),
                ("events_p20240303".to_owned(), 2),
                // The day after the last: made ahead.
                ("events_p20240304".to_owned(), 0),
            ]
        );
        assert_eq!(default, 0);

        // Another store on the same database (another replica) finds the partitions there.
        let other = SqlStore::open(&fresh.url).await.unwrap();
        other
            .insert_events(vec![exposure("u7", "a", T + 3 * DAY + HOUR)])
            .await
            .unwrap();
        let (days, default) = partitions(fresh).await;
        assert_eq!(days.len(), 5, "{days:?}");
        assert_eq!(days[3], ("events_p20240304".to_owned(), 1));
        assert_eq!(default, 0);
        other.close().await;

        // A day with rows in the default partition already (put there by hand here) cannot get
        // a partition of its own: its events go to the default partition too, and stay readable.
        let pool = raw(fresh).await;
        sqlx::query(
            "INSERT INTO events_default (environment, event_id, kind, unit, properties, server_time) \
             VALUES ('prod', 'by-hand', 'custom', 'u9', '{}', '2024-03-10 01:00:00+00')",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let late = store
            .insert_events(vec![exposure("u8", "a", T + 9 * DAY + 2 * HOUR)])
            .await
            .unwrap();
        assert_eq!(late, [Inserted::New]);
        let (days, default) = partitions(fresh).await;
        assert_eq!(default, 2);
        let names: Vec<&str> = days.iter().map(|(n, _)| n.as_str()).collect();
        assert!(!names.contains(&"events_p20240310"), "{names:?}");
        assert!(names.contains(&"events_p20240311"), "{names:?}");
        let all = store
            .exposure_counts("prod".into(), "checkout".into(), None, None)
            .await
            .unwrap();
        assert_eq!(counts(&all), [("a", 5), ("b", 3)]);
    }
}

async fn units_exposed_to_two_variants_are_left_out(fresh: &Fresh) {
    let store = &fresh.store;
    store
        .insert_events(vec![
            exposure("u1", "a", T),
            exposure("u1", "a", T + 10), // twice, counted once
            exposure("u2", "a", T + 20),
            exposure("u3", "b", T + 30),
            exposure("u4", "a", T + 40), // both variants: left out
            exposure("u4", "b", T + 50),
            NewEvent {
                experiment: Some("other".into()),
                ..exposure("u5", "b", T)
            },
            NewEvent {
                environment: "dev".into(),
                ..exposure("u6", "b", T)
            },
            buy("u7", None, T),
        ])
        .await
        .unwrap();
    let all = store
        .exposure_counts("prod".into(), "checkout".into(), None, None)
        .await
        .unwrap();
    assert_eq!(counts(&all), [("a", 2), ("b", 1)]);
    // Within a range, only the exposures in it count: u4 was only in `b` after T + 45.
    let later = store
        .exposure_counts("prod".into(), "checkout".into(), Some(T + 45), None)
        .await
        .unwrap();
    assert_eq!(counts(&later), [("b", 1)]);
    let early = store
        .exposure_counts("prod".into(), "checkout".into(), None, Some(T + 20))
        .await
        .unwrap();
    assert_eq!(counts(&early), [("a", 1)]);
    let none = store
        .exposure_counts("prod".into(), "nope".into(), None, None)
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// The dataset of [`metric_totals_are_exact`]: exposures of `checkout`, metric `buy`.
fn totals_dataset() -> Vec<NewEvent> {
    vec![
        // u1: a, first exposed at T + 100.
        exposure("u1", "a", T + 100),
        exposure("u1", "a", T + 500),
        buy("u1", Some(5.0), T + 150),
        buy("u1", None, T + 600),        // no value: counts 1
        buy("u1", Some(2.0), T + 50),    // before exposure: covariate only
        buy("u1", Some(10.0), T - 1000), // long before
        // u2: a at T + 200, bought only before.
        exposure("u2", "a", T + 200),
        buy("u2", Some(3.0), T + 150),
        // u3: b at T + 100, a custom event of the metric at the very time of exposure.
        exposure("u3", "b", T + 100),
        metric(EventKind::Custom, "u3", "buy", Some(2.5), T + 100),
        // u4: b, another metric only.
        exposure("u4", "b", T + 300),
        metric(EventKind::Conversion, "u4", "other", Some(7.0), T + 400),
        // u5: a then b: left out (unless the range sees only one).
        exposure("u5", "a", T + 100),
        exposure("u5", "b", T + 200),
        buy("u5", Some(100.0), T + 300),
        // u6: a, its only purchase is in another environment.
        exposure("u6", "a", T + 50),
        NewEvent {
            environment: "dev".into(),
            ..buy("u6", Some(40.0), T + 60)
        },
        // u7: never exposed.
        buy("u7", Some(1.0), T + 100),
    ]
}

fn query(from_ms: Option<i64>, until_ms: Option<i64>, window: Option<Duration>) -> MetricQuery {
    MetricQuery {
        environment: "prod".into(),
        experiment: "checkout".into(),
        metric: "buy".into(),
        from_ms,
        until_ms,
        covariate_window: window,
    }
}

fn totals(variant: &str, units: u64, converted: u64, sum: f64, sum_squares: f64) -> VariantTotals {
    VariantTotals {
        variant: variant.into(),
        units,
        converted,
        sum,
        sum_squares,
        ..VariantTotals::default()
    }
}

async fn metric_totals_are_exact(fresh: &Fresh) {
    let store = &fresh.store;
    store.insert_events(totals_dataset()).await.unwrap();

    // a: u1 (5 + 1), u2 (0), u6 (0); b: u3 (2.5), u4 (0).
    let plain = store.metric_totals(query(None, None, None)).await.unwrap();
    assert_eq!(plain, [totals("a", 3, 1, 6.0, 36.0), totals("b", 2, 1, 2.5, 6.25)]);

    // A window of 1 s before the first exposure: u1 has 2 (at T + 50), u2 has 3 (at T + 150).
    let cuped = store
        .metric_totals(query(None, None, Some(Duration::from_secs(1))))
        .await
        .unwrap();
    assert_eq!(
        cuped,
        [
            VariantTotals {
                covariate_sum: 5.0,
                covariate_sum_squares: 13.0,
                cross_sum: 12.0,
                // u1 and u2 had events before exposure; u1 also after.
                pre_converted: 2,
                both_converted: 1,
                ..totals("a", 3, 1, 6.0, 36.0)
            },
            totals("b", 2, 1, 2.5, 6.25),
        ]
    );
    // 2 s reach u1's purchase at T - 1000 too: its covariate is 12.
    let longer = store
        .metric_totals(query(None, None, Some(Duration::from_secs(2))))
        .await
        .unwrap();
    assert_eq!(
        longer[0],
        VariantTotals {
            covariate_sum: 15.0,
            covariate_sum_squares: 153.0,
            cross_sum: 72.0,
            pre_converted: 2,
            both_converted: 1,
            ..totals("a", 3, 1, 6.0, 36.0)
        }
    );

    // From T + 150: u1 is first exposed at T + 500 (value 1), u2 at T + 200 (0); u5 is only seen
    // in b (value 100), u4 in b (0); u3 and u6 are out.
    let from = store.metric_totals(query(Some(T + 150), None, None)).await.unwrap();
    assert_eq!(from, [totals("a", 2, 1, 1.0, 1.0), totals("b", 2, 1, 100.0, 10_000.0)]);
    // Until T + 550: u1's purchase at T + 600 is out.
    let until = store.metric_totals(query(None, Some(T + 550), None)).await.unwrap();
    assert_eq!(until, [totals("a", 3, 1, 5.0, 25.0), totals("b", 2, 1, 2.5, 6.25)]);
    // The covariate is not cut by `from`: u1's (first exposed at T + 500) reaches T + 150 and T + 50.
    let from_cuped = store
        .metric_totals(query(Some(T + 150), None, Some(Duration::from_secs(1))))
        .await
        .unwrap();
    assert_eq!(
        from_cuped[0],
        VariantTotals {
            // u1: covariate 5 + 2 = 7, value 1; u2: covariate 3, value 0.
            covariate_sum: 10.0,
            covariate_sum_squares: 58.0,
            cross_sum: 7.0,
            pre_converted: 2,
            both_converted: 1,
            ..totals("a", 2, 1, 1.0, 1.0)
        }
    );

    // Exposure counts agree with the totals' units.
    let exposed = store
        .exposure_counts("prod".into(), "checkout".into(), None, None)
        .await
        .unwrap();
    assert_eq!(counts(&exposed), [("a", 3), ("b", 2)]);

    let nothing = store
        .metric_totals(MetricQuery {
            experiment: "nope".into(),
            ..query(None, None, None)
        })
        .await
        .unwrap();
    assert!(nothing.is_empty());
    // A metric nobody has: units, but nothing converted.
    let unknown = store
        .metric_totals(MetricQuery {
            metric: "nope".into(),
            ..query(None, None, Some(Duration::from_secs(1)))
        })
        .await
        .unwrap();
    assert_eq!(unknown, [totals("a", 3, 0, 0.0, 0.0), totals("b", 2, 0, 0.0, 0.0)]);
}

async fn pruned_ids_make_a_retry_new_again(fresh: &Fresh) {
    let store = &fresh.store;
    let batch = vec![exposure("u1", "a", T), buy("u1", None, T + 1)];
    store.insert_events(batch.clone()).await.unwrap();
    // Recorded just now: not an hour old.
    assert_eq!(store.prune_event_ids(Duration::from_secs(3600)).await.unwrap(), 0);
    assert_eq!(
        store.insert_events(batch.clone()).await.unwrap(),
        [Inserted::Duplicate, Inserted::Duplicate]
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.prune_event_ids(Duration::ZERO).await.unwrap(), 2);
    assert_eq!(scalar(fresh, "SELECT CAST(COUNT(*) AS BIGINT) FROM event_ids").await, 0);
    // The events stay; a retry now is stored again.
    assert_eq!(event_count(fresh).await, 2);
    assert_eq!(
        store.insert_events(batch).await.unwrap(),
        [Inserted::New, Inserted::New]
    );
    assert_eq!(event_count(fresh).await, 4);
}

async fn old_events_are_deleted(fresh: &Fresh) {
    let store = &fresh.store;
    store
        .insert_events(vec![
            exposure("u1", "a", T),
            exposure("u2", "a", T + HOUR),
            buy("u1", None, T + 2 * HOUR),
            exposure("u3", "b", T + DAY + HOUR),
            exposure("u4", "b", T + DAY + 20 * HOUR),
            exposure("u5", "b", T + 2 * DAY),
        ])
        .await
        .unwrap();
    // Day 1 whole, and the first hours of day 2.
    assert_eq!(store.delete_events_before(T + DAY + 12 * HOUR).await.unwrap(), 4);
    assert_eq!(event_count(fresh).await, 2);
    let left = store
        .exposure_counts("prod".into(), "checkout".into(), None, None)
        .await
        .unwrap();
    assert_eq!(counts(&left), [("b", 2)]);
    assert_eq!(store.delete_events_before(T + DAY + 12 * HOUR).await.unwrap(), 0);
    if store.backend() == Backend::Postgres {
        let (days, default) = partitions(fresh).await;
        let names: Vec<&str> = days.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["events_p20240302", "events_p20240303", "events_p20240304"]);
        assert_eq!(default, 0);
    }
    // A late event of the dropped day gets its partition back.
    store.insert_events(vec![exposure("u6", "a", T + 5)]).await.unwrap();
    assert_eq!(event_count(fresh).await, 3);
    if store.backend() == Backend::Postgres {
        let (days, default) = partitions(fresh).await;
        assert_eq!(days[0], ("events_p20240301".to_owned(), 1));
        assert_eq!(default, 0);
    }
    // Everything.
    assert_eq!(store.delete_events_before(T + 10 * DAY).await.unwrap(), 3);
    assert_eq!(event_count(fresh).await, 0);
}

async fn a_large_batch_is_chunked(fresh: &Fresh) {
    let store = &fresh.store;
    let batch: Vec<NewEvent> = (0..2500)
        .map(|i| {
            let unit = format!("u{i}");
            if i % 5 == 4 {
                buy(&format!("u{}", i - 1), Some(2.0), T + 1000 + i)
            } else {
                exposure(&unit, if i % 2 == 0 { "a" } else { "b" }, T + i)
            }
        })
        .collect();
    let answers = store.insert_events(batch.clone()).await.unwrap();
    assert_eq!(answers.len(), 2500);
    assert!(answers.iter().all(|a| *a == Inserted::New));
    assert_eq!(event_count(fresh).await, 2500);
    assert_eq!(
        scalar(fresh, "SELECT CAST(COUNT(*) AS BIGINT) FROM event_ids").await,
        2500
    );
    let exposed = store
        .exposure_counts("prod".into(), "checkout".into(), None, None)
        .await
        .unwrap();
    // 2000 exposures: i % 5 in 0..4; even i → a.
    assert_eq!(counts(&exposed), [("a", 1000), ("b", 1000)]);
    // Every unit u(5k + 3) bought once, for 2: they are b when k is even, a when odd.
    let bought = store.metric_totals(query(None, None, None)).await.unwrap();
    assert_eq!(
        bought,
        [
            totals("a", 1000, 250, 500.0, 1000.0),
            totals("b", 1000, 250, 500.0, 1000.0)
        ]
    );
    let retried = store.insert_events(batch).await.unwrap();
    assert!(retried.iter().all(|a| *a == Inserted::Duplicate));
    assert_eq!(event_count(fresh).await, 2500);
}

async fn concurrent_inserts_store_each_event_once(fresh: &Fresh) {
    // Several writers racing with overlapping batches into days nobody has written to yet (on
    // Postgres they race to create the partitions too).
    let shared: Vec<NewEvent> = (0..200)
        .map(|i| exposure(&format!("u{i}"), "a", T + 5 * DAY + i * HOUR))
        .collect();
    let mut tasks = Vec::new();
    for w in 0..6 {
        let store = SqlStore::open(&fresh.url).await.unwrap();
        let mut batch = shared.clone();
        if w % 2 == 1 {
            batch.reverse();
        }
        batch.push(exposure(&format!("own{w}"), "b", T + 6 * DAY + w));
        tasks.push(tokio::spawn(async move {
            let answers = store.insert_events(batch).await.unwrap();
            store.close().await;
            answers
        }));
    }
    let mut new = 0;
    for task in tasks {
        let answers = task.await.unwrap();
        assert_eq!(*answers.last().unwrap(), Inserted::New);
        new += answers.iter().filter(|a| **a == Inserted::New).count();
    }
    assert_eq!(new, 200 + 6);
    assert_eq!(event_count(fresh).await, 206);
    if fresh.store.backend() == Backend::Postgres {
        let (days, default) = partitions(fresh).await;
        assert_eq!(default, 0);
        assert_eq!(days.iter().map(|(_, n)| n).sum::<i64>(), 206);
    }
}
