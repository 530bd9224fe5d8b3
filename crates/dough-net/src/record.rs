//! A task's egress record: what its guest asked of the network, taken on the
//! host from the kernel and Dough's DNS forwarder, never from the guest.
//!
//! * **Allowed flows** come from conntrack in the VM's namespace: the
//!   kernel tracks every connection anyway (the namespace NATs), and with
//!   `nf_conntrack_acct` it also counts bytes each way. Dough listens for
//!   conntrack's destroy events and, at teardown, dumps what is still
//!   tracked. A blocked packet never gets a conntrack entry (its entry is
//!   not confirmed), so this source sees only what was let through.
//! * **Blocked attempts** come from NFLOG: each refusing rule logs the
//!   packet's headers under its own name (`policy::RULES`), and only when
//!   it refuses — accepted traffic pays nothing.
//! * **DNS questions** come from the forwarder, which sees every one.
//!
//! Records are aggregated per destination (protocol, address, port,
//! verdict) and per DNS question (name, type, allowed); both are bounded
//! ([`MAX_FLOWS`], [`MAX_DNS`]) and what no longer fits is counted in
//! [`Overflow`], never dropped silently. Events the kernel could not
//! deliver (a full socket buffer) are counted in `lost_events`.
use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Destinations kept per task (allowed and blocked together): those
/// reached first.
pub const MAX_FLOWS: usize = 1000;
/// DNS questions (name, type, verdict) kept per task.
pub const MAX_DNS: usize = 1000;
/// Answers kept per DNS question.
pub const MAX_ANSWERS: usize = 16;
/// Addresses remembered with the name they were answered for.
const MAX_NAMES: usize = 4096;

/// Everything recorded for one task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRecord {
    /// The egress policy's mode: open, allowlist or none.
    pub policy: String,
    /// When recording began (the VM got its task's policy), ms since the epoch.
    pub started_ms: u64,
    /// When it ended (the VM's teardown); None while the task runs.
    pub ended_ms: Option<u64>,
    /// One entry per destination and verdict, in the order first reached.
    pub flows: Vec<Flow>,
    /// One entry per DNS question and verdict, in the order first asked.
    pub dns: Vec<DnsQuestion>,
    /// What did not fit the bounds.
    pub overflow: Overflow,
    /// Times the kernel could not deliver events to Dough (its socket
    /// buffer was full): the record may miss flows then.
    pub lost_events: u64,
}

/// One destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// tcp, udp, icmp, or the protocol's number.
    pub proto: String,
    pub addr: Ipv4Addr,
    /// The destination port (TCP and UDP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The name Dough's DNS forwarder last answered this address for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub verdict: Verdict,
    /// The rule that refused it (`policy::RULES`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Connections (allowed) or refused packets (blocked).
    pub count: u64,
    /// Bytes from the guest, IP headers included (allowed flows).
    pub bytes_out: u64,
    /// Bytes to the guest, IP headers included.
    pub bytes_in: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Blocked,
}

/// One DNS question, asked `count` times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsQuestion {
    pub name: String,
    /// A, AAAA, … or the type's number.
    #[serde(rename = "type")]
    pub qtype: String,
    /// Allowed (forwarded) or refused by the policy.
    pub allowed: bool,
    /// The IPv4 addresses answered (A records), at most [`MAX_ANSWERS`].
    pub answers: Vec<Ipv4Addr>,
    pub count: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// Counted instead of recorded, past the bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overflow {
    /// Connections or refused packets to destinations past [`MAX_FLOWS`].
    pub flows: u64,
    /// DNS questions past [`MAX_DNS`].
    pub dns: u64,
}

/// One host reached, over all its ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reached {
    pub host: String,
    pub connections: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

/// A short account of a record, for `dough run`, the pull request and the
/// provenance statement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressSummary {
    pub policy: String,
    /// Hosts reached (by name where the forwarder answered it, else by
    /// address), in the order first reached.
    pub hosts: Vec<Reached>,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Distinct blocked destinations, `addr:port` (or `addr`), with the
    /// name where known.
    pub blocked: Vec<String>,
    pub dns_refused: Vec<String>,
    pub overflow: Overflow,
}

