//! Replicas: several `vexil` processes sharing one Postgres and one Redis. A write through any of
//! them reaches every subscriber of every other (Vexil's Watch, flagd's EventStream and SyncFlags,
//! OpenFeature providers in RPC and in-process mode); Redis and Postgres outages stop neither
//! evaluation nor the delivery of changes; a replica killed between commit and publish loses
//! nothing; a watcher resumes on another replica with exactly what it missed.

use std::time::{Duration, Instant};

use open_feature::EvaluationContext;
use open_feature::provider::FeatureProvider;
use open_feature_flagd::{FlagdOptions, FlagdProvider, ResolverType};
use serde_json::{Value, json};
use tonic::transport::Channel;
use vexil_e2e::Server;
use vexil_proto::flagd::evaluation::v1;
use vexil_proto::flagd::sync::v1 as sync;
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::admin_service_client::AdminServiceClient;
use vexil_proto::vexil::v1::config_service_client::ConfigServiceClient;
use vexil_store::Store as _;

const DEADLINE: Duration = Duration::from_secs(30);

/// A poll interval long enough that, within a test, only a change message can deliver a change
/// (the version check runs once, at start).
const NO_POLLING: &str = "600000";

fn replica(database: &str, redis: &str, poll_ms: &str) -> Server {
    replica_with_env(database, redis, poll_ms, &[])
}

fn replica_with_env(database: &str, redis: &str, poll_ms: &str, env: &[(&str, &str)]) -> Server {
    Server::start_with_env(
        &[
            "--database-url",
            database,
            "--redis-url",
            redis,
            "--store-poll-interval-ms",
            poll_ms,
            "--stale-after",
            "0",
        ],
        env,
    )
}

fn color_flag(color: &str) -> vexil_proto::JsonStruct {
    let definition = json!({
        "state": "ENABLED",
        "variants": {"blue": "blue", "red": "red", "green": "green", "amber": "amber", "white": "white"},
        "defaultVariant": color
    });
    match definition {
        Value::Object(map) => map.into(),
        _ => unreachable!(),
    }
}

fn put(key: &str, color: &str) -> pb::PutFlagRequest {
    pb::PutFlagRequest {
        environment: "default".into(),
        flag_set: "web".into(),
        key: key.into(),
        definition: Some(color_flag(color)),
        ..Default::default()
    }
}

async fn admin(server: &Server) -> AdminServiceClient<Channel> {
    AdminServiceClient::connect(server.grpc_url()).await.unwrap()
}

async fn flagd(server: &Server) -> v1::service_client::ServiceClient<Channel> {
    v1::service_client::ServiceClient::connect(server.grpc_url())
        .await
        .unwrap()
}

