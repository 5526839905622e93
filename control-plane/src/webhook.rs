//! The admission webhook: `POST /inject` takes the API server's AdmissionReview (v1) for a pod
//! being created and answers with a JSON Patch that adds the sidecar, made by the same
//! [`inject_pod`] as `capmesh inject`.
//!
//! It serves on its own address over TLS with the certificate the chart generates (the API
//! server calls webhooks over HTTPS only, checking the `caBundle` of the
//! MutatingWebhookConfiguration), separate from the mesh API and its mesh certificates. It
//! mutates pods only; any other request is allowed unchanged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use base64::Engine;
use capmesh_client::listen::Limits;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::inject::{InjectConfig, Outcome, generate_name, inject_pod};
use crate::rest::{ApiError, Body, json as json_response};

/// Largest accepted AdmissionReview (a pod with its old object fits many times over).
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// The AdmissionReview version served.
const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// The webhook's TLS configuration from PEM files (`--webhook-tls-cert`, `--webhook-tls-key`).
/// Any key type rustls reads (RSA as Helm's `genSignedCert` makes, ECDSA, Ed25519). The files
/// are read again when they change (a renewed Secret, cert-manager), without a restart.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let resolver = WebhookCert::load(cert, key)?;
    let mut config = ServerConfig::builder_with_provider(capmesh_certs::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The webhook's certificate and key, from files that may be replaced while it runs. Each
/// handshake reads both files (a few kilobytes, at webhook rates) and switches to the new pair
/// when they changed and go together; a broken pair is logged once and the old one kept.
#[derive(Debug)]
struct WebhookCert {
    cert: PathBuf,
    key: PathBuf,
    loaded: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
}

impl WebhookCert {
    fn load(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let cert_pem = std::fs::read(cert)
            .with_context(|| format!("--webhook-tls-cert {}: cannot read it", cert.display()))?;
        let key_pem = std::fs::read(key)
            .with_context(|| format!("--webhook-tls-key {}: cannot read it", key.display()))?;
        let certified = certified_key(cert, key, &cert_pem, &key_pem)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            loaded: Mutex::new(Loaded {
                cert_pem,
                key_pem,
                certified,
            }),
        })
    }

    /// The pair to present now, reloaded first if the files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let (Ok(cert_pem), Ok(key_pem)) = (std::fs::read(&self.cert), std::fs::read(&self.key))
            && (cert_pem != loaded.cert_pem || key_pem != loaded.key_pem)
        {
            match certified_key(&self.cert, &self.key, &cert_pem, &key_pem) {
                Ok(certified) => {
                    tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
                    loaded.certified = certified;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "keeping the previous webhook certificate");
                }
            }
            // Either way, look again only when the files change again.
            loaded.cert_pem = cert_pem;
            loaded.key_pem = key_pem;
        }
        loaded.certified.clone()
    }
}

impl ResolvesServerCert for WebhookCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn certified_key(
    cert: &Path,
    key: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> anyhow::Result<Arc<CertifiedKey>> {
    let no_cert = || {
        format!(
            "--webhook-tls-cert {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
            cert.display()
        )
    };
    let text = std::str::from_utf8(cert_pem).with_context(no_cert)?;
    let chain = capmesh_certs::inspect::certs_from_pem(text).with_context(no_cert)?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        anyhow::anyhow!(
            "--webhook-tls-key {}: no PEM private key in it ({e}); give the key that goes with --webhook-tls-cert",
            key.display()
        )
    })?;
    let signer = capmesh_certs::tls::provider()
        .key_provider
        .load_private_key(key_der)
        .with_context(|| format!("--webhook-tls-key {}: unsupported key", key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|_| {
        anyhow::anyhow!(
            "--webhook-tls-key {} does not go with --webhook-tls-cert {}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// Serves `POST /inject` over TLS until `shutdown` flips to true, with the same limits as the
/// other listeners.
pub async fn serve(
    app: Arc<crate::App>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    config: Arc<InjectConfig>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    crate::server::accept_loop(app, "webhook", listener, limits, shutdown, move |tcp| {
        let (acceptor, config) = (acceptor.clone(), config.clone());
        async move {
            let stream = match tokio::time::timeout(
                limits.header_read_timeout,
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            capmesh_client::listen::serve(stream, limits, move |req| {
                let config = config.clone();
                async move { handle(req, &config).await }
            })
            .await;
        }
    })
    .await;
}

async fn handle(req: Request<Incoming>, config: &InjectConfig) -> Response<Body> {
    if req.uri().path() != "/inject" {
        return ApiError::not_found(
            "the capmesh admission webhook serves POST /inject (AdmissionReview v1) only",
        )
        .into_response();
    }
    if req.method() != Method::POST {
        return ApiError::method_not_allowed("POST an AdmissionReview (v1) to /inject")
            .into_response();
    }
    let too_large = || {
        ApiError::too_large(format!(
            "the AdmissionReview is over {MAX_REVIEW_BYTES} bytes"
        ))
        .into_response()
    };
    // A declared length over the limit is refused before reading any of it.
    if req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > MAX_REVIEW_BYTES as u64)
    {
        return too_large();
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(e) => {
            return ApiError::bad_request(format!("cannot read the request body: {e}"))
                .into_response();
        }
    };
    match review(&body, config) {
        Ok(answer) => json_response(StatusCode::OK, &answer),
        Err(e) => e.into_response(),
    }
}

/// Answers one AdmissionReview (the request body): the AdmissionReview with its `response`, or
/// a 400 naming what is wrong with the request.
pub fn review(body: &[u8], config: &InjectConfig) -> Result<Value, ApiError> {
    let review: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not JSON ({e}): POST an AdmissionReview ({REVIEW_API_VERSION})"
        ))
    })?;
    if review["apiVersion"] != REVIEW_API_VERSION || review["kind"] != "AdmissionReview" {
        return Err(ApiError::bad_request(format!(
            "expected kind AdmissionReview, apiVersion {REVIEW_API_VERSION}; got kind {}, apiVersion {}: \
             set admissionReviewVersions: [v1] in the MutatingWebhookConfiguration",
            review["kind"], review["apiVersion"]
        )));
    }
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str().filter(|u| !u.is_empty()) else {
        return Err(ApiError::bad_request(
            "the AdmissionReview has no request.uid: the response must echo it",
        ));
    };
    let mut response = decide(request, config)?;
    response["uid"] = json!(uid);
    Ok(json!({"apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview", "response": response}))
}

