//! The managed store's commands: `vexil migrate`, `import`, `export` and `keys create`. Each opens
//! the database (bringing its schema up to date), does one thing, and reports on stdout; problems
//! go to stderr with a non-zero exit.

use std::io::{Read as _, Write};

use anyhow::{Context as _, bail};
use vexil_core::parse::{self, Format};
use vexil_store::{Actor, ApiKeyInput, Role, SqlStore, Store, StoreError};

use crate::config::{DatabaseArgs, ExportArgs, ImportArgs, KeysCommand};

/// Who the command line writes as: `cli:<user>`.
fn actor() -> Actor {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "unknown".into());
    Actor::new(format!("cli:{user}"))
}

async fn open(database: &DatabaseArgs) -> anyhow::Result<SqlStore> {
    SqlStore::open(&database.database_url).await.with_context(|| {
        format!(
            "cannot open the store at {}",
            vexil_store::redact(&database.database_url)
        )
    })
}

/// A store error as the command line shows it: every problem of an invalid input on its own line.
fn explain(e: StoreError) -> anyhow::Error {
    match e {
        StoreError::Invalid(problems) => {
            let lines: Vec<String> = problems
                .iter()
                .map(|p| {
                    format!(
                        "  - at {}: {}",
                        if p.pointer.is_empty() { "/" } else { &p.pointer },
                        p.message
                    )
                })
                .collect();
            anyhow::anyhow!("invalid:\n{}", lines.join("\n"))
        }
        other => other.into(),
    }
}

/// `vexil migrate`.
pub async fn migrate(database: &DatabaseArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let store = open(database).await?;
    writeln!(out, "{}: schema up to date", store.database())?;
    store.close().await;
    Ok(())
}

/// `vexil import`.
pub async fn import(args: &ImportArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let text = if args.file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file))?
    };
    let document = parse::read_document(&text, Format::from_path(&args.file))
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file))?;
    let store = open(&args.database).await?;
    let written = store
        .import(actor(), args.environment.clone(), args.flag_set.clone(), document)
        .await
        .map_err(explain)?;
    let target = format!("{}/{}", args.environment, args.flag_set);
    match written.config_version {
        Some(version) => writeln!(
            out,
            "imported {} flags and {} segments into {target}: {} changes, config version {version}",
            written.value.flags, written.value.segments, written.value.changed
        )?,
        None => writeln!(out, "{target} already holds this document: nothing changed")?,
    }
    store.close().await;
    Ok(())
}

/// `vexil export`.
pub async fn export(args: &ExportArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let store = open(&args.database).await?;
    let document = store
        .export(args.environment.clone(), args.flag_set.clone())
        .await
        .map_err(explain)?;
    serde_json::to_writer_pretty(&mut *out, &document)?;
    writeln!(out)?;
    store.close().await;
    Ok(())
}

/// `vexil keys …`.
pub async fn keys(command: &KeysCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            environment,
            role,
            name,
            database,
        } => {
            let Some(role) = Role::parse(role) else {
                bail!("`{role}` is not a role: admin, evaluate or track");
            };
            let name = name.clone().unwrap_or_else(|| match environment {
                Some(env) => format!("{} key for {env}", role.as_str()),
                None => format!("global {} key", role.as_str()),
            });
            let store = open(database).await?;
            let created = store
                .create_api_key(
                    actor(),
                    ApiKeyInput {
                        name,
                        environment: environment.clone(),
                        role,
                    },
                )
                .await
                .map_err(explain)?;
            writeln!(out, "{}", created.secret)?;
            eprintln!(
                "created {} key {} (id {}) for {}: it is shown this once, only its hash is stored",
                created.key.role.as_str(),
                created.key.prefix,
                created.key.id,
                created.key.environment.as_deref().unwrap_or("every environment"),
            );
            store.close().await;
            Ok(())
        }
    }
}
