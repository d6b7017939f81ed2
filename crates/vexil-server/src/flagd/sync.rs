//! `flagd.sync.v1.FlagSyncService` on port 8015: what in-process providers stream their flags from.
//!
//! SyncFlags sends the selected flags as flagd's JSON (`{"flags": {key: flag}}`, `$ref`s inlined,
//! set metadata merged) at once and again after every change to them; `sync_context` carries the
//! `-X` values. FetchAllFlags answers the same JSON once; GetMetadata the `-X` values.
//!
//! SyncFlags is served by [`sync_flags_grpc`], gRPC framed by hand so that every subscriber's
//! response body is made of the same reference-counted bytes: the payload of a snapshot and
//! selector is encoded once, and a subscriber that does not read holds a reference to it, never a
//! copy or a backlog (see `crate::streams`).

use std::pin::Pin;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response as HttpResponse};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, header};
use hyper::body::Frame;
use prost::Message;
use tonic::{Request, Response, Status};
use vexil_core::{Selector, Snapshot};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::sync::v1::{self as sync, flag_sync_service_server::FlagSyncService};
use vexil_service::StaticContext;

use crate::app::App;
use crate::error::{self, ErrorKind};
use crate::streams::{Event, Subscription};

/// The path SyncFlags is routed on.
pub const SYNC_FLAGS_PATH: &str = "/flagd.sync.v1.FlagSyncService/SyncFlags";

/// The sync service.
#[derive(Debug, Clone)]
pub struct Sync {
    pub app: App,
}

/// The selector: the `Flagd-Selector` header if present, else the (deprecated) body field.
fn selector<T>(request: &Request<T>, body: &str) -> Result<Selector, Status> {
    selector_from(request.metadata().as_ref(), body)
}

fn selector_from(headers: &HeaderMap, body: &str) -> Result<Selector, Status> {
    crate::selector::from_headers(headers, body).map_err(|e| error::grpc_status(ErrorKind::InvalidArgument, e))
}

/// The encoded `SyncFlagsResponse` carrying `flag_configuration` (flagd's JSON of the selected
/// flags, see [`vexil_service::flag_configuration`]): the payload [`vexil_service::Flags::sync_payload`]
/// encodes once per snapshot and selector.
fn encode_response(flag_configuration: String, statics: &StaticContext) -> Bytes {
    let response = sync::SyncFlagsResponse {
        flag_configuration,
        sync_context: Some(JsonStruct::from(statics.values.clone())),
    };
    Bytes::from(response.encode_to_vec())
}

fn payload(app: &App, snapshot: &Snapshot, selector: &Selector) -> Bytes {
    let flags = app.flags();
    flags.sync_payload(snapshot, selector, |config| encode_response(config, flags.statics()))
}

/// A SyncFlags stream: encoded `SyncFlagsResponse`s.
type Updates = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// Opens a SyncFlags stream (refused with `RESOURCE_EXHAUSTED` at `--max-streams`): the selected
/// flags now, then the newest flags whenever they changed since the subscriber's last message
/// (built as the transport pulls them, see `crate::streams`).
fn updates(app: &App, selector: Selector) -> Result<Updates, Status> {
    let subscription = Subscription::open(app, "sync_flags", selector, None)?;
    let first = payload(app, subscription.snapshot(), subscription.selector());
    let rest = futures::stream::unfold((subscription, app.clone()), |(mut subscription, app)| async move {
        loop {
            let item = match subscription.next().await? {
                Event::Changed { snapshot, .. } => Ok(payload(&app, &snapshot, subscription.selector())),
                // SyncFlags has no keep-alive message (and asks for none).
                Event::Quiet => continue,
                // The stream ends with OK, as flagd's does.
                Event::ShuttingDown => return None,
                Event::DeadlineReached => Err(Status::deadline_exceeded("stream deadline reached")),
            };
            return Some((item, (subscription, app)));
        }
    });
    Ok(Box::pin(futures::stream::once(async { Ok(first) }).chain(rest)))
}

