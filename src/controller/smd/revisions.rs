//! Step 4, revisions: records the revision the built pod template is (a ModelRevision, created
//! once per distinct template and pruned to the history limit), and puts the last known-good
//! revision's template into the Deployment while the spec asks for a revision that failed
//! (`core::revision` decides; this reads and writes). The spec is never written.

use k8s_openapi::{api::core::v1::PodTemplateSpec, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams},
    runtime::events::EventType,
};

use super::build::Built;
use crate::{
    api::{
        AwaitingApproval, ModelApproval, ModelRevision, ModelRevisionSpec, ModelRevisionStatus,
        REVISION_MODEL_LABEL, RecordedApproval, RefusedApproval, RevisionRef,
        SecureModelDeployment, conditions::reason,
    },
    controller::{Context, Error, events::publish},
    core::{
        approval::{self, Candidate, Subject},
        revision::{self, Kept, Serve},
    },
};

/// The annotation the chart's MutatingAdmissionPolicy sets on a SecureModelDeployment to the user
/// who last changed its spec (from the admission request).
pub const AUTHOR_ANNOTATION: &str = "moat.dev/spec-author";

const KIND: &str = "ModelRevision";

/// What [`prepare`] decided.
pub(super) struct Revisions {
    /// The revision the spec renders to.
    pub current: RevisionRef,
    /// The revision put into the Deployment (`None`: a first revision awaiting approval, no pods).
    pub serving: Option<RevisionRef>,
    /// How many ModelRevisions are kept.
    pub history: i32,
    /// The last revision approved to go live.
    pub approved: Option<RevisionRef>,
    /// What the current revision awaits, when it may not go live yet.
    pub awaiting: Option<AwaitingApproval>,
    /// The last known-good revision's ModelRevision is gone: the status forgets it.
    pub lost_known_good: bool,
}

/// The model's ModelRevisions, listed at most once per reconcile (and only when needed).
struct History<'a> {
    api: Api<ModelRevision>,
    smd: &'a SecureModelDeployment,
    items: Option<Vec<ModelRevision>>,
}

impl<'a> History<'a> {
    fn new(ctx: &Context, smd: &'a SecureModelDeployment) -> Self {
        Self {
            api: Api::namespaced(ctx.client.clone(), &smd.namespace().unwrap_or_default()),
            smd,
            items: None,
        }
    }

    /// The revisions, listed on first use.
    async fn items(&mut self) -> Result<&mut Vec<ModelRevision>, Error> {
        if self.items.is_none() {
            self.items = Some(list_revisions(&self.api, self.smd).await?);
        }
        Ok(self.items.get_or_insert_with(Vec::new))
    }

    /// The revision `name`.
    async fn find(&mut self, name: &str) -> Result<Option<&ModelRevision>, Error> {
        Ok(self.items().await?.iter().find(|r| r.name_any() == name))
    }
}

/// Puts `template` into the Deployment `built` will apply.
fn put_template(built: &mut Built, template: PodTemplateSpec) {
    if let Some(spec) = built.children.deployment.spec.as_mut() {
        spec.template = template;
    }
}

