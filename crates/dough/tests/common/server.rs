//! `dough serve` started for a test: the real daemon binary on a free
//! port of 127.0.0.1, called over real HTTP with its token.
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{signal, wait_until, Harness};

pub struct Server {
    pub child: Child,
    pub url: String,
    pub token: String,
    pub agent: ureq::Agent,
    /// The network namespace it runs (and is called) in; None: this one.
    pub netns: Option<String>,
}

impl Server {
    pub fn start(h: &Harness, args: &[&str]) -> Server {
        Self::start_logged(h, args, None)
    }

    /// As [`Server::start`], its stderr (its log) into `log`.
    pub fn start_logged(h: &Harness, args: &[&str], log: Option<&std::path::Path>) -> Server {
        Self::start_in(h, None, &[], args, log)
    }

    /// As [`Server::start_logged`]; with `netns` (a named network
    /// namespace), the daemon runs in that namespace, and is called there.
    /// `envs`: more of its environment.
    pub fn start_in(
        h: &Harness,
        netns: Option<&str>,
        envs: &[(&str, &str)],
        args: &[&str],
        log: Option<&std::path::Path>,
    ) -> Server {
        let _ = std::fs::remove_file(h.state.path().join("api-url"));
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::null(),
        };
        let mut cmd = h.cmd();
        cmd.envs(envs.iter().copied());
        if let Some(ns) = netns {
            super::enter_netns(&mut cmd, ns);
        }
        let child = cmd
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let url_file = h.state.path().join("api-url");
        wait_until("the server to listen", Duration::from_secs(20), || {
            url_file.exists()
        });
        Server {
            child,
            url: std::fs::read_to_string(url_file)
                .unwrap()
                .trim()
                .to_string(),
            token: std::fs::read_to_string(h.state.path().join("api-token"))
                .unwrap()
                .trim()
                .to_string(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(),
            netns: netns.map(String::from),
        }
    }

    /// The body of GET `path` (with the token), as text.
    pub fn text(&self, path: &str) -> String {
        super::within_netns(self.netns.as_deref(), || {
            self.agent
                .get(&format!("{}{path}", self.url))
                .set("Authorization", &format!("Bearer {}", self.token))
                .call()
                .unwrap()
                .into_string()
                .unwrap()
        })
    }

    /// (status, JSON body) of a request with the right token.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call_as(Some(&self.token), method, path, body)
    }

    pub fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut r = self.agent.request(method, &format!("{}{path}", self.url));
        if let Some(t) = token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = super::within_netns(self.netns.as_deref(), || {
            let res = match body {
                Some(b) => r.set("Content-Type", "application/json").send_string(b),
                None => r.call(),
            };
            match res {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("{method} {path}: {e}"),
            }
        });
        let status = resp.status();
        let text = resp.into_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn submit(&self, body: Value) -> String {
        let (st, v) = self.call("POST", "/v1/tasks", Some(&body.to_string()));
        assert_eq!(st, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    pub fn task(&self, id: &str) -> Value {
        self.call("GET", &format!("/v1/tasks/{id}"), None).1
    }

    pub fn wait_state(&self, id: &str, pred: impl Fn(&str) -> bool, limit: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let t = self.task(id);
            if pred(t["state"].as_str().unwrap_or("")) {
                return t;
            }
            assert!(t0.elapsed() < limit, "task {id} stuck: {t}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_terminal(&self, id: &str) -> Value {
        self.wait_state(
            id,
            |s| matches!(s, "succeeded" | "failed" | "cancelled" | "timed_out"),
            Duration::from_secs(120),
        )
    }

    pub fn logs(&self, id: &str) -> String {
        match self.call("GET", &format!("/v1/tasks/{id}/logs"), None).1 {
            Value::String(s) => s,
            v => v.to_string(),
        }
    }

    /// The server-sent events of task `id` (`query`: "" or "?offset=N"),
    /// read on a thread until the stream ends: its `data: ` lines.
    pub fn event_lines(&self, id: &str, query: &str) -> std::thread::JoinHandle<Vec<String>> {
        let r = super::within_netns(self.netns.as_deref(), || {
            self.agent
                .get(&format!("{}/v1/tasks/{id}/events{query}", self.url))
                .set("Authorization", &format!("Bearer {}", self.token))
                .call()
                .unwrap()
        });
        std::thread::spawn(move || {
            BufReader::new(r.into_reader())
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.starts_with("data: "))
                .collect()
        })
    }

    pub fn stop(mut self) {
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
