//! Provenance: what ran, where, on what, and what came of it — an in-toto
//! Statement (v1) with an SLSA-style predicate (provenance v1's shape),
//! signed in a DSSE envelope with the host's ed25519 key.
//!
//! * The key is made on the daemon's first start (`<state>/keys/`, a 32-byte
//!   seed readable by root only); its public half is served at `GET /v1/keys`.
//! * The statement's subjects are the task's results: the pushed commits
//!   (`gitCommit`) and the bundle (sha256) of a repository task, else the
//!   task's stored output (sha256, as `GET /v1/tasks/{id}/logs` gives it).
//! * `dough verify FILE` checks an envelope against the daemon's keys (or a
//!   key given), and that what it signs is such a statement.
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// What a Dough task is, as a build type.
pub const BUILD_TYPE: &str = "https://dough.dev/provenance/task/v1";

/// A DSSE envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    /// The statement's JSON, base64.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: String,
    /// base64 of the ed25519 signature over the PAE of type and payload.
    pub sig: String,
}

/// A public key as `GET /v1/keys` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    pub keyid: String,
    pub algorithm: String,
    /// The 32 bytes of the key, base64.
    pub public_key: String,
}

/// DSSE's pre-authentication encoding: what is actually signed.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

fn keyid(k: &VerifyingKey) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(k.as_bytes())))
}

/// The host's signing key.
pub struct Signer {
    key: SigningKey,
    keyid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.keyid)
    }
}

impl Signer {
    /// Where the key lives in a state directory.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("keys").join("provenance.ed25519")
    }

    /// The key at `path`, made (from /dev/urandom, mode 0600) if there is
    /// none yet.
    pub fn load_or_create(path: &Path) -> std::io::Result<Signer> {
        use std::os::unix::fs::OpenOptionsExt;
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        match std::fs::read(path) {
            Ok(b) => {
                let seed: [u8; 32] = b.as_slice().try_into().map_err(|_| {
                    bad(format!(
                        "{}: not an ed25519 key (expected 32 bytes, found {})",
                        path.display(),
                        b.len()
                    ))
                })?;
                return Ok(Signer::from_seed(seed));
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut seed = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&seed)?;
        f.sync_all()?;
        // Two daemons starting at once: the first key stays.
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {
                let _ = std::fs::remove_file(&tmp);
                Ok(Signer::from_seed(seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&tmp);
                Signer::load_or_create(path)
            }
            Err(e) => Err(e),
        }
    }

    pub fn from_seed(seed: [u8; 32]) -> Signer {
        let key = SigningKey::from_bytes(&seed);
        let keyid = keyid(&key.verifying_key());
        Signer { key, keyid }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            keyid: self.keyid.clone(),
            algorithm: "ed25519".into(),
            public_key: B64.encode(self.key.verifying_key().as_bytes()),
        }
    }

    /// Sign a statement.
    pub fn sign(&self, statement: &Value) -> Envelope {
        let body = serde_json::to_vec(statement).expect("a JSON value serializes");
        let sig = self.key.sign(&pae(PAYLOAD_TYPE, &body));
        Envelope {
            payload_type: PAYLOAD_TYPE.into(),
            payload: B64.encode(&body),
            signatures: vec![Signature {
                keyid: self.keyid.clone(),
                sig: B64.encode(sig.to_bytes()),
            }],
        }
    }
}

impl Envelope {
    /// sha256 of the signed statement (its JSON bytes), as the pull
    /// request carries it.
    pub fn digest(&self) -> String {
        let body = B64.decode(&self.payload).unwrap_or_default();
        format!("sha256:{}", hex::encode(Sha256::digest(&body)))
    }
}

/// Why an envelope does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("not a DSSE envelope: {0}")]
    Malformed(String),
    #[error("payload type is '{0}', not {PAYLOAD_TYPE}")]
    PayloadType(String),
    #[error("no signature by a known key (signed by {0})")]
    UnknownKey(String),
    #[error("the signature does not match the statement (it was changed after signing, or signed by another key with the same id)")]
    BadSignature,
    #[error("the signed payload is not an in-toto statement with a provenance predicate: {0}")]
    NotProvenance(String),
}

