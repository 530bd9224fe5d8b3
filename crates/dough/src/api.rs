//! The HTTP API of `dough serve`: routes, bearer-token auth, JSON errors,
//! Server-Sent Events, Prometheus metrics and the OpenAPI document. The
//! document is generated from [`ROUTES`]; `tests/serve.rs` checks it
//! against what the router really serves.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dough_core::service::{Service, SubmitError, TaskEvent};
use dough_core::store::{State as TaskState, StoreError, TaskRequest};
use serde_json::json;

/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct Api {
    pub svc: Service,
    pub token: Arc<String>,
}

/// Every route: method, path (OpenAPI syntax), needs auth, summary.
pub const ROUTES: &[(&str, &str, bool, &str)] = &[
    (
        "get",
        "/",
        false,
        "The web dashboard: one static page (no token needed to load it; it asks for the token and keeps it in the browser tab)",
    ),
    (
        "get",
        "/healthz",
        false,
        "Liveness of the daemon (no token needed)",
    ),
    ("get", "/metrics", true, "Prometheus metrics"),
    ("get", "/openapi.json", true, "This document"),
    ("post", "/v1/tasks", true, "Submit a task; 201 with its id"),
    (
        "get",
        "/v1/nodes",
        true,
        "Nodes: state, capacity, use, last heartbeat",
    ),
    (
        "post",
        "/v1/nodes/{name}/drain",
        true,
        "Drain a node: it finishes its tasks and takes no new ones",
    ),
    (
        "delete",
        "/v1/nodes/{name}/drain",
        true,
        "End a node's drain: it takes tasks again",
    ),
    (
        "get",
        "/v1/tasks",
        true,
        "List tasks, newest first (?state=, ?limit=)",
    ),
    (
        "get",
        "/v1/tasks/{id}",
        true,
        "A task: state, transitions, exit code, reason",
    ),
    (
        "delete",
        "/v1/tasks/{id}",
        true,
        "Cancel a task (SIGTERM, grace, SIGKILL, teardown); ?purge=true instead deletes a finished task with all kept for it (409 while it runs)",
    ),
    (
        "get",
        "/v1/tasks/{id}/egress",
        true,
        "The task's egress record: DNS questions, flows allowed (with bytes) and blocked (with the rule); written when its VM is torn down",
    ),
    (
        "get",
        "/v1/tasks/{id}/provenance",
        true,
        "The task's signed provenance statement (a DSSE envelope of an in-toto statement, SLSA provenance predicate)",
    ),
    (
        "get",
        "/v1/keys",
        true,
        "The public keys provenance statements are signed with",
    ),
    (
        "get",
        "/v1/tasks/{id}/logs",
        true,
        "Stored output (stdout and stderr, in order)",
    ),
    (
        "get",
        "/v1/tasks/{id}/events",
        true,
        "Server-Sent Events: state changes and output as they happen; ?offset=N first replays the stored output from byte N",
    ),
    (
        "get",
        "/v1/pools",
        true,
        "Warm pools: shape, size, idle and booting VMs, claims, replacements",
    ),
];

pub fn router(api: Api) -> Router {
    let r = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/tasks", post(create).get(list))
        .route("/v1/tasks/{id}", get(show).delete(cancel))
        .route("/v1/tasks/{id}/logs", get(logs))
        .route("/v1/tasks/{id}/egress", get(egress))
        .route("/v1/tasks/{id}/provenance", get(provenance))
        .route("/v1/keys", get(keys))
        .route("/v1/tasks/{id}/events", get(events))
        .route("/v1/pools", get(pools))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}/drain", post(drain).delete(undrain));
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(api.clone(), auth))
        .with_state(api)
}

pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

async fn auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    // The dashboard's page holds no data: every call it makes carries the
    // token.
    if matches!(req.uri().path(), "/healthz" | "/") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing 'Authorization: Bearer <token>' (the token is in <state dir>/api-token)",
        ),
        Some(t) if constant_time_eq(t.as_bytes(), api.token.as_bytes()) => next.run(req).await,
        Some(_) => error(StatusCode::UNAUTHORIZED, "unauthorized", "wrong token"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The dashboard, embedded in the binary (no build step, no files).
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({"ok": true})).into_response()
}

