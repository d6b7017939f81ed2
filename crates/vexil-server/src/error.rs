//! The one table of errors: every error a request can end in ([`ErrorKind`]: flagd's evaluation
//! codes and the request errors), with its gRPC status, HTTP status and OFREP error code; and the
//! Connect protocol's name and HTTP status of every gRPC code. Handlers report errors as an
//! [`ErrorKind`] (or a tonic `Status`) and the protocol modules encode them through this file.

use http::StatusCode;
use tonic::Code;
use vexil_core::ErrorCode;
use vexil_store::StoreError;

/// Every kind of error a request can end in, whatever the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An evaluation error (flagd's error codes).
    Evaluation(ErrorCode),
    /// The request is malformed (bad selector, invalid protobuf, wrong field types).
    InvalidArgument,
    /// The evaluation context cannot be read (OFREP: the body is not a JSON object).
    InvalidContext,
    NotFound,
    AlreadyExists,
    /// A write's expected version is not the stored one (optimistic concurrency).
    Aborted,
    /// The entity's state does not allow the request (an experiment's lifecycle or locked
    /// allocation).
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    /// A limit was reached (streams, connections, rate).
    ResourceExhausted,
    /// The request body is larger than `--max-request-body`.
    PayloadTooLarge,
    /// The request body did not arrive within `--body-read-timeout`.
    RequestTimeout,
    Unavailable,
    Internal,
}

/// How an error is reported on each protocol.
#[derive(Debug, Clone, Copy)]
pub struct ErrorMapping {
    /// The gRPC/Connect status (flagd's for evaluation errors).
    pub grpc: Code,
    /// The HTTP status on OFREP and Vexil's JSON routes.
    pub http: StatusCode,
    /// The OFREP `errorCode` (`None`: the body has `errorDetails` only).
    pub ofrep_code: Option<&'static str>,
}

const fn row(grpc: Code, http: StatusCode, ofrep_code: Option<&'static str>) -> ErrorMapping {
    ErrorMapping { grpc, http, ofrep_code }
}

/// The mapping of `kind`.
pub fn mapping(kind: ErrorKind) -> ErrorMapping {
    use ErrorKind as K;
    match kind {
        K::Evaluation(ErrorCode::FlagNotFound) => row(Code::NotFound, StatusCode::NOT_FOUND, Some("FLAG_NOT_FOUND")),
        K::Evaluation(ErrorCode::TypeMismatch) => row(Code::InvalidArgument, StatusCode::BAD_REQUEST, Some("GENERAL")),
        K::Evaluation(ErrorCode::ParseError) => row(Code::DataLoss, StatusCode::BAD_REQUEST, Some("PARSE_ERROR")),
        K::Evaluation(ErrorCode::General) => row(Code::Unknown, StatusCode::BAD_REQUEST, Some("GENERAL")),
        K::InvalidArgument => row(Code::InvalidArgument, StatusCode::BAD_REQUEST, Some("GENERAL")),
        K::InvalidContext => row(Code::InvalidArgument, StatusCode::BAD_REQUEST, Some("INVALID_CONTEXT")),
        K::NotFound => row(Code::NotFound, StatusCode::NOT_FOUND, Some("GENERAL")),
        K::AlreadyExists => row(Code::AlreadyExists, StatusCode::CONFLICT, Some("GENERAL")),
        K::Aborted => row(Code::Aborted, StatusCode::CONFLICT, Some("GENERAL")),
        K::FailedPrecondition => row(Code::FailedPrecondition, StatusCode::BAD_REQUEST, Some("GENERAL")),
        K::Unauthenticated => row(Code::Unauthenticated, StatusCode::UNAUTHORIZED, None),
        K::PermissionDenied => row(Code::PermissionDenied, StatusCode::FORBIDDEN, None),
        K::ResourceExhausted => row(Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS, None),
        // grpc-go and connect-go (flagd) answer RESOURCE_EXHAUSTED; tonic's own limit says OUT_OF_RANGE.
        K::PayloadTooLarge => row(Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE, None),
        K::RequestTimeout => row(Code::DeadlineExceeded, StatusCode::REQUEST_TIMEOUT, None),
        K::Unavailable => row(Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE, None),
        K::Internal => row(Code::Internal, StatusCode::INTERNAL_SERVER_ERROR, Some("GENERAL")),
    }
}

/// A tonic status (gRPC and Connect) for `kind`.
pub fn grpc_status(kind: ErrorKind, message: impl Into<String>) -> tonic::Status {
    tonic::Status::new(mapping(kind).grpc, message)
}

