//! Sidecar injection, end to end: `capmesh inject` (the real binary) and the admission webhook
//! of a real `capmesh-control-plane` (over TLS, AdmissionReview v1) given the same Deployment
//! and the same settings must produce the same pod spec, and both must validate against the
//! Kubernetes 1.30 schemas. The webhook's JSON Patch is applied with PyPI `jsonpatch`, as the
//! API server would apply it; `tests/python/inject.py` (in the charts venv) drives both sides
//! and this file asserts on its report. The injected sidecar is also compared with the agent
//! chart's, and its arguments are run through the real `capmesh-proxy` parser. The webhook
//! serves the certificate the control-plane chart generates, checked against the caBundle of
//! the chart's MutatingWebhookConfiguration for the Service's DNS name.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use capmesh_tests::python::repo_root;
use capmesh_tests::{ControlPlane, workspace_bin};
use serde_json::{Value, json};

const NAMESPACE: &str = "travel";

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: weather
  namespace: travel
  labels: {app: weather}
spec:
  replicas: 2
  selector:
    matchLabels: {app: weather}
  template:
    metadata:
      labels: {app: weather, capmesh.io/inject: enabled}
      annotations:
        capmesh.io/version: 1.4.0
        capmesh.io/dependencies: geo
    spec:
      securityContext:
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: agent
          image: registry.example/weather:1.4.0
          ports:
            - {name: mcp, containerPort: 9001, protocol: TCP}
          resources:
            requests: {cpu: 50m, memory: 64Mi}
";

/// The other kinds `capmesh inject` handles, with documents it must leave alone.
const STREAM: &str = "\
apiVersion: v1
kind: Service
metadata: {name: ledger}
spec:
  clusterIP: None
  selector: {app: ledger}
  ports: [{port: 9001}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: ledger}
spec:
  serviceName: ledger
  selector: {matchLabels: {app: ledger}}
  template:
    metadata: {labels: {app: ledger}}
    spec:
      containers: [{name: agent, image: ledger:2, ports: [{containerPort: 9001}]}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-tools}
