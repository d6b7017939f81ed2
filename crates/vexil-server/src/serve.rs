//! Serving a router on a listener: HTTP/1.1 and HTTP/2 (h2c, or over TLS with ALPN), with explicit
//! limits (header size, connections per port, time to the first request's headers, idle time), and
//! graceful shutdown (stop accepting, let in-flight requests and streams finish, give up after a
//! grace period).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest total size of request headers, in bytes.
    pub max_header_bytes: usize,
    /// Most connections open at once on this port; more are answered 503 / `RESOURCE_EXHAUSTED`.
    pub max_connections: usize,
    /// How long a new connection (and its TLS handshake) may take to deliver its first request's
    /// headers.
    pub header_read_timeout: Duration,
    /// How long a connection with nothing in flight stays open; `None`: forever.
    pub idle_timeout: Option<Duration>,
    /// How long a request's body may take to arrive after its headers.
    pub body_read_timeout: Duration,
    /// How long in-flight requests and streams get to finish once shutdown starts.
    pub shutdown_timeout: Duration,
}

/// Builds a TLS acceptor from PEM files (certificate chain and private key); offers h2 and
/// http/1.1 by ALPN.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing the certificate {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` until `shutdown` turns true.
pub async fn serve(
    name: &'static str,
    requests: crate::telemetry::Requests,
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(limits.max_header_bytes.max(8192))
        .timer(hyper_util::rt::TokioTimer::new())
        // Headers of later requests on a kept-alive connection (the first request's are bounded by
        // `header_read_timeout` in `connection`).
        .header_read_timeout(limits.idle_timeout);
    builder
        .http2()
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .timer(hyper_util::rt::TokioTimer::new())
        // Answer client keep-alive pings; never send GOAWAY for them (flagd#1998).
        .keep_alive_interval(Some(Duration::from_secs(60)));
    let open = Arc::new(OpenConnections::default());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = crate::app::stopping(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let (builder, tls) = (builder.clone(), tls.clone());
        let Some(slot) = open.enter(limits.max_connections) else {
            // Counted in vexil_connections_rejected_total; a flood must not flood the log too.
            tracing::debug!(server = name, %peer, max = limits.max_connections, "connection refused: --max-connections reached");
            crate::metrics::connection_rejected(name);
            tokio::spawn(reject(stream, tls, builder, limits));
            continue;
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let result = match tls {
                Some(acceptor) => match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await
                {
                    Ok(Ok(tls_stream)) => {
                        connection(tls_stream, peer, builder, router, requests, limits, shutdown).await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(server = name, %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(server = name, %peer, "TLS handshake timed out");
                        return;
                    }
                },
                None => connection(stream, peer, builder, router, requests, limits, shutdown).await,
            };
            if let Err(e) = result {
                tracing::debug!(server = name, %peer, error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = open.all_closed() => {}
        () = tokio::time::sleep(limits.shutdown_timeout) => tracing::warn!(server = name, shutdown_timeout = ?limits.shutdown_timeout, "connections still open after --shutdown-timeout, closing them"),
    }
    Ok(())
}

/// Serves one connection, closing it when
/// - no request headers arrived within `header_read_timeout` of connecting (a client that
///   dribbles or withholds its first request);
/// - nothing was in flight for `idle_timeout` (gracefully: GOAWAY on HTTP/2);
/// - the server shuts down (gracefully: in-flight requests and streams finish).
async fn connection<I>(
    io: I,
    peer: SocketAddr,
    builder: auto::Builder<TokioExecutor>,
    router: Router,
    requests: crate::telemetry::Requests,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let service = TowerToHyperService::new(tracked(
        router,
        requests,
        activity.clone(),
        limits.body_read_timeout,
        peer,
    ));
    let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
    tokio::pin!(conn);
    let connected = Instant::now();
    let mut closing = false;
    loop {
        let check_at = activity.next_check(connected, limits);
        tokio::select! {
            result = conn.as_mut() => return result,
            () = crate::app::stopping(&mut shutdown), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(check_at.into()), if !closing => {
                match activity.verdict(connected, limits) {
                    Verdict::Keep => {}
                    Verdict::NoRequest => {
                        tracing::debug!(%peer, header_read_timeout = ?limits.header_read_timeout, "no request in time after connecting: closing");
                        return Ok(());
                    }
                    Verdict::Idle => {
                        tracing::debug!(%peer, idle_timeout = ?limits.idle_timeout, "idle: closing");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// The client's address, on the requests of Vexil's own API (`/vexil.v1.…` on the gRPC port,
/// `/v1/…` on the HTTP port), whose access rules depend on it. Only those carry it: attaching it to
/// every request would cost each flagd evaluation an allocation.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Peer {
    fn wanted(path: &str) -> bool {
        path.starts_with("/vexil.") || path.starts_with("/v1/")
    }
}

/// `router`, counting requests in flight on `activity` until their response bodies are done, with
/// each request body due within `body_read_timeout` of its headers; each request measured (and
/// traced, when tracing is on) from its headers to the end of its response body.
fn tracked(
    router: Router,
    requests: crate::telemetry::Requests,
    activity: Arc<Activity>,
    body_read_timeout: Duration,
    peer: SocketAddr,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send,
> + Clone {
    tower::service_fn(move |mut request: Request<Incoming>| {
        let active = activity.begin();
        if Peer::wanted(request.uri().path()) {
            request.extensions_mut().insert(Peer(peer));
        }
        let mut scope = requests.begin(&request);
        let due = tokio::time::Instant::now() + body_read_timeout;
        let call = router
            .clone()
            .oneshot(request.map(|body| Body::new(crate::body::Deadline::new(body, due))));
        let call = match scope.span() {
            Some(span) => futures::future::Either::Left(tracing::Instrument::instrument(call, span.clone())),
            None => futures::future::Either::Right(call),
        };
        async move {
            let response = call.await?;
            scope.response(&response);
            // The guards live as long as the body: a stream is in flight until it ends, and is
            // measured (its span ends) then.
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &active;
                    if let Some(trailers) = frame.trailers_ref() {
                        scope.trailers(trailers);
                    }
                    frame
                }))
            }))
        }
    })
}

/// What a connection is doing, as its watchdog sees it.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    requests: AtomicUsize,
    /// When `in_flight` last went to zero.
    idle_since: Mutex<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    NoRequest,
    Idle,
}

/// A request in flight on its connection.
#[derive(Debug)]
struct Active(Arc<Activity>);

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> Active {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the watchdog should look again.
    fn next_check(&self, connected: Instant, limits: Limits) -> Instant {
        if self.requests.load(Ordering::Relaxed) == 0 {
            return connected + limits.header_read_timeout;
        }
        let idle = limits.idle_timeout.unwrap_or(Duration::from_secs(3600));
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.idle_since() + idle
        } else {
            Instant::now() + idle
        }
    }

    fn verdict(&self, connected: Instant, limits: Limits) -> Verdict {
        if self.requests.load(Ordering::Relaxed) == 0 {
            return if connected.elapsed() >= limits.header_read_timeout {
                Verdict::NoRequest
            } else {
                Verdict::Keep
            };
        }
        match limits.idle_timeout {
            Some(idle) if self.in_flight.load(Ordering::Acquire) == 0 && self.idle_since().elapsed() >= idle => {
                Verdict::Idle
            }
            _ => Verdict::Keep,
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// Open connections of one port.
#[derive(Debug, Default)]
struct OpenConnections {
    count: AtomicUsize,
    closed: tokio::sync::Notify,
}

/// A connection's place in [`OpenConnections`].
#[derive(Debug)]
struct Slot(Arc<OpenConnections>);

impl OpenConnections {
    fn enter(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// How long a refused connection is kept to deliver its refusal.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Answers every request of a connection over `--max-connections` with 503 (gRPC:
/// `RESOURCE_EXHAUSTED`), then closes it.
async fn reject(stream: TcpStream, tls: Option<TlsAcceptor>, builder: auto::Builder<TokioExecutor>, limits: Limits) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(refusal(
            &request,
            limits.max_connections,
        )))
    });
    let _ = tokio::time::timeout(REFUSAL_LINGER, async move {
        match tls {
            Some(acceptor) => {
                if let Ok(tls_stream) = acceptor.accept(stream).await {
                    let _ = builder.serve_connection(TokioIo::new(tls_stream), service).await;
                }
            }
            None => {
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            }
        }
    })
    .await;
}

fn refusal(request: &Request<Incoming>, max: usize) -> Response<Body> {
    let message = format!("too many connections: this server allows {max} per port (--max-connections)");
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::resource_exhausted(message).into_http::<Body>();
    }
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    response
}

/// Binds `addr`, naming the server in the error.
pub async fn bind(name: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {name} port {addr}"))
}
