//! Which accelerator to use. `auto` picks KVM only where it can boot a
//! normal guest: `/dev/kvm` present and openable, the CPU advertising VT-x or
//! AMD-V, and the KVM provider being `kvm_intel`/`kvm_amd`. A PVM nested
//! hypervisor (`kvm_pvm`, as on Dough's own CI machines) also offers
//! `/dev/kvm`, but a stock guest kernel does not boot under it.
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(format!(
                "unknown accelerator `{s}` (expected auto, kvm or tcg)"
            )),
        }
    }
}

/// The facts accelerator choice depends on, gathered once.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub kvm_device: bool,
    pub kvm_openable: bool,
    pub cpu_virt_flag: bool,
    /// `kvm_intel` or `kvm_amd` loaded.
    pub hw_kvm_module: bool,
    /// `kvm_pvm` loaded: nested PVM, no stock guest boots.
    pub pvm_module: bool,
    /// Host TSC frequency in kHz, from /proc/cpuinfo.
    pub tsc_khz: Option<u64>,
    /// `--allow-pvm`: an explicit `--accel kvm` accepts a PVM `/dev/kvm`
    /// (for PVM guest kernels, and for checks that stop short of a
    /// finished boot). Never changes what `auto` picks.
    pub allow_pvm: bool,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostFacts {
            kvm_device: Path::new("/dev/kvm").exists(),
            kvm_openable: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            cpu_virt_flag: cpuinfo.lines().any(|l| {
                l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm")
            }),
            hw_kvm_module: Path::new("/sys/module/kvm_intel").exists()
                || Path::new("/sys/module/kvm_amd").exists(),
            pvm_module: Path::new("/sys/module/kvm_pvm").exists(),
            tsc_khz: tsc_khz(&cpuinfo),
            allow_pvm: false,
        }
    }

    /// Why KVM cannot be used for `choice`: as [`HostFacts::kvm_problem`],
    /// except that an explicit `kvm` with `allow_pvm` takes a PVM
    /// `/dev/kvm` that opens.
    pub fn kvm_problem_for(&self, choice: AccelChoice) -> Option<String> {
        let pvm_allowed = choice == AccelChoice::Kvm
            && self.allow_pvm
            && self.pvm_module
            && self.kvm_device
            && self.kvm_openable;
        if pvm_allowed {
            None
        } else {
            self.kvm_problem()
        }
    }

    /// Why KVM cannot be used, or `None` if it can.
    pub fn kvm_problem(&self) -> Option<String> {
        if !self.kvm_device {
            return Some("/dev/kvm does not exist".into());
        }
        if !self.kvm_openable {
            return Some("/dev/kvm cannot be opened read-write (permissions?)".into());
        }
        if self.pvm_module && !self.hw_kvm_module {
            return Some(
                "/dev/kvm is provided by kvm_pvm (a PVM nested hypervisor); a stock guest kernel does not boot under it (--accel kvm --allow-pvm uses it anyway, for PVM guest kernels)"
                    .into(),
            );
        }
        if !self.cpu_virt_flag {
            return Some("the CPU advertises no hardware virtualization (vmx/svm)".into());
        }
        if !self.hw_kvm_module {
            return Some("neither kvm_intel nor kvm_amd is loaded".into());
        }
        None
    }

    /// Resolve a choice to an accelerator, or say why KVM was refused.
    pub fn choose(&self, choice: AccelChoice) -> Result<Accel, String> {
        match (choice, self.kvm_problem_for(choice)) {
            (AccelChoice::Tcg, _) => Ok(Accel::Tcg),
            (AccelChoice::Kvm, None) | (AccelChoice::Auto, None) => Ok(Accel::Kvm),
            (AccelChoice::Kvm, Some(why)) => Err(why),
            (AccelChoice::Auto, Some(_)) => Ok(Accel::Tcg),
        }
    }
}

