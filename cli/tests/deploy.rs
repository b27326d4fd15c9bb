//! The deployment files, checked without Docker or a cluster: compose.yaml
//! against the Compose specification's schema, every manifest under
//! deploy/kubernetes/ against the Kubernetes schemas (both vendored under
//! deploy/schemas/, so nothing is fetched), and the properties the issues
//! ask for (state in named volumes, loopback ports, one image, non-root,
//! probes), which a schema cannot express.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use jsonschema::{Registry, Validator};
use serde_json::{json, Value};

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_owned()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_json(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML file, with `<<` merge keys applied (as Docker
/// Compose applies them) and turned into JSON for the validator.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let mut v: serde_yaml::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"));
            // A merged mapping may hold a `<<` of its own (compose.yaml's
            // x-rabbit-node merges x-rabbit): serde_yaml applies one level
            // per pass, so pass until none is left, outer keys winning.
            for _ in 0..8 {
                v.apply_merge()
                    .unwrap_or_else(|e| panic!("{rel}: bad merge key: {e}"));
            }
            let v = serde_json::to_value(v).unwrap_or_else(|e| panic!("{rel}: not JSON-like: {e}"));
            assert!(
                !v.to_string().contains("\"<<\""),
                "{rel}: merge keys nested deeper than 8"
            );
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// A named way to break a valid document, for the tests that check a
/// broken one is rejected.
type Breakage = (&'static str, fn(&mut Value));

/// Why `instance` fails `validator`, one line per error; empty when valid.
fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("at {}: {e}", e.instance_path()))
        .collect()
}

// ---- Compose ----------------------------------------------------------

fn compose_validator() -> Validator {
    jsonschema::options()
        .offline()
        .build(&read_json("deploy/schemas/compose-spec.json"))
        .expect("the Compose schema compiles")
}

fn compose() -> Value {
    let mut docs = yaml_docs("compose.yaml");
    assert_eq!(docs.len(), 1, "compose.yaml is one document");
    docs.remove(0)
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"].as_object().expect("services")
}

/// The services that run the warren image.
fn warren_services(compose: &Value) -> Vec<(&String, &Value)> {
    services(compose)
        .iter()
        .filter(|(_, s)| s["image"] == "warren:local")
        .collect()
}

#[test]
fn compose_file_matches_the_compose_specification() {
    let errs = errors(&compose_validator(), &compose());
    assert!(errs.is_empty(), "compose.yaml:\n{}", errs.join("\n"));
}

#[test]
fn a_broken_compose_file_is_rejected() {
    let validator = compose_validator();
    let good = compose();
    let breakages: [Breakage; 4] = [
        ("misspelt key", |c| {
            c["services"]["orders"]["helthcheck"] = json!({"test": ["CMD", "true"]});
        }),
        ("unknown depends_on condition", |c| {
            c["services"]["orders"]["depends_on"]["migrate"]["condition"] = json!("service_done");
        }),
        ("ulimits of the wrong type", |c| {
            c["services"]["rabbitmq"]["ulimits"]["nofile"] = json!(["65536"]);
        }),
        ("top-level key of no meaning", |c| {
            c["servces"] = json!({});
        }),
    ];
    for (what, breaks) in breakages {
        let mut bad = good.clone();
        breaks(&mut bad);
        assert!(
            !errors(&validator, &bad).is_empty(),
            "a compose file with a {what} passed the schema"
        );
    }
}

#[test]
fn compose_publishes_ports_on_loopback_only() {
    let compose = compose();
    let mut published = 0;
    for (name, service) in services(&compose) {
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = port
                .as_str()
                .unwrap_or_else(|| panic!("{name}: long-form port"));
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
            published += 1;
        }
    }
    assert!(published >= 5, "only {published} ports published");
}

