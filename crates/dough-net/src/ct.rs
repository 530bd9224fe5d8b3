//! The kernel's side of the egress record ([`crate::record`]): conntrack
//! (destroy events and a dump at the end, with byte counters and start and
//! stop times) and NFLOG
//! (packets a rule refused), both read over nfnetlink in the VM's
//! namespace. Opened on the namespace's thread; the sockets stay bound to
//! it wherever they are read.
use std::collections::HashSet;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::record::{now_ms, Seen, Verdict};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNL_SUBSYS_ULOG: u16 = 4;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
/// The legacy group mask of conntrack's destroy events. Only these: a new
/// entry's event would be built on the packet path of every connection's
/// first packet, a destroy event mostly off it (a closed TCP connection's
/// entry is destroyed by conntrack's garbage collector, minutes later),
/// and it carries all the record needs — tuple, bytes, start and stop.
const NF_NETLINK_CONNTRACK_DESTROY: u32 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;

// conntrack attributes
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_STATUS: u16 = 3;
const CTA_ID: u16 = 12;
/// `IPS_DYING` of an entry's status.
const IPS_DYING: u32 = 1 << 9;
const CTA_TIMESTAMP: u16 = 20;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TIMESTAMP_STOP: u16 = 2;
// NFLOG attributes
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
/// Enough of a packet for its IPv4 header (options included) and ports.
const COPY_RANGE: u32 = 64;

fn socket(groups: u32, nonblock: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
    if nonblock {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, ty, NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = groups;
    // SAFETY: a sockaddr_nl of the right size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Room for a burst of events (a task opening thousands of connections);
    // FORCE needs CAP_NET_ADMIN, which Dough has where it makes namespaces.
    let size: libc::c_int = 8 << 20;
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    Ok(fd)
}

/// A netlink request: header, nfgenmsg, attributes.
fn request(ty: u16, flags: u16, family: u8, res_id: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend([family, 0]);
    m.extend(res_id.to_be_bytes());
    for (t, data) in attrs {
        let len = 4 + data.len();
        m.extend((len as u16).to_ne_bytes());
        m.extend(t.to_ne_bytes());
        m.extend(*data);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&ty.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    m
}

fn send(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: sending a buffer to the kernel (pid 0).
    let n = unsafe {
        libc::sendto(
            fd,
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One datagram; Ok(None) when a non-blocking socket has nothing.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: receiving into a buffer we own.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// The netlink messages of a datagram: (type, payload after the header).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = vec![];
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        out.push((ty, &buf[off + 16..off + len]));
        off += (len + 3) & !3;
    }
    out
}

/// Attributes: (type without flags, data).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let data = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((ty, data))
    })
}

fn attr(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).find(|(t, _)| *t == ty).map(|(_, d)| d)
}

fn be64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn ipv4(b: &[u8]) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::new(
        *b.first()?,
        *b.get(1)?,
        *b.get(2)?,
        *b.get(3)?,
    ))
}

/// A conntrack entry (after the nfgenmsg: a destroy event, or one of the
/// final dump, whose counters are final too) as a flow from `guest`; None
/// if it is not one (another source, the gateway itself, not IPv4).
fn ct_flow(payload: &[u8], guest: Ipv4Addr, gateway: Ipv4Addr) -> Option<Seen> {
    let a = payload.get(4..)?;
    let orig = attr(a, CTA_TUPLE_ORIG)?;
    let ip = attr(orig, CTA_TUPLE_IP)?;
    let src = ipv4(attr(ip, CTA_IP_V4_SRC)?)?;
    let dst = ipv4(attr(ip, CTA_IP_V4_DST)?)?;
    if src != guest || dst == gateway {
        return None;
    }
    let proto = attr(orig, CTA_TUPLE_PROTO)?;
    let num = *attr(proto, CTA_PROTO_NUM)?.first()?;
    let port = match num {
        6 | 17 => attr(proto, CTA_PROTO_DST_PORT)
            .and_then(|p| Some(u16::from_be_bytes([*p.first()?, *p.get(1)?]))),
        _ => None,
    };
    let bytes = |t| {
        attr(a, t)
            .and_then(|c| attr(c, CTA_COUNTERS_BYTES))
            .and_then(be64)
            .unwrap_or(0)
    };
    let now = now_ms();
    let ts = attr(a, CTA_TIMESTAMP);
    let ms = |t| {
        ts.and_then(|ts| attr(ts, t))
            .and_then(be64)
            .map(|ns| ns / 1_000_000)
    };
    let first = ms(CTA_TIMESTAMP_START).unwrap_or(now);
    // Still tracked at the end (the dump): no stop time yet.
    let last = ms(CTA_TIMESTAMP_STOP).unwrap_or(now);
    Some(Seen {
        proto: num,
        addr: dst,
        port,
        verdict: Verdict::Allowed,
        rule: None,
        bytes_out: bytes(CTA_COUNTERS_ORIG),
        bytes_in: bytes(CTA_COUNTERS_REPLY),
        first_ms: first,
        last_ms: last.max(first),
    })
}

