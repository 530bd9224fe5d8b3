//! Pulling an OCI image from a registry (`--from docker://REF`, or a
//! reference with a registry host: `registry.example/team/app:1`,
//! `…@sha256:…`) into an OCI image layout, with the maintained
//! `oci-client` library. [`crate::imagebuild`] then imports the layout as
//! any other (`dough_image::oci`), which checks every digest again.
//!
//! Two stages, so an image whose base is already imported costs only its
//! manifest and config: [`pull_manifests`] (the manifest — the linux/amd64
//! one of an index — and the config) and [`pull_layers`].
//!
//! Credentials come from the environment (`DOUGH_REGISTRY_USERNAME`,
//! `DOUGH_REGISTRY_PASSWORD`) and go only to the registry: nothing writes
//! them into the layout, the image or its manifest. HTTPS is checked
//! against the host's trust store; `--plain-http` is for a registry on a
//! trusted network without TLS.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use crate::imagebuild::BuildError;

/// Where the image comes from.
#[derive(Debug, Clone)]
pub struct Pull {
    pub reference: String,
    pub plain_http: bool,
}

const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn refused(msg: String) -> BuildError {
    BuildError::Invalid(msg)
}

fn client(p: &Pull) -> Client {
    // reqwest is built without a default crypto provider: ring, as the
    // rest of Dough uses (installing it twice is harmless).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: if p.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(60)),
        ..ClientConfig::default()
    })
}

fn auth() -> RegistryAuth {
    match (
        std::env::var("DOUGH_REGISTRY_USERNAME"),
        std::env::var("DOUGH_REGISTRY_PASSWORD"),
    ) {
        (Ok(u), Ok(p)) if !u.is_empty() => RegistryAuth::Basic(u, p),
        _ => RegistryAuth::Anonymous,
    }
}

fn parse(p: &Pull) -> Result<Reference, BuildError> {
    p.reference.parse::<Reference>().map_err(|e| {
        refused(format!(
            "--from {}: not an image reference: {e}",
            p.reference
        ))
    })
}

fn failed(p: &Pull, what: &str, e: oci_client::errors::OciDistributionError) -> BuildError {
    // The whole chain: reqwest's own message hides the cause (refused,
    // timed out, a TLS handshake with a plain-HTTP server).
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        text.push_str(&format!(": {s}"));
        src = s.source();
    }
    let tls = text.to_ascii_lowercase().contains("tls") || text.contains("InvalidContentType");
    refused(format!(
        "--from {}: {what} failed: {text}{}",
        p.reference,
        if tls && !p.plain_http {
            " (a registry without TLS needs --plain-http)"
        } else {
            ""
        }
    ))
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, BuildError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(layout.join("blobs/sha256").join(h))
        }
        _ => Err(refused(format!(
            "the registry named a digest Dough does not take: {digest:?}"
        ))),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    std::fs::write(path, bytes).map_err(|e| BuildError::Io {
        what: format!("write {}", path.display()),
        source: e,
    })
}

/// Fetch the image's manifest and config into a fresh OCI layout at
/// `layout` (an `index.json` naming the one linux/amd64 manifest).
pub async fn pull_manifests(p: &Pull, layout: &Path) -> Result<(), BuildError> {
    let r = parse(p)?;
    let c = client(p);
    let auth = auth();
    std::fs::create_dir_all(layout.join("blobs/sha256")).map_err(|e| BuildError::Io {
        what: format!("create {}", layout.display()),
        source: e,
    })?;
    write(
        &layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let (raw, _) = c
        .pull_manifest_raw(&r, &auth, ACCEPT)
        .await
        .map_err(|e| failed(p, "fetching the manifest", e))?;
    let digest = sha256(&raw);
    if let Some(want) = r.digest() {
        if want != digest {
            return Err(refused(format!(
                "digest mismatch: the registry's manifest for {} is {digest}",
                p.reference
            )));
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| refused(format!("the registry's manifest is not JSON: {e}")))?;
    let (raw, digest, v) = if v["manifests"].is_array() {
        // An index: its linux/amd64 manifest.
        write(&blob_path(layout, &digest)?, &raw)?;
        let pick = dough_image::oci::pick_platform(v["manifests"].as_array().unwrap())?;
        let child = pick["digest"].as_str().unwrap_or_default().to_string();
        let cr = Reference::with_digest(
            r.registry().to_string(),
            r.repository().to_string(),
            child.clone(),
        );
        let (raw, _) = c
            .pull_manifest_raw(&cr, &auth, ACCEPT)
            .await
            .map_err(|e| failed(p, "fetching the linux/amd64 manifest", e))?;
        if sha256(&raw) != child {
            return Err(refused(format!(
                "digest mismatch: the registry's manifest {child} is {}",
                sha256(&raw)
            )));
        }
        let v = serde_json::from_slice(&raw)
            .map_err(|e| refused(format!("the registry's manifest is not JSON: {e}")))?;
        (raw, child, v)
    } else {
        (raw, digest, v)
    };
    write(&blob_path(layout, &digest)?, &raw)?;
    let media = v["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": media, "digest": digest, "size": raw.len()}],
    });
    write(&layout.join("index.json"), index.to_string().as_bytes())?;
    let config = v["config"]["digest"]
        .as_str()
        .ok_or_else(|| refused("the registry's manifest names no config".into()))?
        .to_string();
    fetch_blob(p, &c, &r, layout, &config, &mut |_| {}).await?;
    Ok(())
}

