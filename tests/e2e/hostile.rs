//! Slow and hostile clients against the built `vexil` binary: stream subscribers that withhold
//! flow-control credit, stream and connection limits, clients that dribble their headers, idle
//! connections. Raw HTTP/2 (the `h2` crate) and raw TCP, so the test controls every byte and every
//! window update.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use vexil_e2e::{Scratch, Server};
use vexil_proto::flagd::evaluation::v1;
use vexil_proto::flagd::sync::v1 as sync;

/// A deadline far beyond what any step needs: the tests wait for events, not for time.
const PATIENCE: Duration = Duration::from_secs(20);

/// A flag file of `count` string flags whose every value names `generation`, padded so the sync
/// payload is far larger than HTTP/2's initial 64 KiB window.
fn generation(count: usize, generation: u32) -> String {
    let pad = "x".repeat(1000);
    let flags: serde_json::Map<String, Value> = (0..count)
        .map(|i| {
            (
                format!("flag-{i}"),
                json!({"state": "ENABLED", "variants": {"v": format!("gen-{generation}"), "pad": pad}, "defaultVariant": "v"}),
            )
        })
        .collect();
    json!({ "flags": flags }).to_string()
}

fn start(flags: &str, extra: &[&str]) -> (Server, Scratch) {
    let dir = Scratch::new("hostile");
    let path = dir.write("flags.json", flags);
    let uri = format!("file:{}", path.display());
    let mut args = vec!["--uri", uri.as_str()];
    args.extend_from_slice(extra);
    (Server::start(&args), dir)
}

/// The generation the server evaluates now (OFREP).
async fn served_generation(s: &Server) -> Option<u32> {
    let response = reqwest::Client::new()
        .post(s.ofrep_url("/ofrep/v1/evaluate/flags/flag-0"))
        .json(&json!({"context": {}}))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    body["value"].as_str()?.strip_prefix("gen-")?.parse().ok()
}

