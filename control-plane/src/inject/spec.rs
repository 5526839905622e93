//! What injection adds to a pod, as Kubernetes JSON: the `capmesh-proxy` sidecar, the
//! `capmesh-init` container and the two Secret volumes. Keep them equal to
//! `charts/capmesh-agent`'s `proxyContainer`, `initContainer` and `proxyVolumes` with the
//! chart's defaults (`tests/tests/inject.rs` compares them).

use serde_json::{Value, json};

use super::{
    ADMIN_PORT, CA_VOLUME, INBOUND_PORT, INIT_CONTAINER, InjectConfig, OUTBOUND_PORT,
    PROXY_CONTAINER, PROXY_UID, PodSettings, TOKEN_VOLUME,
};

fn args(pairs: &[(&str, &str)]) -> Vec<Value> {
    pairs
        .iter()
        .flat_map(|(flag, value)| [json!(flag), json!(value)])
        .collect()
}

/// The `capmesh-proxy` container: what `capmesh-agent.proxyContainer` renders with the chart's
/// defaults (the mesh namespace comes from the downward API, so one spec fits every namespace).
pub(super) fn proxy_container(s: &PodSettings, c: &InjectConfig) -> Value {
    let advertise = format!("$(POD_IP):{INBOUND_PORT}");
    let outbound = format!("127.0.0.1:{OUTBOUND_PORT}");
    let inbound = format!("0.0.0.0:{INBOUND_PORT}");
    let admin = format!("0.0.0.0:{ADMIN_PORT}");
    let trust_domain = c.trust_domain.to_string();
    let mut a = args(&[
        ("--agent-name", &s.agent_name),
        ("--namespace", "$(POD_NAMESPACE)"),
        ("--trust-domain", &trust_domain),
        ("--agent-url", &s.agent_url),
        ("--control-plane", &c.proxy_control_plane),
        ("--control-plane-ca", "/etc/capmesh/ca/ca.pem"),
        ("--bootstrap-token-file", "/etc/capmesh/bootstrap/token"),
        ("--advertise", &advertise),
        ("--proxy-id", "$(POD_NAME)"),
        ("--outbound", &outbound),
        ("--inbound", &inbound),
        ("--admin", &admin),
        ("--tls-mode", &c.proxy_tls_mode),
    ]);
    if let Some(tags) = &s.tags {
        a.extend(args(&[("--tags", tags)]));
    }
    if let Some(version) = &s.version {
        a.extend(args(&[("--agent-version", version)]));
    }
    for cap in &s.capabilities {
        a.extend(args(&[("--capability", cap)]));
    }
    for dep in &s.dependencies {
        a.extend(args(&[("--dependency", dep)]));
    }
    if !c.proxy_propagate_headers.is_empty() {
        a.extend(args(&[(
            "--propagate-headers",
            &c.proxy_propagate_headers.join(","),
        )]));
    }
    a.extend(args(&[("--log-format", &c.proxy_log_format)]));
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    json!({
        "name": PROXY_CONTAINER,
        "image": c.proxy_image,
        "imagePullPolicy": c.proxy_pull_policy,
        "args": a,
        "env": [
            field("POD_IP", "status.podIP"),
            field("POD_NAME", "metadata.name"),
            field("POD_NAMESPACE", "metadata.namespace"),
            {"name": "RUST_LOG", "value": c.proxy_log_level},
        ],
        "ports": [
            {"name": "mesh", "containerPort": INBOUND_PORT, "protocol": "TCP"},
            {"name": "proxy-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": "proxy-admin"},
            "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "proxy-admin"},
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "50m", "memory": "32Mi"},
            "limits": {"cpu": "1", "memory": "128Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
        },
        "volumeMounts": [
            {"name": CA_VOLUME, "mountPath": "/etc/capmesh/ca", "readOnly": true},
            {"name": TOKEN_VOLUME, "mountPath": "/etc/capmesh/bootstrap", "readOnly": true},
        ],
    })
}

/// The transparent-mode init container (`capmesh-agent.initContainer` with the defaults).
pub(super) fn init_container(s: &PodSettings, c: &InjectConfig) -> Value {
    let uid = PROXY_UID.to_string();
    let outbound = OUTBOUND_PORT.to_string();
    let inbound = INBOUND_PORT.to_string();
    let admin = ADMIN_PORT.to_string();
    let mut a = vec![json!("init")];
    a.extend(args(&[
        ("--proxy-uid", &uid),
        ("--outbound-port", &outbound),
        ("--inbound-port", &inbound),
        ("--skip-inbound-ports", &admin),
    ]));
    if let Some(ports) = &s.skip_outbound_ports {
        a.extend(args(&[("--skip-outbound-ports", ports)]));
    }
    if let Some(cidrs) = &s.skip_outbound_cidrs {
        a.extend(args(&[("--skip-outbound-cidrs", cidrs)]));
    }
    json!({
        "name": INIT_CONTAINER,
        "image": c.proxy_image,
        "imagePullPolicy": c.proxy_pull_policy,
        "args": a,
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "32Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": false,
            "runAsUser": 0,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    })
}

pub(super) fn volumes(c: &InjectConfig) -> [Value; 2] {
    // 0444: the proxy runs as 1337 and only reads them.
    let mode = 0o444;
    [
        json!({"name": CA_VOLUME, "secret": {
            "secretName": c.ca_secret, "defaultMode": mode,
            "items": [{"key": "ca.pem", "path": "ca.pem"}]}}),
        json!({"name": TOKEN_VOLUME, "secret": {
            "secretName": c.bootstrap_token_secret, "defaultMode": mode,
            "items": [{"key": "token", "path": "token"}]}}),
    ]
}
