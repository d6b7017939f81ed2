//! What the generic layers in front of the gRPC routes share (Connect in `connect`, the JSON API
//! in `transcode`): the descriptors of every proto, decoded once, and gRPC's message framing.

use std::sync::LazyLock;

use bytes::{Buf, Bytes, BytesMut};
use prost_reflect::DescriptorPool;

static POOL: LazyLock<Result<DescriptorPool, String>> =
    LazyLock::new(|| DescriptorPool::decode(vexil_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()));

/// The descriptors of every proto served (decoded once).
pub(crate) fn pool() -> Result<&'static DescriptorPool, String> {
    POOL.as_ref().map_err(|e| format!("descriptors: {e}"))
}

/// `message` in a gRPC frame (uncompressed).
pub(crate) fn frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(message);
    frame.freeze()
}

/// Splits the complete gRPC messages off the front of `buffer`; a compressed one is an error
/// (nothing here asks for compression).
pub(crate) fn take_messages(buffer: &mut BytesMut) -> Result<Vec<Bytes>, &'static str> {
    let mut messages = Vec::new();
    while buffer.len() >= 5 {
        if buffer[0] != 0 {
            return Err("a compressed gRPC response");
        }
        let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
        if buffer.len() < 5 + len {
            break;
        }
        buffer.advance(5);
        messages.push(buffer.split_to(len).freeze());
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_back_into_their_messages() {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&frame(b"one"));
        buffer.extend_from_slice(&frame(b""));
        let partial = frame(b"three");
        buffer.extend_from_slice(&partial[..4]);
        assert_eq!(take_messages(&mut buffer).unwrap(), [Bytes::from("one"), Bytes::new()]);
        buffer.extend_from_slice(&partial[4..]);
        assert_eq!(take_messages(&mut buffer).unwrap(), [Bytes::from("three")]);
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert!(take_messages(&mut compressed).is_err());
    }
}
