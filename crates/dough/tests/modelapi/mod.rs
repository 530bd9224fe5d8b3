//! A stand-in for Anthropic's Messages API (`POST /v1/messages`, streamed as
//! server-sent events when the request asks, as Claude Code always does),
//! serving the tests' "internet" namespace. A test double: no model can run
//! on these machines, and the real API is not reachable from them. It is
//! written from the public wire format (message_start, content_block_*,
//! message_delta, message_stop; `tool_use` blocks with `input_json_delta`;
//! errors as `{"type":"error","error":{…}}`), and it scripts the model's
//! side of a conversation:
//!
//! - requests that carry the agent's tools (the main loop) get the script's
//!   next turn, chosen by how many tool results the conversation holds;
//! - every other request (titles, quota checks and the like) gets a short
//!   text answer.
//!
//! Every request is logged, so a test can check what reached the "model":
//! the prompt, the key, and the tool results the agent sent back.
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// What the "model" does in the main loop.
#[derive(Clone, Debug)]
pub enum Script {
    /// Read `file`, then replace `old` with `new` in it, then say `done`.
    Edit {
        file: String,
        old: String,
        new: String,
        done: String,
    },
    /// Read `file` and replace `old` with `new`, then fail the next turn
    /// with a 400 `invalid_request_error` (which a client does not retry).
    EditThenError {
        file: String,
        old: String,
        new: String,
    },
    /// Answer with text only: no tool call, no change.
    Reply(String),
    /// Read the request and never answer (a hung provider).
    Stall,
}

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl ModelRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether this is a turn of the agent's main loop (it offers the
    /// file-editing tool).
    pub fn is_main_loop(&self) -> bool {
        self.body["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "Edit"))
    }

    /// The text of every `user` message, tool results included.
    pub fn user_text(&self) -> String {
        let mut out = String::new();
        for m in self.body["messages"].as_array().into_iter().flatten() {
            if m["role"] != "user" {
                continue;
            }
            collect_text(&m["content"], &mut out);
        }
        out
    }

    fn tool_results(&self) -> usize {
        self.body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .filter(|b| b["type"] == "tool_result")
            .count()
    }

    /// The working directory the agent states in its system prompt (or a
    /// system turn of the conversation).
    fn workdir(&self) -> Option<String> {
        let mut sys = String::new();
        collect_text(&self.body["system"], &mut sys);
        collect_text(&self.body["messages"], &mut sys);
        let label = ["Primary working directory: ", "Working directory: "]
            .into_iter()
            .find(|l| sys.contains(l))?;
        let at = sys.find(label)? + label.len();
        Some(sys[at..].lines().next()?.trim().to_string())
    }
}

fn collect_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(a) => a.iter().for_each(|b| collect_text(b, out)),
        Value::Object(o) => {
            for k in ["text", "content"] {
                if let Some(x) = o.get(k) {
                    collect_text(x, out);
                }
            }
        }
        _ => {}
    }
}

pub struct ModelApi {
    pub requests: Arc<Mutex<Vec<ModelRequest>>>,
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    stop: Arc<AtomicBool>,
}

impl ModelApi {
    /// Listen on `addr` in namespace `ns`; only `x-api-key: key` is
    /// accepted (anything else gets the API's 401).
    pub fn start(ns: &str, addr: SocketAddr, key: &str, script: Script) -> ModelApi {
        let l = crate::world::in_ns(ns, move || TcpListener::bind(addr).unwrap());
        l.set_nonblocking(true).unwrap();
        let requests: Arc<Mutex<Vec<ModelRequest>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let script = Arc::new(Mutex::new(script));
        let (rq, st, sc, key) = (
            requests.clone(),
            stop.clone(),
            script.clone(),
            key.to_string(),
        );
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (rq, st, sc, key) = (rq.clone(), st.clone(), sc.clone(), key.clone());
                std::thread::spawn(move || serve(s, &rq, &st, &sc, &key));
            }
        });
        ModelApi {
            requests,
            addr,
            script,
            stop,
        }
    }

    pub fn set_script(&self, s: Script) {
        *self.script.lock().unwrap() = s;
    }

    /// Take (and clear) the log.
    pub fn take(&self) -> Vec<ModelRequest> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