impl EgressRecord {
    pub fn summary(&self) -> EgressSummary {
        let mut s = EgressSummary {
            policy: self.policy.clone(),
            overflow: self.overflow.clone(),
            ..EgressSummary::default()
        };
        for f in &self.flows {
            match f.verdict {
                Verdict::Allowed => {
                    let host = f.name.clone().unwrap_or_else(|| f.addr.to_string());
                    let i = match s.hosts.iter().position(|h| h.host == host) {
                        Some(i) => i,
                        None => {
                            s.hosts.push(Reached {
                                host,
                                ..Reached::default()
                            });
                            s.hosts.len() - 1
                        }
                    };
                    let h = &mut s.hosts[i];
                    h.connections += f.count;
                    h.bytes_out += f.bytes_out;
                    h.bytes_in += f.bytes_in;
                    s.bytes_out += f.bytes_out;
                    s.bytes_in += f.bytes_in;
                }
                Verdict::Blocked => {
                    let mut d = match f.port {
                        Some(p) => format!("{}:{p}", f.addr),
                        None => f.addr.to_string(),
                    };
                    if let Some(n) = &f.name {
                        d.push_str(&format!(" ({n})"));
                    }
                    if !s.blocked.contains(&d) {
                        s.blocked.push(d);
                    }
                }
            }
        }
        for q in self.dns.iter().filter(|q| !q.allowed) {
            if !s.dns_refused.contains(&q.name) {
                s.dns_refused.push(q.name.clone());
            }
        }
        s
    }
}

impl EgressSummary {
    /// One line: "reached 3 hosts, 1 blocked: 10.0.0.5:22".
    pub fn line(&self) -> String {
        let plural = |n: usize, one: &str, many: &str| {
            if n == 1 {
                format!("1 {one}")
            } else {
                format!("{n} {many}")
            }
        };
        let mut l = format!("reached {}", plural(self.hosts.len(), "host", "hosts"));
        if !self.blocked.is_empty() {
            const SHOWN: usize = 3;
            let mut list = self.blocked[..self.blocked.len().min(SHOWN)].join(", ");
            if self.blocked.len() > SHOWN {
                list.push_str(&format!(", … {} more", self.blocked.len() - SHOWN));
            }
            l.push_str(&format!(", {} blocked: {list}", self.blocked.len()));
        }
        if !self.dns_refused.is_empty() {
            l.push_str(&format!(
                ", {} refused",
                plural(self.dns_refused.len(), "DNS name", "DNS names")
            ));
        }
        let over = self.overflow.flows + self.overflow.dns;
        if over > 0 {
            l.push_str(&format!(" ({over} more not itemised: the record is full)"));
        }
        l
    }
}

/// The name of a protocol number.
pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

/// The number of a protocol named by [`proto_name`].
fn proto_number(name: &str) -> u8 {
    match name {
        "icmp" => 1,
        "tcp" => 6,
        "udp" => 17,
        n => n.parse().unwrap_or(0),
    }
}

/// The name of a DNS type.
pub fn qtype_name(t: u16) -> String {
    match t {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        65 => "HTTPS".into(),
        n => n.to_string(),
    }
}

/// One observation, before aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub proto: u8,
    pub addr: Ipv4Addr,
    pub port: Option<u16>,
    pub verdict: Verdict,
    pub rule: Option<String>,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

type FlowKey = (u8, Ipv4Addr, Option<u16>, Verdict);

/// Builds a record, bounded.
#[derive(Debug, Default)]
pub struct Recorder {
    rec: EgressRecord,
    flows: HashMap<FlowKey, usize>,
    dns: HashMap<(String, u16, bool), usize>,
    names: HashMap<Ipv4Addr, String>,
    /// When full: the kept destination whose first connection began last
    /// (its start, its index), None when it is to be found again.
    latest: Option<(u64, usize)>,
}

impl Recorder {
    pub fn new(policy: &str, now_ms: u64) -> Recorder {
        Recorder {
            rec: EgressRecord {
                policy: policy.into(),
                started_ms: now_ms,
                ..EgressRecord::default()
            },
            ..Recorder::default()
        }
    }

    /// Start over (a pooled VM claimed for a task, with its policy).
    pub fn reset(&mut self, policy: &str, now_ms: u64) {
        *self = Recorder::new(policy, now_ms);
    }