#[test]
fn compose_keeps_state_in_named_volumes_under_fixed_host_names() {
    let compose = compose();
    let named: BTreeSet<&str> = compose["volumes"]
        .as_object()
        .expect("top-level volumes")
        .keys()
        .map(String::as_str)
        .collect();
    let volume_of = |service: &str| -> String {
        let s = &compose["services"][service];
        s["volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("{service} has no volume"))
            .iter()
            .filter_map(Value::as_str)
            .map(|v| v.split(':').next().unwrap_or_default().to_owned())
            .next()
            .unwrap_or_else(|| panic!("{service} has no short-form volume"))
    };
    for service in ["rabbitmq", "rabbit1", "rabbit2", "rabbit3", "postgres"] {
        let volume = volume_of(service);
        assert!(
            named.contains(volume.as_str()),
            "{service} keeps its data in {volume}, not a named volume"
        );
    }
    // A RabbitMQ node's name is rabbit@<hostname>, and its data directory
    // is per node name: a host name that changed would orphan the data.
    for service in ["rabbitmq", "rabbit1", "rabbit2", "rabbit3"] {
        assert_eq!(compose["services"][service]["hostname"], service);
    }
}

#[test]
fn compose_runs_a_supported_rabbitmq_with_prometheus_and_room_for_files() {
    let compose = compose();
    for service in ["rabbitmq", "rabbit1", "rabbit2", "rabbit3"] {
        let s = &compose["services"][service];
        let image = s["image"].as_str().unwrap_or_default();
        // Community support covers only the newest release series: 4.2
        // when this was written (4.0 and 4.1 are out of it). A floating
        // minor tag (4.2-management) takes the series' patch releases.
        let series = image
            .strip_prefix("rabbitmq:")
            .and_then(|t| t.strip_suffix("-management"))
            .and_then(|v| v.split_once('.'))
            .and_then(|(major, minor)| {
                Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
            });
        assert!(
            series.is_some_and(|v| v >= (4, 2)),
            "{service}: {image} is not a management image of a supported series (4.2 or newer, as MAJOR.MINOR)"
        );
        let nofile = s["ulimits"]["nofile"]["soft"].as_u64().unwrap_or_default();
        assert!(nofile >= 65536, "{service}: nofile {nofile}");
    }
    let plugins = &compose["configs"]["rabbitmq_plugins"]["file"];
    let plugins = read(plugins.as_str().expect("plugins file"));
    assert!(plugins.contains("rabbitmq_prometheus"), "{plugins}");
}

#[test]
fn compose_builds_one_image_for_every_warren_service() {
    let compose = compose();
    let builders: Vec<&String> = services(&compose)
        .iter()
        .filter(|(_, s)| s.get("build").is_some())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(builders, ["migrate"], "one service builds the image");
    let warren: BTreeSet<&str> = warren_services(&compose)
        .into_iter()
        .map(|(n, _)| n.as_str())
        .collect();
    let mut expected: BTreeSet<&str> = services::ALL.iter().copied().collect();
    expected.insert("migrate");
    assert_eq!(warren, expected);
}

#[test]
fn compose_checks_readiness_over_http_and_logs_json() {
    let compose = compose();
    for (name, s) in warren_services(&compose) {
        assert_eq!(s["environment"]["WARREN_LOG_FORMAT"], "json", "{name}");
        assert!(
            s["environment"]["AMQP_URL"].is_string()
                && s["environment"]["DATABASE_URL"].is_string(),
            "{name}"
        );
        if name == "migrate" {
            continue;
        }
        let test: Vec<&str> = s["healthcheck"]["test"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no health check"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(test[..2], ["CMD", "curl"], "{name}");
        assert!(
            test.contains(&"http://127.0.0.1:8080/ready"),
            "{name}: {test:?}"
        );
        assert_eq!(
            s["command"],
            json!(["run", name]),
            "{name} runs its own service"
        );
    }
    // The health check's curl is in the image.
    assert!(read("Dockerfile").contains(" curl"));
}

#[test]
fn compose_has_no_stock_credentials() {
    let text = read("compose.yaml");
    for stock in ["guest:guest", "postgres:postgres", "POSTGRES_PASSWORD: "] {
        assert!(!text.contains(stock), "compose.yaml holds {stock:?}");
    }
    let compose = compose();
    assert_eq!(
        compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"],
        "/run/secrets/postgres_password"
    );
    for secret in [
        "postgres_password",
        "erlang_cookie",
        "grafana_admin_password",
    ] {
        assert!(
            compose["secrets"][secret]["environment"].is_string(),
            "secret {secret} is not taken from the environment (.env)"
        );
    }
    assert!(read(".gitignore").lines().any(|l| l.trim() == ".env"));
    assert!(read(".dockerignore").lines().any(|l| l.trim() == ".env"));
}

#[test]
fn compose_cluster_profile_runs_three_nodes_sharing_a_cookie() {
    let compose = compose();
    for node in ["rabbit1", "rabbit2", "rabbit3"] {
        let s = &compose["services"][node];
        assert_eq!(s["profiles"], json!(["cluster"]), "{node}");
        assert_eq!(s["secrets"], json!(["erlang_cookie"]), "{node}");
        let entrypoint = s["entrypoint"].to_string();
        assert!(entrypoint.contains("/run/secrets/erlang_cookie"), "{node}");
        // The services wait for the node when the profile is on.
        let dep = &compose["services"]["orders"]["depends_on"][node];
        assert_eq!(dep["required"], false, "{node}");
        assert_eq!(dep["condition"], "service_healthy", "{node}");
    }
    let config = read("deploy/rabbitmq/cluster.conf");
    for node in ["rabbit@rabbit1", "rabbit@rabbit2", "rabbit@rabbit3"] {
        assert!(config.contains(node), "cluster.conf lacks {node}");
    }
    // .env.example gives the services all three nodes, comma-separated.
    let example = read(".env.example");
    let url = example
        .lines()
        .find_map(|l| l.trim_start_matches('#').strip_prefix("WARREN_AMQP_URL="))
        .expect(".env.example sets WARREN_AMQP_URL");
    let hosts: Vec<&str> = url
        .split(',')
        .map(|u| u.split('@').nth(1).unwrap_or_default())
        .collect();
    assert_eq!(
        hosts,
        ["rabbit1:5672/%2f", "rabbit2:5672/%2f", "rabbit3:5672/%2f"]
    );
}

#[test]
fn compose_observability_profile_scrapes_traces_and_shows_the_dashboard() {
    let compose = compose();
    for service in ["prometheus", "grafana", "jaeger"] {
        assert_eq!(
            compose["services"][service]["profiles"],
            json!(["observability"]),
            "{service}"
        );
    }
    let jaeger_ports = compose["services"]["jaeger"]["ports"].to_string();
    for port in ["4317:4317", "4318:4318"] {
        assert!(
            jaeger_ports.contains(port),
            "jaeger does not publish {port}"
        );
    }
    for (name, s) in warren_services(&compose) {
        assert_eq!(
            s["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"],
            json!("${WARREN_OTLP_ENDPOINT:-}"),
            "{name}"
        );
    }
    // The endpoint .env.example gives is Jaeger's OTLP/HTTP receiver (4318;
    // 4317 is gRPC, which warren does not speak), and warren takes it.
    let example = read(".env.example");
    let endpoint = example
        .lines()
        .find_map(|l| {
            l.trim_start_matches('#')
                .strip_prefix("WARREN_OTLP_ENDPOINT=")
        })
        .expect(".env.example sets WARREN_OTLP_ENDPOINT");
    assert_eq!(endpoint, "http://jaeger:4318");
    let otlp = warren_cli::telemetry::OtlpConfig::from_vars(|v| {
        (v == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| endpoint.to_owned())
    })
    .unwrap()
    .unwrap();
    assert_eq!(otlp.traces_url, "http://jaeger:4318/v1/traces");
    let prometheus = yaml_docs("deploy/prometheus/prometheus.yml").remove(0);
    let jobs = prometheus["scrape_configs"].to_string();
    assert!(jobs.contains("15692"), "RabbitMQ's metrics are not scraped");
    for service in services::ALL {
        assert!(
            jobs.contains(&format!("\"{service}\"")),
            "{service} not scraped"
        );
    }
    // What compose mounts is what the provisioning reads.
    let grafana = compose["services"]["grafana"]["volumes"].to_string();
    assert!(grafana.contains("./deploy/grafana/dashboards:/var/lib/grafana/dashboards/warren"));
    let provider = yaml_docs("deploy/grafana/provisioning/dashboards/warren.yaml").remove(0);
    assert_eq!(
        provider["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards/warren"
    );
}

#[test]
fn compose_mounts_only_files_that_exist() {
    let compose = compose();
    let mut paths: Vec<String> = compose["configs"]
        .as_object()
        .expect("configs")
        .values()
        .filter_map(|c| c["file"].as_str().map(str::to_owned))
        .collect();
    for s in services(&compose).values() {
        for v in s["volumes"].as_array().into_iter().flatten() {
            if let Some(source) = v.as_str().and_then(|v| v.split(':').next()) {
                if source.starts_with("./") {
                    paths.push(source.to_owned());
                }
            }
        }
    }
    assert!(!paths.is_empty());
    for p in paths {
        assert!(
            root().join(&p).exists(),
            "compose.yaml mounts {p}, which is missing"
        );
    }
}

// ---- Dockerfile -------------------------------------------------------

#[test]
fn dockerfile_runs_the_binary_alone_as_a_non_root_user() {
    let dockerfile = read("Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let last_from = instructions
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    let runtime = &instructions[last_from..];
    let user = runtime
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {user}: not a numeric non-root UID (Kubernetes' runAsNonRoot needs one)"
    );
    let copies: Vec<&&str> = runtime.iter().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(
        copies,
        [&"COPY --from=build /src/target/release/warren /usr/local/bin/warren"],
        "the runtime stage holds the binary alone"
    );
    assert!(runtime.contains(&"ENTRYPOINT [\"warren\"]"));
}

#[test]
fn dockerfile_caches_dependencies_for_every_workspace_member() {
    let dockerfile = read("Dockerfile");
    let manifest: toml_members::Workspace = toml_members::parse(&read("Cargo.toml"));
    for member in manifest.members {
        assert!(
            dockerfile.contains(&format!("COPY {member}/Cargo.toml {member}/")),
            "the dependency layer misses workspace member {member}"
        );
    }
    // The stubs come before the sources, and the real build after them.
    let deps = dockerfile.find("cargo build --release --locked -p warren");
    let sources = dockerfile.find("COPY . .");
    assert!(deps.is_some() && sources.is_some() && deps < sources);
}

/// The workspace's members, read from the root Cargo.toml without a TOML
/// parser: the list is one line, `members = ["a", "b"]`.
mod toml_members {
    pub struct Workspace {
        pub members: Vec<String>,
    }

    pub fn parse(text: &str) -> Workspace {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("members"))
            .expect("a members line");
        let list = line.split_once('[').and_then(|(_, r)| r.split_once(']'));
        let members = list
            .expect("members = [...] on one line")
            .0
            .split(',')
            .map(|m| m.trim().trim_matches('"').to_owned())
            .filter(|m| !m.is_empty())
            .collect();
        Workspace { members }
    }
}

// ---- Kubernetes -------------------------------------------------------

const K8S: &str = "deploy/schemas/kubernetes/v1.37.0-local-strict";
/// Where the kind schemas' `$ref: /api/_definitions.json#…` resolves to
/// (against their `$id`, https://kubernetes.io/api/<kind>/…).
const K8S_DEFINITIONS: &str = "https://kubernetes.io/api/_definitions.json";

/// The schema file of a kind, as kubernetes-validate names them.
fn k8s_schema_file(api_version: &str, kind: &str) -> String {
    let kind = kind.to_lowercase();
    match api_version.split_once('/') {
        Some((group, version)) => format!(
            "{kind}-{}-{version}.json",
            group.split('.').next().unwrap_or(group)
        ),
        None => format!("{kind}-{api_version}.json"),
    }
}

/// Validators of the vendored kinds, by schema file name.
struct K8sSchemas {
    validators: BTreeMap<String, Validator>,
}

impl K8sSchemas {
    fn load() -> K8sSchemas {
        let registry = Registry::new()
            .add(
                K8S_DEFINITIONS,
                read_json(&format!("{K8S}/_definitions.json")),
            )
            .expect("definitions resource")
            .prepare()
            .expect("definitions registry");
        let mut validators = BTreeMap::new();
        for entry in std::fs::read_dir(root().join(K8S)).expect("kubernetes schemas") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.starts_with('_') || !name.ends_with(".json") {
                continue;
            }
            let schema = read_json(&format!("{K8S}/{name}"));
            let validator = jsonschema::options()
                .offline()
                .with_registry(&registry)
                .build(&schema)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            validators.insert(name, validator);
        }
        assert!(validators.len() >= 8, "kind schemas missing");
        K8sSchemas { validators }
    }

    /// Why `doc` is not a valid object of its kind; empty when it is.
    fn errors(&self, doc: &Value) -> Vec<String> {
        let (Some(api_version), Some(kind)) = (doc["apiVersion"].as_str(), doc["kind"].as_str())
        else {
            return vec!["no apiVersion or kind".to_owned()];
        };
        let file = k8s_schema_file(api_version, kind);
        match self.validators.get(&file) {
            Some(v) => errors(v, doc),
            None => vec![format!(
                "no schema {file} for {api_version} {kind}: add it to deploy/schemas/vendor.py"
            )],
        }
    }
}

/// The manifests kubectl applies (and the example Secret), by file name:
/// every YAML file of deploy/kubernetes/ but kustomization.yaml, outside
/// operators/ (custom resources, not core kinds).
fn k8s_manifests() -> BTreeMap<String, Vec<Value>> {
    let dir = root().join("deploy/kubernetes");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            out.insert(
                name.clone(),
                yaml_docs(&format!("deploy/kubernetes/{name}")),
            );
        }
    }
    out
}

