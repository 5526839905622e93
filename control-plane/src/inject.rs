//! Sidecar injection: the one function that turns a pod template into a meshed one, shared by
//! `capmesh inject` (YAML files) and the admission webhook (`POST /inject`).
//!
//! It adds what `charts/capmesh-agent` renders for a pod — the `capmesh-proxy` sidecar with the
//! same flags, ports, probes, user and resources, the transparent-mode init container
//! (`capmesh-proxy init`), and the two Secret volumes — to a pod (`metadata` + `spec`) held as
//! JSON. It reads per-pod settings from `capmesh.io/*` annotations and never touches anything
//! else in the pod. A pod that already has a `capmesh-proxy` container is left as it is, so
//! injecting twice is injecting once.

use capmesh_api::{AgentName, TrustDomain};
use serde_json::{Map, Value, json};

mod flags;
mod spec;

pub use flags::{InjectFlags, WebhookInjectFlags};
use spec::{init_container, proxy_container, volumes};

/// The sidecar's container name (as in the agent chart); its presence means "already injected".
pub const PROXY_CONTAINER: &str = "capmesh-proxy";
/// The transparent-mode init container's name.
pub const INIT_CONTAINER: &str = "capmesh-init";
/// The volume holding the mesh trust bundle (`ca.pem`).
pub const CA_VOLUME: &str = "capmesh-ca";
/// The volume holding the bootstrap token (`token`).
pub const TOKEN_VOLUME: &str = "capmesh-bootstrap-token";
/// The proxy's user id; transparent mode exempts it from redirection.
pub const PROXY_UID: u32 = 1337;
/// `--outbound 127.0.0.1:<port>`: the agent calls the mesh here.
pub const OUTBOUND_PORT: u16 = 15001;
/// `--inbound 0.0.0.0:<port>`: the mesh calls the agent here (mutual TLS).
pub const INBOUND_PORT: u16 = 15006;
/// `--admin 0.0.0.0:<port>`: `/live`, `/ready`, `/metrics`.
pub const ADMIN_PORT: u16 = 15020;

/// The `capmesh.io/*` keys injection reads (annotations on the pod template; `inject` may
/// also be a label, which is what the webhook's selectors match).
pub mod keys {
    /// `enabled` (the webhook's selectors) or `disabled` (never inject this pod).
    pub const INJECT: &str = "capmesh.io/inject";
    /// Set to `"true"` on the pods injection changed.
    pub const INJECTED: &str = "capmesh.io/injected";
    /// The agent's mesh name (default: label `app.kubernetes.io/name`, then `app`, then the
    /// workload's name).
    pub const AGENT_NAME: &str = "capmesh.io/agent-name";
    /// The port the agent serves MCP on (default: the first container's first port, then 8080).
    pub const AGENT_PORT: &str = "capmesh.io/agent-port";
    /// The agent's MCP path (default `/mcp`).
    pub const AGENT_PATH: &str = "capmesh.io/agent-path";
    /// `"true"`: the agent only calls the mesh (`--agent-url none`).
    pub const CONSUMER_ONLY: &str = "capmesh.io/consumer-only";
    /// `--tags` (comma-separated).
    pub const TAGS: &str = "capmesh.io/tags";
    /// `--agent-version`.
    pub const VERSION: &str = "capmesh.io/version";
    /// `--capability`, one per whitespace-separated word.
    pub const CAPABILITIES: &str = "capmesh.io/capabilities";
    /// `--dependency`, one per whitespace-separated word.
    pub const DEPENDENCIES: &str = "capmesh.io/dependencies";
    /// `"false"`: no transparent-mode init container for this pod.
    pub const TRANSPARENT: &str = "capmesh.io/transparent";
    /// `capmesh-proxy init --skip-outbound-ports` (comma-separated).
    pub const SKIP_OUTBOUND_PORTS: &str = "capmesh.io/skip-outbound-ports";
    /// `capmesh-proxy init --skip-outbound-cidrs` (comma-separated).
    pub const SKIP_OUTBOUND_CIDRS: &str = "capmesh.io/skip-outbound-cidrs";
}