/// Creates the default environment's `web` set with `color` through `server`.
async fn seed(server: &Server, color: &str) {
    let mut admin = admin(server).await;
    admin
        .create_environment(pb::CreateEnvironmentRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .put_flag_set(pb::PutFlagSetRequest {
            environment: "default".into(),
            flag_set: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin.put_flag(put("color", color)).await.unwrap();
}

async fn color(client: &mut v1::service_client::ServiceClient<Channel>) -> Result<String, tonic::Code> {
    client
        .resolve_string(v1::ResolveStringRequest {
            flag_key: "color".into(),
            context: None,
        })
        .await
        .map(|r| r.into_inner().value)
        .map_err(|s| s.code())
}

/// Waits until `ok` holds, polling.
async fn until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < DEADLINE, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serves(server: &Server, want: &str) {
    let mut client = flagd(server).await;
    until(&format!("{} serves {want}", server.grpc_url()), async || {
        color(&mut client).await.as_deref() == Ok(want)
    })
    .await;
}

async fn metric(server: &Server, name: &str) -> f64 {
    let text = reqwest::get(server.management_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn readyz(server: &Server) -> (u16, String) {
    let response = reqwest::get(server.management_url("/readyz")).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn provider(mode: ResolverType, port: u16) -> FlagdProvider {
    FlagdProvider::new(FlagdOptions {
        host: "127.0.0.1".into(),
        port,
        resolver_type: mode,
        cache_settings: None,
        deadline_ms: 2000,
        ..Default::default()
    })
    .await
    .expect("the provider connects")
}

async fn provider_serves(provider: &FlagdProvider, want: &str) {
    until(&format!("the provider resolves {want}"), async || {
        let got = provider
            .resolve_string_value("color", &EvaluationContext::default())
            .await
            .map(|d| d.value);
        got.as_deref() == Ok(want)
    })
    .await;
}

async fn watch(server: &Server, since_version: i64) -> tonic::Streaming<pb::ConfigEvent> {
    ConfigServiceClient::connect(server.grpc_url())
        .await
        .unwrap()
        .watch(pb::WatchRequest {
            environment: "default".into(),
            flag_set: String::new(),
            since_version,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("a message within the deadline")
        .unwrap()
        .expect("the stream is open")
}

/// The keys a change event changed, with the new default variant of each (`None`: deleted).
fn changed(event: &pb::ConfigEvent) -> Vec<(String, Option<String>)> {
    let Some(pb::config_event::Event::Changes(changes)) = &event.event else {
        panic!("expected a changes event: {event:?}");
    };
    changes
        .changes
        .iter()
        .map(|c| {
            let after = c.after.clone().map(|a| serde_json::to_value(a).unwrap());
            let variant = after.map(|a| a["definition"]["defaultVariant"].as_str().unwrap().to_owned());
            (c.key.clone(), variant)
        })
        .collect()
}

/// A database, a Redis, and two replicas on them: `a` seeded `color` = blue, and `b` serves it.
struct Cluster {
    database: vexil_testkit::TestDatabase,
    redis: vexil_testkit::RedisServer,
    a: Server,
    b: Server,
}

async fn cluster(poll_ms: &str) -> Cluster {
    let database = vexil_testkit::postgres().database().await;
    let redis = vexil_testkit::redis();
    let a = replica(database.url(), redis.url(), poll_ms);
    seed(&a, "blue").await;
    let b = replica(database.url(), redis.url(), poll_ms);
    serves(&b, "blue").await;
    Cluster { database, redis, a, b }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_replica_reaches_every_subscriber_of_the_others() {
    let database = vexil_testkit::postgres().database().await;
    let redis = vexil_testkit::redis();
    // No polling: only the outbox relay's change messages can carry the write to b and c.
    let a = replica(database.url(), redis.url(), NO_POLLING);
    seed(&a, "blue").await;
    let (b, c) = (
        replica(database.url(), redis.url(), NO_POLLING),
        replica(database.url(), redis.url(), NO_POLLING),
    );
    serves(&b, "blue").await;
    serves(&c, "blue").await;

    // Subscribers on b and c: Vexil's Watch, flagd's EventStream and SyncFlags, and OpenFeature
    // providers in RPC (c) and in-process (b) mode.
    let mut watching = watch(&b, 0).await;
    let first = next(&mut watching).await;
    assert!(matches!(first.event, Some(pb::config_event::Event::Snapshot(_))));
    let mut events = flagd(&c)
        .await
        .event_stream(v1::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut events).await.r#type, "provider_ready");
    let mut syncs = sync::flag_sync_service_client::FlagSyncServiceClient::connect(b.sync_url())
        .await
        .unwrap()
        .sync_flags(sync::SyncFlagsRequest {
            provider_id: "e2e".into(),
            selector: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    next(&mut syncs).await;
    let rpc = provider(ResolverType::Rpc, c.ports.evaluation).await;
    let in_process = provider(ResolverType::InProcess, b.ports.sync).await;
    provider_serves(&rpc, "blue").await;
    provider_serves(&in_process, "blue").await;

    admin(&a).await.put_flag(put("color", "red")).await.unwrap();

    let event = next(&mut watching).await;
    assert_eq!(event.config_version, first.config_version + 1);
    assert_eq!(changed(&event), [("color".to_owned(), Some("red".to_owned()))]);
    let change = next(&mut events).await;
    assert_eq!(change.r#type, "configuration_change");
    let data = serde_json::to_value(change.data.unwrap()).unwrap();
    assert_eq!(data["flags"]["color"]["type"], "update", "{data}");
    let payload = next(&mut syncs).await;
    let config: Value = serde_json::from_str(&payload.flag_configuration).unwrap();
    assert_eq!(config["flags"]["color"]["defaultVariant"], "red");
    provider_serves(&rpc, "red").await;
    provider_serves(&in_process, "red").await;
    for replica in [&a, &b, &c] {
        serves(replica, "red").await;
    }
    // It was the bus: b and c received the message a's relay published.
    assert!(metric(&a, "vexil_outbox_published_total").await >= 1.0);
    for replica in [&b, &c] {
        assert!(metric(replica, "vexil_config_messages_received_total").await >= 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_arrive_while_redis_is_down_and_pub_sub_resumes_after() {
    let Cluster { database, redis, a, b } = cluster("200").await;

    redis.stop();
    // Writes still commit; b finds them by the database's version check.
    admin(&a).await.put_flag(put("color", "green")).await.unwrap();
    serves(&b, "green").await;
    until("b's readiness reports the cache down", async || {
        let (status, body) = readyz(&b).await;
        status == 200 && body.contains("config cache redis: unreachable")
    })
    .await;
    let mut client = flagd(&b).await;
    assert_eq!(color(&mut client).await, Ok("green".into()));
    // A replica starting meanwhile does not wait for Redis: it reads the database.
    let c = replica(database.url(), redis.url(), "200");
    serves(&c, "green").await;

    redis.start();
    until("b's readiness no longer reports the cache", async || {
        !readyz(&b).await.1.contains("config cache")
    })
    .await;
    // The message of the write made while Redis was down (relayed once it is back) and of the
    // next one reach b over pub/sub again.
    let received = metric(&b, "vexil_config_messages_received_total").await;
    admin(&a).await.put_flag(put("color", "amber")).await.unwrap();
    serves(&b, "amber").await;
    serves(&c, "amber").await;
    until("b receives change messages again", async || {
        metric(&b, "vexil_config_messages_received_total").await > received
    })
    .await;
    assert_eq!(metric(&b, r#"vexil_config_cache_up{kind="redis"}"#).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_evaluating_through_a_postgres_outage_and_converge_after() {
    let postgres = vexil_testkit::PostgresServer::start_dedicated();
    let url = postgres.url("postgres");
    let redis = vexil_testkit::redis();
    let a = replica(&url, redis.url(), "200");
    seed(&a, "blue").await;
    let b = replica(&url, redis.url(), "200");
    serves(&b, "blue").await;

    postgres.stop();
    let failed = admin(&b).await.put_flag(put("color", "red")).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    for replica in [&a, &b] {
        let mut client = flagd(replica).await;
        for _ in 0..20 {
            assert_eq!(color(&mut client).await, Ok("blue".into()));
        }
        until("readiness reports the store failing", async || {
            let (status, body) = readyz(replica).await;
            status == 200 && body.contains("source store: failing")
        })
        .await;
    }

    postgres.start();
    let mut admin_b = admin(&b).await;
    until("writes succeed again", async || {
        admin_b.put_flag(put("color", "white")).await.is_ok()
    })
    .await;
    serves(&a, "white").await;
    serves(&b, "white").await;
    for replica in [&a, &b] {
        until("readiness is clean again", async || {
            readyz(replica).await == (200, "ready".into())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_between_commit_and_publish_loses_nothing() {
    let database = vexil_testkit::postgres().database().await;
    let redis = vexil_testkit::redis();
    let a = replica(database.url(), redis.url(), NO_POLLING);
    seed(&a, "blue").await;
    let store = vexil_store::SqlStore::open(database.url()).await.unwrap();
    until("a's writes are published", async || {
        store.pending_outbox(10, Duration::ZERO).await.unwrap().is_empty()
    })
    .await;
    let b = replica(database.url(), redis.url(), NO_POLLING);
    let c = replica(database.url(), redis.url(), NO_POLLING);
    serves(&b, "blue").await;
    serves(&c, "blue").await;

    // d aborts right after its write commits, before announcing it.
    let mut d = replica_with_env(
        database.url(),
        redis.url(),
        NO_POLLING,
        &[("VEXIL_FAIL_POINT", "after-commit")],
    );
    let crashed = admin(&d).await.put_flag(put("color", "green")).await;
    assert!(crashed.is_err(), "the writer died before answering: {crashed:?}");
    assert!(!d.stop(), "the writer aborted");
    let pending = store.pending_outbox(10, Duration::ZERO).await.unwrap();
    assert_eq!(pending.len(), 1, "the commit's outbox row is there, unpublished");

    // Another replica's relay publishes it after the grace period; everyone serves it.
    for replica in [&a, &b, &c] {
        serves(replica, "green").await;
    }
    assert!(store.pending_outbox(10, Duration::ZERO).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_resumes_on_another_replica_with_exactly_what_it_missed() {
    let Cluster { database, redis, a, b } = cluster("200").await;

    let mut first = watch(&a, 0).await;
    let seen = next(&mut first).await.config_version;
    drop(first);

    let mut writer = admin(&a).await;
    writer.put_flag(put("color", "red")).await.unwrap();
    writer.put_flag(put("size", "green")).await.unwrap();
    writer
        .delete_flag(pb::DeleteFlagRequest {
            environment: "default".into(),
            flag_set: "web".into(),
            key: "size".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let missed = [
        vec![("color".to_owned(), Some("red".to_owned()))],
        vec![("size".to_owned(), Some("green".to_owned()))],
        vec![("size".to_owned(), None)],
    ];
    // b held those versions as they came (its recent history); c starts after them and reads
    // them from the store.
    let c = replica(database.url(), redis.url(), "200");
    let mut streams = Vec::new();
    for replica in [&b, &c] {
        let mut resumed = watch(replica, seen).await;
        for (n, want) in missed.iter().enumerate() {
            let event = next(&mut resumed).await;
            assert_eq!(event.config_version, seen + 1 + n as i64);
            assert_eq!(&changed(&event), want);
        }
        streams.push(resumed);
    }
    // Nothing twice: the next event of each is the next write.
    writer.put_flag(put("color", "white")).await.unwrap();
    for resumed in &mut streams {
        let event = next(resumed).await;
        assert_eq!(event.config_version, seen + 4);
        assert_eq!(changed(&event), [("color".to_owned(), Some("white".to_owned()))]);
    }
    // Further behind than anyone keeps: a watcher from version 0 starts with a snapshot.
    let mut fresh = watch(&c, 0).await;
    assert!(matches!(
        next(&mut fresh).await.event,
        Some(pb::config_event::Event::Snapshot(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_replica_reads_the_snapshot_from_redis() {
    let database = vexil_testkit::postgres().database().await;
    let redis = vexil_testkit::redis();
    let a = replica(database.url(), redis.url(), "100");
    seed(&a, "blue").await;
    until("a writes its snapshot to Redis", async || {
        metric(&a, "vexil_config_cache_writes_total").await >= 1.0
    })
    .await;
    let b = replica(database.url(), redis.url(), "100");
    serves(&b, "blue").await;
    assert_eq!(metric(&b, r#"vexil_store_loads_total{from="cache"}"#).await, 1.0);
    assert_eq!(metric(&b, r#"vexil_store_loads_total{from="database"}"#).await, 0.0);
}
