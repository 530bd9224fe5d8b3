//! The gate with real git: bundles made the way a guest (honest or not)
//! could make them, checked and pushed by `repo::finalize` into a real bare
//! repository standing in for the remote (a local path: no HTTP needed to
//! test the rules; the HTTP path is covered by `dough/tests/vm_git.rs`).
//! Every rejection names its rule and leaves the remote untouched.
use std::path::{Path, PathBuf};
use std::process::Command;

use dough_core::repo::{finalize, Credentials, GateConfig, Plan, TaskFacts};
use dough_core::supervisor::WorkOutput;
use dough_proto::Work;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "T")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "T")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Repo {
    tmp: tempfile::TempDir,
    remote: PathBuf,
    /// A clone, as the guest has it.
    work: PathBuf,
    base: String,
}

impl Repo {
    fn new() -> Repo {
        let tmp = tempfile::tempdir().unwrap();
        let seed = tmp.path().join("seed");
        std::fs::create_dir(&seed).unwrap();
        git(&seed, &["init", "-q", "-b", "main"]);
        std::fs::create_dir_all(seed.join(".github/workflows")).unwrap();
        std::fs::write(seed.join(".github/workflows/ci.yml"), "on: push\n").unwrap();
        std::fs::write(seed.join("README.md"), "hi\n").unwrap();
        git(&seed, &["add", "-A"]);
        git(&seed, &["commit", "-q", "-m", "base"]);
        let remote = tmp.path().join("remote.git");
        git(tmp.path(), &["clone", "-q", "--bare", "seed", "remote.git"]);
        let work = tmp.path().join("work");
        git(tmp.path(), &["clone", "-q", "remote.git", "work"]);
        let base = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["checkout", "-q", "-b", "dough/t"]);
        Repo {
            tmp,
            remote,
            work,
            base,
        }
    }

    fn commit(&self, file: &str, content: &str, msg: &str) -> String {
        let p = self.work.join(file);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", msg]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn bundle(&self, revs: &[&str]) -> PathBuf {
        let dir = self.tmp.path().join(format!("job{}", revs.join("_").len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("work.bundle");
        let mut args = vec!["bundle", "create", "-q", path.to_str().unwrap()];
        args.extend(revs);
        git(&self.work, &args);
        path
    }

    fn plan(&self) -> Plan {
        Plan {
            url: self.remote.display().to_string(),
            base_branch: "main".into(),
            base_commit: self.base.clone(),
            branch: "dough/t".into(),
            branch_exists: None,
            private: false,
            author_name: "D".into(),
            author_email: "d@x".into(),
            commit_message: "m".into(),
            pr: Default::default(),
        }
    }

    fn remote_refs(&self) -> String {
        git(
            &self.remote,
            &["for-each-ref", "--format=%(refname) %(objectname)"],
        )
    }

    /// The whole host side after the VM: gate, then push.
    fn finalize(
        &self,
        plan: &Plan,
        bundle: &Path,
        gate: &GateConfig,
    ) -> Result<dough_core::repo::Finalized, dough_core::repo::RepoError> {
        self.finalize_with(plan, bundle, gate, &Credentials::default())
    }

    /// As [`Repo::finalize`], with `creds` (a forge token: then the pull
    /// request too).
    fn finalize_with(
        &self,
        plan: &Plan,
        bundle: &Path,
        gate: &GateConfig,
        creds: &Credentials,
    ) -> Result<dough_core::repo::Finalized, dough_core::repo::RepoError> {
        let len = std::fs::metadata(bundle).unwrap().len();
        let out = WorkOutput {
            report: Some(Work::Bundle {
                head: String::new(),
                commits: 0,
                bytes: len,
            }),
            bundle_bytes: len,
            oversized: false,
        };
        finalize(
            plan,
            &out,
            bundle,
            bundle.parent().unwrap(),
            gate,
            creds,
            &TaskFacts::default(),
        )
    }

    fn rejected(&self, plan: &Plan, bundle: &Path, gate: &GateConfig, rule: &str) -> String {
        let before = self.remote_refs();
        let err = self.finalize(plan, bundle, gate).unwrap_err();
        assert_eq!(err.reason(), format!("gate:{rule}"), "{err}");
        assert_eq!(self.remote_refs(), before, "nothing may be pushed");
        err.to_string()
    }
}

#[test]
fn a_good_bundle_is_pushed_with_its_commit_list() {
    let r = Repo::new();
    let c1 = r.commit("a.txt", "a", "Add a");
    let c2 = r.commit("b.txt", "b", "Add b");
    let b = r.bundle(&["refs/heads/dough/t", &format!("^{}", r.base)]);
    let fin = r.finalize(&r.plan(), &b, &GateConfig::default()).unwrap();
    assert!(fin.pushed);
    let got: Vec<(&str, &str)> = fin
        .commits
        .iter()
        .map(|c| (c.sha.as_str(), c.subject.as_str()))
        .collect();
    assert_eq!(got, [(c1.as_str(), "Add a"), (c2.as_str(), "Add b")]);
    assert_eq!(git(&r.remote, &["rev-parse", "refs/heads/dough/t"]), c2);
    assert!(fin.pr_url.is_none() && fin.note.unwrap().contains("no DOUGH_FORGE_TOKEN"));
}

#[test]
fn another_branch_or_an_extra_ref_is_refused() {
    let r = Repo::new();
    r.commit("a.txt", "a", "Add a");
    git(&r.work, &["branch", "other"]);
    let b = r.bundle(&["refs/heads/other", &format!("^{}", r.base)]);
    let msg = r.rejected(&r.plan(), &b, &GateConfig::default(), "bundle_refs");
    assert!(msg.contains("refs/heads/other"), "{msg}");
    git(&r.work, &["tag", "v9"]);
    let b = r.bundle(&[
        "refs/heads/dough/t",
        "refs/tags/v9",
        &format!("^{}", r.base),
    ]);
    let msg = r.rejected(&r.plan(), &b, &GateConfig::default(), "bundle_refs");
    assert!(msg.contains("refs/tags/v9"), "{msg}");
}

#[test]
fn history_that_does_not_descend_from_base_is_refused() {
    let r = Repo::new();
    // An unrelated history under the right name.
    git(&r.work, &["checkout", "-q", "--orphan", "tmp"]);
    r.commit("x.txt", "x", "Unrelated");
    git(&r.work, &["branch", "-f", "dough/t", "tmp"]);
    let b = r.bundle(&["refs/heads/dough/t"]);
    let msg = r.rejected(&r.plan(), &b, &GateConfig::default(), "not_descendant");
    assert!(msg.contains("does not descend"), "{msg}");
    // Built on a commit the remote has never seen.
    git(&r.work, &["checkout", "-q", "dough/t"]);
    let hidden = r.commit("y.txt", "y", "Hidden parent");
    r.commit("z.txt", "z", "On top");
    let b = r.bundle(&["refs/heads/dough/t", &format!("^{hidden}")]);
    r.rejected(&r.plan(), &b, &GateConfig::default(), "not_descendant");
}

/// What a hostile guest could send in place of its bundle: garbage, a good
/// bundle cut short (in its pack, or right after its header), or one whose
/// pack bytes were changed. Each is `bundle_invalid`; the good one, checked
/// last, still goes through.
#[test]
fn a_corrupt_or_truncated_bundle_is_refused_as_invalid() {
    let r = Repo::new();
    r.commit("a.txt", &"a line of text\n".repeat(4000), "Add a");
    r.commit("b.txt", "b", "Add b");
    let good = r.bundle(&["refs/heads/dough/t", &format!("^{}", r.base)]);
    let bytes = std::fs::read(&good).unwrap();
    let header_end = bytes.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    let mid = header_end + (bytes.len() - header_end) / 2;
    let mut flipped = bytes.clone();
    for x in &mut flipped[mid..mid + 8] {
        *x ^= 0x5a;
    }
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "garbage",
            b"# v2 git bundle\nnot a bundle at all\n".to_vec(),
        ),
        ("truncated", bytes[..mid].to_vec()),
        ("header-only", bytes[..header_end].to_vec()),
        ("flipped", flipped),
    ];
    for (what, data) in cases {
        let dir = r.tmp.path().join(format!("bad-{what}"));
        std::fs::create_dir(&dir).unwrap();
        let p = dir.join("work.bundle");
        std::fs::write(&p, data).unwrap();
        let msg = r.rejected(&r.plan(), &p, &GateConfig::default(), "bundle_invalid");
        assert!(!msg.is_empty(), "{what}");
    }
    assert!(
        r.finalize(&r.plan(), &good, &GateConfig::default())
            .unwrap()
            .pushed
    );
}

