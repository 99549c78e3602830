//! Property tests of the pure core: every valid spec renders pods that satisfy every rule of the
//! Pod Security "restricted" profile (and Moat's stricter ones), rendering is deterministic, and
//! validation never panics on arbitrary input.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use moat::{
    api::*,
    fixture,
    render::{Facts, render, validate},
};
use proptest::prelude::*;

fn image() -> impl Strategy<Value = String> {
    (
        prop::option::of("[a-z][a-z0-9]{0,8}(\\.[a-z]{2,5})?(:[1-9][0-9]{2,4})?"),
        prop::collection::vec("[a-z0-9]{1,8}([._-][a-z0-9]{1,5})?", 1..3),
        prop_oneof![
            "[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,20}".prop_map(|t| format!(":{t}")),
            "[a-f0-9]{64}".prop_map(|d| format!("@sha256:{d}")),
        ],
    )
        .prop_map(|(registry, path, tail)| {
            let registry = registry.map(|r| format!("{r}/")).unwrap_or_default();
            format!("{registry}{}{tail}", path.join("/"))
        })
}

fn quantity(units: &'static [&'static str]) -> impl Strategy<Value = (u32, &'static str)> {
    (1u32..4096, prop::sample::select(units))
}

fn labels() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    prop::option::of(prop::collection::btree_map(
        "[a-z]{1,8}",
        "[a-z0-9]{1,8}",
        0..3,
    ))
}

fn model() -> impl Strategy<Value = Option<ModelSpec>> {
    let source = prop_oneof![
        (
            "[a-z]{1,10}\\.example\\.com/[a-z0-9/]{1,20}\\.age",
            any::<bool>()
        )
            .prop_map(|(u, ca)| {
                ModelSource {
                    url: Some(format!("https://{u}")),
                    ca_config_map_ref: ca.then(|| KeyRef {
                        name: "ca".into(),
                        key: "ca.crt".into(),
                    }),
                    pvc: None,
                }
            }),
        (
            "[a-z][a-z0-9-]{0,10}[a-z0-9]",
            // Every component starts with a letter or digit, so none is `..` (which validation
            // refuses): this generator emits valid specs only.
            "[a-z0-9][a-z0-9._-]{0,7}(/[a-z0-9][a-z0-9._-]{0,7}){0,3}"
        )
            .prop_map(|(claim_name, path)| ModelSource {
                url: None,
                ca_config_map_ref: None,
                pvc: Some(PvcSource { claim_name, path }),
            }),
    ];
    prop::option::of(
        (
            source,
            "[a-f0-9]{64}",
            "/(models|weights|srv)(/[a-z0-9]{1,8}){0,2}",
            quantity(&["Mi", "Gi"]),
            any::<bool>(),
        )
            .prop_map(
                |(source, sha256, mount_path, (size, unit), shred)| ModelSpec {
                    source,
                    sha256,
                    decryption_key_secret_ref: KeyRef {
                        name: "model-key".into(),
                        key: "identity".into(),
                    },
                    mount_path,
                    size_limit: format!("{size}{unit}"),
                    delete_key_with_deployment: shred,
                },
            ),
    )
}