/// Mesh-wide injection settings: what every injected pod shares ([`InjectConfig::new`] gives
/// the agent chart's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The `capmesh-proxy` image (sidecar and init container).
    pub proxy_image: String,
    /// `imagePullPolicy` of both.
    pub proxy_pull_policy: String,
    /// `--control-plane`: the URL the proxies dial.
    pub proxy_control_plane: String,
    /// `--tls-mode` for inbound mesh traffic.
    pub proxy_tls_mode: String,
    /// `--log-format`.
    pub proxy_log_format: String,
    /// `RUST_LOG` of the proxy.
    pub proxy_log_level: String,
    /// `--propagate-headers` (empty: the flag is left out).
    pub proxy_propagate_headers: Vec<String>,
    /// The Secret with the trust bundle (key `ca.pem`), in the pod's namespace.
    pub ca_secret: String,
    /// The Secret with a bootstrap token (key `token`), in the pod's namespace.
    pub bootstrap_token_secret: String,
    /// `--trust-domain`.
    pub trust_domain: TrustDomain,
    /// Add the `capmesh-proxy init` container (iptables redirection).
    pub transparent: bool,
}

/// The proxy image this build of capmesh goes with.
pub fn default_proxy_image() -> String {
    format!(
        "ghcr.io/capmesh/capmesh-proxy:{}",
        env!("CARGO_PKG_VERSION")
    )
}

impl InjectConfig {
    /// The agent chart's defaults, in `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            proxy_image: default_proxy_image(),
            proxy_pull_policy: "IfNotPresent".to_owned(),
            proxy_control_plane: "https://capmesh-control-plane:8000".to_owned(),
            proxy_tls_mode: "strict".to_owned(),
            proxy_log_format: "json".to_owned(),
            proxy_log_level: "info".to_owned(),
            proxy_propagate_headers: Vec::new(),
            ca_secret: "capmesh-ca".to_owned(),
            bootstrap_token_secret: "capmesh-bootstrap-token".to_owned(),
            trust_domain,
            transparent: true,
        }
    }
}

/// Why a pod could not be injected. Each names the pod's key or field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// An annotation's value is not usable.
    #[error("annotation {key}: {value:?} {problem}")]
    BadAnnotation {
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong, and what to write instead.
        problem: String,
    },
    /// The agent's name (from wherever it came) is not a valid mesh name.
    #[error(
        "agent name {name:?} (from {source_of}) is not valid: {detail}; set the annotation {} on the pod template",
        keys::AGENT_NAME
    )]
    BadAgentName {
        /// The name.
        name: String,
        /// Where it came from.
        source_of: String,
        /// Why it is refused.
        detail: String,
    },
    /// Nothing to take the agent's name from.
    #[error(
        "no agent name: set the annotation {} (or the label app.kubernetes.io/name or app) on the pod template",
        keys::AGENT_NAME
    )]
    NoAgentName,
    /// The object does not have the shape of a pod or workload.
    #[error("{path} {problem}")]
    Shape {
        /// Where (`spec.template.spec.containers`).
        path: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The pod already uses a name the injection needs.
    #[error(
        "the pod already has {what} named {name:?}, which capmesh injection adds: rename yours"
    )]
    NameTaken {
        /// `a volume`, `an init container`.
        what: &'static str,
        /// The name.
        name: &'static str,
    },
}

/// What injection did to one pod or object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar (and the rest) was added.
    Injected,
    /// It already has a `capmesh-proxy` container: unchanged.
    AlreadyInjected,
    /// `capmesh.io/inject: disabled`: unchanged.
    Disabled,
    /// Not a Pod, Deployment, StatefulSet or DaemonSet: unchanged.
    NotAWorkload,
}

/// Injects a Pod, Deployment, StatefulSet or DaemonSet (its pod template); anything else is
/// [`Outcome::NotAWorkload`]. The workload's name is the agent's name when no annotation or
/// label gives one.
pub fn inject_object(object: &mut Value, config: &InjectConfig) -> Result<Outcome, InjectError> {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    match kind {
        "Pod" => {
            let fallback = name.or_else(|| generate_name(object));
            inject_pod(object, fallback.as_deref(), config, "")
        }
        "Deployment" | "StatefulSet" | "DaemonSet" => {
            let Some(template) = object.pointer_mut("/spec/template") else {
                return Err(InjectError::Shape {
                    path: "spec.template".into(),
                    problem: "is missing: a workload needs a pod template",
                });
            };
            inject_pod(template, name.as_deref(), config, "spec.template.")
        }
        _ => Ok(Outcome::NotAWorkload),
    }
}

