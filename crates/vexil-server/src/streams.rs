//! Server streams (flagd EventStream and SyncFlags): admission against `--max-streams`, and the
//! policy for slow readers.
//!
//! **Streams are pulled, not pushed.** A stream builds its next message only when the transport
//! asks for it, and hyper asks only when the client has flow-control credit for the previous one.
//! A subscriber that stops reading therefore accumulates no backlog: changes made meanwhile are
//! coalesced, and when it reads again it gets the newest state (EventStream: every key changed
//! since the last message it got; SyncFlags: the current flags). The server holds for it at most
//! the message in flight and the next one; SyncFlags payloads are shared by every subscriber of the
//! selector (reference-counted bytes), so a stalled in-process provider costs a few hundred bytes
//! of state, not copies of the flag payload.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Status;

use crate::metrics::StreamGuard;

/// Counts open streams against a limit.
#[derive(Debug)]
pub struct StreamLimit {
    open: AtomicUsize,
    max: usize,
}

/// An admitted stream; releases its slot (and the open-streams gauge) when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    limit: Arc<StreamLimit>,
    _gauge: StreamGuard,
}

impl StreamLimit {
    pub fn new(max: usize) -> Arc<StreamLimit> {
        Arc::new(StreamLimit {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// Admits one more stream of `kind`, or answers `RESOURCE_EXHAUSTED` when `max` are open.
    pub fn admit(self: &Arc<Self>, kind: &'static str) -> Result<StreamPermit, Status> {
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        match admitted {
            Ok(_) => Ok(StreamPermit {
                limit: self.clone(),
                _gauge: StreamGuard::open(kind),
            }),
            Err(_) => {
                crate::metrics::stream_rejected(kind);
                Err(Status::resource_exhausted(format!(
                    "too many open streams: this server allows {} (--max-streams)",
                    self.max
                )))
            }
        }
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.limit.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_frees_slots_on_drop() {
        let limit = StreamLimit::new(2);
        let a = limit.admit("test").unwrap();
        let _b = limit.admit("test").unwrap();
        let refused = limit.admit("test").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-streams"), "{}", refused.message());
        assert_eq!(limit.open(), 2);
        drop(a);
        assert_eq!(limit.open(), 1);
        let _c = limit.admit("test").unwrap();
    }
}
