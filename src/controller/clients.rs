//! The ModelClients of every watch scope, read from the caches the ModelClient controllers keep:
//! how a model's reconcile finds the identities its gate lets through, and is woken when one of
//! them changes.

use std::{collections::BTreeSet, sync::Arc};

use kube::runtime::reflector::Store;

use super::{guard::Guarded, models::Synced};
use crate::api::{ModelClient, SecureModelDeployment};

/// The ModelClient cache of one watch scope.
pub type ClientStore = Store<Guarded<ModelClient>>;

/// The ModelClient caches of all watch scopes.
#[derive(Clone, Default)]
pub struct Clients {
    scopes: Arc<Vec<(ClientStore, Synced)>>,
}

impl Clients {
    /// The caches of every scope, each with whether it has filled.
    pub fn new(scopes: Vec<(ClientStore, Synced)>) -> Self {
        Self {
            scopes: Arc::new(scopes),
        }
    }

    /// Waits until every scope's cache has filled: an empty cache must never read as "no
    /// clients", which would revoke every caller of every gate at an operator restart.
    pub async fn synced(&self) {
        for (_, synced) in self.scopes.iter() {
            let mut synced = synced.clone();
            let _ = synced.wait_for(|filled| *filled).await;
        }
    }

    /// The identities `smd`'s gate lets through ([`crate::core::consent::gate_identities`]).
    pub fn identities(&self, smd: &SecureModelDeployment, trust_domain: &str) -> BTreeSet<String> {
        let all: Vec<Arc<Guarded<ModelClient>>> = self
            .scopes
            .iter()
            .flat_map(|(store, _)| store.state())
            .collect();
        crate::core::consent::gate_identities(
            smd,
            all.iter()
                .filter_map(|g| g.object.as_ref().ok().map(|mc| &**mc)),
            trust_domain,
        )
    }
}