/// Fetch the layers the manifest in `layout` names (`pull_manifests`
/// first). `say` gets a line per layer and, on long ones, every 5 s.
/// Refused before any download when the layers alone (compressed) are
/// over `max_bytes`.
pub async fn pull_layers(
    p: &Pull,
    layout: &Path,
    max_bytes: u64,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), BuildError> {
    let r = parse(p)?;
    let c = client(p);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).map_err(|e| {
            BuildError::Io {
                what: "read the pulled index".into(),
                source: e,
            }
        })?)
        .map_err(|e| refused(e.to_string()))?;
    let m = index["manifests"][0]["digest"].as_str().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob_path(layout, m)?).map_err(|e| {
            BuildError::Io {
                what: "read the pulled manifest".into(),
                source: e,
            }
        })?)
        .map_err(|e| refused(e.to_string()))?;
    let layers: Vec<(String, u64)> = v["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["digest"].as_str().unwrap_or_default().to_string(),
                l["size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let total: u64 = layers.iter().map(|l| l.1).sum();
    if total > max_bytes {
        return Err(refused(format!(
            "image_too_large: its layers alone are {} MiB, over the limit of {} MiB (--max-size); nothing was downloaded",
            total >> 20,
            max_bytes >> 20
        )));
    }
    let t = Instant::now();
    for (i, (d, size)) in layers.iter().enumerate() {
        say(format!(
            "pull: layer {}/{}: {} ({} MiB)",
            i + 1,
            layers.len(),
            &d[..d.len().min(19)],
            size >> 20
        ));
        fetch_blob(p, &c, &r, layout, d, say).await?;
    }
    let secs = t.elapsed().as_secs_f64().max(0.001);
    say(format!(
        "pull: {} layers, {} MiB in {secs:.1} s ({:.1} MB/s)",
        layers.len(),
        total >> 20,
        total as f64 / 1e6 / secs
    ));
    Ok(())
}

/// One blob into the layout, its digest checked as it streams; written
/// under a temporary name and renamed, so a blob in the layout is whole.
async fn fetch_blob(
    p: &Pull,
    c: &Client,
    r: &Reference,
    layout: &Path,
    digest: &str,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), BuildError> {
    let path = blob_path(layout, digest)?;
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension("part");
    let io = |what: &str| {
        let what = format!("{what} {}", tmp.display());
        move |e| BuildError::Io { what, source: e }
    };
    let mut s = c
        .pull_blob_stream(r, digest)
        .await
        .map_err(|e| failed(p, &format!("fetching {digest}"), e))?;
    let mut f = tokio::fs::File::create(&tmp).await.map_err(io("create"))?;
    let mut h = sha2::Sha256::new();
    let (mut got, mut last) = (0u64, Instant::now());
    while let Some(chunk) = s.stream.next().await {
        let chunk = chunk.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            refused(format!("--from {}: fetching {digest}: {e}", p.reference))
        })?;
        h.update(&chunk);
        f.write_all(&chunk).await.map_err(io("write"))?;
        got += chunk.len() as u64;
        if last.elapsed() > Duration::from_secs(5) {
            last = Instant::now();
            say(format!("pull: {} MiB of {digest:.19}", got >> 20));
        }
    }
    f.flush().await.map_err(io("write"))?;
    drop(f);
    let have = format!("sha256:{}", hex::encode(h.finalize()));
    if have != digest {
        let _ = std::fs::remove_file(&tmp);
        return Err(refused(format!(
            "digest mismatch: the registry sent {have} for {digest}"
        )));
    }
    std::fs::rename(&tmp, &path).map_err(io("rename"))?;
    Ok(())
}
