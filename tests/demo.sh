#!/usr/bin/env bash
# The demo: a throwaway "node" (a network namespace) with pods wired by the real
# ptp CNI plugin, catena chained after it, a ClusterIP Service served by
# catena-agent in standalone mode, and requests through the Service. Everything
# is torn down at the end. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo build --release --workspace --bins --quiet
CATENA_BIN_DIR="$PWD/target/release" exec target/release/catena-demo "$@"
