//! The egress policy and the nftables rules that enforce it: one table in the
//! VM's namespace (applied in one batch), one table of Dough's own in the
//! host namespace.
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::{GATEWAY, GUEST, TAP, VETH_NS};

/// An IPv4 network, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        };
        Ipv4Addr::from(u32::from(self.addr) & mask)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, l),
            None => (s, "32"),
        };
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 address or CIDR (like 203.0.113.0/24)"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("'{s}': prefix length must be 0..=32"))?;
        Ok(Cidr { addr, len })
    }
}

/// Always denied, whatever the policy: loopback, "this network", link-local
/// (cloud metadata lives at 169.254.169.254), multicast and reserved.
pub const ALWAYS_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Private ranges: denied unless an `--allow-cidr` names them explicitly.
pub const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

/// Where a VM may connect to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Egress {
    /// The internet: everything but the deny set.
    #[default]
    Open,
    /// Nothing at all, not even DNS.
    None,
    /// Only these CIDRs, and the addresses Dough's DNS forwarder answered
    /// for these names (for their TTL).
    Allow {
        hosts: Vec<String>,
        cidrs: Vec<Cidr>,
    },
}

impl Egress {
    /// From the CLI's `--egress` and `--allow-*` flags.
    pub fn from_flags(
        egress: Option<&str>,
        hosts: Vec<String>,
        cidrs: Vec<Cidr>,
    ) -> Result<Egress, String> {
        let allow = !hosts.is_empty() || !cidrs.is_empty();
        for h in &hosts {
            check_host_name(h)?;
        }
        match (egress, allow) {
            (Some("open") | None, false) => Ok(Egress::Open),
            (Some("none"), false) => Ok(Egress::None),
            (None | Some("allowlist"), true) => Ok(Egress::Allow {
                hosts: hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
                cidrs,
            }),
            (Some("allowlist"), false) => {
                Err("--egress allowlist needs at least one --allow-host or --allow-cidr".into())
            }
            (Some(m @ ("open" | "none")), true) => Err(format!(
                "--allow-host/--allow-cidr make an allowlist; they cannot be combined with --egress {m}"
            )),
            (Some(other), _) => Err(format!(
                "unknown --egress '{other}' (expected open, none or allowlist)"
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Egress::Open => "open",
            Egress::None => "none",
            Egress::Allow { .. } => "allowlist",
        }
    }

    /// Whether `name` (lower case, no trailing dot) may be resolved.
    pub fn allows_name(&self, name: &str) -> bool {
        match self {
            Egress::Open => true,
            Egress::None => false,
            Egress::Allow { hosts, .. } => hosts.iter().any(|h| match h.strip_prefix("*.") {
                Some(suffix) => {
                    name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}"))
                }
                None => h == name,
            }),
        }
    }
}

/// A DNS name (or `*.` followed by one), as `--allow-host` takes it.
fn check_host_name(h: &str) -> Result<(), String> {
    let bare = h.strip_prefix("*.").unwrap_or(h);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--allow-host '{h}' is not a DNS name (like github.com or *.githubusercontent.com)"
        ))
    }
}

/// Name of the table in each VM's namespace.
pub const VM_TABLE: &str = "dough_vm";
/// Name of Dough's table in the host namespace (family inet).
pub const HOST_TABLE: &str = "dough";
/// Host-side veth names start with this (and nothing else of the host's may).
pub const VETH_PREFIX: &str = "dh";

/// The NFLOG group blocked packets are logged to when the egress record is
/// on (groups are per namespace: every VM has its own group 1).
pub const LOG_GROUP: u16 = 1;

/// The names of the rules that block (an NFLOG prefix each, so the record
/// says which rule refused a packet): the deny set (reserved ranges, the
/// slot pool, the host's addresses), a private range, the allowlist's end,
/// `--egress none`, IPv6, and traffic to the gateway itself.
pub const RULES: &[&str] = &["deny4", "private4", "allowlist", "none", "ipv6", "gateway"];

