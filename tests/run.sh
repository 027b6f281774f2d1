#!/usr/bin/env bash
# The test command: sets the machine up (idempotent), checks formatting and
# lints, builds every binary and runs every test (unit, datapath, plugin, lab
# and end-to-end through real reference CNI plugins). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup.sh
# A one-shot build gains nothing from incremental caches, which cost GBs of disk.
export CARGO_INCREMENTAL=0
step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo build (all binaries: catena-agent, catena-cni, catena, catena-demo)"
cargo build --workspace --bins --quiet

step "cargo test"
# End-to-end tests make their own network namespaces and bpffs dirs with unique
# names, so they run in parallel; CATENA_BIN_DIR points them at the binaries.
export CATENA_BIN_DIR="$PWD/target/debug"
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e

leftover=$(ip netns list | grep -c '^catena-' || true)
if [ "$leftover" -ne 0 ]; then
  echo "FAIL: tests left $leftover network namespace(s) behind:" >&2
  ip netns list | grep '^catena-' >&2
  exit 1
fi
exit "$status"
