//! Agent configuration from the kernel command line (`dough.*` keys), as the
//! kata agent does: the host decides, the guest reads `/proc/cmdline`.

/// What the host told the agent at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// VM id; the hostname becomes `dough-<id>`.
    pub vm_id: String,
    /// vsock port on the host to dial.
    pub port: u32,
    /// Block device of the read-only base rootfs.
    pub root_dev: String,
    /// Block device of the per-VM scratch disk (overlay upper layer).
    pub scratch_dev: String,
    /// An image's read-only layers (`dough.layers=N`): the block devices
    /// after the scratch disk, lowest first.
    pub layers: Vec<String>,
    /// Mount the scratch disk with online discard (`dough.discard=1`): an
    /// image build step, whose disk becomes a layer, gives the blocks of
    /// what it deleted back (apt's lists, build trees) instead of keeping
    /// them allocated in the host's sparse file.
    pub discard: bool,
    /// Power off at once (bare-boot benchmark baseline).
    pub bench_poweroff: bool,
    /// A warm-pool VM (`dough.warm=1`): while it waits, load what every
    /// task starts with (the shell, the C library) into the page cache.
    pub warm: bool,
    /// The control channel is the virtio-serial port `dough.agent`
    /// (`dough.control=serial`: a VM that can be snapshotted), not vsock.
    pub serial: bool,
    /// eth0's configuration (`dough.ip=A/N dough.gw=G [dough.dns=D]`); None:
    /// no network.
    pub net: Option<GuestNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    pub addr: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub dns: Option<std::net::Ipv4Addr>,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            vm_id: "unknown".into(),
            port: dough_proto::CONTROL_PORT,
            root_dev: "/dev/vda".into(),
            scratch_dev: "/dev/vdb".into(),
            layers: vec![],
            discard: false,
            bench_poweroff: false,
            warm: false,
            serial: false,
            net: None,
        }
    }
}

/// Parse `dough.*` keys; unknown keys and other kernel arguments are ignored,
/// bad values keep the default (the agent must boot whatever it is given).
pub fn parse(cmdline: &str) -> BootConfig {
    let mut c = BootConfig::default();
    let (mut ip, mut gw, mut dns) = (None, None, None);
    for word in cmdline.split_ascii_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        match k {
            "dough.vm" if valid_id(v) => c.vm_id = v.to_string(),
            "dough.port" => {
                if let Ok(p) = v.parse() {
                    c.port = p
                }
            }
            "dough.root" if v.starts_with("/dev/") => c.root_dev = v.to_string(),
            "dough.warm" => c.warm = v == "1",
            "dough.control" => c.serial = v == "serial",
            "dough.scratch" if v.starts_with("/dev/") => c.scratch_dev = v.to_string(),
            "dough.bench" => c.bench_poweroff = v == "poweroff",
            "dough.discard" => c.discard = v == "1",
            "dough.layers" => {
                if let Ok(n) = v.parse::<u8>() {
                    // vdc, vdd, …: after the base (vda) and scratch (vdb).
                    c.layers = (0..n.min(MAX_LAYERS))
                        .map(|i| format!("/dev/vd{}", (b'c' + i) as char))
                        .collect();
                }
            }
            "dough.ip" => {
                ip = v.split_once('/').and_then(|(a, n)| {
                    Some((a.parse().ok()?, n.parse::<u8>().ok().filter(|n| *n <= 32)?))
                })
            }
            "dough.gw" => gw = v.parse().ok(),
            "dough.dns" => dns = v.parse().ok(),
            _ => {}
        }
    }
    if let (Some((addr, prefix)), Some(gateway)) = (ip, gw) {
        c.net = Some(GuestNet {
            addr,
            prefix,
            gateway,
            dns,
        });
    }
    c
}

/// As many layers as the host gives a VM (`dough_vmm::MAX_LAYERS`).
const MAX_LAYERS: u8 = 16;

fn valid_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 48 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dough_keys_and_ignores_the_rest() {
        let c =
            parse("console=ttyS0 quiet dough.vm=ab12 dough.port=2000 dough.scratch=/dev/vdc foo");
        assert_eq!(c.vm_id, "ab12");
        assert_eq!(c.port, 2000);
        assert_eq!(c.scratch_dev, "/dev/vdc");
        assert_eq!(c.root_dev, "/dev/vda");
        assert!(!c.bench_poweroff);
        assert!(parse("dough.bench=poweroff").bench_poweroff);
        assert!(!c.warm && parse("dough.warm=1").warm && !parse("dough.warm=0").warm);
        assert!(!c.serial && parse("dough.control=serial").serial);
        assert!(c.layers.is_empty());
        assert!(!c.discard && parse("dough.discard=1").discard);
        assert_eq!(parse("dough.layers=2").layers, ["/dev/vdc", "/dev/vdd"]);
        assert_eq!(parse("dough.layers=200").layers.len(), 16);
        assert_eq!(parse("dough.layers=16").layers[15], "/dev/vdr");
        assert!(parse("dough.layers=x").layers.is_empty());
        assert_eq!(c.net, None);
        let n = parse("dough.ip=172.16.0.2/30 dough.gw=172.16.0.1 dough.dns=172.16.0.1")
            .net
            .unwrap();
        assert_eq!(n.addr, std::net::Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(n.prefix, 30);
        assert_eq!(n.dns, Some(n.gateway));
        assert_eq!(
            parse("dough.ip=172.16.0.2/30").net,
            None,
            "no gateway, no net"
        );
        assert_eq!(parse("dough.ip=172.16.0.2/40 dough.gw=1.2.3.4").net, None);
    }

    #[test]
    fn bad_values_keep_defaults() {
        let c = parse("dough.vm=../../etc dough.port=x dough.root=vda");
        assert_eq!(c, BootConfig::default());
    }
}