/// The entry is being destroyed: its destroy event is sent, or on its way.
fn dying(payload: &[u8]) -> bool {
    payload
        .get(4..)
        .and_then(|a| attr(a, CTA_STATUS))
        .and_then(|b| Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)))
        .is_some_and(|st| st & IPS_DYING != 0)
}

/// Which conntrack entry this is: its id and its start time. The id alone
/// is not enough: it is a 32-bit hash, two entries of a dump can share it,
/// and an entry made again for the same connection's tuple (a new SYN
/// reopening a closed one) can get its predecessor's.
type Entry = (u32, u64);

fn entry(payload: &[u8]) -> Option<Entry> {
    let a = payload.get(4..)?;
    let b = attr(a, CTA_ID)?;
    let id = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    let start = attr(a, CTA_TIMESTAMP)
        .and_then(|ts| attr(ts, CTA_TIMESTAMP_START))
        .and_then(be64)
        .unwrap_or(0);
    Some((id, start))
}

/// An NFLOG packet message as a blocked attempt.
fn logged(payload: &[u8]) -> Option<Seen> {
    let a = payload.get(4..)?;
    let rule = attr(a, NFULA_PREFIX)
        .map(|p| String::from_utf8_lossy(p.split(|b| *b == 0).next().unwrap_or(&[])).into_owned());
    let pkt = attr(a, NFULA_PAYLOAD)?;
    if pkt.first()? >> 4 != 4 {
        return None;
    }
    let ihl = ((pkt[0] & 0x0f) as usize) * 4;
    let proto = *pkt.get(9)?;
    let dst = ipv4(pkt.get(16..20)?)?;
    let port = match proto {
        6 | 17 => Some(u16::from_be_bytes([*pkt.get(ihl + 2)?, *pkt.get(ihl + 3)?])),
        _ => None,
    };
    let now = now_ms();
    Some(Seen {
        proto,
        addr: dst,
        port,
        verdict: Verdict::Blocked,
        rule,
        bytes_out: 0,
        bytes_in: 0,
        first_ms: now,
        last_ms: now,
    })
}

/// What the kernel tells about one VM's traffic. Open it on the thread
/// that is in the VM's namespace.
pub struct Sources {
    /// conntrack events: destroyed entries.
    pub ct: OwnedFd,
    /// NFLOG group [`crate::policy::LOG_GROUP`].
    pub log: OwnedFd,
    guest: Ipv4Addr,
    gateway: Ipv4Addr,
    buf: Vec<u8>,
}