/// Records the revision `built` renders to, and serves the last known-good one instead while
/// the spec asks for a failed one, or the revision the pods run while the current one awaits
/// approval.
pub(super) async fn prepare(
    ctx: &Context,
    smd: &SecureModelDeployment,
    built: &mut Built,
    live: Option<&k8s_openapi::api::apps::v1::Deployment>,
    now: &Time,
) -> Result<Revisions, Error> {
    let deployment = &built.children.deployment;
    let template = deployment
        .spec
        .as_ref()
        .map(|s| serde_json::to_value(&s.template))
        .transpose()
        .map_err(|source| Error::Serialize { kind: KIND, source })?
        .unwrap_or_default();
    let hash = revision::template_hash(&template);
    let previous = smd.status.as_ref().and_then(|s| s.revisions.as_ref());
    let known = previous
        .and_then(|p| p.current.clone().map(|c| (c, p.history)))
        .filter(|(c, _)| c.template_hash == hash);
    let mut kept = History::new(ctx, smd);
    let (current, history) = match known {
        Some(found) => found,
        None => record(ctx, &mut kept, template, &hash, now).await?,
    };
    let generation = smd.metadata.generation.unwrap_or(0);
    let mut lost_known_good = false;
    let mut serving = match revision::serve(previous, &current, generation) {
        Serve::Current => Some(current.clone()),
        Serve::KnownGood(good) => match read_template(&mut kept, &good).await? {
            Some(template) => {
                put_template(built, template);
                Some(good)
            }
            // Gone (only the garbage collector may delete it): nothing to go back to. The
            // status forgets it, so the failure is reported instead of retried.
            None => {
                lost_known_good = true;
                Some(current.clone())
            }
        },
    };
    // Two-person approval: a revision that may not go live yet leaves the pods on the revision
    // they run (or, for a first revision, none).
    let mut approved = previous.and_then(|p| p.approved.clone());
    let mut awaiting = None;
    let required = smd.spec.approval.as_ref().map_or(0, |a| a.required);
    let last_known_good = previous.and_then(|p| p.last_known_good.as_ref());
    if serving.as_ref() == Some(&current)
        && !approval::may_go_live(required, &current, last_known_good, approved.as_ref(), 0)
    {
        let reference = approved.as_ref().or(last_known_good);
        let approvers = approvals(ctx, &mut kept, &current, reference, now).await?;
        let own_change = approvers.is_none();
        let approvers = approvers.unwrap_or_default();
        if own_change
            || approval::may_go_live(
                required,
                &current,
                last_known_good,
                approved.as_ref(),
                approvers.len(),
            )
        {
            approved = Some(current.clone());
        } else {
            let was = previous
                .and_then(|p| p.serving.clone())
                .filter(|s| s.template_hash != current.template_hash)
                .or_else(|| last_known_good.cloned())
                .filter(|s| s.template_hash != current.template_hash);
            serving = match was {
                Some(was) => match read_template(&mut kept, &was).await? {
                    Some(template) => {
                        put_template(built, template);
                        Some(was)
                    }
                    // Its ModelRevision is gone: the pods keep the template they run now.
                    None => match live.and_then(|d| d.spec.as_ref()) {
                        Some(running) => {
                            put_template(built, running.template.clone());
                            Some(was)
                        }
                        None => None,
                    },
                },
                None => None,
            };
            if serving.is_none()
                && let Some(spec) = built.children.deployment.spec.as_mut()
            {
                // Nothing approved to run: the Deployment exists, with no pods.
                spec.replicas = Some(0);
            }
            awaiting = Some(AwaitingApproval {
                revision: current.clone(),
                required,
                approvers,
            });
        }
    }
    let was_serving = previous.and_then(|p| p.serving.as_ref());
    if was_serving.map(|w| &w.template_hash) != serving.as_ref().map(|s| &s.template_hash) {
        // Moat's own change of the pod template (a rollback, a held or approved revision, the
        // way back): not drift.
        built
            .own
            .entry(("Deployment", smd.name_any()))
            .or_default()
            .extend(["spec.template".to_string(), "spec.replicas".to_string()]);
    }
    Ok(Revisions {
        current,
        serving,
        history,
        approved,
        awaiting,
        lost_known_good,
    })
}

