//! What can go wrong in the store. The server maps each kind to its gRPC and HTTP status in its one
//! error table.

use std::fmt;

use vexil_core::parse::{Diagnostic, Severity};

/// A store operation that failed; nothing it would have written is stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// What was asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Creating something that exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A write's precondition failed: the row changed since the writer read it (or does not
    /// exist where a version was expected).
    #[error("{what} is at version {actual}, not {expected}: it changed since it was read")]
    Conflict {
        /// The entity.
        what: String,
        /// The version the writer expected.
        expected: i64,
        /// The version stored (0: absent).
        actual: i64,
    },
    /// The write is not allowed in the entity's current state (an experiment's locked allocation,
    /// a lifecycle step it cannot take).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The input is not valid: every problem, with the JSON pointer it is at.
    #[error("invalid: {}", Problems(.0))]
    Invalid(Vec<Problem>),
    /// The database cannot be reached (or is busy); the write may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a failed query, a stored row that does not decode.
    #[error("store error: {0}")]
    Internal(String),
}

/// One problem with a write's input.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// JSON pointer of the offending value, in the flagd document of the flag set (`/flags/<key>/…`,
    /// `/$evaluators/<key>`, `/metadata/…`), or into the request for other inputs.
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            let at = if p.pointer.is_empty() { "/" } else { &p.pointer };
            write!(f, "at {at}: {}", p.message)?;
        }
        Ok(())
    }
}

impl StoreError {
    /// One invalid input.
    pub fn invalid(pointer: impl Into<String>, message: impl Into<String>) -> StoreError {
        StoreError::Invalid(vec![Problem {
            pointer: pointer.into(),
            message: message.into(),
        }])
    }

    /// The errors among a document's diagnostics, as problems.
    pub(crate) fn from_diagnostics(diagnostics: &[Diagnostic]) -> StoreError {
        StoreError::Invalid(
            diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .map(|d| Problem {
                    pointer: d.pointer.clone(),
                    message: d.message.clone(),
                })
                .collect(),
        )
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) if is_busy(db.as_ref()) => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Internal(e.to_string()),
        }
    }
}

/// SQLite's "database is locked" (another process holds the write lock past the busy timeout) and
/// Postgres's connection-level failures: retryable, not the caller's fault.
fn is_busy(db: &dyn sqlx::error::DatabaseError) -> bool {
    matches!(
        db.code().as_deref(),
        Some("5" | "6" | "57P01" | "57P02" | "57P03" | "08006" | "08003")
    )
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> StoreError {
        match e {
            sqlx::migrate::MigrateError::Execute(e) => e.into(),
            other => StoreError::Internal(other.to_string()),
        }
    }
}