fn spec() -> impl Strategy<Value = SecureModelDeploymentSpec> {
    let env = prop::collection::btree_map("[A-LN-Z_][A-Z0-9_]{0,12}", "[ -~]{0,20}", 0..6)
        .prop_map(|m| {
            m.into_iter()
                .map(|(name, value)| EnvVar {
                    name,
                    value: Some(value),
                    value_from: None,
                })
                .collect::<Vec<_>>()
        });
    let clients =
        prop::collection::vec(("[a-z][a-z0-9-]{0,10}[a-z0-9]", labels()), 0..4).prop_map(|v| {
            v.into_iter()
                .map(|(namespace, pod_selector)| ClientRule {
                    namespace,
                    pod_selector,
                    service_accounts: Vec::new(),
                })
                .collect()
        });
    let egress = prop::collection::vec(
        (
            prop_oneof![
                (0u8..=255, 0u8..=255, 8u8..=32).prop_map(|(a, b, p)| (
                    Some(format!("10.{a}.{b}.0/{p}")),
                    None,
                    None
                )),
                ("[a-z][a-z0-9]{0,10}", labels()).prop_map(|(ns, sel)| (None, Some(ns), sel)),
            ],
            prop::collection::vec(1i32..=65535, 1..4),
            prop::option::of(prop::sample::select(vec![Protocol::Tcp, Protocol::Udp])),
        ),
        0..4,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(
                |((cidr, namespace, pod_selector), ports, protocol)| EgressRule {
                    cidr,
                    namespace,
                    pod_selector,
                    ports,
                    protocol,
                },
            )
            .collect()
    });
    (
        1i32..=100,
        image(),
        env,
        1024i32..=65535,
        quantity(&["m", "", "k"]),
        quantity(&["Mi", "Gi", "M", "G"]),
        prop::option::of(prop::option::of("/[a-z/]{0,20}")),
        clients,
        egress,
        (
            model(),
            prop::collection::btree_set("[a-z][a-z0-9-]{0,10}", 0..3),
            any::<bool>(),
            // Secret files: a directory of 3 under /var/run/secrets (or /etc/app), a file name,
            // a Secret and a key.
            prop::collection::btree_map(
                (
                    prop::sample::select(vec![
                        "/var/run/secrets/hf",
                        "/var/run/secrets/db",
                        "/etc/app/secrets",
                    ]),
                    "[a-z][a-z0-9_.-]{0,12}",
                ),
                (
                    "[a-z]([a-z0-9-]{0,8}[a-z0-9])?",
                    "[A-Za-z0-9_][A-Za-z0-9_.-]{0,11}",
                ),
                0..4,
            ),
        ),
        (
            prop::collection::btree_map(
                prop::sample::select(vec!["nvidia.com/gpu", "amd.com/gpu", "example.com/fpga"])
                    .prop_map(String::from),
                1i64..=8,
                0..3,
            ),
            prop::option::of(1u32..4096),
            prop::option::of(placement()),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                replicas,
                image,
                env,
                port,
                (cpu, cu),
                (mem, mu),
                probe,
                clients,
                egress,
                (model, pull_secrets, strict, secret_files),
                (extended, shm, placement, gated),
            )| {
                // With the gate, the server keeps clear of the gate's ports in the pod.
                let port = if gated && [15443, 15081, 15090].contains(&port) {
                    port + 1
                } else {
                    port
                };
                let gate = (!gated).then(|| moat::api::GateSpec {
                    mode: Some(moat::api::GateMode::Disabled),
                    ..Default::default()
                });
                // RequireDigest only where the image names a digest (otherwise it is invalid).
                let image_policy =
                    (strict && image.contains("@sha256:")).then_some(ImagePolicy::RequireDigest);
                // With a model, the memory limit also holds the plaintext and 256Mi (else it is
                // invalid: see the explicit tests below).
                // The same with a /dev/shm, which is charged to the pod's memory too.
                let shared_memory = shm.map(|mi| format!("{mi}Mi"));
                let memory = match (&model, shm) {
                    (None, None) => format!("{mem}{mu}"),
                    _ => format!(
                        "{}Mi",
                        model
                            .as_ref()
                            .map_or(0, |m| moat::quantity::mebibytes_ceil(&m.size_limit)
                                .unwrap_or(0))
                            + u64::from(shm.unwrap_or(0))
                            + 256
                            + u64::from(mem)
                    ),
                };
                SecureModelDeploymentSpec {
                    replicas,
                    server: ServerSpec {
                        image,
                        command: None,
                        args: vec!["--port".into(), port.to_string()],
                        env,
                        port,
                        resources: Resources {
                            limits: ResourceLimits {
                                cpu: format!("{cpu}{cu}"),
                                memory,
                                ephemeral_storage: None,
                            },
                            requests: None,
                            extended,
                        },
                        readiness_probe: probe.map(|path| Probe {
                            http_get: path.map(|path| HttpGetProbe { path, scheme: None }),
                            ..Probe::default()
                        }),
                        shared_memory,
                        startup_probe: None,
                        liveness_probe: None,
                        secret_files: secret_files
                            .into_iter()
                            .map(|((dir, file), (secret_name, key))| SecretFile {
                                path: format!("{dir}/{file}"),
                                secret_name,
                                key,
                            })
                            .collect(),
                    },
                    access: AccessSpec { clients, egress },
                    tls: Default::default(),
                    image_policy,
                    image_pull_secrets: pull_secrets
                        .into_iter()
                        .map(|name| SecretRef { name })
                        .collect(),
                    model,
                    placement,
                    gate,
                    rollout: None,
                    approval: None,
                }
            },
        )
}

