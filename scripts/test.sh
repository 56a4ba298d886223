#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs what the
# tests need (nats-server) when it is missing, then runs cargo's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: $*"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

missing=()
have nats-server || missing+=(nats-server)
have openssl || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi

cargo test --workspace --all-targets --locked "$@"