/// Check `env` against `keys`; the statement it signs.
pub fn verify(env: &Envelope, keys: &[PublicKey]) -> Result<Value, VerifyError> {
    if env.payload_type != PAYLOAD_TYPE {
        return Err(VerifyError::PayloadType(env.payload_type.clone()));
    }
    let body = B64
        .decode(&env.payload)
        .map_err(|e| VerifyError::Malformed(format!("payload is not base64: {e}")))?;
    let msg = pae(&env.payload_type, &body);
    let mut tried = vec![];
    let mut verified = false;
    for s in &env.signatures {
        tried.push(s.keyid.clone());
        let Some(k) = keys.iter().find(|k| k.keyid == s.keyid) else {
            continue;
        };
        let pk: [u8; 32] = B64
            .decode(&k.public_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| VerifyError::Malformed(format!("key {} is not 32 bytes", k.keyid)))?;
        let vk = VerifyingKey::from_bytes(&pk)
            .map_err(|e| VerifyError::Malformed(format!("key {}: {e}", k.keyid)))?;
        let sig: [u8; 64] = B64
            .decode(&s.sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| VerifyError::Malformed("a signature is not 64 bytes".into()))?;
        vk.verify(&msg, &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| VerifyError::BadSignature)?;
        verified = true;
    }
    if !verified {
        return Err(VerifyError::UnknownKey(if tried.is_empty() {
            "no one".into()
        } else {
            tried.join(", ")
        }));
    }
    let st: Value = serde_json::from_slice(&body)
        .map_err(|e| VerifyError::NotProvenance(format!("not JSON: {e}")))?;
    if st["_type"] != STATEMENT_TYPE || st["predicateType"] != PREDICATE_TYPE {
        return Err(VerifyError::NotProvenance(format!(
            "_type {} and predicateType {}",
            st["_type"], st["predicateType"]
        )));
    }
    if st["subject"].as_array().is_none_or(|s| s.is_empty()) {
        return Err(VerifyError::NotProvenance("it has no subject".into()));
    }
    Ok(st)
}

/// A repository task's side of the facts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepoFacts {
    pub url: String,
    pub base_branch: String,
    pub base_commit: String,
    pub branch: String,
    /// The resulting commits, oldest first.
    pub commits: Vec<String>,
    pub bundle_sha256: Option<String>,
}

/// Everything a statement says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    pub task_id: String,
    pub node: String,
    pub dough_version: String,
    pub image_name: String,
    pub image_digest: String,
    pub kernel: crate::supervisor::KernelUsed,
    pub command: Vec<String>,
    /// sha256 of the prompt, when the task had one.
    pub prompt_sha256: Option<String>,
    /// The egress policy as submitted (mode, hosts, CIDRs).
    pub egress_policy: Value,
    pub egress: Option<dough_net::EgressSummary>,
    /// How the task ended: its state and reason, and exit code.
    pub outcome: Value,
    pub repo: Option<RepoFacts>,
    /// sha256 of the task's stored output, as `GET /v1/tasks/{id}/logs`
    /// gives it (stdout and stderr in order; no truncation line).
    pub output_sha256: Option<String>,
    pub started_ms: u64,
    pub ended_ms: u64,
}

/// Signs statements for one task: the facts known before it runs, filled
/// in as it goes (the run's, then the repository's).
#[derive(Debug, Clone)]
pub struct Attestor {
    pub signer: std::sync::Arc<Signer>,
    pub facts: Facts,
}

impl Attestor {
    /// Take in what a finished run tells: its times, the image and kernel
    /// booted, the egress record's summary.
    pub fn ran(&mut self, rep: &crate::RunReport) {
        let f = &mut self.facts;
        f.started_ms = rep.started_ms;
        f.ended_ms = rep.ended_ms;
        if let Some(img) = &rep.image {
            f.image_name = img.name.clone();
            f.image_digest = img.digest.clone();
            f.kernel = img.kernel.clone();
        }
        f.egress = rep.egress.as_ref().map(|r| r.summary());
    }