/// SyncFlags over gRPC on port 8015 (routed ahead of tonic): the request is one gRPC message; the
/// response body is each payload's 5-byte gRPC prefix followed by the shared payload bytes, then
/// the status in trailers.
pub async fn sync_flags_grpc(State(app): State<App>, request: http::Request<Body>) -> HttpResponse {
    match open_grpc(&app, request).await {
        Ok(updates) => {
            let frames = futures::stream::unfold((updates, false), |(mut updates, done)| async move {
                if done {
                    return None;
                }
                let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = match updates.next().await {
                    Some(Ok(payload)) => vec![Ok(Frame::data(grpc_prefix(payload.len()))), Ok(Frame::data(payload))],
                    Some(Err(status)) => return Some((vec![Ok(Frame::trailers(trailers(&status)))], (updates, true))),
                    None => return Some((vec![Ok(Frame::trailers(trailers(&Status::ok(""))))], (updates, true))),
                };
                Some((frames, (updates, false)))
            })
            .flat_map(futures::stream::iter);
            let mut response = HttpResponse::new(Body::new(http_body_util::StreamBody::new(frames)));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            response
        }
        Err(status) => status.into_http::<Body>().into_response(),
    }
}

/// Checks and decodes a SyncFlags request and opens its stream.
async fn open_grpc(app: &App, request: http::Request<Body>) -> Result<Updates, Status> {
    let (parts, body) = request.into_parts();
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if !content_type.is_some_and(|ct| ct.starts_with("application/grpc")) {
        return Err(error::grpc_status(
            ErrorKind::InvalidArgument,
            "SyncFlags speaks gRPC: content-type must be application/grpc",
        ));
    }
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::unimplemented("compressed requests are not supported"));
    }
    let limit = app.max_body();
    let body = crate::body::read(body, limit.saturating_add(5))
        .await
        .map_err(|(kind, message)| error::grpc_status(kind, message))?;
    let message = match body.as_ref() {
        [0, len @ ..] if len.len() >= 4 => {
            let declared = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let message = &len[4..];
            if declared != message.len() {
                return Err(error::grpc_status(
                    ErrorKind::InvalidArgument,
                    "the request is not one whole gRPC message",
                ));
            }
            message
        }
        [1, ..] => return Err(Status::unimplemented("compressed requests are not supported")),
        _ => {
            return Err(error::grpc_status(
                ErrorKind::InvalidArgument,
                "the request is not one whole gRPC message",
            ));
        }
    };
    let request = sync::SyncFlagsRequest::decode(message)
        .map_err(|e| error::grpc_status(ErrorKind::InvalidArgument, format!("invalid SyncFlagsRequest: {e}")))?;
    let selector = selector_from(&parts.headers, &request.selector)?;
    updates(app, selector)
}

/// The gRPC message prefix: uncompressed, big-endian length.
fn grpc_prefix(len: usize) -> Bytes {
    let mut prefix = BytesMut::with_capacity(5);
    prefix.put_u8(0);
    prefix.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    prefix.freeze()
}

fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", HeaderValue::from(tonic::Code::Internal as i32));
    }
    map
}

#[tonic::async_trait]
impl FlagSyncService for Sync {
    type SyncFlagsStream = Pin<Box<dyn Stream<Item = Result<sync::SyncFlagsResponse, Status>> + Send>>;

    /// The same stream as [`sync_flags_grpc`], decoded into messages. The 8015 router sends
    /// SyncFlags to [`sync_flags_grpc`]; this answers callers of the tonic service itself.
    async fn sync_flags(
        &self,
        request: Request<sync::SyncFlagsRequest>,
    ) -> Result<Response<Self::SyncFlagsStream>, Status> {
        let selector = selector(&request, &request.get_ref().selector)?;
        let messages = updates(&self.app, selector)?.map(|item| {
            item.and_then(|bytes| {
                sync::SyncFlagsResponse::decode(bytes)
                    .map_err(|e| error::grpc_status(ErrorKind::Internal, e.to_string()))
            })
        });
        Ok(Response::new(Box::pin(messages)))
    }

    async fn fetch_all_flags(
        &self,
        request: Request<sync::FetchAllFlagsRequest>,
    ) -> Result<Response<sync::FetchAllFlagsResponse>, Status> {
        let selector = selector(&request, &request.get_ref().selector)?;
        let snapshot = self.app.live().snapshot();
        Ok(Response::new(sync::FetchAllFlagsResponse {
            flag_configuration: vexil_service::flag_configuration(&snapshot, &selector),
        }))
    }

    async fn get_metadata(
        &self,
        _request: Request<sync::GetMetadataRequest>,
    ) -> Result<Response<sync::GetMetadataResponse>, Status> {
        if self.app.sync_metadata_disabled() {
            return Err(Status::unimplemented(
                "GetMetadata is disabled (--disable-sync-metadata)",
            ));
        }
        Ok(Response::new(sync::GetMetadataResponse {
            metadata: Some(JsonStruct::from(self.app.flags().statics().values.clone())),
        }))
    }
}
