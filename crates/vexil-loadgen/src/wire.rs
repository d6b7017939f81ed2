//! gRPC over raw HTTP/2 (the `h2` crate): messages framed once, no codec or channel in the way.

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio::net::TcpStream;

/// One gRPC message in its 5-byte frame.
pub fn grpc_frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + body.len());
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame.freeze()
}

/// An HTTP/2 connection to `host:port` (TCP_NODELAY), its connection task spawned.
pub async fn h2_connect_to(host: &str, port: u16) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::Builder::new().handshake(tcp).await?;
    tokio::spawn(connection);
    Ok(send)
}

/// [`h2_connect_to`] on loopback.
pub async fn h2_connect(port: u16) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    h2_connect_to("127.0.0.1", port).await
}

/// The message of a unary gRPC answer's body: the payload of its first frame.
pub fn first_message(body: &[u8]) -> Option<&[u8]> {
    let (head, rest) = body.split_at_checked(5)?;
    if head[0] != 0 {
        return None; // compressed
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    rest.get(..len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let m = vexil_proto::flagd::evaluation::v1::ResolveBooleanResponse {
            value: true,
            reason: "STATIC".into(),
            variant: "on".into(),
            ..Default::default()
        };
        let frame = grpc_frame(&m);
        assert_eq!(frame[0], 0);
        let decoded =
            vexil_proto::flagd::evaluation::v1::ResolveBooleanResponse::decode(first_message(&frame).unwrap()).unwrap();
        assert_eq!(decoded, m);
        assert_eq!(first_message(&frame[..4]), None);
        assert_eq!(first_message(&frame[..frame.len() - 1]), None);
    }
}
