//! The daemon's HTTP endpoint (`[metrics] listen`), on hyper over the
//! daemon's tokio runtime:
//!
//! | path | what |
//! |---|---|
//! | `/metrics` | Prometheus text exposition (every `castor_*` metric and gauge) |
//! | `/status` | the [`Status`](crate::status::Status) as JSON (`castor status --json` prints the same) |
//! | `/` | the live status page: plain HTML with a little JavaScript that polls `/status` and draws its plots as inline SVG (no build step, no external assets) |
//!
//! Read-only: nothing on this endpoint changes the daemon (that is the
//! control socket's job, which only root reaches).

use crate::status::StatusBoard;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

/// The status page (served at `/`).
pub const PAGE: &str = include_str!("status_page.html");

/// Serves the endpoint on `listener` until the runtime ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
    board: Arc<StatusBoard>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("http endpoint: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let board = board.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let r = respond(&req, metrics.as_ref(), &board);
                async move { Ok::<_, Infallible>(r) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("http endpoint: {e}");
            }
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn respond(
    req: &Request<Incoming>,
    metrics: Option<&PrometheusHandle>,
    board: &StatusBoard,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n",
        );
    }
    match req.uri().path() {
        "/metrics" => match metrics {
            Some(h) => reply(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "no metrics recorder in this process\n",
            ),
        },
        "/status" => match serde_json::to_vec(&board.snapshot()) {
            Ok(body) => reply(StatusCode::OK, "application/json", body),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("{e}\n"),
            ),
        },
        "/" | "/index.html" | "/status.html" => {
            reply(StatusCode::OK, "text/html; charset=utf-8", PAGE)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /, /status or /metrics\n",
        ),
    }
}

/// The endpoint's address as a URL, for log lines.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}
