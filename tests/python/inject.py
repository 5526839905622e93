#!/usr/bin/env python3
"""`capmesh inject` and the admission webhook, side by side, with real tools.

    <charts venv>/bin/python tests/python/inject.py --render-webhook DIR
    <charts venv>/bin/python tests/python/inject.py --job JOB.json --report REPORT.json

Runs inside the charts venv (tests/python/charts.py --setup-only makes it): PyYAML,
kubernetes-validate and jsonpatch (RFC 6902, applied the way the API server applies a
webhook's patch), plus helm-python-sdk to render the agent chart for comparison.

--render-webhook renders charts/capmesh-control-plane and writes the webhook certificate the
chart generates (genCA/genSignedCert) and the caBundle of its MutatingWebhookConfiguration,
which the test starts the real control plane with. The job (written by tests/tests/inject.rs)
names the real `capmesh` binary, the webhook (its port, the Service DNS name its certificate
is checked for, the caBundle), a Deployment, and the flags for both sides. For that
Deployment this script:
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
import http.client
import socket
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


def post(webhook: dict[str, Any], body: bytes, method: str = "POST",
         declared_length: int | None = None) -> dict[str, Any]:
    """One request to the webhook at 127.0.0.1:<port>, its certificate checked against the CA
    and for the Service's DNS name, as the API server checks it."""
    context = ssl.create_default_context(cafile=webhook["ca"])

    class ToService(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = socket.create_connection(("127.0.0.1", webhook["port"]), timeout=20)
            self.sock = context.wrap_socket(sock, server_hostname=webhook["host"])

    conn = ToService(webhook["host"], webhook["port"], context=context, timeout=20)
    try:
        if declared_length is None:
            conn.request(method, "/inject", body=body if method == "POST" else None,
                         headers={"content-type": "application/json"})
        else:
            # Headers only, announcing a body too large to send: the webhook must refuse it
            # from the header.
            conn.putrequest(method, "/inject")
            conn.putheader("content-type", "application/json")
            conn.putheader("content-length", str(declared_length))
            conn.endheaders()
        resp = conn.getresponse()
        status, text = resp.status, resp.read().decode()
    finally:
        conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return {"status": status, "text": text, "json": parsed}


def render_webhook(out_dir: Path, namespace: str) -> dict[str, Any]:
    """Renders charts/capmesh-control-plane with Helm's engine and writes what the control
    plane and the API server get from it: the Secret's tls.crt and tls.key (for
    --webhook-tls-cert/--webhook-tls-key) and the MutatingWebhookConfiguration's caBundle."""
    import helm_python as helm
    import yaml

    with helm.Chart.load(str(REPO / "charts" / "capmesh-control-plane")) as chart:
        rendered = chart.render({}, name="capmesh", namespace=namespace, is_install=True)
    docs = [d for d in yaml.safe_load_all(rendered["capmesh-control-plane/templates/webhook.yaml"])
            if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    config = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
    service = config["webhooks"][0]["clientConfig"]["service"]
    for key in ("tls.crt", "tls.key"):
        (out_dir / key).write_bytes(base64.b64decode(secret["data"][key]))
    (out_dir / "ca-bundle.crt").write_bytes(
        base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"]))
    return {"host": f"{service['name']}.{service['namespace']}.svc", "path": service["path"],
            "cert": str(out_dir / "tls.crt"), "key": str(out_dir / "tls.key"),
            "ca": str(out_dir / "ca-bundle.crt"),
            "bundles_equal": [w["clientConfig"]["caBundle"] for w in config["webhooks"]]
            == [secret["data"]["ca.crt"]] * len(config["webhooks"])}


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
    parser.add_argument("--job")
    parser.add_argument("--report")
    parser.add_argument("--render-webhook", metavar="DIR",
                        help="write the chart's webhook certificate into DIR, print JSON")
    parser.add_argument("--namespace", default="capmesh")
    args = parser.parse_args()
    if args.render_webhook:
        print(json.dumps(render_webhook(Path(args.render_webhook), args.namespace)))
        return 0

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

    # Every other kind capmesh inject handles, in one multi-document stream: each output
    # document must validate too.
    stream = subprocess.run([job["capmesh"], "inject", *job["cli_args"]], input=job["stream"],
                            capture_output=True, text=True, timeout=60)
    report["stream"] = {"code": stream.returncode, "stderr": stream.stderr, "documents": [
        {"kind": d.get("kind"), "name": (d.get("metadata") or {}).get("name"),
         "containers": [c["name"] for c in
                        ((d.get("spec") or {}).get("containers")
                         or (((d.get("spec") or {}).get("template") or {}).get("spec") or {})
                         .get("containers") or [])],
         "error": validate(kv, d)}
        for d in (yaml.safe_load_all(stream.stdout) if stream.returncode == 0 else []) if d]}

    # B: the webhook's patch on the pod the ReplicaSet would create.
    pod = pod_of(deployment, namespace)
    answer = post(job["webhook"], review_of(pod, namespace, "7f0c-42"))
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
    report["again"] = post(job["webhook"], review_of(patched or pod, namespace, "7f0c-43"))["json"]

    # A pod that opts out.
    disabled = copy.deepcopy(pod)
    disabled["metadata"].setdefault("labels", {})["capmesh.io/inject"] = "disabled"
    report["disabled"] = post(job["webhook"], review_of(disabled, namespace, "7f0c-44"))["json"]
    # Bad requests.
    report["bad_json"] = post(job["webhook"], b"{\"apiVersion\": ")
    report["wrong_version"] = post(job["webhook"], json.dumps(
        {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
         "request": {"uid": "x"}}).encode())
    report["get"] = post(job["webhook"], b"", method="GET")
    report["too_large"] = post(job["webhook"], b"", declared_length=5 * 1024 * 1024)

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
