//! Moat's certificate authority and the certificates it issues (rcgen), and inspection of issued
//! certificates (x509-parser). No I/O: time comes in as an argument; randomness only through key
//! generation. Every key is ECDSA P-256.
//!
//! - The CA is self-signed, `CA:TRUE, pathlen:0`, valid for a configured period and rotated at
//!   two thirds of it. After a rotation the trust bundle carries the old and the new CA until the
//!   old one expires, so certificates issued by either verify.
//! - A leaf certificate names its workload by SPIFFE-style URI
//!   (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`); serving certificates also
//!   carry the Service's DNS names. Leaves never outlive the CA that signed them and are renewed
//!   at two thirds of their lifetime.

use std::{fmt, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, pem::Pem};

/// Seconds a certificate is backdated, to tolerate clocks slightly behind the operator's.
pub const BACKDATE_SECONDS: i64 = 60;

/// Why a certificate could not be created or a CA not loaded.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to generate a key or sign a certificate.
    #[error("creating a certificate: {0}")]
    Create(#[from] rcgen::Error),
    /// The CA material is not a PEM certificate and key.
    #[error("the CA certificate cannot be read: {0}")]
    CaCertificate(String),
    /// The CA key is not the key of the CA certificate.
    #[error("the CA private key does not belong to the CA certificate")]
    CaKeyMismatch,
    /// The certificate is not a CA certificate.
    #[error("the CA certificate is not a CA (it lacks basicConstraints CA:TRUE)")]
    NotCa,
    /// The CA has expired or is not yet valid.
    #[error(
        "the CA certificate is not valid now (valid from {not_before} to {not_after}, unix seconds)"
    )]
    CaNotValid {
        /// Start of validity, unix seconds.
        not_before: i64,
        /// End of validity, unix seconds.
        not_after: i64,
    },
    /// A time outside what X.509 can express.
    #[error("time {0} is out of range")]
    Time(i64),
}

/// A certificate and its private key in PEM. `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyedCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
}

impl fmt::Debug for KeyedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCertificate")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Facts about a certificate read from its DER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lower-case hex without separators.
    pub serial: String,
    /// Start of validity, unix seconds.
    pub not_before: i64,
    /// End of validity, unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    /// When the certificate is due for renewal (or a CA for rotation): two thirds into its
    /// validity, counted from the real issue time (not the backdated `not_before`).
    pub fn renew_at(&self) -> i64 {
        let issued = self.not_before + BACKDATE_SECONDS;
        issued + (self.not_after - issued) * 2 / 3
    }
}

/// A loaded CA: can sign leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    der: Vec<u8>,
    /// Serial and validity of the CA certificate.
    pub info: CertInfo,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("info", &self.info).finish()
    }
}

fn at(unix: i64) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|_| PkiError::Time(unix))
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    // 16 random bytes from a fresh key's private scalar would be odd; use the OS RNG via ring.
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| PkiError::Create(rcgen::Error::RingUnspecified))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    Ok(SerialNumber::from_slice(&bytes))
}

/// A new P-256 key and the parameters every certificate Moat makes shares: the subject `dn`, valid
/// from a little before `now` (clock skew) until `not_after` (unix seconds), a random serial.
fn fresh(
    dn: DistinguishedName,
    now: i64,
    not_after: i64,
) -> Result<(KeyPair, CertificateParams), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.not_before = at(now - BACKDATE_SECONDS)?;
    params.not_after = at(not_after)?;
    params.serial_number = Some(random_serial()?);
    Ok((key, params))
}

/// Creates a self-signed CA for `trust_domain`, valid from `now` for `validity`.
pub fn generate_ca(
    trust_domain: &str,
    now: i64,
    validity: Duration,
) -> Result<KeyedCertificate, PkiError> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Moat");
    dn.push(
        DnType::CommonName,
        format!("Moat CA {trust_domain} {}", now.max(0)),
    );
    let (key, mut params) = fresh(dn, now, now + seconds(validity))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(KeyedCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Every certificate in a PEM bundle, as DER, skipping other PEM blocks.
pub fn pem_certificates(pem: &str) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

/// Serial and validity of a DER certificate.
pub fn info(der: &[u8]) -> Option<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(info_of(&cert))
}

