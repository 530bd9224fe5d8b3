//! Tier 2 (real VMs): a hostile guest. A root task takes the agent's own
//! control connection (`pidfd_getfd` on PID 1, from perl: Debian's perl-base
//! is in every image) and writes what a compromised guest would. The host
//! must end the run with the reason docs/design.md promises, tear the VM
//! down, and leave nothing.
mod common;

use common::*;

/// Takes PID 1's control socket and writes the bytes given in hex as its
/// argument; then the task sleeps, so only the host can end the run early.
const TAKE_SOCKET: &str = r#"
use strict;
my $hex = shift;
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
print "writing ", length($data), " bytes to PID 1's fd $fd\n";
STDOUT->flush();
syswrite($h, $data) == length($data) or die "write: $!";
"#;

/// `dough run --root` of the hostile writer with `hex`, then `sleep 600`.
fn hostile(h: &Harness, hex: &str) -> (Option<i32>, String) {
    let out = h
        .cmd()
        .args(["run", "--root", "--", "sh", "-c"])
        .arg(format!(
            "perl -e '{}' {hex} && sleep 600",
            TAKE_SOCKET.replace('\'', "'\\''")
        ))
        .output()
        .unwrap();
    let all = format!("{}\n{}", text(&out.stdout), text(&out.stderr));
    (out.status.code(), all)
}

/// Garbage in a well-formed frame and a header announcing 4 GiB: both end
/// the run at once as a protocol error (the second before anything is
/// allocated for it); the task's `sleep 600` does not get to decide.
#[test]
fn garbage_and_an_oversized_header_on_the_control_socket_are_protocol_errors() {
    let h = Harness::new();
    for (hex, cause) in [
        ("00000008ffffffffffffffff", "malformed message"),
        ("ffffffff", "exceeds the limit"),
    ] {
        let (code, all) = hostile(&h, hex);
        assert!(all.contains("writing "), "the writer ran: {all}");
        assert_ne!(code, Some(0), "{all}");
        assert!(all.contains("protocol error from the guest"), "{all}");
        assert!(all.contains(cause), "{cause}: {all}");
        h.assert_clean();
    }
}

/// A frame that never completes (64 KiB announced, 4 bytes sent): the
/// agent's heartbeats vanish into it, so the host, judging liveness by
/// whole frames, ends the run as heartbeat_lost.
#[test]
fn a_frame_that_never_completes_ends_as_a_lost_agent() {
    let h = Harness::new();
    let (code, all) = hostile(&h, "0001000001020304");
    assert!(all.contains("writing 8 bytes"), "the writer ran: {all}");
    assert_ne!(code, Some(0), "{all}");
    assert!(all.contains("lost the guest agent: no heartbeat"), "{all}");
    h.assert_clean();
}
