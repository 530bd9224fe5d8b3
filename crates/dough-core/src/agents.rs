//! **Agent presets**: how a coding agent is installed and started, as
//! data. A preset (TOML) names the image and the steps that build it from
//! the agent's public package, the command that feeds `$DOUGH_PROMPT_FILE`
//! to the agent non-interactively, the secrets it needs, the hosts it
//! reaches, default resources, and where its model API is. No agent is
//! special-cased in code: Dough ships presets for Claude Code, Codex CLI
//! and aider (`agents/*.toml` in the source tree, built into the binary),
//! and a file `<state dir>/agents/NAME.toml` adds a preset or replaces the
//! built-in one of that name. See docs/agents.md.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::imagebuild::{valid_package, Step};

/// The presets Dough ships.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "claude-code",
        include_str!("../../../agents/claude-code.toml"),
    ),
    ("codex", include_str!("../../../agents/codex.toml")),
    ("aider", include_str!("../../../agents/aider.toml")),
];

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no agent preset {name:?} (presets: {known}; add one as {dir}/{name}.toml)")]
    Unknown {
        name: String,
        known: String,
        dir: String,
    },
    #[error("agent preset {file}: {msg}")]
    Invalid { file: String, msg: String },
    #[error("agent preset {file}")]
    Parse {
        file: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// One preset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub image: ImagePart,
    pub task: TaskPart,
    #[serde(default)]
    pub provider: Option<Provider>,
}

/// The agent's image: built on `from` by `dough image build --agent NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePart {
    pub name: String,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub run: Vec<String>,
    /// Variables of the `run` steps.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// How a task starts the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPart {
    pub command: Vec<String>,
    /// Variables passed from Dough's environment (API keys): never stored.
    #[serde(default)]
    pub secret_env: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Hosts the agent reaches besides its model API (package registries,
    /// say); the repository's host is always added for repository tasks.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// The model provider's API: its address goes to the agent in
/// `base_url_env`, and its host into the task's allowlist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub base_url: String,
    pub base_url_env: String,
}

/// What a task of a preset gets besides its command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskNetwork {
    /// The preset's variables and the model API's address.
    pub env: Vec<(String, String)>,
    /// The allowlist: names, and addresses as /32s.
    pub hosts: Vec<String>,
    pub cidrs: Vec<dough_net::Cidr>,
}

/// Where a preset came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    BuiltIn,
    File(PathBuf),
}

/// Where users put presets of their own.
pub fn user_dir(state: &Path) -> PathBuf {
    state.join("agents")
}

fn var_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !n.starts_with(|c: char| c.is_ascii_digit())
}