/// A pod's `generateName` without its trailing `-` (pods made by controllers have no name yet).
pub fn generate_name(pod: &Value) -> Option<String> {
    pod.pointer("/metadata/generateName")
        .and_then(Value::as_str)
        .map(|g| g.trim_end_matches('-').to_owned())
        .filter(|g| !g.is_empty())
}

/// Per-pod settings read from its annotations and containers.
#[derive(Debug)]
struct PodSettings {
    agent_name: String,
    agent_url: String,
    tags: Option<String>,
    version: Option<String>,
    capabilities: Vec<String>,
    dependencies: Vec<String>,
    transparent: bool,
    skip_outbound_ports: Option<String>,
    skip_outbound_cidrs: Option<String>,
}

fn string_map(meta: Option<&Value>, field: &str) -> Map<String, Value> {
    meta.and_then(|m| m.get(field))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn get<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn flag_bool(map: &Map<String, Value>, key: &'static str) -> Result<Option<bool>, InjectError> {
    match get(map, key) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(InjectError::BadAnnotation {
            key,
            value: other.to_owned(),
            problem: "is not a boolean: write \"true\" or \"false\"".into(),
        }),
    }
}

fn words(map: &Map<String, Value>, key: &str) -> Vec<String> {
    get(map, key)
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A comma-separated list whose items all pass `ok`.
fn list(
    map: &Map<String, Value>,
    key: &'static str,
    ok: impl Fn(&str) -> bool,
    expected: &str,
) -> Result<Option<String>, InjectError> {
    let Some(value) = get(map, key) else {
        return Ok(None);
    };
    if value.split(',').all(|item| ok(item.trim())) {
        Ok(Some(
            value
                .split(',')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(","),
        ))
    } else {
        Err(InjectError::BadAnnotation {
            key,
            value: value.to_owned(),
            problem: format!("is not a comma-separated list of {expected}"),
        })
    }
}

fn is_port(s: &str) -> bool {
    s.parse::<u16>().is_ok_and(|p| p > 0)
}

/// An IPv4 address or network (`capmesh-proxy init` writes iptables rules: IPv4 only).
fn is_cidr(s: &str) -> bool {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    addr.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
}

fn settings(
    annotations: &Map<String, Value>,
    labels: &Map<String, Value>,
    spec: &Value,
    fallback_name: Option<&str>,
    config: &InjectConfig,
) -> Result<PodSettings, InjectError> {
    let (name, source_of) = if let Some(n) = get(annotations, keys::AGENT_NAME) {
        (n, format!("annotation {}", keys::AGENT_NAME))
    } else if let Some(n) = get(labels, "app.kubernetes.io/name") {
        (n, "label app.kubernetes.io/name".to_owned())
    } else if let Some(n) = get(labels, "app") {
        (n, "label app".to_owned())
    } else if let Some(n) = fallback_name {
        (n, "the workload's name".to_owned())
    } else {
        return Err(InjectError::NoAgentName);
    };
    let agent_name = AgentName::new(name)
        .map_err(|e| InjectError::BadAgentName {
            name: name.to_owned(),
            source_of,
            detail: e.to_string(),
        })?
        .as_str()
        .to_owned();

    let port = match get(annotations, keys::AGENT_PORT) {
        Some(p) if is_port(p) => p.to_owned(),
        Some(p) => {
            return Err(InjectError::BadAnnotation {
                key: keys::AGENT_PORT,
                value: p.to_owned(),
                problem: "is not a port: use a number from 1 to 65535".into(),
            });
        }
        None => spec
            .pointer("/containers/0/ports/0/containerPort")
            .and_then(Value::as_u64)
            .map_or_else(|| "8080".to_owned(), |p| p.to_string()),
    };
    let path = get(annotations, keys::AGENT_PATH).unwrap_or("/mcp");
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        return Err(InjectError::BadAnnotation {
            key: keys::AGENT_PATH,
            value: path.to_owned(),
            problem: "is not a URL path: start it with '/' (for example /mcp)".into(),
        });
    }
    let agent_url = if flag_bool(annotations, keys::CONSUMER_ONLY)? == Some(true) {
        "none".to_owned()
    } else {
        format!("http://127.0.0.1:{port}{path}")
    };
    Ok(PodSettings {
        agent_name,
        agent_url,
        tags: get(annotations, keys::TAGS).map(str::to_owned),
        version: get(annotations, keys::VERSION).map(str::to_owned),
        capabilities: words(annotations, keys::CAPABILITIES),
        dependencies: words(annotations, keys::DEPENDENCIES),
        transparent: flag_bool(annotations, keys::TRANSPARENT)?.unwrap_or(config.transparent),
        skip_outbound_ports: list(annotations, keys::SKIP_OUTBOUND_PORTS, is_port, "ports")?,
        skip_outbound_cidrs: list(
            annotations,
            keys::SKIP_OUTBOUND_CIDRS,
            is_cidr,
            "IPv4 addresses or networks (10.0.0.0/8)",
        )?,
    })
}

