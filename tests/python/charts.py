#!/usr/bin/env python3
"""Render capmesh's Helm charts with Helm's own engine and validate every manifest.

    python3 tests/python/charts.py [--report FILE] [--case CHART/NAME ...]
    python3 tests/python/charts.py --setup-only

Run with any python3 (>= 3.10): the script first creates or refreshes its own virtual
environment, <repo>/target/py-charts-venv (or $CAPMESH_PY_CHARTS_VENV), from
charts-requirements.txt next to it, then re-executes itself inside it. The setup is
idempotent (a stamp holds the sha256 of the requirements and the Python version) and
serialised across processes by an flock on <venv>.lock.

Tools (real ones, nothing re-implemented):
  * helm-python-sdk (Helm v4's Go SDK): helm_python.dependency_build / dependency_list on a
    copy of charts/ (Chart.lock must be in sync), helm_python.lint(...) and
    Chart.load(...).render(...), which also validates values against values.schema.json;
    helm_python.values_from_yaml for the example values files (Helm's own -f parser).
  * kubernetes-validate: kubernetes_validate.validate(manifest, "1.30", strict=True) for
    every rendered object.

Each case is a chart plus values, expected either to render ("ok": lint without errors,
every manifest valid) or to be refused ("refused": render and lint fail, and the message
names the offending key). The JSON report (stdout, or --report FILE) holds, per case, the
lint messages, the render error, every rendered object with its validation result, every
container (from pod templates and from the sidecar-only snippet) and the NOTES.txt text;
tests/tests/charts.rs asserts on it (and checks the containers' flags against the real
capmesh binaries). Exit status: 0 all expectations met, 1 some were not, 2 setup failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHARTS = REPO / "charts"
REQUIREMENTS = HERE / "charts-requirements.txt"
KUBE_VERSION = "1.30"
RELEASE = "capmesh"
NAMESPACE = "capmesh"


# --------------------------------------------------------------------------------------------
# Stage 1: the virtual environment (runs under any python3, standard library only).
# --------------------------------------------------------------------------------------------


def venv_dir() -> Path:
    env = os.environ.get("CAPMESH_PY_CHARTS_VENV")
    return Path(env) if env else REPO / "target" / "py-charts-venv"


def wanted_stamp() -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    return f"{digest} {sys.version_info[0]}.{sys.version_info[1]}"


def log(msg: str) -> None:
    print(f"charts.py: {msg}", file=sys.stderr, flush=True)


def ensure_venv() -> Path:
    """Creates or refreshes the venv; returns its python. Raises SystemExit(2) on failure."""
    import fcntl

    venv = venv_dir()
    python = venv / "bin" / "python"
    stamp = venv / ".capmesh-requirements.sha256"
    want = wanted_stamp()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        # Serialises concurrent test processes; released on exit, even on a crash.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and stamp.read_text().strip() == want:
            return python
        log(f"creating {venv} from {REQUIREMENTS.name}")
        shutil.rmtree(venv, ignore_errors=True)
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True
        )
        if made.returncode != 0:
            log(
                f"'{sys.executable} -m venv' failed (the venv module / ensurepip is missing?)."
                " Fix: apt-get install -y python3-venv\n" + made.stderr
            )
            raise SystemExit(2)
        pip = subprocess.run(
            [
                str(python), "-m", "pip", "install", "--disable-pip-version-check",
                "--no-input", "-q", "-r", str(REQUIREMENTS),
            ],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0:
            log(
                "pip could not install charts-requirements.txt (is PyPI reachable? is there a"
                " helm-python-sdk wheel for this platform?):\n" + pip.stdout + pip.stderr
            )
            raise SystemExit(2)
        check = subprocess.run(
            [
                str(python), "-c",
                "import helm_python, kubernetes_validate, yaml;"
                "print(helm_python.helm_sdk_version(), kubernetes_validate.__version__)",
            ],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            log("the installed packages do not import:\n" + check.stderr)
            raise SystemExit(2)
        log(f"ready: Helm {check.stdout.strip()} (helm SDK, kubernetes-validate)")
        stamp.write_text(want + "\n")
        return python


# --------------------------------------------------------------------------------------------
# Stage 2: the cases (runs inside the venv).
# --------------------------------------------------------------------------------------------


def case(chart: str, name: str, *, files: list[str] | None = None,
         values: dict[str, Any] | None = None, refused: list[str] | None = None,
         by_template: bool = False, about: str = "") -> dict[str, Any]:
    """refused: strings the refusal message must contain (they name the key).

    by_template: the refusal comes from a template's fail() (a rule across several keys),
    not from values.schema.json. `helm lint` renders templates in lint mode, where fail()
    only logs, so lint is expected to refuse schema violations only.
    """
    return {
        "chart": chart,
        "name": name,
        "files": files or [],
        "values": values or {},
        "expect": "refused" if refused else "ok",
        "mentions": refused or [],
        "lint_refuses": bool(refused) and not by_template,
        "about": about,
    }


CP = "capmesh-control-plane"
AGENT = "capmesh-agent"
PLATFORM = "capmesh-platform"

CASES: list[dict[str, Any]] = [
    # --- capmesh-control-plane ---
    case(CP, "defaults", about="StatefulSet with a PVC for the SQLite data dir"),
    case(CP, "no-persistence", values={"persistence": {"enabled": False}},
         about="Deployment with an emptyDir data dir"),
    case(CP, "postgres-replicas", values={
        "replicaCount": 3,
        "persistence": {"enabled": False},
        "store": {"postgres": {"host": "db.example", "passwordSecret": "db", "params": "connect_timeout=5"}},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    }, about="3 replicas on PostgreSQL: a generated store key, a PodDisruptionBudget, soft anti-affinity"),
    case(CP, "postgres-own-store-key", values={
        "replicaCount": 2,
        "persistence": {"enabled": False},
        "store": {"postgres": {"existingSecret": "db-url"},
                  "key": {"existingSecret": "ops-store-key", "existingSecretKey": "key"}},
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app.kubernetes.io/component": "control-plane"}},
             "topologyKey": "kubernetes.io/hostname"}]}},
    }, about="your own store key Secret and required anti-affinity"),
    case(CP, "byo-ca-and-token", values={
        "ca": {"existingSecret": "capmesh-ca-keypair"},
        "adminToken": {"existingSecret": "ops-admin-token", "existingSecretKey": "token"},
        "store": {"postgres": {"existingSecret": "db-url"}},
        "controlPlane": {"serverNames": ["capmesh.example.com"], "grace": "500ms", "certTtl": "12h"},
        "global": {"imageRegistry": "mirror.example", "imageTag": "9.9.9", "logFormat": "text"},
    }, about="bring-your-own CA, admin token and store URL Secrets; global overrides"),
    case(CP, "replicas-without-postgres", values={"replicaCount": 2},
         refused=["replicaCount", "store.postgres.host"], by_template=True),
    case(CP, "negative-replicas", values={"replicaCount": -1}, refused=["/replicaCount"]),
    case(CP, "bad-grace", values={"controlPlane": {"grace": "2days"}},
         refused=["/controlPlane/grace"]),
    case(CP, "bad-log-format", values={"controlPlane": {"logFormat": "xml"}},
         refused=["/controlPlane/logFormat"]),
    case(CP, "unknown-key", values={"replicas": 2}, refused=["replicas"]),
    case(CP, "no-webhook", values={"webhook": {"enabled": False}},
         about="no admission webhook: no MutatingWebhookConfiguration, no --webhook-listen"),
    case(CP, "webhook-settings", values={"webhook": {
        "port": 9443, "failurePolicy": "Fail", "tlsMode": "permissive", "transparent": False,
        "propagateHeaders": ["x-tenant-id"], "caSecret": "mesh-ca",
        "proxyImage": {"registry": "mirror.example", "repository": "capmesh/capmesh-proxy",
                       "tag": "9.9.9", "pullPolicy": "Always"}}},
         about="what the webhook injects, from webhook.* values"),
    case(CP, "bad-failure-policy", values={"webhook": {"failurePolicy": "Maybe"}},
         refused=["/webhook/failurePolicy"]),
    # --- capmesh-agent ---
    case(AGENT, "defaults"),
    case(AGENT, "full", values={
        "agent": {
            "name": "weather",
            "namespace": "travel",
            "version": "1.4.0",
            "tags": ["fast", "eu-west"],
            "zone": "eu-west-1a",
            "capabilities": ["get_weather=weather_forecast@1.4.0#fast,cached", "ping#health"],
            "dependencies": ["geo", "fast_llm=llm:+claude,-beta,>=1.2", "*:+fast"],
            "env": {"CACHE_TTL": "300", "WORKERS": 4},
            "extraEnv": [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "k", "key": "v"}}}],
            "command": ["python", "agent.py"],
            "args": ["--port", "9001"],
            "port": 9001,
            "path": "/mcp/",
            "readinessProbe": {"tcpSocket": {"port": 9001}},
        },
        "proxy": {"tlsMode": "permissive", "propagateHeaders": ["x-tenant-id", "x-request-*"],
                  "logFormat": "text"},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8,
                        "targetMemoryUtilizationPercentage": 75},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"},
        "global": {"controlPlane": {"url": "https://cp.capmesh-system.svc:8000", "caSecret": "mesh-ca"}},
    }, about="every routing flag, HPA, PDB, global control-plane settings"),
    case(AGENT, "native-sidecar", values={"proxy": {"nativeSidecar": True}}),
    case(AGENT, "consumer-only", values={"agent": {"name": "planner", "consumerOnly": True,
                                                  "dependencies": ["*"]}},
         about="--agent-url none, no Service"),
    case(AGENT, "certificate-files", values={"proxy": {"certificate": {
        "secretName": "weather-tls", "caKey": "ca.crt"}}},
         about="cert-manager Secret: --tls-cert/--tls-key/--tls-ca instead of a bootstrap token"),
    case(AGENT, "transparent", values={"transparent": {
        "skipOutboundPorts": [5432, 6379], "skipOutboundCidrs": ["10.96.0.1/32"]}},
         about="init container `capmesh-proxy init` with the outbound exceptions"),
    case(AGENT, "no-transparent", values={"transparent": {"enabled": False}},
         about="no init container"),
    case(AGENT, "bad-skip-port", values={"transparent": {"skipOutboundPorts": [0]}},
         refused=["/transparent/skipOutboundPorts/0"]),
    case(AGENT, "sidecar-only", values={"agent": {"enabled": False, "name": "legacy-agent",
                                                 "port": 3000}},
         about="only the ConfigMap with the sidecar snippet"),
    case(AGENT, "sidecar-only-native", values={"agent": {"enabled": False},
                                               "proxy": {"nativeSidecar": True},
                                               "transparent": {"enabled": True}}),
    case(AGENT, "bad-tls-mode", values={"proxy": {"tlsMode": "loose"}},
         refused=["/proxy/tlsMode", "strict"]),
    case(AGENT, "bad-agent-name", values={"agent": {"name": "Bad_Name"}},
         refused=["/agent/name", "Bad_Name"]),
    case(AGENT, "negative-replicas", values={"replicaCount": -1}, refused=["/replicaCount"]),
    case(AGENT, "bad-version", values={"agent": {"version": "1.4"}}, refused=["/agent/version"]),
    case(AGENT, "star-header", values={"proxy": {"propagateHeaders": ["*"]}},
         refused=["/proxy/propagateHeaders/0"]),
    case(AGENT, "no-image", values={"agent": {"image": {"repository": ""}}},
         refused=["/agent/image/repository"]),
    case(AGENT, "bad-control-plane-url", values={"proxy": {"controlPlane": {"url": "http://cp:8000"}}},
         refused=["/proxy/controlPlane/url"]),
    # --- capmesh-platform ---
    case(PLATFORM, "defaults"),
    case(PLATFORM, "minimal", files=["values-minimal.yaml"]),
    case(PLATFORM, "production", files=["values-production.yaml"]),
    case(PLATFORM, "bad-tls-mode", values={"weather": {"proxy": {"tlsMode": "loose"}}},
         refused=["weather", "/proxy/tlsMode"]),
    case(PLATFORM, "bad-agent-name", values={"flights": {"agent": {"name": "Bad_Name"}}},
         refused=["flights", "/agent/name"]),
    case(PLATFORM, "negative-replicas", values={"planner": {"replicaCount": -1}},
         refused=["planner", "/replicaCount"]),
    case(PLATFORM, "replicas-without-postgres", values={"control-plane": {"replicaCount": 3}},
         refused=["replicaCount", "store.postgres"], by_template=True),
    case(PLATFORM, "postgres-without-store", values={"postgresql": {"enabled": True}},
         refused=["control-plane.store.postgres.host"], by_template=True),
    case(PLATFORM, "unknown-agent", values={"hotels": {"enabled": True}}, refused=["hotels"]),
    case(PLATFORM, "bad-global-header", values={"global": {"propagateHeaders": ["*"]}},
         refused=["/global/propagateHeaders/0"]),
]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """What `helm -f a.yaml -f b.yaml --set ...` does with maps: merge recursively."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec") or {}
    if kind in POD_OWNERS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    if kind == "CronJob":
        spec = obj.get("spec") or {}
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    return None