/// The host of an `http(s)://host[:port]/…` URL.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split('/').next()?;
    if authority.contains('@') {
        return None;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

impl Preset {
    /// Parse and check one preset; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Preset, AgentError> {
        let p: Preset = toml::from_str(text).map_err(|source| AgentError::Parse {
            file: file.into(),
            source,
        })?;
        p.check(file)?;
        Ok(p)
    }

    fn check(&self, file: &str) -> Result<(), AgentError> {
        let bad = |msg: String| {
            Err(AgentError::Invalid {
                file: file.into(),
                msg,
            })
        };
        if dough_image::valid_name(&self.name).is_err() {
            return bad(format!("name {:?}: 1-63 of [a-z0-9._-]", self.name));
        }
        if let Err(e) = dough_image::valid_name(&self.image.name) {
            return bad(format!("image.name: {e}"));
        }
        if self.image.name == dough_image::DEFAULT_IMAGE {
            return bad("image.name: `default` is Dough's base; name the agent's image".into());
        }
        if self.image.packages.is_empty() && self.image.run.is_empty() {
            return bad("image: give packages or run steps".into());
        }
        for p in &self.image.packages {
            if let Err(e) = valid_package(p) {
                return bad(format!("image.packages: {e}"));
            }
        }
        if self.task.command.is_empty() || self.task.command[0].is_empty() {
            return bad("task.command: must name a program".into());
        }
        for n in self.task.secret_env.iter().chain(self.task.env.keys()) {
            if !var_name_ok(n) || n.starts_with("DOUGH_") {
                return bad(format!("{n:?} is not a variable a task may get"));
            }
        }
        if let Some(pr) = &self.provider {
            if url_host(&pr.base_url).is_none() {
                return bad(format!(
                    "provider.base_url {:?}: an http(s):// URL with a host and no credentials",
                    pr.base_url
                ));
            }
            if !var_name_ok(&pr.base_url_env) {
                return bad(format!("provider.base_url_env {:?}", pr.base_url_env));
            }
        }
        Ok(())
    }

    /// The image build's steps (the host's CAs are added by the caller).
    pub fn steps(&self) -> Vec<Step> {
        let mut steps = vec![];
        if !self.image.packages.is_empty() {
            steps.push(Step::Packages(self.image.packages.clone()));
        }
        let env: Vec<(String, String)> = self
            .image
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        steps.extend(self.image.run.iter().map(|cmd| Step::Run {
            cmd: cmd.clone(),
            env: env.clone(),
        }));
        steps
    }

    /// What a task of this preset gets: its variables (the model API's
    /// address among them, `base_url` overriding the preset's) and the
    /// hosts and networks of its allowlist.
    pub fn task_network(&self, base_url: Option<&str>) -> Result<TaskNetwork, AgentError> {
        let mut env: Vec<(String, String)> = self
            .task
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut hosts = self.task.allow_hosts.clone();
        let mut cidrs = vec![];
        if let Some(pr) = &self.provider {
            let url = base_url.unwrap_or(&pr.base_url);
            let host = url_host(url).ok_or_else(|| AgentError::Invalid {
                file: self.name.clone(),
                msg: format!("model API {url:?}: an http(s):// URL with a host"),
            })?;
            match host.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => cidrs.push(dough_net::Cidr { addr: ip, len: 32 }),
                Err(_) => hosts.push(host),
            }
            env.push((pr.base_url_env.clone(), url.to_string()));
        }
        Ok(TaskNetwork { env, hosts, cidrs })
    }
}

/// Every preset: the built-in ones, replaced or joined by the files in
/// [`user_dir`]. A broken user file is an error, not skipped.
pub fn all(state: &Path) -> Result<Vec<(Preset, Source)>, AgentError> {
    let mut out: Vec<(Preset, Source)> = BUILT_IN
        .iter()
        .map(|(name, text)| {
            Preset::parse(text, &format!("built-in {name}")).map(|p| (p, Source::BuiltIn))
        })
        .collect::<Result<_, _>>()?;
    let dir = user_dir(state);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => {
            return Err(AgentError::Io {
                what: format!("read {}", dir.display()),
                source: e,
            })
        }
    };
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| AgentError::Io {
            what: format!("read {}", f.display()),
            source: e,
        })?;
        let p = Preset::parse(&text, &f.display().to_string())?;
        out.retain(|(q, _)| q.name != p.name);
        out.push((p, Source::File(f)));
    }
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(out)
}