    /// A connection ended (or was still open at the end), or a packet was
    /// refused: counted, with its bytes, under its destination.
    pub fn flow(&mut self, s: Seen) {
        let key = (s.proto, s.addr, s.port, s.verdict);
        let name = self.names.get(&s.addr).cloned();
        match self.flows.get(&key) {
            Some(&i) => {
                let f = &mut self.rec.flows[i];
                f.count += 1;
                f.bytes_out += s.bytes_out;
                f.bytes_in += s.bytes_in;
                if s.first_ms < f.first_ms {
                    f.first_ms = s.first_ms;
                    self.latest = None;
                }
                f.last_ms = f.last_ms.max(s.last_ms);
                if f.name.is_none() {
                    f.name = name;
                }
            }
            None if self.rec.flows.len() >= MAX_FLOWS => {
                // Full: the destinations kept are those reached first. A
                // connection is seen when it ends, so one that began
                // before the latest kept destination's first connection
                // (a long one, seen at the dump) takes that one's place.
                let flows = &self.rec.flows;
                let (latest, at) = *self.latest.get_or_insert_with(|| {
                    flows
                        .iter()
                        .enumerate()
                        .map(|(i, f)| (f.first_ms, i))
                        .max()
                        .unwrap_or((0, 0))
                });
                if s.first_ms >= latest {
                    self.rec.overflow.flows += 1;
                    return;
                }
                self.latest = None;
                let out = self.rec.flows.swap_remove(at);
                self.rec.overflow.flows += out.count;
                let gone = (proto_number(&out.proto), out.addr, out.port, out.verdict);
                self.flows.remove(&gone);
                if let Some(moved) = self.rec.flows.get(at) {
                    let k = (
                        proto_number(&moved.proto),
                        moved.addr,
                        moved.port,
                        moved.verdict,
                    );
                    self.flows.insert(k, at);
                }
                self.flow(s);
            }
            None => {
                self.flows.insert(key, self.rec.flows.len());
                self.rec.flows.push(Flow {
                    proto: proto_name(s.proto),
                    addr: s.addr,
                    port: s.port,
                    name,
                    verdict: s.verdict,
                    rule: s.rule,
                    count: 1,
                    bytes_out: s.bytes_out,
                    bytes_in: s.bytes_in,
                    first_ms: s.first_ms,
                    last_ms: s.last_ms,
                });
            }
        }
    }

    /// A DNS question and, when forwarded and answered, its A records.
    pub fn dns(&mut self, name: &str, qtype: u16, allowed: bool, answers: &[Ipv4Addr], at: u64) {
        for a in answers {
            if self.names.len() < MAX_NAMES || self.names.contains_key(a) {
                self.names.insert(*a, name.to_string());
            }
        }
        let key = (name.to_string(), qtype, allowed);
        match self.dns.get(&key) {
            Some(&i) => {
                let q = &mut self.rec.dns[i];
                q.count += 1;
                q.last_ms = q.last_ms.max(at);
                for a in answers {
                    if q.answers.len() < MAX_ANSWERS && !q.answers.contains(a) {
                        q.answers.push(*a);
                    }
                }
            }
            None if self.rec.dns.len() >= MAX_DNS => self.rec.overflow.dns += 1,
            None => {
                self.dns.insert(key, self.rec.dns.len());
                let mut kept: Vec<Ipv4Addr> = vec![];
                for a in answers {
                    if kept.len() < MAX_ANSWERS && !kept.contains(a) {
                        kept.push(*a);
                    }
                }
                self.rec.dns.push(DnsQuestion {
                    name: name.into(),
                    qtype: qtype_name(qtype),
                    allowed,
                    answers: kept,
                    count: 1,
                    first_ms: at,
                    last_ms: at,
                });
            }
        }
    }

    pub fn lost(&mut self) {
        self.rec.lost_events += 1;
    }

    /// The record so far: connections still open are not in it yet.
    pub fn snapshot(&self) -> EgressRecord {
        let mut rec = self.rec.clone();
        // Kept in the order seen (a connection is seen when it ends);
        // listed in the order first reached.
        rec.flows.sort_by_key(|f| f.first_ms);
        rec
    }