/// The `response` (without its uid) for one admission request.
fn decide(request: &Value, config: &InjectConfig) -> Result<Value, ApiError> {
    let allowed = json!({"allowed": true});
    // Only pods being created are mutated; the configuration sends nothing else, but a wider
    // one must not break other objects.
    if request["kind"]["kind"] != "Pod"
        || request["operation"] != "CREATE"
        || request["subResource"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    {
        return Ok(allowed);
    }
    let object = &request["object"];
    if !object.is_object() {
        return Err(ApiError::bad_request(
            "request.object is missing or not a Pod: a CREATE review carries the pod",
        ));
    }
    let namespace = request["namespace"].as_str().unwrap_or("");
    let name = object["metadata"]["name"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| generate_name(object));
    let mut pod = object.clone();
    match inject_pod(&mut pod, name.as_deref(), config, "") {
        Ok(Outcome::Injected) => {
            let patch = serde_json::to_vec(&json_patch(object, &pod))
                .map_err(|e| ApiError::internal(format!("cannot encode the patch: {e}")))?;
            tracing::info!(
                namespace,
                pod = name.as_deref().unwrap_or(""),
                "sidecar injected"
            );
            Ok(json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            }))
        }
        Ok(outcome) => {
            tracing::debug!(
                namespace,
                pod = name.as_deref().unwrap_or(""),
                ?outcome,
                "pod left unchanged"
            );
            Ok(allowed)
        }
        // The pod asked for injection (or lives in a namespace that did) with settings that
        // cannot work: refuse it with the reason rather than start it outside the mesh.
        Err(e) => {
            tracing::warn!(namespace, pod = name.as_deref().unwrap_or(""), error = %e, "pod refused");
            Ok(json!({
                "allowed": false,
                "status": {"code": 400, "reason": "BadRequest", "message": format!("capmesh injection: {e}")},
            }))
        }
    }
}

