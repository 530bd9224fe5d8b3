//! QEMU `microvm` backend: KVM where it boots a guest, TCG otherwise.
//! vsock goes through a `vhost-user-vsock-device` served by one
//! `vhost-device-vsock` per VM, which speaks hybrid vsock on the host side.
use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;

use crate::cgroup;
use crate::jail::{hand_over, Bind, Jail, JailSpec};
use crate::process::{
    spawn, spawn_console, wait_for_socket, Control, VmProcess, VmmHandle, CONSOLE_LOG_CAP,
};
use crate::{tools, Accel, Backend, BoxFuture, SnapshotRole, VmSpec, Vmm, VmmError};

/// The QEMU backend with the tools it found.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub qemu: PathBuf,
    pub vhost_vsock: PathBuf,
    /// Host TSC in kHz for `tsc_early_khz` (TCG boots hang without it).
    pub tsc_khz: Option<u64>,
}

impl Qemu {
    /// Find the binaries; a clear error naming the missing one.
    pub fn locate(tsc_khz: Option<u64>) -> Result<Qemu, VmmError> {
        let find = |name: &str| {
            tools::find(name).ok_or_else(|| VmmError::MissingTool {
                tool: name.into(),
                hint: tools::hint(name).into(),
            })
        };
        Ok(Qemu {
            qemu: find(tools::QEMU)?,
            vhost_vsock: find(tools::VHOST_VSOCK)?,
            tsc_khz,
        })
    }

    /// The kernel command line for `spec`.
    pub fn kernel_cmdline(&self, spec: &VmSpec) -> String {
        let mut args = vec![
            "console=ttyS0".to_string(),
            "panic=-1".into(),
            "quiet".into(),
            // Skip the crypto self-tests: ~0.7 s of every TCG boot (docs/boot.md).
            "cryptomgr.notests".into(),
            "reboot=t".into(),
            "i8042.noaux".into(),
            "i8042.nomux".into(),
            "i8042.dumbkbd".into(),
        ];
        if let Some(khz) = self.tsc_khz {
            args.push(format!("tsc_early_khz={khz}"));
        }
        args.push(format!("dough.vm={}", spec.id));
        args.extend(spec.kernel_args.iter().cloned());
        args.join(" ")
    }

    /// QEMU's arguments for `spec` (pure; tested below).
    pub fn args(&self, spec: &VmSpec) -> Vec<String> {
        let p = &spec.paths;
        let mem = format!("{}M", spec.memory_mib);
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        match spec.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg,thread=multi,tb-size=64", "-cpu", "max"]),
        }
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // QEMU's own seccomp filter: no obsolete syscalls, no privilege
        // changes, no spawning, no resource-control calls.
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        push(&["-m", &mem, "-smp", &spec.vcpus.to_string()]);
        let backend = match &spec.snapshot {
            // vhost-user needs guest RAM it can map: a shared memfd.
            None => format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            // RAM in a file: a snapshot then holds only the device state
            // (migration capability x-ignore-shared) …
            Some(SnapshotRole::Template { memory }) => format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
                memory.display()
            ),
            // … and a clone maps that file privately.
            Some(SnapshotRole::Clone { memory, .. }) => format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=off",
                memory.display()
            ),
        };
        push(&[
            "-object",
            &backend,
            "-M",
            if spec.acpi {
                "microvm,memory-backend=mem,rtc=on"
            } else {
                // QEMU then lists the devices as virtio_mmio.device=… on the
                // kernel command line.
                "microvm,memory-backend=mem,rtc=on,acpi=off"
            },
        ]);
        // The console is QEMU's stdout, kept bounded by Dough (process::spawn_console).
        push(&[
            "-chardev",
            "stdio,id=ser,signal=off",
            "-serial",
            "chardev:ser",
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", p.qmp().display()),
        ]);
        if spec.snapshot.is_none() {
            push(&[
                "-chardev",
                &format!("socket,id=vsc,path={}", p.vhost_user().display()),
                "-device",
                "vhost-user-vsock-device,chardev=vsc",
            ]);
        } else {
            // QEMU 7.2 cannot migrate vhost-user-vsock: the control protocol
            // runs over a virtio-serial port instead.
            push(&[
                "-device",
                "virtio-serial-device",
                "-chardev",
                &format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    p.agent_sock().display()
                ),
                "-device",
                "virtserialport,chardev=agent,name=dough.agent",
            ]);
        }
        push(&[
            "-drive",
            &format!(
                "id=base,file={},format=raw,if=none,readonly=on",
                spec.rootfs.display()
            ),
            "-device",
            "virtio-blk-device,drive=base",
            // werror=report: a host file system that is full gives the
            // guest an I/O error; QEMU's default would pause the VM.
            "-drive",
            &format!(
                "id=scratch,file={},format=raw,if=none,cache=unsafe,discard=unmap,werror=report,rerror=report",
                spec.scratch.display()
            ),
            "-device",
            "virtio-blk-device,drive=scratch",
        ]);
        for (i, layer) in spec.layers.iter().enumerate() {
            push(&[
                "-drive",
                &format!(
                    "id=layer{i},file={},format=raw,if=none,readonly=on",
                    layer.display()
                ),
                "-device",
                &format!("virtio-blk-device,drive=layer{i}"),
            ]);
        }
        if let Some(tap) = &spec.tap {
            let netdev = match spec.tap_fd {
                Some(fd) => format!("tap,id=n0,fd={fd}"),
                None => format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            };
            push(&[
                "-netdev",
                &netdev,
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={}", spec.mac),
            ]);
        }
        push(&["-kernel", &spec.kernel.display().to_string()]);
        if let Some(initrd) = &spec.initramfs {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        push(&["-append", &self.kernel_cmdline(spec)]);
        if let Some(SnapshotRole::Clone { .. }) = &spec.snapshot {
            push(&["-incoming", "defer"]);
        }
        a
    }
}

