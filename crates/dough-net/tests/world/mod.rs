//! A small world for network tests, built from real namespaces: a "host"
//! (where Dough runs) and an "internet" behind it with servers on public,
//! private and metadata addresses and a DNS server in a private range.
//! The DNS server is dnsmasq and the tests' resolver is busybox's nslookup
//! (both from Debian's packages, installed by scripts/test.sh): nothing of
//! Dough's own DNS code checks Dough's forwarder. Everything is deleted, and
//! dnsmasq ended, when the `World` drops.
#![allow(dead_code)]
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dough_net::{Cidr, NetConfig};

/// The host's address on its uplink.
pub const HOST_UPLINK: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const INET_UPLINK: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Web servers on the internet: the same machine answers as both names.
pub const ALLOWED_WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const OTHER_WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
pub const ALLOWED_NAME: &str = "allowed.example";
pub const OTHER_NAME: &str = "other.example";
/// The upstream resolver sits in a private range on purpose.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 53, 0, 53);
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// A server in each private range.
pub const PRIVATE_SERVERS: &[Ipv4Addr] = &[
    Ipv4Addr::new(10, 1, 0, 1),
    Ipv4Addr::new(172, 20, 0, 1),
    Ipv4Addr::new(192, 168, 1, 1),
    Ipv4Addr::new(100, 64, 0, 1),
];
pub const WEB_PORT: u16 = 80;
/// A service on the host, bound to 0.0.0.0.
pub const HOST_PORT: u16 = 8081;

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cmd` runs in the network namespace `ns`.
pub fn in_netns(cmd: &mut Command, ns: &str) {
    let f = std::fs::File::open(ns_path(ns)).unwrap();
    // SAFETY: setns is a raw syscall on an fd opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd;
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Run `f` on a thread inside the namespace at `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns_path(ns);
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace")
}

pub fn ns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

pub struct World {
    pub host: String,
    pub inet: String,
    stop: Arc<AtomicBool>,
    extra_ns: Vec<String>,
    dns: Option<std::process::Child>,
}