/// `log … ` naming `rule` when recording, else nothing: the log statement
/// runs only for packets a rule already refuses.
fn log(record: bool, rule: &str) -> String {
    if record {
        format!("log prefix \"{rule}\" group {LOG_GROUP} ")
    } else {
        String::new()
    }
}

/// The VM namespace's ruleset, as one nft batch. `record`: blocked packets
/// are also logged (NFLOG, [`LOG_GROUP`]) for the egress record.
pub fn vm_ruleset(
    egress: &Egress,
    slot_addr: Ipv4Addr,
    host_addrs: &[Ipv4Addr],
    pool: Cidr,
    record: bool,
) -> String {
    let mut deny: Vec<String> = ALWAYS_DENIED.iter().map(|s| s.to_string()).collect();
    deny.push(pool.to_string());
    deny.extend(
        host_addrs
            .iter()
            .filter(|a| {
                !pool.contains(**a)
                    && !ALWAYS_DENIED
                        .iter()
                        .any(|c| c.parse::<Cidr>().unwrap().contains(**a))
            })
            .map(|a| a.to_string()),
    );
    let l = |rule| log(record, rule);
    let (cidrs, mode_rules) = match egress {
        Egress::Open => (vec![], "accept".to_string()),
        Egress::None => (vec![], format!("{}jump deny", l("none"))),
        Egress::Allow { cidrs, .. } => (
            cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            format!(
                "ip daddr @allow_dns4 accept\n\t\t{}jump deny",
                l("allowlist")
            ),
        ),
    };
    let dns = !matches!(egress, Egress::None);
    let mut s = String::new();
    let _ = write!(
        s,
        "table inet {VM_TABLE} {{
\tset deny4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {deny} }} }}
\tset private4 {{ type ipv4_addr; flags interval; elements = {{ {private} }} }}
\tset allow_cidr4 {{ type ipv4_addr; flags interval; auto-merge; {cidr_elems}}}
\tset allow_dns4 {{ type ipv4_addr; flags timeout; }}
\tchain deny {{
\t\tmeta l4proto tcp reject with tcp reset
\t\treject with icmpx type admin-prohibited
\t}}
\tchain egress {{
\t\tmeta nfproto ipv6 {log_ipv6}jump deny
\t\tip daddr @deny4 {log_deny4}jump deny
\t\tip daddr @allow_cidr4 accept
\t\tip daddr @private4 {log_private4}jump deny
\t\t{mode_rules}
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established,related accept
\t\tiifname \"{TAP}\" oifname \"{VETH_NS}\" jump egress
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy drop;
\t\tiif lo accept
\t\tct state established,related accept
\t\t{dns_rule}iifname \"{TAP}\" icmp type echo-request accept
\t\tiifname \"{TAP}\" {log_gateway}jump deny
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"{VETH_NS}\" ip saddr {GUEST} snat ip to {slot_addr}
\t}}
}}
",
        deny = deny.join(", "),
        log_ipv6 = l("ipv6"),
        log_deny4 = l("deny4"),
        log_private4 = l("private4"),
        log_gateway = l("gateway"),
        private = PRIVATE.join(", "),
        cidr_elems = if cidrs.is_empty() {
            String::new()
        } else {
            format!("elements = {{ {} }}; ", cidrs.join(", "))
        },
        dns_rule = if dns {
            format!("iifname \"{TAP}\" ip daddr {GATEWAY} udp dport 53 accept\n\t\t")
        } else {
            String::new()
        },
    );
    s
}

