//! The SecureModelDeployments of every watch scope, read from the caches the SMD controllers
//! keep: how a ModelClient finds the model it refers to without a GET, in whichever scope the
//! model lives.

use std::sync::Arc;

use kube::runtime::reflector::{ObjectRef, Store};

use super::guard::Guarded;
use crate::api::SecureModelDeployment;

/// The SMD cache of one watch scope.
pub type ModelStore = Store<Guarded<SecureModelDeployment>>;

/// The SMD caches of all watch scopes (`None`: every namespace).
#[derive(Clone, Default)]
pub struct Models {
    scopes: Arc<Vec<(Option<String>, ModelStore)>>,
}

/// What the caches say about one model.
#[derive(Debug)]
pub enum Lookup {
    /// The model, as last seen.
    Found(Arc<SecureModelDeployment>),
    /// No such model in a watched namespace.
    Missing,
    /// The model exists but does not decode; the reason.
    Malformed(String),
    /// The namespace is not watched by this operator.
    NotWatched,
}

impl Models {
    /// The caches of `scopes`.
    pub fn new(scopes: Vec<(Option<String>, ModelStore)>) -> Self {
        Self {
            scopes: Arc::new(scopes),
        }
    }

    /// The model `name` in `namespace`. Waits until that scope's cache has filled: an empty cache
    /// must never read as "missing", which would withdraw a client's consent and delete its
    /// certificate.
    pub async fn get(&self, namespace: &str, name: &str) -> Lookup {
        let Some((_, store)) = self
            .scopes
            .iter()
            .find(|(scope, _)| scope.as_deref().is_none_or(|s| s == namespace))
        else {
            return Lookup::NotWatched;
        };
        if store.wait_until_ready().await.is_err() {
            // The scope's controller stopped (shutdown): treat as unwatched, never as missing.
            return Lookup::NotWatched;
        }
        match store.get(&ObjectRef::new(name).within(namespace)) {
            None => Lookup::Missing,
            Some(model) => match &model.object {
                Ok(smd) => Lookup::Found(smd.clone()),
                Err(why) => Lookup::Malformed(why.clone()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector, watcher};

    use super::*;
    use crate::fixture;

    fn guarded(name: &str, namespace: &str) -> Guarded<SecureModelDeployment> {
        Guarded::new(
            fixture::smd(name)
                .namespace(namespace)
                .build()
                .expect("valid"),
        )
    }

    #[tokio::test]
    async fn models_are_found_in_the_scope_that_watches_their_namespace() {
        let (ml, mut ml_writer) = reflector::store();
        let (other, mut other_writer) = reflector::store();
        ml_writer.apply_watcher_event(&watcher::Event::Init);
        ml_writer.apply_watcher_event(&watcher::Event::InitApply(guarded("fraud", "ml")));
        ml_writer.apply_watcher_event(&watcher::Event::InitDone);
        other_writer.apply_watcher_event(&watcher::Event::Init);
        other_writer.apply_watcher_event(&watcher::Event::InitDone);
        let models = Models::new(vec![(Some("ml".into()), ml), (Some("other".into()), other)]);
        assert!(
            matches!(models.get("ml", "fraud").await, Lookup::Found(m) if m.spec.server.port == 8000)
        );
        assert!(matches!(models.get("ml", "absent").await, Lookup::Missing));
        assert!(matches!(
            models.get("other", "fraud").await,
            Lookup::Missing
        ));
        assert!(matches!(
            models.get("unwatched", "fraud").await,
            Lookup::NotWatched
        ));
        // One scope over every namespace finds everything it holds.
        let (all, mut all_writer) = reflector::store();
        all_writer.apply_watcher_event(&watcher::Event::Init);
        all_writer.apply_watcher_event(&watcher::Event::InitApply(guarded("fraud", "ml")));
        all_writer.apply_watcher_event(&watcher::Event::InitDone);
        let models = Models::new(vec![(None, all)]);
        assert!(matches!(models.get("ml", "fraud").await, Lookup::Found(_)));
        assert!(matches!(
            models.get("elsewhere", "fraud").await,
            Lookup::Missing
        ));
    }

    #[tokio::test]
    async fn a_stopped_scope_is_unwatched_never_missing() {
        let (store, writer) = reflector::store::<Guarded<SecureModelDeployment>>();
        drop(writer);
        let models = Models::new(vec![(Some("ml".into()), store)]);
        assert!(matches!(
            models.get("ml", "fraud").await,
            Lookup::NotWatched
        ));
    }
}