def container_record(source: str, kind: str, c: dict[str, Any]) -> dict[str, Any]:
    env = c.get("env") or []
    return {
        "source": source,
        "list": kind,
        "name": c.get("name"),
        "image": c.get("image"),
        "command": c.get("command") or [],
        "args": [str(a) for a in (c.get("args") or [])],
        "env": [
            {"name": e.get("name"), "value": e.get("value"), "from": "valueFrom" in e}
            for e in env
        ],
        "restartPolicy": c.get("restartPolicy"),
    }


def containers_of(obj: dict[str, Any], yaml: Any) -> list[dict[str, Any]]:
    source = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    found: list[dict[str, Any]] = []
    spec = pod_spec(obj)
    if spec is not None:
        for kind in ("initContainers", "containers"):
            for c in spec.get(kind) or []:
                found.append(container_record(source, kind, c))
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if obj.get("kind") == "ConfigMap" and labels.get("capmesh.io/sidecar-snippet") == "true":
        for key in ("initContainers", "containers"):
            text = (obj.get("data") or {}).get(f"{key}.yaml")
            if text:
                for c in yaml.safe_load(text) or []:
                    found.append(container_record(source + f"#{key}.yaml", key, c))
    return found


def run_case(c: dict[str, Any], root: Path, helm: Any, kv: Any, yaml: Any) -> dict[str, Any]:
    chart_dir = root / c["chart"]
    values: dict[str, Any] = {}
    for f in c["files"]:
        values = deep_merge(values, helm.values_from_yaml((chart_dir / f).read_text()))
    values = deep_merge(values, c["values"])
    out: dict[str, Any] = {
        k: c[k] for k in ("chart", "name", "files", "expect", "mentions", "lint_refuses", "about")
    }
    out["values"] = values

    # helm lint (what `helm lint --kube-version 1.30.0 -f ... --set ...` reports).
    try:
        report = helm.lint(str(chart_dir), values, namespace=NAMESPACE,
                           kube_version=f"v{KUBE_VERSION}.0")
        msgs = report.get("messages") or []

        def at(*severities: int) -> list[str]:
            return [f"{m['path']}: {m['error'].strip()}" for m in msgs
                    if m.get("severity") in severities]

        errors = at(3)
        # `errors` repeats the error messages; keep any that no message carries.
        errors += [e.strip() for e in report.get("errors") or []
                   if not any(e.strip() in m["error"] for m in msgs)]
        out["lint"] = {"ran": True, "errors": errors, "warnings": at(2), "info": at(0, 1)}
    except helm.HelmError as e:
        out["lint"] = {"ran": False, "errors": [f"lint could not run: {type(e).__name__}: {e}"],
                       "warnings": [], "info": []}

    # helm template (Helm's engine; the values are checked against values.schema.json first).
    out["render"] = {"ok": False, "error": None}
    out["objects"] = []
    out["containers"] = []
    out["notes"] = None
    try:
        with helm.Chart.load(str(chart_dir)) as chart:
            rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as e:
        out["render"]["error"] = f"{type(e).__name__}: {e}"
        return out
    out["render"]["ok"] = True
    top_notes = f"{c['chart']}/templates/NOTES.txt"
    for template in sorted(rendered):
        text = rendered[template]
        if template.endswith("NOTES.txt"):
            if template == top_notes:
                out["notes"] = text
            continue
        try:
            # libyaml's SafeLoader when present (same YAML 1.1 rules, several times faster).
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            docs = [d for d in yaml.load_all(text, Loader=loader) if d]
        except yaml.YAMLError as e:
            out["objects"].append({"template": template, "kind": None, "name": None,
                                   "valid": False, "error": f"not YAML: {e}", "object": None})
            continue
        for doc in docs:
            rec: dict[str, Any] = {
                "template": template,
                "kind": doc.get("kind") if isinstance(doc, dict) else None,
                "apiVersion": doc.get("apiVersion") if isinstance(doc, dict) else None,
                "name": ((doc.get("metadata") or {}).get("name") if isinstance(doc, dict) else None),
                "valid": False,
                "error": None,
                "object": doc,
            }
            try:
                rec["validated_against"] = kv.validate(doc, KUBE_VERSION, strict=True)
                rec["valid"] = True
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                rec["error"] = f"{path}: {e.message}"
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
                rec["error"] = e.message
            except Exception as e:  # noqa: BLE001 - reported, never skipped
                rec["error"] = f"{type(e).__name__}: {e}"
            out["objects"].append(rec)
            if isinstance(doc, dict):
                out["containers"].extend(containers_of(doc, yaml))
    return out