/// The kind of a store error.
pub fn store_kind(e: &StoreError) -> ErrorKind {
    match e {
        StoreError::NotFound(_) => ErrorKind::NotFound,
        StoreError::AlreadyExists(_) => ErrorKind::AlreadyExists,
        StoreError::Conflict { .. } => ErrorKind::Aborted,
        StoreError::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
        StoreError::Invalid(_) => ErrorKind::InvalidArgument,
        StoreError::Unavailable(_) => ErrorKind::Unavailable,
        StoreError::Internal(_) => ErrorKind::Internal,
    }
}

/// A tonic status for a store error. An invalid input's problems also travel as the status
/// details (a JSON array of `{pointer, message}`), which the JSON routes show as `problems`.
pub fn store_status(e: StoreError) -> tonic::Status {
    let kind = store_kind(&e);
    if let StoreError::Internal(detail) = &e {
        tracing::error!(error = %detail, "store error");
    }
    let details = match &e {
        StoreError::Invalid(problems) => serde_json::to_vec(problems).unwrap_or_default(),
        _ => Vec::new(),
    };
    let message = e.to_string();
    if details.is_empty() {
        grpc_status(kind, message)
    } else {
        tonic::Status::with_details(mapping(kind).grpc, message, details.into())
    }
}

/// flagd's gRPC message for an evaluation error.
fn flagd_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::FlagNotFound => "Flag not found",
        ErrorCode::TypeMismatch => "Type mismatch error",
        ErrorCode::ParseError => "Error parsing input or configuration",
        ErrorCode::General => "General error",
    }
}

/// A tonic status for an evaluation error, with flagd's message and Vexil's detail.
pub fn status(code: ErrorCode, detail: &str) -> tonic::Status {
    let m = mapping(ErrorKind::Evaluation(code));
    tonic::Status::new(m.grpc, format!("{}: {detail}", flagd_message(code)))
}

/// How the Connect protocol reports a gRPC code: its name and the HTTP status of a unary error
/// (connectrpc.com's protocol specification).
#[derive(Debug, Clone, Copy)]
pub struct ConnectError {
    pub name: &'static str,
    pub http: StatusCode,
}

/// The Connect name and HTTP status of `code`.
pub fn connect(code: Code) -> ConnectError {
    let (name, http) = match code {
        Code::Ok => ("ok", StatusCode::OK),
        Code::Cancelled => ("canceled", StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)),
        Code::Unknown => ("unknown", StatusCode::INTERNAL_SERVER_ERROR),
        Code::InvalidArgument => ("invalid_argument", StatusCode::BAD_REQUEST),
        Code::DeadlineExceeded => ("deadline_exceeded", StatusCode::GATEWAY_TIMEOUT),
        Code::NotFound => ("not_found", StatusCode::NOT_FOUND),
        Code::AlreadyExists => ("already_exists", StatusCode::CONFLICT),
        Code::PermissionDenied => ("permission_denied", StatusCode::FORBIDDEN),
        Code::ResourceExhausted => ("resource_exhausted", StatusCode::TOO_MANY_REQUESTS),
        Code::FailedPrecondition => ("failed_precondition", StatusCode::BAD_REQUEST),
        Code::Aborted => ("aborted", StatusCode::CONFLICT),
        Code::OutOfRange => ("out_of_range", StatusCode::BAD_REQUEST),
        Code::Unimplemented => ("unimplemented", StatusCode::NOT_IMPLEMENTED),
        Code::Internal => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
        Code::Unavailable => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
        Code::DataLoss => ("data_loss", StatusCode::INTERNAL_SERVER_ERROR),
        Code::Unauthenticated => ("unauthenticated", StatusCode::UNAUTHORIZED),
    };
    ConnectError { name, http }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_errors_map_as_flagd_maps_them() {
        let m = mapping(ErrorKind::Evaluation(ErrorCode::FlagNotFound));
        assert_eq!(
            (m.grpc, m.http, m.ofrep_code),
            (Code::NotFound, StatusCode::NOT_FOUND, Some("FLAG_NOT_FOUND"))
        );
        let s = status(ErrorCode::ParseError, "bad rule");
        assert_eq!(s.code(), Code::DataLoss);
        assert_eq!(s.message(), "Error parsing input or configuration: bad rule");
    }

    #[test]
    fn every_grpc_code_of_the_table_has_a_connect_form() {
        let kinds = [
            ErrorKind::InvalidArgument,
            ErrorKind::InvalidContext,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::Aborted,
            ErrorKind::Unauthenticated,
            ErrorKind::PermissionDenied,
            ErrorKind::ResourceExhausted,
            ErrorKind::PayloadTooLarge,
            ErrorKind::RequestTimeout,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
        ];
        for kind in kinds {
            let m = mapping(kind);
            assert!(m.http.is_client_error() || m.http.is_server_error(), "{kind:?}");
            assert_ne!(connect(m.grpc).name, "ok", "{kind:?}");
        }
        assert_eq!(connect(Code::ResourceExhausted).http, StatusCode::TOO_MANY_REQUESTS);
    }
}
