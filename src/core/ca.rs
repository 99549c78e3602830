//! Planning Moat's certificate authority, pure: from the stored CA Secret and the time, what
//! the CA is, which trust bundle every certificate carries, and whether the Secret must be
//! written (created, rotated at two thirds of its validity with overlap, pruned). The shell
//! (`controller::ca`) reads and writes the Secret and publishes the result.

use std::time::Duration;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::ObjectMeta;

use crate::{
    pki::{self, Ca, KeyedCertificate, PkiError},
    render::MANAGED_BY,
};

/// Where the CA lives and how it is made.
#[derive(Clone, Debug)]
pub struct CaSettings {
    /// Namespace of the CA Secret (the operator's own).
    pub namespace: String,
    /// Name of the CA Secret. If it exists without the label `app.kubernetes.io/managed-by=moat`,
    /// it is a user-supplied CA: used as is, never written.
    pub secret_name: String,
    /// Validity of a CA Moat creates; it is rotated at two thirds of it.
    pub validity: Duration,
    /// Trust domain of the SPIFFE IDs in issued certificates.
    pub trust_domain: String,
    /// Cluster DNS domain (the `.svc.<domain>` name in serving certificates).
    pub cluster_domain: String,
}

impl Default for CaSettings {
    fn default() -> Self {
        Self {
            namespace: "moat-system".into(),
            secret_name: "moat-ca".into(),
            validity: Duration::from_secs(365 * 86_400),
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// The CA in use and the bundle every certificate Moat writes carries as `ca.crt`.
#[derive(Debug)]
pub struct CaState {
    /// The active CA: signs every new certificate.
    pub ca: Ca,
    /// PEM of every CA to trust: the active one first, then older ones until they expire.
    pub bundle_pem: String,
    /// Whether the CA was supplied by the user (never rotated by Moat).
    pub imported: bool,
    /// When [`plan`] must run again (rotation, a bundle entry expiring), unix seconds.
    pub next_check: i64,
}

/// What the CA Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCa {
    /// `tls.crt` and `tls.key`.
    pub active: KeyedCertificate,
    /// `ca.crt`, possibly empty.
    pub bundle_pem: String,
    /// Labelled as Moat's (generated) rather than supplied by the user.
    pub managed: bool,
}

/// What the operator knows of its CA, for the metrics: whether a CA is in use, and when the
/// certificate in the CA Secret expires, usable or not (an expired CA you brought, a CA whose
/// rotation cannot be written), so its expiry stays visible exactly when it matters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaHealth {
    /// A CA is in use: certificates can be issued.
    pub usable: bool,
    /// `notAfter` (unix seconds) of the certificate in the Secret's `tls.crt` when the Secret
    /// was last read; `None` if it was never read, or holds no certificate that parses.
    pub not_after: Option<i64>,
}

/// `notAfter` (unix seconds) of the first certificate in `stored`'s `tls.crt`, whether or not
/// the CA can be used (expired, not yet valid, a key that does not match, due for rotation).
pub fn certificate_not_after(stored: &StoredCa) -> Option<i64> {
    pki::pem_certificates(&stored.active.cert_pem)
        .first()
        .and_then(|der| pki::info(der))
        .map(|info| info.not_after)
}

/// What [`plan`] decided.
#[derive(Debug)]
pub enum CaPlan {
    /// Use this CA; the Secret is right as it is.
    Use(Box<CaState>),
    /// Write the Secret with this content (a managed CA created, rotated or pruned), then plan
    /// again.
    Write {
        /// The new Secret content.
        stored: StoredCa,
        /// Why, for the log and the Event.
        reason: String,
    },
    /// A user-supplied CA that cannot be used; certificates cannot be issued until it is fixed.
    Unusable(String),
}

/// Decides what the CA is at `now`.
pub fn plan(
    stored: Option<&StoredCa>,
    now: i64,
    validity: Duration,
    trust_domain: &str,
) -> Result<CaPlan, PkiError> {
    let Some(stored) = stored else {
        let active = pki::generate_ca(trust_domain, now, validity)?;
        return Ok(CaPlan::Write {
            stored: StoredCa {
                bundle_pem: active.cert_pem.clone(),
                active,
                managed: true,
            },
            reason: "created a CA".into(),
        });
    };
    if !stored.managed {
        return Ok(match Ca::load(&stored.active, now) {
            Ok(ca) => {
                let mut bundle = vec![pki::pem_certificates(&ca.cert_pem)];
                bundle.push(pki::pem_certificates(&stored.bundle_pem));
                let bundle_pem = bundle_of(bundle.concat(), now);
                let next_check = ca.info.not_after;
                CaPlan::Use(Box::new(CaState {
                    ca,
                    bundle_pem,
                    imported: true,
                    next_check,
                }))
            }
            Err(e) => CaPlan::Unusable(format!(
                "the user-supplied CA cannot be used: {e}; replace the Secret's tls.crt and tls.key"
            )),
        });
    }
    let older = pki::pem_certificates(&stored.bundle_pem);
    match Ca::load(&stored.active, now) {
        Ok(ca) if now < ca.info.renew_at() => {
            let active_der = pki::pem_certificates(&ca.cert_pem);
            let mut all = active_der.clone();
            all.extend(older.into_iter().filter(|c| !active_der.contains(c)));
            let bundle_pem = bundle_of(all, now);
            if pki::pem_certificates(&bundle_pem) != pki::pem_certificates(&stored.bundle_pem) {
                return Ok(CaPlan::Write {
                    stored: StoredCa {
                        bundle_pem,
                        ..stored.clone()
                    },
                    reason: "removed expired CAs from the trust bundle".into(),
                });
            }
            let next_check = pki::pem_certificates(&bundle_pem)
                .iter()
                .filter_map(|c| pki::info(c))
                .map(|i| i.not_after)
                .chain([ca.info.renew_at()])
                .min()
                .unwrap_or(ca.info.renew_at());
            Ok(CaPlan::Use(Box::new(CaState {
                ca,
                bundle_pem,
                imported: false,
                next_check,
            })))
        }
        loaded => {
            let reason = match loaded {
                Ok(_) => "rotated the CA at two thirds of its validity".to_string(),
                Err(e) => format!("replaced a CA that cannot be used ({e})"),
            };
            let active = pki::generate_ca(trust_domain, now, validity)?;
            let mut all = pki::pem_certificates(&active.cert_pem);
            all.extend(pki::pem_certificates(&stored.active.cert_pem));
            all.extend(older);
            Ok(CaPlan::Write {
                stored: StoredCa {
                    bundle_pem: bundle_of(all, now),
                    active,
                    managed: true,
                },
                reason,
            })
        }
    }
}

/// The unexpired certificates among `ders`, without duplicates, in order, as PEM.
fn bundle_of(ders: Vec<Vec<u8>>, now: i64) -> String {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    for der in ders {
        let valid = pki::info(&der).is_some_and(|i| now < i.not_after);
        if valid && !seen.contains(&der) {
            seen.push(der);
        }
    }
    seen.iter().map(|d| crate::pki::pem_of(d)).collect()
}

/// The value of `key` in a Secret's data, as text (empty when absent).
pub fn text(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

/// `tls.crt` and `tls.key` of a `kubernetes.io/tls` Secret.
pub fn keyed_certificate(secret: &Secret) -> KeyedCertificate {
    KeyedCertificate {
        cert_pem: text(secret, "tls.crt"),
        key_pem: text(secret, "tls.key"),
    }
}

/// What a CA Secret holds.
pub fn stored_of(secret: &Secret) -> StoredCa {
    StoredCa {
        active: keyed_certificate(secret),
        bundle_pem: text(secret, "ca.crt"),
        managed: secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/managed-by"))
            .is_some_and(|v| v == MANAGED_BY),
    }
}

/// The CA Secret that holds `stored` (with `resource_version` for an optimistic update).
pub fn secret_of(
    settings: &CaSettings,
    stored: &StoredCa,
    resource_version: Option<String>,
) -> Secret {
    let data = [
        ("tls.crt", &stored.active.cert_pem),
        ("tls.key", &stored.active.key_pem),
        ("ca.crt", &stored.bundle_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(
                [
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        MANAGED_BY.to_string(),
                    ),
                    ("app.kubernetes.io/name".to_string(), "moat-ca".to_string()),
                ]
                .into(),
            ),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const YEAR: Duration = Duration::from_secs(365 * 86_400);

    fn written(p: CaPlan) -> StoredCa {
        match p {
            CaPlan::Write { stored, .. } => stored,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    fn used(p: CaPlan) -> CaState {
        match p {
            CaPlan::Use(state) => *state,
            other => panic!("expected use, got {other:?}"),
        }
    }

    #[test]
    fn created_then_used_until_two_thirds_then_rotated_with_overlap() {
        let first = written(plan(None, NOW, YEAR, "td").expect("plan"));
        assert!(first.managed);
        let state = used(plan(Some(&first), NOW + 10, YEAR, "td").expect("plan"));
        assert_eq!(pki::pem_certificates(&state.bundle_pem).len(), 1);
        let rotate_at = state.ca.info.renew_at();
        assert_eq!(state.next_check, rotate_at);
        assert!(matches!(
            plan(Some(&first), rotate_at - 1, YEAR, "td").expect("plan"),
            CaPlan::Use(_)
        ));
        let rotated = written(plan(Some(&first), rotate_at, YEAR, "td").expect("plan"));
        assert_ne!(rotated.active, first.active);
        let bundle = pki::pem_certificates(&rotated.bundle_pem);
        assert_eq!(bundle.len(), 2, "old and new CA are both trusted");
        assert_eq!(
            bundle[0],
            pki::pem_certificates(&rotated.active.cert_pem)[0]
        );
        let state = used(plan(Some(&rotated), rotate_at + 1, YEAR, "td").expect("plan"));
        // The old CA leaves the bundle when it expires.
        let old_expiry = pki::info(&bundle[1]).expect("info").not_after;
        assert_eq!(state.next_check, old_expiry);
        let pruned = written(plan(Some(&rotated), old_expiry, YEAR, "td").expect("plan"));
        assert_eq!(pruned.active, rotated.active);
        assert_eq!(pki::pem_certificates(&pruned.bundle_pem).len(), 1);
    }

    #[test]
    fn a_damaged_managed_ca_is_replaced_and_a_damaged_imported_one_is_reported() {
        let first = written(plan(None, NOW, YEAR, "td").expect("plan"));
        let mut damaged = first.clone();
        damaged.active.key_pem = "garbage".into();
        let replaced = written(plan(Some(&damaged), NOW, YEAR, "td").expect("plan"));
        assert_ne!(replaced.active.cert_pem, first.active.cert_pem);
        damaged.managed = false;
        match plan(Some(&damaged), NOW, YEAR, "td").expect("plan") {
            CaPlan::Unusable(why) => assert!(why.contains("user-supplied"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_expiry_of_the_stored_certificate_is_known_when_the_ca_cannot_be_used() {
        let first = written(plan(None, NOW, YEAR, "td").expect("plan"));
        let not_after = pki::info(&pki::pem_certificates(&first.active.cert_pem)[0])
            .expect("info")
            .not_after;
        assert_eq!(certificate_not_after(&first), Some(not_after));
        // Due for rotation: the plan is to write a new CA; until that write succeeds, the
        // Secret still holds the old one, whose expiry is what the alert must see.
        let due = used(plan(Some(&first), NOW, YEAR, "td").expect("plan"))
            .ca
            .info
            .renew_at();
        assert!(matches!(
            plan(Some(&first), due, YEAR, "td").expect("plan"),
            CaPlan::Write { .. }
        ));
        assert_eq!(certificate_not_after(&first), Some(not_after));
        // A CA you brought that has expired, or whose key is wrong: unusable, expiry known.
        let mut user = first.clone();
        user.managed = false;
        assert!(matches!(
            plan(Some(&user), not_after + 1, YEAR, "td").expect("plan"),
            CaPlan::Unusable(_)
        ));
        user.active.key_pem = "garbage".into();
        assert!(matches!(
            plan(Some(&user), NOW, YEAR, "td").expect("plan"),
            CaPlan::Unusable(_)
        ));
        assert_eq!(certificate_not_after(&user), Some(not_after));
        // Nothing that parses: unknown.
        user.active.cert_pem = "garbage".into();
        assert_eq!(certificate_not_after(&user), None);
    }

    #[test]
    fn an_imported_ca_is_used_as_is_and_never_rotated() {
        let mut user = written(plan(None, NOW, YEAR, "td").expect("plan"));
        user.managed = false;
        user.bundle_pem = String::new();
        let late = NOW + 300 * 86_400;
        let state = used(plan(Some(&user), late, YEAR, "td").expect("plan"));
        assert!(state.imported);
        assert_eq!(state.bundle_pem, user.active.cert_pem);
    }
}
