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