/// The users whose approvals of `current` count, after recording every approval's verdict in
/// the ModelRevision's status (with an Event for each new one). `None` when `current` comes from
/// the same spec (generation) as `reference`, the last approved or known-good revision: only
/// Moat's own inputs changed (a renewed certificate, a new helper image), which needs no
/// approval.
async fn approvals(
    ctx: &Context,
    history: &mut History<'_>,
    current: &RevisionRef,
    reference: Option<&RevisionRef>,
    now: &Time,
) -> Result<Option<Vec<String>>, Error> {
    let smd = history.smd;
    let namespace = smd.namespace().unwrap_or_default();
    let revisions = history.api.clone();
    let kept = history.items().await?;
    let Some(revision) = kept.iter().find(|r| r.name_any() == current.name) else {
        return Ok(Some(Vec::new()));
    };
    // Only Moat's own inputs changed: the same spec generation and the same digests (a tag
    // resolved again to a new digest, without a spec change, is a change to approve).
    let own_change = reference
        .and_then(|r| kept.iter().find(|k| k.name_any() == r.name))
        .is_some_and(|r| {
            r.spec.generation == revision.spec.generation
                && r.spec.image == revision.spec.image
                && r.spec.model_sha256 == revision.spec.model_sha256
        });
    if own_change {
        return Ok(None);
    }
    let api: Api<ModelApproval> = Api::namespaced(ctx.client.clone(), &namespace);
    let listed = api
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            kind: "ModelApproval",
            source,
        })?;
    let candidates: Vec<Candidate> = listed
        .items
        .iter()
        .filter(|a| a.spec.model == smd.name_any())
        .map(|a| Candidate {
            name: a.name_any(),
            revision: a.spec.revision.clone(),
            image: a.spec.image.clone(),
            model_sha256: a.spec.model_sha256.clone(),
            approver: a.spec.approver.clone(),
            created: a
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(now.0.as_second(), |t| t.0.as_second()),
        })
        .collect();
    let valid_for = crate::render::approval_validity(
        smd.spec
            .approval
            .as_ref()
            .and_then(|a| a.valid_for.as_deref()),
    )
    .map_err(|message| {
        Error::Invalid(crate::render::RenderError::Invalid(vec![
            crate::render::ValidationError {
                field: "spec.approval.validFor".into(),
                message,
            },
        ]))
    })?;
    // The revision's author, and whoever changed the spec last (a revision found again by its
    // template keeps its first author).
    let mut authors = vec![revision.spec.author.as_str()];
    if let Some(last) = trusted_author(ctx, smd) {
        authors.push(last);
    }
    let subject = Subject {
        name: &current.name,
        authors,
        image: &revision.spec.image,
        model_sha256: revision.spec.model_sha256.as_deref(),
    };
    let judged = approval::judge(
        &candidates,
        &subject,
        now.0.as_second(),
        i64::try_from(valid_for.as_secs()).unwrap_or(i64::MAX),
    );
    let at = |secs: i64| {
        k8s_openapi::jiff::Timestamp::from_second(secs)
            .map(Time)
            .unwrap_or_else(|_| now.clone())
    };
    let recorded = ModelRevisionStatus {
        approvals: judged
            .counted
            .iter()
            .map(|(name, who, created)| RecordedApproval {
                approver: who.clone(),
                approval: name.clone(),
                at: at(*created),
            })
            .collect(),
        refused: judged
            .refused
            .iter()
            .map(|(name, why)| RefusedApproval {
                approval: name.clone(),
                reason: why.clone(),
            })
            .collect(),
    };
    let before = revision.status.clone().unwrap_or_default();
    if before != recorded {
        // A merge patch that names the lists that emptied (an approval deleted or expired).
        let to_json = |v: &ModelRevisionStatus| {
            serde_json::to_value(v).map_err(|source| Error::Serialize { kind: KIND, source })
        };
        let patch = serde_json::json!({
            "status": crate::core::status::merge_patch(&to_json(&before)?, &to_json(&recorded)?)
        });
        crate::controller::apply::patch_status(ctx, &revisions, KIND, &current.name, &patch)
            .await?;
        // Each Event names its ModelApproval as the related object, so that the Events of two
        // approvals are two, not one series.
        let related = |name: &str| {
            listed
                .items
                .iter()
                .find(|a| a.name_any() == name)
                .map(|a| a.object_ref(&()))
        };
        for counted in &recorded.approvals {
            if !before
                .approvals
                .iter()
                .any(|b| b.approval == counted.approval)
            {
                note(
                    ctx,
                    smd,
                    reason::APPROVAL_ACCEPTED,
                    related(&counted.approval),
                    format!(
                        "{} approved revision {} ({}) with ModelApproval {}",
                        counted.approver, current.revision, current.name, counted.approval
                    ),
                )
                .await;
            }
        }
        for refused in &recorded.refused {
            if !before.refused.contains(refused) {
                note(
                    ctx,
                    smd,
                    reason::APPROVAL_REFUSED,
                    related(&refused.approval),
                    format!(
                        "ModelApproval {} does not count for revision {} ({}): {}",
                        refused.approval, current.revision, current.name, refused.reason
                    ),
                )
                .await;
            }
        }
    }
    Ok(Some(
        judged.counted.into_iter().map(|(_, who, _)| who).collect(),
    ))
}

