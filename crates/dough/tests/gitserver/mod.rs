//! A real git smart-HTTP server for the repository tests: `git http-backend`
//! behind lighttpd (installed by scripts/test.sh), with HTTP basic auth for
//! pushes and for every request to `private.git`, run inside a test
//! namespace. Plus a small stand-in for a forge's pull-request endpoint:
//! no forge (GitHub, Gitea) can run on these machines.
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const GIT_USER: &str = "dough-bot";

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub use crate::world::in_netns;

pub struct GitServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl GitServer {
    /// lighttpd on 0.0.0.0:`port` in namespace `ns`; `password` is the
    /// basic-auth password of [`GIT_USER`].
    pub fn start(ns: &str, port: u16, password: &str) -> GitServer {
        let dir = tempfile::Builder::new()
            .prefix("dough-git")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("repos")).unwrap();
        std::fs::write(d.join("users"), format!("{GIT_USER}:{password}\n")).unwrap();
        let backend = format!("{}/git-http-backend", git(d, &["--exec-path"]));
        let auth = r#"auth.require = ( "" => ( "method" => "basic", "realm" => "git", "require" => "valid-user" ) )"#;
        let conf = format!(
            r#"server.modules = ( "mod_alias", "mod_setenv", "mod_cgi", "mod_auth", "mod_authn_file" )
server.document-root = "{root}/repos"
server.bind = "0.0.0.0"
server.port = {port}
server.errorlog = "{root}/error.log"
server.max-request-size = 0
auth.backend = "plain"
auth.backend.plain.userfile = "{root}/users"
alias.url = ( "/git" => "{backend}" )
$HTTP["url"] =~ "^/git" {{
  cgi.assign = ( "" => "" )
  setenv.add-environment = ( "GIT_PROJECT_ROOT" => "{root}/repos", "GIT_HTTP_EXPORT_ALL" => "" )
}}
$HTTP["querystring"] =~ "service=git-receive-pack" {{ {auth} }}
$HTTP["url"] =~ "^/git/.*/git-receive-pack$" {{ {auth} }}
$HTTP["url"] =~ "^/git/private\.git/" {{ {auth} }}
"#,
            root = d.display(),
        );
        std::fs::write(d.join("lighttpd.conf"), conf).unwrap();
        let mut cmd = Command::new("/usr/sbin/lighttpd");
        cmd.args(["-D", "-f"])
            .arg(d.join("lighttpd.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        in_netns(&mut cmd, ns);
        let mut child = cmd
            .spawn()
            .expect("start lighttpd (scripts/test.sh installs it)");
        let ns = ns.to_string();
        let t = Instant::now();
        loop {
            let ns2 = ns.clone();
            let up = std::thread::spawn(move || {
                let f = std::fs::File::open(Path::new("/run/netns").join(&ns2)).unwrap();
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            })
            .join()
            .unwrap();
            if up {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                let mut e = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut e);
                panic!("lighttpd exited ({st}): {e}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "lighttpd did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        GitServer { dir, port, child }
    }

    /// Make `name.git` refuse every push with `message`: a pre-receive
    /// hook, as a protected or full server refuses.
    pub fn refuse_pushes(&self, name: &str, message: &str) {
        use std::os::unix::fs::PermissionsExt;
        let hook = self.repo_path(name).join("hooks/pre-receive");
        std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
        std::fs::write(&hook, format!("#!/bin/sh\necho '{message}' >&2\nexit 1\n")).unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub fn repo_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("repos").join(format!("{name}.git"))
    }

    /// A bare repository `name.git` whose `main` holds `files`; its commit.
    pub fn make_repo(&self, name: &str, files: &[(&str, &str)]) -> String {
        let work = self.dir.path().join(format!("{name}.work"));
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        for (p, content) in files {
            let f = work.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, content).unwrap();
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "Initial commit"]);
        let bare = self.repo_path(name);
        git(
            self.dir.path(),
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                bare.to_str().unwrap(),
            ],
        );
        git(&bare, &["rev-parse", "main"])
    }

    /// Branch names and tips of a served repository.
    pub fn branches(&self, name: &str) -> Vec<(String, String)> {
        git(
            &self.repo_path(name),
            &[
                "for-each-ref",
                "--format=%(refname:short) %(objectname)",
                "refs/heads",
            ],
        )
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request the forge stand-in received.
#[derive(Debug, Clone)]
pub struct ForgeRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl ForgeRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The pull-request endpoint of a forge, answering 201 with an `html_url`
/// the way GitHub and Gitea do. A test double: no forge runs here.
pub struct ForgeDouble {
    pub requests: Arc<Mutex<Vec<ForgeRequest>>>,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// When set, the status line and JSON body answered instead of 201.
    refusal: Arc<Mutex<Option<(String, String)>>>,
}

impl ForgeDouble {
    pub fn start(ns: &str, addr: SocketAddr) -> ForgeDouble {
        let ns = ns.to_string();
        let l = std::thread::spawn(move || {
            let f = std::fs::File::open(Path::new("/run/netns").join(&ns)).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            TcpListener::bind(addr).unwrap()
        })
        .join()
        .unwrap();
        l.set_nonblocking(true).unwrap();
        let requests: Arc<Mutex<Vec<ForgeRequest>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let refusal: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let (rq, st, rf) = (requests.clone(), stop.clone(), refusal.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let mut headers = vec![];
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.push((k.trim().to_string(), v.trim().to_string()));
                    }
                }
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body);
                let n = {
                    let mut g = rq.lock().unwrap();
                    g.push(ForgeRequest {
                        method,
                        path: path.clone(),
                        headers,
                        body: serde_json::from_slice(&body).unwrap_or_default(),
                    });
                    g.len()
                };
                let (status, answer) = rf.lock().unwrap().clone().unwrap_or_else(|| {
                    let a = serde_json::json!({
                        "number": n,
                        "html_url": format!("http://forge.example/pulls/{n}"),
                    });
                    ("201 Created".into(), a.to_string())
                });
                let mut s = s;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        ForgeDouble {
            requests,
            addr,
            stop,
            refusal,
        }
    }

    /// From now on answer `status` (e.g. "422 Unprocessable Entity") with
    /// `body`, as a forge refusing the pull request does.
    pub fn refuse_with(&self, status: &str, body: &str) {
        *self.refusal.lock().unwrap() = Some((status.into(), body.into()));
    }

    pub fn taken(&self) -> Vec<ForgeRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for ForgeDouble {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
