//! The one table that maps evaluation errors to gRPC status codes and HTTP statuses.

use http::StatusCode;
use tonic::Code;
use vexil_core::ErrorCode;

/// How an evaluation error is reported on each protocol (flagd's `errFormat` and OFREP handler).
#[derive(Debug, Clone, Copy)]
pub struct ErrorMapping {
    /// The gRPC/Connect status of flagd's evaluation services.
    pub grpc: Code,
    /// flagd's gRPC message.
    pub grpc_message: &'static str,
    /// The OFREP HTTP status.
    pub http: StatusCode,
    /// The OFREP `errorCode`.
    pub ofrep_code: &'static str,
}

/// The mapping for `code`.
pub fn mapping(code: ErrorCode) -> ErrorMapping {
    match code {
        ErrorCode::FlagNotFound => ErrorMapping {
            grpc: Code::NotFound,
            grpc_message: "Flag not found",
            http: StatusCode::NOT_FOUND,
            ofrep_code: "FLAG_NOT_FOUND",
        },
        ErrorCode::TypeMismatch => ErrorMapping {
            grpc: Code::InvalidArgument,
            grpc_message: "Type mismatch error",
            http: StatusCode::BAD_REQUEST,
            ofrep_code: "GENERAL",
        },
        ErrorCode::ParseError => ErrorMapping {
            grpc: Code::DataLoss,
            grpc_message: "Error parsing input or configuration",
            http: StatusCode::BAD_REQUEST,
            ofrep_code: "PARSE_ERROR",
        },
        ErrorCode::General => ErrorMapping {
            grpc: Code::Unknown,
            grpc_message: "General error",
            http: StatusCode::BAD_REQUEST,
            ofrep_code: "GENERAL",
        },
    }
}

/// A tonic status for an evaluation error, with flagd's message and Vexil's detail.
pub fn status(code: ErrorCode, detail: &str) -> tonic::Status {
    let m = mapping(code);
    tonic::Status::new(m.grpc, format!("{}: {detail}", m.grpc_message))
}
