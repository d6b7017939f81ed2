//! The store's SQL, from `queries.sql`: one text for both backends, adapted to each once per process.

use std::collections::HashMap;
use std::sync::OnceLock;

use super::Backend;

const SOURCE: &str = include_str!("../../queries.sql");

macro_rules! queries {
    ($($name:ident),* $(,)?) => {
        /// Every named query of `queries.sql`, adapted to one backend.
        #[derive(Debug)]
        pub(crate) struct Queries {
            $(pub(crate) $name: &'static str,)*
        }

        impl Queries {
            /// Reads `source`, adapted to `backend`; every name must be there, and nothing else.
            fn parse(source: &str, backend: Backend) -> Result<Queries, String> {
                let mut named = split(source)?;
                let queries = Queries {
                    $($name: {
                        let text = named
                            .remove(stringify!($name))
                            .ok_or_else(|| format!("queries.sql has no query `{}`", stringify!($name)))?;
                        &*Box::leak(adapt(&text, backend).into_boxed_str())
                    },)*
                };
                match named.keys().next() {
                    Some(extra) => Err(format!("queries.sql has a query `{extra}` the store does not know")),
                    None => Ok(queries),
                }
            }
        }
    };
}

queries! {
    environment_lock, environment_id, environment_insert, environment_select, environment_list,
    environment_update, environment_delete, environment_versions,
    flag_set_select, flag_set_list, flag_set_insert, flag_set_update, flag_set_delete,
    flag_select, flag_list, flag_insert, flag_update, flag_delete,
    segment_select, segment_list, segment_insert, segment_update, segment_delete,
    snapshot_flag_sets, snapshot_flags, snapshot_segments,
    version_insert, version_list, change_insert, changes_between, version_changes, state_at,
    audit_insert, audit_list,
    api_key_insert, api_key_by_prefix, api_key_by_id, api_key_list, api_key_revoke, api_key_count,
    outbox_insert, outbox_pending, outbox_mark, outbox_prune, notify,
    experiment_select, experiment_list, experiment_insert, experiment_update, experiment_delete,
    experiments_of_set, snapshot_experiments,
}

impl Queries {
    /// The queries for `backend`, parsed and adapted once per process (they live as long as it
    /// does, so statements can be `&'static str`).
    pub(crate) fn get(backend: Backend) -> &'static Queries {
        static POSTGRES: OnceLock<Queries> = OnceLock::new();
        static SQLITE: OnceLock<Queries> = OnceLock::new();
        let cell = match backend {
            Backend::Postgres => &POSTGRES,
            Backend::Sqlite => &SQLITE,
        };
        cell.get_or_init(|| Queries::parse(SOURCE, backend).expect("queries.sql is checked by the tests"))
    }
}

/// Splits the file at `-- name: <name>` lines; the comment lines right after a name belong to it.
fn split(source: &str) -> Result<HashMap<String, String>, String> {
    let mut named = HashMap::new();
    let mut current: Option<(String, String)> = None;
    for line in source.lines() {
        if let Some(name) = line.strip_prefix("-- name:") {
            if let Some((name, text)) = current.take() {
                insert(&mut named, name, text)?;
            }
            current = Some((name.trim().to_owned(), String::new()));
        } else if let Some((_, text)) = &mut current
            && !line.trim_start().starts_with("--")
        {
            text.push_str(line);
            text.push('\n');
        }
    }
    if let Some((name, text)) = current {
        insert(&mut named, name, text)?;
    }
    Ok(named)
}

fn insert(named: &mut HashMap<String, String>, name: String, text: String) -> Result<(), String> {
    let text = text.trim().trim_end_matches(';').trim().to_owned();
    if text.is_empty() {
        return Err(format!("query `{name}` is empty"));
    }
    match named.insert(name.clone(), text) {
        Some(_) => Err(format!("query `{name}` is defined twice")),
        None => Ok(()),
    }
}

/// On SQLite, `vx_ts(x)`, `vx_ms(x)`, `vx_json(x)` and `vx_text(x)` become `x`: it stores times
/// as milliseconds and JSON as text already. Postgres runs the text as written.
fn adapt(text: &str, backend: Backend) -> String {
    if backend == Backend::Postgres {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("vx_") {
        out.push_str(&rest[..at]);
        let call = &rest[at..];
        let open = call.find('(');
        let name_ok = open.is_some_and(|o| matches!(&call[..o], "vx_ts" | "vx_ms" | "vx_json" | "vx_text"));
        match (name_ok, open, call.find(')')) {
            (true, Some(open), Some(close)) if close > open && !call[open + 1..close].contains('(') => {
                out.push_str(&call[open + 1..close]);
                rest = &call[close + 1..];
            }
            _ => {
                out.push_str("vx_");
                rest = &call[3..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_parses_for_both_backends() {
        for backend in [Backend::Postgres, Backend::Sqlite] {
            Queries::parse(SOURCE, backend).unwrap();
        }
    }

    #[test]
    fn sqlite_takes_the_conversions_out() {
        let q = Queries::parse(SOURCE, Backend::Sqlite).unwrap();
        assert!(!q.audit_list.contains("vx_"), "{}", q.audit_list);
        assert!(
            q.flag_insert
                .contains("VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $8)"),
            "{}",
            q.flag_insert
        );
        let pg = Queries::parse(SOURCE, Backend::Postgres).unwrap();
        assert!(pg.flag_insert.contains("vx_json($3)"));
    }

    #[test]
    fn a_missing_or_unknown_or_repeated_query_is_an_error() {
        let without = SOURCE.replace("-- name: notify", "-- name: notify_all");
        let err = Queries::parse(&without, Backend::Sqlite).unwrap_err();
        assert!(err.contains("no query `notify`"), "{err}");
        let twice = format!("{SOURCE}\n-- name: notify\nSELECT 1;\n");
        let err = Queries::parse(&twice, Backend::Sqlite).unwrap_err();
        assert!(err.contains("defined twice"), "{err}");
    }

    #[test]
    fn comments_after_a_name_are_not_part_of_the_query() {
        let q = Queries::parse(SOURCE, Backend::Postgres).unwrap();
        assert!(
            q.environment_lock.starts_with("UPDATE environments"),
            "{}",
            q.environment_lock
        );
    }
}