fn has_container(spec: &Value, list: &str, name: &str) -> bool {
    spec.get(list)
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["name"] == name))
}

/// Whether `capmesh.io/inject` (label or annotation) says `disabled` (or `false`).
fn disabled(annotations: &Map<String, Value>, labels: &Map<String, Value>) -> bool {
    [get(annotations, keys::INJECT), get(labels, keys::INJECT)]
        .into_iter()
        .flatten()
        .any(|v| v == "disabled" || v == "false")
}

/// Injects one pod template: `pod` holds `metadata` and `spec` (a Pod, or a workload's
/// `spec.template`). `fallback_name` is the agent name when no annotation or label gives one;
/// `at` prefixes error locations (`spec.template.`).
pub fn inject_pod(
    pod: &mut Value,
    fallback_name: Option<&str>,
    config: &InjectConfig,
    at: &str,
) -> Result<Outcome, InjectError> {
    let shape = |path: &str, problem| InjectError::Shape {
        path: format!("{at}{path}"),
        problem,
    };
    let Some(pod_obj) = pod.as_object() else {
        return Err(shape("(the pod)", "is not a mapping"));
    };
    let meta = pod_obj.get("metadata");
    if meta.is_some_and(|m| !m.is_object() && !m.is_null()) {
        return Err(shape("metadata", "is not a mapping"));
    }
    let annotations = string_map(meta, "annotations");
    let labels = string_map(meta, "labels");
    if disabled(&annotations, &labels) {
        return Ok(Outcome::Disabled);
    }
    let Some(spec) = pod_obj.get("spec").filter(|s| s.is_object()) else {
        return Err(shape("spec", "is missing or not a mapping"));
    };
    if !spec.get("containers").is_some_and(Value::is_array) {
        return Err(shape("spec.containers", "is missing or not a list"));
    }
    for list in ["initContainers", "volumes"] {
        if spec
            .get(list)
            .is_some_and(|l| !l.is_array() && !l.is_null())
        {
            return Err(shape(&format!("spec.{list}"), "is not a list"));
        }
    }
    if has_container(spec, "containers", PROXY_CONTAINER)
        || has_container(spec, "initContainers", PROXY_CONTAINER)
    {
        return Ok(Outcome::AlreadyInjected);
    }
    let s = settings(&annotations, &labels, spec, fallback_name, config)?;
    if has_container(spec, "initContainers", INIT_CONTAINER)
        || has_container(spec, "containers", INIT_CONTAINER)
    {
        return Err(InjectError::NameTaken {
            what: "a container",
            name: INIT_CONTAINER,
        });
    }
    for volume in [CA_VOLUME, TOKEN_VOLUME] {
        if has_container(spec, "volumes", volume) {
            return Err(InjectError::NameTaken {
                what: "a volume",
                name: volume,
            });
        }
    }
    let first_container = spec
        .pointer("/containers/0/name")
        .and_then(Value::as_str)
        .map(str::to_owned);

    // Checked above: pod and spec are mappings, the lists are lists or absent.
    let Some(pod_obj) = pod.as_object_mut() else {
        return Err(shape("(the pod)", "is not a mapping"));
    };
    let Some(spec) = pod_obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return Err(shape("spec", "is missing or not a mapping"));
    };
    push(spec, "containers", proxy_container(&s, config));
    if s.transparent {
        // Last among the init containers: the ones already there run before the redirection
        // exists, so their own traffic is not sent to a proxy that is not running yet.
        push(spec, "initContainers", init_container(&s, config));
    }
    for volume in volumes(config) {
        push(spec, "volumes", volume);
    }

    let meta = pod_obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if meta.is_null() {
        *meta = Value::Object(Map::new());
    }
    let Some(meta) = meta.as_object_mut() else {
        return Err(shape("metadata", "is not a mapping"));
    };
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()));
    if !annotations.is_object() {
        *annotations = Value::Object(Map::new());
    }
    if let Some(a) = annotations.as_object_mut() {
        a.insert(keys::INJECTED.to_owned(), json!("true"));
        // The same scrape annotations as the agent chart; the pod's own win.
        let admin = ADMIN_PORT.to_string();
        for (k, v) in [
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", admin.as_str()),
            ("prometheus.io/path", "/metrics"),
        ] {
            a.entry(k).or_insert_with(|| json!(v));
        }
        // `kubectl logs` and `exec` keep going to the agent, not the sidecar.
        if let Some(first) = first_container {
            a.entry("kubectl.kubernetes.io/default-container")
                .or_insert_with(|| json!(first));
        }
    }
    Ok(Outcome::Injected)
}

