//! The REST API (JSON). Reads need the admin token or a mesh certificate; changes need the
//! admin token (`Authorization: Bearer`) or an admin certificate
//! (`spiffe://<trust-domain>/ns/capmesh-system/agent/admin`). Errors are `{error, detail}`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use capmesh_api::rest::{
    CertificateRequest, EntityRequest, ErrorBody, RevocationRequest, TokenRequest,
};
use capmesh_api::{Dependency, DependencyTarget, MeshSettings, Policy, Selector};
use capmesh_certs::VerifiedPeer;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::App;
use crate::error::Error;
use crate::store::{Store, StoreError};

/// Largest accepted REST request body.
pub const MAX_BODY: usize = 1024 * 1024;

/// The response body type of every handler.
pub type Body = BoxBody<Bytes, Infallible>;

/// An error on its way to the client as `{error, detail}` with a status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short machine-readable code.
    pub error: &'static str,
    /// What went wrong and what to do.
    pub detail: String,
}

macro_rules! constructor {
    ($name:ident, $status:ident, $code:literal) => {
        /// An error with this status.
        pub fn $name(detail: impl Into<String>) -> Self {
            Self {
                status: StatusCode::$status,
                error: $code,
                detail: detail.into(),
            }
        }
    };
}

impl ApiError {
    constructor!(bad_request, BAD_REQUEST, "bad_request");
    constructor!(unauthorized, UNAUTHORIZED, "unauthorized");
    constructor!(forbidden, FORBIDDEN, "forbidden");
    constructor!(not_found, NOT_FOUND, "not_found");
    constructor!(conflict, CONFLICT, "conflict");
    constructor!(too_large, PAYLOAD_TOO_LARGE, "payload_too_large");
    constructor!(internal, INTERNAL_SERVER_ERROR, "internal");
    constructor!(method_not_allowed, METHOD_NOT_ALLOWED, "method_not_allowed");
    constructor!(unavailable, SERVICE_UNAVAILABLE, "store_unavailable");

    /// The HTTP response.
    pub fn into_response(self) -> Response<Body> {
        json(
            self.status,
            &ErrorBody {
                error: self.error.to_owned(),
                detail: self.detail,
            },
        )
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, error) = match &e {
            Error::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Denied(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self {
            status,
            error,
            detail: e.to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Error::from(e).into()
    }
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Who is calling, as proven by TLS and the `Authorization` header.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The client certificate's identity and issuer, if one was presented and is trusted now.
    pub peer: Option<VerifiedPeer>,
    /// Whether the caller holds the admin token or an admin certificate.
    pub admin: bool,
}

impl Caller {
    fn read(&self) -> Result<(), ApiError> {
        if self.admin || self.peer.is_some() {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "send the admin token as `Authorization: Bearer <token>` (see <data-dir>/admin-token) or a mesh certificate",
            ))
        }
    }

    fn write(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "this call changes the mesh: send the admin token as `Authorization: Bearer <token>` (see <data-dir>/admin-token)",
            ))
        }
    }
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes.
pub async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, ApiError> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::too_large(format!("the request body is over {MAX_BODY} bytes"))
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Routes one REST request.
pub async fn handle(app: Arc<App>, caller: Caller, req: Request<Incoming>) -> Response<Body> {
    match route(&app, &caller, req).await {
        Ok(resp) => resp,
        Err(e) => {
            if e.status == StatusCode::UNAUTHORIZED || e.status == StatusCode::FORBIDDEN {
                app.metrics.refuse(e.error);
            }
            e.into_response()
        }
    }
}

