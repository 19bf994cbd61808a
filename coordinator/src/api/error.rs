//! The one place where errors become HTTP answers: every handler returns [`ApiErr`], and its
//! `IntoResponse` gives the status and the JSON [`ApiError`] body.

use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use netpolicy::Diagnostic;
use serde::de::DeserializeOwned;
use ztnet_proto::admin::ApiError;

use crate::store::StoreError;

/// What a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiErr {
    /// No key, or a key that is not on record.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The request is malformed or a field is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The named network, node or token does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A name or prefix is taken.
    #[error("{0}")]
    Conflict(String),
    /// A policy was refused.
    #[error("{message}")]
    PolicyRefused {
        /// One sentence.
        message: String,
        /// Its findings.
        diagnostics: Vec<Diagnostic>,
    },
    /// Our own failure; details go to the log, not to the caller.
    #[error("internal error: {0}")]
    Internal(#[from] StoreError),
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let (status, diagnostics) = match &self {
            ApiErr::Unauthorized(_) => (StatusCode::UNAUTHORIZED, Vec::new()),
            ApiErr::BadRequest(_) => (StatusCode::BAD_REQUEST, Vec::new()),
            ApiErr::NotFound(_) => (StatusCode::NOT_FOUND, Vec::new()),
            ApiErr::Conflict(_) => (StatusCode::CONFLICT, Vec::new()),
            ApiErr::PolicyRefused { diagnostics, .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, diagnostics.clone())
            }
            ApiErr::Internal(e) => {
                tracing::error!(error = %e, "admin request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, Vec::new())
            }
        };
        let message = match &self {
            ApiErr::Internal(_) => "internal error; see the coordinator's log".to_string(),
            other => other.to_string(),
        };
        let body = ApiError {
            status: status.as_u16(),
            message,
            diagnostics,
        };
        (status, Json(body)).into_response()
    }
}

impl From<sqlx::Error> for ApiErr {
    fn from(e: sqlx::Error) -> Self {
        ApiErr::Internal(e.into())
    }
}

/// axum's default limit on a request body, in bytes.
const BODY_LIMIT: usize = 2 << 20;

/// A JSON body whose rejection is an [`ApiErr::BadRequest`] naming what is wrong.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiErr;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiErr> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiErr::BadRequest(format!(
                    "request body refused: it is larger than the {} MiB the admin API accepts \
                     (a policy file this large is not supported; split its groups or grants)",
                    BODY_LIMIT >> 20
                )))
            }
            Err(rejection) => Err(ApiErr::BadRequest(format!(
                "request body refused: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Answers an unknown path.
pub async fn not_found() -> ApiErr {
    ApiErr::NotFound("no such API path".into())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::extract::FromRequest;
    use axum::http::Request;

    use super::*;

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_in_words() {
        let body = format!("{{\"source\": \"{}\"}}", "x".repeat(BODY_LIMIT + 1));
        let req = Request::builder()
            .method("POST")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("a request");
        let refused = ApiJson::<serde_json::Value>::from_request(req, &()).await;
        let Err(ApiErr::BadRequest(text)) = refused else {
            panic!("a body over the limit was not refused as a bad request");
        };
        assert!(text.contains("larger than the 2 MiB"), "{text}");
        assert!(!text.contains("Failed to buffer"), "{text}");
    }
}