fn submit_error(e: SubmitError) -> Response {
    match e {
        SubmitError::Invalid(m) => error(StatusCode::BAD_REQUEST, "invalid", m),
        SubmitError::Impossible(m) => error(StatusCode::UNPROCESSABLE_ENTITY, "impossible", m),
        SubmitError::NotFound(id) => error(
            StatusCode::NOT_FOUND,
            "no_such_task",
            format!("no task {id}"),
        ),
        e @ SubmitError::Finished(..) => error(StatusCode::CONFLICT, "finished", e.to_string()),
        e @ SubmitError::InFlight(..) => error(StatusCode::CONFLICT, "in_flight", e.to_string()),
        SubmitError::Store(e) if e.is_full() => error(
            StatusCode::INSUFFICIENT_STORAGE,
            "state_full",
            format!("the daemon's state directory is full; free space there and retry ({e})"),
        ),
        SubmitError::Store(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

/// Past [`MAX_BODY`] a body is still read (and dropped) up to this size,
/// so a client that writes it all before reading gets the 413 rather than
/// a broken pipe.
const DRAIN_LIMIT: usize = 1 << 20;

async fn create(State(api): State<Api>, body: Body) -> Response {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut total = 0usize;
    loop {
        let next = std::future::poll_fn(|cx| {
            futures_core::Stream::poll_next(std::pin::Pin::new(&mut stream), cx)
        })
        .await;
        match next {
            None => break,
            Some(Ok(chunk)) => {
                total += chunk.len();
                if total <= MAX_BODY {
                    bytes.extend_from_slice(&chunk);
                } else if total > DRAIN_LIMIT {
                    break;
                }
            }
            Some(Err(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("reading the body: {e}"),
                )
            }
        }
    }
    if total > MAX_BODY {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is larger than {MAX_BODY} bytes"),
        );
    }
    let req: TaskRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", format!("{e}")),
    };
    match api.svc.submit(req) {
        Ok(t) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/v1/tasks/{}", t.id))],
            axum::Json(json!({"id": t.id, "state": t.state})),
        )
            .into_response(),
        Err(e) => submit_error(e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(api): State<Api>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "query parameters: state, limit (a number)",
        );
    };
    let state = match q.state.as_deref().map(TaskState::parse) {
        None => None,
        Some(Some(s)) => Some(s),
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("unknown state '{}'", q.state.unwrap_or_default()),
            )
        }
    };
    let limit = q.limit.unwrap_or(100).min(10_000);
    match api.svc.store().list(state, limit) {
        Ok(v) => axum::Json(json!({"tasks": v})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

async fn show(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match api.svc.get(&id) {
        Ok(t) => axum::Json(t).into_response(),
        Err(e) => submit_error(e),
    }
}

#[derive(serde::Deserialize)]
struct CancelQuery {
    purge: Option<bool>,
}

async fn cancel(
    State(api): State<Api>,
    Path(id): Path<String>,
    q: Result<Query<CancelQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "query parameters: purge (true or false)",
        );
    };
    if q.purge == Some(true) {
        return match api.svc.delete(&id) {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => submit_error(e),
        };
    }
    match api.svc.cancel(&id) {
        Ok(t) => (StatusCode::ACCEPTED, axum::Json(t)).into_response(),
        Err(e) => submit_error(e),
    }
}

/// A stored JSON document of a task's, or 404 saying why there is none.
fn artifact(api: &Api, id: &str, kind: dough_core::store::Artifact, none: &str) -> Response {
    match api.svc.artifact(id, kind) {
        Ok(Some(body)) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            &format!("no_{}", kind.as_str()),
            format!("task {id} has no {none}"),
        ),
        Err(e) => submit_error(e),
    }
}

async fn egress(State(api): State<Api>, Path(id): Path<String>) -> Response {
    artifact(
        &api,
        &id,
        dough_core::store::Artifact::Egress,
        "egress record (it is written when the task's VM is torn down; a task without a network has none)",
    )
}

async fn provenance(State(api): State<Api>, Path(id): Path<String>) -> Response {
    artifact(
        &api,
        &id,
        dough_core::store::Artifact::Provenance,
        "provenance statement (it is signed when the task ends)",
    )
}

async fn keys(State(api): State<Api>) -> Response {
    axum::Json(json!({"keys": api.svc.public_keys()})).into_response()
}

