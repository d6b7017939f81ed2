//! Where flag definitions come from: the [`Source`] trait [`Live`](crate::Live) composes, the
//! command line's source syntax, and the sources themselves: files (flagd's `--uri file:<path>`)
//! and the managed store.
//!
//! A source is two things: a way to fetch its current documents ([`Source::load`]) and a stream of
//! "may have changed, load again" notifications ([`Source::changes`]). A file source loads by
//! reading and parsing the file and is notified by the file system (with polling as the backstop);
//! the store loads with queries (one document per flag set) and is notified by a version check;
//! [`Live`](crate::Live) needs nothing else.

mod file;
mod store;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use vexil_core::parse::{ParseError, Parsed};

pub use file::FileSource;
pub use store::{DATABASE_CHECK_EVERY, RECENT_VERSIONS, STORE_SOURCE, StoreSource};

/// A source of flag definitions.
///
/// Implementations are shared (`Arc<dyn Source>`) between the task that follows their changes and
/// whoever reloads them; `load` may be called while a previous `load` is still running elsewhere
/// ([`Live`](crate::Live) never does so for one source).
pub trait Source: Send + Sync + fmt::Debug {
    /// The source's name: what `source=<name>` selectors address, and how readiness and logs name
    /// it. Unique among the sources of one [`Live`](crate::Live).
    fn name(&self) -> &str;

    /// Fetches and parses the source's current documents (problems that do not stop loading come
    /// back as warnings). Blocking work (file reads, parsing large documents) belongs on
    /// `spawn_blocking`, not on the calling task.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, LoadError>>;

    /// Notifications that the document may have changed and should be loaded again, for as long as
    /// the stream is kept (dropping it stops whatever watching it does). A change after the last
    /// `load` that completed before this call must be notified too (e.g. by checking once at
    /// start). Spurious notifications are harmless: a reload that finds the same document changes
    /// nothing. Called within a Tokio runtime.
    fn changes(&self) -> BoxStream<'static, ()>;
}

/// What a source loaded: one document (a file), or several (the managed store: one per flag set),
/// each compiled on its own, so a change to one recompiles only that one.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The documents, in priority order (later wins on a duplicate flag set and key).
    pub parts: Vec<Part>,
}

/// One document of a [`Loaded`] source.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Names the document within its source (unique there; `""` for a one-document source).
    pub key: String,
    /// The document.
    pub parsed: Parsed,
    /// Whether a request without a selector sees its flags (for a managed environment other than
    /// the default one, only selectors naming its flag sets do).
    pub listed: bool,
}

impl From<Parsed> for Loaded {
    fn from(parsed: Parsed) -> Loaded {
        Loaded {
            parts: vec![Part {
                key: String::new(),
                parsed,
                listed: true,
            }],
        }
    }
}

/// Why a source could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The document is not a valid flag definition.
    #[error("{path}: {source}")]
    Invalid {
        /// Where the document is (a file's path).
        path: String,
        /// What is wrong, with every diagnostic.
        source: ParseError,
    },
    /// Any other failure: a backend that cannot be reached, a load that panicked.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// A source as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `file:<path>` (or a bare path): the path as given, which is also the source's name.
    File(String),
}

impl SourceSpec {
    /// Parses flagd's `--uri` syntax. Only file sources are supported so far; other schemes are
    /// rejected with a message that says so.
    pub fn parse(uri: &str) -> Result<SourceSpec, String> {
        if let Some(path) = uri.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            return Ok(SourceSpec::File(path.to_owned()));
        }
        if let Some((scheme, _)) = uri.split_once("://") {
            return Err(format!(
                "unsupported source `{uri}`: `{scheme}` sources are not supported yet, use file:<path>"
            ));
        }
        if uri.is_empty() {
            return Err("empty source uri".into());
        }
        Ok(SourceSpec::File(uri.to_owned()))
    }

    /// The source's name, as selectors (`source=<name>`) address it: the path as given.
    pub fn name(&self) -> &str {
        match self {
            SourceSpec::File(path) => path,
        }
    }

    /// The source this spec names. `poll_interval`: how often a file source checks its file
    /// besides file-system events.
    pub fn open(&self, poll_interval: Duration) -> Arc<dyn Source> {
        match self {
            SourceSpec::File(path) => Arc::new(FileSource::new(path, poll_interval)),
        }
    }
}