#[test]
fn protected_paths_are_refused_unless_allowed() {
    let r = Repo::new();
    r.commit(
        ".github/workflows/ci.yml",
        "on: push\nrun: evil\n",
        "CI tweak",
    );
    // Reverted later: the commit that touched it still counts.
    r.commit(".github/workflows/ci.yml", "on: push\n", "Revert");
    let b = r.bundle(&["refs/heads/dough/t", &format!("^{}", r.base)]);
    let msg = r.rejected(&r.plan(), &b, &GateConfig::default(), "protected_path");
    assert!(
        msg.contains(".github/workflows/ci.yml (matches .github/workflows/**)"),
        "{msg}"
    );
    let allowed = GateConfig {
        allow_protected: true,
        ..GateConfig::default()
    };
    assert!(r.finalize(&r.plan(), &b, &allowed).unwrap().pushed);
}

#[test]
fn size_and_commit_limits_are_enforced() {
    let r = Repo::new();
    r.commit("a.txt", &"a".repeat(5000), "Add a");
    r.commit("b.txt", "b", "Add b");
    let b = r.bundle(&["refs/heads/dough/t", &format!("^{}", r.base)]);
    let small = GateConfig {
        max_bundle_bytes: 200,
        ..GateConfig::default()
    };
    let msg = r.rejected(&r.plan(), &b, &small, "bundle_size");
    assert!(msg.contains("limit is 200"), "{msg}");
    let few = GateConfig {
        max_commits: 1,
        ..GateConfig::default()
    };
    r.rejected(&r.plan(), &b, &few, "commit_count");
    // The supervisor saw more bytes than allowed (the file holds a prefix).
    let before = r.remote_refs();
    let out = WorkOutput {
        report: Some(Work::Bundle {
            head: String::new(),
            commits: 2,
            bytes: 1,
        }),
        bundle_bytes: 1 << 30,
        oversized: true,
    };
    let err = finalize(
        &r.plan(),
        &out,
        &b,
        b.parent().unwrap(),
        &GateConfig::default(),
        &Credentials::default(),
        &TaskFacts::default(),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "gate:bundle_size");
    assert_eq!(r.remote_refs(), before);
}

