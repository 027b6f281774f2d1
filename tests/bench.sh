#!/usr/bin/env bash
# Builds catena in release mode and runs every benchmark binary of the
# catena-bench crate (tests/bench/src/bin/*.rs) against the release binaries,
# writing each one's output to tests/bench/results/<name>.txt.
#
#   ./tests/bench.sh            # all benchmarks
#   ./tests/bench.sh cni-add    # only these
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
results=tests/bench/results
mkdir -p "$results"

cargo build --release --workspace --bins
export CATENA_BIN_DIR="$root/target/release"

if [ "$#" -gt 0 ]; then
    names=("$@")
else
    names=()
    for src in tests/bench/src/bin/*.rs; do
        names+=("$(basename "$src" .rs)")
    done
fi

status=0
for name in "${names[@]}"; do
    bin="$CATENA_BIN_DIR/$name"
    [ -x "$bin" ] || { echo "bench: $bin not built" >&2; status=1; continue; }
    echo "== $name" >&2
    tmp=$(mktemp)
    if "$bin" >"$tmp"; then
        { echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -r) $(git rev-parse --short HEAD 2>/dev/null || echo '?')"; cat "$tmp"; } >"$results/$name.txt"
        cat "$results/$name.txt"
    else
        echo "bench: $name failed; $results/$name.txt left unchanged" >&2
        cat "$tmp" >&2
        status=1
    fi
    rm -f "$tmp"
done
exit $status
