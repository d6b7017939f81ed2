//! The protobuf codec of every generated client and server: prost's, with
//! - a smaller encode buffer: tonic allocates the buffer for each call up front (8 KiB by default)
//!   and keeps it for the life of a server stream; flagd's messages are mostly under 512 bytes and
//!   the buffer grows for the rest, so an idle EventStream costs a fraction of what it would;
//! - `INVALID_ARGUMENT` for a message that is not valid protobuf (prost's codec says `INTERNAL`;
//!   flagd answers `invalid_argument`).

use std::marker::PhantomData;

use prost::bytes::Buf as _;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of a call's encode buffer, in bytes.
pub const ENCODE_BUFFER: usize = 512;
/// Encoded bytes gathered before they are handed to the transport (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost's codec with an [`ENCODE_BUFFER`]-byte encode buffer.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(ProstDecoder::default())
    }
}

/// prost's decoding from a contiguous slice; a malformed message is the sender's error.
#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Decoded from one contiguous slice: prost's fast paths for varints and strings apply to
        // `&[u8]`, while through `DecodeBuf` every byte goes through `BytesMut::advance`.
        // `copy_to_bytes` on tonic's buffer splits it: nothing is copied.
        let message = buf.copy_to_bytes(buf.remaining());
        U::decode(message.as_ref())
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("invalid protobuf message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