/// The preset `name`.
pub fn find(state: &Path, name: &str) -> Result<(Preset, Source), AgentError> {
    let all = all(state)?;
    let known: Vec<String> = all.iter().map(|(p, _)| p.name.clone()).collect();
    all.into_iter()
        .find(|(p, _)| p.name == name)
        .ok_or_else(|| AgentError::Unknown {
            name: name.into(),
            known: known.join(", "),
            dir: user_dir(state).display().to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped preset parses, passes the checks and builds its image
    /// from its public package.
    #[test]
    fn the_built_in_presets_are_valid() {
        let d = tempfile::tempdir().unwrap();
        let all = all(d.path()).unwrap();
        let names: Vec<&str> = all.iter().map(|(p, _)| p.name.as_str()).collect();
        assert_eq!(names, ["aider", "claude-code", "codex"]);
        for (p, src) in &all {
            assert_eq!(*src, Source::BuiltIn);
            assert!(!p.steps().is_empty(), "{}", p.name);
            let pr = p.provider.as_ref().expect("a model API");
            let TaskNetwork { env, hosts, .. } = p.task_network(None).unwrap();
            assert!(env
                .iter()
                .any(|(k, v)| *k == pr.base_url_env && *v == pr.base_url));
            assert!(hosts.contains(&url_host(&pr.base_url).unwrap()));
            assert!(!p.task.secret_env.is_empty());
        }
    }

    /// A user's file replaces the built-in preset of its name, or adds one;
    /// a broken file is refused with its name.
    #[test]
    fn user_presets_replace_or_join_and_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let dir = user_dir(d.path());
        std::fs::create_dir_all(&dir).unwrap();
        let mine = BUILT_IN[0].1.replace("agent-claude-code", "my-claude");
        std::fs::write(dir.join("claude-code.toml"), mine).unwrap();
        std::fs::write(
            dir.join("echo.toml"),
            "name = \"echo\"\n[image]\nname = \"echo-img\"\nrun = [\"true\"]\n[task]\ncommand = [\"cat\", \"x\"]\n",
        )
        .unwrap();
        let (p, src) = find(d.path(), "claude-code").unwrap();
        assert_eq!(p.image.name, "my-claude");
        assert!(matches!(src, Source::File(_)));
        let (e, _) = find(d.path(), "echo").unwrap();
        assert_eq!(e.task.command, ["cat", "x"]);
        assert_eq!(e.task_network(None).unwrap(), TaskNetwork::default());
        let err = find(d.path(), "nope").unwrap_err().to_string();
        assert!(err.contains("aider, claude-code, codex, echo"), "{err}");
        for (text, want) in [
            ("name = \"x\"\n[image]\nname = \"x\"\nrun=[\"t\"]\n[task]\ncommand = []\n", "task.command"),
            ("name = \"x\"\n[image]\nname = \"default\"\nrun=[\"t\"]\n[task]\ncommand = [\"a\"]\n", "image.name"),
            ("name = \"x\"\nbogus = 1\n", "unknown field"),
            ("name = \"x\"\n[image]\nname = \"x\"\nrun=[\"t\"]\n[task]\ncommand = [\"a\"]\nsecret_env = [\"DOUGH_TOKEN\"]\n", "DOUGH_TOKEN"),
            ("name = \"x\"\n[image]\nname = \"x\"\nrun=[\"t\"]\n[task]\ncommand = [\"a\"]\n[provider]\nbase_url = \"ftp://h\"\nbase_url_env = \"U\"\n", "base_url"),
        ] {
            std::fs::write(dir.join("x.toml"), text).unwrap();
            let err = all(d.path()).unwrap_err();
            let chain = format!("{err} {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default());
            assert!(chain.contains(want), "{want}: {chain}");
            assert!(chain.contains("x.toml"), "{chain}");
        }
    }

    /// The model API's address goes to the agent and into the allowlist:
    /// a name as a host, an address as a /32.
    #[test]
    fn the_base_url_follows_into_env_and_allowlist() {
        let (p, _) = find(Path::new("/nonexistent"), "claude-code").unwrap();
        let TaskNetwork { env, hosts, cidrs } =
            p.task_network(Some("http://198.51.100.7:8080/v1")).unwrap();
        assert!(env.contains(&(
            "ANTHROPIC_BASE_URL".into(),
            "http://198.51.100.7:8080/v1".into()
        )));
        assert!(hosts.is_empty(), "{hosts:?}");
        assert_eq!(cidrs, ["198.51.100.7/32".parse().unwrap()]);
        let TaskNetwork { hosts, cidrs, .. } = p
            .task_network(Some("https://gw.corp.example/anthropic"))
            .unwrap();
        assert_eq!(hosts, ["gw.corp.example"]);
        assert!(cidrs.is_empty());
        assert!(p.task_network(Some("gw.corp.example")).is_err());
        assert_eq!(url_host("https://u:p@h/"), None);
        assert_eq!(
            url_host("https://H.example:443/x"),
            Some("h.example".into())
        );
    }
}