impl Qemu {
    /// The jail for `spec`: its run directory (writable), the image files
    /// and the two binaries (read-only); the VM's uid gets the run
    /// directory, the scratch disk and the guest-connection socket.
    fn build_jail(&self, spec: &VmSpec, js: &JailSpec) -> Result<Jail, VmmError> {
        let layout = cgroup::Layout::detect().map_err(VmmError::Confine)?;
        let p = &spec.paths;
        let ro = |path: &std::path::Path| Bind {
            path: path.to_path_buf(),
            writable: false,
        };
        let mut binds = vec![
            Bind {
                path: p.run_dir.clone(),
                writable: true,
            },
            ro(&spec.kernel),
            ro(&spec.rootfs),
            ro(&self.qemu),
            ro(&self.vhost_vsock),
        ];
        if let Some(i) = &spec.initramfs {
            binds.push(ro(i));
        }
        binds.extend(spec.layers.iter().map(|l| ro(l)));
        let mut js = js.clone();
        if let Some(SnapshotRole::Clone { memory, .. }) = &spec.snapshot {
            // Opened read-write (QEMU has no read-only private mapping in
            // 7.2), mapped privately: the file itself is never written.
            binds.push(Bind {
                path: memory.clone(),
                writable: true,
            });
            js.groups.push(crate::TEMPLATE_GID);
        }
        let jail = Jail::create(js.clone(), &layout, &spec.id, binds)?;
        let owned = [
            p.run_dir.clone(),
            spec.scratch.clone(),
            crate::vsock::guest_listener_path(&p.vsock_uds(), spec.guest_port),
        ];
        if let Err(e) = hand_over(&owned, js.uid, js.gid) {
            jail.destroy();
            return Err(e);
        }
        Ok(jail)
    }
}

impl Vmm for Qemu {
    fn backend(&self) -> Backend {
        Backend::Qemu
    }

