//! Tier 2 (real VMs): OCI images as an image's base. The test writes an
//! OCI image layout and a `docker save` archive itself (busybox from
//! Debian's `busybox-static` as the userland, installed by
//! `scripts/test.sh`), imports them with `dough image build --from
//! oci:DIR` / `docker-archive:FILE`, runs build steps and tasks on them, and
//! checks every refusal leaves nothing behind. Registry pulls go to a real
//! registry server (Debian's `docker-registry`, the CNCF distribution
//! registry) the test starts on the host's loopback, the image pushed to it
//! with `oci-client`.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};

const BUSYBOX: &str = "/bin/busybox";
/// Applets the build steps and the checks call by name.
const APPLETS: &[&str] = &[
    "cat", "ls", "mkdir", "wc", "sync", "stat", "id", "echo", "test", "readlink", "pwd", "grep",
];

/// One tar entry: path, kind, data, mode, uid, gid, link target.
struct E<'a>(&'a str, tar::EntryType, Vec<u8>, u32, u64, u64, &'a str);

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for E(path, kind, data, mode, uid, gid, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_gid(*gid);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        h.set_path(path).unwrap();
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(data).unwrap();
    g.finish().unwrap()
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

use tar::EntryType as T;

/// The lower layer: busybox as /bin/sh and its applets, a file to be
/// whited out, a directory to be made opaque, a setuid file with a hard
/// link and a symlink to it, a file of another owner.
fn lower_layer(with_shell: bool) -> Vec<u8> {
    let bb = std::fs::read(BUSYBOX).expect("busybox-static (scripts/test.sh installs it)");
    let mut e = vec![
        E("bin/", T::Directory, vec![], 0o755, 0, 0, ""),
        E("bin/busybox", T::Regular, bb, 0o755, 0, 0, ""),
        E("etc/", T::Directory, vec![], 0o755, 0, 0, ""),
        E(
            "etc/passwd",
            T::Regular,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n".to_vec(),
            0o644,
            0,
            0,
            "",
        ),
        E("opt/", T::Directory, vec![], 0o755, 0, 0, ""),
        E("opt/gone", T::Regular, b"lower\n".to_vec(), 0o644, 0, 0, ""),
        E("opt/keep", T::Regular, b"kept\n".to_vec(), 0o644, 0, 0, ""),
        E("opt/d/", T::Directory, vec![], 0o755, 0, 0, ""),
        E("opt/d/old", T::Regular, b"old\n".to_vec(), 0o644, 0, 0, ""),
        E(
            "opt/owned",
            T::Regular,
            b"o\n".to_vec(),
            0o640,
            1234,
            5678,
            "",
        ),
        E("usr/", T::Directory, vec![], 0o755, 0, 0, ""),
        E("usr/bin/", T::Directory, vec![], 0o755, 0, 0, ""),
        E(
            "usr/bin/suid",
            T::Regular,
            b"#!/bin/sh\n".to_vec(),
            0o4755,
            0,
            0,
            "",
        ),
        E(
            "usr/bin/hard",
            T::Link,
            vec![],
            0o4755,
            0,
            0,
            "usr/bin/suid",
        ),
        E("usr/bin/link", T::Symlink, vec![], 0o777, 0, 0, "suid"),
    ];
    if with_shell {
        e.push(E("bin/sh", T::Symlink, vec![], 0o777, 0, 0, "busybox"));
        for a in APPLETS {
            e.push(E(
                Box::leak(format!("bin/{a}").into_boxed_str()),
                T::Symlink,
                vec![],
                0o777,
                0,
                0,
                "busybox",
            ));
        }
    }
    tar_of(&e)
}

/// The upper layer (uncompressed): a whiteout, an opaque directory with a
/// new entry, a marker.
fn upper_layer(marker: &str) -> Vec<u8> {
    tar_of(&[
        E("opt/.wh.gone", T::Regular, vec![], 0o644, 0, 0, ""),
        E("opt/d/", T::Directory, vec![], 0o755, 0, 0, ""),
        E("opt/d/.wh..wh..opq", T::Regular, vec![], 0o644, 0, 0, ""),
        E("opt/d/new", T::Regular, b"new\n".to_vec(), 0o644, 0, 0, ""),
        E(
            "etc/marker",
            T::Regular,
            format!("{marker}\n").into_bytes(),
            0o644,
            0,
            0,
            "",
        ),
    ])
}

struct Img {
    /// (blob bytes, media type) of the layers, lowest first.
    layers: Vec<(Vec<u8>, &'static str)>,
    diff_ids: Vec<String>,
    arch: &'static str,
}

fn image(marker: &str, with_shell: bool) -> Img {
    let lower = lower_layer(with_shell);
    let upper = upper_layer(marker);
    Img {
        diff_ids: vec![sha(&lower), sha(&upper)],
        layers: vec![
            (gzip(&lower), "application/vnd.oci.image.layer.v1.tar+gzip"),
            (upper, "application/vnd.oci.image.layer.v1.tar"),
        ],
        arch: "amd64",
    }
}

fn config(img: &Img) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": img.arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "FROM_IMAGE=1"]},
        "rootfs": {"type": "layers", "diff_ids": img.diff_ids},
    }))
    .unwrap()
}

