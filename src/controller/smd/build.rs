//! Step 3, build: the desired children and what else the apply step must know, from the
//! validated object and the dereferenced facts. Pure: no client, no clock.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::dereference::Dereferenced;
use crate::{
    api::conditions,
    controller::{Error, certs},
    core::drift::{self, OwnChanges},
    pki,
    render::{self, Children, Facts, Resolved, ServingTls, Valid},
};

/// What [`build`] decided.
pub(super) struct Built {
    /// The desired children.
    pub children: Children,
    /// Whether Moat had converged this generation before: only then is a difference someone
    /// else's change (drift).
    pub converged_before: bool,
    /// The paths of each child that changed because Moat's own facts changed.
    pub own: OwnChanges,
    /// What guards the endpoint, for the status.
    pub gate: crate::api::GateStatus,
}

/// Renders the children of `valid` with `facts`.
pub(super) fn build(
    valid: &Valid<'_>,
    cluster: &Facts,
    facts: &Dereferenced,
) -> Result<Built, Error> {
    let smd = valid.smd();
    let certified = &facts.certified;
    let resolved = Resolved {
        tls: certified.tls(),
        image: facts.pin.status.pinned.clone(),
        helper_image: facts.helper_image.clone(),
        gate_identities: facts.gate_identities.clone(),
        quarantine: render::gate::quarantine(smd),
    };
    let children = render::build(valid, cluster, &resolved).map_err(Error::Invalid)?;
    let enforced = render::gate::enforced(smd);
    let policy_hash = if enforced {
        let policy = render::gate::policy(smd, &resolved);
        Some(
            render::gate::policy_json(&policy)
                .map_err(Error::Invalid)?
                .1,
        )
    } else {
        None
    };
    let gate = crate::core::status::gate(
        enforced,
        &resolved.gate_identities,
        resolved.quarantine.clone().filter(|_| enforced),
        policy_hash,
    );
    // A model rolled back to its last known-good revision is converged too (on that revision):
    // changes by others are still drift.
    let converged_before = smd.status.as_ref().is_some_and(|s| {
        s.observed_generation == smd.metadata.generation
            && s.conditions.iter().all(|c| {
                c.type_ != conditions::STALLED
                    || c.status != "True"
                    || c.reason == conditions::reason::ROLLED_BACK
            })
    });
    // What changes because Moat's own facts changed since the last converged status (a new
    // certificate, a new pin) is an update, never drift of the objects that follow from it.
    let before = before_facts(valid, &resolved, &certified.info.serial);
    let mut own = match (converged_before, before) {
        (true, Some(before)) => {
            let before = render::build(valid, cluster, &before)
                .and_then(|c| c.objects())
                .map_err(Error::Invalid)?;
            drift::own_changes_of(&children.objects().map_err(Error::Invalid)?, &before)
        }
        _ => OwnChanges::new(),
    };
    // The Secret that holds the certificate is itself drift when what it holds is not what the
    // status recorded (someone replaced, damaged or deleted it), even though a new one was issued:
    // its changes are Moat's own only for a scheduled reissue of the recorded certificate, or a
    // new trust bundle beside it.
    let secret_name = render::tls_secret_name(&smd.name_any());
    let recorded = smd
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .map(|c| c.serial.as_str());
    let held = facts
        .live
        .secrets
        .iter()
        .find(|s| s.name_any() == secret_name)
        .and_then(|s| certs::serial(&certs::stored(s)));
    let scheduled = certified.issued.is_none_or(pki::issue::is_scheduled);
    if held.as_deref() != recorded || !scheduled {
        own.remove(&(<Secret as k8s_openapi::Resource>::KIND, secret_name));
    }
    Ok(Built {
        children,
        converged_before,
        own,
        gate,
    })
}

