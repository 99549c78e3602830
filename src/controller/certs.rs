//! Issuing or keeping one certificate: the stored one is kept while [`pki::inspect`] accepts it;
//! otherwise a fresh read confirms the cache was not merely stale before a new one is issued.

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};

use kube::Api;

use super::{Context, Error};
use crate::{
    api::CertificateStatus,
    pki::{self, CertInfo, Identity, KeyedCertificate, Verdict},
};

/// A certificate to store, and whether it is new.
pub(super) struct Certified {
    /// Certificate and key.
    pub cert: KeyedCertificate,
    /// Serial and validity.
    pub info: CertInfo,
    /// The trust bundle to store beside it as `ca.crt`.
    pub bundle_pem: String,
    /// Why it was issued now, or `None` when the stored one was kept.
    pub issued: Option<&'static str>,
}

impl Certified {
    /// The status block describing it.
    pub fn status(&self, secret_name: &str) -> CertificateStatus {
        CertificateStatus {
            secret_name: secret_name.to_string(),
            serial: self.info.serial.clone(),
            not_after: time(self.info.not_after),
            renew_at: time(self.info.renew_at()),
            tls_hash: Some(self.tls().hash()),
        }
    }

    /// The certificate, its key and the trust bundle, as a Secret holds them.
    pub fn tls(&self) -> crate::render::ServingTls {
        crate::render::ServingTls {
            cert_pem: self.cert.cert_pem.clone(),
            key_pem: self.cert.key_pem.clone(),
            ca_bundle_pem: self.bundle_pem.clone(),
        }
    }

    /// How long after `now` (unix seconds) it is due for renewal (at least a second).
    pub fn renew_in(&self, now: i64) -> Duration {
        Duration::from_secs(
            u64::try_from(self.info.renew_at() - now)
                .unwrap_or(0)
                .max(1),
        )
    }
}

fn time(unix: i64) -> Time {
    Time(Timestamp::from_second(unix).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The serial number of a stored certificate, hex, as `status.certificate.serial` records it.
pub(super) fn serial(stored: &KeyedCertificate) -> Option<String> {
    let der = pki::pem_certificates(&stored.cert_pem).into_iter().next()?;
    pki::info(&der).map(|i| i.serial)
}

/// `tls.crt` and `tls.key` of a Secret.
pub(super) fn stored(secret: &Secret) -> KeyedCertificate {
    crate::core::ca::keyed_certificate(secret)
}

/// The certificate for `identity` to store in the Secret `namespace/name`, whose cached copy is
/// `cached`: kept if still good, else issued by the active CA.
pub(super) async fn certificate(
    ctx: &Context,
    namespace: &str,
    name: &str,
    cached: Option<&Secret>,
    identity: &Identity,
    lifetime: Duration,
    now: i64,
) -> Result<Certified, Error> {
    let Some(ca) = ctx.ca.borrow().clone() else {
        return Err(Error::CaUnavailable);
    };
    let td = &ctx.settings.ca.trust_domain;
    let judge = |s: Option<&Secret>| {
        let stored = s.map(stored);
        let verdict = pki::inspect(stored.as_ref(), &ca.ca, identity, td, lifetime, now);
        (stored, verdict)
    };
    let (mut stored, mut verdict) = judge(cached);
    if matches!(verdict, Verdict::Issue(_)) {
        // The cache may lag behind a certificate written a moment ago.
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
        let fresh = api.get_opt(name).await.map_err(|source| Error::Read {
            kind: "Secret",
            source,
        })?;
        (stored, verdict) = judge(fresh.as_ref());
    }
    match (verdict, stored) {
        (Verdict::Keep(info), Some(cert)) => Ok(Certified {
            cert,
            info,
            bundle_pem: ca.bundle_pem.clone(),
            issued: None,
        }),
        (verdict, _) => {
            let reason = match verdict {
                Verdict::Issue(reason) => reason,
                Verdict::Keep(_) => "no certificate yet",
            };
            let cert = ca
                .ca
                .issue(identity, td, now, lifetime)
                .map_err(Error::Certificate)?;
            let info = pki::pem_certificates(&cert.cert_pem)
                .first()
                .and_then(|der| pki::info(der))
                .ok_or(Error::Certificate(pki::PkiError::CaCertificate(
                    "an issued certificate could not be read back".into(),
                )))?;
            ctx.metrics.certificate_issued(match identity.usage {
                pki::Usage::Server => "serving",
                pki::Usage::Client => "client",
            });
            Ok(Certified {
                cert,
                info,
                bundle_pem: ca.bundle_pem.clone(),
                issued: Some(reason),
            })
        }
    }
}