    fn start<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<VmProcess, VmmError>> {
        Box::pin(async move {
            spec.validate()?;
            let p = &spec.paths;
            let jail = match &spec.jail {
                Some(js) => Some(self.build_jail(spec, js)?),
                None => None,
            };
            let fail = |jail: &Option<Jail>| {
                if let Some(j) = jail {
                    j.destroy();
                }
            };
            // A snapshot VM has no vsock (its control port is virtio-serial).
            let mut helpers = vec![];
            if spec.snapshot.is_none() {
                let mut vh = Command::new(&self.vhost_vsock);
                vh.arg("--guest-cid")
                    .arg(spec.guest_cid.to_string())
                    .arg("--socket")
                    .arg(p.vhost_user())
                    .arg("--uds-path")
                    .arg(p.vsock_uds());
                if let Some(j) = &jail {
                    j.apply(&mut vh);
                }
                let mut vsock = match spawn("vhost-device-vsock", vh, &p.vsock_log()) {
                    Ok(c) => c,
                    Err(e) => {
                        fail(&jail);
                        return Err(e);
                    }
                };
                if let Err(e) = wait_for_socket(
                    "vhost-device-vsock",
                    &mut vsock,
                    &p.vhost_user(),
                    &p.vsock_log(),
                    Duration::from_secs(5),
                )
                .await
                {
                    let _ = vsock.kill().await;
                    fail(&jail);
                    return Err(e);
                }
                helpers.push(("vhost-device-vsock".to_string(), vsock));
            }
            async fn kill_all(helpers: &mut [(String, tokio::process::Child)]) {
                for (_, c) in helpers.iter_mut() {
                    let _ = c.kill().await;
                }
            }
            let mut q = Command::new(&self.qemu);
            q.args(self.args(spec));
            if let Some(ns) = &spec.netns {
                if let Err(e) = crate::process::enter_netns(&mut q, ns) {
                    kill_all(&mut helpers).await;
                    fail(&jail);
                    return Err(e);
                }
            }
            if let Some(fd) = spec.tap_fd {
                crate::process::inherit_fd(&mut q, fd);
            }
            if let Some(SnapshotRole::Clone { state_fd, .. }) = &spec.snapshot {
                crate::process::inherit_fd(&mut q, *state_fd);
            }
            if let Some(j) = &jail {
                j.apply(&mut q);
            }
            let (vmm, console) =
                match spawn_console("qemu", q, &p.serial_log(), CONSOLE_LOG_CAP, &p.vmm_log()) {
                    Ok(c) => c,
                    Err(e) => {
                        kill_all(&mut helpers).await;
                        fail(&jail);
                        return Err(e);
                    }
                };
            Ok(VmProcess {
                backend: Backend::Qemu,
                paths: p.clone(),
                control: Control::Qmp(p.qmp()),
                vmm: VmmHandle::Child(vmm),
                helpers,
                jail,
                console,
                drains: vec![],
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VmPaths;

    fn spec(accel: Accel) -> VmSpec {
        VmSpec {
            id: "abc".into(),
            paths: VmPaths::new("/r"),
            kernel: "/i/vmlinux".into(),
            acpi: true,
            initramfs: Some("/i/initramfs.cpio".into()),
            rootfs: "/i/rootfs.ext4".into(),
            scratch: "/r/scratch.ext4".into(),
            layers: vec![],
            vcpus: 2,
            memory_mib: 512,
            accel,
            kernel_args: vec!["dough.port=1024".into()],
            tap: None,
            netns: None,
            mac: "06:00:ac:10:00:02".into(),
            tap_fd: None,
            guest_cid: 3,
            guest_port: 1024,
            jail: None,
            snapshot: None,
        }
    }

    fn q() -> Qemu {
        Qemu {
            qemu: "qemu".into(),
            vhost_vsock: "v".into(),
            tsc_khz: Some(2_445_432),
        }
    }

    /// Template and clone differ only where the notes say they must (RAM
    /// mapping, `-incoming`); both carry the control protocol on a
    /// virtio-serial port instead of the unmigratable vhost-user-vsock.
    #[test]
    fn snapshot_args_put_ram_in_a_file_and_control_on_virtio_serial() {
        let mut t = spec(Accel::Tcg);
        t.snapshot = Some(SnapshotRole::Template {
            memory: "/r/memory".into(),
        });
        let mut c = spec(Accel::Tcg);
        c.snapshot = Some(SnapshotRole::Clone {
            memory: "/t/memory".into(),
            state: "/t/state".into(),
            state_fd: 9,
        });
        let (ta, ca) = (q().args(&t).join(" "), q().args(&c).join(" "));
        assert!(
            ta.contains("memory-backend-file,id=mem,size=512M,mem-path=/r/memory,share=on"),
            "{ta}"
        );
        assert!(
            ca.contains("memory-backend-file,id=mem,size=512M,mem-path=/t/memory,share=off"),
            "{ca}"
        );
        for a in [&ta, &ca] {
            assert!(!a.contains("vhost-user-vsock"), "{a}");
            assert!(a.contains("-device virtio-serial-device"), "{a}");
            assert!(
                a.contains("virtserialport,chardev=agent,name=dough.agent"),
                "{a}"
            );
            assert!(
                a.contains("socket,id=agent,path=/r/agent.sock,server=on,wait=off"),
                "{a}"
            );
        }
        assert!(ca.ends_with("-incoming defer"), "{ca}");
        assert!(!ta.contains("-incoming"), "{ta}");
        // Same devices in the same order: migration matches them by order.
        let devices = |a: &str| {
            a.split(" -device ")
                .skip(1)
                .map(|d| d.split([',', ' ']).next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(devices(&ta), devices(&ca));
    }

    #[test]
    fn tcg_args_follow_the_measured_recipe() {
        let a = q().args(&spec(Accel::Tcg)).join(" ");
        assert!(
            a.contains("-accel tcg,thread=multi,tb-size=64 -cpu max"),
            "{a}"
        );
        assert!(
            a.contains("memory-backend-memfd,id=mem,size=512M,share=on"),
            "{a}"
        );
        assert!(
            a.contains("-M microvm,memory-backend=mem,rtc=on -chardev"),
            "{a}"
        );
        let mut no_acpi = spec(Accel::Tcg);
        no_acpi.acpi = false;
        let b = q().args(&no_acpi).join(" ");
        assert!(
            b.contains("-M microvm,memory-backend=mem,rtc=on,acpi=off "),
            "{b}"
        );
        assert!(a.contains("-smp 2"), "{a}");
        assert!(
            a.contains("file=/i/rootfs.ext4,format=raw,if=none,readonly=on"),
            "{a}"
        );
        assert!(a.contains("vhost-user-vsock-device,chardev=vsc"), "{a}");
        assert!(a.contains("unix:/r/qmp.sock,server=on,wait=off"), "{a}");
        assert!(
            a.contains("-chardev stdio,id=ser,signal=off -serial chardev:ser"),
            "{a}"
        );
        assert!(a.contains("-no-reboot"));
        assert!(!a.contains("virtio-net"), "no NIC without a TAP");
        let cmdline = q().kernel_cmdline(&spec(Accel::Tcg));
        assert!(cmdline.contains("tsc_early_khz=2445432"));
        assert!(cmdline.contains("dough.vm=abc"));
        assert!(cmdline.ends_with("dough.port=1024"));
    }

    #[test]
    fn kvm_and_tap() {
        let mut s = spec(Accel::Kvm);
        s.tap = Some("tap0".into());
        let a = q().args(&s).join(" ");
        assert!(a.contains("-accel kvm -cpu host"));
        assert!(a.contains("tap,id=n0,ifname=tap0,script=no,downscript=no"));
        assert!(a.contains("virtio-net-device,netdev=n0"));
    }

    /// Layers come after the base and scratch drives, read-only, lowest
    /// first: the guest finds layer i at /dev/vd(c+i).
    #[test]
    fn layers_follow_the_base_and_scratch_read_only() {
        let mut s = spec(Accel::Tcg);
        s.layers = vec!["/l/a.ext4".into(), "/l/b.ext4".into()];
        let a = q().args(&s).join(" ");
        let at = |needle: &str| a.find(needle).unwrap_or_else(|| panic!("{needle} in {a}"));
        assert!(at("drive=base") < at("drive=scratch"));
        assert!(
            at("drive=scratch") < at("id=layer0,file=/l/a.ext4,format=raw,if=none,readonly=on")
        );
        assert!(at("id=layer0,") < at("id=layer1,file=/l/b.ext4,format=raw,if=none,readonly=on"));
        assert!(at("virtio-blk-device,drive=layer0") < at("virtio-blk-device,drive=layer1"));
        s.layers = vec!["/l/x.ext4".into(); dough_layers_max() + 1];
        assert!(s.validate().unwrap_err().to_string().contains("layers"));
    }

    fn dough_layers_max() -> usize {
        crate::MAX_LAYERS
    }

    #[test]
    fn spec_validation_names_the_problem() {
        let mut s = spec(Accel::Tcg);
        s.vcpus = 0;
        assert!(s.validate().unwrap_err().to_string().contains("vcpus"));
        let mut s = spec(Accel::Tcg);
        s.memory_mib = 64;
        assert!(s.validate().unwrap_err().to_string().contains("memory"));
        let mut s = spec(Accel::Tcg);
        s.paths = VmPaths::new(format!("/{}", "x".repeat(120)));
        assert!(matches!(s.validate(), Err(VmmError::PathTooLong(_))));
    }
}