/// The rendering inputs of the last converged status, where they differ from `now`: the
/// certificate (by its hash, or the serial `now_serial`), the pinned image and Moat's own helper
/// image. `None` when nothing Moat dereferences changed.
fn before_facts(valid: &Valid<'_>, now: &Resolved, now_serial: &str) -> Option<Resolved> {
    let status = valid.smd().status.as_ref()?;
    // The certificate or its trust bundle changed: by the recorded hash of both, or (a status
    // written before the hash was recorded) by the serial.
    let cert_changed = status
        .certificate
        .as_ref()
        .is_some_and(|c| match &c.tls_hash {
            Some(hash) => *hash != now.tls.hash(),
            None => c.serial != now_serial,
        });
    let earlier_pin = status
        .image
        .as_ref()
        .map(|i| i.pinned.clone())
        .filter(|p| *p != now.image);
    let earlier_helper = status
        .image
        .as_ref()
        .and_then(|i| i.helper.clone())
        .filter(|h| *h != now.helper_image && !now.helper_image.is_empty());
    // The gate's identities and quarantine, as the last status recorded them (a status
    // written before the gate existed records neither, and nothing is rebuilt for them).
    let earlier_gate = status.gate.as_ref().filter(|g| g.enforced);
    let earlier_identities = earlier_gate
        .map(|g| {
            g.identities
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
        })
        .filter(|ids| *ids != now.gate_identities);
    let earlier_quarantine = earlier_gate
        .map(|g| g.quarantined.clone())
        .filter(|q| *q != now.quarantine);
    if !cert_changed
        && earlier_pin.is_none()
        && earlier_helper.is_none()
        && earlier_identities.is_none()
        && earlier_quarantine.is_none()
    {
        return None;
    }
    Some(Resolved {
        // Only which paths depend on the certificate matters, not the earlier value.
        tls: if cert_changed {
            ServingTls::placeholder()
        } else {
            now.tls.clone()
        },
        image: earlier_pin.unwrap_or_else(|| now.image.clone()),
        helper_image: earlier_helper.unwrap_or_else(|| now.helper_image.clone()),
        gate_identities: earlier_identities.unwrap_or_else(|| now.gate_identities.clone()),
        quarantine: earlier_quarantine.unwrap_or_else(|| now.quarantine.clone()),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{api::ImageStatus, fixture};

    const OLD: &str = "registry.example.com/moat@sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "registry.example.com/moat@sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn resolved(image: &str, helper: &str) -> Resolved {
        Resolved {
            tls: ServingTls::placeholder(),
            image: image.into(),
            helper_image: helper.into(),
            gate_identities: Default::default(),
            quarantine: None,
        }
    }

    fn smd_with(image: Option<ImageStatus>) -> crate::api::SecureModelDeployment {
        let mut smd = fixture::smd("m")
            .namespace("n")
            .uid("00000000-0000-0000-0000-000000000001")
            .build()
            .expect("valid");
        smd.status = Some(crate::api::SecureModelDeploymentStatus {
            image,
            ..Default::default()
        });
        smd
    }

    fn image(pinned: &str, helper: Option<&str>) -> ImageStatus {
        ImageStatus {
            requested: pinned.into(),
            pinned: pinned.into(),
            resolved_at: None,
            resolve_request: None,
            helper: helper.map(str::to_string),
        }
    }

    /// Which earlier inputs are rebuilt to tell Moat's own changes from drift: a new pin, a new
    /// helper image (an operator upgrade), each alone; nothing when neither changed, and no
    /// helper when the model has none or the status predates the field.
    #[test]
    fn before_facts_rebuild_the_earlier_pin_and_helper_image() {
        let img = fixture::IMAGE;
        let other = "registry.example.com/serving/model-server@sha256:3333333333333333333333333333333333333333333333333333333333333333";
        for (recorded, now, want) in [
            (image(img, Some(OLD)), resolved(img, OLD), None),
            (image(img, Some(OLD)), resolved(img, NEW), Some((img, OLD))),
            (
                image(other, Some(OLD)),
                resolved(img, OLD),
                Some((other, OLD)),
            ),
            (
                image(other, Some(OLD)),
                resolved(img, NEW),
                Some((other, OLD)),
            ),
            (image(img, None), resolved(img, NEW), None),
            (image(img, Some(OLD)), resolved(img, ""), None),
        ] {
            let smd = smd_with(Some(recorded.clone()));
            let valid = render::validated(&smd).expect("valid");
            let got = before_facts(&valid, &now, "serial").map(|b| (b.image, b.helper_image));
            let want = want.map(|(i, h): (&str, &str)| (i.to_string(), h.to_string()));
            assert_eq!(
                got,
                want,
                "recorded {recorded:?}, now {:?}",
                json!([now.image, now.helper_image])
            );
        }
    }
}
