#!/usr/bin/env bash
# Set up everything bpfilter needs on a Debian 12 machine (idempotent), then run one job:
#   scripts/dev.sh demo    load a tiny filter in a throwaway network namespace and show it working
#   scripts/dev.sh test    run the full test suite (unit, kernel, e2e)
#   scripts/dev.sh setup   only install
# Must run as root: it installs packages, and the kernel tests load eBPF programs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

job=${1:-test}
shift || true

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/dev.sh: run as root (installs packages; loads eBPF programs)" >&2
    exit 1
fi

# Debian packages: ip/tc, the iptables and nftables reference implementations, bpftool,
# llvm-objdump-19 (cpu v4 decoding, an independent check of the encoder), ping, ipset (the
# reference for `-m set`).
apt_packages=(iproute2 iptables nftables bpftool llvm-19 iputils-ping python3-venv kmod time ipset)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# bpffs is not mounted on a fresh machine.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$py" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
    echo "== pip install -e .[dev]"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

case "$job" in
    setup) ;;
    demo) exec .venv/bin/bpfilter demo "$@" ;;
    test) exec .venv/bin/python -m pytest -q "$@" ;;
    *) echo "scripts/dev.sh: unknown job '$job' (demo, test, setup)" >&2; exit 2 ;;
esac
