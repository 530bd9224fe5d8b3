#!/usr/bin/env bash
# All of Dough's checks and tests, as CI runs them (root, Debian 12).
# Tier 0 (unit), tier 1 (root/processes), tier 2 (real VMs under QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${HOME:-/root}/.cargo/bin:$PATH"

./scripts/setup.sh

printf '\n== cargo fmt --check\n' >&2
cargo fmt --all --check
printf '\n== cargo clippy\n' >&2
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
printf '\n== cargo test\n' >&2
# Two test threads: at most two VMs at once on these 2-core machines.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
RUST_TEST_THREADS=2 cargo test --workspace --release --locked 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
