//! JSON calls to the control plane's REST API (`/v1/...`).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use capmesh_api::ErrorBody;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::connect::{ConnTask, drive, negotiated_h2};
use crate::{ClientError, ControlPlaneClient};

/// The largest REST response body read, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// How long one REST call may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl ControlPlaneClient {
    /// `GET path`, answer read as `T`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<T, ClientError> {
        self.request(Method::GET, path, None::<&()>, bearer).await
    }

    /// `POST path` with `body` as JSON, answer read as `T`.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        bearer: Option<&str>,
    ) -> Result<T, ClientError> {
        self.request(Method::POST, path, Some(body), bearer).await
    }

    /// `PUT path` with `body` as JSON, answer read as `T`.
    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        bearer: Option<&str>,
    ) -> Result<T, ClientError> {
        self.request(Method::PUT, path, Some(body), bearer).await
    }

    /// `DELETE path`, answer read as `T` (use `()` for an empty answer).
    pub async fn delete<T: DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<T, ClientError> {
        self.request(Method::DELETE, path, None::<&()>, bearer)
            .await
    }

    /// One JSON call on a fresh connection (HTTP/2 when the server offers it, else HTTP/1.1).
    ///
    /// `bearer` is sent as `Authorization: Bearer <token>`. A non-2xx answer becomes
    /// [`ClientError::Api`] with the body's `{error, detail}` (or its raw text). An empty
    /// answer reads as JSON `null`, so `T = ()` or `Option<_>` accepts a 204.
    pub async fn request<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        bearer: Option<&str>,
    ) -> Result<T, ClientError> {
        let call = self.call(method, path, body, bearer);
        let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    url: self.url().to_string(),
                    stage: "a request to",
                    after: REQUEST_TIMEOUT,
                });
            }
        };
        let json: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"null"
        } else {
            &bytes
        };
        serde_json::from_slice(json).map_err(|e| ClientError::Decode {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    }

    async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        bearer: Option<&str>,
    ) -> Result<Bytes, ClientError> {
        let invalid = |detail: String| ClientError::InvalidPath {
            path: path.to_owned(),
            detail,
        };
        if !path.starts_with('/') {
            return Err(invalid("it must start with '/'".to_owned()));
        }
        // Checked before connecting, so a bad path costs no round trip.
        let path_and_query =
            http::uri::PathAndQuery::try_from(path).map_err(|e| invalid(e.to_string()))?;
        let payload = match body {
            Some(body) => Some(serde_json::to_vec(body).map_err(|e| ClientError::Decode {
                path: path.to_owned(),
                detail: format!("the request body does not serialize: {e}"),
            })?),
            None => None,
        };

        let (tls, target) = self.connect().await?;
        let url = target.to_string();
        let h2 = negotiated_h2(&tls);
        let authority = target.authority();
        // HTTP/2 carries scheme and authority as pseudo-headers, taken from an absolute URI;
        // HTTP/1.1 takes the origin form and a Host header.
        let uri = if h2 {
            Uri::builder()
                .scheme("https")
                .authority(authority.as_str())
                .path_and_query(path_and_query)
                .build()
        } else {
            Uri::builder().path_and_query(path_and_query).build()
        }
        .map_err(|e| invalid(e.to_string()))?;
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(ACCEPT, "application/json");
        if !h2 {
            request = request.header(HOST, authority.as_str());
        }
        if let Some(token) = bearer {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ClientError::InvalidToken)?;
            request = request.header(AUTHORIZATION, value);
        }
        if payload.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(payload.unwrap_or_default())))
            .map_err(|e| invalid(e.to_string()))?;

        let http = |source| ClientError::Http {
            url: url.clone(),
            source,
        };
        let io = TokioIo::new(tls);
        // The connection task is aborted when `_conn` drops, once the answer is read.
        let answer = if h2 {
            let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(http)?;
            let _conn = ConnTask(tokio::spawn(drive("rest h2", conn)));
            let response = send.send_request(request).await.map_err(http)?;
            read_answer(response, path, &http).await?
        } else {
            let (mut send, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await
                .map_err(http)?;
            let _conn = ConnTask(tokio::spawn(drive("rest http/1.1", conn)));
            let response = send.send_request(request).await.map_err(http)?;
            read_answer(response, path, &http).await?
        };
        Ok(answer)
    }
}

/// The whole answer's body, or the error it carries.
async fn read_answer(
    response: http::Response<Incoming>,
    path: &str,
    http: &impl Fn(hyper::Error) -> ClientError,
) -> Result<Bytes, ClientError> {
    let status = response.status();
    let limit = if status.is_success() {
        MAX_RESPONSE_BYTES
    } else {
        MAX_ERROR_BYTES
    };
    let bytes = read_bounded(response.into_body(), limit)
        .await
        .map_err(|e| match e {
            BoundedError::TooLarge => ClientError::TooLarge {
                path: path.to_owned(),
                limit,
            },
            BoundedError::Http(source) => http(source),
        })?;
    if !status.is_success() {
        return Err(api_error(status, &bytes));
    }
    Ok(bytes)
}

/// The largest error body read, in bytes; errors are a short JSON object.
pub(crate) const MAX_ERROR_BYTES: usize = 64 * 1024;

pub(crate) enum BoundedError {
    TooLarge,
    Http(hyper::Error),
}

/// Reads a whole body, refusing one over `limit` bytes before buffering it.
pub(crate) async fn read_bounded(mut body: Incoming, limit: usize) -> Result<Bytes, BoundedError> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BoundedError::Http)?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(BoundedError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// An error answer as [`ClientError::Api`]: the JSON `{error, detail}` when the body is one,
/// else the status's reason and the body's text.
pub(crate) fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error, detail }) => ClientError::Api {
            status: status.as_u16(),
            error,
            detail,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            ClientError::Api {
                status: status.as_u16(),
                error: status
                    .canonical_reason()
                    .unwrap_or("error")
                    .to_ascii_lowercase()
                    .replace(' ', "_"),
                detail: if text.is_empty() {
                    "(the answer had no body)".to_owned()
                } else {
                    truncate(text, 1024)
                },
            }
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_read_as_sent_or_fall_back_to_the_text() {
        let err = api_error(
            StatusCode::FORBIDDEN,
            br#"{"error":"forbidden","detail":"use the admin token"}"#,
        );
        assert!(matches!(
            &err,
            ClientError::Api { status: 403, error, detail }
                if error == "forbidden" && detail == "use the admin token"
        ));
        assert_eq!(
            err.to_string(),
            "the control plane answered 403 (forbidden): use the admin token"
        );

        let err = api_error(StatusCode::BAD_GATEWAY, b"upstream down\n");
        assert!(matches!(
            &err,
            ClientError::Api { status: 502, error, detail }
                if error == "bad_gateway" && detail == "upstream down"
        ));
        let err = api_error(StatusCode::NOT_FOUND, b"");
        assert!(err.to_string().contains("no body"), "{err}");
        let long = "é".repeat(2000);
        let err = api_error(StatusCode::INTERNAL_SERVER_ERROR, long.as_bytes());
        assert!(err.to_string().ends_with("..."), "{err}");
    }
}