/// `spec.placement`: node selectors, tolerations, a required node affinity, priority and runtime
/// classes.
fn placement() -> impl Strategy<Value = Placement> {
    (
        prop::collection::btree_map("[a-z]{1,8}(\\.[a-z]{1,5}/[a-z]{1,8})?", "[a-z0-9]{0,8}", 0..3),
        prop::collection::vec(("[a-z]{1,8}\\.com/[a-z]{1,8}", any::<bool>()), 0..3),
        prop::option::of("[a-z]{1,8}"),
        prop::option::of("[a-z]{1,8}"),
        prop::option::of("[a-z]{1,8}"),
    )
        .prop_map(|(node_selector, tolerations, zone, priority, runtime)| Placement {
            node_selector,
            tolerations: tolerations
                .into_iter()
                .map(|(key, exists)| k8s_openapi::api::core::v1::Toleration {
                    key: Some(key),
                    operator: Some(if exists { "Exists" } else { "Equal" }.into()),
                    value: (!exists).then(|| "true".into()),
                    effect: Some("NoSchedule".into()),
                    ..Default::default()
                })
                .collect(),
            node_affinity: zone.map(|zone| {
                serde_json::from_value(serde_json::json!({
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": [zone]}]}
                    ]}
                }))
                .expect("node affinity")
            }),
            priority_class_name: priority,
            runtime_class_name: runtime,
        })
}

/// The volumes each container of `pod` mounts, by container name.
fn mounts(pod: &PodSpec) -> BTreeMap<String, Vec<(String, bool)>> {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .map(|c| {
            let m = c
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| (m.name.clone(), m.read_only == Some(true)))
                .collect();
            (c.name.clone(), m)
        })
        .collect()
}

/// The fixture's SecureModelDeployment `ml/model` (with the uid owner references need), with
/// `spec` (a generated one) in place of the fixture's.
fn smd(spec: SecureModelDeploymentSpec) -> SecureModelDeployment {
    let mut smd = fixture::smd("model")
        .namespace("ml")
        .uid("00000000-0000-0000-0000-000000000001")
        .build()
        .expect("the fixture is valid");
    smd.spec = spec;
    smd
}

