#!/usr/bin/env python3
"""`capmesh inject` and the admission webhook, side by side, with real tools.

    <charts venv>/bin/python tests/python/inject.py --job JOB.json --report REPORT.json

Runs inside the charts venv (tests/python/charts.py --setup-only makes it): PyYAML,
kubernetes-validate and jsonpatch (RFC 6902, applied the way the API server applies a
webhook's patch), plus helm-python-sdk to render the agent chart for comparison.

The job (written by tests/tests/inject.rs) names the real `capmesh` binary, the webhook's
https URL and the CA that signed its certificate, a Deployment, and the flags for both
sides. For that Deployment this script:
  * runs `capmesh inject` on it (pod template A);
  * sends the webhook the AdmissionReview the API server would send for one of its pods,
    over TLS checked against the CA, and applies the returned JSON Patch (pod B);
  * validates A's Deployment and B against the Kubernetes schemas (strict);
  * sends the webhook bad requests and a pod that opts out;
  * renders charts/capmesh-agent for the same agent with Helm's engine, for the Rust test to
    compare the chart's sidecar with the injected one.
It records what it saw in the report; the Rust test asserts on it.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KUBE_VERSION = "1.30"


def validate(kv: Any, obj: Any) -> str | None:
    """None when valid for Kubernetes 1.30 (strict), else the error."""
    try:
        kv.validate(obj, KUBE_VERSION, strict=True)
        return None
    except kv.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    except Exception as e:  # noqa: BLE001 - reported, never skipped
        return f"{type(e).__name__}: {e}"


def post(url: str, ca: str, body: bytes, method: str = "POST") -> dict[str, Any]:
    context = ssl.create_default_context(cafile=ca)
    req = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=context, timeout=20) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return {"status": status, "text": text, "json": parsed}


def review_of(pod: dict[str, Any], namespace: str, uid: str) -> bytes:
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }).encode()


def pod_of(deployment: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The pod a ReplicaSet creates from the Deployment's template (as the webhook sees it)."""
    template = copy.deepcopy(deployment["spec"]["template"])
    meta = template.get("metadata") or {}
    meta["generateName"] = f"{deployment['metadata']['name']}-5d8f7c9b6-"
    meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()

    import helm_python as helm
    import jsonpatch
    import kubernetes_validate as kv
    import yaml

    job = json.loads(Path(args.job).read_text())
    namespace = job["namespace"]
    report: dict[str, Any] = {"tools": {"jsonpatch": jsonpatch.__version__,
                                        "kubernetes_validate": kv.__version__}}
    deployment = yaml.safe_load(job["deployment"])
    report["original_valid"] = validate(kv, deployment)

    # A: capmesh inject, the real binary.
    cli = subprocess.run([job["capmesh"], "inject", *job["cli_args"]], input=job["deployment"],
                         capture_output=True, text=True, timeout=60)
    report["cli"] = {"code": cli.returncode, "stderr": cli.stderr}
    docs = [d for d in yaml.safe_load_all(cli.stdout) if d] if cli.returncode == 0 else []
    injected = docs[0] if docs else None
    report["a"] = injected
    report["a_valid"] = validate(kv, injected) if injected else "no output"

    # B: the webhook's patch on the pod the ReplicaSet would create.
    pod = pod_of(deployment, namespace)
    answer = post(job["webhook"], job["ca"], review_of(pod, namespace, "7f0c-42"))
    report["review"] = answer
    response = (answer["json"] or {}).get("response") or {}
    patched = None
    if response.get("patch"):
        ops = json.loads(base64.b64decode(response["patch"]))
        report["patch"] = ops
        patched = jsonpatch.apply_patch(pod, ops)
    report["b"] = patched
    report["b_valid"] = validate(kv, patched) if patched else "no patch"
    # The same pod again: already injected, so no patch.
    report["again"] = post(job["webhook"], job["ca"],
                           review_of(patched or pod, namespace, "7f0c-43"))["json"]

    # A pod that opts out.
    disabled = copy.deepcopy(pod)
    disabled["metadata"].setdefault("labels", {})["capmesh.io/inject"] = "disabled"
    report["disabled"] = post(job["webhook"], job["ca"],
                              review_of(disabled, namespace, "7f0c-44"))["json"]
    # Bad requests.
    report["bad_json"] = post(job["webhook"], job["ca"], b"{\"apiVersion\": ")
    report["wrong_version"] = post(job["webhook"], job["ca"], json.dumps(
        {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
         "request": {"uid": "x"}}).encode())
    report["get"] = post(job["webhook"], job["ca"], b"", method="GET")
    report["too_large"] = post(job["webhook"], job["ca"], b" " * (5 * 1024 * 1024))

    # The agent chart's sidecar for the same agent (Helm's own engine).
    with helm.Chart.load(str(REPO / "charts" / "capmesh-agent")) as chart:
        rendered = chart.render(job["chart_values"], name="weather", namespace=namespace,
                                is_install=True)
    chart_deployment = None
    for template, text in rendered.items():
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "Deployment":
                chart_deployment = doc
    report["chart"] = chart_deployment

    Path(args.report).write_text(json.dumps(report, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
