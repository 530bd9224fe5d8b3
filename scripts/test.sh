#!/usr/bin/env bash
# All of Dough's checks and tests, as CI runs them (root, Debian 12).
# Tier 0 (unit), tier 1 (root/processes), tier 2 (real VMs under QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${HOME:-/root}/.cargo/bin:$PATH"

./scripts/setup.sh

# Test-only packages: lighttpd serves `git http-backend` to the VMs in the
# repository tests. Installed without starting its service (a temporary
# policy-rc.d where the machine has none); the tests run their own copy in
# a test namespace.
if ! command -v lighttpd >/dev/null && [ ! -x /usr/sbin/lighttpd ]; then
  printf '\n== apt: lighttpd (test-only)\n' >&2
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lighttpd >/dev/null
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

# Test-only: busybox-static is the userland of the OCI images
# crates/dough/tests/vm_oci.rs writes and (its nslookup) the network tests'
# resolver; docker-registry (the CNCF distribution registry) is the registry
# vm_oci pulls from; dnsmasq-base is the network tests' upstream DNS server
# (crates/dough-net/tests/world). No service is started (policy-rc.d, as
# above); the tests run their own.
if ! dpkg -s busybox-static >/dev/null 2>&1 || ! command -v docker-registry >/dev/null || [ ! -x /usr/sbin/dnsmasq ]; then
  printf '\n== apt: busybox-static, docker-registry, dnsmasq-base (test-only)\n' >&2
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static docker-registry dnsmasq-base >/dev/null
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

# Test-only: PostgreSQL, the store of the cluster tests
# (crates/dough/tests/cluster.rs, store_pg.rs). Its service is not started
# (policy-rc.d, as above); each test runs a cluster of its own with initdb
# and pg_ctl as the postgres user.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v psql >/dev/null; then
  printf '\n== apt: postgresql (test-only)\n' >&2
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

# Test-only: the Python client's tests (clients/python/tests/run.sh) run
# pytest in a venv that sees Debian's httpx, pytest and Selenium; the client
# itself is installed from the tree. The dashboard's test drives Debian's
# Chromium headless through chromedriver.
py_pkgs=(python3-httpx python3-pytest python3-venv python3-wheel python3-setuptools python3-selenium chromium chromium-driver)
if ! dpkg -s "${py_pkgs[@]}" >/dev/null 2>&1; then
  printf '\n== apt: %s (test-only)\n' "${py_pkgs[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${py_pkgs[@]}" >/dev/null
fi

# The image of the end-to-end agent test (crates/dough/tests/vm_claude.rs):
# Claude Code from the npm registry, ~5 minutes under TCG the first time,
# then cached by content (its layers are keyed by the steps and the base).
printf '\n== agent image: claude-code\n' >&2
./target/release/dough image build --agent claude-code

printf '\n== cargo fmt --check\n' >&2
cargo fmt --all --check
printf '\n== cargo clippy\n' >&2
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
printf '\n== cargo test\n' >&2
# Two test threads: at most two VMs at once on these 2-core machines.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
RUST_TEST_THREADS=2 cargo test --workspace --release --locked 2>&1 | tee "$log"
printf '\n== python client and dashboard (pytest, Chromium; real daemon and VMs; screenshots in target/artifacts/dashboard)\n' >&2
pylog=$(mktemp)
trap 'rm -f "$log" "$pylog"' EXIT
clients/python/tests/run.sh 2>&1 | tee "$pylog"
# One closing line over every test binary (cargo prints one per binary) and
# pytest's summary ("8 passed in 36.54s").
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "rust tests: %d passed, %d failed\n", p, f }' "$log"
tail -n 1 "$pylog" | sed 's/^/python client tests: /'
