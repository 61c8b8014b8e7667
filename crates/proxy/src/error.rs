//! Every failure of the data path, classified once and turned into an HTTP response here only.

use http::{HeaderValue, Response, StatusCode, header};
use larder_telemetry::UpstreamErrorKind;

use crate::body::{ProxyBody, full};
use crate::upstream::{ClientFault, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent something we will not forward.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("no route for this host and path")]
    NoRoute,
    /// The client may not do this (a `PURGE` from outside the allowed networks).
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("request body exceeds the configured limit")]
    PayloadTooLarge,
    /// `Cache-Control: only-if-cached` and nothing usable is stored (RFC 9111 §5.2.1.7).
    #[error("only-if-cached: nothing usable is stored")]
    OnlyIfCached,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The origin failed and the stored response may not be used without it.
    #[error("origin unavailable and the stored response must be revalidated: {0}")]
    MustRevalidate(Box<ProxyError>),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::OnlyIfCached | ProxyError::MustRevalidate(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(e) => match (e.client_fault, e.kind) {
                (Some(ClientFault::BodyTooLarge), _) => StatusCode::PAYLOAD_TOO_LARGE,
                (Some(ClientFault::BadBody), _) => StatusCode::BAD_REQUEST,
                (Some(ClientFault::BodyTimeout), _) => StatusCode::REQUEST_TIMEOUT,
                (None, UpstreamErrorKind::Timeout) => StatusCode::GATEWAY_TIMEOUT,
                (None, UpstreamErrorKind::NoEndpoint | UpstreamErrorKind::Overflow) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                (None, UpstreamErrorKind::Connect | UpstreamErrorKind::Protocol) => {
                    StatusCode::BAD_GATEWAY
                }
            },
        }
    }

    /// A short text a human can act on; internal details stay in the logs.
    fn body(&self) -> String {
        match self {
            ProxyError::BadRequest(why) => format!("bad request: {why}\n"),
            ProxyError::NotImplemented(what) => format!("{what}\n"),
            ProxyError::NoRoute => "no route matches this host and path\n".into(),
            ProxyError::Forbidden(why) => format!("forbidden: {why}\n"),
            ProxyError::PayloadTooLarge => "request body too large\n".into(),
            ProxyError::OnlyIfCached => "only-if-cached: no stored response\n".into(),
            ProxyError::MustRevalidate(_) => {
                "upstream unavailable; the cached response must be revalidated\n".into()
            }
            ProxyError::Upstream(e) if e.client_fault == Some(ClientFault::BodyTooLarge) => {
                "request body too large\n".into()
            }
            ProxyError::Upstream(e) if e.client_fault == Some(ClientFault::BadBody) => {
                "bad request: malformed or incomplete request body\n".into()
            }
            ProxyError::Upstream(e) if e.client_fault == Some(ClientFault::BodyTimeout) => {
                "request body timed out\n".into()
            }
            ProxyError::Upstream(e) => match e.kind {
                UpstreamErrorKind::Timeout => "upstream timed out\n".into(),
                UpstreamErrorKind::NoEndpoint => "no upstream endpoint available\n".into(),
                UpstreamErrorKind::Overflow => match e.breaker {
                    Some(breaker) => format!(
                        "upstream circuit breaker open ({}): too many requests for this cluster\n",
                        breaker.as_str()
                    ),
                    None => "upstream circuit breaker open\n".into(),
                },
                UpstreamErrorKind::Connect => "upstream connect error\n".into(),
                UpstreamErrorKind::Protocol => "upstream sent an invalid response\n".into(),
            },
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(full(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // A client that sent something unparseable gets no second chance on this connection:
        // whatever follows could be a smuggled request.
        let bad_framing = matches!(&self, ProxyError::Upstream(e) if e.client_fault.is_some());
        if matches!(self, ProxyError::BadRequest(_)) || bad_framing {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
