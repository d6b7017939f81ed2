//! flagd's gRPC services: evaluation (v1, v2, legacy schema.v1) with EventStream, and sync.v1.

pub mod evaluation;
pub mod events;
pub mod sync;