    /// The record, ended at `now_ms`.
    pub fn finish(&mut self, now_ms: u64) -> EgressRecord {
        self.rec.ended_ms = Some(now_ms);
        self.snapshot()
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(addr: &str, port: u16, verdict: Verdict, out: u64) -> Seen {
        Seen {
            proto: 6,
            addr: addr.parse().unwrap(),
            port: Some(port),
            verdict,
            rule: (verdict == Verdict::Blocked).then(|| "private4".into()),
            bytes_out: out,
            bytes_in: 2 * out,
            first_ms: 10,
            last_ms: 20,
        }
    }

    #[test]
    fn flows_aggregate_per_destination_and_take_their_dns_name() {
        let mut r = Recorder::new("open", 1);
        r.dns("example.com", 1, true, &["203.0.113.5".parse().unwrap()], 5);
        r.dns("example.com", 1, true, &["203.0.113.5".parse().unwrap()], 7);
        r.dns("evil.test", 1, false, &[], 8);
        r.flow(seen("203.0.113.5", 443, Verdict::Allowed, 100));
        r.flow(seen("203.0.113.5", 443, Verdict::Allowed, 50));
        r.flow(seen("10.0.0.5", 22, Verdict::Blocked, 0));
        let rec = r.finish(99);
        assert_eq!(rec.flows.len(), 2);
        let f = &rec.flows[0];
        assert_eq!(
            (f.count, f.bytes_out, f.bytes_in, f.name.as_deref()),
            (2, 150, 300, Some("example.com"))
        );
        assert_eq!(rec.flows[1].rule.as_deref(), Some("private4"));
        assert_eq!(rec.dns.len(), 2);
        assert_eq!((rec.dns[0].count, rec.dns[0].last_ms), (2, 7));
        assert_eq!(rec.dns[0].qtype, "A");
        assert_eq!(rec.ended_ms, Some(99));
        let s = rec.summary();
        assert_eq!(
            s.line(),
            "reached 1 host, 1 blocked: 10.0.0.5:22, 1 DNS name refused"
        );
        assert_eq!((s.bytes_out, s.bytes_in), (150, 300));
        assert_eq!(
            s.hosts,
            vec![Reached {
                host: "example.com".into(),
                connections: 2,
                bytes_out: 150,
                bytes_in: 300
            }]
        );
    }

    #[test]
    fn flows_are_listed_in_the_order_first_reached() {
        let mut r = Recorder::new("open", 1);
        // A long connection ends (is seen) after a short one that began later.
        r.flow(Seen {
            first_ms: 30,
            ..seen("203.0.113.6", 80, Verdict::Allowed, 1)
        });
        r.flow(Seen {
            first_ms: 5,
            ..seen("203.0.113.5", 443, Verdict::Allowed, 1)
        });
        r.flow(Seen {
            first_ms: 40,
            ..seen("203.0.113.5", 443, Verdict::Allowed, 1)
        });
        let order = |rec: EgressRecord| rec.flows.iter().map(|f| f.port).collect::<Vec<_>>();
        assert_eq!(order(r.snapshot()), vec![Some(443), Some(80)]);
        assert_eq!(order(r.finish(50)), vec![Some(443), Some(80)]);
        assert_eq!(r.snapshot().flows[0].count, 2);
    }

    #[test]
    fn when_full_a_destination_reached_earlier_takes_the_latest_ones_place() {
        let mut r = Recorder::new("open", 1);
        for p in 0..MAX_FLOWS as u16 {
            r.flow(Seen {
                first_ms: 100 + p as u64,
                ..seen("203.0.113.5", p, Verdict::Allowed, 1)
            });
        }
        // Began after every kept one: counted past the bound.
        r.flow(Seen {
            first_ms: 5000,
            ..seen("203.0.113.6", 1, Verdict::Allowed, 1)
        });
        // Began first (a long connection, seen at the end): kept.
        r.flow(Seen {
            first_ms: 50,
            ..seen("203.0.113.9", 443, Verdict::Allowed, 9)
        });
        let rec = r.snapshot();
        assert_eq!(rec.flows.len(), MAX_FLOWS);
        assert_eq!(rec.overflow.flows, 2);
        assert_eq!(
            rec.flows[0].addr,
            "203.0.113.9".parse::<Ipv4Addr>().unwrap()
        );
        assert!(!rec
            .flows
            .iter()
            .any(|f| f.port == Some(MAX_FLOWS as u16 - 1)));
        // The index still finds every kept destination.
        r.flow(Seen {
            first_ms: 60,
            ..seen("203.0.113.5", 7, Verdict::Allowed, 1)
        });
        r.flow(Seen {
            first_ms: 60,
            ..seen("203.0.113.9", 443, Verdict::Allowed, 1)
        });
        let rec = r.snapshot();
        assert_eq!((rec.flows.len(), rec.overflow.flows), (MAX_FLOWS, 2));
        assert_eq!(rec.flows[0].count, 2);
        assert_eq!(
            rec.flows.iter().find(|f| f.port == Some(7)).unwrap().count,
            2
        );
    }

    #[test]
    fn past_the_bound_is_counted_not_kept() {
        let mut r = Recorder::new("open", 1);
        for p in 0..(MAX_FLOWS as u16 + 250) {
            r.flow(seen("203.0.113.5", p, Verdict::Allowed, 1));
        }
        // An existing destination still aggregates when full.
        r.flow(seen("203.0.113.5", 0, Verdict::Allowed, 1));
        for i in 0..(MAX_DNS + 3) {
            r.dns(&format!("n{i}.test"), 1, true, &[], 1);
        }
        let rec = r.snapshot();
        assert_eq!(rec.flows.len(), MAX_FLOWS);
        assert_eq!(rec.overflow.flows, 250);
        assert_eq!(rec.flows[0].count, 2);
        assert_eq!((rec.dns.len(), rec.overflow.dns), (MAX_DNS, 3));
        assert!(rec
            .summary()
            .line()
            .ends_with("(253 more not itemised: the record is full)"));
    }
}