spec:
  selector: {matchLabels: {app: node-tools}}
  template:
    metadata:
      labels: {app: node-tools}
      annotations: {capmesh.io/consumer-only: \"true\", capmesh.io/transparent: \"false\"}
    spec:
      containers: [{name: agent, image: tools:3}]
---
apiVersion: v1
kind: Pod
metadata:
  name: notebook
  annotations: {capmesh.io/agent-port: \"8888\", capmesh.io/skip-outbound-ports: \"5432\"}
spec:
  containers: [{name: jupyter, image: notebook:1}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {units: metric}
";

/// The same settings for both sides: `capmesh inject --X` and `capmesh-control-plane --inject-X`.
const SETTINGS: [(&str, &str); 4] = [
    (
        "proxy-image",
        "registry.example/capmesh/capmesh-proxy:1.2.3",
    ),
    (
        "proxy-control-plane",
        "https://capmesh-control-plane.capmesh.svc:8000",
    ),
    ("proxy-propagate-headers", "x-tenant-id,x-request-*"),
    ("ca-secret", "mesh-ca"),
];

fn flags(prefix: &str) -> Vec<String> {
    SETTINGS
        .iter()
        .flat_map(|(k, v)| [format!("--{prefix}{k}"), (*v).to_owned()])
        .collect()
}

/// The charts venv's python (made by `charts.py --setup-only`, shared with the chart tests).
fn charts_python() -> String {
    let out = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(repo_root().join("tests/python/charts.py"))
        .arg("--setup-only")
        .stdin(Stdio::null())
        .output()
        .expect("python3 is needed (apt-get install -y python3 python3-venv)");
    assert!(
        out.status.success(),
        "the charts venv could not be set up:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Renders the control-plane chart (Helm's engine) and writes its webhook certificate, key
/// and the MutatingWebhookConfiguration's caBundle into `dir`.
fn chart_webhook_certificate(python: &str, dir: &std::path::Path) -> Value {
    let out = Command::new(python)
        .arg(repo_root().join("tests/python/inject.py"))
        .arg("--render-webhook")
        .arg(dir)
        .arg("--namespace")
        .arg("capmesh")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rendering the control-plane chart's webhook failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn report() -> Value {
    let capmesh = workspace_bin("capmesh").expect("build capmesh first (cargo build -p capmesh)");
    let cp_bin = workspace_bin("capmesh-control-plane")
        .expect("build capmesh-control-plane first (cargo build -p capmesh-control-plane)");
    let python = tokio::task::spawn_blocking(charts_python).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The control plane serves the webhook with the certificate the chart generates, and the
    // client checks it as the API server does: against the caBundle, for the Service's name.
    let webhook = chart_webhook_certificate(&python, dir.path());
    assert_eq!(
        webhook["bundles_equal"], true,
        "the caBundle is the CA in the webhook Secret: {webhook}"
    );
    // Port 0: the control plane reports the port it bound.
    let mut cp_args: Vec<String> = [
        "--webhook-listen",
        "127.0.0.1:0",
        "--webhook-tls-cert",
        webhook["cert"].as_str().unwrap(),
        "--webhook-tls-key",
        webhook["key"].as_str().unwrap(),
    ]
    .map(str::to_owned)
    .into();
    cp_args.extend(flags("inject-"));
    let cp_args: Vec<&str> = cp_args.iter().map(String::as_str).collect();
    let cp = ControlPlane::start(&cp_bin, &cp_args).await.unwrap();
    let port = cp
        .webhook_port
        .expect("the control plane reports its webhook port");

    let job = json!({
        "capmesh": capmesh,
        "webhook": {"port": port, "host": webhook["host"], "ca": webhook["ca"]},
        "namespace": NAMESPACE,
        "deployment": DEPLOYMENT,
        "stream": STREAM,
        "cli_args": flags(""),
        "chart_values": {
            "agent": {"name": "weather", "port": 9001},
            "transparent": {"enabled": true},
        },
    });
    let job_path = dir.path().join("job.json");
    std::fs::write(&job_path, job.to_string()).unwrap();
    let report_path = dir.path().join("report.json");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(repo_root().join("tests/python/inject.py"))
            .arg("--job")
            .arg(&job_path)
            .arg("--report")
            .arg(&report_path)
            .stdin(Stdio::null())
            .output()
            .map(|o| (o, std::fs::read_to_string(&report_path)))
    })
    .await
    .unwrap()
    .unwrap();
    let (out, text) = out;
    assert!(
        out.status.success(),
        "inject.py failed:\n{}\ncontrol plane log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cp.log()
    );
    serde_json::from_str(&text.unwrap()).unwrap()
}

fn container<'a>(spec: &'a Value, list: &str, name: &str) -> &'a Value {
    spec[list]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry {name} in {spec}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// `--flag value` pairs (and `init` first for the init container), in order.
fn pairs(args: &[String]) -> Vec<(String, String)> {
    args.iter()
        .skip_while(|a| !a.starts_with("--"))
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|p| {
            (
                p[0].clone(),
                p.get(1).map(|s| (*s).clone()).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn capmesh_inject_and_the_webhook_give_the_same_valid_pod() {
    let r = report().await;
    assert_eq!(
        r["cli"]["code"], 0,
        "capmesh inject: {}",
        r["cli"]["stderr"]
    );
    assert!(r["original_valid"].is_null(), "{}", r["original_valid"]);

    // The webhook answered the review: same uid, allowed, a base64 JSON Patch.
    let review = &r["review"];
    assert_eq!(review["status"], 200, "{}", review["text"]);
    let response = &review["json"]["response"];
    assert_eq!(review["json"]["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["json"]["kind"], "AdmissionReview");
    assert_eq!(response["uid"], "7f0c-42");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let paths: Vec<&str> = r["patch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"/spec/containers"), "{paths:?}");

    // A (capmesh inject) and B (the webhook's patch applied) have the same pod spec.
    let a = &r["a"]["spec"]["template"]["spec"];
    let b = &r["b"]["spec"];
    assert_eq!(
        a, b,
        "capmesh inject and the webhook disagree:\nA = {a:#}\nB = {b:#}"
    );
    assert_eq!(
        r["a"]["spec"]["template"]["metadata"]["annotations"],
        r["b"]["metadata"]["annotations"]
    );
    // ... and both are valid Kubernetes objects.
    assert!(r["a_valid"].is_null(), "A: {}", r["a_valid"]);
    assert!(r["b_valid"].is_null(), "B: {}", r["b_valid"]);

    // The other workload kinds (and the documents left alone) validate too.
    let stream = &r["stream"];
    assert_eq!(stream["code"], 0, "{}", stream["stderr"]);
    let docs = stream["documents"].as_array().unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["Service", "StatefulSet", "DaemonSet", "Pod", "ConfigMap"]
    );
    for d in docs {
        assert!(
            d["error"].is_null(),
            "{} {}: {}",
            d["kind"],
            d["name"],
            d["error"]
        );
        if matches!(
            d["kind"].as_str(),
            Some("StatefulSet" | "DaemonSet" | "Pod")
        ) {
            assert!(
                strings(&d["containers"]).contains(&"capmesh-proxy".to_owned()),
                "{d}"
            );
        }
    }

    // What was injected is what the settings asked for.
    let proxy = container(a, "containers", "capmesh-proxy");
    assert_eq!(proxy["image"], SETTINGS[0].1);
    let args = strings(&proxy["args"]);
    let p: BTreeMap<String, String> = pairs(&args).into_iter().collect();
    assert_eq!(p["--agent-name"], "weather");
    assert_eq!(p["--agent-url"], "http://127.0.0.1:9001/mcp");
    assert_eq!(p["--control-plane"], SETTINGS[1].1);
    assert_eq!(p["--propagate-headers"], SETTINGS[2].1);
    assert_eq!(p["--agent-version"], "1.4.0");
    assert_eq!(p["--dependency"], "geo");
    let ca = a["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "capmesh-ca")
        .unwrap();
    assert_eq!(ca["secret"]["secretName"], "mesh-ca");

    // A second review of the injected pod: no patch. A pod that opts out: no patch.
    for (name, answer) in [("again", &r["again"]), ("disabled", &r["disabled"])] {
        let response = &answer["response"];
        assert_eq!(response["allowed"], true, "{name}: {answer}");
        assert!(response["patch"].is_null(), "{name}: {answer}");
    }

    // Bad requests: 400 with what to send, 405, 413; never a crash.
    let bad = &r["bad_json"];
    assert_eq!(bad["status"], 400, "{bad}");
    assert_eq!(bad["json"]["error"], "bad_request");
    assert!(
        bad["json"]["detail"].as_str().unwrap().contains("not JSON"),
        "{bad}"
    );
    let wrong = &r["wrong_version"];
    assert_eq!(wrong["status"], 400, "{wrong}");
    assert!(
        wrong["json"]["detail"]
            .as_str()
            .unwrap()
            .contains("admissionReviewVersions: [v1]"),
        "{wrong}"
    );
    assert_eq!(r["get"]["status"], 405, "{}", r["get"]);
    assert_eq!(r["too_large"]["status"], 413, "{}", r["too_large"]);
    assert_eq!(r["again"]["response"]["uid"], "7f0c-43");
}

/// The injected sidecar is the agent chart's sidecar: same flags and values (but the
/// namespace, which injection takes from the downward API), ports, probes, resources, user,
/// mounts; the same init container and volumes.
#[tokio::test(flavor = "multi_thread")]
async fn the_injected_sidecar_is_the_agent_charts_and_the_proxy_accepts_its_flags() {
    let r = report().await;
    let injected = &r["a"]["spec"]["template"]["spec"];
    let chart = &r["chart"]["spec"]["template"]["spec"];
    assert!(
        chart.is_object(),
        "the chart rendered no Deployment: {}",
        r["chart"]
    );
    let (ip, cp) = (
        container(injected, "containers", "capmesh-proxy"),
        container(chart, "containers", "capmesh-proxy"),
    );
    let mut ia = pairs(&strings(&ip["args"]));
    let mut ca = pairs(&strings(&cp["args"]));
    for args in [&mut ia, &mut ca] {
        args.retain(|(flag, _)| {
            // Settings the test gives injection but not the chart, and the namespace.
            !matches!(
                flag.as_str(),
                "--namespace"
                    | "--control-plane"
                    | "--propagate-headers"
                    | "--agent-version"
                    | "--dependency"
            )
        });
    }
    assert_eq!(ia, ca, "sidecar arguments differ from the chart's");
    assert!(
        strings(&ip["args"])
            .windows(2)
            .any(|w| w == ["--namespace", "$(POD_NAMESPACE)"]),
        "{}",
        ip["args"]
    );
    for field in [
        "ports",
        "livenessProbe",
        "readinessProbe",
        "resources",
        "securityContext",
        "volumeMounts",
        "imagePullPolicy",
    ] {
        assert_eq!(
            ip[field], cp[field],
            "sidecar {field} differs from the chart's"
        );
    }
    let env_names = |c: &Value| -> Vec<String> {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .filter(|n| n != "POD_NAMESPACE")
            .collect()
    };
    assert_eq!(env_names(ip), env_names(cp));
    let (ii, ci) = (
        container(injected, "initContainers", "capmesh-init"),
        container(chart, "initContainers", "capmesh-init"),
    );
    for field in ["args", "resources", "securityContext"] {
        assert_eq!(
            ii[field], ci[field],
            "init container {field} differs from the chart's"
        );
    }
    let volumes = |spec: &Value| -> Vec<Value> {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let mut v = v.clone();
                v["secret"]["secretName"] = json!("(secret)");
                v
            })
            .collect()
    };
    assert_eq!(volumes(injected), volumes(chart));

    // The real `capmesh-proxy init` takes the init container's arguments: a dry run prints
    // the rules it would write.
    let proxy = workspace_bin("capmesh-proxy").expect("build capmesh-proxy first");
    let init_args = strings(&ii["args"]);
    let out = Command::new(&proxy)
        .args(&init_args)
        .arg("--dry-run")
        .env_clear()
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && rules.contains("--to-ports 15001")
            && rules.contains("--uid-owner 1337"),
        "capmesh-proxy {init_args:?} --dry-run: {}{rules}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The real proxy's parser takes the injected arguments (downward-API values stood in).
    let args: Vec<String> = strings(&ip["args"])
        .into_iter()
        .map(|a| {
            a.replace("$(POD_IP)", "10.1.2.3")
                .replace("$(POD_NAME)", "weather-5d8f7c9b6-x2x7q")
                .replace("$(POD_NAMESPACE)", NAMESPACE)
        })
        .collect();
    let out = Command::new(&proxy)
        .args(&args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "capmesh-proxy refuses the injected arguments {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the control plane with `args`; it must exit (not serve) within 20 s.
fn control_plane_exits(args: &[&str]) -> (i32, String) {
    let bin = workspace_bin("capmesh-control-plane").expect("build capmesh-control-plane first");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env_clear()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the control plane started with {args:?} instead of refusing");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_webhook_does_not_start_without_a_usable_certificate() {
    // --webhook-listen alone: a usage error naming what it needs.
    let (code, stderr) = control_plane_exits(&["--webhook-listen", "127.0.0.1:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--webhook-tls-cert"), "{stderr}");

    // Files that are not PEM: the error names the flag and the file.
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let (code, stderr) = control_plane_exits(&[
        "--webhook-listen",
        "127.0.0.1:0",
        "--webhook-tls-cert",
        &cert,
        "--webhook-tls-key",
        &key,
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("--webhook-tls-cert {cert}"))
            && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
}
