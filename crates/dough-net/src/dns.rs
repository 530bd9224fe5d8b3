//! The VM's resolver: a DNS forwarder listening on the gateway address inside
//! the VM's namespace and asking the upstream resolver from the host's
//! namespace (so the upstream may sit in a range the guest cannot reach).
//!
//! In allowlist mode it answers only allowed names, and every IPv4 address
//! it hands out is added to the namespace's `allow_dns4` set for the
//! record's TTL *before* the answer reaches the guest. Editing /etc/hosts in
//! the guest gains nothing: only addresses this forwarder answered pass.
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use std::sync::{Arc, Mutex, MutexGuard};

use crate::ct::Sources;
use crate::nft::Nft;
use crate::policy::{Cidr, Egress, VM_TABLE};
use crate::record::{now_ms, Recorder};

/// The VM's egress policy as it is now, and the nftables context (in the
/// VM's namespace) that enforces it. Shared by the forwarder and
/// [`crate::VmNet::set_egress`], which replaces both at once.
pub struct Policy {
    pub egress: Egress,
    pub nft: Nft,
    /// The egress record being taken (None: recording is off).
    pub record: Option<Recorder>,
}

pub(crate) fn lock(p: &Mutex<Policy>) -> MutexGuard<'_, Policy> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// An answered address stays allowed for at least this long, however short
/// its TTL (the guest connects right after resolving).
pub const MIN_ALLOW_SECS: u32 = 5;
/// And at most this long.
pub const MAX_ALLOW_SECS: u32 = 3600;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the egress record takes in the kernel's events.
const DRAIN_EVERY: Duration = Duration::from_millis(250);

/// The question of a DNS message: (lower-cased name, qtype), and where the
/// question section ends.
pub fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut name = String::new();
    loop {
        let l = *msg.get(i)? as usize;
        i += 1;
        if l == 0 {
            break;
        }
        if l > 63 {
            return None; // no compression in a question
        }
        let label = msg.get(i..i + l)?;
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        i += l;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((name, qtype, i + 4))
}

/// Skip a (possibly compressed) name starting at `i`.
fn skip_name(msg: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let l = *msg.get(i)?;
        if l == 0 {
            return Some(i + 1);
        }
        if l & 0xc0 == 0xc0 {
            return Some(i + 2);
        }
        i += 1 + l as usize;
    }
}

/// The A records of a response's answer section: (address, TTL).
pub fn answers_a(msg: &[u8]) -> Vec<(Ipv4Addr, u32)> {
    let mut out = vec![];
    let Some((_, _, mut i)) = question(msg) else {
        return out;
    };
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    for _ in 0..an {
        let Some(j) = skip_name(msg, i) else {
            break;
        };
        let Some(h) = msg.get(j..j + 10) else {
            break;
        };
        let rtype = u16::from_be_bytes([h[0], h[1]]);
        let ttl = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let rdlen = u16::from_be_bytes([h[8], h[9]]) as usize;
        let Some(rdata) = msg.get(j + 10..j + 10 + rdlen) else {
            break;
        };
        if rtype == 1 && rdlen == 4 {
            out.push((Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]), ttl));
        }
        i = j + 10 + rdlen;
    }
    out
}

/// A reply to `query` with no answers and response code `rcode`.
pub fn reply_with(query: &[u8], q_end: usize, rcode: u8) -> Vec<u8> {
    let mut r = query[..q_end.min(query.len())].to_vec();
    r[2] = 0x80 | (query[2] & 0x79); // QR, keep opcode and RD
    r[3] = 0x80 | (rcode & 0x0f); // RA
    for b in &mut r[6..12] {
        *b = 0; // no answer, authority or additional records
    }
    r
}

struct Pending {
    guest: SocketAddr,
    id: [u8; 2],
    name: String,
    qtype: u16,
    sent: Instant,
}