impl World {
    /// Names are unique per process and call.
    pub fn new(tag: &str) -> World {
        let id = format!("{}{}", std::process::id() % 100000, tag);
        let host = format!("dt-host-{id}");
        let inet = format!("dt-inet-{id}");
        for ns in [&host, &inet] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "-n", &host, "link", "add", "up0", "type", "veth", "peer", "name", "inet0",
            "netns", &inet,
        ]);
        sh(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            &format!("{HOST_UPLINK}/24"),
            "dev",
            "up0",
        ]);
        sh(&["ip", "-n", &host, "link", "set", "up0", "up"]);
        sh(&[
            "ip",
            "-n",
            &host,
            "route",
            "add",
            "default",
            "via",
            &INET_UPLINK.to_string(),
        ]);
        sh(&[
            "ip",
            "-n",
            &inet,
            "addr",
            "add",
            &format!("{INET_UPLINK}/24"),
            "dev",
            "inet0",
        ]);
        sh(&["ip", "-n", &inet, "link", "set", "inet0", "up"]);
        let mut addrs = vec![ALLOWED_WEB, OTHER_WEB, DNS, METADATA];
        addrs.extend(PRIVATE_SERVERS);
        for a in &addrs {
            sh(&[
                "ip",
                "-n",
                &inet,
                "addr",
                "add",
                &format!("{a}/32"),
                "dev",
                "lo",
            ]);
        }
        // Without host NAT the internet routes the slot pool back to the host.
        sh(&[
            "ip",
            "-n",
            &inet,
            "route",
            "add",
            dough_net::DEFAULT_POOL,
            "via",
            &HOST_UPLINK.to_string(),
        ]);
        let mut w = World {
            host,
            inet,
            stop: Arc::new(AtomicBool::new(false)),
            extra_ns: vec![],
            dns: None,
        };
        let mut web = vec![ALLOWED_WEB, OTHER_WEB, METADATA];
        web.extend(PRIVATE_SERVERS);
        for a in web {
            w.serve_tcp(&w.inet.clone(), SocketAddr::new(a.into(), WEB_PORT));
        }
        w.serve_tcp(
            &w.host.clone(),
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HOST_PORT),
        );
        w.serve_dns();
        w
    }

    pub fn config(&self, host_nat: bool) -> NetConfig {
        NetConfig {
            pool: dough_net::DEFAULT_POOL.parse::<Cidr>().unwrap(),
            dns_upstream: SocketAddr::new(DNS.into(), 53),
            host_nat,
            run_root: PathBuf::from("/run/dough"),
            tag: format!("test {}", std::process::id()),
            record_egress: true,
        }
    }

    /// A TCP server that answers each connection with the peer's address.
    pub fn serve_tcp(&self, ns: &str, addr: SocketAddr) {
        let l = in_ns(ns, move || {
            TcpListener::bind(addr).expect("bind test server")
        });
        l.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        let mut b = [0u8; 512];
                        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                        let _ = s.read(&mut b);
                        let _ = write!(s, "HTTP/1.0 200 OK\r\n\r\n{}\n", peer.ip());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }

    /// dnsmasq on the internet's DNS address, authoritative for `example`:
    /// the two web names (A records, TTL 30), NXDOMAIN for the rest of
    /// `example`, REFUSED for everything else.
    fn serve_dns(&mut self) {
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--pid-file=",
            "--bind-interfaces",
            "--port=53",
            "--local=/example/",
            "--local-ttl=30",
        ])
        .arg(format!("--listen-address={DNS}"))
        .arg(format!("--host-record={ALLOWED_NAME},{ALLOWED_WEB}"))
        .arg(format!("--host-record={OTHER_NAME},{OTHER_WEB}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        in_netns(&mut cmd, &self.inet);
        let child = cmd
            .spawn()
            .expect("start dnsmasq (scripts/test.sh installs dnsmasq-base)");
        self.dns = Some(child);
        let t = Instant::now();
        while resolve(&self.inet, DNS, ALLOWED_NAME) != Ok(vec![ALLOWED_WEB]) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "dnsmasq does not answer"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A stand-in guest for VM `vm_id`: tap0 in the VM's namespace is
    /// replaced by a veth named tap0 whose other end is `eth0` in a new
    /// namespace configured as the agent configures a guest. The VM's rules
    /// match tap0 by name, so they apply unchanged.
    pub fn stand_in_guest(&mut self, vm_id: &str) -> String {
        let vmns = format!("dough-{vm_id}");
        let g = format!("dt-guest-{vm_id}");
        let _ = Command::new("ip").args(["netns", "del", &g]).output();
        sh(&["ip", "netns", "add", &g]);
        sh(&["ip", "-n", &g, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &vmns, "link", "del", "tap0"]);
        sh(&[
            "ip", "-n", &vmns, "link", "add", "tap0", "type", "veth", "peer", "name", "eth0",
            "netns", &g,
        ]);
        sh(&[
            "ip",
            "-n",
            &vmns,
            "addr",
            "add",
            "172.16.0.1/30",
            "dev",
            "tap0",
        ]);
        sh(&["ip", "-n", &vmns, "link", "set", "tap0", "up"]);
        sh(&[
            "ip",
            "-n",
            &g,
            "addr",
            "add",
            "172.16.0.2/30",
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &g, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &g,
            "route",
            "add",
            "default",
            "via",
            "172.16.0.1",
        ]);
        self.extra_ns.push(g.clone());
        g
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut c) = self.dns.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.extra_ns.iter().chain([&self.host, &self.inet]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Connect from namespace `ns` and read the server's answer. `Err` says how
/// the attempt failed and how long it took.
pub fn fetch(ns: &str, addr: SocketAddr) -> Result<String, String> {
    in_ns(ns, move || {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("{e} after {:?}", t.elapsed()))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("read: {e} after {:?}", t.elapsed()))?;
        Ok(out
            .rsplit("\r\n\r\n")
            .next()
            .unwrap_or("")
            .trim()
            .to_string())
    })
}

/// Resolve `name` (A) through `server` from namespace `ns` with busybox's
/// nslookup: the addresses, or what the server said ("NXDOMAIN",
/// "REFUSED") or that none answered.
pub fn resolve(ns: &str, server: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut cmd = Command::new("busybox");
    cmd.args(["nslookup", "-type=a", name])
        .arg(server.to_string());
    in_netns(&mut cmd, ns);
    let out = cmd
        .output()
        .expect("busybox (scripts/test.sh installs busybox-static)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if let Some(l) = text.lines().find(|l| l.starts_with("** server can't find")) {
        return Err(l.rsplit(": ").next().unwrap_or(l).trim().to_string());
    }
    if !out.status.success() {
        return Err(format!("no answer: {}", text.trim()));
    }
    // Addresses follow the "Name:" line (the lines before it are the
    // server's own address).
    Ok(text
        .lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter_map(|l| l.strip_prefix("Address:"))
        .filter_map(|a| a.trim().parse().ok())
        .collect())
}
