//! PLACEHOLDER (lead): replaced by the transcoding helper's module.

/// Vexil's JSON API under /v1 (placeholder: no routes yet).
pub fn router(_grpc: axum::Router, _max_body: usize) -> axum::Router {
    axum::Router::new()
}
