//! `capmesh inject`, run as the real binary on YAML streams: what it adds, what it leaves
//! exactly as written, idempotence, errors that name the document, and flags parallel to the
//! admission webhook's. (The pod specs it writes are validated against the Kubernetes schemas
//! and compared with the webhook's patch in `tests/tests/inject.rs`.)

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::capmesh_bin;
use serde_json::Value;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn inject(input: &str, args: &[&str]) -> Out {
    let mut child = Command::new(capmesh_bin())
        .arg("inject")
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn pod_spec(object: &Value) -> &Value {
    if object["kind"] == "Pod" {
        &object["spec"]
    } else {
        &object["spec"]["template"]["spec"]
    }
}

fn names(spec: &Value, list: &str) -> Vec<String> {
    spec[list]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn flag(container: &Value, name: &str) -> String {
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = args
        .iter()
        .position(|a| *a == name)
        .unwrap_or_else(|| panic!("no {name} in {args:?}"));
    args[at + 1].to_owned()
}

const SERVICE: &str = "\
# The agent's Service: kept exactly, comments and all.
apiVersion: v1
kind: Service
metadata:
  name: weather   # same name as the Deployment
spec:
  selector: {app: weather}
  ports: [{port: 80, targetPort: 9001}]
";

const CONFIG_MAP: &str = "\
--- # settings
apiVersion: v1
kind: ConfigMap
metadata:
  name: weather-settings
data:
  config.yaml: |
    # not a YAML document marker inside a block scalar
    units: metric
    cities: [paris, lima]
";

const DEPLOYMENT: &str = "\
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: weather
spec:
  replicas: 2
  selector:
    matchLabels: {app: weather}
  template:
    metadata:
      labels: {app: weather}
      annotations:
        capmesh.io/tags: fast,eu
        capmesh.io/dependencies: geo fast_llm=llm:+claude,-beta
    spec:
      initContainers:
        - name: migrate
          image: weather:1
          args: [migrate]
      containers:
        - name: agent
          image: weather:1
          ports: [{containerPort: 9001}]
";

const STATEFUL_SET: &str = "\
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: ledger}
spec:
  serviceName: ledger
  selector: {matchLabels: {tier: db}}
  template:
    metadata: {labels: {tier: db}}
    spec:
      containers: [{name: agent, image: ledger:2}]
";

const DAEMON_SET: &str = "\
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-tools}
spec:
  selector: {matchLabels: {app.kubernetes.io/name: node-tools}}
  template:
    metadata:
      labels: {app.kubernetes.io/name: node-tools}
      annotations: {capmesh.io/transparent: \"false\", capmesh.io/consumer-only: \"true\"}
    spec:
      containers: [{name: agent, image: tools:3}]
";

const POD: &str = "\
---
apiVersion: v1
kind: Pod
metadata:
  name: notebook-7
  annotations:
    capmesh.io/agent-name: notebook
    capmesh.io/agent-port: \"8888\"
    capmesh.io/agent-path: /api/mcp
    capmesh.io/skip-outbound-cidrs: 10.0.0.0/8, 192.168.1.1
spec:
  containers: [{name: jupyter, image: notebook:1}]
";

const DISABLED: &str = "\
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy}
spec:
  selector: {matchLabels: {app: legacy}}
  template:
    metadata:
      labels: {app: legacy, capmesh.io/inject: disabled}
    spec:
      containers: [{name: legacy, image: legacy:1}]
";

fn stream() -> String {
    [
        SERVICE,
        CONFIG_MAP,
        DEPLOYMENT,
        STATEFUL_SET,
        DAEMON_SET,
        POD,
        DISABLED,
    ]
    .concat()
}

#[test]
fn injects_every_workload_and_prints_everything_else_as_written() {
    let out = inject(
        &stream(),
        &["--proxy-image", "registry.example/capmesh-proxy:9.9.9"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Documents it does not change come out byte for byte.
    for kept in [SERVICE, CONFIG_MAP, DISABLED] {
        assert!(
            out.stdout.contains(kept),
            "not kept as written:\n{kept}\n--- in ---\n{}",
            out.stdout
        );
    }
    assert!(out.stdout.starts_with(SERVICE));
    let docs = documents(&out.stdout);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Service",
            "ConfigMap",
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "Pod",
            "Deployment"
        ]
    );
    // The ConfigMap's block scalar survived.
    assert_eq!(
        docs[1]["data"]["config.yaml"],
        "# not a YAML document marker inside a block scalar\nunits: metric\ncities: [paris, lima]\n"
    );

    // Deployment: the sidecar after the agent, the init container after the pod's own.
    let spec = pod_spec(&docs[2]);
    assert_eq!(names(spec, "containers"), ["agent", "capmesh-proxy"]);
    assert_eq!(names(spec, "initContainers"), ["migrate", "capmesh-init"]);
    assert_eq!(
        names(spec, "volumes"),
        ["capmesh-ca", "capmesh-bootstrap-token"]
    );
    let proxy = &spec["containers"][1];
    assert_eq!(proxy["image"], "registry.example/capmesh-proxy:9.9.9");
    assert_eq!(flag(proxy, "--agent-name"), "weather");
    assert_eq!(flag(proxy, "--agent-url"), "http://127.0.0.1:9001/mcp");
    assert_eq!(flag(proxy, "--tags"), "fast,eu");
    assert_eq!(flag(proxy, "--namespace"), "$(POD_NAMESPACE)");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    let deps: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .windows(2)
        .filter(|w| w[0] == "--dependency")
        .map(|w| w[1].as_str().unwrap())
        .collect();
    assert_eq!(deps, ["geo", "fast_llm=llm:+claude,-beta"]);
    let init = &spec["initContainers"][1];
    assert_eq!(init["args"][0], "init");
    assert_eq!(flag(init, "--proxy-uid"), "1337");
    assert_eq!(flag(init, "--outbound-port"), "15001");
    assert_eq!(flag(init, "--inbound-port"), "15006");
    assert_eq!(flag(init, "--skip-inbound-ports"), "15020");
    let ann = &docs[2]["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["capmesh.io/injected"], "true");
    assert_eq!(ann["kubectl.kubernetes.io/default-container"], "agent");
    assert_eq!(ann["capmesh.io/tags"], "fast,eu", "the pod's own stay");
    // Its own fields are untouched.
    assert_eq!(docs[2]["spec"]["replicas"], 2);

    // StatefulSet: no name label, so the workload's name; the default port.
    let spec = pod_spec(&docs[3]);
    let proxy = &spec["containers"][1];
    assert_eq!(flag(proxy, "--agent-name"), "ledger");
    assert_eq!(flag(proxy, "--agent-url"), "http://127.0.0.1:8080/mcp");

    // DaemonSet: consumer only, no init container for this pod.
    let spec = pod_spec(&docs[4]);
    assert_eq!(flag(&spec["containers"][1], "--agent-name"), "node-tools");
    assert_eq!(flag(&spec["containers"][1], "--agent-url"), "none");
    assert!(spec["initContainers"].is_null(), "{spec}");

    // Pod: every setting from its annotations.
    let spec = pod_spec(&docs[5]);
    let proxy = &spec["containers"][1];
    assert_eq!(flag(proxy, "--agent-name"), "notebook");
    assert_eq!(flag(proxy, "--agent-url"), "http://127.0.0.1:8888/api/mcp");
    assert_eq!(
        flag(&spec["initContainers"][0], "--skip-outbound-cidrs"),
        "10.0.0.0/8,192.168.1.1"
    );

    // What happened to each workload, on stderr.
    for line in [
        "Deployment/weather: injected",
        "StatefulSet/ledger: injected",
        "DaemonSet/node-tools: injected",
        "Pod/notebook-7: injected",
        "Deployment/legacy: capmesh.io/inject: disabled",
    ] {
        assert!(out.stderr.contains(line), "{line} not in:\n{}", out.stderr);
    }
}

#[test]
fn injecting_twice_is_injecting_once() {
    let once = inject(&stream(), &[]);
    assert_eq!(once.code, 0, "{}", once.stderr);
    let twice = inject(&once.stdout, &[]);
    assert_eq!(twice.code, 0, "{}", twice.stderr);
    assert_eq!(twice.stdout, once.stdout);
    assert!(
        twice
            .stderr
            .contains("Deployment/weather: already has the capmesh-proxy sidecar"),
        "{}",
        twice.stderr
    );
    // kubectl's `kind: List` too.
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p, labels: {app: p}}\n  spec:\n    containers: [{name: a, image: a}]\n";
    let once = inject(list, &[]);
    assert_eq!(once.code, 0, "{}", once.stderr);
    let docs = documents(&once.stdout);
    assert_eq!(
        names(&docs[0]["items"][0]["spec"], "containers"),
        ["a", "capmesh-proxy"]
    );
    assert_eq!(inject(&once.stdout, &[]).stdout, once.stdout);
}

#[test]
fn bad_input_names_the_document_and_prints_nothing() {
    // The third document is not YAML.
    let broken = format!("{SERVICE}{CONFIG_MAP}---\nkind: Deployment\nmetadata: {{name: [x\n");
    let out = inject(&broken, &[]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let first_line = SERVICE.lines().count() + CONFIG_MAP.lines().count() + 1;
    assert!(
        out.stderr.contains(&format!(
            "document 3 (from line {first_line}) is not valid YAML"
        )),
        "{}",
        out.stderr
    );

    // A workload whose settings cannot work.
    let bad_port = DEPLOYMENT.replace(
        "capmesh.io/tags: fast,eu",
        "capmesh.io/agent-port: \"http\"",
    );
    let out = inject(&format!("{SERVICE}{bad_port}"), &[]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.is_empty());
    for word in [
        "document 2",
        "Deployment/weather",
        "capmesh.io/agent-port",
        "1 to 65535",
    ] {
        assert!(out.stderr.contains(word), "{word}: {}", out.stderr);
    }
    // Said once, not once per level of the error chain.
    assert_eq!(
        out.stderr.matches("1 to 65535").count(),
        1,
        "{}",
        out.stderr
    );
    let bad_name = DEPLOYMENT.replace("{app: weather}", "{app: Weather_Agent}");
    let out = inject(&bad_name, &[]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("\"Weather_Agent\" (from label app)")
            && out.stderr.contains("capmesh.io/agent-name"),
        "{}",
        out.stderr
    );

    // A bad flag value is a usage error.
    let out = inject(SERVICE, &["--proxy-tls-mode", "loose"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--proxy-tls-mode"), "{}", out.stderr);

    // A missing file names the file and says it is missing (not that it is not UTF-8).
    let out = inject("", &["-f", "/nonexistent/app.yaml"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("/nonexistent/app.yaml")
            && out.stderr.contains("no such file")
            && !out.stderr.contains("UTF-8"),
        "{}",
        out.stderr
    );
}

#[test]
fn output_json_prints_json_that_says_the_same() {
    let yaml = inject(&stream(), &[]);
    assert_eq!(yaml.code, 0, "{}", yaml.stderr);
    let out = inject(&stream(), &["-o", "json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("-o json printed no JSON ({e}):\n{}", out.stdout));
    // Several documents: one List holding them, in order, with the same content as the YAML.
    assert_eq!(json["kind"], "List", "{json}");
    let items = json["items"].as_array().unwrap();
    assert_eq!(items, &documents(&yaml.stdout));
    // One document: that object itself.
    let out = inject(DEPLOYMENT, &["--output", "json"]);
    let one: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(one["kind"], "Deployment", "{one}");
    assert!(
        names(pod_spec(&one), "containers").contains(&"capmesh-proxy".to_owned()),
        "{one}"
    );
}

/// The `--X` flags of `help`.
fn long_flags(help: &str) -> Vec<String> {
    help.split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches([',', '.', ')', '='])
                .split('=')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn the_webhook_takes_the_same_settings_prefixed_inject() {
    let help = |args: &[&str]| {
        let out = Command::new(capmesh_bin())
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let inject_help = help(&["inject", "--help"]);
    assert!(inject_help.contains("Examples:\n  capmesh inject"));
    let cp_flags = long_flags(&help(&["control-plane", "--help"]));
    let settings: Vec<String> = long_flags(&inject_help)
        .into_iter()
        .filter(|f| f.starts_with("--proxy-") || f.ends_with("-secret") || f == "--transparent")
        .collect();
    assert!(settings.len() >= 10, "{settings:?}");
    for flag in &settings {
        let webhook = format!("--inject-{}", &flag[2..]);
        assert!(
            cp_flags.contains(&webhook),
            "capmesh inject {flag} has no {webhook} in capmesh-control-plane"
        );
    }
    // The trust domain is the control plane's own.
    assert!(inject_help.contains("--trust-domain") && cp_flags.contains(&"--trust-domain".into()));
}
