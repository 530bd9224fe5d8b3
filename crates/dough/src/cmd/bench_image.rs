//! `dough bench image`: image builds (from nothing, unchanged, last step
//! changed), the OCI import rate against `tar -x` of the same layers, and
//! a task's start on a big image against the default image — each row a
//! median, the ratios measured in the same run. Runs in a state directory
//! of its own (a temporary one), with the host's default image.
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;
use dough_core::imagebuild::{self, BuildSpec, Step};
use dough_core::supervisor::Phase;
use dough_core::{run_task, Outcome, TaskSpec};
use dough_vmm::{AccelChoice, BackendChoice};
use sha2::Digest as _;

use super::bench::median;
use crate::Cli;

#[derive(Args, Debug)]
pub struct ImageBenchArgs {
    /// Samples of each row.
    #[arg(short, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub n: u32,
    /// The big image's size: one file of this many MiB in a layer.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub big_mib: u64,
    /// MiB of files in the synthetic OCI image (three layers).
    #[arg(long, value_name = "MIB", default_value_t = 96)]
    pub oci_mib: u64,
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Deterministic bytes that do not compress (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn entry(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_path(path)?;
    h.set_cksum();
    b.append(&h, data)?;
    Ok(())
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// A three-layer OCI layout of about `mib` MiB of files: many small text
/// files, a few big incompressible ones, then whiteouts and new files.
/// Returns the gzip blobs' total bytes.
fn synthetic_layout(dir: &Path, mib: u64) -> anyhow::Result<u64> {
    let small = (mib * 3 / 10) << 20; // 30 %: 8 KiB text files
    let big = (mib * 6 / 10) << 20; // 60 %: 4 MiB noise files
    let mut l1 = tar::Builder::new(Vec::new());
    entry(&mut l1, "bin/sh", b"#!", 0o755)?;
    let text: Vec<u8> = (0..8192u32)
        .map(|i| b"dough image bench\n"[(i % 18) as usize])
        .collect();
    for i in 0..(small / 8192) {
        entry(
            &mut l1,
            &format!("usr/share/d{}/f{i}", i % 64),
            &text,
            0o644,
        )?;
    }
    let mut l2 = tar::Builder::new(Vec::new());
    for i in 0..(big >> 22).max(1) {
        entry(
            &mut l2,
            &format!("opt/big/{i}"),
            &noise(i + 7, 4 << 20),
            0o644,
        )?;
    }
    let mut l3 = tar::Builder::new(Vec::new());
    for i in (0..(small / 8192)).step_by(7) {
        entry(
            &mut l3,
            &format!("usr/share/d{}/.wh.f{i}", i % 64),
            b"",
            0o644,
        )?;
    }
    entry(&mut l3, "usr/share/d1/.wh..wh..opq", b"", 0o644)?;
    for i in 0..((mib << 20) / 10 / 16384) {
        entry(
            &mut l3,
            &format!("srv/new/f{i}"),
            &noise(i + 99, 16384),
            0o644,
        )?;
    }
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let put = |b: &[u8]| -> anyhow::Result<serde_json::Value> {
        let d = sha(b);
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), b)?;
        Ok(serde_json::json!({"digest": d, "size": b.len()}))
    };
    let mut diff_ids = vec![];
    let mut layers = vec![];
    let mut total = 0u64;
    for l in [l1, l2, l3] {
        let plain = l.into_inner()?;
        diff_ids.push(sha(&plain));
        let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        g.write_all(&plain)?;
        let gz = g.finish()?;
        total += gz.len() as u64;
        let mut d = put(&gz)?;
        d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        layers.push(d);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let mut c = put(&config)?;
    c["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": c, "layers": layers,
    }))?;
    let mut m = put(&manifest)?;
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    std::fs::write(
        dir.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [m]}).to_string(),
    )?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(total)
}

