//! Who may call Vexil's own API. Keys arrive as `Authorization: Bearer <key>` (or `x-api-key`):
//! - a wrong, unknown or revoked key: `UNAUTHENTICATED` (401);
//! - a key of another environment, or a role that does not cover the call: `PERMISSION_DENIED`
//!   (403);
//! - no key: the admin API is open only while no key exists and no `VEXIL_ADMIN_TOKEN` is set, and
//!   then only to clients on the same machine (loopback) that are not browser pages (no `Origin`
//!   header); evaluation is open while no key exists.
//!
//! Keys are looked up in the store and remembered: a busy client costs the database one lookup per
//! key per [`REMEMBER`], and a revoked key stops working within about that long. A remembered
//! answer that is older is still used while it is checked again in the background, so a database
//! that is slow or down never holds a request up for a key seen before (evaluation keeps answering
//! through an outage). Key material is never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use vexil_store::{ApiKey, Role, Store};

use crate::error::{ErrorKind, grpc_status, store_status};
use crate::serve::Peer;

/// How long a key lookup (and whether any key exists) is remembered.
const REMEMBER: Duration = Duration::from_secs(5);

/// Keys remembered at most; past it the memory starts over.
const REMEMBERED_KEYS: usize = 10_000;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No key, allowed by the open rules above.
    Anonymous,
    /// The `VEXIL_ADMIN_TOKEN` bootstrap key: a global admin.
    AdminToken,
    /// An API key.
    Key(ApiKey),
}

impl Principal {
    /// How the audit log names the caller.
    pub fn actor(&self) -> vexil_store::Actor {
        vexil_store::Actor::new(match self {
            Principal::Anonymous => "anonymous (loopback, no keys)".to_owned(),
            Principal::AdminToken => "admin-token".to_owned(),
            Principal::Key(key) => format!("key:{} ({})", key.prefix, key.name),
        })
    }

