//! The managed store as a source of the live configuration, on both backends: every environment's
//! flag sets served under `flagSetId=<environment>/<set>`, the default environment's also without a
//! selector, and a write picked up by the version check.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use vexil_core::{Context, Selector, ValueType};
use vexil_service::{Live, LiveOptions, Source, StoreSource};
use vexil_store::{Actor, FlagInput, Precondition, SqlStore, Store};

fn flag(value: &str) -> Value {
    json!({"state": "ENABLED", "variants": {"v": value}, "defaultVariant": "v"})
}

fn doc(value: &str) -> Value {
    json!({"flags": {"color": flag(value)}})
}

fn value(live: &Live, key: &str, selector: &Selector) -> Option<Value> {
    let snapshot = live.snapshot();
    let attributes = Map::new();
    let context = Context {
        attributes: &attributes,
        now: 0,
    };
    snapshot.evaluate(key, selector, context, ValueType::Any).value.cloned()
}

async fn served_and_followed(store: Arc<dyn Store>) {
    let actor = Actor::new("test");
    store
        .import(actor.clone(), "default".into(), "web".into(), doc("blue"))
        .await
        .unwrap();
    store
        .import(actor.clone(), "staging".into(), "web".into(), doc("green"))
        .await
        .unwrap();

    let source = Arc::new(StoreSource::new(store.clone(), "default", Duration::from_millis(50)));
    let options = LiveOptions {
        fractional: vexil_core::FractionalMode::V3,
        stale_after: None,
    };
    let live = Live::compose(vec![source.clone() as Arc<dyn Source>], options).await;
    let _watch = live.watch();
    assert!(live.readiness().is_ready(), "{}", live.readiness());

    let staging = Selector::FlagSet(Some("staging/web".into()));
    assert_eq!(value(&live, "color", &Selector::All), Some(json!("blue")));
    assert_eq!(
        value(&live, "color", &Selector::FlagSet(Some("default/web".into()))),
        Some(json!("blue"))
    );
    assert_eq!(value(&live, "color", &staging), Some(json!("green")));
    assert_eq!(
        value(&live, "color", &Selector::Source("store".into())),
        Some(json!("blue"))
    );

    // A write is picked up by the version check; only the environment written to is read again.
    let mut updates = live.subscribe();
    let version = live.current().version;
    store
        .put_flag(
            actor.clone(),
            "staging".into(),
            "web".into(),
            "color".into(),
            FlagInput::new(flag("red")),
            Precondition::Any,
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), updates.wait_for(|p| p.version > version))
        .await
        .expect("the write is published")
        .unwrap();
    assert_eq!(value(&live, "color", &staging), Some(json!("red")));
    assert_eq!(value(&live, "color", &Selector::All), Some(json!("blue")));

    // Catching up from the history (flags only) serves what a full load of the store serves.
    let whole = source.whole_loads();
    for (key, value) in [("color", "amber"), ("size", "large")] {
        store
            .put_flag(
                actor.clone(),
                "staging".into(),
                "web".into(),
                key.into(),
                FlagInput::new(flag(value)),
                Precondition::Any,
            )
            .await
            .unwrap();
    }
    store
        .delete_flag(
            actor.clone(),
            "default".into(),
            "web".into(),
            "color".into(),
            Precondition::Any,
        )
        .await
        .unwrap();
    let version = live.current().version;
    source.wake();
    tokio::time::timeout(
        Duration::from_secs(30),
        updates.wait_for(|p| {
            p.version > version
                && p.snapshot.get("size", &staging).is_some()
                && p.snapshot.get("color", &Selector::All).is_none()
        }),
    )
    .await
    .expect("the flag writes are published")
    .unwrap();
    let fresh = Arc::new(StoreSource::new(store.clone(), "default", Duration::from_millis(50)));
    let full = Live::compose(vec![fresh.clone() as Arc<dyn Source>], options).await;
    assert_eq!(
        source.whole_loads(),
        whole,
        "flag writes are caught up from the history"
    );
    assert_eq!(
        live.snapshot().revision(),
        full.snapshot().revision(),
        "caught up = loaded whole"
    );
    for environment in ["default", "staging"] {
        assert_eq!(
            source.environment(environment),
            fresh.environment(environment),
            "{environment}"
        );
    }
    assert_eq!(value(&live, "color", &staging), Some(json!("amber")));

    // A new environment appears; a deleted one disappears.
    let version = live.current().version;
    store
        .import(actor.clone(), "qa".into(), "web".into(), doc("white"))
        .await
        .unwrap();
    store
        .delete_environment(actor, "staging".into(), Precondition::Any)
        .await
        .unwrap();
    source.wake();
    tokio::time::timeout(
        Duration::from_secs(30),
        updates.wait_for(|p| {
            p.version > version
                && p.snapshot
                    .get("color", &Selector::FlagSet(Some("qa/web".into())))
                    .is_some()
                && p.snapshot.get("color", &staging).is_none()
        }),
    )
    .await
    .expect("the new environment is published and the deleted one is gone")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    let file = vexil_testkit::sqlite();
    let store = SqlStore::open(file.url()).await.unwrap();
    served_and_followed(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let db = vexil_testkit::postgres().database().await;
    let store = SqlStore::open(db.url()).await.unwrap();
    served_and_followed(Arc::new(store)).await;
}

