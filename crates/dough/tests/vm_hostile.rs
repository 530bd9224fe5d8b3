//! Tier 2 (real VMs): a hostile guest. A root task takes the agent's own
//! control connection (`pidfd_getfd` on PID 1, from perl: Debian's perl-base
//! is in every image) and writes what a compromised guest would. The host
//! must end the run with the reason docs/design.md promises, tear the VM
//! down, and leave nothing; and a second VM running beside it (`Beside`)
//! must finish normally.
mod common;

use common::*;

/// Takes PID 1's control socket and writes the bytes given in hex as its
/// argument; then the task sleeps, so only the host can end the run early.
const TAKE_SOCKET: &str = r#"
use strict;
my $hex = shift;
my $times = shift // 1;
opendir(my $d, "/proc/1/fd") or die "opendir: $!";
my ($fd) = sort { $a <=> $b } grep { /^\d+$/ && (readlink("/proc/1/fd/$_") // "") =~ /^socket:/ } readdir $d;
defined $fd or die "no socket in PID 1's fds";
my $pidfd = syscall(434, 1, 0);            # pidfd_open(1, 0)
die "pidfd_open: $!" if $pidfd < 0;
my $s = syscall(438, $pidfd, $fd + 0, 0);  # pidfd_getfd
die "pidfd_getfd: $!" if $s < 0;
open(my $h, ">&=", $s) or die "fdopen: $!";
binmode $h;
my $data = pack("H*", $hex);
print "writing ", length($data) * $times, " bytes to PID 1's fd $fd\n";
STDOUT->flush();
for (1 .. $times) {
    syswrite($h, $data) == length($data) or die "write: $!";
}
"#;

/// `dough run --root` of the hostile writer with `hex`, then `sleep 600`.
fn hostile(h: &Harness, hex: &str) -> (Option<i32>, String) {
    let out = h
        .cmd()
        .args(["run", "--root", "--", "sh", "-c"])
        .arg(format!("{} {hex} && sleep 600", perl(TAKE_SOCKET)))
        .output()
        .unwrap();
    let all = format!("{}\n{}", text(&out.stdout), text(&out.stderr));
    (out.status.code(), all)
}

/// A second VM, beside the hostile one: started first and awaited until
/// its command runs, so the hostile run begins while it is up; it then
/// sleeps 10 s in its own guest and must end normally, with its exit code
/// and its output whole.
struct Beside(std::process::Child);

impl Beside {
    fn start(h: &Harness) -> Beside {
        use std::io::BufRead;
        let mut c = h
            .cmd()
            .args([
                "run",
                "--",
                "sh",
                "-c",
                "echo up; sleep 10; echo done; exit 3",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "up\n");
        c.stdout = Some(out.into_inner());
        Beside(c)
    }

    fn finishes_normally(self) {
        let o = self.0.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
        assert_eq!(text(&o.stdout), "done\n");
    }
}

/// `perl -e '<script>'`, quoted for `sh -c`.
fn perl(script: &str) -> String {
    format!("perl -e '{}'", script.replace('\'', "'\\''"))
}

/// Garbage in a well-formed frame and a header announcing 4 GiB: both end
/// the run at once as a protocol error (the second before anything is
/// allocated for it); the task's `sleep 600` does not get to decide.
#[test]
fn garbage_and_an_oversized_header_on_the_control_socket_are_protocol_errors() {
    let h = Harness::new();
    let beside = Beside::start(&h);
    for (hex, cause) in [
        ("00000008ffffffffffffffff", "malformed message"),
        ("ffffffff", "exceeds the limit"),
    ] {
        let (code, all) = hostile(&h, hex);
        assert!(all.contains("writing "), "the writer ran: {all}");
        assert_ne!(code, Some(0), "{all}");
        assert!(all.contains("protocol error from the guest"), "{all}");
        assert!(all.contains(cause), "{cause}: {all}");
    }
    beside.finishes_normally();
    h.assert_clean();
}

/// A frame that never completes (64 KiB announced, 4 bytes sent): the
/// agent's heartbeats vanish into it, so the host, judging liveness by
/// whole frames, ends the run as heartbeat_lost.
#[test]
fn a_frame_that_never_completes_ends_as_a_lost_agent() {
    let h = Harness::new();
    let beside = Beside::start(&h);
    let (code, all) = hostile(&h, "0001000001020304");
    assert!(all.contains("writing 8 bytes"), "the writer ran: {all}");
    assert_ne!(code, Some(0), "{all}");
    assert!(all.contains("lost the guest agent: no heartbeat"), "{all}");
    beside.finishes_normally();
    h.assert_clean();
}

/// A flood of valid Output frames written straight onto the control
/// socket, past the agent's pacing (50 MB in 1000-byte frames): it is
/// output like any other — it reaches stdout, in full — or, when the
/// agent's own writes break into it, a protocol error; either way `dough
/// run`'s memory stays bounded while it flows and nothing is left.
#[test]
fn a_flood_of_valid_output_frames_is_bounded_output() {
    use std::io::Read;
    let h = Harness::new();
    let beside = Beside::start(&h);
    let frame = dough_proto::encode(&dough_proto::GuestMsg::Output {
        stream: dough_proto::Stream::Stdout,
        data: vec![b'x'; 1000],
    })
    .unwrap();
    const N: usize = 50_000;
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let mut child = h
        .cmd()
        .args(["run", "--root", "--", "sh", "-c"])
        .arg(format!("{} {hex} {N}", perl(TAKE_SOCKET)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let (mut xs, mut other, mut peak) = (0usize, vec![], 0);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for b in &buf[..n] {
            if *b == b'x' {
                xs += 1;
            } else {
                other.push(*b);
            }
        }
        peak = peak.max(peak_rss_kib(pid).unwrap_or(0));
    }
    let o = child.wait_with_output().unwrap();
    let err = text(&o.stderr);
    assert!(
        text(&other).contains(&format!("writing {} bytes", frame.len() * N)),
        "{}",
        text(&other)
    );
    eprintln!("{xs} flooded bytes reached stdout; dough's peak RSS {peak} KiB; {err}");
    // Two writers share one stream: the agent's heartbeats can land inside
    // a frame the task is part-way through writing (vsock sends a frame in
    // pieces when the host's credit is short), and then the host reads a
    // broken frame. Either way the run ends as docs/design.md says.
    if o.status.code() == Some(0) {
        assert_eq!(xs, N * 1000, "every flooded byte is output: {err}");
    } else {
        assert_eq!(o.status.code(), Some(125), "{err}");
        assert!(err.contains("protocol error from the guest"), "{err}");
    }
    assert!(peak < 40 << 10, "dough's peak RSS {peak} KiB for 50 MB");
    beside.finishes_normally();
    h.assert_clean();
}

/// Thousands of connections from the guest to the host's vsock ports (the
/// control port, whose listener is gone once the agent is connected, and
/// ports nobody serves), 900 at a time, non-blocking: none is accepted
/// (vhost-device-vsock answers none of them; each times out in the guest
/// after 2 s), and the control channel — the same vsock device — still
/// carries the task's end.
#[test]
fn thousands_of_vsock_connections_from_the_guest_get_nowhere() {
    let h = Harness::new();
    const DIAL: &str = r#"
use strict;
use Fcntl;
my ($rounds, $ok, $failed, $tries) = (shift, 0, 0, 0);
for my $r (1 .. $rounds) {
    my @socks;
    for my $i (1 .. 900) {
        socket(my $s, 40, 1, 0) or die "socket: $!";   # AF_VSOCK, SOCK_STREAM
        fcntl($s, F_SETFL, O_NONBLOCK) or die "fcntl: $!";
        my $port = (1024, 1025, 52, 80)[$i % 4];
        # struct sockaddr_vm: family, reserved, port, cid 2 (the host), zeros
        $tries++;
        if (connect($s, pack("S S L L C4", 40, 0, $port, 2, 0, 0, 0, 0))) { $ok++; next }
        push @socks, $s;
    }
    select(undef, undef, undef, 3);
    for my $s (@socks) {
        my $e = unpack("i", getsockopt($s, 1, 4));   # SOL_SOCKET, SO_ERROR
        my $peer = getpeername($s);
        if (!$e && $peer) { $ok++ } else { $failed++ }
        close $s;
    }
}
print "tries=$tries connected=$ok failed=$failed\n";
"#;
    let beside = Beside::start(&h);
    let out = h.run(&["--", "sh", "-c", &format!("{} 3", perl(DIAL))]);
    let so = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{so}\n{}", text(&out.stderr));
    assert_eq!(so, "tries=2700 connected=0 failed=2700\n");
    beside.finishes_normally();
    h.assert_clean();
}

/// A fork bomb as the task user: the guest is bounded by its own vCPUs and
/// memory and the VMM by its cgroup; the task ends at its timeout and the
/// VM is torn down; a second VM running beside it finishes normally.
#[test]
fn a_fork_bomb_is_contained_and_a_vm_beside_it_is_unharmed() {
    use std::io::BufRead;
    let h = Harness::new();
    let mut bomb = h
        .cmd()
        .args(["run", "--timeout", "20", "--", "bash", "-c"])
        .arg("echo bombing; b() { b | b & }; b; sleep 600")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(bomb.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "bombing\n");
    // Beside it, while it runs.
    let beside = h.run(&["--", "sh", "-c", "echo beside; exit 3"]);
    assert_eq!(beside.status.code(), Some(3), "{}", text(&beside.stderr));
    assert_eq!(text(&beside.stdout), "beside\n");
    let o = bomb.wait_with_output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(124), "{err}");
    assert!(err.contains("timed out after 20 s"), "{err}");
    h.assert_clean();
}