fn put_blob(dir: &Path, b: &[u8]) -> serde_json::Value {
    let d = sha(b);
    let p = dir.join("blobs/sha256");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join(d.trim_start_matches("sha256:")), b).unwrap();
    serde_json::json!({"digest": d, "size": b.len()})
}

/// An OCI image layout of `img` under `dir`, its manifest named `v1`.
fn write_layout(dir: &Path, img: &Img) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut cfg = put_blob(dir, &config(img));
    cfg["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let layers: Vec<serde_json::Value> = img
        .layers
        .iter()
        .map(|(b, mt)| {
            let mut d = put_blob(dir, b);
            d["mediaType"] = (*mt).into();
            d
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": layers,
    }))
    .unwrap();
    let mut m = put_blob(dir, &manifest);
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    m["platform"] = serde_json::json!({"os": "linux", "architecture": img.arch});
    m["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "v1"});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [m]})).unwrap(),
    )
    .unwrap();
}

/// A `docker save` archive of `img` in docker's older format (config
/// `HEX.json`, layers `ID/layer.tar`, uncompressed): its layers are checked
/// by the config's diff_ids alone.
fn write_archive(file: &Path, img: &Img) {
    let cfg = config(img);
    let cfg_name = format!("{}.json", sha(&cfg).trim_start_matches("sha256:"));
    let mut entries = vec![];
    let mut names = vec![];
    for (i, (blob, mt)) in img.layers.iter().enumerate() {
        let plain = if mt.ends_with("gzip") {
            use std::io::Read;
            let mut v = vec![];
            flate2::read::GzDecoder::new(&blob[..])
                .read_to_end(&mut v)
                .unwrap();
            v
        } else {
            blob.clone()
        };
        names.push(format!("layer{i}/layer.tar"));
        entries.push((format!("layer{i}/layer.tar"), plain));
    }
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cfg_name, "RepoTags": ["test:1"], "Layers": names}
    ]))
    .unwrap();
    entries.push((cfg_name, cfg));
    entries.push(("manifest.json".into(), manifest));
    let refs: Vec<E> = entries
        .iter()
        .map(|(n, d)| E(n, T::Regular, d.clone(), 0o644, 0, 0, ""))
        .collect();
    std::fs::write(file, tar_of(&refs)).unwrap();
}

fn build(h: &Harness, args: &[&str]) -> (Option<i32>, String) {
    let out = h
        .cmd()
        .args(["image", "build"])
        .args(args)
        .output()
        .unwrap();
    (out.status.code(), text(&out.stderr))
}