fn info_of(cert: &X509Certificate<'_>) -> CertInfo {
    CertInfo {
        serial: hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Ca {
    /// Loads a CA from its certificate and key, checking that they belong together, that the
    /// certificate is a CA, and that it is valid at `now`.
    pub fn load(material: &KeyedCertificate, now: i64) -> Result<Self, PkiError> {
        let der = pem_certificates(&material.cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::CaCertificate("no CERTIFICATE block".into()))?;
        let key = KeyPair::from_pem(&material.key_pem)
            .map_err(|e| PkiError::CaCertificate(format!("private key: {e}")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::CaCertificate(e.to_string()))?;
        if !cert.is_ca() {
            return Err(PkiError::NotCa);
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::CaKeyMismatch);
        }
        let info = info_of(&cert);
        if now < info.not_before || now >= info.not_after {
            return Err(PkiError::CaNotValid {
                not_before: info.not_before,
                not_after: info.not_after,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)?;
        Ok(Self {
            issuer,
            cert_pem: pem_of(&der),
            der,
            info,
        })
    }

    /// Issues a leaf certificate for `identity`, valid from `now` for `lifetime` but never past
    /// the CA's own expiry.
    pub fn issue(
        &self,
        identity: &Identity,
        trust_domain: &str,
        now: i64,
        lifetime: Duration,
    ) -> Result<KeyedCertificate, PkiError> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.common_name());
        let not_after = (now + seconds(lifetime)).min(self.info.not_after);
        let (key, mut params) = fresh(dn, now, not_after)?;
        params.subject_alt_names = identity
            .expected_sans(trust_domain)
            .into_iter()
            .map(|san| match san {
                San::Dns(name) => name.try_into().map(SanType::DnsName),
                San::Uri(uri) => uri.try_into().map(SanType::URI),
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match identity.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(KeyedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Whether `cert_der` was signed by this CA.
    fn signed(&self, cert: &X509Certificate<'_>) -> bool {
        x509_parser::parse_x509_certificate(&self.der)
            .ok()
            .is_some_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
    }
}

/// A DER certificate as PEM with `\n` line endings.
pub fn pem_of(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// What a certificate is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// TLS server (a model's serving certificate).
    Server,
    /// TLS client (a ModelClient's certificate).
    Client,
}

/// The workload a leaf certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Namespace of the workload.
    pub namespace: String,
    /// ServiceAccount the workload runs as.
    pub service_account: String,
    /// DNS names (serving certificates: the Service's names).
    pub dns_names: Vec<String>,
    /// Server or client.
    pub usage: Usage,
}

/// A subject alternative name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum San {
    /// A DNS name.
    Dns(String),
    /// A URI (the SPIFFE ID).
    Uri(String),
}

impl Identity {
    /// The serving identity of a Service `name` in `namespace` whose pods run as
    /// `service_account`: the short, namespaced, `.svc` and `.svc.<cluster-domain>` names.
    pub fn server(
        namespace: &str,
        name: &str,
        service_account: &str,
        cluster_domain: &str,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            dns_names: vec![
                name.to_string(),
                format!("{name}.{namespace}"),
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.{cluster_domain}"),
            ],
            usage: Usage::Server,
        }
    }

    /// The client identity of `service_account` in `namespace`.
    pub fn client(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            dns_names: Vec::new(),
            usage: Usage::Client,
        }
    }

    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    fn common_name(&self) -> String {
        match self.usage {
            Usage::Server => self
                .dns_names
                .first()
                .cloned()
                .unwrap_or_else(|| self.service_account.clone()),
            Usage::Client => format!("{}.{}", self.service_account, self.namespace),
        }
    }

    /// The subject alternative names a certificate for this identity carries, sorted.
    pub fn expected_sans(&self, trust_domain: &str) -> Vec<San> {
        let mut sans: Vec<San> = self.dns_names.iter().cloned().map(San::Dns).collect();
        sans.push(San::Uri(self.spiffe_id(trust_domain)));
        sans.sort();
        sans
    }
}

/// Whether an existing certificate can stay, or why it must be issued anew.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The certificate is valid, for this identity, from the active CA, and not yet due.
    Keep(CertInfo),
    /// Issue a new certificate, for this reason (shown in Events).
    Issue(&'static str),
}

/// Why [`inspect`] wants a certificate issued anew (shown in Events).
pub mod issue {
    /// There is no stored certificate.
    pub const NONE_YET: &str = "no certificate yet";
    /// The stored certificate is damaged: not PEM.
    pub const NOT_PEM: &str = "the stored certificate is not PEM";
    /// The stored certificate is damaged: not X.509.
    pub const NOT_X509: &str = "the stored certificate is not X.509";
    /// Another CA signed it (the CA was rotated, or the certificate replaced).
    pub const OTHER_CA: &str = "the certificate was not signed by the active CA";
    /// The stored key is not the certificate's.
    pub const KEY_MISMATCH: &str = "the private key does not match the certificate";
    /// It names another identity.
    pub const OTHER_IDENTITY: &str = "the certificate names a different identity";
    /// The wanted lifetime changed.
    pub const LIFETIME_CHANGED: &str = "the certificate lifetime changed";
    /// Two thirds of its lifetime have passed.
    pub const DUE: &str = "the certificate is due for renewal";

    /// Whether the reason is Moat's own schedule or configuration (a renewal, a new CA, a new
    /// lifetime or identity) rather than a stored certificate that is missing or damaged.
    pub fn is_scheduled(reason: &str) -> bool {
        [DUE, OTHER_CA, LIFETIME_CHANGED, OTHER_IDENTITY].contains(&reason)
    }
}

/// Judges a stored certificate and key against what they should be at `now`.
pub fn inspect(
    stored: Option<&KeyedCertificate>,
    ca: &Ca,
    identity: &Identity,
    trust_domain: &str,
    lifetime: Duration,
    now: i64,
) -> Verdict {
    let Some(stored) = stored else {
        return Verdict::Issue(issue::NONE_YET);
    };
    let Some(der) = pem_certificates(&stored.cert_pem).into_iter().next() else {
        return Verdict::Issue(issue::NOT_PEM);
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Verdict::Issue(issue::NOT_X509);
    };
    if !ca.signed(&cert) {
        return Verdict::Issue(issue::OTHER_CA);
    }
    match KeyPair::from_pem(&stored.key_pem) {
        Ok(key) if cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw() => {}
        _ => return Verdict::Issue(issue::KEY_MISMATCH),
    }
    let mut sans: Vec<San> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(San::Dns((*d).to_string())),
                    GeneralName::URI(u) => Some(San::Uri((*u).to_string())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    sans.sort();
    if sans != identity.expected_sans(trust_domain) {
        return Verdict::Issue(issue::OTHER_IDENTITY);
    }
    let info = info_of(&cert);
    let wanted_end =
        (info.not_before + BACKDATE_SECONDS + seconds(lifetime)).min(ca.info.not_after);
    if info.not_after != wanted_end {
        return Verdict::Issue(issue::LIFETIME_CHANGED);
    }
    if now >= info.renew_at() {
        return Verdict::Issue(issue::DUE);
    }
    Verdict::Keep(info)
}

/// Whether the first certificate in `cert_pem` was signed by the first one in `ca_pem`.
pub fn issued_by(cert_pem: &str, ca_pem: &str) -> bool {
    let (Some(cert), Some(ca)) = (
        pem_certificates(cert_pem).into_iter().next(),
        pem_certificates(ca_pem).into_iter().next(),
    ) else {
        return false;
    };
    match (
        x509_parser::parse_x509_certificate(&cert),
        x509_parser::parse_x509_certificate(&ca),
    ) {
        (Ok((_, cert)), Ok((_, ca))) => cert.verify_signature(Some(ca.public_key())).is_ok(),
        _ => false,
    }
}

/// SHA-256 of `data`, lower-case hex (for the pod-template annotation that rolls pods when their
/// certificate changes).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const DAY: Duration = Duration::from_secs(86_400);

    fn ca() -> Ca {
        let m = generate_ca("cluster.local", NOW, 365 * DAY).expect("ca");
        Ca::load(&m, NOW).expect("load")
    }

    fn server() -> Identity {
        Identity::server("ml", "fraud", "fraud", "cluster.local")
    }

    #[test]
    fn a_fresh_leaf_is_kept_until_two_thirds_of_its_life() {
        let ca = ca();
        let leaf = ca
            .issue(&server(), "cluster.local", NOW, DAY)
            .expect("issue");
        let Verdict::Keep(info) = inspect(Some(&leaf), &ca, &server(), "cluster.local", DAY, NOW)
        else {
            panic!("fresh leaf not kept");
        };
        assert_eq!(info.not_after, NOW + 86_400);
        assert_eq!(info.renew_at(), NOW + 57_600);
        assert!(matches!(
            inspect(
                Some(&leaf),
                &ca,
                &server(),
                "cluster.local",
                DAY,
                NOW + 57_599
            ),
            Verdict::Keep(_)
        ));
        assert_eq!(
            inspect(
                Some(&leaf),
                &ca,
                &server(),
                "cluster.local",
                DAY,
                NOW + 57_600
            ),
            Verdict::Issue("the certificate is due for renewal")
        );
    }

    #[test]
    fn wrong_identity_ca_key_or_lifetime_reissue() {
        let ca = ca();
        let leaf = ca
            .issue(&server(), "cluster.local", NOW, DAY)
            .expect("issue");
        let other = Identity::server("ml", "other", "other", "cluster.local");
        assert_eq!(
            inspect(Some(&leaf), &ca, &other, "cluster.local", DAY, NOW),
            Verdict::Issue("the certificate names a different identity")
        );
        let ca2 = self::ca();
        assert_eq!(
            inspect(Some(&leaf), &ca2, &server(), "cluster.local", DAY, NOW),
            Verdict::Issue("the certificate was not signed by the active CA")
        );
        let other_leaf = ca
            .issue(&server(), "cluster.local", NOW, DAY)
            .expect("issue");
        let mixed = KeyedCertificate {
            cert_pem: leaf.cert_pem.clone(),
            key_pem: other_leaf.key_pem,
        };
        assert_eq!(
            inspect(Some(&mixed), &ca, &server(), "cluster.local", DAY, NOW),
            Verdict::Issue("the private key does not match the certificate")
        );
        assert_eq!(
            inspect(Some(&leaf), &ca, &server(), "cluster.local", 2 * DAY, NOW),
            Verdict::Issue("the certificate lifetime changed")
        );
        let garbage = KeyedCertificate {
            cert_pem: "not a cert".into(),
            key_pem: leaf.key_pem.clone(),
        };
        assert!(matches!(
            inspect(Some(&garbage), &ca, &server(), "cluster.local", DAY, NOW),
            Verdict::Issue(_)
        ));
    }

    #[test]
    fn leaves_never_outlive_their_ca() {
        let m = generate_ca("cluster.local", NOW, Duration::from_secs(3600)).expect("ca");
        let ca = Ca::load(&m, NOW).expect("load");
        let leaf = ca
            .issue(&server(), "cluster.local", NOW, DAY)
            .expect("issue");
        let info = info(&pem_certificates(&leaf.cert_pem)[0]).expect("info");
        assert_eq!(info.not_after, NOW + 3600);
        assert!(matches!(
            inspect(Some(&leaf), &ca, &server(), "cluster.local", DAY, NOW),
            Verdict::Keep(_)
        ));
    }

    #[test]
    fn a_ca_is_refused_when_expired_mismatched_or_not_a_ca() {
        let m = generate_ca("cluster.local", NOW, DAY).expect("ca");
        assert!(matches!(
            Ca::load(&m, NOW + 86_400),
            Err(PkiError::CaNotValid { .. })
        ));
        let other = generate_ca("cluster.local", NOW, DAY).expect("ca");
        let mixed = KeyedCertificate {
            cert_pem: m.cert_pem.clone(),
            key_pem: other.key_pem,
        };
        assert!(matches!(
            Ca::load(&mixed, NOW),
            Err(PkiError::CaKeyMismatch)
        ));
        let ca = Ca::load(&m, NOW).expect("load");
        let leaf = ca
            .issue(&server(), "cluster.local", NOW, DAY)
            .expect("leaf");
        assert!(matches!(Ca::load(&leaf, NOW), Err(PkiError::NotCa)));
    }

    #[test]
    fn debug_never_shows_a_private_key() {
        let m = generate_ca("cluster.local", NOW, DAY).expect("ca");
        let shown = format!("{m:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn serving_identity_names_every_service_dns_form_and_the_spiffe_id() {
        let sans = server().expected_sans("example.org");
        assert_eq!(
            sans,
            vec![
                San::Dns("fraud".into()),
                San::Dns("fraud.ml".into()),
                San::Dns("fraud.ml.svc".into()),
                San::Dns("fraud.ml.svc.cluster.local".into()),
                San::Uri("spiffe://example.org/ns/ml/sa/fraud".into()),
            ]
        );
    }
}