/// Dough's table in the host namespace: masquerade the slot pool out, no
/// forwarding between two VMs, nothing from a VM to the host itself.
/// Replaced atomically as a whole (it holds no per-VM state).
pub fn host_ruleset(pool: Cidr, nat: bool) -> String {
    let p = VETH_PREFIX;
    format!(
        "add table inet {HOST_TABLE}
delete table inet {HOST_TABLE}
table inet {HOST_TABLE} {{
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname \"{p}*\" oifname \"{p}*\" drop
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname \"{p}*\" ct state established,related accept
\t\tiifname \"{p}*\" drop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\t{nat}
\t}}
}}
",
        nat = if nat {
            format!("ip saddr {pool} oifname != \"{p}*\" masquerade")
        } else {
            "# host NAT disabled: the slot pool is routed".into()
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.213.0.0/16".parse().unwrap();
        assert!(c.contains("10.213.255.1".parse().unwrap()));
        assert!(!c.contains("10.214.0.1".parse().unwrap()));
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().len, 32);
        assert!("1.2.3.4/33".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn flags_make_a_policy_or_a_clear_error() {
        assert_eq!(Egress::from_flags(None, vec![], vec![]), Ok(Egress::Open));
        assert_eq!(
            Egress::from_flags(Some("none"), vec![], vec![]),
            Ok(Egress::None)
        );
        let a = Egress::from_flags(None, vec!["GitHub.com".into()], vec![]).unwrap();
        assert!(a.allows_name("github.com"));
        assert!(!a.allows_name("api.github.com"));
        assert!(!a.allows_name("evil.com"));
        let w = Egress::from_flags(None, vec!["*.github.com".into()], vec![]).unwrap();
        assert!(w.allows_name("api.github.com"));
        assert!(!w.allows_name("github.com"));
        assert!(!w.allows_name("xgithub.com"));
        assert!(
            Egress::from_flags(Some("none"), vec!["a.com".into()], vec![])
                .unwrap_err()
                .contains("cannot be combined")
        );
        assert!(Egress::from_flags(Some("allowlist"), vec![], vec![]).is_err());
        assert!(Egress::from_flags(Some("closed"), vec![], vec![])
            .unwrap_err()
            .contains("unknown --egress"));
        assert!(Egress::from_flags(None, vec!["bad name!".into()], vec![]).is_err());
        assert!(!Egress::None.allows_name("github.com"));
    }

    #[test]
    fn vm_ruleset_names_the_deny_set_and_the_mode() {
        let pool: Cidr = "10.213.0.0/16".parse().unwrap();
        let host = ["192.0.2.7".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let open = vm_ruleset(
            &Egress::Open,
            "10.213.0.6".parse().unwrap(),
            &host,
            pool,
            false,
        );
        assert!(open.contains("169.254.0.0/16"));
        assert!(open.contains("10.213.0.0/16"));
        assert!(open.contains("192.0.2.7"));
        assert!(open.contains("snat ip to 10.213.0.6"));
        assert!(open.contains("udp dport 53 accept"));
        let none = vm_ruleset(
            &Egress::None,
            "10.213.0.6".parse().unwrap(),
            &host,
            pool,
            false,
        );
        assert!(!none.contains("udp dport 53"));
        let allow = Egress::Allow {
            hosts: vec![],
            cidrs: vec!["10.5.0.0/16".parse().unwrap()],
        };
        let a = vm_ruleset(&allow, "10.213.0.6".parse().unwrap(), &host, pool, false);
        assert!(a.contains("elements = { 10.5.0.0/16 }"));
        assert!(a.contains("@allow_dns4 accept"));
        assert!(!a.contains("log "));
        // Recording: every refusing rule logs under its own name, and
        // nothing that accepts does.
        let r = vm_ruleset(&allow, "10.213.0.6".parse().unwrap(), &host, pool, true);
        for rule in ["deny4", "private4", "allowlist", "ipv6", "gateway"] {
            assert!(
                r.contains(&format!("log prefix \"{rule}\" group 1 jump deny")),
                "{rule}"
            );
        }
        assert!(r
            .lines()
            .filter(|l| l.contains("log "))
            .all(|l| l.ends_with("jump deny")));
    }
}