    pub fn sign(&self) -> Envelope {
        self.signer.sign(&statement(&self.facts))
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn rfc3339(ms: u64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The in-toto statement for `f`.
pub fn statement(f: &Facts) -> Value {
    let mut subject = vec![];
    if let Some(r) = &f.repo {
        for c in &r.commits {
            subject
                .push(json!({"name": format!("{}@{}", r.branch, c), "digest": {"gitCommit": c}}));
        }
        if let Some(b) = &r.bundle_sha256 {
            subject.push(
                json!({"name": format!("task/{}/bundle", f.task_id), "digest": {"sha256": b}}),
            );
        }
    }
    if subject.is_empty() {
        subject.push(json!({
            "name": format!("task/{}/output", f.task_id),
            "digest": {"sha256": f.output_sha256.clone().unwrap_or_else(|| sha256_hex(b""))}
        }));
    }
    let mut deps = vec![json!({
        "name": "image",
        "uri": format!("dough-image:{}", f.image_name),
        "digest": {"sha256": f.image_digest.trim_start_matches("sha256:")},
    })];
    if !f.kernel.sha256.is_empty() {
        deps.push(json!({
            "name": "kernel",
            "uri": format!("kernel:{}/{}", f.kernel.kind, f.kernel.release),
            "digest": {"sha256": f.kernel.sha256},
        }));
    }
    if let Some(r) = &f.repo {
        deps.push(json!({
            "name": "repository",
            "uri": r.url,
            "digest": {"gitCommit": r.base_commit},
            "annotations": {"branch": r.base_branch},
        }));
    }
    json!({
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "command": f.command,
                    "promptSha256": f.prompt_sha256,
                    "repository": f.repo.as_ref().map(|r| json!({"url": r.url, "base": r.base_branch, "branch": r.branch})),
                    "egressPolicy": f.egress_policy,
                },
                "internalParameters": {
                    "node": f.node,
                },
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {
                    "id": format!("https://dough.dev/node/{}", f.node),
                    "version": {"dough": f.dough_version},
                },
                "metadata": {
                    "invocationId": f.task_id,
                    "startedOn": rfc3339(f.started_ms),
                    "finishedOn": rfc3339(f.ended_ms),
                },
                "byproducts": [
                    {"name": "outcome", "content": B64.encode(f.outcome.to_string())},
                    {"name": "egress", "mediaType": "application/json",
                     "content": B64.encode(serde_json::to_string(&f.egress).unwrap_or_default())},
                ],
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            task_id: "t1".into(),
            node: "n1".into(),
            dough_version: "0.1.0".into(),
            image_name: "default".into(),
            image_digest: "ab".repeat(32),
            command: vec!["make".into()],
            outcome: json!({"state": "succeeded", "exit_code": 0}),
            output_sha256: Some(sha256_hex(b"hello\n")),
            started_ms: 1_796_222_941_219,
            ended_ms: 1_796_222_951_000,
            ..Facts::default()
        }
    }

    #[test]
    fn a_signed_statement_verifies_and_a_changed_one_does_not() {
        let s = Signer::from_seed([7; 32]);
        let env = s.sign(&statement(&facts()));
        let st = verify(&env, &[s.public()]).unwrap();
        assert_eq!(
            st["predicate"]["runDetails"]["metadata"]["invocationId"],
            "t1"
        );
        assert_eq!(
            st["predicate"]["runDetails"]["metadata"]["startedOn"],
            "2026-12-02T14:49:01.219Z"
        );
        assert_eq!(st["subject"][0]["digest"]["sha256"], sha256_hex(b"hello\n"));
        // One byte of the statement changed.
        let mut body = B64.decode(&env.payload).unwrap();
        let i = body.windows(4).position(|w| w == b"make").unwrap();
        body[i] = b'n';
        let forged = Envelope {
            payload: B64.encode(&body),
            ..env.clone()
        };
        assert_eq!(
            verify(&forged, &[s.public()]),
            Err(VerifyError::BadSignature)
        );
        // Another key.
        let other = Signer::from_seed([8; 32]);
        assert!(matches!(
            verify(&env, &[other.public()]),
            Err(VerifyError::UnknownKey(_))
        ));
        // A signature over something that is not a statement.
        let not = s.sign(&json!({"hello": 1}));
        assert!(matches!(
            verify(&not, &[s.public()]),
            Err(VerifyError::NotProvenance(_))
        ));
    }

    #[test]
    fn repository_tasks_name_their_commits_and_bundle() {
        let mut f = facts();
        f.repo = Some(RepoFacts {
            url: "https://git.example/o/r.git".into(),
            base_branch: "main".into(),
            base_commit: "c0".repeat(20),
            branch: "dough/t1".into(),
            commits: vec!["a1".repeat(20), "b2".repeat(20)],
            bundle_sha256: Some("ff".repeat(32)),
        });
        let st = statement(&f);
        let subj = st["subject"].as_array().unwrap();
        assert_eq!(subj.len(), 3);
        assert_eq!(subj[1]["digest"]["gitCommit"], "b2".repeat(20));
        assert_eq!(subj[2]["digest"]["sha256"], "ff".repeat(32));
        let deps = st["predicate"]["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap();
        assert!(deps
            .iter()
            .any(|d| d["digest"]["gitCommit"] == "c0".repeat(20)));
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = Signer::path_in(d.path());
        let a = Signer::load_or_create(&p).unwrap();
        let b = Signer::load_or_create(&p).unwrap();
        assert_eq!(a.public(), b.public());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&p, b"short").unwrap();
        assert!(Signer::load_or_create(&p)
            .unwrap_err()
            .to_string()
            .contains("not an ed25519 key"));
    }
}