impl Drop for ModelApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection: requests until the client closes it (keep-alive, as
/// Node's HTTP client uses).
fn serve(
    s: TcpStream,
    log: &Mutex<Vec<ModelRequest>>,
    stop: &AtomicBool,
    script: &Mutex<Script>,
    key: &str,
) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    loop {
        let Some(req) = read_request(&mut r) else {
            return;
        };
        log.lock().unwrap().push(req.clone());
        let script = script.lock().unwrap().clone();
        if req.header("x-api-key") != Some(key) {
            let e = json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}});
            if respond_json(&mut w, "401 Unauthorized", &e).is_err() {
                return;
            }
            continue;
        }
        if req.method != "POST" || !req.path.starts_with("/v1/messages") {
            let e = json!({"type": "error", "error": {"type": "not_found_error", "message": "not found"}});
            if respond_json(&mut w, "404 Not Found", &e).is_err() {
                return;
            }
            continue;
        }
        if req.path.starts_with("/v1/messages/count_tokens") {
            if respond_json(&mut w, "200 OK", &json!({"input_tokens": 100})).is_err() {
                return;
            }
            continue;
        }
        let turn = req.tool_results();
        let answer = if !req.is_main_loop() {
            Turn::Text("ok".into())
        } else {
            let dir = req.workdir().unwrap_or_default();
            let path = |f: &str| format!("{dir}/{f}");
            match (&script, turn) {
                (Script::Stall, _) => {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    return;
                }
                (Script::Reply(t), _) => Turn::Text(t.clone()),
                (Script::Edit { file, .. } | Script::EditThenError { file, .. }, 0) => {
                    Turn::Tool("Read", json!({"file_path": path(file)}))
                }
                (
                    Script::Edit { file, old, new, .. } | Script::EditThenError { file, old, new },
                    1,
                ) => Turn::Tool(
                    "Edit",
                    json!({"file_path": path(file), "old_string": old, "new_string": new}),
                ),
                (Script::Edit { done, .. }, _) => Turn::Text(done.clone()),
                (Script::EditThenError { .. }, _) => {
                    let e = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "scripted failure: the conversation is over"}});
                    if respond_json(&mut w, "400 Bad Request", &e).is_err() {
                        return;
                    }
                    continue;
                }
            }
        };
        let model = req.body["model"].as_str().unwrap_or("claude").to_string();
        let ok = if req.body["stream"] == true {
            respond_sse(&mut w, &model, &answer, turn)
        } else {
            respond_json(&mut w, "200 OK", &answer.message(&model, turn))
        };
        if ok.is_err() {
            return;
        }
    }
}

enum Turn {
    Text(String),
    Tool(&'static str, Value),
}

impl Turn {
    fn block(&self, turn: usize) -> Value {
        match self {
            Turn::Text(t) => json!({"type": "text", "text": t}),
            Turn::Tool(name, input) => {
                json!({"type": "tool_use", "id": format!("toolu_{turn:02}"), "name": name, "input": input})
            }
        }
    }

    fn stop_reason(&self) -> &'static str {
        match self {
            Turn::Text(_) => "end_turn",
            Turn::Tool(..) => "tool_use",
        }
    }

    fn message(&self, model: &str, turn: usize) -> Value {
        json!({
            "id": format!("msg_{turn:02}"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [self.block(turn)],
            "stop_reason": self.stop_reason(),
            "stop_sequence": null,
            "usage": {"input_tokens": 100, "output_tokens": 20},
        })
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<ModelRequest> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = vec![];
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = vec![];
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).ok()?;
    }
    Some(ModelRequest {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or_default(),
        at: std::time::Instant::now(),
    })
}

fn respond_json(w: &mut TcpStream, status: &str, v: &Value) -> std::io::Result<()> {
    let b = v.to_string();
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nrequest-id: req_standin\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )?;
    w.flush()
}

/// The answer as the API streams it: one content block, its input or text
/// split over two deltas (a client must join them).
fn respond_sse(w: &mut TcpStream, model: &str, t: &Turn, turn: usize) -> std::io::Result<()> {
    let mut events: Vec<(&str, Value)> = vec![];
    let mut start = t.message(model, turn);
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    events.push((
        "message_start",
        json!({"type": "message_start", "message": start}),
    ));
    let (block, parts, delta_type, field) = match t {
        Turn::Text(s) => (
            json!({"type": "text", "text": ""}),
            s.clone(),
            "text_delta",
            "text",
        ),
        Turn::Tool(name, input) => (
            json!({"type": "tool_use", "id": format!("toolu_{turn:02}"), "name": name, "input": {}}),
            input.to_string(),
            "input_json_delta",
            "partial_json",
        ),
    };
    events.push((
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": block}),
    ));
    let mid = parts
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= parts.len() / 2)
        .unwrap_or(0);
    for piece in [&parts[..mid], &parts[mid..]] {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": delta_type, field: piece}}),
        ));
    }
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": t.stop_reason(), "stop_sequence": null}, "usage": {"output_tokens": 20}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    let mut body = String::new();
    for (e, d) in events {
        body.push_str(&format!("event: {e}\ndata: {d}\n\n"));
    }
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nrequest-id: req_standin\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}