    /// The environment a scoped key is limited to.
    pub fn environment(&self) -> Option<&str> {
        match self {
            Principal::Key(key) => key.environment.as_deref(),
            _ => None,
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// Administration of one environment, or (`None`) of everything (environments, global keys).
    Admin(Option<&'a str>),
    /// Evaluation in one environment.
    Evaluate(&'a str),
    /// Tracking events in one environment.
    Track(&'a str),
}

#[derive(Debug)]
pub struct Access {
    store: Arc<dyn Store>,
    admin_token: Option<String>,
    keys: Arc<Mutex<HashMap<String, Remembered<Option<ApiKey>>>>>,
    any_keys: Arc<Mutex<Option<Remembered<bool>>>>,
}

/// A lookup's answer, when it was fetched, and whether a refresh is under way.
#[derive(Debug, Clone)]
struct Remembered<T> {
    at: Instant,
    value: T,
    refreshing: bool,
}

impl<T: Clone> Remembered<T> {
    fn new(value: T) -> Remembered<T> {
        Remembered {
            at: Instant::now(),
            value,
            refreshing: false,
        }
    }

    /// The value, and whether the caller should start a refresh (it is old and none is running).
    fn read(&mut self) -> (T, bool) {
        let refresh = self.at.elapsed() >= REMEMBER && !self.refreshing;
        self.refreshing |= refresh;
        (self.value.clone(), refresh)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key a request presents.
fn presented(metadata: &MetadataMap) -> Option<&str> {
    if let Some(value) = metadata.get("authorization").and_then(|v| v.to_str().ok()) {
        let value = value.trim();
        return Some(
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .unwrap_or(value)
                .trim(),
        );
    }
    metadata.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Compares in time independent of where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Access {
    pub fn new(store: Arc<dyn Store>, admin_token: Option<String>) -> Access {
        Access {
            store,
            admin_token: admin_token.filter(|t| !t.is_empty()),
            keys: Arc::new(Mutex::new(HashMap::new())),
            any_keys: Arc::new(Mutex::new(None)),
        }
    }

    /// Forgets every remembered lookup (after this process created or revoked a key).
    pub fn forget(&self) {
        lock(&self.keys).clear();
        *lock(&self.any_keys) = None;
    }

    /// Whether calls without a key can be allowed at all (no admin token, no key).
    pub async fn open(&self) -> Result<bool, tonic::Status> {
        if self.admin_token.is_some() {
            return Ok(false);
        }
        let remembered = lock(&self.any_keys).as_mut().map(Remembered::read);
        if let Some((any, refresh)) = remembered {
            if refresh {
                let (store, cell) = (self.store.clone(), self.any_keys.clone());
                tokio::spawn(async move {
                    let fetched = store.has_api_keys().await;
                    let mut cell = lock(&cell);
                    match (fetched, cell.as_mut()) {
                        (Ok(any), _) => *cell = Some(Remembered::new(any)),
                        (Err(_), Some(old)) => old.refreshing = false,
                        (Err(_), None) => {}
                    }
                });
            }
            return Ok(!any);
        }
        let any = self.store.has_api_keys().await.map_err(store_status)?;
        *lock(&self.any_keys) = Some(Remembered::new(any));
        Ok(!any)
    }

    async fn key(&self, secret: &str) -> Result<Option<ApiKey>, tonic::Status> {
        let remembered = lock(&self.keys).get_mut(secret).map(Remembered::read);
        if let Some((key, refresh)) = remembered {
            if refresh {
                let (store, keys, secret) = (self.store.clone(), self.keys.clone(), secret.to_owned());
                tokio::spawn(async move {
                    let fetched = store.authenticate(secret.clone()).await;
                    let mut keys = lock(&keys);
                    match fetched {
                        Ok(key) => {
                            keys.insert(secret, Remembered::new(key));
                        }
                        Err(_) => {
                            if let Some(old) = keys.get_mut(&secret) {
                                old.refreshing = false;
                            }
                        }
                    }
                });
            }
            return Ok(key);
        }
        let key = self.store.authenticate(secret.to_owned()).await.map_err(store_status)?;
        let mut keys = lock(&self.keys);
        if keys.len() >= REMEMBERED_KEYS {
            keys.clear();
        }
        keys.insert(secret.to_owned(), Remembered::new(key.clone()));
        Ok(key)
    }

    /// The environment the presented key is scoped to, if it presents a valid scoped key.
    pub async fn key_scope(&self, metadata: &MetadataMap) -> Result<Option<String>, tonic::Status> {
        let Some(secret) = presented(metadata).filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        if self.admin_token.as_deref().is_some_and(|token| same(secret, token)) {
            return Ok(None);
        }
        Ok(self.key(secret).await?.and_then(|key| key.environment))
    }

    /// As [`Access::check`], but a key is required even while none exists (`--flagd-keys`).
    pub async fn check_required(
        &self,
        metadata: &MetadataMap,
        peer: Option<Peer>,
        need: Need<'_>,
    ) -> Result<Principal, tonic::Status> {
        if presented(metadata).is_none_or(str::is_empty) {
            return Err(grpc_status(
                ErrorKind::Unauthenticated,
                "an API key is required (Authorization: Bearer <key>)",
            ));
        }
        self.check(metadata, peer, need).await
    }

    /// Who the caller is, if they may do what they `need`.
    pub async fn check(
        &self,
        metadata: &MetadataMap,
        peer: Option<Peer>,
        need: Need<'_>,
    ) -> Result<Principal, tonic::Status> {
        let Some(secret) = presented(metadata).filter(|s| !s.is_empty()) else {
            // A browser page (it sends `Origin`) is never the single local user, even on loopback:
            // without this, any web page open on the machine could call the open admin API.
            let loopback = peer.is_some_and(|p| p.0.ip().is_loopback()) && metadata.get("origin").is_none();
            let allowed = match need {
                Need::Admin(_) => loopback && self.open().await?,
                Need::Evaluate(_) | Need::Track(_) => self.open().await?,
            };
            return if allowed {
                Ok(Principal::Anonymous)
            } else {
                Err(grpc_status(
                    ErrorKind::Unauthenticated,
                    "an API key is required (Authorization: Bearer <key>)",
                ))
            };
        };
        if let Some(token) = &self.admin_token
            && same(secret, token)
        {
            return Ok(Principal::AdminToken);
        }
        let Some(key) = self.key(secret).await? else {
            return Err(grpc_status(
                ErrorKind::Unauthenticated,
                "the API key is not valid (unknown or revoked)",
            ));
        };
        let allowed = match need {
            Need::Admin(environment) => {
                key.role == Role::Admin
                    && (key.environment.is_none()
                        || (environment.is_some() && key.environment.as_deref() == environment))
            }
            Need::Evaluate(environment) => {
                matches!(key.role, Role::Admin | Role::Evaluate)
                    && key.environment.as_deref().is_none_or(|scope| scope == environment)
            }
            Need::Track(environment) => {
                matches!(key.role, Role::Admin | Role::Track)
                    && key.environment.as_deref().is_none_or(|scope| scope == environment)
            }
        };
        if allowed {
            Ok(Principal::Key(key))
        } else {
            let scope = key.environment.as_deref().unwrap_or("every environment");
            Err(grpc_status(
                ErrorKind::PermissionDenied,
                format!(
                    "the key {} ({} key for {scope}) does not allow this",
                    key.prefix,
                    key.role.as_str()
                ),
            ))
        }
    }
}