#[test]
fn an_existing_branch_is_only_fast_forwarded() {
    let r = Repo::new();
    // Someone else's commit is already on the remote branch.
    let other = r.tmp.path().join("other");
    git(r.tmp.path(), &["clone", "-q", "remote.git", "other"]);
    std::fs::write(other.join("o.txt"), "o").unwrap();
    git(&other, &["add", "-A"]);
    git(&other, &["commit", "-q", "-m", "Theirs"]);
    git(&other, &["push", "-q", "origin", "HEAD:refs/heads/dough/t"]);
    let theirs = git(&other, &["rev-parse", "HEAD"]);
    r.commit("a.txt", "a", "Ours");
    let b = r.bundle(&["refs/heads/dough/t", &format!("^{}", r.base)]);
    let mut plan = r.plan();
    plan.branch_exists = Some(theirs);
    let msg = r.rejected(&plan, &b, &GateConfig::default(), "non_fast_forward");
    assert!(msg.contains("no force pushes"), "{msg}");
}

#[test]
fn guest_reports_decide_nothing_on_their_own() {
    let r = Repo::new();
    let b = r.bundle(&["refs/heads/main"]);
    let run = |report: Option<Work>| {
        let out = WorkOutput {
            report,
            ..WorkOutput::default()
        };
        finalize(
            &r.plan(),
            &out,
            &b,
            b.parent().unwrap(),
            &GateConfig::default(),
            &Credentials::default(),
            &TaskFacts::default(),
        )
    };
    let fin = run(Some(Work::NothingToDo)).unwrap();
    assert!(!fin.pushed && fin.note.unwrap().contains("nothing to do"));
    assert_eq!(run(None).unwrap_err().reason(), "work_failed");
    let e = run(Some(Work::Failed {
        stage: "commit".into(),
        message: "index.lock exists".into(),
    }))
    .unwrap_err();
    assert!(
        e.to_string().contains("could not commit") && e.to_string().contains("index.lock"),
        "{e}"
    );
}