/// Serve until `stop` becomes readable. `down` is the socket on the gateway
/// inside the VM's namespace, `up` an unbound socket in the host's.
/// `sources`: the kernel's events for the egress record, read here too;
/// at the end what is left of them goes into the record.
pub(crate) fn serve(
    down: UdpSocket,
    up: UdpSocket,
    upstream: SocketAddr,
    policy: Arc<Mutex<Policy>>,
    stop: OwnedFd,
    mut sources: Option<Sources>,
) {
    // Kernel events into the record (when it is on).
    let take = |sources: &mut Sources, fd: i32, policy: &Mutex<Policy>| {
        let mut p = lock(policy);
        if let Some(r) = p.record.as_mut() {
            let r = std::cell::RefCell::new(r);
            sources.drain(fd, &mut |s| r.borrow_mut().flow(s), &mut || {
                r.borrow_mut().lost()
            });
        }
    };
    let mut pending: HashMap<u16, Pending> = HashMap::new();
    let mut last_drain = Instant::now();
    let mut next_id: u16 = rand_u16();
    let mut buf = vec![0u8; 4096];
    let private: Vec<Cidr> = crate::policy::PRIVATE
        .iter()
        .chain(crate::policy::ALWAYS_DENIED)
        .map(|c| c.parse().expect("constant cidr"))
        .collect();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: down.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: up.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // The kernel's events are read in batches, every DRAIN_EVERY, not
        // as each arrives: a guest opening connections fast would
        // otherwise wake this thread twice per connection, on the cores
        // its own VM runs on. The socket's buffer holds what comes between.
        let wait = match &sources {
            Some(_) => DRAIN_EVERY.saturating_sub(last_drain.elapsed()),
            None => Duration::from_secs(1),
        };
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis() as libc::c_int,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            warn!("dns forwarder: poll failed; stopping");
            return;
        }
        if fds[2].revents != 0 {
            if let Some(src) = sources.as_mut() {
                let mut p = lock(&policy);
                if let Some(r) = p.record.as_mut() {
                    let r = std::cell::RefCell::new(r);
                    if let Err(e) = src.finish(&mut |s| r.borrow_mut().flow(s), &mut || {
                        r.borrow_mut().lost()
                    }) {
                        warn!(error = %e, "egress record: cannot read the flows still tracked");
                        r.borrow_mut().lost();
                    }
                }
            }
            return;
        }
        if let Some(src) = sources.as_mut() {
            if last_drain.elapsed() >= DRAIN_EVERY {
                last_drain = Instant::now();
                let (ct, log) = (src.ct.as_raw_fd(), src.log.as_raw_fd());
                take(src, log, &policy);
                take(src, ct, &policy);
            }
        }
        pending.retain(|_, p| {
            let live = p.sent.elapsed() < UPSTREAM_TIMEOUT;
            if !live {
                // Asked, never answered: recorded without answers.
                if let Some(r) = lock(&policy).record.as_mut() {
                    r.dns(&p.name, p.qtype, true, &[], now_ms());
                }
            }
            live
        });
        if fds[0].revents & libc::POLLIN != 0 {
            if let Ok((len, guest)) = down.recv_from(&mut buf) {
                let q = &buf[..len];
                match question(q) {
                    None => {}
                    Some((name, qtype, end)) => {
                        let mut pol = lock(&policy);
                        let allowed = pol.egress.allows_name(&name);
                        if !allowed {
                            if let Some(r) = pol.record.as_mut() {
                                r.dns(&name, qtype, false, &[], now_ms());
                            }
                        }
                        drop(pol);
                        if !allowed {
                            debug!(%name, "dns: refused (not on the allowlist)");
                            let _ = down.send_to(&reply_with(q, end, 5), guest);
                        } else {
                            next_id = next_id.wrapping_add(1);
                            let mut fwd = q.to_vec();
                            fwd[0..2].copy_from_slice(&next_id.to_be_bytes());
                            if up.send_to(&fwd, upstream).is_ok() {
                                pending.insert(
                                    next_id,
                                    Pending {
                                        guest,
                                        id: [q[0], q[1]],
                                        name,
                                        qtype,
                                        sent: Instant::now(),
                                    },
                                );
                            } else {
                                let _ = down.send_to(&reply_with(q, end, 2), guest);
                            }
                        }
                    }
                }
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Ok((len, from)) = up.recv_from(&mut buf) {
                if from != upstream || len < 12 {
                    continue;
                }
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let Some(p) = pending.remove(&id) else {
                    continue;
                };
                let resp = &mut buf[..len];
                // The answer must be for the question asked.
                if question(resp).map(|q| q.0) != Some(p.name.clone()) {
                    continue;
                }
                let mut pol = lock(&policy);
                let Policy {
                    egress,
                    nft,
                    record,
                } = &mut *pol;
                if let Some(r) = record.as_mut() {
                    let addrs: Vec<Ipv4Addr> = answers_a(resp).into_iter().map(|a| a.0).collect();
                    r.dns(&p.name, p.qtype, true, &addrs, now_ms());
                }
                if let Egress::Allow { .. } = egress {
                    let elems: Vec<String> = answers_a(resp)
                        .into_iter()
                        .filter(|(ip, _)| !private.iter().any(|c| c.contains(*ip)))
                        .map(|(ip, ttl)| {
                            format!(
                                "{ip} timeout {}s",
                                ttl.clamp(MIN_ALLOW_SECS, MAX_ALLOW_SECS)
                            )
                        })
                        .collect();
                    if !elems.is_empty() {
                        let cmd = format!(
                            "add element inet {VM_TABLE} allow_dns4 {{ {} }}",
                            elems.join(", ")
                        );
                        if let Err(e) = nft.run(&cmd) {
                            warn!(error = %e, "dns: cannot allow answered addresses; answer withheld");
                            continue;
                        }
                        debug!(name = %p.name, addrs = %elems.join(", "), "dns: allowed");
                    }
                }
                drop(pol);
                resp[0..2].copy_from_slice(&p.id);
                let _ = down.send_to(resp, p.guest);
            }
        }
    }
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    u16::from_ne_bytes(b) ^ (std::process::id() as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, id: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend([1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend(l.as_bytes());
        }
        q.extend([0, 0, 1, 0, 1]);
        q
    }

    #[test]
    fn parses_question_and_answers_with_compression() {
        let q = query("Example.COM", 7);
        let (name, qtype, end) = question(&q).unwrap();
        assert_eq!((name.as_str(), qtype, end), ("example.com", 1, q.len()));
        // Response: CNAME then A, names compressed to the question (0xc00c).
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2;
        r.extend([0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 0x0c]);
        r.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 198, 51, 100, 10]);
        assert_eq!(answers_a(&r), vec![(Ipv4Addr::new(198, 51, 100, 10), 256)]);
        // Truncated garbage yields nothing rather than a panic.
        assert!(answers_a(&r[..r.len() - 3]).is_empty());
        assert!(question(&[0u8; 5]).is_none());
    }

    #[test]
    fn refusal_keeps_id_and_question() {
        let q = query("evil.test", 0x1234);
        let (_, _, end) = question(&q).unwrap();
        let r = reply_with(&q, end, 5);
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 5);
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(question(&r).unwrap().0, "evil.test");
    }
}