fn show(h: &Harness, name: &str) -> serde_json::Value {
    let out = h.cmd().args(["image", "show", name]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What `images/.bases` holds (imported bases and any import's leftovers).
fn bases(h: &Harness) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(h.state.path().join("images/.bases"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Every refusal: a clear message, exit 2, no image, nothing left from the
/// import (no unpacked tree, no rootfs, no base), and no VM booted.
#[test]
fn bad_oci_images_are_refused_and_leave_nothing() {
    let h = Harness::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cases: Vec<(String, Vec<String>, &str)> = vec![];

    let mut arm = image("arm", true);
    arm.arch = "arm64";
    write_layout(&d.join("arm"), &arm);
    cases.push(("arm".into(), vec![], "linux/amd64"));

    // A layer blob changed after the manifest was written (same size).
    let img = image("tampered", true);
    write_layout(&d.join("tampered"), &img);
    let blob = d
        .join("tampered/blobs/sha256")
        .join(sha(&img.layers[1].0).trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    cases.push(("tampered".into(), vec![], "digest mismatch: layer 2"));

    // A layer whose blob digest is right but which is no tar.gz.
    let mut bad = image("corrupt", true);
    bad.layers[0].0 = vec![0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
    write_layout(&d.join("corrupt"), &bad);
    cases.push(("corrupt".into(), vec![], "not valid: layer 1"));

    // Layers whose content is not what the config's diff_ids say.
    let mut swapped = image("diffid", true);
    swapped.diff_ids.swap(0, 1);
    write_layout(&d.join("diffid"), &swapped);
    cases.push(("diffid".into(), vec![], "digest mismatch: layer 1 unpacks"));

    write_layout(&d.join("nosh"), &image("nosh", false));
    cases.push(("nosh".into(), vec![], "no /bin/sh"));

    write_layout(&d.join("big"), &image("big", true));
    cases.push((
        "big".into(),
        vec!["--max-size".into(), "1".into()],
        "image_too_large",
    ));

    for (name, extra, want) in &cases {
        let from = format!("oci:{}", d.join(name).display());
        let mut args = vec!["x", "--no-host-cas", "--from", &from];
        args.extend(extra.iter().map(String::as_str));
        let (code, err) = build(&h, &args);
        assert_eq!(code, Some(2), "{name}: {err}");
        assert!(err.contains(want), "{name}: want {want:?} in: {err}");
        assert!(!err.contains("running in a vm"), "{name}: {err}");
        assert!(bases(&h).is_empty(), "{name} left {:?}", bases(&h));
        assert!(!h.state.path().join("images/x").exists(), "{name}");
    }
    for (from, want) in [
        (
            format!("oci:{}", d.join("none").display()),
            "no such directory",
        ),
        (
            format!("docker-archive:{}", d.join("none.tar").display()),
            "no such file",
        ),
        (
            "docker://registry.example/Team/App:1".to_string(),
            "not an image reference",
        ),
        (
            format!("oci:{}:v2", d.join("arm").display()),
            "no image named \"v2\"",
        ),
    ] {
        let (code, err) = build(&h, &["x", "--from", &from]);
        assert_eq!(code, Some(2), "{from}: {err}");
        assert!(err.contains(want), "{from}: want {want:?} in: {err}");
    }
    assert!(bases(&h).is_empty(), "{:?}", bases(&h));
    h.assert_clean();
}

/// An OCI layout imported with no VM: whiteouts, an opaque directory,
/// setuid, hard link, symlink and owners kept as the guest sees them, the
/// task user added, a build step (in a VM, on busybox) stacked on it; a
/// second import is cached; a `docker save` archive of another image boots
/// too; `rm` and `gc` free the bases.
#[test]
fn oci_layouts_and_docker_archives_become_bootable_images() {
    let h = Harness::new();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    write_layout(&layout, &image("from-layout", true));
    let from = format!("oci:{}:v1", layout.display());

    let (code, err) = build(&h, &["plain", "--no-host-cas", "--from", &from]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("import: layer 2/2"), "{err}");
    assert!(
        !err.contains("running in a vm"),
        "an import boots no VM: {err}"
    );
    let m = show(&h, "plain");
    assert_eq!(m["oci"]["layers"], 2, "{m}");
    assert_eq!(m["oci"]["env"][1], "FROM_IMAGE=1", "{m}");
    assert_eq!(m["base"]["name"], from.as_str(), "{m}");

    // A step on it (trust a CA, in a VM booted from busybox), cached import.
    let ca = "/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt";
    let (code, err) = build(
        &h,
        &[
            "stepped",
            "--no-host-cas",
            "--ca-file",
            ca,
            "--egress",
            "none",
            "--from",
            &from,
            "--run",
            "echo made-by-a-step > /opt/step",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("cached"),
        "the same image is imported once: {err}"
    );
    assert!(err.contains("step 2/2: run: echo made-by-a-step"), "{err}");
    assert_eq!(bases(&h).len(), 1, "{:?}", bases(&h));

    let check = "cat /etc/marker /opt/step /opt/keep; test -e /opt/gone || echo gone-hidden; \
                 ls /opt/d; stat -c '%a %u %g %h %i' /usr/bin/suid; stat -c '%h %i' /usr/bin/hard; \
                 readlink /usr/bin/link; stat -c '%u %g %a' /opt/owned; id -un; pwd; \
                 grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt";
    let out = h.run(&[
        "--image",
        "stepped",
        "--no-network",
        "--",
        "sh",
        "-c",
        check,
    ]);
    let o = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{o}{}", text(&out.stderr));
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(
        &lines[..5],
        &[
            "from-layout",
            "made-by-a-step",
            "kept",
            "gone-hidden",
            "new"
        ],
        "{o}"
    );
    let suid: Vec<&str> = lines[5].split(' ').collect();
    assert_eq!(&suid[..4], &["4755", "0", "0", "2"], "{o}");
    let hard: Vec<&str> = lines[6].split(' ').collect();
    assert_eq!(
        hard,
        vec!["2", suid[4]],
        "a hard link to the same inode: {o}"
    );
    assert_eq!(
        &lines[7..11],
        &["suid", "1234 5678 640", "dough", "/home/dough"],
        "{o}"
    );
    assert_eq!(lines[11], "1", "the CA step's bundle: {o}");

    // A docker save archive of another image (its own content: unpacked).
    let archive = dir.path().join("saved.tar");
    write_archive(&archive, &image("from-archive", true));
    let (code, err) = build(
        &h,
        &[
            "saved",
            "--no-host-cas",
            "--from",
            &format!("docker-archive:{}", archive.display()),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("import: layer 2/2"), "{err}");
    let out = h.run(&[
        "--image",
        "saved",
        "--no-network",
        "--",
        "sh",
        "-c",
        "cat /etc/marker; ls /opt/d",
    ]);
    assert_eq!(
        text(&out.stdout),
        "from-archive\nnew\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(bases(&h).len(), 2, "{:?}", bases(&h));

    // The base goes with the last image using it.
    for name in ["plain", "saved"] {
        let out = h.cmd().args(["image", "rm", name]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let out = h.cmd().args(["image", "gc"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        bases(&h).len(),
        1,
        "stepped still uses its base: {:?}",
        bases(&h)
    );
    let out = h.cmd().args(["image", "rm", "stepped"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    h.cmd().args(["image", "gc"]).output().unwrap();
    assert!(bases(&h).is_empty(), "{:?}", bases(&h));
    h.assert_clean();
}

/// A registry server of the test's own (killed by PID when dropped).
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (scripts/test.sh installs it)");
        let r = Registry {
            child,
            port,
            _dir: dir,
        };
        wait_until(
            "the registry listens",
            std::time::Duration::from_secs(30),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        r
    }

    fn reference(&self, repo: &str) -> String {
        format!("127.0.0.1:{}/{repo}", self.port)
    }

    /// Push `img` as `repo` (`name:tag`) with oci-client over HTTP.
    fn push(&self, repo: &str, img: &Img) {
        use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = oci_client::Client::new(ClientConfig {
                protocol: ClientProtocol::Http,
                ..ClientConfig::default()
            });
            let r: oci_client::Reference = self.reference(repo).parse().unwrap();
            let layers: Vec<ImageLayer> = img
                .layers
                .iter()
                .map(|(b, mt)| ImageLayer::new(b.clone(), mt.to_string(), None))
                .collect();
            let cfg = Config::new(
                config(img),
                "application/vnd.oci.image.config.v1+json".into(),
                None,
            );
            c.push(
                &r,
                &layers,
                cfg,
                &oci_client::secrets::RegistryAuth::Anonymous,
                None,
            )
            .await
            .unwrap();
        });
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--from HOST/REPO:TAG` pulled from a real registry: the task sees the
/// pushed image; the credentials given in the environment are in no file
/// the build kept; a second build fetches no layer (the base is kept by
/// config digest); refusals — an arm64 image, an unknown tag or digest, a
/// registry without TLS reached as HTTPS, nothing listening, `--max-size`
/// (`image_too_large`, before any download) — leave nothing.
#[test]
fn images_are_pulled_from_a_registry() {
    let h = Harness::new();
    let reg = Registry::start();
    reg.push("test/busy:1", &image("from-registry", true));
    let mut arm = image("arm", true);
    arm.arch = "arm64";
    reg.push("test/arm:1", &arm);
    reg.push("test/other:1", &image("other", true));
    let secret = "s3cret-registry-password";
    let pull = |name: &str, from: &str, extra: &[&str]| {
        let out = h
            .cmd()
            .env("DOUGH_REGISTRY_USERNAME", "puller")
            .env("DOUGH_REGISTRY_PASSWORD", secret)
            .args(["image", "build", name, "--no-host-cas", "--from", from])
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), text(&out.stderr))
    };
    let busy = reg.reference("test/busy:1");
    let (code, err) = pull("pulled", &busy, &["--plain-http"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("pull: layer 2/2"), "{err}");
    assert!(err.contains("import: layer 2/2"), "{err}");
    let m = show(&h, "pulled");
    assert_eq!(m["oci"]["source"], format!("docker://{busy}"), "{m}");
    assert!(!m.to_string().contains(secret), "{m}");
    for b in bases(&h) {
        for f in std::fs::read_dir(&b).unwrap().flatten() {
            let bytes = std::fs::read(f.path()).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the registry password is in {}",
                f.path().display()
            );
        }
    }
    let out = h.run(&[
        "--image",
        "pulled",
        "--no-network",
        "--",
        "cat",
        "/etc/marker",
    ]);
    assert_eq!(
        text(&out.stdout),
        "from-registry\n",
        "{}",
        text(&out.stderr)
    );

    // Known base: only the manifest and config are fetched.
    let (code, err) = pull("again", &busy, &["--plain-http"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("cached"), "{err}");
    assert!(!err.contains("pull: layer"), "{err}");
    assert_eq!(bases(&h).len(), 1, "{:?}", bases(&h));

    let zero = format!("{}@sha256:{}", reg.reference("test/busy"), "0".repeat(64));
    let nothing = format!("127.0.0.1:{}/test/busy:1", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    for (from, extra, want) in [
        (
            reg.reference("test/arm:1"),
            vec!["--plain-http"],
            "linux/arm64",
        ),
        (
            reg.reference("test/busy:2"),
            vec!["--plain-http"],
            "fetching the manifest failed",
        ),
        (zero, vec!["--plain-http"], "fetching the manifest failed"),
        (busy.clone(), vec![], "needs --plain-http"),
        (
            nothing,
            vec!["--plain-http"],
            "fetching the manifest failed",
        ),
        (
            reg.reference("test/other:1"),
            vec!["--plain-http", "--max-size", "1"],
            "image_too_large",
        ),
    ] {
        let (code, err) = pull("x", &from, &extra);
        assert_eq!(code, Some(2), "{from}: {err}");
        assert!(err.contains(want), "{from}: want {want:?} in: {err}");
        assert!(
            !err.contains("pull: layer"),
            "{from}: downloaded layers: {err}"
        );
        assert_eq!(bases(&h).len(), 1, "{from} left {:?}", bases(&h));
        assert!(!h.state.path().join("images/x").exists(), "{from}");
    }
    h.assert_clean();
}
