//! Tier 2 (real VMs): named images built by steps that run in microVMs
//! (`dough image build NAME --run/--packages`), used by tasks
//! (`dough run --image NAME`), cached by step, listed, removed and
//! collected. Refusals that boot nothing are checked first in each test.
mod common;

use common::*;

fn build(h: &Harness, args: &[&str]) -> (Option<i32>, String) {
    let out = h
        .cmd()
        .args(["image", "build"])
        .args(args)
        .output()
        .unwrap();
    (out.status.code(), text(&out.stderr))
}

fn digest(h: &Harness, name: &str) -> String {
    let out = h.cmd().args(["image", "show", name]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    m["digest"].as_str().unwrap().to_string()
}

fn layer_files(h: &Harness) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(h.state.path().join("images/.layers"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const STEP1: &str =
    "echo built > /etc/dough-built && rm /usr/bin/nano && mkdir -p /opt/d && touch /opt/d/old";
const STEP2: &str = "rm -rf /opt/d && mkdir /opt/d && touch /opt/d/new && ln -s /etc/dough-built /opt/d/link \
                     && echo x > /opt/d/a && ln /opt/d/a /opt/d/hard && cp /bin/true /opt/d/suid && chmod 4755 /opt/d/suid \
                     && echo \"$GREETING\" > /opt/greeting";

/// Two steps, each in a VM without a network: a file the first step made
/// is in the task's root, a file it deleted is absent (a whiteout in its
/// layer), a directory the second step replaced shows only its new
/// contents (opaque), and a symlink, a hard link and a setuid bit survive.
/// An unchanged rebuild runs no VM; a changed last step reruns only that
/// step; a failing step fails the build with its output and exit code and
/// the previous image stays; `ls`, `rm` and `gc` see and free it.
#[test]
fn steps_become_layers_a_task_boots_and_the_cache_and_failures_behave() {
    let h = Harness::new();
    // Refused before any VM: bad names, the base itself, no steps, bad
    // packages, an unknown base, an unknown image for a task.
    for (args, want) in [
        (vec!["Bad/Name", "--run", "true"], "image name"),
        (vec!["default", "--run", "true"], "name the image"),
        (vec!["t1"], "nothing to build"),
        (vec!["t1", "--ca-file", "/etc/hostname"], "not a PEM"),
        (vec!["t1", "--ca-file", "/etc/hostname"], "not a PEM"),
        (vec!["t1", "--packages", "x;rm"], "package"),
        (vec!["t1", "--from", "nope", "--run", "true"], "--from nope"),
    ] {
        let (code, err) = build(&h, &args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    let out = h.run(&["--image", "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--image nope"),
        "{}",
        text(&out.stderr)
    );
    assert!(layer_files(&h).is_empty());
    assert!(!h.runs_dir().exists() || std::fs::read_dir(h.runs_dir()).unwrap().count() == 0);

    // A CA of the test's own, trusted from the first step on (the host's
    // own additions left out: the steps must not depend on this host).
    let ca = h.state.path().join("test-ca.crt");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=dough-test-ca", "-keyout"])
        .arg(h.state.path().join("test-ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", text(&made.stderr));
    let ca = ca.to_str().unwrap().to_string();
    let steps = [
        "t1",
        "--egress",
        "none",
        "--no-host-cas",
        "--ca-file",
        &ca,
        "-e",
        "GREETING=hello",
        "--run",
        STEP1,
        "--run",
        STEP2,
    ];
    let (code, err) = build(&h, &steps);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("step 1/3: trust CAs: test-ca.crt"), "{err}");
    assert!(err.contains("step 2/3: run: echo built"), "{err}");
    assert_eq!(err.matches("running in a vm").count(), 3, "{err}");
    assert_eq!(layer_files(&h).len(), 3, "{:?}", layer_files(&h));
    let d1 = digest(&h, "t1");

    // A failing step: its output and code, and t1 as it was.
    let (code, err) = build(
        &h,
        &[
            "t1",
            "--egress",
            "none",
            "--no-host-cas",
            "--run",
            "echo oops-out; echo oops-err >&2; exit 3",
        ],
    );
    assert_eq!(code, Some(125), "{err}");
    for want in [
        "oops-out",
        "oops-err",
        "exit code 3",
        "previous image \"t1\"",
    ] {
        assert!(err.contains(want), "{want} in {err}");
    }
    assert_eq!(digest(&h, "t1"), d1);
    assert_eq!(layer_files(&h).len(), 3, "the failed step's disk is gone");

    let out = h.run(&[
        "--image",
        "t1",
        "--no-network",
        "--",
        "sh",
        "-c",
        "cat /etc/dough-built; command -v nano || echo no-nano; ls /opt/d; readlink /opt/d/link; \
         stat -c %h /opt/d/hard; stat -c %a /opt/d/suid; cat /opt/greeting; id -un; \
         openssl verify /usr/local/share/ca-certificates/dough/ca-0.crt",
    ]);
    let o = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{o}{}", text(&out.stderr));
    assert_eq!(
        o.lines().collect::<Vec<_>>(),
        [
            "built",
            "no-nano",
            "a",
            "hard",
            "link",
            "new",
            "suid",
            "/etc/dough-built",
            "2",
            "4755",
            "hello",
            "dough",
            "/usr/local/share/ca-certificates/dough/ca-0.crt: OK"
        ],
        "{o}"
    );

    // Unchanged: no VM, the same image.
    let (code, err) = build(&h, &steps);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.matches(": cached").count(), 3, "{err}");
    assert!(!err.contains("running in a vm"), "{err}");
    assert!(err.contains("unchanged"), "{err}");
    assert_eq!(digest(&h, "t1"), d1);

    // The same build as a reviewed file: the same image, no VM.
    let spec = h.state.path().join("t1.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"t1\"\nhost_cas = false\nca_files = [\"test-ca.crt\"]\negress = \"none\"\n\
             env = {{ GREETING = \"hello\" }}\nrun = [{:?}, {:?}]\n",
            STEP1, STEP2
        ),
    )
    .unwrap();
    let (code, err) = build(&h, &["-f", spec.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("running in a vm"), "{err}");
    assert_eq!(digest(&h, "t1"), d1, "{err}");
    std::fs::write(&spec, "name = \"t1\"\nrun = [\"true\"]\nbogus = 1\n").unwrap();
    let (code, err) = build(&h, &["-f", spec.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field `bogus`"), "{err}");

    // The last step changed: only it runs.
    let mut changed = steps.to_vec();
    let step2b = format!("{STEP2} && touch /opt/d/more");
    *changed.last_mut().unwrap() = &step2b;
    let (code, err) = build(&h, &changed);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("step 2/3: run: echo built > /etc/dough-built && rm /usr/bin/nano && mkdir -p /opt/d && touch /opt/d/old: cached"), "{err}");
    assert_eq!(err.matches(": cached").count(), 2, "{err}");
    assert_eq!(err.matches("running in a vm").count(), 1, "{err}");
    assert_ne!(digest(&h, "t1"), d1);
    assert_eq!(layer_files(&h).len(), 4);

    let ls = text(&h.cmd().args(["image", "ls"]).output().unwrap().stdout);
    let row = ls
        .lines()
        .find(|l| l.starts_with("t1 "))
        .unwrap_or_else(|| panic!("{ls}"));
    assert_eq!(row.split_whitespace().nth(2), Some("3"), "{row}");
    // gc keeps what t1 uses: one layer (the old step 3) goes.
    let gc = h.cmd().args(["image", "gc"]).output().unwrap();
    assert_eq!(gc.status.code(), Some(0));
    assert_eq!(layer_files(&h).len(), 3, "{}", text(&gc.stdout));
    // A task of the daemon's queue that names t1 holds it (the real task
    // store; the task is put there as `POST /v1/tasks` would).
    {
        use dough_core::store::Store;
        let store = dough_core::store::SqliteStore::open(&h.state.path().join("dough.db")).unwrap();
        let req: dough_core::store::TaskRequest =
            serde_json::from_value(serde_json::json!({"command": ["true"], "image": "t1"}))
                .unwrap();
        store.insert("q1", &req).unwrap();
        let rm = h.cmd().args(["image", "rm", "t1"]).output().unwrap();
        assert_eq!(rm.status.code(), Some(125), "{}", text(&rm.stderr));
        assert!(
            text(&rm.stderr).contains("image \"t1\" is wanted by task q1 of the daemon"),
            "{}",
            text(&rm.stderr)
        );
        store
            .transition(
                "q1",
                None,
                dough_core::store::State::Cancelled,
                Some("cancelled"),
                None,
                None,
            )
            .unwrap();
    }
    let rm = h.cmd().args(["image", "rm", "t1"]).output().unwrap();
    assert_eq!(rm.status.code(), Some(0), "{}", text(&rm.stderr));
    let rm = h.cmd().args(["image", "rm", "t1"]).output().unwrap();
    assert_ne!(rm.status.code(), Some(0));
    assert!(text(&rm.stderr).contains("no image"));
    h.cmd().args(["image", "gc"]).output().unwrap();
    assert!(layer_files(&h).is_empty(), "{:?}", layer_files(&h));
    h.assert_clean();
}

/// Debian packages on Dough's base, installed by apt inside a VM (the
/// guest fetches from the Debian mirror over its own network): the task
/// runs the package's program.
#[test]
fn packages_are_installed_in_a_vm_and_a_task_runs_them() {
    let h = Harness::new();
    let (code, err) = build(
        &h,
        &["py", "--no-host-cas", "--packages", "python3-minimal"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("step 1/1: packages: python3-minimal: running in a vm"),
        "{err}"
    );
    let show = h.cmd().args(["image", "show", "py"]).output().unwrap();
    let m: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(m["layers"][0]["step"], "packages: python3-minimal", "{m}");
    assert_eq!(m["base"]["name"], "default", "{m}");
    let out = h.run(&["--image", "py", "--", "python3", "-c", "print(6 * 7)"]);
    assert_eq!(text(&out.stdout), "42\n", "{}", text(&out.stderr));
    // The default image is untouched by it.
    let out = h.run(&[
        "--no-network",
        "--",
        "sh",
        "-c",
        "command -v python3 || echo none",
    ]);
    assert_eq!(text(&out.stdout), "none\n");
    h.assert_clean();
}

/// `--copy HOST:GUEST`: a directory and a file of the host land in the
/// image, copied inside a VM, so the task user's home they land in stays
/// the task user's; modes and a symlink kept, each copy owned by the owner
/// of the directory it lands in (dough in its home, root in /usr). The same
/// content is cached; changed content reruns the step. Bad arguments are
/// refused before any VM.
#[test]
fn host_files_are_copied_in_by_a_vm() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new();
    let src = tempfile::tempdir().unwrap();
    let proj = src.path().join("proj");
    std::fs::create_dir_all(proj.join("sub")).unwrap();
    std::fs::write(proj.join("sub/f"), "copied\n").unwrap();
    std::fs::set_permissions(proj.join("sub/f"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("sub/f", proj.join("link")).unwrap();
    let tool = src.path().join("tool");
    std::fs::write(&tool, "#!/bin/sh\necho tool-ran\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (arg, want) in [
        ("proj", "HOST_PATH:GUEST_PATH"),
        ("/nope/x:/opt/x", "does not exist"),
        (&format!("{}:opt/x", tool.display())[..], "must be absolute"),
        (
            &format!("{}:/opt/../x", tool.display())[..],
            "must be absolute",
        ),
    ] {
        let (code, err) = build(&h, &["cp", "--no-host-cas", "--copy", arg]);
        assert_eq!(code, Some(2), "{arg}: {err}");
        assert!(err.contains(want), "{arg}: want {want:?} in {err}");
    }
    let copies = [
        format!("{}:/home/dough/proj", proj.display()),
        format!("{}:/usr/local/bin/tool", tool.display()),
    ];
    let args = |c: &[String; 2]| {
        vec![
            "cp".to_string(),
            "--no-host-cas".into(),
            "--egress".into(),
            "none".into(),
            "--copy".into(),
            c[0].clone(),
            "--copy".into(),
            c[1].clone(),
        ]
    };
    let a = args(&copies);
    let (code, err) = build(&h, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("step 2/2: copy: /usr/local/bin/tool"), "{err}");
    let out = h.run(&[
        "--image",
        "cp",
        "--no-network",
        "--",
        "sh",
        "-c",
        "cat ~/proj/sub/f ~/proj/link; stat -c '%U %a' ~ ~/proj/sub/f /usr/local/bin/tool /usr/local/bin; \
         readlink ~/proj/link; tool; ls -a / | grep -c dough-copy",
    ]);
    assert_eq!(
        text(&out.stdout),
        "copied\ncopied\ndough 755\ndough 640\nroot 755\nroot 755\nsub/f\ntool-ran\n0\n",
        "{}",
        text(&out.stderr)
    );
    // Same content: cached. Changed content: that step reruns.
    let (code, err) = build(&h, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("unchanged"), "{err}");
    std::fs::write(&tool, "#!/bin/sh\necho tool-v2\n").unwrap();
    let (code, err) = build(&h, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("step 1/2: copy: /home/dough/proj"), "{err}");
    assert!(err.contains(": cached"), "{err}");
    assert!(
        err.contains("step 2/2: copy: /usr/local/bin/tool") && err.contains("running in a vm"),
        "{err}"
    );
    let out = h.run(&["--image", "cp", "--no-network", "--", "tool"]);
    assert_eq!(text(&out.stdout), "tool-v2\n", "{}", text(&out.stderr));
    // Nothing of the copies' own layers is left in the store.
    let left: Vec<String> = layer_files(&h)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    h.assert_clean();
}