/// 512 cases with a fresh seed each run. A failing case is printed with its minimal input and
/// never written to a `proptest-regressions` file: a failure found once must become an explicit
/// test below (as the `..` paths did), not a file that silently fails every later run.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_valid_spec_renders_pods_that_pass_restricted(spec in spec()) {
        prop_assert_eq!(validate(&spec, "model"), Ok(()));
        let children = render(&smd(spec.clone()), &Facts::default()).expect("a valid spec renders");
        let pod = children.deployment.spec.clone().and_then(|s| s.template.spec).expect("pod template");
        let v = fixture::restricted_violations(&pod);
        prop_assert!(v.is_empty(), "violations: {:?}", v);
        // The pods never run with fewer ready replicas than requested during a rollout.
        let strategy = children.deployment.spec.and_then(|s| s.strategy).and_then(|s| s.rolling_update).expect("rolling update");
        prop_assert_eq!(serde_json::to_value(strategy.max_unavailable).expect("json"), serde_json::json!(0));
        prop_assert_eq!(children.pod_disruption_budget.is_some(), spec.replicas >= 2);
        if let Some(pdb) = &children.pod_disruption_budget {
            let policy = pdb.spec.as_ref().and_then(|s| s.unhealthy_pod_eviction_policy.clone());
            prop_assert_eq!(policy.as_deref(), Some("AlwaysAllow"));
        }
        // Default deny of both directions always exists.
        let deny = &children.network_policies[0];
        let deny_spec = deny.spec.clone().expect("spec");
        prop_assert!(deny_spec.ingress.is_none() && deny_spec.egress.is_none());
        prop_assert_eq!(deny_spec.policy_types, Some(vec!["Ingress".to_string(), "Egress".to_string()]));
        // A digest in the spec is what the pods run; a tag is never turned into anything else
        // offline (the operator pins it).
        let server = &pod.containers[0];
        if let Some((_, digest)) = spec.server.image.split_once('@') {
            prop_assert!(server.image.as_deref().is_some_and(|i| i.ends_with(digest)));
        }
        let by_container = mounts(&pod);
        let inits: Vec<_> = pod.init_containers.clone().unwrap_or_default();
        let gated = moat::render::gate::enforced_spec(&spec);
        // The gate: a native sidecar with the serving port, the certificate and the policy
        // read-only; the server keeps the Service's port name only without it.
        let gate = inits.iter().find(|c| c.name == "gate");
        prop_assert_eq!(gate.is_some(), gated);
        if let Some(gate) = gate {
            prop_assert_eq!(gate.restart_policy.as_deref(), Some("Always"));
            prop_assert!(by_container["gate"].contains(&("tls".to_string(), true)));
            prop_assert!(by_container["gate"].contains(&("gate-policy".to_string(), true)));
            let serving = gate.ports.iter().flatten().find(|p| p.name.as_deref() == Some("serving"));
            prop_assert_eq!(serving.map(|p| p.container_port), Some(moat::render::gate::DEFAULT_PORT));
            prop_assert!(!pod.containers[0].ports.iter().flatten().any(|p| p.name.as_deref() == Some("serving")));
            prop_assert!(children.gate_policy.is_some());
            prop_assert!(!by_container["server"].iter().any(|(n, _)| n == "gate-policy"));
        } else {
            prop_assert!(children.gate_policy.is_none());
        }
        match &spec.model {
            None => prop_assert!(!inits.iter().any(|c| c.name == "decrypt-model")),
            Some(model) => {
                // The plaintext: a memory-backed, size-limited volume, read-only for the server.
                let vol = pod.volumes.iter().flatten().find(|v| v.name == "model").expect("model volume");
                let empty = vol.empty_dir.clone().expect("emptyDir");
                prop_assert_eq!(empty.medium.as_deref(), Some("Memory"));
                prop_assert_eq!(empty.size_limit.map(|q| q.0), Some(model.size_limit.clone()));
                prop_assert!(by_container["server"].contains(&("model".to_string(), true)));
                prop_assert!(by_container["decrypt-model"].contains(&("model".to_string(), false)));
                // The key, the source and its CA reach the init container only.
                for private in ["model-key", "model-source", "model-ca"] {
                    prop_assert!(!by_container["server"].iter().any(|(n, _)| n == private), "{private} mounted into the server");
                }
                prop_assert!(by_container["decrypt-model"].contains(&("model-key".to_string(), true)));
                if model.source.pvc.is_some() {
                    prop_assert!(by_container["decrypt-model"].contains(&("model-source".to_string(), true)));
                    let pvc = pod.volumes.iter().flatten().find_map(|v| v.persistent_volume_claim.clone()).expect("pvc volume");
                    prop_assert_eq!(pvc.read_only, Some(true));
                }
                let init = &pod.init_containers.as_ref().expect("init")[0];
                let args = init.args.clone().unwrap_or_default();
                let sha_arg = format!("--sha256={}", model.sha256);
                prop_assert!(args.contains(&sha_arg), "args {:?}", args);
                prop_assert!(args.iter().any(|a| a.starts_with("--source=https://") || a.starts_with("--source=file:///var/run/moat/model-source/")));
                // The plaintext is charged to the init container's memory: its limit (and its
                // request) hold sizeLimit plus its own 256Mi, and so does the server's limit.
                let size = moat::quantity::parse(&model.size_limit).expect("size");
                let resources = init.resources.clone().expect("init resources");
                for (what, q) in [("limit", resources.limits), ("request", resources.requests)] {
                    let memory = q.and_then(|q| q.get("memory").map(|m| m.0.clone())).unwrap_or_default();
                    let memory = moat::quantity::parse(&memory).unwrap_or(0.0);
                    prop_assert!(memory >= size + 256.0 * moat::quantity::MI, "init memory {} {} for {}", what, memory, size);
                }
                let server = pod.containers.iter().find(|c| c.name == "server").expect("server");
                let server_memory = server.resources.as_ref().and_then(|r| r.limits.as_ref()).and_then(|l| l.get("memory")).map(|m| m.0.clone()).unwrap_or_default();
                prop_assert!(moat::quantity::parse(&server_memory).unwrap_or(0.0) >= size + 256.0 * moat::quantity::MI);
            }
        }
        // Extended resources: requested exactly as limited; placement: passed as given.
        let server = &pod.containers[0];
        // Every server is probed for liveness, only after a startup probe that allows a long load.
        let startup = server.startup_probe.clone().expect("a startup probe");
        prop_assert!(startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3) >= 1800);
        prop_assert!(server.liveness_probe.is_some());
        let res = server.resources.clone().expect("resources");
        for (name, count) in &spec.server.resources.extended {
            for q in [&res.limits, &res.requests] {
                prop_assert_eq!(q.as_ref().and_then(|q| q.get(name)).map(|q| q.0.clone()), Some(count.to_string()));
            }
        }
        let placement = spec.placement.clone().unwrap_or_default();
        prop_assert_eq!(pod.node_selector.clone().unwrap_or_default(), placement.node_selector.clone());
        prop_assert_eq!(pod.tolerations.clone().unwrap_or_default(), placement.tolerations.clone());
        prop_assert_eq!(pod.affinity.clone().and_then(|a| a.node_affinity), placement.node_affinity.clone());
        prop_assert_eq!(pod.priority_class_name.clone(), placement.priority_class_name.clone());
        prop_assert_eq!(pod.runtime_class_name.clone(), placement.runtime_class_name.clone());
        // Every Secret file is in a read-only projected volume at its directory, with its key,
        // file name and mode 0440, and nothing else is.
        let mut projected = 0;
        for file in &spec.server.secret_files {
            let (dir, name) = file.path.rsplit_once('/').expect("an absolute path");
            let mount = server.volume_mounts.iter().flatten()
                .find(|m| m.mount_path == dir)
                .expect("a mount at the file's directory");
            prop_assert_eq!(mount.read_only, Some(true));
            let vol = pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("its volume");
            let sources = vol.projected.as_ref().expect("projected").sources.clone().unwrap_or_default();
            let found = sources.iter().filter_map(|s| s.secret.as_ref())
                .filter(|s| s.name == file.secret_name)
                .flat_map(|s| s.items.clone().unwrap_or_default())
                .filter(|i| i.key == file.key && i.path == name && i.mode == Some(0o440))
                .count();
            prop_assert_eq!(found, 1, "{} in its volume", file.path);
        }
        for vol in pod.volumes.iter().flatten().filter_map(|v| v.projected.as_ref()) {
            prop_assert_eq!(vol.default_mode, Some(0o440));
            projected += vol.sources.iter().flatten().filter_map(|s| s.secret.as_ref())
                .map(|s| s.items.as_ref().map_or(0, Vec::len)).sum::<usize>();
        }
        prop_assert_eq!(projected, spec.server.secret_files.len());
        if let Some(shm) = &spec.server.shared_memory {
            let vol = pod.volumes.iter().flatten().find(|v| v.name == "shm").expect("shm volume");
            let empty = vol.empty_dir.clone().expect("emptyDir");
            prop_assert_eq!(empty.medium.as_deref(), Some("Memory"));
            prop_assert_eq!(empty.size_limit.map(|q| q.0), Some(shm.clone()));
            prop_assert!(server.volume_mounts.iter().flatten().any(|m| m.name == "shm" && m.mount_path == "/dev/shm"));
        }
        let pull: Vec<String> = pod.image_pull_secrets.iter().flatten().map(|r| r.name.clone()).collect();
        let want: Vec<String> = spec.image_pull_secrets.iter().map(|r| r.name.clone()).collect();
        prop_assert_eq!(pull, want);
    }

    #[test]
    fn rendering_is_deterministic(spec in spec()) {
        let a = moat::render::to_yaml(&render(&smd(spec.clone()), &Facts::default()).expect("renders")).expect("yaml");
        let b = moat::render::to_yaml(&render(&smd(spec), &Facts::default()).expect("renders")).expect("yaml");
        prop_assert_eq!(a, b);
    }

    #[test]
    fn validation_never_panics_and_rejects_bad_fields(
        image in ".{0,80}", env_name in ".{0,20}", port in any::<i32>(), cpu in ".{0,10}", cidr in ".{0,24}"
    ) {
        let mut spec = SecureModelDeploymentSpec {
            replicas: 2,
            server: ServerSpec {
                image: image.clone(),
                command: None,
                args: vec![],
                env: vec![EnvVar { name: env_name.clone(), value: Some("x".into()), value_from: None }],
                port,
                resources: Resources { limits: ResourceLimits { cpu: cpu.clone(), memory: "1Gi".into(), ephemeral_storage: None }, requests: None, extended: BTreeMap::new() },
                readiness_probe: None,
                shared_memory: None,
                startup_probe: None,
                liveness_probe: None,
                secret_files: vec![],
            },
            access: AccessSpec::default(),
            tls: Default::default(),
            image_policy: None,
            image_pull_secrets: Vec::new(),
            model: None,
            placement: None,
            gate: None,
            rollout: None,
            approval: None,
        };
        spec.access.egress.push(EgressRule { cidr: Some(cidr), namespace: None, pod_selector: None, ports: vec![443], protocol: None });
        let result = validate(&spec, "model");
        if !(1024..=65535).contains(&port) {
            let errors = result.clone().expect_err("a bad port is rejected");
            prop_assert!(errors.iter().any(|e| e.field == "spec.server.port"));
        }
        if env_name.is_empty() || env_name.starts_with("MOAT_") {
            let errors = result.expect_err("a bad env name is rejected");
            prop_assert!(errors.iter().any(|e| e.field == "spec.server.env[0].name"));
        }
    }
}