async fn note(
    ctx: &Context,
    smd: &SecureModelDeployment,
    why: &str,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
    message: String,
) {
    let type_ = if why == reason::APPROVAL_REFUSED {
        EventType::Warning
    } else {
        EventType::Normal
    };
    publish(
        &ctx.recorder,
        &ctx.metrics,
        &smd.object_ref(&()),
        type_,
        why,
        message,
        related,
    )
    .await;
}

/// Finds or creates the ModelRevision of `hash`, and prunes the history to its limit. Returns
/// the revision and how many are kept.
async fn record(
    ctx: &Context,
    history: &mut History<'_>,
    mut template: serde_json::Value,
    hash: &str,
    now: &Time,
) -> Result<(RevisionRef, i32), Error> {
    let smd = history.smd;
    let api = history.api.clone();
    let ours = history.items().await?;
    let mut kept: Vec<Kept> = ours
        .iter()
        .map(|r| Kept {
            name: r.name_any(),
            revision: r.spec.revision,
        })
        .collect();
    let current = match ours.iter().find(|r| r.spec.template_hash == hash) {
        Some(r) => reference(r),
        None => {
            revision::strip_label(&mut template);
            let number = revision::next_number(&kept);
            let author = author(ctx, smd, ours);
            let created = create(ctx, smd, &api, template, hash, number, author, now).await?;
            kept.push(Kept {
                name: created.name_any(),
                revision: created.spec.revision,
            });
            let r = reference(&created);
            ours.push(created);
            r
        }
    };
    let limit = smd
        .spec
        .rollout
        .as_ref()
        .and_then(|r| r.revision_history_limit)
        .and_then(|l| usize::try_from(l).ok())
        .unwrap_or(revision::DEFAULT_HISTORY_LIMIT);
    let revisions = smd.status.as_ref().and_then(|s| s.revisions.as_ref());
    let mut protect = vec![current.name.as_str()];
    protect.extend(
        revisions
            .into_iter()
            .flat_map(|r| [r.serving.as_ref(), r.last_known_good.as_ref()])
            .flatten()
            .map(|r| r.name.as_str()),
    );
    let pruned = revision::prune(&kept, limit, &protect);
    for name in &pruned {
        ctx.metrics.api_write(KIND, "delete");
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Prune {
                    kind: KIND,
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    ours.retain(|r| !pruned.contains(&r.name_any()));
    let history = i32::try_from(kept.len() - pruned.len()).unwrap_or(i32::MAX);
    Ok((current, history))
}

/// Creates the ModelRevision of `hash` (numbered `number`), or takes the one a concurrent
/// reconcile created.
#[allow(clippy::too_many_arguments)] // each is one field of the new ModelRevision
async fn create(
    ctx: &Context,
    smd: &SecureModelDeployment,
    api: &Api<ModelRevision>,
    template: serde_json::Value,
    hash: &str,
    number: i64,
    author: String,
    now: &Time,
) -> Result<ModelRevision, Error> {
    let model = smd.name_any();
    let name = revision::name(&model, hash);
    let labels = [
        ("app.kubernetes.io/name", "moat-model"),
        ("app.kubernetes.io/instance", model.as_str()),
        ("app.kubernetes.io/managed-by", crate::render::MANAGED_BY),
        (REVISION_MODEL_LABEL, model.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let object = ModelRevision {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: smd.namespace(),
            labels: Some(labels),
            owner_references: smd.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: ModelRevisionSpec {
            model: model.clone(),
            revision: number,
            template_hash: hash.to_string(),
            image: image_of(&template),
            model_sha256: smd.spec.model.as_ref().map(|m| m.sha256.clone()),
            generation: smd.metadata.generation.unwrap_or(0),
            author,
            first_seen: now.clone(),
            template,
        },
        status: None,
    };
    ctx.metrics.api_write(KIND, "create");
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => {
            let r = reference(&created);
            publish(
                &ctx.recorder,
                &ctx.metrics,
                &smd.object_ref(&()),
                EventType::Normal,
                reason::REVISION_CREATED,
                format!(
                    "Revision {} ({name}): image {}, weights {}, changed by {}",
                    r.revision,
                    created.spec.image,
                    created.spec.model_sha256.as_deref().unwrap_or("none"),
                    created.spec.author
                ),
                None,
            )
            .await;
            Ok(created)
        }
        // A concurrent reconcile created it; one left by a deleted model of the same name (owned
        // by another uid, and soon collected) is not taken over.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            match list_revisions(api, smd)
                .await?
                .into_iter()
                .find(|r| r.name_any() == name)
            {
                Some(existing) if existing.spec.template_hash == hash => Ok(existing),
                _ => Err(Error::Conflict { kind: KIND, name }),
            }
        }
        Err(source) => Err(Error::Apply {
            kind: KIND,
            name,
            source,
        }),
    }
}

/// The template of the revision `good`, labelled, to put into the Deployment; `None` when the
/// ModelRevision is gone.
async fn read_template(
    history: &mut History<'_>,
    good: &RevisionRef,
) -> Result<Option<PodTemplateSpec>, Error> {
    let Some(found) = history.find(&good.name).await? else {
        return Ok(None);
    };
    let template = revision::with_label(found.spec.template.clone(), &found.spec.template_hash);
    serde_json::from_value(template)
        .map(Some)
        .map_err(|source| Error::Serialize { kind: KIND, source })
}

/// The ModelRevisions of `smd`, and only its own: one left by a deleted model of the same name
/// (owned by another uid, soon collected) is not. Read by listing (no other permission needed).
async fn list_revisions(
    api: &Api<ModelRevision>,
    smd: &SecureModelDeployment,
) -> Result<Vec<ModelRevision>, Error> {
    let listed = api
        .list(&ListParams::default().labels(&format!("{REVISION_MODEL_LABEL}={}", smd.name_any())))
        .await
        .map_err(|source| Error::Read { kind: KIND, source })?;
    let uid = smd.uid();
    Ok(listed
        .items
        .into_iter()
        .filter(|r| {
            r.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect())
}

fn reference(r: &ModelRevision) -> RevisionRef {
    RevisionRef {
        name: r.name_any(),
        revision: r.spec.revision,
        template_hash: r.spec.template_hash.clone(),
    }
}

/// The server container's image in a pod template.
fn image_of(template: &serde_json::Value) -> String {
    template
        .pointer("/spec/containers/0/image")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Who changed what led to a new revision: `moat` when the spec is at the generation of the
/// revision the status names as current (only Moat's own inputs changed), otherwise the author
/// the chart's admission policy recorded, or `unknown` when Moat is not told that the policy is
/// installed (then anyone could write the annotation).
fn author(ctx: &Context, smd: &SecureModelDeployment, ours: &[ModelRevision]) -> String {
    let current = smd
        .status
        .as_ref()
        .and_then(|s| s.revisions.as_ref())
        .and_then(|r| r.current.as_ref());
    let same_spec = current
        .and_then(|c| ours.iter().find(|r| r.name_any() == c.name))
        .is_some_and(|r| Some(r.spec.generation) == smd.metadata.generation);
    if same_spec {
        return "moat".into();
    }
    trusted_author(ctx, smd)
        .map(str::to_string)
        .unwrap_or_else(|| "unknown".into())
}

/// The annotation `moat.dev/spec-author`, when the operator is told that the chart's
/// MutatingAdmissionPolicy sets it (`--spec-author-policy`).
fn trusted_author<'a>(ctx: &Context, smd: &'a SecureModelDeployment) -> Option<&'a str> {
    if !ctx.settings.spec_author_policy {
        return None;
    }
    smd.annotations()
        .get(AUTHOR_ANNOTATION)
        .map(String::as_str)
        .filter(|a| !a.trim().is_empty())
}
