#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs what the
# tests need when it is missing (nats-server; yamllint; promtool, from the
# prometheus package; chromium and chromium-driver for the browser test),
# lints the deployment files, then runs cargo's tests.
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
have yamllint || missing+=(yamllint)
have promtool || missing+=(prometheus)
have chromium || missing+=(chromium)
have chromedriver || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# Deployment files (config: .yamllint; Helm templates are not plain YAML).
yamllint --strict deploy charts

cargo test --workspace --all-targets --locked "$@"