/// `cpu MHz` of the first CPU, in kHz. Passed to the guest as
/// `tsc_early_khz`: without it about one TCG boot in seven hangs calibrating
/// the TSC against the PIT.
pub fn tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_kvm() -> HostFacts {
        HostFacts {
            kvm_device: true,
            kvm_openable: true,
            cpu_virt_flag: true,
            hw_kvm_module: true,
            pvm_module: false,
            tsc_khz: Some(2_000_000),
            allow_pvm: false,
        }
    }

    #[test]
    fn auto_picks_kvm_on_a_hardware_virtualization_host() {
        assert_eq!(real_kvm().choose(AccelChoice::Auto), Ok(Accel::Kvm));
        assert_eq!(real_kvm().choose(AccelChoice::Tcg), Ok(Accel::Tcg));
    }

    #[test]
    fn auto_picks_tcg_under_pvm_and_kvm_is_refused_with_the_reason() {
        let pvm = HostFacts {
            cpu_virt_flag: false,
            hw_kvm_module: false,
            pvm_module: true,
            ..real_kvm()
        };
        assert_eq!(pvm.choose(AccelChoice::Auto), Ok(Accel::Tcg));
        let err = pvm.choose(AccelChoice::Kvm).unwrap_err();
        assert!(err.contains("kvm_pvm"), "{err}");
        let none = HostFacts::default();
        assert!(none
            .choose(AccelChoice::Kvm)
            .unwrap_err()
            .contains("does not exist"));
    }

    /// `--allow-pvm` lets an explicit `--accel kvm` take a PVM `/dev/kvm`
    /// that opens, and changes nothing else: auto stays TCG there, and it
    /// never makes a missing or closed device usable.
    #[test]
    fn allow_pvm_only_lifts_the_pvm_refusal_of_an_explicit_kvm() {
        let pvm = HostFacts {
            cpu_virt_flag: false,
            hw_kvm_module: false,
            pvm_module: true,
            ..real_kvm()
        };
        let allowed = HostFacts {
            allow_pvm: true,
            ..pvm.clone()
        };
        let closed = HostFacts {
            kvm_openable: false,
            ..allowed.clone()
        };
        // (facts, choice, expected accelerator or a word of the refusal)
        let table: &[(&HostFacts, AccelChoice, Result<Accel, &str>)] = &[
            (&pvm, AccelChoice::Kvm, Err("kvm_pvm")),
            (&pvm, AccelChoice::Auto, Ok(Accel::Tcg)),
            (&allowed, AccelChoice::Kvm, Ok(Accel::Kvm)),
            (&allowed, AccelChoice::Auto, Ok(Accel::Tcg)),
            (&allowed, AccelChoice::Tcg, Ok(Accel::Tcg)),
            (&closed, AccelChoice::Kvm, Err("cannot be opened")),
        ];
        for (facts, choice, want) in table {
            let got = facts.choose(*choice);
            match (want, &got) {
                (Ok(a), Ok(g)) => assert_eq!(a, g, "{choice:?} on {facts:?}"),
                (Err(word), Err(why)) => assert!(why.contains(word), "{choice:?}: {why}"),
                _ => panic!("{choice:?} on {facts:?}: want {want:?}, got {got:?}"),
            }
        }
        // A host with real KVM is unaffected by the flag.
        let kvm = HostFacts {
            allow_pvm: true,
            ..real_kvm()
        };
        assert_eq!(kvm.kvm_problem_for(AccelChoice::Auto), None);
    }

    /// On this machine (PVM) auto must be TCG; on a KVM host, KVM. The
    /// expectation is read here from the machine itself (`/sys/module`,
    /// opening `/dev/kvm`), not from the code under test: a hardware KVM
    /// module with a device that opens → KVM; otherwise (no device, or a
    /// PVM module alone) → TCG.
    #[test]
    fn probe_of_this_machine_agrees_with_the_machine() {
        // (/proc/modules is absent on some hosts, this one among them.)
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        let hw = loaded("kvm_intel") || loaded("kvm_amd");
        let opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let expect = if hw && opens { Accel::Kvm } else { Accel::Tcg };
        let f = HostFacts::probe();
        assert_eq!(
            f.choose(AccelChoice::Auto),
            Ok(expect),
            "kvm_intel/kvm_amd loaded: {hw}, /dev/kvm opens: {opens}, pvm: {}",
            loaded("kvm_pvm")
        );
        assert_eq!(f.pvm_module, loaded("kvm_pvm"), "{f:?}");
        assert!(f.tsc_khz.is_some(), "cpu MHz readable");
    }

    #[test]
    fn tsc_from_cpuinfo() {
        assert_eq!(
            tsc_khz("processor: 0\ncpu MHz\t\t: 2596.136\n"),
            Some(2_596_136)
        );
        assert_eq!(tsc_khz("nothing"), None);
    }
}
