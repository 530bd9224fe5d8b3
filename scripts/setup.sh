#!/usr/bin/env bash
# Set up a fresh Debian 12 host for Dough, as root. Idempotent: a second run
# only checks, and rebuilds what changed.
#
#   apt packages  → QEMU, debootstrap, mkfs, lz4, cpio, nftables, iproute2,
#                   and a C toolchain for the minimal guest kernel
#   cargo tools   → vhost-device-vsock 0.3.0 (vsock for QEMU without /dev/vhost-vsock)
#   build         → dough (release) and the static guest agent
#   guest image   → dough image build (kernels, initramfs, rootfs; unchanged parts skipped;
#                   the minimal kernel compiles once, ~10-15 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "scripts/setup.sh must run as root (it installs packages and builds a rootfs)" >&2
  exit 1
fi
export PATH="${HOME:-/root}/.cargo/bin:$PATH"

PKGS=(qemu-system-x86 qemu-system-data seabios debootstrap cpio e2fsprogs lz4 nftables libnftables1 iproute2 kmod git curl ca-certificates
      build-essential flex bison bc libelf-dev libssl-dev xz-utils)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The image build looks up Debian's cloud kernel with apt-cache: it needs lists.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  say "apt: updating lists${missing[*]:+ and installing ${missing[*]}}"
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# VM networks need TUN (tap0) and a place for named namespaces.
[ -e /dev/net/tun ] || modprobe tun
mkdir -p /run/netns /run/dough

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
if ! vhost-device-vsock --version 2>/dev/null | grep -q '0\.3\.0'; then
  say "cargo install vhost-device-vsock 0.3.0 (about a minute)"
  cargo install vhost-device-vsock --version 0.3.0 --locked --quiet
fi

say "build dough (release)"
cargo build --release --locked --quiet
say "build the static guest agent"
./scripts/build-agent.sh --quiet

say "guest image"
./target/release/dough image build

say "doctor"
./target/release/dough doctor