fn push(spec: &mut Map<String, Value>, list: &str, item: Value) {
    let entry = spec.entry(list).or_insert_with(|| Value::Array(Vec::new()));
    if !entry.is_array() {
        *entry = Value::Array(Vec::new());
    }
    if let Some(items) = entry.as_array_mut() {
        items.push(item);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config() -> InjectConfig {
        InjectConfig::new(TrustDomain::new("capmesh.local").unwrap())
    }

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "weather"},
            "spec": {"selector": {"matchLabels": {"app": "weather"}},
                "template": {
                    "metadata": {"labels": {"app": "weather"},
                        "annotations": {"capmesh.io/agent-port": "9001"}},
                    "spec": {"containers": [{"name": "agent", "image": "weather:1"}]}}}
        })
    }

    fn args_of(c: &Value) -> Vec<String> {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn injects_the_sidecar_init_container_and_volumes_once() {
        let mut d = deployment();
        let config = config();
        assert_eq!(inject_object(&mut d, &config), Ok(Outcome::Injected));
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(spec["containers"][1]["name"], PROXY_CONTAINER);
        let a = args_of(&spec["containers"][1]);
        let pos = a.iter().position(|x| x == "--agent-url").unwrap();
        assert_eq!(a[pos + 1], "http://127.0.0.1:9001/mcp");
        assert_eq!(a[1], "weather", "the agent name comes from the app label");
        assert_eq!(spec["initContainers"][0]["name"], INIT_CONTAINER);
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 2);
        let ann = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(ann[keys::INJECTED], "true");
        assert_eq!(ann["kubectl.kubernetes.io/default-container"], "agent");
        let once = d.clone();
        assert_eq!(inject_object(&mut d, &config), Ok(Outcome::AlreadyInjected));
        assert_eq!(d, once);
    }

    #[test]
    fn disabled_pods_and_other_kinds_are_left_alone() {
        let mut d = deployment();
        d["spec"]["template"]["metadata"]["labels"][keys::INJECT] = json!("disabled");
        let before = d.clone();
        assert_eq!(inject_object(&mut d, &config()), Ok(Outcome::Disabled));
        assert_eq!(d, before);
        let mut svc = json!({"kind": "Service", "metadata": {"name": "x"}});
        assert_eq!(
            inject_object(&mut svc, &config()),
            Ok(Outcome::NotAWorkload)
        );
    }

    #[test]
    fn bad_annotations_name_the_key_and_the_fix() {
        let mut d = deployment();
        d["spec"]["template"]["metadata"]["annotations"][keys::AGENT_PORT] = json!("http");
        let err = inject_object(&mut d, &config()).unwrap_err().to_string();
        assert!(
            err.contains("capmesh.io/agent-port") && err.contains("1 to 65535"),
            "{err}"
        );
        let mut d = deployment();
        d["spec"]["template"]["metadata"]["labels"]["app"] = json!("Weather_App");
        let err = inject_object(&mut d, &config()).unwrap_err().to_string();
        assert!(
            err.contains("Weather_App") && err.contains("label app"),
            "{err}"
        );
        let mut d = deployment();
        d["spec"]["template"]["spec"]["containers"] = json!("agent");
        let err = inject_object(&mut d, &config()).unwrap_err().to_string();
        assert_eq!(
            err,
            "spec.template.spec.containers is missing or not a list"
        );
    }
}