/// A node that lost the task's claim (declared dead by a peer of its
/// cluster) pushes nothing: the check runs after the gate, before the push.
#[test]
fn nothing_is_pushed_once_the_claim_is_lost() {
    let r = Repo::new();
    r.commit("a.txt", "a", "Add a");
    let b = r.bundle(&["refs/heads/dough/t", &format!("^{}", r.base)]);
    let before = r.remote_refs();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let lost = GateConfig {
        claim: dough_core::repo::ClaimCheck::new({
            let asked = asked.clone();
            move || {
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err("the task's claim was taken over".into())
            }
        }),
        ..GateConfig::default()
    };
    let err = r.finalize(&r.plan(), &b, &lost).unwrap_err();
    assert_eq!(err.reason(), "node_lost", "{err}");
    assert!(err.to_string().contains("taken over"), "{err}");
    assert_eq!(r.remote_refs(), before, "nothing may be pushed");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A check that holds lets it through.
    let held = GateConfig {
        claim: dough_core::repo::ClaimCheck::new(|| Ok(())),
        ..GateConfig::default()
    };
    assert!(r.finalize(&r.plan(), &b, &held).unwrap().pushed);
}

/// A stand-in forge on 127.0.0.1 (no forge can run here): answers every
/// request with a pull request's URL, and counts them.
fn forge_double() -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}/api/v1", l.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = asked.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut b = [0u8; 65536];
            let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(500)));
            let _ = s.read(&mut b);
            let body = r#"{"html_url": "http://forge/o/r/pull/1"}"#;
            let _ = write!(
                s,
                "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (api, asked)
}

/// The claim lost between the push and the pull request (the node was
/// declared dead while pushing): the branch is pushed, but no pull
/// request is opened — the forge is never asked. With the claim held to
/// the end, it is.
#[test]
fn no_pull_request_is_opened_once_the_claim_is_lost() {
    let r = Repo::new();
    r.commit("a.txt", "a", "Add a");
    let b = r.bundle(&["refs/heads/dough/t", &format!("^{}", r.base)]);
    let (api, forge) = forge_double();
    let mut plan = r.plan();
    plan.url = format!("file://{}", r.remote.display());
    plan.pr.api = Some(api);
    let creds = Credentials {
        forge_token: Some("forge-token".into()),
        ..Credentials::default()
    };
    let checks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let lost_after_push = GateConfig {
        claim: dough_core::repo::ClaimCheck::new({
            let checks = checks.clone();
            move || match checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => Ok(()),
                _ => Err("the task's claim was taken over".into()),
            }
        }),
        ..GateConfig::default()
    };
    let before = r.remote_refs();
    let fin = |gate: &GateConfig| r.finalize_with(&plan, &b, gate, &creds);
    let err = fin(&lost_after_push).unwrap_err();
    assert_eq!(err.reason(), "node_lost", "{err}");
    assert_ne!(r.remote_refs(), before, "pushed before the claim was lost");
    assert_eq!(checks.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(
        forge.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the forge was asked for a pull request"
    );
    // Held to the end: the pull request is opened, once.
    let held = GateConfig {
        claim: dough_core::repo::ClaimCheck::new(|| Ok(())),
        ..GateConfig::default()
    };
    let f = fin(&held).unwrap();
    assert_eq!(f.pr_url.as_deref(), Some("http://forge/o/r/pull/1"));
    assert_eq!(forge.load(std::sync::atomic::Ordering::SeqCst), 1);
}
