//! Pure drift detection: does a live object carry what Moat wants, and did anyone else add
//! fields to it? Server-side apply with `force` restores the fields Moat owns but leaves fields
//! added by another field manager in place, so both questions are needed.

use serde_json::{Map, Value};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};

/// A change by someone else that Moat reverted.
#[derive(Clone, Debug, PartialEq)]
pub struct Repair {
    /// Kind of the object.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What had changed.
    pub change: String,
    /// When it was repaired.
    pub at: Time,
}

/// The longest break-glass reason quoted in an Event; a longer one is cut (the object's
/// annotation, in the API server's audit log, keeps it whole).
pub const MAX_BREAK_GLASS_REASON: usize = 256;

/// The break-glass reason an object's `annotations` give under `key` (the annotation
/// `moat.dev/break-glass-reason`): trimmed, on one line, at most [`MAX_BREAK_GLASS_REASON`]
/// bytes; `None` when absent or blank (the admission policy refuses a blank reason too).
pub fn break_glass_reason(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    key: &str,
) -> Option<String> {
    let reason = annotations?.get(key)?.trim();
    if reason.is_empty() {
        return None;
    }
    let mut one_line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.len() > MAX_BREAK_GLASS_REASON {
        let mut cut = MAX_BREAK_GLASS_REASON - 3;
        while !one_line.is_char_boundary(cut) {
            cut -= 1;
        }
        one_line.truncate(cut);
        one_line.push_str("...");
    }
    Some(one_line)
}

/// Whether an object with `owners` is controlled by the object whose uid is `uid`: Moat writes
/// and deletes only what it controls, never a same-named object someone else made.
pub fn controlled_by(
    owners: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
    uid: Option<&str>,
) -> bool {
    uid.is_some_and(|uid| {
        owners
            .iter()
            .any(|r| r.controller == Some(true) && r.uid == uid)
    })
}

/// Paths at which `live` does not carry what `desired` says. Extra fields in `live` (server
/// defaults) are ignored here; a desired empty map or list matches an absent field because the
/// API server omits those. `false`, `0` and `""` must be present: Moat renders them only where
/// Kubernetes keeps them (pointer fields such as `automountServiceAccountToken: false`), so their
/// removal is drift. Lists must have the same length.
pub fn differences(desired: &Value, live: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(desired, live, "", &mut out);
    out
}