/// Asserts that the server answers a well-behaved OFREP request.
async fn assert_serves_ofrep(s: &Server) {
    let response = reqwest::Client::new()
        .post(s.ofrep_url("/ofrep/v1/evaluate/flags/flag-0"))
        .json(&json!({"context": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

async fn wait_for_generation(s: &Server, wanted: u32) {
    let deadline = Instant::now() + PATIENCE;
    while served_generation(s).await != Some(wanted) {
        assert!(
            Instant::now() < deadline,
            "generation {wanted} was not served within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One gRPC message in its 5-byte frame.
fn grpc_frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + body.len());
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame.freeze()
}

/// Opens an HTTP/2 connection that never gives the server more credit than the initial windows.
async fn h2_connect(port: u16) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (send, connection) = h2::client::Builder::new().handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    send
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// The generations named by the SyncFlags messages in `bytes` (complete gRPC frames).
fn generations_in(mut bytes: Bytes) -> Vec<u32> {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert!(bytes.len() >= 5 + len, "truncated gRPC frame");
        bytes.advance(5);
        let message = sync::SyncFlagsResponse::decode(bytes.split_to(len)).unwrap();
        let config: Value = serde_json::from_str(&message.flag_configuration).unwrap();
        let value = config["flags"]["flag-0"]["variants"]["v"].as_str().unwrap();
        out.push(value.strip_prefix("gen-").unwrap().parse().unwrap());
    }
    assert!(bytes.is_empty(), "a partial frame at the end");
    out
}

#[tokio::test]
async fn a_sync_subscriber_that_stops_reading_gets_the_newest_state_not_a_backlog() {
    const FLAGS: usize = 300; // ~330 kB payload: five times the initial window
    const CHANGES: u32 = 10;
    let (s, dir) = start(&generation(FLAGS, 0), &[]);

    let mut client = h2_connect(s.ports.sync).await;
    let (response, mut request) = client
        .send_request(grpc_request("/flagd.sync.v1.FlagSyncService/SyncFlags"), false)
        .unwrap();
    request
        .send_data(grpc_frame(&sync::SyncFlagsRequest::default()), true)
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, response).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    // Take what the initial window allows, and give no credit back.
    let mut received = BytesMut::new();
    let window = 65_535;
    while received.len() < window {
        let chunk = tokio::time::timeout(PATIENCE, body.data())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received.len(), window, "the server sent exactly the window and stopped");

    // Meanwhile the configuration changes ten times.
    for g in 1..=CHANGES {
        dir.write("flags.json", &generation(FLAGS, g));
        wait_for_generation(&s, g).await;
    }

    // Read again: the message in flight, at most one already queued, then the newest state.
    body.flow_control().release_capacity(received.len()).unwrap();
    let mut generations = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while generations.last() != Some(&CHANGES) {
        assert!(
            Instant::now() < deadline,
            "never got generation {CHANGES}: {generations:?}"
        );
        let chunk = tokio::time::timeout(PATIENCE, body.data())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        received.extend_from_slice(&chunk);
        let complete = complete_frames(&received);
        generations = generations_in(received.clone().freeze().slice(..complete));
    }
    assert_eq!(generations[0], 0, "the message in flight is finished first");
    assert!(
        generations.len() <= 3,
        "a stalled subscriber gets the newest state, not a backlog: {generations:?}"
    );
    assert!(generations.windows(2).all(|w| w[0] < w[1]), "in order: {generations:?}");
}

/// The length of the complete gRPC frames at the start of `bytes`.
fn complete_frames(bytes: &[u8]) -> usize {
    let mut at = 0;
    while bytes.len() >= at + 5 {
        let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]) as usize;
        if bytes.len() < at + 5 + len {
            break;
        }
        at += 5 + len;
    }
    at
}

#[tokio::test]
async fn streams_beyond_max_streams_get_resource_exhausted() {
    let (s, _dir) = start(&generation(2, 0), &["--max-streams", "2"]);
    let mut events = v1::service_client::ServiceClient::connect(s.grpc_url()).await.unwrap();
    let mut syncs = sync::flag_sync_service_client::FlagSyncServiceClient::connect(s.sync_url())
        .await
        .unwrap();
    let first = events.event_stream(v1::EventStreamRequest::default()).await.unwrap();
    let second = syncs.sync_flags(sync::SyncFlagsRequest::default()).await.unwrap();

    let refused = events
        .event_stream(v1::EventStreamRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-streams"), "{}", refused.message());
    let refused = syncs.sync_flags(sync::SyncFlagsRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // A closed stream frees its slot (the server notices the reset asynchronously).
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    loop {
        match events.event_stream(v1::EventStreamRequest::default()).await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
}

/// Reads until the server closes the connection; returns how long that took.
async fn time_to_close(tcp: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server did not close the connection within {PATIENCE:?}"),
        }
    }
}

#[tokio::test]
async fn clients_that_dribble_their_headers_are_disconnected() {
    let (s, _dir) = start(&generation(2, 0), &["--header-read-timeout", "1"]);

    // HTTP/1.1, one byte every 100 ms: the request line never completes in time.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.ports.ofrep)).await.unwrap();
    let request = b"POST /ofrep/v1/evaluate/flags HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}";
    let started = Instant::now();
    let mut closed = false;
    for byte in request.iter().take(request.len() - 10) {
        if tcp.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut probe)).await {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a dribbling HTTP/1.1 client was still connected after {:?}",
        started.elapsed()
    );

    // HTTP/2: the preface and nothing else, on the gRPC port.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.ports.evaluation)).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    time_to_close(&mut tcp).await;

    // Nothing at all.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.ports.sync)).await.unwrap();
    time_to_close(&mut tcp).await;

    // The server still answers a well-behaved client.
    assert_serves_ofrep(&s).await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (s, _dir) = start(&generation(2, 0), &["--idle-timeout", "1"]);

    // HTTP/1.1 keep-alive: one request, then silence.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.ports.ofrep)).await.unwrap();
    tcp.write_all(
        b"POST /ofrep/v1/evaluate/flags/flag-0 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    time_to_close(&mut tcp).await;

    // HTTP/2: a finished gRPC call, then silence: the server says GOAWAY and closes.
    let mut client = h2_connect(s.ports.evaluation).await;
    let (response, mut request) = client
        .send_request(grpc_request("/flagd.evaluation.v1.Service/ResolveString"), false)
        .unwrap();
    let message = v1::ResolveStringRequest {
        flag_key: "flag-0".into(),
        context: None,
    };
    request.send_data(grpc_frame(&message), true).unwrap();
    let response = tokio::time::timeout(PATIENCE, response).await.unwrap().unwrap();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let deadline = Instant::now() + PATIENCE;
    while futures::future::poll_fn(|cx| client.poll_ready(cx)).await.is_ok() {
        assert!(Instant::now() < deadline, "the idle HTTP/2 connection was not closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A connection with an open stream is not idle, however quiet the stream.
    let mut events = v1::service_client::ServiceClient::connect(s.grpc_url()).await.unwrap();
    let mut stream = events
        .event_stream(v1::EventStreamRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().r#type, "provider_ready");
    let quiet = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
    assert!(
        quiet.is_err(),
        "the stream stayed open through 3 s of silence: {quiet:?}"
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused_with_a_status() {
    let (s, _dir) = start(&generation(2, 0), &["--max-connections", "1"]);
    // One connection holds the only slot.
    let mut holder = TcpStream::connect(("127.0.0.1", s.ports.ofrep)).await.unwrap();
    holder
        .write_all(b"POST /ofrep/v1/evaluate/flags/flag-0 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = holder.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    let refused = reqwest::Client::new()
        .post(s.ofrep_url("/ofrep/v1/evaluate/flags/flag-0"))
        .json(&json!({"context": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert!(refused.text().await.unwrap().contains("--max-connections"));

    // gRPC on a port where a connection holds the only slot: RESOURCE_EXHAUSTED.
    let _grpc_holder = v1::service_client::ServiceClient::connect(s.grpc_url()).await.unwrap();
    let mut grpc = v1::service_client::ServiceClient::connect(s.grpc_url()).await.unwrap();
    let status = grpc
        .resolve_string(v1::ResolveStringRequest {
            flag_key: "flag-0".into(),
            context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    drop(holder);
}

/// The gRPC status of a call whose request body is `body`, raw.
async fn grpc_status_of(port: u16, path: &str, body: Bytes) -> (Option<Code>, String) {
    grpc_status_after(port, path, body, true).await
}

/// The status of a gRPC call whose request body is `body`, ended or (`end: false`) left open.
async fn grpc_status_after(port: u16, path: &str, body: Bytes, end: bool) -> (Option<Code>, String) {
    let mut client = h2_connect(port).await;
    let (response, mut request) = client.send_request(grpc_request(path), false).unwrap();
    request.send_data(body, end).unwrap();
    let response = tokio::time::timeout(PATIENCE, response).await.unwrap().unwrap();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    let source = if headers.contains_key("grpc-status") {
        &headers
    } else {
        &trailers
    };
    let code = source
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
        .map(Code::from_i32);
    let message = source
        .get("grpc-message")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    (code, message)
}

#[tokio::test]
async fn requests_that_are_not_protobuf_are_invalid_arguments() {
    let (s, _dir) = start(&generation(2, 0), &[]);
    // A length-delimited field whose length runs past the end of the message.
    let garbage = Bytes::from_static(&[0, 0, 0, 0, 3, 0x0a, 0x7f, 0x41]);
    for (port, path) in [
        (s.ports.evaluation, "/flagd.evaluation.v1.Service/ResolveBoolean"),
        (s.ports.evaluation, "/flagd.evaluation.v2.Service/ResolveString"),
        (s.ports.evaluation, "/flagd.evaluation.v1.Service/EventStream"),
        (s.ports.sync, "/flagd.sync.v1.FlagSyncService/FetchAllFlags"),
        (s.ports.sync, "/flagd.sync.v1.FlagSyncService/SyncFlags"),
    ] {
        let (code, message) = grpc_status_of(port, path, garbage.clone()).await;
        assert_eq!(code, Some(Code::InvalidArgument), "{path}: {message}");
        assert!(!message.is_empty(), "{path}: a message says what is wrong");
    }
    // A frame that is not one whole message.
    let (code, _) = grpc_status_of(
        s.ports.sync,
        "/flagd.sync.v1.FlagSyncService/SyncFlags",
        Bytes::from_static(&[0, 0, 0]),
    )
    .await;
    assert_eq!(code, Some(Code::InvalidArgument));
}

/// Sends a JSON POST over HTTP/1.1 whose headers promise 100 bytes of body, `start` of them sent,
/// and returns the answer (up to the end of its JSON body).
async fn stalled_http1(port: u16, path: &str, start: &[u8]) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(start).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"}") {
        match tokio::time::timeout(PATIENCE, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer within {PATIENCE:?}"),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn request_bodies_that_do_not_arrive_in_time_are_rejected() {
    let (s, _dir) = start(&generation(2, 0), &["--body-read-timeout", "1"]);

    // OFREP over HTTP/1.1: the headers promise 100 bytes, 10 arrive.
    let answer = stalled_http1(s.ports.ofrep, "/ofrep/v1/evaluate/flags/flag-0", b"{\"context\"").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-read-timeout"), "{answer}");

    // gRPC over HTTP/2: a message frame that promises 20 bytes, 2 of them sent, the stream left
    // open.
    let partial = Bytes::from_static(&[0, 0, 0, 0, 20, 0x0a, 0x03]);
    let (code, message) = grpc_status_after(
        s.ports.evaluation,
        "/flagd.evaluation.v1.Service/ResolveBoolean",
        partial.clone(),
        false,
    )
    .await;
    assert_eq!(code, Some(Code::DeadlineExceeded), "{message}");
    let (code, message) =
        grpc_status_after(s.ports.sync, "/flagd.sync.v1.FlagSyncService/SyncFlags", partial, false).await;
    assert_eq!(code, Some(Code::DeadlineExceeded), "SyncFlags: {message}");

    // Connect JSON over HTTP/1.1 on the evaluation port.
    let answer = stalled_http1(
        s.ports.evaluation,
        "/flagd.evaluation.v1.Service/ResolveBoolean",
        b"{\"flagKey\"",
    )
    .await;
    assert!(answer.contains("\"deadline_exceeded\""), "{answer}");

    // The server still answers a well-behaved client.
    assert_serves_ofrep(&s).await;
}
