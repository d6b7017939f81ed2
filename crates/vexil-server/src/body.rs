//! Request bodies with a deadline: a client must send its whole request body within
//! `--body-read-timeout` of the request's headers, so one that dribbles a body byte by byte cannot
//! hold a connection (and its `--max-connections` slot) for long.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::error::{self, ErrorKind};

/// `inner`, failing with [`ErrorKind::RequestTimeout`] (a `tonic::Status`, so gRPC handlers report
/// it as such) if it is still incomplete at `deadline`. The timer is armed only when the body
/// first makes the reader wait: a request that arrived whole costs no timer.
#[derive(Debug)]
pub struct Deadline<B> {
    inner: B,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> Deadline<B> {
    pub fn new(inner: B, deadline: Instant) -> Deadline<B> {
        Deadline {
            inner,
            deadline,
            timer: None,
        }
    }
}

/// The error a body that missed its deadline ends with.
pub fn timed_out() -> tonic::Status {
    error::grpc_status(
        ErrorKind::RequestTimeout,
        "the request body was not received in time (--body-read-timeout)",
    )
}

/// Reads a whole request body of at most `limit` bytes. The error is what the error table
/// reports: [`ErrorKind::RequestTimeout`] for a body that missed its deadline,
/// [`ErrorKind::PayloadTooLarge`] otherwise (too large, or cut off).
pub async fn read(body: axum::body::Body, limit: usize) -> Result<Bytes, (ErrorKind, String)> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if is_timeout(&e) {
            (ErrorKind::RequestTimeout, timed_out().message().to_owned())
        } else {
            (
                ErrorKind::PayloadTooLarge,
                format!("request body too large (limit {limit} bytes)"),
            )
        }
    })
}

/// Whether `e` (from reading a request body) is the deadline's.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if e.downcast_ref::<tonic::Status>()
            .is_some_and(|s| s.code() == error::mapping(ErrorKind::RequestTimeout).grpc)
        {
            return true;
        }
        source = e.source();
    }
    false
}

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(timed_out())))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt as _;

    use super::*;

    /// A body that yields one chunk, then never ends.
    fn stalled()
    -> http_body_util::StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>>
    {
        use futures::StreamExt as _;
        let chunks = futures::stream::once(async { Ok(Frame::data(Bytes::from_static(b"par"))) })
            .chain(futures::stream::pending())
            .boxed();
        http_body_util::StreamBody::new(chunks)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_at_the_deadline() {
        let started = Instant::now();
        let body = Deadline::new(stalled(), started + Duration::from_secs(10));
        let error = body.collect().await.unwrap_err();
        assert!(is_timeout(&*error), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_body_is_read_without_a_timer() {
        let full = http_body_util::Full::new(Bytes::from_static(b"{}"));
        let mut body = Deadline::new(full, Instant::now() + Duration::from_secs(10));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"{}"));
        assert!(body.timer.is_none(), "no timer armed");
        assert!(body.frame().await.is_none());
    }
}
