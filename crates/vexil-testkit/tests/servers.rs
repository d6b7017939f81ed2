//! The testkit against real servers: the installed PostgreSQL and Redis binaries.

use std::env;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, SqliteConnection};
use vexil_testkit::{DATABASE_URL_ENV, PostgresServer, REDIS_URL_ENV, postgres, redis, sqlite};

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
}

async fn select_one(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT 1").fetch_one(conn).await.expect("SELECT 1")
}

#[test]
fn postgres_is_one_server_for_the_process() {
    let first = postgres();
    let from_threads: Vec<usize> = (0..4)
        .map(|_| thread::spawn(|| postgres() as *const PostgresServer as usize))
        .map(|handle| handle.join().expect("thread calling postgres()"))
        .collect();
    assert!(std::ptr::eq(first, postgres()));
    assert!(
        from_threads
            .iter()
            .all(|&server| server == first as *const PostgresServer as usize)
    );
}

#[tokio::test]
async fn databases_are_distinct_and_usable() {
    let server = postgres();
    let (a, b) = (server.database().await, server.database().await);
    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());
    for db in [&a, &b] {
        let mut conn = connect(db.url()).await;
        assert_eq!(select_one(&mut conn).await, 1);
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut conn)
            .await
            .expect("name");
        assert_eq!(current, db.name());
        // The same table in both: each database is empty when handed out.
        sqlx::query("CREATE TABLE flags (key text PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .expect("CREATE TABLE");
        sqlx::query("INSERT INTO flags VALUES ('a')")
            .execute(&mut conn)
            .await
            .expect("INSERT");
        conn.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_test_database_drops_it() {
    let server = postgres();
    let db = server.database().await;
    let name = db.name().to_owned();
    // Still connected when dropped: WITH (FORCE) ends the session.
    let mut held = connect(db.url()).await;
    assert_eq!(select_one(&mut held).await, 1);
    drop(db);
    let mut admin = connect(&server.url("postgres")).await;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .expect("query pg_database");
    assert!(!exists, "{name} is still there");
}

/// Several threads, each with a runtime of its own, as parallel `#[tokio::test]`s have.
#[test]
fn postgres_serves_several_runtimes_at_once() {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async {
                    let db = postgres().database().await;
                    let mut conn = connect(db.url()).await;
                    select_one(&mut conn).await
                })
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().expect("thread"), 1);
    }
}

#[test]
#[should_panic(expected = "start_dedicated")]
fn the_shared_server_cannot_be_stopped() {
    postgres().stop();
}

#[tokio::test]
async fn dedicated_server_stops_and_starts_on_the_same_url() {
    let server = PostgresServer::start_dedicated();
    let dir = server.dir().expect("a throwaway server has a directory").to_owned();
    let port = server.port().expect("a throwaway server has a port");
    assert_ne!(Some(port), postgres().port(), "not the shared server");
    let db = server.database().await;
    let mut conn = connect(db.url()).await;
    sqlx::query("CREATE TABLE kept (n int)")
        .execute(&mut conn)
        .await
        .expect("CREATE TABLE");
    sqlx::query("INSERT INTO kept VALUES (7)")
        .execute(&mut conn)
        .await
        .expect("INSERT");

    server.stop();
    assert!(
        select_one_fails(&mut conn).await,
        "the open session ends with the server"
    );
    let err = PgConnection::connect(db.url())
        .await
        .expect_err("no server while stopped");
    assert!(!port_accepts(port), "nothing listens on {port} while stopped: {err}");
    server.stop(); // a second stop does nothing

    server.start();
    server.start(); // a second start does nothing
    let mut conn = connect(db.url()).await;
    let kept: i32 = sqlx::query_scalar("SELECT n FROM kept")
        .fetch_one(&mut conn)
        .await
        .expect("data kept");
    assert_eq!(kept, 7);
    conn.close().await.expect("close");

    drop(db);
    drop(server);
    assert!(!dir.exists(), "{} removed on drop", dir.display());
    assert!(!port_accepts(port), "server stopped on drop");
}

async fn select_one_fails(conn: &mut PgConnection) -> bool {
    sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(conn).await.is_err()
}

/// Sends one command in RESP and returns the reply's first line.
fn redis_command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    (&stream).write_all(request.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    Ok(reply.trim_end().to_owned())
}

