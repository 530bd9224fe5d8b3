#!/usr/bin/env bash
# Build dough-agent as a static binary for the guest (glibc, crt-static).
# Output: target/x86_64-unknown-linux-gnu/release/dough-agent
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p dough-agent --target x86_64-unknown-linux-gnu "$@"
