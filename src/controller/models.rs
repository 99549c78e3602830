//! The SecureModelDeployments of every watch scope, read from the caches the SMD controllers
//! keep: how a ModelClient finds the model it refers to without a GET, in whichever scope the
//! model lives.

use std::sync::Arc;

use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::watch;

use super::guard::Guarded;
use crate::api::SecureModelDeployment;

/// The SMD cache of one watch scope.
pub type ModelStore = Store<Guarded<SecureModelDeployment>>;

/// Whether a scope's SMD cache has filled (its watch listed everything once). A `watch` channel,
/// not `Store::wait_until_ready`: that wakes only the last of several concurrent waiters (one
/// oneshot waker slot), so a ModelClient reconcile waiting there beside the controller could
/// hang for good.
pub type Synced = watch::Receiver<bool>;

/// The SMD caches of all watch scopes (`None`: every namespace).
#[derive(Clone, Default)]
pub struct Models {
    scopes: Arc<Vec<(Option<String>, ModelStore, Synced)>>,
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
    pub fn new(scopes: Vec<(Option<String>, ModelStore, Synced)>) -> Self {
        Self {
            scopes: Arc::new(scopes),
        }
    }

    /// The model `name` in `namespace`. Waits until that scope's cache has filled: an empty cache
    /// must never read as "missing", which would withdraw a client's consent and delete its
    /// certificate.
    pub async fn get(&self, namespace: &str, name: &str) -> Lookup {
        let Some((_, store, synced)) = self
            .scopes
            .iter()
            .find(|(scope, _, _)| scope.as_deref().is_none_or(|s| s == namespace))
        else {
            return Lookup::NotWatched;
        };
        let mut synced = synced.clone();
        if synced.wait_for(|filled| *filled).await.is_err() {
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
        let (_ml_synced, ml_rx) = watch::channel(true);
        let (_other_synced, other_rx) = watch::channel(true);
        let models = Models::new(vec![
            (Some("ml".into()), ml, ml_rx),
            (Some("other".into()), other, other_rx),
        ]);
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
        let (_all_synced, all_rx) = watch::channel(true);
        let models = Models::new(vec![(None, all, all_rx)]);
        assert!(matches!(models.get("ml", "fraud").await, Lookup::Found(_)));
        assert!(matches!(
            models.get("elsewhere", "fraud").await,
            Lookup::Missing
        ));
    }

    #[tokio::test]
    async fn a_stopped_scope_is_unwatched_never_missing() {
        let (store, _writer) = reflector::store::<Guarded<SecureModelDeployment>>();
        let (synced, rx) = watch::channel(false);
        drop(synced);
        let models = Models::new(vec![(Some("ml".into()), store, rx)]);
        assert!(matches!(
            models.get("ml", "fraud").await,
            Lookup::NotWatched
        ));
    }

    /// Many lookups wait for one scope to fill at once, from different tasks; all of them
    /// finish when it does (a Store's own readiness would wake only the last one).
    #[tokio::test]
    async fn concurrent_lookups_all_wake_when_the_cache_fills() {
        let (store, mut writer) = reflector::store();
        let (synced, rx) = watch::channel(false);
        let models = Models::new(vec![(Some("ml".into()), store, rx)]);
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let models = models.clone();
                tokio::spawn(async move { models.get("ml", "fraud").await })
            })
            .collect();
        tokio::task::yield_now().await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(guarded("fraud", "ml")));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        synced.send_replace(true);
        for waiter in waiters {
            let found = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
                .await
                .expect("every waiter wakes")
                .expect("joined");
            assert!(matches!(found, Lookup::Found(_)), "{found:?}");
        }
    }
}
