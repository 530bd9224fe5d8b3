//! What a task leaves besides its output: `dough egress` (its network
//! record), `dough provenance` and `dough verify` (its signed statement),
//! `dough rm` (forget a finished task).
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use dough_core::provenance::{self, Envelope, PublicKey};
use dough_net::record::Verdict;
use dough_net::EgressRecord;

use super::client::Client;
use super::table::{self, Align};
use crate::Cli;

#[derive(Args, Debug)]
pub struct EgressArgs {
    pub id: String,
    /// The record as JSON (as `GET /v1/tasks/{id}/egress` gives it).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A provenance statement (`dough provenance ID > FILE`).
    pub file: PathBuf,
    /// Trust this public key (a JSON key, or `{"keys": […]}` as `GET
    /// /v1/keys` gives them) instead of asking the daemon for its keys.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

pub fn egress(cli: &Cli, a: &EgressArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    let v = c.get_json(&format!("/v1/tasks/{}/egress", a.id))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let rec: EgressRecord =
        serde_json::from_value(v).context("the daemon's egress record is not one")?;
    print!("{}", render(&a.id, &rec));
    Ok(0)
}

/// The record as text: a summary line, the DNS questions, the flows.
pub fn render(id: &str, rec: &EgressRecord) -> String {
    let mut out = format!(
        "task {id} · egress {} · {}\n",
        rec.policy,
        rec.summary().line()
    );
    if !rec.dns.is_empty() {
        out.push_str("\nDNS\n");
        let rows: Vec<Vec<String>> = rec
            .dns
            .iter()
            .map(|q| {
                vec![
                    q.name.clone(),
                    q.qtype.clone(),
                    if q.allowed { "answered" } else { "refused" }.into(),
                    q.count.to_string(),
                    q.answers
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &[
                ("NAME", Align::Left),
                ("TYPE", Align::Left),
                ("VERDICT", Align::Left),
                ("COUNT", Align::Right),
                ("ANSWERS", Align::Left),
            ],
            &rows,
        ));
    }
    if !rec.flows.is_empty() {
        out.push_str("\nFLOWS\n");
        let rows: Vec<Vec<String>> = rec
            .flows
            .iter()
            .map(|f| {
                vec![
                    match f.verdict {
                        Verdict::Allowed => "allowed".into(),
                        Verdict::Blocked => "blocked".into(),
                    },
                    f.proto.clone(),
                    match f.port {
                        Some(p) => format!("{}:{p}", f.addr),
                        None => f.addr.to_string(),
                    },
                    f.name.clone().unwrap_or_else(|| "-".into()),
                    f.count.to_string(),
                    f.bytes_out.to_string(),
                    f.bytes_in.to_string(),
                    f.rule.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &[
                ("VERDICT", Align::Left),
                ("PROTO", Align::Left),
                ("DESTINATION", Align::Left),
                ("NAME", Align::Left),
                ("COUNT", Align::Right),
                ("SENT", Align::Right),
                ("RECEIVED", Align::Right),
                ("RULE", Align::Left),
            ],
            &rows,
        ));
    }
    if rec.overflow.flows + rec.overflow.dns + rec.lost_events > 0 {
        out.push_str(&format!(
            "\nnot itemised (the record is bounded): {} connections or refusals, {} DNS questions; kernel events lost: {}\n",
            rec.overflow.flows, rec.overflow.dns, rec.lost_events
        ));
    }
    out
}

pub fn provenance(cli: &Cli, a: &super::client::IdArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    let v = c.get_json(&format!("/v1/tasks/{}/provenance", a.id))?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// Exit 0 when the statement verifies, 1 when it does not.
pub fn verify(cli: &Cli, a: &VerifyArgs) -> anyhow::Result<u8> {
    let text = std::fs::read(&a.file).with_context(|| format!("read {}", a.file.display()))?;
    let env: Envelope = match serde_json::from_slice(&text) {
        Ok(e) => e,
        Err(e) => {
            eprintln!(
                "dough: {}: NOT VERIFIED: not a DSSE envelope ({e})",
                a.file.display()
            );
            return Ok(1);
        }
    };
    let keys: Vec<PublicKey> = match &a.key {
        Some(p) => {
            let v: serde_json::Value = serde_json::from_slice(
                &std::fs::read(p).with_context(|| format!("read {}", p.display()))?,
            )
            .with_context(|| format!("{}: not JSON", p.display()))?;
            let list = v
                .get("keys")
                .cloned()
                .unwrap_or(serde_json::Value::Array(vec![v]));
            serde_json::from_value(list)
                .with_context(|| format!("{}: not a key or a list of keys", p.display()))?
        }
        None => {
            let c = Client::from_env(cli)
                .context("no --key given, so the daemon's keys are asked for")?;
            serde_json::from_value(c.get_json("/v1/keys")?["keys"].clone())
                .context("the daemon's keys")?
        }
    };
    match provenance::verify(&env, &keys) {
        Ok(st) => {
            let md = &st["predicate"]["runDetails"]["metadata"];
            println!(
                "verified: task {} on node {}, {} to {}; signed by {}; statement {}",
                md["invocationId"].as_str().unwrap_or("?"),
                st["predicate"]["buildDefinition"]["internalParameters"]["node"]
                    .as_str()
                    .unwrap_or("?"),
                md["startedOn"].as_str().unwrap_or("?"),
                md["finishedOn"].as_str().unwrap_or("?"),
                env.signatures
                    .iter()
                    .map(|s| s.keyid.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                env.digest()
            );
            for s in st["subject"].as_array().into_iter().flatten() {
                println!(
                    "  subject {} {}",
                    s["name"].as_str().unwrap_or("?"),
                    s["digest"]
                );
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("dough: {}: NOT VERIFIED: {e}", a.file.display());
            Ok(1)
        }
    }
}

pub fn rm(cli: &Cli, a: &super::client::IdArgs) -> anyhow::Result<u8> {
    let c = Client::from_env(cli)?;
    c.delete(&format!("/v1/tasks/{}?purge=true", a.id))?;
    println!("{} deleted", a.id);
    Ok(0)
}
