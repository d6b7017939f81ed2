//! The store's conformance suite: every case is written once, as a function of a fresh store, and
//! runs against both backends: a throwaway Postgres database (vexil-testkit) and a SQLite file.

use std::time::Duration;

use std::sync::Arc;

use serde_json::{Value, json};
use vexil_store::*;

/// A fresh store and what keeps its database alive.
struct Fresh {
    store: SqlStore,
    _postgres: Option<vexil_testkit::TestDatabase>,
    _sqlite: Option<vexil_testkit::TestSqlite>,
}

async fn postgres() -> Fresh {
    let db = vexil_testkit::postgres().database().await;
    Fresh {
        store: SqlStore::open(db.url()).await.expect("open postgres store"),
        _postgres: Some(db),
        _sqlite: None,
    }
}

async fn sqlite() -> Fresh {
    let file = vexil_testkit::sqlite();
    Fresh {
        store: SqlStore::open(file.url()).await.expect("open sqlite store"),
        _postgres: None,
        _sqlite: Some(file),
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fresh = super::postgres().await;
                super::$case(&fresh.store).await;
            })*
        }
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fresh = super::sqlite().await;
                super::$case(&fresh.store).await;
            })*
        }
    };
}

conformance! {
    environments_are_created_listed_updated_and_deleted,
    a_flag_write_checks_its_version_and_publishes_a_config_version,
    an_invalid_flag_is_rejected_with_every_path_and_nothing_is_stored,
    segments_are_served_as_evaluators_and_guarded_by_the_flags_that_use_them,
    every_write_is_versioned_audited_and_announced,
    versions_diff_and_roll_back,
    a_deleted_flag_set_comes_back_with_its_flags_on_rollback,
    import_replaces_a_set_and_export_round_trips,
    an_invalid_import_stores_nothing,
    api_keys_are_shown_once_stored_hashed_and_revocable,
    concurrent_writers_are_serialized_and_stale_ones_conflict,
    the_audit_log_filters_and_pages,
    lists_page_with_tokens,
    history_gives_each_version_s_changes_in_order,
    the_outbox_waits_for_its_grace_period,
    experiments_move_through_their_lifecycle_and_reach_the_snapshot_while_they_matter,
    experiments_are_checked_against_their_flag_and_guard_it,
    experiments_are_versioned_rolled_back_and_go_with_their_flag_set,
}

fn actor() -> Actor {
    Actor::new("test")
}

fn boolean_flag(default: &str) -> Value {
    json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": default})
}

async fn with_set(store: &SqlStore, env: &str, set: &str) {
    store
        .create_environment(actor(), env.into(), EnvironmentInput::default())
        .await
        .unwrap();
    store
        .put_flag_set(
            actor(),
            env.into(),
            set.into(),
            FlagSetInput::default(),
            Precondition::Absent,
        )
        .await
        .unwrap();
}

async fn put(store: &SqlStore, key: &str, definition: Value, expect: Precondition) -> Result<Written<FlagRecord>> {
    store
        .put_flag(
            actor(),
            "prod".into(),
            "web".into(),
            key.into(),
            FlagInput::new(definition),
            expect,
        )
        .await
}