def judge(r: dict[str, Any]) -> list[str]:
    """The script's own verdict (the Rust test checks the same and more)."""
    where = f"{r['chart']}/{r['name']}"
    problems = []
    if r["expect"] == "ok":
        problems += [f"{where}: lint error: {e}" for e in r["lint"]["errors"]]
        if not r["render"]["ok"]:
            problems.append(f"{where}: render failed: {r['render']['error']}")
        elif not r["objects"]:
            problems.append(f"{where}: rendered no objects")
        problems += [
            f"{where}: {o['template']} {o['kind']}/{o['name']} is not valid for Kubernetes "
            f"{KUBE_VERSION}: {o['error']}"
            for o in r["objects"] if not o["valid"]
        ]
    else:
        if r["render"]["ok"]:
            problems.append(f"{where}: rendered although it should be refused")
        else:
            missing = [m for m in r["mentions"] if m not in r["render"]["error"]]
            if missing:
                problems.append(f"{where}: the refusal does not mention {missing}: {r['render']['error']}")
        if r["lint_refuses"] and not r["lint"]["errors"]:
            problems.append(f"{where}: helm lint reported no error")
    return problems


def main_in_venv(args: argparse.Namespace) -> int:
    import helm_python as helm
    import kubernetes_validate as kv
    import yaml

    report: dict[str, Any] = {
        "tools": {
            "helm_python_sdk": helm.__version__,
            "helm_sdk": helm.helm_sdk_version(),
            "helm_c": helm.helm_c_version(),
            "kubernetes_validate": kv.__version__,
            "kubernetes_version": KUBE_VERSION,
            "strict": True,
        },
        "release": RELEASE,
        "namespace": NAMESPACE,
    }
    with tempfile.TemporaryDirectory(prefix="capmesh-charts-") as tmp:
        root = Path(tmp)
        # A copy: dependency_build writes charts/*.tgz, and the repository stays untouched.
        for chart in (CP, AGENT, PLATFORM):
            shutil.copytree(CHARTS / chart, root / chart)
        deps: dict[str, Any] = {"ok": False, "error": None, "list": []}
        try:
            # What `helm dependency build charts/capmesh-platform` does: fails when Chart.lock
            # is out of sync with Chart.yaml; packages the file:// charts into charts/.
            helm.dependency_build(str(root / PLATFORM))
            deps["list"] = helm.dependency_list(str(root / PLATFORM))
            deps["ok"] = True
        except helm.HelmError as e:
            deps["error"] = f"{type(e).__name__}: {e}"
        report["dependencies"] = deps

        # Each chart as Helm loads it: Chart.yaml and values.schema.json.
        report["charts"] = {}
        for chart_dir in [root / CP, root / AGENT, root / PLATFORM,
                          root / PLATFORM / "charts" / "postgresql"]:
            try:
                with helm.Chart.load(str(chart_dir)) as chart:
                    report["charts"][chart.name] = {
                        "metadata": chart.metadata,
                        "schema": chart.schema,
                        "subcharts": [d.get("name") for d in chart.dependencies],
                    }
            except helm.HelmError as e:
                report["charts"][chart_dir.name] = {"error": f"{type(e).__name__}: {e}"}

        selected = [c for c in CASES if not args.case or f"{c['chart']}/{c['name']}" in args.case]
        results = []
        for c in selected:
            log(f"{c['chart']}/{c['name']}")
            results.append(run_case(c, root, helm, kv, yaml))
    report["cases"] = results
    problems = [] if deps["ok"] else [f"helm dependency build failed: {deps['error']}"]
    for r in results:
        problems += judge(r)
    report["problems"] = problems
    text = json.dumps(report, indent=1, sort_keys=True, default=str)
    if args.report:
        Path(args.report).write_text(text)
    else:
        print(text)
    for p in problems:
        log(f"PROBLEM {p}")
    ok_cases = sum(1 for r in results if r["expect"] == "ok")
    objects = sum(len(r["objects"]) for r in results)
    log(f"{len(results)} cases ({ok_cases} render, {len(results) - ok_cases} refused), "
        f"{objects} manifests validated against Kubernetes {KUBE_VERSION} (strict), "
        f"{len(problems)} problem(s)")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--report", help="write the JSON report here instead of stdout")
    parser.add_argument("--case", action="append", help="only CHART/NAME (repeatable)")
    parser.add_argument("--setup-only", action="store_true", help="create the venv and stop")
    parser.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_venv:
        return main_in_venv(args)
    python = ensure_venv()
    if args.setup_only:
        print(python)
        return 0
    argv = [str(python), str(Path(__file__).resolve()), "--in-venv"] + sys.argv[1:]
    os.execv(str(python), argv)
    return 2  # not reached


if __name__ == "__main__":
    sys.exit(main())
