#!/usr/bin/env bash
# Idempotent machine setup for building and testing catena on Debian 12 (root).
# A second run only checks and returns in seconds.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

APT_PACKAGES=(
  containernetworking-plugins # ptp, bridge, host-local, portmap, bandwidth, tuning: the real primaries
  iproute2 iptables nftables conntrack bpftool
  socat procps util-linux python3-yaml
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Real Helm (v4, as a shared library) for rendering and linting the chart in
# tests/e2e/tests/chart.rs and for manifests/render.py: no helm binary needed.
if ! python3 -c 'import helm_python' >/dev/null 2>&1; then
  log "installing helm-python-sdk 0.2.2 (pip)"
  pip_args=(install --quiet --disable-pip-version-check --root-user-action=ignore helm-python-sdk==0.2.2)
  # Debian's own python3 refuses system-wide pip installs (PEP 668) unless told.
  python3 -m pip "${pip_args[@]}" 2>/dev/null || python3 -m pip "${pip_args[@]}" --break-system-packages
fi

# rust-src is what `-Z build-std=core` compiles for the bpfel target.
if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rustup component rust-src"
  rustup component add rust-src
fi

# bpf-linker must link against rustc's own libLLVM (same LLVM major). We point
# LLVM_PREFIX at a directory of symlinks to the sysroot's real shared library.
sysroot=$(rustc --print sysroot)
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
real_lib=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*-rust-*' -type f | head -n1)
[ -n "$real_lib" ] || { log "cannot find rustc's libLLVM in $sysroot/lib"; exit 1; }
prefix="${CARGO_HOME:-$HOME/.cargo}/catena-llvm/$(basename "$real_lib")"
stamp="$prefix/.bpf-linker-installed"
if [ ! -f "$stamp" ] || ! command -v bpf-linker >/dev/null 2>&1; then
  log "building bpf-linker 0.13.0 against $(basename "$real_lib") (takes ~1-2 min)"
  mkdir -p "$prefix/lib"
  ln -sf "$real_lib" "$prefix/lib/libLLVM.so"
  ln -sf "$real_lib" "$prefix/lib/$(basename "$real_lib")"
  LLVM_PREFIX="$prefix" cargo install bpf-linker --version 0.13.0 --locked \
    --no-default-features --features "llvm-$llvm_major" --force -q
  touch "$stamp"
fi

# The CNI plugin and the agent must see the same bpffs.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
