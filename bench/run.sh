#!/usr/bin/env bash
# Runs roomgate's benchmark matrix: builds the release binaries, installs
# nats-server, nginx and wrk when missing, and writes BENCHMARKS.md.
#
#   bench/run.sh                 # the full matrix (takes a while; use an otherwise idle machine)
#   bench/run.sh --quick         # small sizes: a smoke test, report in target/bench/BENCHMARKS-quick.md
#   bench/run.sh --only fanout,rate --reps 3
#
# Every argument goes to `roomgate-bench matrix` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have nats-server || missing+=(nats-server)
have nginx || missing+=(nginx)
have wrk || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${missing[*]}"
    # The benchmark runs nginx with its own configuration; keep the package
    # from starting it as a system service while it installs.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        trap '$sudo rm -f "$policy"' EXIT
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# One generator process needs a file descriptor per client socket.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --locked -p roomgate -p roomgate-bench
target/release/roomgate-bench matrix "$@"