fn k8s_objects(kind: &str) -> Vec<Value> {
    k8s_manifests()
        .into_values()
        .flatten()
        .filter(|d| d["kind"] == kind)
        .collect()
}

#[test]
fn kubernetes_manifests_match_the_kubernetes_schemas() {
    let schemas = K8sSchemas::load();
    let manifests = k8s_manifests();
    assert!(manifests.len() >= 9, "{:?}", manifests.keys());
    let mut failures = Vec::new();
    for (file, docs) in &manifests {
        for doc in docs {
            for e in schemas.errors(doc) {
                failures.push(format!(
                    "{file} ({} {}): {e}",
                    doc["kind"], doc["metadata"]["name"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_broken_kubernetes_manifest_is_rejected() {
    let schemas = K8sSchemas::load();
    let good = k8s_objects("Deployment").remove(0);
    assert!(schemas.errors(&good).is_empty());
    let breakages: [Breakage; 5] = [
        ("misspelt probe field", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] =
                json!("/ready");
        }),
        ("replica count as a word", |d| {
            d["spec"]["replicas"] = json!("two")
        }),
        ("container without a name", |d| {
            let c = d["spec"]["template"]["spec"]["containers"][0]
                .as_object_mut()
                .expect("container");
            c.remove("name");
        }),
        ("unknown kind", |d| d["kind"] = json!("Deploymnet")),
        ("field at the wrong level", |d| {
            d["spec"]["readOnlyRootFilesystem"] = json!(true);
        }),
    ];
    for (what, breaks) in breakages {
        let mut bad = good.clone();
        breaks(&mut bad);
        assert!(
            !schemas.errors(&bad).is_empty(),
            "a Deployment with a {what} passed the schema"
        );
    }
}

/// The hardening every warren container and pod has.
fn assert_hardened(what: &str, pod: &Value) {
    let pod_sc = &pod["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], true, "{what}");
    assert_eq!(pod_sc["seccompProfile"]["type"], "RuntimeDefault", "{what}");
    assert_eq!(pod["automountServiceAccountToken"], false, "{what}");
    for c in pod["containers"].as_array().expect("containers") {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    c["resources"][bound][resource].is_string(),
                    "{what}: no {resource} {bound}"
                );
            }
        }
        let from = c["envFrom"].to_string();
        assert!(from.contains("\"warren-config\""), "{what}: no ConfigMap");
        assert!(from.contains("\"warren-credentials\""), "{what}: no Secret");
    }
}

#[test]
fn kubernetes_runs_each_service_hardened_with_readiness_and_liveness() {
    let deployments = k8s_objects("Deployment");
    let names: BTreeSet<String> = deployments
        .iter()
        .map(|d| {
            d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let expected: BTreeSet<String> = services::ALL
        .iter()
        .map(|s| format!("warren-{s}"))
        .collect();
    assert_eq!(names, expected);
    for d in &deployments {
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let service = name.trim_start_matches("warren-");
        let pod = &d["spec"]["template"]["spec"];
        assert_hardened(name, pod);
        let c = &pod["containers"][0];
        assert_eq!(c["args"], json!(["run", service]), "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready", "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health", "{name}");
    }
    let jobs = k8s_objects("Job");
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0]["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["migrate"])
    );
    assert_hardened("migration Job", &jobs[0]["spec"]["template"]["spec"]);
    // A Service for each service with an HTTP API, on the named port.
    let services: BTreeSet<String> = k8s_objects("Service")
        .iter()
        .inspect(|s| assert_eq!(s["spec"]["ports"][0]["targetPort"], "http"))
        .map(|s| {
            s["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        services,
        ["warren-customers", "warren-inventory", "warren-orders"]
            .map(str::to_owned)
            .into()
    );
}

#[test]
fn kustomization_lists_every_manifest_but_the_example_secret() {
    let kustomization = yaml_docs("deploy/kubernetes/kustomization.yaml").remove(0);
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a path").to_owned())
        .collect();
    let on_disk: BTreeSet<String> = k8s_manifests()
        .into_keys()
        .filter(|f| !f.ends_with(".example.yaml"))
        .collect();
    assert_eq!(listed, on_disk);
    // The example Secret's placeholders must never overwrite the real one.
    let secrets = k8s_objects("Secret");
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0]["metadata"]["name"], "warren-credentials");
    // The operators' resources are examples outside the kustomization.
    assert!(listed.iter().all(|r| !r.starts_with("operators")));
    for file in ["rabbitmq-cluster.yaml", "postgres-cluster.yaml"] {
        let doc = yaml_docs(&format!("deploy/kubernetes/operators/{file}")).remove(0);
        assert!(
            doc["kind"].is_string() && doc["apiVersion"].is_string(),
            "{file}"
        );
    }
}

// ---- Grafana ----------------------------------------------------------

/// The metric names /metrics serves (with prometheus-client).
const METRICS: [&str; 7] = [
    "warren_consumer_events_total",
    "warren_dead_letters_total",
    "warren_relay_published_total",
    "warren_relay_confirm_seconds",
    "warren_consumer_batch_seconds",
    "warren_outbox_oldest_age_seconds",
    "warren_outbox_backlog",
];

#[test]
fn grafana_dashboard_queries_exactly_the_served_metrics() {
    let dashboard = read_json("deploy/grafana/dashboards/warren.json");
    let mut exprs: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            // A bare `warren_` is the stem of a regex over names (the
            // service variable's), not a name.
            if token.starts_with("warren_") && token != "warren_" {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| token.strip_suffix(s))
                    .unwrap_or(token);
                assert!(
                    METRICS.contains(&base) || METRICS.contains(&token),
                    "the dashboard queries {token}, which /metrics does not serve: {expr}"
                );
                used.insert(if METRICS.contains(&token) {
                    token
                } else {
                    base
                });
            }
        }
    }
    // Histograms are read through their buckets; the variable reads the
    // two counters by a regex of their own.
    for metric in METRICS {
        assert!(
            exprs.iter().any(|e| e.contains(metric)) || used.contains(metric),
            "the dashboard never shows {metric}"
        );
    }
    assert_eq!(dashboard["uid"], "warren-overview");
}