/// The stored output, streamed from the store a page at a time (the daemon
/// never holds a task's whole output for a reader).
async fn logs(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let t = match api.svc.get(&id) {
        Ok(t) => t,
        Err(e) => return submit_error(e),
    };
    let marker = t.output_truncated.then(|| {
        format!(
            "\n[dough: output truncated here, at the {} byte limit]\n",
            api.svc.config().output_cap
        )
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let svc = api.svc.clone();
    tokio::spawn(async move {
        let mut from = 0u64;
        loop {
            let page = match stored_page(&svc, &id, from).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            };
            if page.is_empty() {
                break;
            }
            let mut buf = Vec::with_capacity(REPLAY_PAGE);
            for (_, at, data) in page {
                from = at + data.len() as u64;
                buf.extend_from_slice(&data);
            }
            if tx.send(Ok(buf)).await.is_err() {
                return;
            }
        }
        if let Some(m) = marker {
            let _ = tx.send(Ok(m.into_bytes())).await;
        }
    });
    let mut r = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if t.output_truncated {
        r.headers_mut().insert(
            header::HeaderName::from_static("x-dough-truncated"),
            HeaderValue::from_static("true"),
        );
    }
    r
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    offset: Option<u64>,
}

/// Stored output sent per replay read: a slow client never makes the
/// daemon hold more than this (plus its bounded event queue) for it.
const REPLAY_PAGE: usize = 256 * 1024;

/// About [`REPLAY_PAGE`] bytes of a task's stored output from byte `from`
/// on, read off the runtime's threads: (stream, offset, bytes) in order;
/// empty past the end.
async fn stored_page(
    svc: &Service,
    id: &str,
    from: u64,
) -> Result<Vec<(u8, u64, Vec<u8>)>, String> {
    let (svc, id) = (svc.clone(), id.to_string());
    match tokio::task::spawn_blocking(move || svc.store().output_from(&id, from, REPLAY_PAGE)).await
    {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Send the stored output from byte `from` on as `output` events; the
/// offset after the last byte sent, or None when the client went away.
async fn replay(
    svc: &Service,
    id: &str,
    mut from: u64,
    tx: &tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>,
) -> Option<u64> {
    loop {
        let page = stored_page(svc, id, from).await.ok()?;
        if page.is_empty() {
            return Some(from);
        }
        for (stream, at, data) in page {
            let ev = TaskEvent::Output {
                stream: if stream == 2 { "stderr" } else { "stdout" },
                offset: at,
                data: String::from_utf8_lossy(&data).into_owned(),
            };
            tx.send(sse(&ev)).await.ok()?;
            from = at + data.len() as u64;
        }
    }
}

/// Server-Sent Events of a task. Without `offset`: the current state, then
/// what happens. With `offset=N`: first the stored output from byte N on,
/// then the current state, then what happens, every output byte exactly
/// once and in order; a client too slow for the live stream is caught up
/// from the store instead of being sent a `lagged` event.
async fn events(
    State(api): State<Api>,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "query parameters: offset (a byte offset)",
        );
    };
    if api.svc.store().is_shared() {
        return follow_store(api.svc.clone(), id, q.offset).await;
    }
    // Subscribe first, then read the state: no transition falls in between.
    let mut rx = api.svc.subscribe(&id);
    let t = match api.svc.get(&id) {
        Ok(t) => t,
        Err(e) => {
            drop(rx);
            api.svc.release(&id);
            return submit_error(e);
        }
    };
    let first = TaskEvent::state_of(&t);
    let done = t.state.is_terminal();
    let svc = api.svc.clone();
    let stream = async_stream(move |tx| async move {
        // The next output byte this client is owed (None: live only).
        let mut next = q.offset;
        if let Some(from) = next {
            next = replay(&svc, &id, from, &tx).await;
            if next.is_none() {
                svc.release(&id);
                return;
            }
        }
        if tx.send(sse(&first)).await.is_err() || done {
            drop(rx);
            svc.release(&id);
            return;
        }
        loop {
            match rx.recv().await {
                Ok(TaskEvent::Output {
                    stream,
                    offset,
                    data,
                }) if next.is_some() => {
                    let n = next.unwrap_or(0);
                    let end = offset + data.len() as u64;
                    if end <= n {
                        continue;
                    }
                    if offset > n {
                        // Missed (published before we subscribed, or
                        // while we lagged): the store has it.
                        match replay(&svc, &id, n, &tx).await {
                            Some(m) if m >= end => {
                                next = Some(m);
                                continue;
                            }
                            Some(m) => next = Some(m),
                            None => return,
                        }
                    }
                    let n = next.unwrap_or(0);
                    let skip = n.saturating_sub(offset) as usize;
                    let ev = TaskEvent::Output {
                        stream,
                        offset: offset + skip as u64,
                        data: data.get(skip..).unwrap_or("").to_string(),
                    };
                    if tx.send(sse(&ev)).await.is_err() {
                        return;
                    }
                    next = Some(end);
                }
                Ok(ev) => {
                    let end = matches!(&ev, TaskEvent::State { state, .. } if state.is_terminal());
                    if end {
                        // Everything stored goes out before the end.
                        if let Some(n) = next {
                            if replay(&svc, &id, n, &tx).await.is_none() {
                                return;
                            }
                        }
                    }
                    if tx.send(sse(&ev)).await.is_err() || end {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    if let Some(from) = next {
                        match replay(&svc, &id, from, &tx).await {
                            Some(m) => next = Some(m),
                            None => return,
                        }
                        continue;
                    }
                    let ev = SseEvent::default()
                        .event("lagged")
                        .data(json!({"missed": n}).to_string());
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    // The channel closed (the task ended while we lagged):
                    // the rest from the store, then the final state.
                    if let Some(n) = next {
                        if replay(&svc, &id, n, &tx).await.is_none() {
                            return;
                        }
                    }
                    if let Ok(t) = svc.get(&id) {
                        let ev = TaskEvent::state_of(&t);
                        let _ = tx.send(sse(&ev)).await;
                    }
                    return;
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// How often a task followed through the store is read.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// [`events`] in a cluster: the task may run on another node, so its
/// states and output are read from the store every [`FOLLOW_EVERY`]
/// instead of this process's channels. The same stream: (with `offset`)
/// the stored output from there, the current state, then every new
/// transition and output byte, in order, ending with the final state.
async fn follow_store(svc: Service, id: String, offset: Option<u64>) -> Response {
    let get = |svc: &Service, id: &str| {
        let (svc, id) = (svc.clone(), id.to_string());
        async move {
            tokio::task::spawn_blocking(move || svc.get(&id))
                .await
                .map_err(|e| SubmitError::Store(StoreError::Corrupt(e.to_string())))?
        }
    };
    let t = match get(&svc, &id).await {
        Ok(t) => t,
        Err(e) => return submit_error(e),
    };
    let stream = async_stream(move |tx| async move {
        // Without an offset: live output only, from what is stored now.
        let mut next = offset.unwrap_or(t.output_bytes);
        if offset.is_some() {
            match replay(&svc, &id, next, &tx).await {
                Some(n) => next = n,
                None => return,
            }
        }
        if tx.send(sse(&TaskEvent::state_of(&t))).await.is_err() || t.state.is_terminal() {
            return;
        }
        let mut seen = t.transitions.len();
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            let Ok(t) = get(&svc, &id).await else { return };
            // Output first: a task's output is stored before its end.
            match replay(&svc, &id, next, &tx).await {
                Some(n) => next = n,
                None => return,
            }
            let new = t.transitions.get(seen..).unwrap_or_default();
            for (i, tr) in new.iter().enumerate() {
                let ev = if i + 1 == new.len() {
                    TaskEvent::state_of(&t)
                } else {
                    TaskEvent::State {
                        state: tr.state,
                        at_ms: tr.at_ms,
                        reason: tr.reason.clone(),
                        exit_code: None,
                    }
                };
                if tx.send(sse(&ev)).await.is_err() {
                    return;
                }
            }
            seen = t.transitions.len();
            if t.state.is_terminal() {
                return;
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn sse(ev: &TaskEvent) -> Result<SseEvent, Infallible> {
    let name = match ev {
        TaskEvent::State { .. } => "state",
        TaskEvent::Output { .. } => "output",
    };
    Ok(SseEvent::default()
        .event(name)
        .data(serde_json::to_string(ev).expect("event serializes")))
}

/// A stream fed by a task writing into a channel.
fn async_stream<F, Fut>(f: F) -> impl futures_core::Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Small: a client that does not read holds at most this many events.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn pools(State(api): State<Api>) -> Response {
    let pools = api.svc.pools().map(|p| p.status()).unwrap_or_default();
    axum::Json(json!({ "pools": pools })).into_response()
}

async fn drain(State(api): State<Api>, Path(name): Path<String>) -> Response {
    set_drain(api, name, true).await
}

async fn undrain(State(api): State<Api>, Path(name): Path<String>) -> Response {
    set_drain(api, name, false).await
}

/// Drain node `name`, or end its drain: the node record as it is then;
/// 404 for no such node, 409 for a node not in the state to change from.
async fn set_drain(api: Api, name: String, drain: bool) -> Response {
    let svc = api.svc.clone();
    let n = name.clone();
    let node = match tokio::task::spawn_blocking(move || svc.store().drain_node(&n, drain)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    };
    let (want, from) = if drain {
        ("draining", "up")
    } else {
        ("up", "draining")
    };
    match node {
        None => error(
            StatusCode::NOT_FOUND,
            "node_not_found",
            format!("no node {name:?} (dough nodes lists them)"),
        ),
        Some(n) if n.state == want => axum::Json(n).into_response(),
        Some(n) => error(
            StatusCode::CONFLICT,
            "node_state",
            format!(
                "node {name:?} is {}: only a node that is {from} can be {}",
                n.state,
                if drain { "drained" } else { "taken back" }
            ),
        ),
    }
}

/// Every node on record (this daemon's own line is its heartbeat of the
/// last second), with the time of the answer to judge heartbeats by.
async fn nodes(State(api): State<Api>) -> Response {
    let svc = api.svc.clone();
    match tokio::task::spawn_blocking(move || svc.store().nodes()).await {
        Ok(Ok(nodes)) => {
            axum::Json(json!({ "now_ms": dough_core::store::now_ms(), "nodes": nodes }))
                .into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    use std::fmt::Write;
    let mut s = String::new();
    let counts = api.svc.store().counts().unwrap_or_default();
    let _ = writeln!(
        s,
        "# HELP dough_tasks Tasks by state.\n# TYPE dough_tasks gauge"
    );
    for (st, n) in &counts {
        let _ = writeln!(s, "dough_tasks{{state=\"{st}\"}} {n}");
    }
    let u = api.svc.usage();
    let lim = api.svc.config().limits;
    for (name, help, kind, v) in [
        (
            "dough_vms_running",
            "VMs running now.",
            "gauge",
            u.running_vms as f64,
        ),
        (
            "dough_vcpus_allocated",
            "vCPUs of running VMs.",
            "gauge",
            u.vcpus as f64,
        ),
        (
            "dough_memory_allocated_mib",
            "Guest memory of running VMs.",
            "gauge",
            u.memory_mib as f64,
        ),
        (
            "dough_capacity_vcpus",
            "vCPUs the scheduler may allocate.",
            "gauge",
            lim.vcpu_capacity() as f64,
        ),
        (
            "dough_capacity_memory_mib",
            "Guest memory the scheduler may allocate.",
            "gauge",
            lim.memory_mib as f64,
        ),
        (
            "dough_capacity_vms",
            "VMs the scheduler may run at once.",
            "gauge",
            lim.max_vms as f64,
        ),
        (
            "dough_tasks_submitted_total",
            "Tasks accepted since start.",
            "counter",
            u.submitted_total as f64,
        ),
        (
            "dough_tasks_finished_total",
            "Tasks finished since start.",
            "counter",
            u.finished_total as f64,
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    // What this node's finished tasks did on the network (their egress
    // records, summed).
    let eg = api.svc.egress_totals();
    for (name, help, lines) in [
        (
            "dough_egress_records_total",
            "Finished tasks with an egress record.",
            vec![(String::new(), eg.tasks)],
        ),
        (
            "dough_egress_connections_total",
            "Guest connections by verdict (allowed: flows let through; blocked: packets refused).",
            vec![
                ("{verdict=\"allowed\"}".to_string(), eg.connections),
                ("{verdict=\"blocked\"}".to_string(), eg.blocked),
            ],
        ),
        (
            "dough_egress_bytes_total",
            "Bytes of allowed flows, IP headers included, by direction.",
            vec![
                ("{direction=\"out\"}".to_string(), eg.bytes_out),
                ("{direction=\"in\"}".to_string(), eg.bytes_in),
            ],
        ),
        (
            "dough_egress_dns_questions_total",
            "DNS questions from guests by verdict.",
            vec![
                ("{verdict=\"answered\"}".to_string(), eg.dns_answered),
                ("{verdict=\"refused\"}".to_string(), eg.dns_refused),
            ],
        ),
        (
            "dough_egress_overflow_total",
            "Connections, refusals and questions counted past a record's bounds, not itemised.",
            vec![(String::new(), eg.overflow)],
        ),
        (
            "dough_egress_lost_events_total",
            "Kernel events the records missed (socket buffer overruns).",
            vec![(String::new(), eg.lost_events)],
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in lines {
            let _ = writeln!(s, "{name}{labels} {v}");
        }
    }
    // The cluster: every node on record, its state, use and capacity (a
    // single host lists itself).
    let nodes = api.svc.store().nodes().unwrap_or_default();
    let _ = writeln!(
        s,
        "# HELP dough_node_up Nodes on record by state (1: the node is in it).\n# TYPE dough_node_up gauge"
    );
    for n in &nodes {
        let _ = writeln!(
            s,
            "dough_node_up{{node=\"{}\",state=\"{}\"}} 1",
            n.name, n.state
        );
    }
    for (name, help, get) in [
        (
            "dough_node_vms_running",
            "VMs running on each node (its last heartbeat).",
            (|n: &dough_core::store::NodeRecord| n.usage.vms as u64) as fn(&_) -> u64,
        ),
        (
            "dough_node_vms_capacity",
            "VMs each node may run at once.",
            |n| n.capacity.vms as u64,
        ),
        (
            "dough_node_vcpus_allocated",
            "vCPUs of running VMs on each node.",
            |n| n.usage.vcpus as u64,
        ),
        (
            "dough_node_heartbeat_ms",
            "Each node's last heartbeat (ms since the epoch).",
            |n| n.heartbeat_ms,
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
        for n in &nodes {
            let _ = writeln!(s, "{name}{{node=\"{}\"}} {}", n.name, get(n));
        }
    }
    let pools = api.svc.pools().map(|p| p.status()).unwrap_or_default();
    for (name, help, get) in [
        (
            "dough_pool_idle_vms",
            "Idle VMs in a warm pool.",
            (|p: &dough_core::pool::PoolStatus| p.idle as u64) as fn(&_) -> u64,
        ),
        ("dough_pool_booting_vms", "Pooled VMs booting.", |p| {
            p.booting as u64
        }),
        (
            "dough_pool_claims_total",
            "VMs handed from a pool to tasks.",
            |p| p.claimed,
        ),
        (
            "dough_pool_replaced_total",
            "Idle pooled VMs lost and replaced.",
            |p| p.replaced,
        ),
    ] {
        if pools.is_empty() {
            break;
        }
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &pools {
            let _ = writeln!(
                s,
                "{name}{{image=\"{}\",vcpus=\"{}\",memory_mib=\"{}\"}} {}",
                p.image,
                p.vcpus,
                p.memory_mib,
                get(p)
            );
        }
    }
    let mut lat = api.svc.sched_latency_us();
    lat.sort_unstable();
    let _ = writeln!(
        s,
        "# HELP dough_scheduler_latency_seconds Room freed to next task provisioning.\n# TYPE dough_scheduler_latency_seconds summary"
    );
    for q in [0.5, 0.99] {
        let v = if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * q).round() as usize] as f64 / 1e6
        };
        let _ = writeln!(s, "dough_scheduler_latency_seconds{{quantile=\"{q}\"}} {v}");
    }
    let _ = writeln!(s, "dough_scheduler_latency_seconds_count {}", lat.len());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}

/// The OpenAPI 3 document, from [`ROUTES`].
pub fn openapi_doc() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for (method, path, auth, summary) in ROUTES {
        let entry = paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object");
        let mut op = json!({
            "summary": summary,
            "responses": {"200": {"description": "OK"}, "4XX": {"description": "a JSON error: {\"error\": {\"code\", \"message\"}}"}},
        });
        if path.contains("{id}") {
            op["parameters"] = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
        }
        if !auth {
            op["security"] = json!([]);
        }
        if *method == "post" {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskRequest"}}}});
            op["responses"]["201"] = json!({"description": "Created: {\"id\", \"state\"}"});
        }
        entry.insert(method.to_string(), op);
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Dough", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"TaskRequest": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "command": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "required unless `agent` gives one"},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "vcpus": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
                    "memory_mib": {"type": "integer", "minimum": 128, "maximum": 262144, "default": 512},
                    "timeout_secs": {"type": "integer", "minimum": 1},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "priority": {"type": "integer", "default": 0},
                    "root": {"type": "boolean", "default": false},
                    "workdir": {"type": "string"},
                    "egress": {"type": "string", "enum": ["open", "none", "allowlist"]},
                    "allow_hosts": {"type": "array", "items": {"type": "string"}},
                    "allow_cidrs": {"type": "array", "items": {"type": "string"}},
                    "repo": {"$ref": "#/components/schemas/Repo"},
                    "pull_request": {"$ref": "#/components/schemas/PullRequest"},
                    "prompt": {"type": "string", "description": "given to the task as the file $DOUGH_PROMPT_FILE"},
                    "secret_env": {"type": "array", "items": {"type": "string"}, "description": "names of the daemon's environment variables passed to the task; values are never stored"},
                    "image": {"type": "string", "description": "the image to boot (`dough image ls`); 400 if the daemon has no such image; default: `default`"},
                    "agent": {"type": "string", "description": "an agent preset of the daemon's (`dough agents`): fills in the image, command, secrets, allowlist and resources the request leaves out; 400 if unknown"},
                    "model_url": {"type": "string", "description": "with `agent`: the model API's address; the allowlist follows it"}
                }
            },
            "Repo": {
                "type": "object",
                "additionalProperties": false,
                "required": ["url"],
                "properties": {
                    "url": {"type": "string", "description": "https:// (or http://) URL, without credentials"},
                    "base": {"type": "string", "description": "default: the remote's default branch"},
                    "branch": {"type": "string", "description": "default: dough/<task id>"},
                    "commit_message": {"type": "string"},
                    "author": {"type": "string", "description": "Name <email>"}
                }
            },
            "PullRequest": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "title": {"type": "string"},
                    "body": {"type": "string"},
                    "forge": {"type": "string", "enum": ["github", "gitea"]},
                    "api": {"type": "string"},
                    "allow_protected": {"type": "boolean", "default": false},
                    "push_partial": {"type": "boolean", "default": false, "description": "push a failed task's partial work (gated; no pull request)"}
                }
            }}
        },
        "security": [{"bearer": []}],
        "paths": paths,
    })
}

async fn openapi() -> Response {
    axum::Json(openapi_doc()).into_response()
}

#[cfg(test)]
mod schema_tests {
    use super::*;

    /// The documented request schema and `TaskRequest` name the same fields:
    /// an object with every documented property parses, and every field a
    /// full request serializes is documented.
    #[test]
    fn openapi_request_schema_matches_task_request() {
        let doc = openapi_doc();
        let schemas = &doc["components"]["schemas"];
        let props = |name: &str| -> Vec<String> {
            schemas[name]["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let full = json!({
            "command": ["true"], "env": {"A": "b"}, "vcpus": 1, "memory_mib": 512,
            "timeout_secs": 5, "labels": {"k": "v"}, "priority": 1, "root": false,
            "workdir": "/tmp", "egress": "allowlist", "allow_hosts": ["x.example"],
            "allow_cidrs": ["203.0.113.0/24"],
            "repo": {"url": "https://g.example/o/r", "base": "main", "branch": "b",
                     "commit_message": "m", "author": "A <a@b>"},
            "pull_request": {"title": "t", "body": "b", "forge": "gitea",
                             "api": "https://g.example/api/v1", "allow_protected": true},
            "prompt": "p", "secret_env": ["KEY"], "image": "py", "agent": "aider",
            "model_url": "http://198.51.100.7/v1",
        });
        let mut documented = props("TaskRequest");
        documented.sort();
        let mut given: Vec<String> = full.as_object().unwrap().keys().cloned().collect();
        given.sort();
        assert_eq!(
            documented, given,
            "the example must use every documented field"
        );
        let req: TaskRequest =
            serde_json::from_value(full.clone()).expect("documented fields parse");
        let back = serde_json::to_value(&req).unwrap();
        for (obj, schema) in [
            (&back, "TaskRequest"),
            (&back["repo"], "Repo"),
            (&back["pull_request"], "PullRequest"),
        ] {
            let doc_props = props(schema);
            for k in obj.as_object().unwrap().keys() {
                assert!(doc_props.contains(k), "{schema}.{k} is not documented");
            }
            for k in &doc_props {
                assert!(
                    obj.get(k).is_some(),
                    "{schema}.{k} is documented but not a field"
                );
            }
        }
    }
}