impl Sources {
    /// Turn on byte counting and timestamps for the namespace's conntrack
    /// entries, and bind both sockets. Call before the guest's first packet.
    pub fn open(guest: Ipv4Addr, gateway: Ipv4Addr) -> io::Result<Sources> {
        for (k, v) in [
            ("nf_conntrack_acct", "1"),
            ("nf_conntrack_timestamp", "1"),
            ("nf_conntrack_events", "1"),
        ] {
            let p = format!("/proc/sys/net/netfilter/{k}");
            std::fs::write(&p, v).map_err(|e| io::Error::new(e.kind(), format!("{p}: {e}")))?;
        }
        let ct = socket(NF_NETLINK_CONNTRACK_DESTROY, true)?;
        let log = socket(0, false)?;
        let ty = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG;
        let group = crate::policy::LOG_GROUP;
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend([NFULNL_COPY_PACKET, 0]);
        let qthresh = 1u32.to_be_bytes();
        for attrs in [
            vec![(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND][..])],
            // Each packet at once: the record is complete when the VM ends.
            vec![
                (NFULA_CFG_MODE, &mode[..]),
                (NFULA_CFG_QTHRESH, &qthresh[..]),
            ],
        ] {
            let m = request(
                ty,
                NLM_F_REQUEST | NLM_F_ACK,
                libc::AF_UNSPEC as u8,
                group,
                &attrs,
            );
            send(log.as_raw_fd(), &m)?;
            let mut buf = [0u8; 512];
            let n = recv(log.as_raw_fd(), &mut buf)?.unwrap_or(0);
            for (t, p) in messages(&buf[..n]) {
                if t == NLMSG_ERROR {
                    let code =
                        i32::from_ne_bytes(p.get(..4).unwrap_or(&[0; 4]).try_into().unwrap());
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                }
            }
        }
        set_nonblocking(log.as_raw_fd())?;
        Ok(Sources {
            ct,
            log,
            guest,
            gateway,
            buf: vec![0; 256 << 10],
        })
    }

    /// Read what is waiting on `fd` (one of ours) into `out`; `lost` is
    /// called once per overrun.
    pub fn drain(&mut self, fd: RawFd, out: &mut dyn FnMut(Seen), lost: &mut dyn FnMut()) {
        self.drain_except(fd, &HashSet::new(), out, lost)
    }

    /// [`Sources::drain`], leaving out the conntrack entries in `skip`.
    fn drain_except(
        &mut self,
        fd: RawFd,
        skip: &HashSet<Entry>,
        out: &mut dyn FnMut(Seen),
        lost: &mut dyn FnMut(),
    ) {
        loop {
            match recv(fd, &mut self.buf) {
                Ok(Some(n)) => {
                    for (ty, p) in messages(&self.buf[..n]) {
                        let seen = if ty == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE {
                            match entry(p) {
                                Some(e) if skip.contains(&e) => None,
                                _ => ct_flow(p, self.guest, self.gateway),
                            }
                        } else if ty == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
                            logged(p)
                        } else {
                            None
                        };
                        if let Some(s) = seen {
                            out(s);
                        }
                    }
                }
                Ok(None) => return,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => lost(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Everything still waiting, then every flow conntrack still tracks
    /// (open connections, and closed ones not yet expired), then what was
    /// destroyed meanwhile and not in the dump: the end of the record.
    pub fn finish(&mut self, out: &mut dyn FnMut(Seen), lost: &mut dyn FnMut()) -> io::Result<()> {
        let (ct, log) = (self.ct.as_raw_fd(), self.log.as_raw_fd());
        self.drain(log, out, lost);
        self.drain(ct, out, lost);
        let mut dumped = HashSet::new();
        let r = self.dump(&mut dumped, out);
        self.drain_except(ct, &dumped, out, lost);
        self.drain(log, out, lost);
        r
    }

    /// Every entry conntrack tracks, each once, into `ids`.
    fn dump(&mut self, ids: &mut HashSet<Entry>, out: &mut dyn FnMut(Seen)) -> io::Result<()> {
        let dump = socket(0, false)?;
        let m = request(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            libc::AF_INET as u8,
            0,
            &[],
        );
        send(dump.as_raw_fd(), &m)?;
        loop {
            let Some(n) = recv(dump.as_raw_fd(), &mut self.buf)? else {
                return Ok(());
            };
            for (ty, p) in messages(&self.buf[..n]) {
                match ty {
                    NLMSG_DONE | NLMSG_ERROR => return Ok(()),
                    t if t == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                        // Still tracked: its counters as they are now. Not
                        // an entry being destroyed (its event comes), nor
                        // one the dump gave already (a dump resumed after
                        // its place vanished starts its bucket again).
                        if dying(p) || entry(p).is_some_and(|e| !ids.insert(e)) {
                            continue;
                        }
                        if let Some(s) = ct_flow(p, self.guest, self.gateway) {
                            out(s);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut v = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        v.extend(ty.to_ne_bytes());
        v.extend(data);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    #[test]
    fn a_conntrack_entry_becomes_a_flow_with_its_counters() {
        let nested = 0x8000;
        let ip = [
            nla(CTA_IP_V4_SRC, &[172, 16, 0, 2]),
            nla(CTA_IP_V4_DST, &[203, 0, 113, 9]),
        ]
        .concat();
        let proto = [
            nla(CTA_PROTO_NUM, &[6]),
            nla(CTA_PROTO_DST_PORT, &443u16.to_be_bytes()),
        ]
        .concat();
        let tuple = [
            nla(CTA_TUPLE_IP | nested, &ip),
            nla(CTA_TUPLE_PROTO | nested, &proto),
        ]
        .concat();
        let counters = |b: u64| nla(CTA_COUNTERS_BYTES, &b.to_be_bytes());
        let ts = [
            nla(CTA_TIMESTAMP_START, &5_000_000u64.to_be_bytes()),
            nla(CTA_TIMESTAMP_STOP, &9_000_000u64.to_be_bytes()),
        ]
        .concat();
        let mut p = vec![2, 0, 0, 0];
        p.extend(nla(CTA_TUPLE_ORIG | nested, &tuple));
        p.extend(nla(CTA_COUNTERS_ORIG | nested, &counters(120)));
        p.extend(nla(CTA_COUNTERS_REPLY | nested, &counters(4000)));
        p.extend(nla(CTA_TIMESTAMP | nested, &ts));
        p.extend(nla(CTA_ID, &0xdeadbeefu32.to_be_bytes()));
        assert_eq!(entry(&p), Some((0xdeadbeef, 5_000_000)));
        assert!(!dying(&p));
        let mut d = p.clone();
        d.extend(nla(CTA_STATUS, &(IPS_DYING | 0x8).to_be_bytes()));
        assert!(dying(&d));
        let guest = Ipv4Addr::new(172, 16, 0, 2);
        let s = ct_flow(&p, guest, Ipv4Addr::new(172, 16, 0, 1)).unwrap();
        assert_eq!(
            (
                s.addr,
                s.port,
                s.bytes_out,
                s.bytes_in,
                s.first_ms,
                s.last_ms
            ),
            ("203.0.113.9".parse().unwrap(), Some(443), 120, 4000, 5, 9)
        );
        // Traffic to the gateway (DNS) is the forwarder's to record.
        assert!(ct_flow(&p, guest, Ipv4Addr::new(203, 0, 113, 9)).is_none());
        // Cut inside the tuple: nothing, no panic.
        assert!(ct_flow(&p[..20], guest, Ipv4Addr::new(172, 16, 0, 1)).is_none());
    }

    #[test]
    fn a_logged_packet_becomes_a_blocked_attempt_named_by_its_rule() {
        let mut pkt = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 172, 16, 0, 2, 10, 0, 0, 5,
        ];
        pkt.extend([0xc3, 0x50, 0, 22]);
        let mut p = vec![2, 0, 0, 1];
        p.extend(nla(NFULA_PREFIX, b"private4\0"));
        p.extend(nla(NFULA_PAYLOAD, &pkt));
        let s = logged(&p).unwrap();
        assert_eq!(
            (s.addr, s.port, s.rule.as_deref(), s.verdict),
            (
                "10.0.0.5".parse().unwrap(),
                Some(22),
                Some("private4"),
                Verdict::Blocked
            )
        );
        assert!(logged(&p[..12]).is_none());
    }
}
