//! Tier 2 (real VMs): agent presets as data. A preset of the test's own in
//! `<state>/agents/` (a shell script standing in for an agent CLI: this
//! test is about the preset mechanism, not a model) is built into its image
//! by `dough image build --agent`, listed by `dough agents`, and run by
//! `dough run --agent`: the preset's command gets the prompt file, its
//! secret from the host's environment, the model API's address from
//! `--model-url`, and the preset's allowlist (with only an address on it,
//! the VM's resolver refuses every name).
mod common;

use common::*;

const PRESET: &str = r#"
name = "echo"
description = "a stand-in agent for tests"

[image]
name = "agent-echo"
run = ["printf '#!/bin/sh\necho \"prompt: $(cat \"$DOUGH_PROMPT_FILE\")\"\necho \"api: $ECHO_BASE_URL\"\n[ -n \"$ECHO_KEY\" ] && echo key-set\ngetent hosts deb.debian.org >/dev/null && echo resolves || echo no-dns\n' > /usr/local/bin/echo-agent && chmod 755 /usr/local/bin/echo-agent"]

[task]
command = ["echo-agent"]
secret_env = ["ECHO_KEY"]
memory_mib = 384

[provider]
base_url = "https://api.echo.example/v1"
base_url_env = "ECHO_BASE_URL"
"#;

#[test]
fn a_preset_builds_its_image_and_runs_with_its_secret_url_and_allowlist() {
    let h = Harness::new();
    let dir = h.state.path().join("agents");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("echo.toml"), PRESET).unwrap();

    let agents = h.cmd().arg("agents").output().unwrap();
    let list = text(&agents.stdout);
    let row = list
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains("agent-echo") && row.contains(" no "), "{row}");
    for shipped in ["claude-code", "codex", "aider"] {
        assert!(list.lines().any(|l| l.starts_with(shipped)), "{list}");
    }

    // Before its image exists, and without its secret: refused, no VM.
    let out = h
        .cmd()
        .env("ECHO_KEY", "k")
        .args(["run", "--agent", "echo", "--prompt", "p"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("dough image build --agent echo"),
        "{}",
        text(&out.stderr)
    );
    let out = h
        .cmd()
        .env_remove("ECHO_KEY")
        .args(["run", "--agent", "echo", "--prompt", "p"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("needs ECHO_KEY"),
        "{}",
        text(&out.stderr)
    );

    let b = h
        .cmd()
        .args([
            "image",
            "build",
            "--agent",
            "echo",
            "--no-host-cas",
            "--egress",
            "none",
        ])
        .output()
        .unwrap();
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
    let list = text(&h.cmd().arg("agents").output().unwrap().stdout);
    let row = list.lines().find(|l| l.starts_with("echo ")).unwrap();
    assert!(!row.contains(" no "), "built: {row}");

    let out = h
        .cmd()
        .env("ECHO_KEY", "secret-value")
        .args([
            "run",
            "--agent",
            "echo",
            "--model-url",
            "http://198.51.100.7:8080/v1",
            "--prompt",
            "fix the date test",
        ])
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        "prompt: fix the date test\napi: http://198.51.100.7:8080/v1\nkey-set\nno-dns\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    h.assert_clean();
}