async fn route(
    app: &App,
    caller: &Caller,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let query = req.uri().query().map(str::to_owned);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "agents"]) => {
            caller.read()?;
            ok(&app.registry.agents())
        }
        (&Method::GET, ["v1", "agents", rest @ ..]) if !rest.is_empty() && rest.len() <= 2 => {
            caller.read()?;
            let (ns, name) = match rest {
                [name] => ("default", *name),
                [ns, name] => (*ns, *name),
                _ => unreachable_route()?,
            };
            let agent = app
                .registry
                .agents()
                .into_iter()
                .find(|a| a.namespace.as_str() == ns && a.name.as_str() == name)
                .ok_or_else(|| {
                    ApiError::not_found(format!("agent {ns}/{name} is not registered"))
                })?;
            ok(&agent)
        }
        (&Method::GET, ["v1", "traces"]) => {
            caller.read()?;
            let last = match query_param(query.as_deref(), "last") {
                None => 20,
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "last={n:?}: give a number of traces from 1 to 1000"
                        ))
                    })?,
            };
            ok(&app.observed.recent(last))
        }
        (&Method::GET, ["v1", "traces", trace_id]) => {
            caller.read()?;
            let id = trace_id.to_ascii_lowercase();
            if !capmesh_api::trace::is_hex_id(&id, 32) {
                return Err(ApiError::bad_request(format!(
                    "{trace_id:?} is not a trace id: give the 32 hex digits `capmesh call --trace` or `capmesh trace --last` printed"
                )));
            }
            let trace = app.observed.trace(&id).ok_or_else(|| {
                ApiError::not_found(format!(
                    "no span of trace {id} is held: it was not sampled, its spans have not arrived yet (they are sent once a second), or it left the window of the last {} traces (this replica's only)",
                    crate::spans::MAX_TRACES
                ))
            })?;
            ok(&trace)
        }
        (&Method::GET, ["v1", "capabilities"]) => {
            caller.read()?;
            ok(&app.registry.capabilities())
        }
        (&Method::GET, ["v1", "topology"]) => {
            caller.read()?;
            let deps = match query_param(query.as_deref(), "proxy") {
                Some(proxy) => {
                    if !app
                        .registry
                        .agents()
                        .iter()
                        .any(|a| a.instances.iter().any(|i| i.proxy_id == proxy))
                    {
                        return Err(ApiError::not_found(format!(
                            "no proxy with id {proxy:?} is registered"
                        )));
                    }
                    app.registry.dependencies(proxy)
                }
                None => vec![Dependency {
                    alias: None,
                    capability: DependencyTarget::All,
                    selector: Selector::default(),
                }],
            };
            let (mut snapshot, _) = app.registry.snapshot(&deps);
            // The session key is for proxies only.
            snapshot.settings.session_key.clear();
            ok(&snapshot)
        }
        (&Method::POST, ["v1", "certificates"]) => {
            let body: CertificateRequest = read_json(req.into_body()).await?;
            let resp = crate::ca::issue(app, caller.peer.as_ref(), &body).await?;
            app.metrics.certificates_issued.inc();
            ok(&resp)
        }
        (&Method::GET, ["v1", "entities"]) => {
            caller.read()?;
            ok(&app.store.entities().await?)
        }
        (&Method::POST, ["v1", "entities"]) => {
            caller.write()?;
            let body: EntityRequest = read_json(req.into_body()).await?;
            let entity = crate::entities::register(app, body).await?;
            Ok(json(StatusCode::CREATED, &entity))
        }
        (&Method::DELETE, ["v1", "entities", name]) => {
            caller.write()?;
            ok(&crate::entities::revoke(app, name).await?)
        }
        (&Method::GET, ["v1", "tokens"]) => {
            caller.write()?;
            let infos: Vec<_> = app
                .store
                .tokens()
                .await?
                .into_iter()
                .map(|t| t.info)
                .collect();
            ok(&infos)
        }
        (&Method::POST, ["v1", "tokens"]) => {
            caller.write()?;
            let body: TokenRequest = read_json(req.into_body()).await?;
            let created =
                crate::ca::create_token(app.store.as_ref(), body, app.max_token_ttl).await?;
            Ok(json(StatusCode::CREATED, &created))
        }
        (&Method::DELETE, ["v1", "tokens", id]) => {
            caller.write()?;
            let info = app.store.revoke_token(id).await?;
            tracing::info!(id = %id, "bootstrap token revoked");
            ok(&info)
        }
        (&Method::GET, ["v1", "revocations"]) => {
            caller.read()?;
            ok(&app.store.revocations().await?)
        }
        (&Method::POST, ["v1", "revocations"]) => {
            caller.write()?;
            let body: RevocationRequest = read_json(req.into_body()).await?;
            let revocation = crate::revocations::revoke(app, body).await?;
            Ok(json(StatusCode::CREATED, &revocation))
        }
        (&Method::DELETE, ["v1", "revocations", id]) => {
            caller.write()?;
            ok(&crate::revocations::lift(app, id).await?)
        }
        (&Method::GET, ["v1", "policies"]) => {
            caller.read()?;
            ok(&app.store.policy().await?.unwrap_or_default())
        }
        (&Method::PUT, ["v1", "policies"]) => {
            caller.write()?;
            let policy: Policy = read_json(req.into_body()).await?;
            policy
                .validate()
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            app.store.set_policy(&policy).await?;
            app.registry.set_policy(policy.clone());
            tracing::info!(
                rules = policy.rules.len(),
                provide = policy.provide.len(),
                "policy replaced"
            );
            ok(&policy)
        }
        (&Method::GET, ["v1", "settings"]) => {
            caller.read()?;
            ok(&app.registry.settings())
        }
        (&Method::PUT, ["v1", "settings"]) => {
            caller.write()?;
            let body: serde_json::Value = read_json(req.into_body()).await?;
            let settings = MeshSettings::from_request(&body)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            app.store.set_settings(&settings).await?;
            app.registry.set_settings(settings);
            tracing::info!("mesh settings replaced");
            ok(&app.registry.settings())
        }
        (
            _,
            [
                "v1",
                "agents" | "capabilities" | "topology" | "certificates" | "entities" | "tokens"
                | "policies" | "revocations" | "settings",
                ..,
            ],
        ) => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {path}"
        ))),
        _ => Err(ApiError::not_found(format!(
            "no API at {path}: see docs/control-plane.md for the endpoints"
        ))),
    }
}

fn unreachable_route<T>() -> Result<T, ApiError> {
    Err(ApiError::not_found(
        "no such agent path: use /v1/agents/<name> or /v1/agents/<namespace>/<name>",
    ))
}

fn ok<T: Serialize>(value: &T) -> Result<Response<Body>, ApiError> {
    Ok(json(StatusCode::OK, value))
}