fn redis_port(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

#[test]
fn redis_answers_and_restarts_on_the_same_port() {
    if let Ok(url) = env::var(REDIS_URL_ENV) {
        // That server is used as is, and not ours to stop.
        let server = redis();
        assert_eq!(server.url(), url);
        assert_eq!(redis_command(redis_port(&url), &["PING"]).expect("PING"), "+PONG");
        let stop = std::panic::catch_unwind(|| server.stop()).expect_err("stop() panics");
        let message = stop.downcast_ref::<String>().expect("a formatted message");
        assert!(message.contains(REDIS_URL_ENV), "{message}");
        return;
    }
    let server = redis();
    let other = redis();
    assert_ne!(server.url(), other.url(), "a server per call");
    let port = redis_port(server.url());
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(server.port(), Some(port));
    assert_eq!(redis_command(port, &["PING"]).expect("PING"), "+PONG");
    assert_eq!(redis_command(port, &["SET", "k", "v"]).expect("SET"), "+OK");

    server.stop();
    assert!(redis_command(port, &["PING"]).is_err(), "nothing answers while stopped");
    assert_eq!(
        redis_command(redis_port(other.url()), &["PING"]).expect("the other one runs"),
        "+PONG"
    );

    server.start();
    assert_eq!(redis_command(port, &["PING"]).expect("PING after start"), "+PONG");
    assert_eq!(
        redis_command(port, &["GET", "k"]).expect("GET"),
        "$-1",
        "nothing persisted"
    );

    let dir = server.dir().expect("a throwaway server has a directory").to_owned();
    drop(server);
    assert!(!dir.exists(), "{} removed on drop", dir.display());
    assert!(!port_accepts(port), "server stopped on drop");
}

#[tokio::test]
async fn sqlite_file_is_usable_and_removed() {
    let db = sqlite();
    let path = db.path().to_owned();
    assert_eq!(db.url(), format!("sqlite://{}?mode=rwc", path.display()));
    let mut conn = SqliteConnection::connect(db.url()).await.expect("connect");
    sqlx::query("CREATE TABLE flags (key text PRIMARY KEY)")
        .execute(&mut conn)
        .await
        .expect("CREATE TABLE");
    conn.close().await.expect("close");
    assert!(path.exists());
    drop(db);
    assert!(!path.parent().expect("a directory").exists(), "removed on drop");
}

fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(1)).is_ok()
}

/// Set in the child process of [`servers_are_removed_when_the_test_process_is_killed`].
const CHILD_ENV: &str = "VEXIL_TESTKIT_KILLED_CHILD";
const CHILD_TEST: &str = "servers_are_removed_when_the_test_process_is_killed";

/// Runs this test binary again, as a child that starts servers and waits; kills it with SIGKILL;
/// expects the watchdogs to stop the servers and remove their directories.
#[test]
fn servers_are_removed_when_the_test_process_is_killed() {
    if env::var_os(CHILD_ENV).is_some() {
        hold_servers_until_killed();
    }
    let child = Command::new(env::current_exe().expect("the test binary"))
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env_remove(DATABASE_URL_ENV)
        .env_remove(REDIS_URL_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the test binary as a child");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("piped stdout");
    let mut servers: Vec<(String, u16, PathBuf)> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read the child's output");
        // The harness's `test NAME ... ` may start the line.
        if line == "READY" {
            break;
        }
        if let Some((_, server)) = line.split_once("SERVER ") {
            let mut fields = server.splitn(3, ' ');
            let (Some(kind), Some(port), Some(dir)) = (fields.next(), fields.next(), fields.next()) else {
                panic!("bad line {line:?}");
            };
            servers.push((kind.to_owned(), port.parse().expect("a port"), PathBuf::from(dir)));
        }
    }
    assert_eq!(
        servers.len(),
        3,
        "the child did not start its servers (status {:?})",
        child.0.try_wait()
    );
    for (kind, port, dir) in &servers {
        assert!(port_accepts(*port), "{kind} runs on {port}");
        assert!(dir.exists(), "{kind} has {}", dir.display());
    }

    drop(child); // SIGKILL

    let deadline = Instant::now() + Duration::from_secs(30);
    for (kind, port, dir) in &servers {
        while port_accepts(*port) || dir.exists() {
            assert!(
                Instant::now() < deadline,
                "{kind} left behind: port {port} accepts: {}, {} exists: {}",
                port_accepts(*port),
                dir.display(),
                dir.exists()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Kills (SIGKILL) and reaps the child when dropped, also when the test fails first.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Best effort: the child may have exited already.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child's side: start the shared and a dedicated PostgreSQL server and a Redis server, report
/// them on stdout, and wait to be killed.
fn hold_servers_until_killed() -> ! {
    let shared = postgres();
    let dedicated = PostgresServer::start_dedicated();
    let redis = redis();
    let report = |kind: &str, port: Option<u16>, dir: Option<&std::path::Path>| {
        let (port, dir) = (port.expect("a throwaway server"), dir.expect("a throwaway server"));
        println!("SERVER {kind} {port} {}", dir.display());
    };
    report("postgres", shared.port(), shared.dir());
    report("dedicated-postgres", dedicated.port(), dedicated.dir());
    report("redis", redis.port(), redis.dir());
    println!("READY");
    let _ = std::io::stdout().flush();
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
