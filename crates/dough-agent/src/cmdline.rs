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
    /// Power off at once (bare-boot benchmark baseline).
    pub bench_poweroff: bool,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            vm_id: "unknown".into(),
            port: dough_proto::CONTROL_PORT,
            root_dev: "/dev/vda".into(),
            scratch_dev: "/dev/vdb".into(),
            bench_poweroff: false,
        }
    }
}

/// Parse `dough.*` keys; unknown keys and other kernel arguments are ignored,
/// bad values keep the default (the agent must boot whatever it is given).
pub fn parse(cmdline: &str) -> BootConfig {
    let mut c = BootConfig::default();
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
            "dough.scratch" if v.starts_with("/dev/") => c.scratch_dev = v.to_string(),
            "dough.bench" => c.bench_poweroff = v == "poweroff",
            _ => {}
        }
    }
    c
}

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
    }

    #[test]
    fn bad_values_keep_defaults() {
        let c = parse("dough.vm=../../etc dough.port=x dough.root=vda");
        assert_eq!(c, BootConfig::default());
    }
}