async fn environments_are_created_listed_updated_and_deleted(store: &SqlStore) {
    let created = store
        .create_environment(
            actor(),
            "prod".into(),
            EnvironmentInput {
                name: "Production".into(),
                description: "live".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            created.key.as_str(),
            created.name.as_str(),
            created.version,
            created.config_version
        ),
        ("prod", "Production", 1, 0)
    );
    assert_eq!(created.created.by, "test");
    let again = store
        .create_environment(actor(), "prod".into(), EnvironmentInput::default())
        .await;
    assert!(matches!(again, Err(StoreError::AlreadyExists(_))), "{again:?}");
    let bad = store
        .create_environment(actor(), "no/slash".into(), EnvironmentInput::default())
        .await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");

    let stale = store
        .update_environment(
            actor(),
            "prod".into(),
            EnvironmentInput::default(),
            Precondition::Version(7),
        )
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::Conflict {
                expected: 7,
                actual: 1,
                ..
            })
        ),
        "{stale:?}"
    );
    let updated = store
        .update_environment(
            actor(),
            "prod".into(),
            EnvironmentInput {
                name: "Prod".into(),
                description: String::new(),
            },
            Precondition::Version(1),
        )
        .await
        .unwrap();
    assert_eq!((updated.name.as_str(), updated.version), ("Prod", 2));
    assert_eq!(store.get_environment("prod".into()).await.unwrap(), updated);

    store
        .delete_environment(actor(), "prod".into(), Precondition::Version(2))
        .await
        .unwrap();
    let gone = store.get_environment("prod".into()).await;
    assert!(matches!(gone, Err(StoreError::NotFound(_))), "{gone:?}");
    assert!(
        store
            .list_environments(PageRequest::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

async fn a_flag_write_checks_its_version_and_publishes_a_config_version(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    assert_eq!(store.get_environment("prod".into()).await.unwrap().config_version, 1);

    let first = put(store, "banner", boolean_flag("off"), Precondition::Absent)
        .await
        .unwrap();
    assert_eq!((first.value.version, first.config_version), (1, Some(2)));
    assert_eq!(first.value.definition, boolean_flag("off"));
    let exists = put(store, "banner", boolean_flag("on"), Precondition::Absent).await;
    assert!(matches!(exists, Err(StoreError::AlreadyExists(_))), "{exists:?}");

    let second = put(store, "banner", boolean_flag("on"), Precondition::Version(1))
        .await
        .unwrap();
    assert_eq!((second.value.version, second.config_version), (2, Some(3)));
    let stale = put(store, "banner", boolean_flag("off"), Precondition::Version(1)).await;
    assert!(
        matches!(
            stale,
            Err(StoreError::Conflict {
                expected: 1,
                actual: 2,
                ..
            })
        ),
        "{stale:?}"
    );
    // The stale write stored nothing and published nothing.
    let stored = store
        .get_flag("prod".into(), "web".into(), "banner".into())
        .await
        .unwrap();
    assert_eq!((stored.version, stored.definition), (2, boolean_flag("on")));
    assert_eq!(store.get_environment("prod".into()).await.unwrap().config_version, 3);

    // Writing the same content again changes nothing and publishes no version.
    let same = put(store, "banner", boolean_flag("on"), Precondition::Any)
        .await
        .unwrap();
    assert_eq!((same.value.version, same.config_version), (2, None));
    assert_eq!(store.get_environment("prod".into()).await.unwrap().config_version, 3);

    let missing_set = store
        .put_flag(
            actor(),
            "prod".into(),
            "nope".into(),
            "x".into(),
            FlagInput::new(boolean_flag("on")),
            Precondition::Any,
        )
        .await;
    assert!(matches!(missing_set, Err(StoreError::NotFound(_))), "{missing_set:?}");

    let stale_delete = store
        .delete_flag(
            actor(),
            "prod".into(),
            "web".into(),
            "banner".into(),
            Precondition::Version(1),
        )
        .await;
    assert!(
        matches!(stale_delete, Err(StoreError::Conflict { .. })),
        "{stale_delete:?}"
    );
    let deleted = store
        .delete_flag(
            actor(),
            "prod".into(),
            "web".into(),
            "banner".into(),
            Precondition::Version(2),
        )
        .await
        .unwrap();
    assert_eq!(deleted.config_version, Some(4));
    let gone = store.get_flag("prod".into(), "web".into(), "banner".into()).await;
    assert!(matches!(gone, Err(StoreError::NotFound(_))), "{gone:?}");
    let again = store
        .delete_flag(actor(), "prod".into(), "web".into(), "banner".into(), Precondition::Any)
        .await;
    assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
}

async fn an_invalid_flag_is_rejected_with_every_path_and_nothing_is_stored(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    let audit_before = store
        .audit(AuditFilter::default(), PageRequest::default())
        .await
        .unwrap()
        .items
        .len();
    let bad = json!({
        "state": "SOMETIMES",
        "variants": {"on": true},
        "defaultVariant": "off",
        "targeting": {"if": [{"$ref": "nobody"}, "on", null]}
    });
    let Err(StoreError::Invalid(problems)) = put(store, "broken", bad.clone(), Precondition::Any).await else {
        panic!("an invalid flag was accepted");
    };
    let pointers: Vec<&str> = problems.iter().map(|p| p.pointer.as_str()).collect();
    assert!(
        pointers.iter().any(|p| p.starts_with("/flags/broken/state")),
        "{problems:?}"
    );
    assert!(
        pointers.iter().any(|p| p.starts_with("/flags/broken/targeting")),
        "{problems:?}"
    );
    assert!(problems.len() >= 2, "{problems:?}");

    let check = store
        .validate_flag("prod".into(), "web".into(), "broken".into(), FlagInput::new(bad))
        .await;
    assert!(matches!(check, Err(StoreError::Invalid(_))), "{check:?}");
    store
        .validate_flag(
            "prod".into(),
            "web".into(),
            "fine".into(),
            FlagInput::new(boolean_flag("on")),
        )
        .await
        .unwrap();

    let own_id = json!({"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on", "metadata": {"flagSetId": "other"}});
    let Err(StoreError::Invalid(problems)) = put(store, "sneaky", own_id, Precondition::Any).await else {
        panic!("a flag naming its own flag set was accepted");
    };
    assert_eq!(problems[0].pointer, "/flags/sneaky/metadata/flagSetId");
    let not_object = put(store, "x", json!([1]), Precondition::Any).await;
    assert!(matches!(not_object, Err(StoreError::Invalid(_))), "{not_object:?}");

    assert!(
        store
            .list_flags("prod".into(), "web".into(), PageRequest::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(store.get_environment("prod".into()).await.unwrap().config_version, 1);
    let audit_after = store
        .audit(AuditFilter::default(), PageRequest::default())
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(audit_before, audit_after);
    assert!(
        store
            .validate_flag(
                "prod".into(),
                "nope".into(),
                "x".into(),
                FlagInput::new(boolean_flag("on"))
            )
            .await
            .is_err()
    );
}

async fn segments_are_served_as_evaluators_and_guarded_by_the_flags_that_use_them(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    let rule = json!({"ends_with": [{"var": "email"}, "@example.com"]});
    let segment = store
        .put_segment(
            actor(),
            "prod".into(),
            "web".into(),
            "staff".into(),
            SegmentInput {
                rule: rule.clone(),
                description: "our people".into(),
            },
            Precondition::Absent,
        )
        .await
        .unwrap();
    assert_eq!((segment.value.version, segment.value.rule.clone()), (1, rule.clone()));
    let targeted = json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                          "targeting": {"if": [{"$ref": "staff"}, "on", null]}});
    put(store, "beta", targeted.clone(), Precondition::Absent)
        .await
        .unwrap();

    let snapshot = store.snapshot("prod".into()).await.unwrap();
    assert_eq!(snapshot.config_version, 3);
    let (key, doc) = &snapshot.flag_sets[0];
    assert_eq!(key, "web");
    assert_eq!(doc["$evaluators"]["staff"], rule);
    assert_eq!(doc["flags"]["beta"], targeted);
    assert_eq!(doc["metadata"]["flagSetId"], "prod/web");

    // A segment a flag refers to cannot go; a broken segment cannot be written.
    let refused = store
        .delete_segment(actor(), "prod".into(), "web".into(), "staff".into(), Precondition::Any)
        .await;
    assert!(matches!(refused, Err(StoreError::Invalid(_))), "{refused:?}");
    let broken = store
        .put_segment(
            actor(),
            "prod".into(),
            "web".into(),
            "staff".into(),
            SegmentInput {
                rule: json!({"invalid": [1]}),
                description: String::new(),
            },
            Precondition::Any,
        )
        .await;
    assert!(matches!(broken, Err(StoreError::Invalid(_))), "{broken:?}");
    assert_eq!(
        store
            .get_segment("prod".into(), "web".into(), "staff".into())
            .await
            .unwrap()
            .rule,
        rule
    );

    store
        .delete_flag(actor(), "prod".into(), "web".into(), "beta".into(), Precondition::Any)
        .await
        .unwrap();
    store
        .delete_segment(
            actor(),
            "prod".into(),
            "web".into(),
            "staff".into(),
            Precondition::Version(1),
        )
        .await
        .unwrap();
    let snapshot = store.snapshot("prod".into()).await.unwrap();
    assert!(snapshot.flag_sets[0].1.get("$evaluators").is_none());
}

async fn every_write_is_versioned_audited_and_announced(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    put(store, "a", boolean_flag("on"), Precondition::Any).await.unwrap();
    put(store, "a", boolean_flag("off"), Precondition::Any).await.unwrap();

    let versions = store
        .list_versions("prod".into(), PageRequest::default())
        .await
        .unwrap();
    let numbers: Vec<i64> = versions.items.iter().map(|v| v.version).collect();
    assert_eq!(numbers, [3, 2, 1]);
    assert_eq!(versions.items[0].summary, "put flag web/a");
    assert_eq!(versions.items[0].created.by, "test");

    let entries = store
        .audit(
            AuditFilter {
                entity: Some("prod/web/a".into()),
                ..AuditFilter::default()
            },
            PageRequest::default(),
        )
        .await
        .unwrap()
        .items;
    assert_eq!(entries.len(), 2);
    let (update, create) = (&entries[0], &entries[1]);
    assert_eq!((update.action.as_str(), update.config_version), ("update", Some(3)));
    assert_eq!(update.before.as_ref().unwrap()["definition"], boolean_flag("on"));
    assert_eq!(update.after.as_ref().unwrap()["definition"], boolean_flag("off"));
    assert_eq!((create.action.as_str(), create.before.is_none()), ("create", true));
    assert_eq!(
        (create.entity_kind.as_str(), create.environment.as_deref()),
        ("flag", Some("prod"))
    );

    let pending = store.pending_outbox(100, Duration::ZERO).await.unwrap();
    let announced: Vec<(String, i64)> = pending
        .iter()
        .map(|o| (o.environment.clone(), o.config_version))
        .collect();
    assert_eq!(
        announced,
        [("prod".to_owned(), 1), ("prod".to_owned(), 2), ("prod".to_owned(), 3)]
    );
    store
        .mark_published(pending.iter().map(|o| o.id).collect())
        .await
        .unwrap();
    assert!(store.pending_outbox(100, Duration::ZERO).await.unwrap().is_empty());
    assert_eq!(store.config_versions().await.unwrap(), [("prod".to_owned(), 3)]);
}

async fn versions_diff_and_roll_back(store: &SqlStore) {
    with_set(store, "prod", "web").await; // 1
    put(store, "a", boolean_flag("on"), Precondition::Any).await.unwrap(); // 2
    put(store, "a", boolean_flag("off"), Precondition::Any).await.unwrap(); // 3
    put(store, "b", boolean_flag("on"), Precondition::Any).await.unwrap(); // 4
    store
        .delete_flag(actor(), "prod".into(), "web".into(), "a".into(), Precondition::Any)
        .await
        .unwrap(); // 5

    let diff = store.diff("prod".into(), 2, 5).await.unwrap();
    let summary: Vec<(&str, Option<&Value>, Option<&Value>)> = diff
        .iter()
        .map(|c| (c.key.as_str(), c.before.as_ref(), c.after.as_ref()))
        .collect();
    assert_eq!(summary.len(), 2, "{diff:?}");
    assert_eq!(summary[0].0, "a");
    assert_eq!(summary[0].1.unwrap()["definition"], boolean_flag("on"));
    assert!(summary[0].2.is_none());
    assert_eq!((summary[1].0, summary[1].1), ("b", None));
    // Backwards, before and after swap.
    let back = store.diff("prod".into(), 5, 2).await.unwrap();
    assert_eq!(back[0].after.as_ref().unwrap()["definition"], boolean_flag("on"));
    assert!(store.diff("prod".into(), 3, 3).await.unwrap().is_empty());
    assert!(matches!(
        store.diff("prod".into(), 0, 99).await,
        Err(StoreError::Invalid(_))
    ));

    let rolled = store.rollback(actor(), "prod".into(), 3).await.unwrap();
    assert_eq!(rolled.config_version, Some(6));
    let a = store.get_flag("prod".into(), "web".into(), "a".into()).await.unwrap();
    assert_eq!(a.definition, boolean_flag("off"));
    let b = store.get_flag("prod".into(), "web".into(), "b".into()).await;
    assert!(matches!(b, Err(StoreError::NotFound(_))), "{b:?}");
    assert!(store.diff("prod".into(), 3, 6).await.unwrap().is_empty());
    let latest = store
        .list_versions("prod".into(), PageRequest::first(1))
        .await
        .unwrap()
        .items;
    assert_eq!(latest[0].summary, "roll back to version 3");
    let rollback_audit = store
        .audit(
            AuditFilter {
                environment: Some("prod".into()),
                ..AuditFilter::default()
            },
            PageRequest::first(2),
        )
        .await
        .unwrap();
    assert!(
        rollback_audit
            .items
            .iter()
            .all(|e| e.action == "rollback" && e.config_version == Some(6))
    );
    let invalid = store.rollback(actor(), "prod".into(), 6).await;
    assert!(matches!(invalid, Err(StoreError::Invalid(_))), "{invalid:?}");
}

async fn a_deleted_flag_set_comes_back_with_its_flags_on_rollback(store: &SqlStore) {
    with_set(store, "prod", "web").await; // 1
    store
        .put_segment(
            actor(),
            "prod".into(),
            "web".into(),
            "s".into(),
            SegmentInput {
                rule: json!({"==": [1, 1]}),
                description: String::new(),
            },
            Precondition::Any,
        )
        .await
        .unwrap(); // 2
    put(store, "a", boolean_flag("on"), Precondition::Any).await.unwrap(); // 3
    let before = store.snapshot("prod".into()).await.unwrap().flag_sets;
    store
        .delete_flag_set(actor(), "prod".into(), "web".into(), Precondition::Any)
        .await
        .unwrap(); // 4
    assert!(store.snapshot("prod".into()).await.unwrap().flag_sets.is_empty());
    store.rollback(actor(), "prod".into(), 3).await.unwrap(); // 5
    assert_eq!(store.snapshot("prod".into()).await.unwrap().flag_sets, before);
    // And forward again: back to 4 deletes it once more.
    store.rollback(actor(), "prod".into(), 4).await.unwrap();
    assert!(store.snapshot("prod".into()).await.unwrap().flag_sets.is_empty());
}

fn document() -> Value {
    json!({
        "$schema": "https://flagd.dev/schema/v0/flags.json",
        "flags": {
            "banner": {"state": "ENABLED", "variants": {"big": {"size": 2, "color": "red"}, "small": {"size": 1}}, "defaultVariant": "small",
                       "targeting": {"if": [{"$ref": "staff"}, "big", null]}},
            "limit": {"state": "DISABLED", "variants": {"low": 1, "high": 100}, "defaultVariant": "low", "metadata": {"owner": "ops"}}
        },
        "$evaluators": {"staff": {"ends_with": [{"var": "email"}, "@example.com"]}},
        "metadata": {"team": "web", "version": "7"}
    })
}

async fn import_replaces_a_set_and_export_round_trips(store: &SqlStore) {
    let imported = store
        .import(actor(), "prod".into(), "web".into(), document())
        .await
        .unwrap();
    assert_eq!((imported.value.flags, imported.value.segments), (2, 1));
    assert_eq!(imported.config_version, Some(1));
    let exported = store.export("prod".into(), "web".into()).await.unwrap();
    let mut expected = document();
    expected.as_object_mut().unwrap().remove("$schema");
    assert_eq!(exported, expected);

    // The same document again changes nothing.
    let again = store
        .import(actor(), "prod".into(), "web".into(), exported.clone())
        .await
        .unwrap();
    assert_eq!(again.config_version, None);

    // Managed fields survive a re-import; flags and segments not in the document go.
    let mut input = FlagInput::new(document()["flags"]["limit"].clone());
    input.owner = "ops-team".into();
    input.tags = vec!["infra".into()];
    store
        .put_flag(
            actor(),
            "prod".into(),
            "web".into(),
            "limit".into(),
            input,
            Precondition::Any,
        )
        .await
        .unwrap();
    let smaller = json!({"flags": {"limit": {"state": "ENABLED", "variants": {"low": 1, "high": 100}, "defaultVariant": "high"}}});
    let replaced = store
        .import(actor(), "prod".into(), "web".into(), smaller.clone())
        .await
        .unwrap();
    assert_eq!(
        replaced.value.changed, 4,
        "limit changed; banner, staff and the metadata went"
    );
    let limit = store
        .get_flag("prod".into(), "web".into(), "limit".into())
        .await
        .unwrap();
    assert_eq!(
        (limit.owner.as_str(), limit.tags.clone()),
        ("ops-team", vec!["infra".to_owned()])
    );
    assert_eq!(store.export("prod".into(), "web".into()).await.unwrap(), smaller);
    let audit = store
        .audit(
            AuditFilter {
                entity: Some("prod/web".into()),
                ..AuditFilter::default()
            },
            PageRequest::first(4),
        )
        .await
        .unwrap();
    assert!(audit.items.iter().all(|e| e.action == "import"), "{audit:?}");
}

async fn an_invalid_import_stores_nothing(store: &SqlStore) {
    let mut bad = document();
    bad["flags"]["limit"]["defaultVariant"] = json!("medium");
    bad["flags"]["banner"]["targeting"] = json!({"if": [{"$ref": "nobody"}, "big", null]});
    let Err(StoreError::Invalid(problems)) = store.import(actor(), "fresh".into(), "web".into(), bad).await else {
        panic!("an invalid document was imported");
    };
    let pointers: Vec<&str> = problems.iter().map(|p| p.pointer.as_str()).collect();
    assert!(pointers.iter().any(|p| p.starts_with("/flags/limit")), "{problems:?}");
    assert!(
        pointers.iter().any(|p| p.starts_with("/flags/banner/targeting")),
        "{problems:?}"
    );
    // Not even the environment it would have created.
    assert!(matches!(
        store.get_environment("fresh".into()).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(
        store
            .audit(AuditFilter::default(), PageRequest::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let not_a_document = store.import(actor(), "fresh".into(), "web".into(), json!([1, 2])).await;
    assert!(matches!(not_a_document, Err(StoreError::Invalid(_))));
}

async fn api_keys_are_shown_once_stored_hashed_and_revocable(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    assert!(!store.has_api_keys().await.unwrap());
    let created = store
        .create_api_key(
            actor(),
            ApiKeyInput {
                name: "checkout service".into(),
                environment: Some("prod".into()),
                role: Role::Evaluate,
            },
        )
        .await
        .unwrap();
    assert!(created.secret.starts_with(&format!("vx_{}_", created.key.prefix)));
    assert!(store.has_api_keys().await.unwrap());
    let found = store
        .authenticate(created.secret.clone())
        .await
        .unwrap()
        .expect("the key authenticates");
    assert_eq!(found, created.key);
    assert_eq!(
        (found.role, found.environment.as_deref()),
        (Role::Evaluate, Some("prod"))
    );

    let mut wrong = created.secret.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    assert_eq!(store.authenticate(wrong).await.unwrap(), None);
    assert_eq!(store.authenticate("not a key".into()).await.unwrap(), None);

    let listed = store
        .list_api_keys(Some("prod".into()), PageRequest::default())
        .await
        .unwrap()
        .items;
    assert_eq!(listed, std::slice::from_ref(&created.key));
    let audit = store
        .audit(
            AuditFilter {
                entity_kind: Some("api_key".into()),
                ..AuditFilter::default()
            },
            PageRequest::default(),
        )
        .await
        .unwrap()
        .items;
    let logged = serde_json::to_string(&audit).unwrap();
    assert!(
        !logged.contains(&created.secret[20..]),
        "the audit log holds key material: {logged}"
    );

    let unscoped = store
        .create_api_key(
            actor(),
            ApiKeyInput {
                name: "x".into(),
                environment: None,
                role: Role::Track,
            },
        )
        .await;
    assert!(matches!(unscoped, Err(StoreError::Invalid(_))), "{unscoped:?}");
    let global = store
        .create_api_key(
            actor(),
            ApiKeyInput {
                name: "ops".into(),
                environment: None,
                role: Role::Admin,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .authenticate(global.secret.clone())
            .await
            .unwrap()
            .unwrap()
            .environment,
        None
    );

    let revoked = store.revoke_api_key(actor(), created.key.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(store.authenticate(created.secret).await.unwrap(), None);
    assert!(matches!(
        store.revoke_api_key(actor(), 9999).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn concurrent_writers_are_serialized_and_stale_ones_conflict(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    put(store, "race", boolean_flag("on"), Precondition::Absent)
        .await
        .unwrap();
    let store = Arc::new(store.clone());
    // Eight writers hold version 1; exactly one wins.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut flag = boolean_flag("off");
                flag["metadata"] = json!({"writer": i});
                put(&store, "race", flag, Precondition::Version(1)).await
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(w) => {
                won += 1;
                assert_eq!(w.value.version, 2);
            }
            Err(StoreError::Conflict {
                expected: 1, actual: 2, ..
            }) => {}
            Err(other) => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(won, 1);
    // Writers of different flags all succeed, each with its own config version.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { put(&store, &format!("f{i}"), boolean_flag("on"), Precondition::Absent).await })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap().unwrap().config_version.unwrap());
    }
    versions.sort();
    assert_eq!(versions, (4..12).collect::<Vec<i64>>());
    assert_eq!(store.get_environment("prod".into()).await.unwrap().config_version, 11);
}

async fn the_audit_log_filters_and_pages(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    with_set(store, "dev", "web").await;
    for i in 0..5 {
        store
            .put_flag(
                Actor::new(if i % 2 == 0 { "alice" } else { "bob" }),
                "prod".into(),
                "web".into(),
                format!("f{i}"),
                FlagInput::new(boolean_flag("on")),
                Precondition::Any,
            )
            .await
            .unwrap();
    }
    let by_alice = AuditFilter {
        actor: Some("alice".into()),
        ..AuditFilter::default()
    };
    assert_eq!(
        store.audit(by_alice, PageRequest::default()).await.unwrap().items.len(),
        3
    );
    let in_dev = AuditFilter {
        environment: Some("dev".into()),
        ..AuditFilter::default()
    };
    let dev = store.audit(in_dev, PageRequest::default()).await.unwrap().items;
    assert_eq!(
        dev.iter().map(|e| e.entity.as_str()).collect::<Vec<_>>(),
        ["dev/web", "dev"]
    );
    // `prod/web` matches the set and everything under it, not `prod/webx`.
    let under = AuditFilter {
        entity: Some("prod/web".into()),
        ..AuditFilter::default()
    };
    assert_eq!(store.audit(under, PageRequest::default()).await.unwrap().items.len(), 6);
    let flags = AuditFilter {
        entity_kind: Some("flag".into()),
        ..AuditFilter::default()
    };
    let mut seen = Vec::new();
    let mut page = PageRequest::first(2);
    loop {
        let got = store.audit(flags.clone(), page.clone()).await.unwrap();
        seen.extend(got.items.iter().map(|e| e.entity.clone()));
        match got.next {
            Some(token) => page.token = Some(token),
            None => break,
        }
    }
    assert_eq!(
        seen,
        [
            "prod/web/f4",
            "prod/web/f3",
            "prod/web/f2",
            "prod/web/f1",
            "prod/web/f0"
        ]
    );
    let all = store
        .audit(AuditFilter::default(), PageRequest::default())
        .await
        .unwrap()
        .items;
    let (first, last) = (all.last().unwrap().at, all[0].at);
    let window = AuditFilter {
        since: Some(first),
        until: Some(last + 1),
        ..AuditFilter::default()
    };
    assert_eq!(
        store.audit(window, PageRequest::default()).await.unwrap().items.len(),
        all.len()
    );
    let none = AuditFilter {
        until: Some(first),
        ..AuditFilter::default()
    };
    assert!(
        store
            .audit(none, PageRequest::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

async fn lists_page_with_tokens(store: &SqlStore) {
    for env in ["a", "b", "c", "d", "e"] {
        store
            .create_environment(actor(), env.into(), EnvironmentInput::default())
            .await
            .unwrap();
    }
    let first = store.list_environments(PageRequest::first(2)).await.unwrap();
    assert_eq!(
        first.items.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let second = store
        .list_environments(PageRequest {
            token: first.next.clone(),
            size: 2,
        })
        .await
        .unwrap();
    assert_eq!(
        second.items.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["c", "d"]
    );
    let third = store
        .list_environments(PageRequest {
            token: second.next,
            size: 2,
        })
        .await
        .unwrap();
    assert_eq!((third.items.len(), third.next), (1, None));
    let bad = store
        .list_environments(PageRequest {
            token: Some("xyz".into()),
            size: 2,
        })
        .await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");

    store
        .put_flag_set(
            actor(),
            "a".into(),
            "web".into(),
            FlagSetInput::default(),
            Precondition::Any,
        )
        .await
        .unwrap();
    for i in 0..5 {
        store
            .put_flag(
                actor(),
                "a".into(),
                "web".into(),
                format!("f{i}"),
                FlagInput::new(boolean_flag("on")),
                Precondition::Any,
            )
            .await
            .unwrap();
    }
    let mut keys = Vec::new();
    let mut page = PageRequest::first(3);
    loop {
        let got = store.list_flags("a".into(), "web".into(), page.clone()).await.unwrap();
        keys.extend(got.items.into_iter().map(|f| f.key));
        match got.next {
            Some(token) => page.token = Some(token),
            None => break,
        }
    }
    assert_eq!(keys, ["f0", "f1", "f2", "f3", "f4"]);
    let versions = store.list_versions("a".into(), PageRequest::first(4)).await.unwrap();
    assert_eq!(
        versions.items.iter().map(|v| v.version).collect::<Vec<_>>(),
        [6, 5, 4, 3]
    );
    let rest = store
        .list_versions(
            "a".into(),
            PageRequest {
                token: versions.next,
                size: 4,
            },
        )
        .await
        .unwrap();
    assert_eq!(rest.items.iter().map(|v| v.version).collect::<Vec<_>>(), [2, 1]);
}

/// Changed keys, with each one's definition after the change (`None`: deleted).
type KeysAndDefinitions<'a> = Vec<(&'a str, Option<&'a Value>)>;

async fn history_gives_each_version_s_changes_in_order(store: &SqlStore) {
    with_set(store, "prod", "web").await; // 1
    put(store, "a", boolean_flag("on"), Precondition::Any).await.unwrap(); // 2
    put(store, "b", boolean_flag("on"), Precondition::Any).await.unwrap(); // 3
    put(store, "a", boolean_flag("off"), Precondition::Any).await.unwrap(); // 4
    store
        .delete_flag(actor(), "prod".into(), "web".into(), "b".into(), Precondition::Any)
        .await
        .unwrap(); // 5
    let history = store.history("prod".into(), 2, 100).await.unwrap();
    assert_eq!(history.current, 5);
    let seen: Vec<(i64, KeysAndDefinitions<'_>)> = history
        .versions
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| {
            let changes = v
                .changes
                .iter()
                .map(|c| (c.key.as_str(), c.after.as_ref().map(|b| &b["definition"])))
                .collect();
            (v.version, changes)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (3, vec![("b", Some(&boolean_flag("on")))]),
            (4, vec![("a", Some(&boolean_flag("off")))]),
            (5, vec![("b", None)]),
        ]
    );
    let all_flags = history.versions.as_ref().unwrap().iter().flat_map(|v| &v.changes);
    assert!(
        all_flags
            .clone()
            .all(|c| c.kind == EntityKind::Flag && c.flag_set == "web")
    );
    let up_to_date = store.history("prod".into(), 5, 100).await.unwrap();
    assert_eq!((up_to_date.current, up_to_date.versions), (5, Some(Vec::new())));
    let first = store.history("prod".into(), 0, 100).await.unwrap().versions.unwrap();
    assert_eq!(first.len(), 5);
    assert_eq!(
        (first[0].changes[0].kind, first[0].changes[0].key.as_str()),
        (EntityKind::FlagSet, "web")
    );
    // Beyond the limit: too far behind, read the environment whole.
    let far = store.history("prod".into(), 0, 4).await.unwrap();
    assert_eq!((far.current, far.versions), (5, None));
    assert!(store.history("prod".into(), 1, 4).await.unwrap().versions.is_some());
    assert!(matches!(
        store.history("nope".into(), 0, 10).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn the_outbox_waits_for_its_grace_period(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    // Written now: not a minute old, so not yet another replica's to relay.
    assert!(
        store
            .pending_outbox(100, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.pending_outbox(100, Duration::ZERO).await.unwrap().len(), 1);
}

fn experiment_input(traffic: f64) -> ExperimentInput {
    ExperimentInput {
        flag: "banner".into(),
        name: "Banner copy".into(),
        description: String::new(),
        hypothesis: "on converts better".into(),
        audience: Some(json!({"==": [{"var": "plan"}, "pro"]})),
        traffic_percent: traffic,
        weights: vec![
            VariantWeight {
                variant: "off".into(),
                weight: 1,
            },
            VariantWeight {
                variant: "on".into(),
                weight: 1,
            },
        ],
        metrics: vec![MetricSpec {
            key: "purchase".into(),
            kind: MetricKind::Binomial,
            role: MetricRole::Primary,
            lower_is_better: false,
        }],
        salt: None,
        layer: None,
    }
}

async fn put_experiment(store: &SqlStore, key: &str, input: ExperimentInput) -> Result<Written<ExperimentRecord>> {
    store
        .put_experiment(
            actor(),
            "prod".into(),
            "web".into(),
            key.into(),
            input,
            Precondition::Any,
        )
        .await
}

async fn move_to(
    store: &SqlStore,
    key: &str,
    to: ExperimentStatus,
    winner: Option<&str>,
) -> Result<Written<ExperimentRecord>> {
    store
        .transition_experiment(
            actor(),
            "prod".into(),
            key.into(),
            to,
            winner.map(str::to_owned),
            Precondition::Any,
        )
        .await
}

/// The `$experiments` of the `web` set's served document.
async fn served_experiments(store: &SqlStore) -> Option<Value> {
    let snapshot = store.snapshot("prod".into()).await.unwrap();
    let (_, document) = snapshot.flag_sets.iter().find(|(set, _)| set == "web").unwrap();
    document.get("$experiments").cloned()
}

async fn experiments_move_through_their_lifecycle_and_reach_the_snapshot_while_they_matter(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    put(store, "banner", boolean_flag("off"), Precondition::Any)
        .await
        .unwrap();
    let created = put_experiment(store, "banner-copy", experiment_input(50.0))
        .await
        .unwrap();
    let def = &created.value.definition;
    assert_eq!(def.status, ExperimentStatus::Draft);
    assert!(def.id.starts_with('x') && def.id.len() == 17, "{}", def.id);
    assert_eq!(def.salt(), def.id, "the salt defaults to the id");
    assert!(
        created.config_version.is_some(),
        "an experiment write is a config change"
    );
    assert_eq!(served_experiments(store).await, None, "a draft is not served");

    let started = move_to(store, "banner-copy", ExperimentStatus::Running, None)
        .await
        .unwrap();
    assert!(started.value.definition.started_at.is_some());
    let served = served_experiments(store).await.expect("a running experiment is served");
    assert_eq!(
        served["banner-copy"],
        json!({
            "id": def.id, "flag": "banner", "status": "running", "salt": def.id, "traffic": 500_000,
            "weights": [{"variant": "off", "weight": 1}, {"variant": "on", "weight": 1}],
            "audience": {"==": [{"var": "plan"}, "pro"]}
        })
    );

    // Running: the allocation is locked, the traffic share may ramp.
    let mut reweighted = experiment_input(50.0);
    reweighted.weights[1].weight = 3;
    let locked = put_experiment(store, "banner-copy", reweighted).await;
    assert!(matches!(locked, Err(StoreError::FailedPrecondition(_))), "{locked:?}");
    let ramped = put_experiment(store, "banner-copy", experiment_input(80.0))
        .await
        .unwrap();
    assert_eq!(ramped.value.definition.input.traffic_percent, 80.0);
    assert_eq!(ramped.value.definition.id, def.id);
    assert_eq!(
        served_experiments(store).await.unwrap()["banner-copy"]["traffic"],
        800_000
    );

    // Lifecycle steps that do not exist are refused.
    let skip = move_to(store, "banner-copy", ExperimentStatus::Archived, None).await;
    assert!(matches!(skip, Err(StoreError::FailedPrecondition(_))), "{skip:?}");
    let undeletable = store
        .delete_experiment(actor(), "prod".into(), "banner-copy".into(), Precondition::Any)
        .await;
    assert!(
        matches!(undeletable, Err(StoreError::FailedPrecondition(_))),
        "{undeletable:?}"
    );
    let early_winner = move_to(store, "banner-copy", ExperimentStatus::Running, Some("on")).await;
    assert!(matches!(early_winner, Err(StoreError::Invalid(_))), "{early_winner:?}");

    move_to(store, "banner-copy", ExperimentStatus::Paused, None)
        .await
        .unwrap();
    assert_eq!(
        served_experiments(store).await.unwrap()["banner-copy"]["status"],
        "paused"
    );
    move_to(store, "banner-copy", ExperimentStatus::Running, None)
        .await
        .unwrap();
    let bad_winner = move_to(store, "banner-copy", ExperimentStatus::Stopped, Some("purple")).await;
    assert!(matches!(bad_winner, Err(StoreError::Invalid(_))), "{bad_winner:?}");
    let stopped = move_to(store, "banner-copy", ExperimentStatus::Stopped, Some("on"))
        .await
        .unwrap();
    assert!(stopped.value.definition.stopped_at.is_some());
    let served = served_experiments(store).await.unwrap();
    assert_eq!(
        (&served["banner-copy"]["status"], &served["banner-copy"]["winner"]),
        (&json!("stopped"), &json!("on"))
    );
    // Stopped, the allocation stays locked.
    let locked = put_experiment(store, "banner-copy", experiment_input(10.0).with_flag("other")).await;
    assert!(matches!(locked, Err(StoreError::FailedPrecondition(_))), "{locked:?}");

    move_to(store, "banner-copy", ExperimentStatus::Archived, None)
        .await
        .unwrap();
    assert_eq!(served_experiments(store).await, None, "archived: no longer served");

    let audit = store
        .audit(
            AuditFilter {
                entity_kind: Some("experiment".into()),
                ..AuditFilter::default()
            },
            PageRequest::default(),
        )
        .await
        .unwrap();
    let actions: Vec<&str> = audit.items.iter().rev().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["create", "start", "update", "pause", "resume", "stop", "archive"]
    );
    store
        .delete_experiment(actor(), "prod".into(), "banner-copy".into(), Precondition::Any)
        .await
        .unwrap();
    let gone = store.get_experiment("prod".into(), "banner-copy".into()).await;
    assert!(matches!(gone, Err(StoreError::NotFound(_))), "{gone:?}");
}

trait WithFlag {
    fn with_flag(self, flag: &str) -> Self;
}

impl WithFlag for ExperimentInput {
    fn with_flag(mut self, flag: &str) -> Self {
        self.flag = flag.into();
        self
    }
}

fn pointers(result: Result<Written<ExperimentRecord>>) -> Vec<String> {
    match result {
        Err(StoreError::Invalid(problems)) => problems.into_iter().map(|p| p.pointer).collect(),
        other => panic!("expected invalid, got {other:?}"),
    }
}

async fn experiments_are_checked_against_their_flag_and_guard_it(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    put(store, "banner", boolean_flag("off"), Precondition::Any)
        .await
        .unwrap();
    put(store, "other", boolean_flag("off"), Precondition::Any)
        .await
        .unwrap();

    let missing = put_experiment(store, "x", experiment_input(50.0).with_flag("nope")).await;
    assert_eq!(pointers(missing), ["/flag"]);
    let mut purple = experiment_input(50.0);
    purple.weights[1].variant = "purple".into();
    assert_eq!(
        pointers(put_experiment(store, "x", purple).await),
        ["/weights/1/variant"]
    );
    let mut bad = experiment_input(150.0);
    bad.weights.push(bad.weights[0].clone());
    bad.audience = Some(json!({"invalid": [1]}));
    let found = pointers(put_experiment(store, "x", bad).await);
    assert_eq!(found, ["/trafficPercent", "/weights/2/variant"]);
    let mut bad_audience = experiment_input(50.0);
    bad_audience.audience = Some(json!(["not", "a", "rule"]));
    assert_eq!(pointers(put_experiment(store, "x", bad_audience).await), ["/audience"]);
    assert_eq!(
        store
            .list_experiments("prod".into(), PageRequest::default())
            .await
            .unwrap()
            .items,
        [],
        "nothing invalid is stored"
    );

    put_experiment(store, "banner-copy", experiment_input(50.0))
        .await
        .unwrap();
    move_to(store, "banner-copy", ExperimentStatus::Running, None)
        .await
        .unwrap();
    // A flag a running experiment allocates keeps the variants it allocates, and stays.
    let narrowed = put(
        store,
        "banner",
        json!({"state": "ENABLED", "variants": {"off": false}, "defaultVariant": "off"}),
        Precondition::Any,
    )
    .await;
    assert!(matches!(narrowed, Err(StoreError::Invalid(_))), "{narrowed:?}");
    let deleted = store
        .delete_flag(actor(), "prod".into(), "web".into(), "banner".into(), Precondition::Any)
        .await;
    assert!(matches!(deleted, Err(StoreError::Invalid(_))), "{deleted:?}");
    // A second experiment on the same flag cannot run at the same time.
    put_experiment(store, "second", experiment_input(50.0)).await.unwrap();
    let both = move_to(store, "second", ExperimentStatus::Running, None).await;
    assert!(matches!(both, Err(StoreError::Invalid(_))), "{both:?}");

    // Layers: slices of one layer running at once must not overlap.
    let layered = |start: f64, end: f64| {
        let mut input = experiment_input(100.0).with_flag("other");
        input.layer = Some(LayerSpec {
            key: "homepage".into(),
            start_percent: start,
            end_percent: end,
        });
        input
    };
    put_experiment(store, "layer-a", layered(0.0, 50.0)).await.unwrap();
    move_to(store, "layer-a", ExperimentStatus::Running, None)
        .await
        .unwrap();
    put(store, "third", boolean_flag("on"), Precondition::Any)
        .await
        .unwrap();
    put_experiment(store, "layer-b", layered(40.0, 100.0).with_flag("third"))
        .await
        .unwrap();
    let overlapping = move_to(store, "layer-b", ExperimentStatus::Running, None).await;
    assert!(
        matches!(overlapping, Err(StoreError::FailedPrecondition(_))),
        "{overlapping:?}"
    );
    put_experiment(store, "layer-b", layered(50.0, 100.0).with_flag("third"))
        .await
        .unwrap();
    move_to(store, "layer-b", ExperimentStatus::Running, None)
        .await
        .unwrap();
    let served = served_experiments(store).await.unwrap();
    assert_eq!(
        served["layer-b"]["layer"],
        json!({"key": "homepage", "start": 500_000, "end": 1_000_000})
    );
}

async fn experiments_are_versioned_rolled_back_and_go_with_their_flag_set(store: &SqlStore) {
    with_set(store, "prod", "web").await;
    put(store, "banner", boolean_flag("off"), Precondition::Any)
        .await
        .unwrap();
    let created = put_experiment(store, "banner-copy", experiment_input(50.0))
        .await
        .unwrap();
    let draft_version = created.config_version.unwrap();
    let started = move_to(store, "banner-copy", ExperimentStatus::Running, None)
        .await
        .unwrap();
    let history = store.history("prod".into(), draft_version, 10).await.unwrap();
    let versions = history.versions.unwrap();
    assert_eq!(versions.len(), 1);
    let change = &versions[0].changes[0];
    assert_eq!(
        (change.kind, change.key.as_str()),
        (EntityKind::Experiment, "banner-copy")
    );
    assert_eq!(change.after.as_ref().unwrap()["status"], "running");

    // Rolling back to the draft's version takes the experiment back to its draft.
    store.rollback(actor(), "prod".into(), draft_version).await.unwrap();
    let back = store.get_experiment("prod".into(), "banner-copy".into()).await.unwrap();
    assert_eq!(back.definition.status, ExperimentStatus::Draft);
    assert_eq!(back.definition.id, started.value.definition.id);
    assert_eq!(served_experiments(store).await, None);

    // Deleting the flag set deletes its experiments, recorded so a rollback restores them.
    let before_delete = store
        .delete_flag_set(actor(), "prod".into(), "web".into(), Precondition::Any)
        .await
        .unwrap()
        .config_version
        .unwrap();
    let gone = store.get_experiment("prod".into(), "banner-copy".into()).await;
    assert!(matches!(gone, Err(StoreError::NotFound(_))), "{gone:?}");
    store.rollback(actor(), "prod".into(), before_delete - 1).await.unwrap();
    let restored = store.get_experiment("prod".into(), "banner-copy".into()).await.unwrap();
    assert_eq!(restored.definition, back.definition);
}
