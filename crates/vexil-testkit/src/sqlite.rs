//! SQLite: a database file in a temporary directory.

use std::fs;
use std::path::{Path, PathBuf};

use crate::process;

/// A SQLite database file for one test, in a temporary directory of its own; see [`sqlite()`].
#[derive(Debug)]
#[must_use = "the database's directory is removed when this value is dropped"]
pub struct TestSqlite {
    dir: PathBuf,
    path: PathBuf,
    url: String,
}

/// A path for a SQLite database file (not created: connect with [`TestSqlite::url`], whose
/// `mode=rwc` creates it) in a fresh temporary directory, removed when the value is dropped.
///
/// # Panics
///
/// If the temporary directory cannot be created.
pub fn sqlite() -> TestSqlite {
    let dir = process::create_temp_dir("sqlite").unwrap_or_else(|message| panic!("{message}"));
    let path = dir.join("vexil.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    TestSqlite { dir, path, url }
}

impl TestSqlite {
    /// The database's URL, for sqlx: `sqlite://<path>?mode=rwc` (created on first connection).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestSqlite {
    fn drop(&mut self) {
        // Best effort: a leftover in the temporary directory harms nobody.
        let _ = fs::remove_dir_all(&self.dir);
    }
}
