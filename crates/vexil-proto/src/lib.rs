//! Generated code: prost messages, tonic clients and servers for flagd's wire protocols —
//! `flagd.evaluation.v1`, `flagd.evaluation.v2`, `flagd.sync.v1` and the legacy `schema.v1`, with
//! pbjson (proto3 JSON) serde impls — and for Vexil's own `vexil.v1` services (with
//! `google.api.http` annotations), compiled from `proto/` at build time. Hand-written
//! beside it: the codec, and [`JsonStruct`], the type of every `google.protobuf.Struct` field
//! (decoded straight into JSON).

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    rust_2018_idioms
)]

pub mod codec;
mod json_struct;

pub use json_struct::{JsonStruct, json_number};

/// The encoded `FileDescriptorSet` of every proto here (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod flagd {
    pub mod evaluation {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/flagd.evaluation.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/flagd.evaluation.v1.serde.rs"));
        }
        pub mod v2 {
            include!(concat!(env!("OUT_DIR"), "/flagd.evaluation.v2.rs"));
            include!(concat!(env!("OUT_DIR"), "/flagd.evaluation.v2.serde.rs"));
        }
    }
    pub mod sync {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/flagd.sync.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/flagd.sync.v1.serde.rs"));
        }
    }
}

pub mod schema {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/schema.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/schema.v1.serde.rs"));
    }
}

pub mod vexil {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/vexil.v1.rs"));
    }
}

pub mod google {
    pub mod api {
        include!(concat!(env!("OUT_DIR"), "/google.api.rs"));
    }
}