fn diff_into(desired: &Value, live: &Value, path: &str, out: &mut Vec<String>) {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => {
            for (key, dv) in d {
                let child = join(path, key);
                match l.get(key) {
                    Some(lv) => diff_into(dv, lv, &child, out),
                    None if is_zero(dv) => {}
                    None => out.push(child),
                }
            }
        }
        (Value::Array(d), Value::Array(l)) => {
            if d.len() != l.len() {
                out.push(path.to_string());
                return;
            }
            for (i, (dv, lv)) in d.iter().zip(l).enumerate() {
                diff_into(dv, lv, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(d), Value::Number(l)) => {
            if d.as_f64() != l.as_f64() {
                out.push(path.to_string());
            }
        }
        (Value::String(d), Value::String(l)) => {
            if d != l && !(is_quantity_path(path) && crate::quantity::same(d, l)) {
                out.push(path.to_string());
            }
        }
        (d, Value::Null) if is_zero(d) => {}
        (d, l) => {
            if d != l {
                out.push(path.to_string());
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => false,
    }
}

/// Quantities are canonicalised by the API server (`1000m` is stored as `1`).
fn is_quantity_path(path: &str) -> bool {
    path.contains(".resources.") || path.ends_with("sizeLimit")
}

/// Fields owned by a field manager other than Moat's apply, that Moat does not own too.
/// Annotations, finalizers and status belong to others by design (controllers record revisions
/// there) and are not drift.
#[derive(Clone, Debug, PartialEq)]
pub struct ForeignFields {
    /// Index of the managedFields entry.
    pub index: usize,
    /// Its manager, for the Event.
    pub manager: String,
    /// The foreign-only part of its field set, in managedFields (FieldsV1) notation.
    pub fields: Value,
}

/// Managed-fields entries that own fields Moat must take back.
pub fn foreign_fields(entries: &[ManagedFieldsEntry], field_manager: &str) -> Vec<ForeignFields> {
    let ours = entries
        .iter()
        .filter(|e| is_ours(e, field_manager))
        .filter_map(|e| e.fields_v1.as_ref().map(|f| f.0.clone()))
        .fold(Value::Object(Map::new()), |acc, f| union(&acc, &f));
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            !is_ours(e, field_manager) && e.subresource.as_deref().unwrap_or("").is_empty()
        })
        .filter_map(|(index, e)| {
            let fields = scope(&e.fields_v1.as_ref()?.0);
            let only = subtract(&fields, &ours);
            (!is_empty_set(&only)).then(|| ForeignFields {
                index,
                manager: e.manager.clone().unwrap_or_else(|| "unknown".into()),
                fields: only,
            })
        })
        .collect()
}

fn is_ours(e: &ManagedFieldsEntry, field_manager: &str) -> bool {
    e.manager.as_deref() == Some(field_manager) && e.operation.as_deref() == Some("Apply")
}

/// The part of a field set that drift detection looks at: everything but status, annotations,
/// finalizers and the bookkeeping fields of metadata.
fn scope(fields: &Value) -> Value {
    let mut out = fields.clone();
    if let Value::Object(map) = &mut out {
        map.remove("f:status");
        if let Some(Value::Object(meta)) = map.get_mut("f:metadata") {
            meta.remove("f:annotations");
            meta.remove("f:finalizers");
            if meta.is_empty() {
                map.remove("f:metadata");
            }
        }
    }
    out
}

fn is_empty_set(v: &Value) -> bool {
    matches!(v, Value::Object(m) if m.is_empty())
}

/// `a` without what `b` also owns. A field set is a trie: `{}` under a key owns that key; the
/// `"."` key owns a list element itself.
pub fn subtract(a: &Value, b: &Value) -> Value {
    let (Value::Object(am), Value::Object(bm)) = (a, b) else {
        return a.clone();
    };
    let mut out = Map::new();
    for (k, av) in am {
        match bm.get(k) {
            None => {
                out.insert(k.clone(), av.clone());
            }
            Some(bv) => {
                let rest = subtract(av, bv);
                if !is_empty_set(&rest) {
                    out.insert(k.clone(), rest);
                }
            }
        }
    }
    Value::Object(out)
}

/// Every field owned in `a` or `b`.
pub fn union(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Object(am), Value::Object(bm)) => {
            let mut out = am.clone();
            for (k, bv) in bm {
                let merged = match out.get(k) {
                    Some(av) => union(av, bv),
                    None => bv.clone(),
                };
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (_, b) => b.clone(),
    }
}

/// Fields Moat's apply entry owns that `desired` no longer contains: left behind when a take-over
/// (managed-fields patch) succeeded but the apply after it did not. The next apply removes them.
pub fn owned_but_not_desired(
    entries: &[ManagedFieldsEntry],
    field_manager: &str,
    desired: &Value,
) -> Vec<String> {
    let mut out = Vec::new();
    for e in entries.iter().filter(|e| is_ours(e, field_manager)) {
        if let Some(f) = &e.fields_v1 {
            stale_into(&scope(&f.0), desired, "", &mut out);
        }
    }
    out
}

fn stale_into(fields: &Value, desired: &Value, path: &str, out: &mut Vec<String>) {
    let Value::Object(map) = fields else { return };
    for (k, sub) in map {
        if k == "." {
            continue;
        }
        let (child, name) = match k.split_once(':') {
            Some(("f", field)) => (desired.get(field), join(path, field)),
            Some(("k", key)) => {
                let key: Value = serde_json::from_str(key).unwrap_or(Value::Null);
                let found = desired.as_array().and_then(|items| {
                    items.iter().find(|item| {
                        // Lenient: a key field Moat leaves to the server's default matches.
                        key.as_object().is_some_and(|kv| {
                            kv.iter()
                                .all(|(kk, kv)| item.get(kk).is_none_or(|iv| iv == kv))
                        })
                    })
                });
                (found, format!("{path}[{key}]"))
            }
            Some(("v", value)) => {
                let value: Value = serde_json::from_str(value).unwrap_or(Value::Null);
                let found = desired
                    .as_array()
                    .and_then(|items| items.iter().find(|i| **i == value));
                (found, format!("{path}[{value}]"))
            }
            // Index keys and anything unknown: not judged.
            _ => continue,
        };
        match child {
            None => out.push(name),
            Some(c) => stale_into(sub, c, &name, out),
        }
    }
}

/// Readable paths of a field set, for Events and status (`spec.template.spec.hostNetwork`).
pub fn paths(fields: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_paths(fields, "", &mut out);
    out
}

fn collect_paths(fields: &Value, prefix: &str, out: &mut Vec<String>) {
    let Value::Object(map) = fields else { return };
    let leaves_here = map.is_empty() || map.contains_key(".");
    if leaves_here && !prefix.is_empty() {
        out.push(prefix.to_string());
    }
    for (k, v) in map {
        if k == "." {
            continue;
        }
        let name = match k.split_once(':') {
            Some(("f", field)) => join(prefix, field),
            Some(("k", key)) => format!("{prefix}[{key}]"),
            Some(("v", value)) => format!("{prefix}[{value}]"),
            Some(("i", index)) => format!("{prefix}[{index}]"),
            _ => join(prefix, k),
        };
        collect_paths(v, &name, out);
    }
}

/// The managedFields list after Moat takes over the foreign-only fields: they move into Moat's
/// apply entry (so the next apply, which omits them, removes them) and out of the foreign entries.
pub fn transfer(
    entries: &[ManagedFieldsEntry],
    foreign: &[ForeignFields],
    field_manager: &str,
) -> Vec<ManagedFieldsEntry> {
    let taken = foreign
        .iter()
        .fold(Value::Object(Map::new()), |acc, f| union(&acc, &f.fields));
    let mut out: Vec<ManagedFieldsEntry> = Vec::with_capacity(entries.len());
    let mut ours_seen = false;
    for (i, e) in entries.iter().enumerate() {
        let mut e = e.clone();
        if is_ours(&e, field_manager) && !ours_seen {
            ours_seen = true;
            let current = e
                .fields_v1
                .as_ref()
                .map(|f| f.0.clone())
                .unwrap_or(Value::Object(Map::new()));
            e.fields_v1 = Some(FieldsV1(union(&current, &taken)));
        } else if let Some(f) = foreign.iter().find(|f| f.index == i) {
            let current = e
                .fields_v1
                .as_ref()
                .map(|f| f.0.clone())
                .unwrap_or(Value::Object(Map::new()));
            let rest = subtract(&current, &f.fields);
            if is_empty_set(&rest) {
                continue;
            }
            e.fields_v1 = Some(FieldsV1(rest));
        }
        out.push(e);
    }
    out
}

/// How a live child differs from the desired one.
#[derive(Clone, Debug, PartialEq)]
pub struct Assessment {
    /// Desired values the live object lacks.
    pub differences: Vec<String>,
    /// Fields other managers own that Moat does not.
    pub foreign: Vec<ForeignFields>,
    /// Fields Moat owns that it no longer wants (an interrupted take-over).
    pub stale: Vec<String>,
}

impl Assessment {
    /// Compares `desired` (the body Moat applies) with `live` and its managedFields.
    pub fn of(
        desired: &Value,
        live: &Value,
        managed: &[ManagedFieldsEntry],
        field_manager: &str,
    ) -> Self {
        let mut differences = differences(desired, live);
        differences.retain(|p| p != "apiVersion" && p != "kind");
        Self {
            differences,
            foreign: foreign_fields(managed, field_manager),
            stale: owned_but_not_desired(managed, field_manager, desired),
        }
    }

    /// Whether the live object is exactly as desired.
    pub fn in_sync(&self) -> bool {
        self.differences.is_empty() && self.foreign.is_empty() && self.stale.is_empty()
    }

    /// What differs, one item per change, for Events and status.
    pub fn describe(&self) -> Vec<String> {
        let mut what: Vec<String> = self
            .differences
            .iter()
            .map(|p| format!("{p} changed"))
            .collect();
        for f in &self.foreign {
            what.push(format!(
                "fields set by {}: {}",
                f.manager,
                paths(&f.fields).join(", ")
            ));
        }
        if !self.stale.is_empty() {
            what.push(format!("fields left over: {}", self.stale.join(", ")));
        }
        what
    }

    /// Whether every difference follows from a change Moat made to its own desired state in
    /// this reconcile (`own`: paths of the desired body that changed because a certificate was
    /// issued or an image pinned), and nobody else added or removed anything.
    pub fn explained_by(&self, own: &[String]) -> bool {
        self.foreign.is_empty()
            && self.stale.is_empty()
            && self
                .differences
                .iter()
                .all(|d| own.iter().any(|o| is_within(d, o)))
    }
}

/// Whether `path` is `prefix` or lies below it.
fn is_within(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// What the apply step does with one child.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// The live object is as desired: no write.
    Leave,
    /// The object is absent: create it. `drift` when it existed at a generation Moat had
    /// converged (someone deleted it).
    Create {
        /// Whether this is a drift repair.
        drift: bool,
    },
    /// Apply the desired body, after moving `foreign` fields into Moat's managed-fields entry
    /// when there are any (so the forced apply removes them).
    Apply {
        /// Fields another manager added, to take over first.
        foreign: Vec<ForeignFields>,
        /// What differs, for the Event.
        what: Vec<String>,
        /// Whether someone else changed the object (a drift repair) rather than Moat's own
        /// desired state changing.
        drift: bool,
    },
}

/// Decides the write for one child. `live` is `None` when the object does not exist;
/// `converged_before` says whether Moat had converged the current generation before (only then
/// can a difference be someone else's change); `own` lists the paths of `desired` that Moat's
/// own new facts changed in this reconcile ([`own_changes`]), which are never counted as drift.
pub fn plan(
    desired: &Value,
    live: Option<(&Value, &[ManagedFieldsEntry])>,
    field_manager: &str,
    converged_before: bool,
    own: &[String],
) -> Plan {
    let Some((live, managed)) = live else {
        return Plan::Create {
            drift: converged_before,
        };
    };
    let found = Assessment::of(desired, live, managed, field_manager);
    if found.in_sync() {
        return Plan::Leave;
    }
    let drift = converged_before && !found.explained_by(own);
    Plan::Apply {
        what: found.describe(),
        drift,
        foreign: found.foreign,
    }
}

/// Paths at which the desired body `now` differs from `before`, the same child rendered with the
/// facts of the last converged status (the earlier certificate or image pin). These changes are
/// Moat's own, not drift.
pub fn own_changes(now: &Value, before: &Value) -> Vec<String> {
    differences(now, before)
}

/// Paths of each child (by kind and name) that changed because Moat's own facts changed in a
/// reconcile (a new certificate, a new pin): [`own_changes_of`].
pub type OwnChanges = std::collections::HashMap<(&'static str, String), Vec<String>>;

/// [`own_changes`] of every child, by kind and name: the children rendered now against the same
/// children rendered with the facts of the last converged status. Children whose bodies agree
/// are left out.
pub fn own_changes_of(
    now: &[crate::render::Object],
    before: &[crate::render::Object],
) -> OwnChanges {
    now.iter()
        .filter_map(|n| {
            let b = before
                .iter()
                .find(|b| b.kind == n.kind && b.name == n.name)?;
            let paths = own_changes(&n.body, &b.body);
            (!paths.is_empty()).then(|| ((n.kind, n.name.clone()), paths))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason is what the break-glass user wrote, trimmed and on one line; a blank or absent
    /// annotation gives none (such a change is plain drift), and a long one is cut for the Event.
    #[test]
    fn a_break_glass_reason_is_the_trimmed_annotation_or_none() {
        let key = "moat.dev/break-glass-reason";
        let with = |v: &str| std::collections::BTreeMap::from([(key.to_string(), v.to_string())]);
        assert_eq!(
            break_glass_reason(Some(&with("  INC-42: rotate the key\n")), key).as_deref(),
            Some("INC-42: rotate the key")
        );
        assert_eq!(
            break_glass_reason(Some(&with("line one\nline two")), key).as_deref(),
            Some("line one line two")
        );
        assert_eq!(break_glass_reason(Some(&with(" \t ")), key), None);
        assert_eq!(break_glass_reason(Some(&with("x")), "other"), None);
        assert_eq!(break_glass_reason(None, key), None);
        let long = break_glass_reason(Some(&with(&"é".repeat(300))), key).unwrap_or_default();
        assert!(
            long.len() <= MAX_BREAK_GLASS_REASON && long.ends_with("..."),
            "{long}"
        );
    }

    #[test]
    fn control_is_a_controller_reference_with_the_uid() {
        let owner = |uid: &str, controller: Option<bool>| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                uid: uid.into(),
                controller,
                ..Default::default()
            }
        };
        assert!(controlled_by(&[owner("a", Some(true))], Some("a")));
        assert!(
            !controlled_by(&[owner("a", Some(false))], Some("a")),
            "plain owner"
        );
        assert!(
            !controlled_by(&[owner("a", None)], Some("a")),
            "plain owner"
        );
        assert!(
            !controlled_by(&[owner("b", Some(true))], Some("a")),
            "other uid"
        );
        assert!(!controlled_by(&[], Some("a")), "no owner");
        assert!(!controlled_by(&[owner("", Some(true))], None), "no uid yet");
    }
    use serde_json::json;

    fn entry(manager: &str, operation: &str, fields: Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            api_version: Some("apps/v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_in_live_are_not_differences() {
        let desired = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}});
        let live = json!({"spec": {"replicas": 2, "progressDeadlineSeconds": 600, "template": {"spec": {"dnsPolicy": "ClusterFirst", "containers": [{"name": "a", "image": "x", "imagePullPolicy": "IfNotPresent"}]}}}});
        assert!(differences(&desired, &live).is_empty());
    }

    #[test]
    fn changed_removed_and_added_list_items_are_differences() {
        let desired = json!({"spec": {"replicas": 2, "containers": [{"name": "a", "image": "x"}]}});
        let changed = json!({"spec": {"replicas": 3, "containers": [{"name": "a", "image": "y"}]}});
        assert_eq!(
            differences(&desired, &changed),
            vec!["spec.containers[0].image", "spec.replicas"]
        );
        let removed = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        assert_eq!(differences(&desired, &removed), vec!["spec.replicas"]);
        let added = json!({"spec": {"replicas": 2, "containers": [{"name": "a", "image": "x"}, {"name": "b"}]}});
        assert_eq!(differences(&desired, &added), vec!["spec.containers"]);
    }

    #[test]
    fn empty_maps_match_absent_fields_and_quantities_match_by_value() {
        let desired = json!({"selector": {}, "automount": false, "spec": {"resources": {"limits": {"cpu": "1000m"}}}});
        let live = json!({"automount": false, "spec": {"resources": {"limits": {"cpu": "1"}}}});
        assert!(differences(&desired, &live).is_empty());
        let live_true = json!({"automount": true, "spec": {"resources": {"limits": {"cpu": "2"}}}});
        assert_eq!(differences(&desired, &live_true).len(), 2);
    }

    #[test]
    fn foreign_additions_are_found_and_shared_fields_are_not() {
        let ours = json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"server\"}": {".": {}, "f:image": {}}}}}}});
        let foreign = json!({
            "f:metadata": {"f:annotations": {"f:note": {}}},
            "f:spec": {"f:template": {"f:spec": {
                "f:hostNetwork": {},
                "f:containers": {"k:{\"name\":\"server\"}": {"f:image": {}}}
            }}}
        });
        let status = json!({"f:status": {"f:replicas": {}}});
        let entries = vec![
            entry("moat", "Apply", ours),
            entry("kubectl-edit", "Update", foreign),
            entry("kube-controller-manager", "Update", status),
        ];
        let found = foreign_fields(&entries, "moat");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].manager, "kubectl-edit");
        assert_eq!(
            paths(&found[0].fields),
            vec!["spec.template.spec.hostNetwork"]
        );

        let moved = transfer(&entries, &found, "moat");
        assert_eq!(moved.len(), 3);
        let ours_after = &moved[0]
            .fields_v1
            .as_ref()
            .map(|f| f.0.clone())
            .unwrap_or_default();
        assert!(
            ours_after
                .pointer("/f:spec/f:template/f:spec/f:hostNetwork")
                .is_some()
        );
        let theirs_after = &moved[1]
            .fields_v1
            .as_ref()
            .map(|f| f.0.clone())
            .unwrap_or_default();
        assert!(
            theirs_after
                .pointer("/f:spec/f:template/f:spec/f:hostNetwork")
                .is_none()
        );
        assert!(
            theirs_after
                .pointer("/f:metadata/f:annotations/f:note")
                .is_some()
        );
        assert!(foreign_fields(&moved, "moat").is_empty());
    }

    #[test]
    fn entries_left_empty_by_a_transfer_are_dropped() {
        let entries = vec![
            entry("moat", "Apply", json!({"f:spec": {"f:a": {}}})),
            entry("other", "Update", json!({"f:spec": {"f:b": {}}})),
        ];
        let found = foreign_fields(&entries, "moat");
        let moved = transfer(&entries, &found, "moat");
        assert_eq!(moved.len(), 1);
    }

    #[test]
    fn a_removed_false_is_drift() {
        let desired = json!({"automountServiceAccountToken": false, "spec": {"maxUnavailable": 0}});
        assert_eq!(
            differences(&desired, &json!({"spec": {}})),
            vec!["automountServiceAccountToken", "spec.maxUnavailable"]
        );
        assert!(
            differences(&json!({"spec": {"matchLabels": {}}}), &json!({"spec": {}})).is_empty()
        );
    }

    #[test]
    fn fields_moat_owns_but_no_longer_wants_are_found() {
        let ours = json!({"f:spec": {"f:template": {"f:spec": {
            "f:hostNetwork": {},
            "f:containers": {
                "k:{\"name\":\"server\"}": {".": {}, "f:image": {}},
                "k:{\"name\":\"sidecar\"}": {".": {}, "f:image": {}}
            }
        }}}});
        let entries = vec![entry("moat", "Apply", ours)];
        let desired = json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "x"}]}}}});
        let mut stale = owned_but_not_desired(&entries, "moat", &desired);
        stale.sort();
        assert_eq!(
            stale,
            vec![
                "spec.template.spec.containers[{\"name\":\"sidecar\"}]",
                "spec.template.spec.hostNetwork"
            ]
        );
        let desired_all = json!({"spec": {"template": {"spec": {"hostNetwork": true, "containers": [{"name": "server", "image": "x"}, {"name": "sidecar", "image": "y"}]}}}});
        assert!(owned_but_not_desired(&entries, "moat", &desired_all).is_empty());
    }

    #[test]
    fn added_labels_and_owner_references_are_foreign() {
        let entries = vec![
            entry(
                "moat",
                "Apply",
                json!({"f:metadata": {"f:labels": {"f:a": {}}}}),
            ),
            entry(
                "intruder",
                "Update",
                json!({"f:metadata": {"f:labels": {"f:b": {}}}}),
            ),
        ];
        let found = foreign_fields(&entries, "moat");
        assert_eq!(paths(&found[0].fields), vec!["metadata.labels.b"]);
    }

    fn deployment(image: &str, tls_hash: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "m"},
            "spec": {"template": {"metadata": {"annotations": {"moat.dev/tls-hash": tls_hash}},
                "spec": {"containers": [{"name": "server", "image": image}]}}}})
    }

    #[test]
    fn plans_for_each_kind_of_difference() {
        let want = deployment("r/m@sha256:1", "h2");
        let ours = entry("moat", "Apply", json!({"f:spec": {"f:template": {}}}));
        let intruder = entry(
            "kubectl-edit",
            "Update",
            json!({"f:spec": {"f:template": {"f:spec": {"f:hostNetwork": {}}}}}),
        );
        let own_cert = vec!["spec.template.metadata.annotations.moat.dev/tls-hash".to_string()];
        struct Case {
            what: &'static str,
            live: Option<Value>,
            managed: Vec<ManagedFieldsEntry>,
            converged_before: bool,
            own: Vec<String>,
            want: Result<bool, Option<bool>>, // Ok(drift) = Apply; Err(Some(drift)) = Create; Err(None) = Leave
        }
        let cases = vec![
            Case {
                what: "in sync",
                live: Some(want.clone()),
                managed: vec![ours.clone()],
                converged_before: true,
                own: vec![],
                want: Err(None),
            },
            Case {
                what: "absent, new generation",
                live: None,
                managed: vec![],
                converged_before: false,
                own: vec![],
                want: Err(Some(false)),
            },
            Case {
                what: "deleted after convergence",
                live: None,
                managed: vec![],
                converged_before: true,
                own: vec![],
                want: Err(Some(true)),
            },
            Case {
                what: "image swapped by someone",
                live: Some(deployment("evil/miner", "h2")),
                managed: vec![ours.clone()],
                converged_before: true,
                own: vec![],
                want: Ok(true),
            },
            Case {
                what: "spec changed (new generation)",
                live: Some(deployment("evil/miner", "h2")),
                managed: vec![ours.clone()],
                converged_before: false,
                own: vec![],
                want: Ok(false),
            },
            Case {
                what: "new certificate changed the annotation",
                live: Some(deployment("r/m@sha256:1", "h1")),
                managed: vec![ours.clone()],
                converged_before: true,
                own: own_cert.clone(),
                want: Ok(false),
            },
            Case {
                what: "new certificate, and the image swapped too",
                live: Some(deployment("evil/miner", "h1")),
                managed: vec![ours.clone()],
                converged_before: true,
                own: own_cert.clone(),
                want: Ok(true),
            },
            Case {
                what: "field added by another manager",
                live: Some(want.clone()),
                managed: vec![ours.clone(), intruder.clone()],
                converged_before: true,
                own: own_cert.clone(),
                want: Ok(true),
            },
        ];
        for c in cases {
            let got = plan(
                &want,
                c.live.as_ref().map(|l| (l, c.managed.as_slice())),
                "moat",
                c.converged_before,
                &c.own,
            );
            let as_case = match &got {
                Plan::Leave => Err(None),
                Plan::Create { drift } => Err(Some(*drift)),
                Plan::Apply { drift, .. } => Ok(*drift),
            };
            assert_eq!(as_case, c.want, "{}: {got:?}", c.what);
        }
    }

    #[test]
    fn own_changes_are_the_paths_new_facts_touch() {
        let before = deployment("r/m@sha256:1", "h1");
        let now = deployment("r/m@sha256:2", "h2");
        assert_eq!(
            own_changes(&now, &before),
            vec![
                "spec.template.metadata.annotations.moat.dev/tls-hash",
                "spec.template.spec.containers[0].image"
            ]
        );
        assert!(is_within("spec.a.b", "spec.a") && is_within("spec.a[0]", "spec.a"));
        assert!(!is_within("spec.ab", "spec.a") && !is_within("spec", "spec.a"));
    }
}
