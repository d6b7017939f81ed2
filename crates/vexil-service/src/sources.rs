//! File sources: flagd's `--uri file:<path>` (JSON or YAML).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use vexil_core::parse::{self, Format, ParseError, Parsed, Strictness};

/// A source as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `file:<path>` (or a bare path).
    File(FileSource),
}

impl SourceSpec {
    /// Parses flagd's `--uri` syntax. Only file sources are supported so far; other schemes are
    /// rejected with a message that says so.
    pub fn parse(uri: &str) -> Result<SourceSpec, String> {
        if let Some(path) = uri.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            return Ok(SourceSpec::File(FileSource::new(path)));
        }
        if let Some((scheme, _)) = uri.split_once("://") {
            return Err(format!(
                "unsupported source `{uri}`: `{scheme}` sources are not supported yet, use file:<path>"
            ));
        }
        if uri.is_empty() {
            return Err("empty source uri".into());
        }
        Ok(SourceSpec::File(FileSource::new(uri)))
    }

    /// The source's name, as selectors (`source=<name>`) address it: the path as given.
    pub fn name(&self) -> &str {
        match self {
            SourceSpec::File(f) => &f.name,
        }
    }
}

/// A flag definition file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSource {
    /// The path as given (the source name).
    pub name: String,
    /// Where to read it.
    pub path: PathBuf,
    /// JSON or YAML, from the extension.
    pub format: Format,
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
    /// The file is not a valid flag definition.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, with every diagnostic.
        source: ParseError,
    },
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileSource {
    /// A source reading `path`.
    pub fn new(path: &str) -> FileSource {
        FileSource {
            name: path.to_owned(),
            path: PathBuf::from(path),
            format: Format::from_path(path),
        }
    }

    pub(crate) fn stamp(&self) -> Option<Stamp> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some(Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }

    /// Reads and parses the file (flagd's leniency: schema violations are warnings).
    pub fn load(&self) -> Result<Parsed, LoadError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| LoadError::Read {
            path: display(&self.path),
            source,
        })?;
        let parsed = parse::parse_str(&text, self.format, Strictness::Flagd).map_err(|source| LoadError::Invalid {
            path: display(&self.path),
            source,
        })?;
        Ok(parsed)
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