/// Waits until `ok` holds, polling.
async fn until(what: &str, ok: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_start_from_the_redis_cache_and_follow_the_bus() {
    use vexil_cache::{ConfigCache, RedisCache};
    use vexil_service::Relay;

    let db = vexil_testkit::postgres().database().await;
    let redis = vexil_testkit::redis();
    let store: Arc<dyn Store> = Arc::new(SqlStore::open(db.url()).await.unwrap());
    let actor = Actor::new("test");
    store
        .import(actor.clone(), "default".into(), "web".into(), doc("blue"))
        .await
        .unwrap();
    let options = LiveOptions {
        fractional: vexil_core::FractionalMode::V3,
        stale_after: None,
    };
    let replica = |poll: Duration| {
        let cache: Arc<dyn ConfigCache> = Arc::new(RedisCache::connect(redis.url(), "vexil:").unwrap());
        Arc::new(StoreSource::new(store.clone(), "default", poll).with_cache(cache))
    };

    // a loads from the database and, once the version has settled, writes it to the cache.
    let a = replica(Duration::from_millis(50));
    let live_a = Live::compose(vec![a.clone() as Arc<dyn Source>], options).await;
    let _watch_a = live_a.watch();
    assert_eq!((a.whole_loads(), a.cache_loads()), (1, 0));
    until("a writes its snapshot to the cache", || a.cache_writes() == 1).await;

    // b starts from the cache, reads nothing whole from the database, and serves the same.
    let b = replica(Duration::from_secs(600));
    let live_b = Live::compose(vec![b.clone() as Arc<dyn Source>], options).await;
    let _watch_b = live_b.watch();
    assert_eq!((b.whole_loads(), b.cache_loads()), (0, 1));
    assert_eq!(live_b.snapshot().revision(), live_a.snapshot().revision());
    assert_eq!(b.environment("default"), a.environment("default"));

    // A write announced by a's relay reaches b through the bus alone (b's version check does not
    // run again for ten minutes), caught up from the history, not read whole.
    let relay = Relay::new(store.clone(), a.cache().clone());
    let before = b.environment("default").unwrap().config_version;
    store
        .put_flag(
            actor,
            "default".into(),
            "web".into(),
            "color".into(),
            FlagInput::new(flag("red")),
            Precondition::Any,
        )
        .await
        .unwrap();
    // The import's row and the write's (nobody relayed the import).
    assert_eq!(relay.relay(Duration::ZERO).await.unwrap(), 2);
    until("b serves the write", || {
        value(&live_b, "color", &Selector::All) == Some(json!("red"))
    })
    .await;
    assert_eq!((b.whole_loads(), b.cache_loads()), (0, 1));

    // b kept that version's changes for resuming watchers, not the ones before it started.
    let kept = b.changes_after("default", before).expect("b holds the versions since");
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].version, before + 1);
    assert_eq!(kept[0].changes[0].key, "color");
    assert_eq!(b.changes_after("default", before + 1), Some(Vec::new()));
    assert_eq!(b.changes_after("default", before - 1), None);
    assert_eq!(b.changes_after("nope", 0), None);
    // Published once: the outbox is empty.
    assert!(store.pending_outbox(10, Duration::ZERO).await.unwrap().is_empty());

    // A deleted environment's snapshot leaves the cache (the database confirms it is gone), so a
    // new environment of the same name does not start from it.
    store
        .delete_environment(Actor::new("test"), "default".into(), Precondition::Any)
        .await
        .unwrap();
    let cache = a.cache().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while cache.versions().await.unwrap().contains_key("default") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stale snapshot is still cached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.environment("default"), None);
}
