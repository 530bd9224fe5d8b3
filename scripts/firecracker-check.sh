#!/usr/bin/env bash
# Optional local check, kept out of CI: run Dough's Firecracker backend for
# real, with the `firecracker` and `jailer` binaries found on PATH (or
# DOUGH_FIRECRACKER / DOUGH_JAILER). Needs root, /dev/kvm, and the guest
# image that scripts/setup.sh builds. See docs/firecracker.md.
#
# On a host where KVM boots guests it runs a task to completion (jailed and
# unjailed) and a warm pool of snapshot clones through `dough serve`.
# On a PVM host (this project's CI machines) a guest does not finish booting,
# so it runs every path that stops short of that, with `--accel kvm
# --allow-pvm`: the whole API sequence accepted (with and without a
# network), the jail built, tap0 attached by Firecracker inside the VM's
# namespace as the jail's uid, the vsock device listening, and stop and
# teardown leaving nothing behind. Each check prints `ok` or `FAIL`; the
# exit code is the number of failures (capped at 100), 2 if it cannot run.
#
#   scripts/firecracker-check.sh [--dough PATH]
set -uo pipefail
cd "$(dirname "$0")/.."

DOUGH=./target/release/dough
[ "${1:-}" = --dough ] && DOUGH=$2
fails=0
ok() { printf '  ok    %s\n' "$*"; }
bad() { printf '  FAIL  %s\n' "$*"; fails=$((fails + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

[ "$(id -u)" = 0 ] || { echo "firecracker-check: run as root" >&2; exit 2; }
[ -x "$DOUGH" ] || { echo "firecracker-check: no $DOUGH (cargo build --release)" >&2; exit 2; }
FC=${DOUGH_FIRECRACKER:-$(command -v firecracker || true)}
JAILER=${DOUGH_JAILER:-$(command -v jailer || true)}
if [ -z "$FC" ] || [ -z "$JAILER" ]; then
  echo "firecracker-check: needs firecracker and jailer on PATH (or DOUGH_FIRECRACKER, DOUGH_JAILER); skipped" >&2
  exit 2
fi
[ -e /dev/kvm ] || { echo "firecracker-check: no /dev/kvm; skipped" >&2; exit 2; }

IMAGE_DIR=${DOUGH_IMAGE_DIR:-${DOUGH_STATE_DIR:-/var/lib/dough}/images/default}
[ -f "$IMAGE_DIR/manifest.json" ] || { echo "firecracker-check: no guest image in $IMAGE_DIR (scripts/setup.sh)" >&2; exit 2; }
STATE=$(mktemp -d /var/tmp/dough-fc-check.XXXXXX)
export DOUGH_STATE_DIR=$STATE DOUGH_IMAGE_DIR=$IMAGE_DIR DOUGH_FIRECRACKER=$FC DOUGH_JAILER=$JAILER
SERVE_PID=
cleanup() {
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
  "$DOUGH" gc >/dev/null 2>&1
  rm -rf "$STATE"
}
trap cleanup EXIT

echo "firecracker: $FC ($("$FC" --version 2>/dev/null | head -n 1))"
echo "jailer:      $JAILER"
if "$DOUGH" doctor 2>/dev/null | grep -q '^  kvm: usable'; then
  MODE=kvm; ACCEL=(--accel kvm)
  echo "KVM boots guests here: full runs"
else
  MODE=pvm; ACCEL=(--accel kvm --allow-pvm)
  echo "KVM does not boot a stock guest here (PVM): paths up to the guest's boot, with --allow-pvm"
fi

# What a Dough VM leaves while it lives, and must not leave after it.
leftovers() {
  {
    ip netns list 2>/dev/null | grep -o '^dough-[0-9a-f]*'
    ls "$STATE/vms" "$STATE/jails" "$STATE/uids" 2>/dev/null | grep -v '^$' | grep -v ':$'
    pgrep -f -- "--exec-file $FC" 2>/dev/null | sed 's/^/jailer pid /'
    pgrep -x firecracker 2>/dev/null | while read -r p; do
      [ "$(readlink /proc/"$p"/cwd 2>/dev/null | grep -c "$STATE")" = 1 ] && echo "firecracker pid $p"
    done
    find /sys/fs/cgroup -maxdepth 3 -path '*dough/*' -type d 2>/dev/null |
      grep -f <(ls "$STATE/vms" 2>/dev/null; echo NONE-XXXX) || true
  } | sort -u
}

# While a VM of this state dir is up: where its Firecracker runs and what it
# holds. $1: with a network (1/0), $2: jailed (1/0).
inspect_live() {
  local net=$1 jailed=$2 id="" pid="" t=0
  while [ -z "$id" ] && [ $t -lt 100 ]; do
    id=$(ls "$STATE/vms" 2>/dev/null | head -n 1); sleep 0.1; t=$((t + 1))
  done
  [ -n "$id" ] || { bad "a VM run directory appeared"; return; }
  t=0
  while [ -z "$pid" ] && [ $t -lt 100 ]; do
    if [ "$jailed" = 1 ]; then
      pid=$(cat "$STATE/jails/$id/firecracker/$id/root/firecracker.pid" 2>/dev/null)
    else
      pid=$(pgrep -f -- "--api-sock $STATE/vms/$id/" | head -n 1)
    fi
    [ -n "$pid" ] || sleep 0.1; t=$((t + 1))
  done
  [ -n "$pid" ] && [ -d /proc/"$pid" ] || { bad "firecracker of VM $id is running"; return; }
  ok "firecracker of VM $id is running (pid $pid)"
  # Give the API sequence time to finish (InstanceStart is its last call).
  sleep 2
  local uid; uid=$(awk '/^Uid:/ {print $2}' /proc/"$pid"/status)
  if [ "$jailed" = 1 ]; then
    check "jailed: runs as the VM's uid ($uid), not root" test -n "$uid" -a "$uid" != 0
    check "jailed: its root is the VM's chroot (its kernel there, no host /etc/passwd)" \
      sh -c "test -e /proc/$pid/root/vmlinux && test ! -e /proc/$pid/root/etc/passwd"
    check "jailed: the vsock device listens in the chroot" test -S "$STATE/jails/$id/firecracker/$id/root/vsock.sock"
  else
    check "unjailed: the vsock device listens in the run dir" test -S "$STATE/vms/$id/vm/vsock.sock"
  fi
  if [ "$net" = 1 ]; then
    check "runs in the VM's namespace dough-$id" test "$(stat -L -c %i /proc/"$pid"/ns/net)" = "$(stat -L -c %i /run/netns/dough-"$id")"
    check "holds tap0 attached (fdinfo iff: tap0)" sh -c "cat /proc/$pid/fdinfo/* 2>/dev/null | grep -q '^iff:[[:space:]]*tap0'"
    check "dough holds no tap0 of its own" sh -c "! cat /proc/$DOUGH_RUN_PID/fdinfo/* 2>/dev/null | grep -q '^iff:'"
  fi
}

# A run that cannot finish booting here: the API sequence must be accepted
# (an API error ends the run at once with "firecracker api"), the VM must
# come up as inspect_live sees it, then the boot timeout ends it.
run_partial() {
  local name=$1 net=$2 jailed=$3; shift 3
  echo "== $name"
  local err; err=$(mktemp)
  "$DOUGH" run --backend firecracker "${ACCEL[@]}" --boot-timeout 8 "$@" -- true 2>"$err" &
  DOUGH_RUN_PID=$!
  inspect_live "$net" "$jailed"
  wait "$DOUGH_RUN_PID"; local rc=$?
  if grep -q 'firecracker api' "$err"; then
    bad "API sequence accepted: $(grep -m1 'firecracker api' "$err")"
  else
    ok "API sequence accepted (the run ended by the boot timeout, rc $rc)"
  fi
  check "the run ended at the boot timeout, not earlier" grep -q 'boot timeout' "$err"
  local left; left=$(leftovers)
  if [ -z "$left" ]; then ok "nothing left behind (namespace, run dir, jail, uid lease, process, cgroup)"
  else bad "left behind: $(echo "$left" | tr '\n' ' ')"; fi
  rm -f "$err"
}

run_full() {
  local name=$1; shift
  echo "== $name"
  local out; out=$("$DOUGH" run --backend firecracker "${ACCEL[@]}" "$@" -- sh -c 'uname -r; ip -o link | wc -l' 2>&1)
  check "a task ran to completion ($(echo "$out" | head -n 1))" test $? = 0
  local left; left=$(leftovers)
  if [ -z "$left" ]; then ok "nothing left behind"; else bad "left behind: $(echo "$left" | tr '\n' ' ')"; fi
}

if [ "$MODE" = pvm ]; then
  run_partial "jailed, with a network" 1 1
  run_partial "jailed, no network" 0 1 --no-network
  run_partial "unjailed, with a network" 1 0 --no-confine
else
  run_full "jailed, with a network"
  run_full "jailed, no network" --no-network
  run_full "unjailed, with a network" --no-confine
  echo "== warm pool of snapshot clones (dough serve --pool-size 1)"
  port=$((20000 + RANDOM % 10000))
  "$DOUGH" serve --listen 127.0.0.1:$port --pool-size 1 >"$STATE/serve.log" 2>&1 &
  SERVE_PID=$!
  # The client finds the daemon through $STATE/api-url.
  cloned() { "$DOUGH" ls --pools 2>/dev/null | awk 'NR > 1 && $8 == "clone" && $4 >= 1 { f = 1 } END { exit !f }'; }
  t=0
  until cloned || [ $t -ge 180 ]; do sleep 1; t=$((t + 1)); done
  check "the pool refills with clones of a template and holds an idle one" cloned
  check "a task on a clone ran to completion" "$DOUGH" submit --wait --vcpus 1 --memory 512 -- true
  kill "$SERVE_PID"; wait "$SERVE_PID"; SERVE_PID=
  left=$(leftovers)
  if [ -z "$left" ]; then ok "nothing left behind after serve stopped"; else bad "left behind: $left"; fi
fi

echo "firecracker-check: $fails failed"
exit $((fails > 100 ? 100 : fails))