pub async fn run(cli: &Cli, a: &ImageBenchArgs) -> anyhow::Result<u8> {
    let mut host = super::host_config_net(cli, a.accel, a.backend)?;
    let default = dough_image::Image::load(&host.image_dir)?;
    let tmp = tempfile::Builder::new()
        .prefix("dough-bench-image")
        .tempdir_in("/var/tmp")?;
    host.state_dir = tmp.path().to_path_buf();
    let quiet = &mut |_: dough_core::Event<'_>| {};
    let build = |name: &str, steps: Vec<Step>| BuildSpec {
        name: name.into(),
        from: dough_image::DEFAULT_IMAGE.into(),
        steps,
        network: dough_net::Egress::None,
        vcpus: 1,
        memory_mib: 512,
        disk_mib: a.big_mib + 512,
        step_timeout: Duration::from_secs(1800),
        max_import_bytes: 1 << 40,
        plain_http: false,
    };
    let run = |cmd: &str| Step::Run {
        cmd: cmd.into(),
        env: vec![],
    };

    // Builds: two steps from nothing, the same again, the last one changed.
    let (mut scratch, mut unchanged, mut last) = (vec![], vec![], vec![]);
    for i in 0..a.n {
        eprintln!("builds {}/{}", i + 1, a.n);
        let first = format!("echo {i}-{} > /opt/a", std::process::id());
        let spec = build("b", vec![run(&first), run("echo b > /opt/b")]);
        let t = Instant::now();
        imagebuild::build(&host, &spec, quiet, std::future::pending()).await?;
        scratch.push(t.elapsed());
        let t = Instant::now();
        let b = imagebuild::build(&host, &spec, quiet, std::future::pending()).await?;
        unchanged.push(t.elapsed());
        anyhow::ensure!(b.unchanged, "the unchanged rebuild changed the image");
        let spec = build("b", vec![run(&first), run(&format!("echo b{i} > /opt/b"))]);
        let t = Instant::now();
        let b = imagebuild::build(&host, &spec, quiet, std::future::pending()).await?;
        last.push(t.elapsed());
        anyhow::ensure!(
            b.cached == 1,
            "the changed build reran more than its last step"
        );
    }

    // OCI import vs tar -x of the same layers.
    eprintln!("oci: writing a {} MiB synthetic image", a.oci_mib);
    let layout = tmp.path().join("layout");
    let gz_bytes = synthetic_layout(&layout, a.oci_mib)?;
    let agent = std::env::current_exe()?;
    let (mut unpack, mut mkfs, mut tarx) = (vec![], vec![], vec![]);
    let blobs: Vec<std::path::PathBuf> = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
        let m = index["manifests"][0]["digest"].as_str().unwrap_or_default();
        let man: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&m[7..]))?)?;
        man["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                layout
                    .join("blobs/sha256")
                    .join(&l["digest"].as_str().unwrap_or("sha256:")[7..])
            })
            .collect()
    };
    for i in 0..a.n {
        eprintln!("oci import {}/{}", i + 1, a.n);
        let src = dough_image::oci::Source::Layout {
            dir: layout.clone(),
            reference: None,
        };
        let info = dough_image::oci::import(
            &src,
            &agent,
            &tmp.path().join("tree"),
            &tmp.path().join("rootfs.ext4"),
            dough_image::oci::Limits { max_bytes: 1 << 40 },
            &mut |_| {},
        )?;
        unpack.push(Duration::from_millis(info.unpack_ms));
        mkfs.push(Duration::from_millis(info.mkfs_ms));
        let _ = std::fs::remove_file(tmp.path().join("rootfs.ext4"));
        let dir = tmp.path().join("tarx");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let t = Instant::now();
        for b in &blobs {
            let st = std::process::Command::new("tar")
                .arg("-xzf")
                .arg(b)
                .arg("-C")
                .arg(&dir)
                .status()?;
            anyhow::ensure!(st.success(), "tar -xzf {} failed", b.display());
        }
        tarx.push(t.elapsed());
        std::fs::remove_dir_all(&dir)?;
    }

    // A task's start on a big image vs the default image.
    eprintln!("building a {} MiB image", a.big_mib);
    let big = imagebuild::build(
        &host,
        &build(
            "big",
            vec![run(&format!("head -c {}M /dev/zero > /opt/big", a.big_mib))],
        ),
        quiet,
        std::future::pending(),
    )
    .await?
    .image;
    let (mut on_default, mut on_big) = (vec![], vec![]);
    for i in 0..a.n {
        eprintln!("starts {}/{}", i + 1, a.n);
        for (image, out) in [(None, &mut on_default), (Some(big.clone()), &mut on_big)] {
            let spec = TaskSpec {
                command: vec!["true".into()],
                network: Some(dough_net::Egress::None),
                image,
                ..TaskSpec::default()
            };
            let rep = run_task(&host, &spec, &mut |_| {}, std::future::pending()).await;
            match rep.result {
                Ok(Outcome::Exited(s)) if s.shell_code() == 0 => {}
                Ok(o) => anyhow::bail!("the start run ended {o:?}"),
                Err(e) => return Err(e.into()),
            }
            out.push(rep.phase(Phase::Started).unwrap_or_default());
        }
    }

    let accel = host.facts.choose(a.accel).map_err(anyhow::Error::msg)?;
    let (m_scratch, m_unch, m_last) = (median(scratch), median(unchanged), median(last));
    let (m_unpack, m_mkfs, m_tar) = (median(unpack), median(mkfs), median(tarx));
    let (m_def, m_big) = (median(on_default), median(on_big));
    let mbps = |d: Duration| gz_bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9);
    println!(
        "## dough bench image — {} samples per row, {accel}, medians (default image {})",
        a.n,
        &default.manifest.digest[..12]
    );
    println!();
    println!("| what | s | ratio |");
    println!("|---|---|---|");
    println!(
        "| build, 2 `--run` steps, nothing cached (2 VMs) | {} | 1.00 |",
        secs(m_scratch)
    );
    println!(
        "| the same build again (no VM) | {:.4} ({:.1} ms) | {:.4} |",
        m_unch.as_secs_f64(),
        m_unch.as_secs_f64() * 1000.0,
        m_unch.as_secs_f64() / m_scratch.as_secs_f64()
    );
    println!(
        "| last step changed (1 VM) | {} | {:.2} |",
        secs(m_last),
        m_last.as_secs_f64() / m_scratch.as_secs_f64()
    );
    println!();
    println!(
        "| OCI import, {} MiB of files in 3 gzip layers ({:.1} MB) | s | MB/s of layers | vs `tar -xzf` |",
        a.oci_mib,
        gz_bytes as f64 / 1e6
    );
    println!("|---|---|---|---|");
    println!(
        "| `tar -xzf` of each layer, in order | {} | {:.1} | 1.00 |",
        secs(m_tar),
        mbps(m_tar)
    );
    println!(
        "| Dough's unpack (digests, whiteouts, owners) | {} | {:.1} | {:.2} |",
        secs(m_unpack),
        mbps(m_unpack),
        m_unpack.as_secs_f64() / m_tar.as_secs_f64()
    );
    println!("| … then `mkfs.ext4 -d` | {} | | |", secs(m_mkfs));
    println!();
    println!("| task start (`dough run -- true`, command started) | s | ratio |");
    println!("|---|---|---|");
    println!("| default image | {} | 1.00 |", secs(m_def));
    let r = m_big.as_secs_f64() / m_def.as_secs_f64().max(1e-9);
    println!(
        "| image with a {} MiB layer | {} | **{r:.2}** (target ≤ 1.10) |",
        a.big_mib,
        secs(m_big)
    );
    Ok(0)
}
