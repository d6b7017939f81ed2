//! `vexil-loadgen`: drives Vexil and a no-op baseline server with the same workload on the same
//! machine, so every figure comes with the ratio to what the protocol stack alone achieves.

pub mod baseline;
pub mod driver;
pub mod experiments;
pub mod fanout;
pub mod flags;
pub mod process;
pub mod ratio;
pub mod replicas;
pub mod report;
pub mod soak;
pub mod stalled;
pub mod store;
pub mod tracing;
pub mod wire;
pub mod workload;