/// An RFC 6901 reference token: `~` → `~0`, `/` → `~1`.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The RFC 6902 JSON Patch that turns `before` into `after`, with operations on the fields one
/// level under the top (`/spec/containers`, `/metadata/annotations`): whole fields, so the
/// patch does not depend on list positions the API server might see differently.
pub fn json_patch(before: &Value, after: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    let (Some(b), Some(a)) = (before.as_object(), after.as_object()) else {
        if before != after {
            ops.push(json!({"op": "replace", "path": "", "value": after}));
        }
        return ops;
    };
    for (key, new) in a {
        let path = format!("/{}", escape(key));
        match (b.get(key), new) {
            (Some(old), _) if old == new => {}
            (Some(Value::Object(old)), Value::Object(new)) => {
                for (sub, value) in new {
                    let sub_path = format!("{path}/{}", escape(sub));
                    match old.get(sub) {
                        Some(prev) if prev == value => {}
                        Some(_) => {
                            ops.push(json!({"op": "replace", "path": sub_path, "value": value}))
                        }
                        None => ops.push(json!({"op": "add", "path": sub_path, "value": value})),
                    }
                }
                for sub in old.keys().filter(|k| !new.contains_key(*k)) {
                    ops.push(json!({"op": "remove", "path": format!("{path}/{}", escape(sub))}));
                }
            }
            (Some(_), _) => ops.push(json!({"op": "replace", "path": path, "value": new})),
            (None, _) => ops.push(json!({"op": "add", "path": path, "value": new})),
        }
    }
    for key in b.keys().filter(|k| !a.contains_key(*k)) {
        ops.push(json!({"op": "remove", "path": format!("/{}", escape(key))}));
    }
    ops
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use capmesh_api::TrustDomain;
    use std::time::Duration;

    fn config() -> InjectConfig {
        InjectConfig::new(TrustDomain::new("capmesh.local").unwrap())
    }

    #[test]
    fn the_patch_turns_the_original_into_the_injected_pod() {
        let before = json!({"metadata": {"name": "p", "labels": {"a/b": "1"}},
            "spec": {"containers": [{"name": "agent"}], "volumes": []}});
        let mut after = before.clone();
        inject_pod(&mut after, Some("p"), &config(), "").unwrap();
        let ops = json_patch(&before, &after);
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations",
                "/spec/containers",
                "/spec/initContainers",
                "/spec/volumes"
            ]
        );
        assert_eq!(ops[0]["op"], "add");
        assert_eq!(ops[1]["op"], "replace");
        assert_eq!(escape("capmesh.io/inject~x"), "capmesh.io~1inject~0x");
    }

    fn admission(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE", "namespace": "travel", "object": object}
        }))
        .unwrap()
    }

    #[test]
    fn a_review_is_answered_with_its_uid_and_a_base64_json_patch() {
        let pod = json!({"metadata": {"generateName": "weather-6d9f-", "labels": {"app": "weather"}},
            "spec": {"containers": [{"name": "agent", "image": "w:1"}]}});
        let answer = review(&admission(pod), &config()).unwrap();
        let r = &answer["response"];
        assert_eq!(r["uid"], "u-1");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        assert!(ops.iter().any(|o| o["path"] == "/spec/containers"));

        // Disabled, and bad settings (refused with the reason).
        let pod = json!({"metadata": {"labels": {"app": "w", "capmesh.io/inject": "disabled"}},
            "spec": {"containers": [{"name": "agent"}]}});
        let r = &review(&admission(pod), &config()).unwrap()["response"];
        assert_eq!(r["allowed"], true);
        assert!(r["patch"].is_null());
        let pod = json!({"metadata": {"labels": {"app": "w"}, "annotations": {"capmesh.io/agent-port": "x"}},
            "spec": {"containers": [{"name": "agent"}]}});
        let r = &review(&admission(pod), &config()).unwrap()["response"];
        assert_eq!(r["allowed"], false);
        assert!(
            r["status"]["message"]
                .as_str()
                .unwrap()
                .contains("capmesh.io/agent-port")
        );
    }

    #[test]
    fn bad_requests_are_refused_with_what_to_send() {
        let e = review(b"{not json", &config()).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.detail.contains("not JSON"), "{}", e.detail);
        let e = review(
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
            &config(),
        )
        .unwrap_err();
        assert!(e.detail.contains("admissionReviewVersions"), "{}", e.detail);
        let e = review(
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#,
            &config(),
        )
        .unwrap_err();
        assert!(e.detail.contains("request.uid"), "{}", e.detail);
    }

    #[test]
    fn a_replaced_certificate_is_served_without_a_restart() {
        use capmesh_certs::{Ca, Validity, WorkloadKey};
        let td = TrustDomain::new("capmesh.local").unwrap();
        let issue = || {
            let ca = Ca::generate(td.clone(), false).unwrap();
            let key = WorkloadKey::generate().unwrap();
            let id = crate::control_plane_identity(&td).unwrap();
            let ttl = Validity::for_ttl(Duration::from_secs(3600));
            let issued = ca
                .issue_serving(&key, &id, &["webhook.svc".to_owned()], &[], ttl)
                .unwrap();
            (issued.chain_pem, key.to_pem())
        };
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let leaf = |pem: &str| capmesh_certs::inspect::certs_from_pem(pem).unwrap()[0].clone();
        let (first, first_key) = issue();
        std::fs::write(&cert, &first).unwrap();
        std::fs::write(&key, &first_key).unwrap();
        let resolver = WebhookCert::load(&cert, &key).unwrap();
        assert_eq!(resolver.current().cert[0], leaf(&first));

        let (second, second_key) = issue();
        std::fs::write(&cert, &second).unwrap();
        std::fs::write(&key, &second_key).unwrap();
        assert_eq!(resolver.current().cert[0], leaf(&second));

        // A certificate without its key: the working pair stays.
        let (third, _) = issue();
        std::fs::write(&cert, &third).unwrap();
        assert_eq!(resolver.current().cert[0], leaf(&second));
        std::fs::write(&key, "garbage").unwrap();
        assert_eq!(resolver.current().cert[0], leaf(&second));

        // At start, a mismatch is an error naming both files.
        let err = WebhookCert::load(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("--webhook-tls-key"), "{err}");
    }
}