#[test]
fn the_checker_catches_what_restricted_forbids() {
    // Guard against a checker that accepts everything.
    let good = render(&smd(spec_example()), &Facts::default()).expect("renders");
    let mut pod = good
        .deployment
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod");
    assert!(fixture::restricted_violations(&pod).is_empty());
    pod.host_network = Some(true);
    pod.containers[0]
        .security_context
        .as_mut()
        .expect("sc")
        .privileged = Some(true);
    pod.containers[0]
        .security_context
        .as_mut()
        .expect("sc")
        .read_only_root_filesystem = Some(false);
    let v = fixture::restricted_violations(&pod);
    assert!(v.iter().any(|s| s.contains("host namespaces")));
    assert!(v.iter().any(|s| s.contains("privileged")));
    assert!(v.iter().any(|s| s.contains("writable root")));
}

/// The fixture's minimal valid spec.
fn spec_example() -> SecureModelDeploymentSpec {
    fixture::smd("model").build().expect("spec").spec
}

#[test]
fn invalid_specs_stall_with_actionable_messages() {
    let mut s = spec_example();
    s.server.env = vec![
        EnvVar {
            name: "A".into(),
            value: Some("1".into()),
            value_from: None,
        },
        EnvVar {
            name: "A".into(),
            value: Some("2".into()),
            value_from: None,
        },
    ];
    s.server.resources.requests = Some(ResourceRequests {
        cpu: Some("2".into()),
        memory: None,
        ephemeral_storage: None,
    });
    s.access.egress = vec![EgressRule {
        cidr: Some("0.0.0.0/0".into()),
        namespace: None,
        pod_selector: None,
        ports: vec![443],
        protocol: None,
    }];
    let errors = validate(&s, "m").expect_err("invalid");
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|e| e == "spec.server.env[1].name: \"A\" is set more than once"),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|e| e == "spec.server.resources.requests.cpu: request 2 exceeds the limit 1"),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|e| e.starts_with("spec.access.egress[0].cidr: 0.0.0.0/0 allows every address")),
        "{text:?}"
    );
    let err = render(&smd(s), &Facts::default()).expect_err("render refuses");
    assert!(err.to_string().contains("is set more than once"));
}

/// The two inputs the "valid spec" generator once produced (issue 12): a PVC path whose last
/// component is `..` is refused by validation, and rendering refuses it too.
#[test]
fn pvc_paths_that_climb_out_of_the_volume_are_refused() {
    for path in ["a/..", "0/..", "..", "a/../b"] {
        let mut s = spec_example();
        s.model = Some(ModelSpec {
            source: ModelSource {
                url: None,
                ca_config_map_ref: None,
                pvc: Some(PvcSource {
                    claim_name: "weights".into(),
                    path: path.into(),
                }),
            },
            sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            decryption_key_secret_ref: KeyRef {
                name: "model-key".into(),
                key: "identity".into(),
            },
            mount_path: "/models".into(),
            size_limit: "1Gi".into(),
            delete_key_with_deployment: false,
        });
        let errors = validate(&s, "model").expect_err(path);
        assert!(
            errors
                .iter()
                .any(|e| e.field == "spec.model.source.pvc.path"),
            "{path}: {errors:?}"
        );
        assert!(render(&smd(s), &Facts::default()).is_err(), "{path}");
    }
}
