#!/usr/bin/env bash
# Counts the instructions roomgate runs in user space for one unit of each
# kind of work, under valgrind's callgrind:
#
#   - per proxied request, wrk with 8 connections against the benchmark's
#     upstream; and, as references, nginx's and that of
#     `roomgate-bench hyper-floor` (hyper's server and client with nothing
#     between them);
#   - per WebSocket connection: connect, upgrade, join and close, with NATS
#     on, so the four events of each connection are published;
#   - per delivery of a one-room fan-out to 1,000 members;
#   - per delivery to a room of 100 at 20 messages a second, where every
#     message is a write of its own to each member (chat-like traffic).
#
#   bench/instructions.sh                       # the roomgate built from this tree
#   bench/instructions.sh /path/to/roomgate     # another build, to compare
#
# Timings on a shared machine move with its load; these counts do not, so
# they show what a change to the code itself did. They leave out the kernel
# (more than half of the CPU in every scenario) and the cost of cache
# misses. Start-up and shutdown cancel out: HTTP counters are zeroed after a
# warm-up, and the other figures are the difference between two runs that
# differ only in size. Under callgrind everything runs 20 to 50 times
# slower, so the fan-out batches more than it would at full speed.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
missing=()
have valgrind || missing+=(valgrind)
have wrk || missing+=(wrk)
have curl || missing+=(curl)
have nats-server || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
nginx=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --locked -p roomgate -p roomgate-bench
bin=$PWD/target/release
roomgate=$(realpath "${1:-$bin/roomgate}")
work=$(mktemp -d)
# Stops whatever this script still runs in the background (only its own
# jobs: those already waited for are not in the list any more).
cleanup() {
    local running
    running=$(jobs -p)
    [ -z "$running" ] || kill $running 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The instruction total of one callgrind output file.
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'; }

# A loopback port nothing listens on.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
}

# Waits (bounded) until `url` answers.
wait_for() {
    for _ in $(seq 1 150); do
        curl -s -o /dev/null "$1" && return 0
        sleep 0.2
    done
    echo "no answer from $1" >&2
    return 1
}

# Prints the instructions per request of the proxy just started under
# callgrind as `pid`, writing to `out`, serving `url`; then stops it.
per_request() {
    local pid=$1 out=$2 url=$3 requests
    wait_for "$url"
    wrk -t1 -c8 -d2s "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    requests=$(wrk -t1 -c8 -d5s "$url" | awk '/requests in/ { print $1 }')
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "$(($(total "$out.1") / requests)) instructions per request"
}

http() {
    local up=$(free_port) port=$(free_port) admin=$(free_port) nginx_port=$(free_port)
    local floor_port=$(free_port)
    "$bin/roomgate-bench" upstream --listen "127.0.0.1:$up" &
    cat >"$work/roomgate.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[admin]
listen = "127.0.0.1:$admin"
[upstream]
url = "http://127.0.0.1:$up"
[nats]
enabled = false
[log]
level = "warn"
EOF
    valgrind --tool=callgrind --callgrind-out-file="$work/http-roomgate" \
        "$roomgate" --config "$work/roomgate.toml" 2>"$work/roomgate.log" &
    echo -n "HTTP proxy, roomgate:    "
    per_request $! "$work/http-roomgate" "http://127.0.0.1:$port/"
    valgrind --tool=callgrind --callgrind-out-file="$work/http-floor" \
        "$bin/roomgate-bench" hyper-floor --listen "127.0.0.1:$floor_port" \
        --upstream "127.0.0.1:$up" 2>"$work/floor.log" &
    echo -n "HTTP proxy, hyper-floor: "
    per_request $! "$work/http-floor" "http://127.0.0.1:$floor_port/"
    [ -x "$nginx" ] || return 0
    mkdir -p "$work/nginx/logs"
    cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
error_log $work/nginx/logs/error.log;
pid $work/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    upstream up { server 127.0.0.1:$up; keepalive 64; }
    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
            proxy_buffering off;
        }
    }
}
EOF
    valgrind --tool=callgrind --callgrind-out-file="$work/http-nginx" \
        "$nginx" -p "$work/nginx" -c "$work/nginx/nginx.conf" 2>"$work/nginx.log" &
    echo -n "HTTP proxy, nginx:       "
    per_request $! "$work/http-nginx" "http://127.0.0.1:$nginx_port/"
}

# Runs `roomgate-bench matrix` with roomgate under callgrind and prints the
# instructions of the run's gateway (its largest output file).
matrix_run() {
    local name=$1
    shift
    cat >"$work/roomgate-cg" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/$name.%p $roomgate "\$@"
EOF
    chmod +x "$work/roomgate-cg"
    "$bin/roomgate-bench" matrix --reps 1 --roomgate "$work/roomgate-cg" \
        --report "$work/$name.md" --jsonl "$work/$name.jsonl" "$@" >"$work/$name.log" 2>&1
    local best=0 n
    for f in "$work/$name".*[0-9]; do
        n=$(total "$f")
        [ "$n" -gt "$best" ] && best=$n
    done
    echo "$best"
}

idle() {
    local small large
    small=$(matrix_run idle-1000 --only idle --idle 1000)
    large=$(matrix_run idle-3000 --only idle --idle 3000)
    echo "WebSocket connection (connect, upgrade, join, close): $(((large - small) / 2000)) instructions"
}

fanout() {
    local small large
    small=$(matrix_run fan-100k --only fanout --fanout 1000 --fanout-deliveries 100000)
    large=$(matrix_run fan-300k --only fanout --fanout 1000 --fanout-deliveries 300000)
    echo "Fan-out 1 x 1,000: $(((large - small) / 200000)) instructions per delivery"
}

# At this rate no burst forms: each message wakes each member's writer and
# leaves in a write of its own, so what a wake-up costs is all per delivery.
# The runs differ by 4 s: 80 messages, 8,000 deliveries.
paced() {
    local small large
    small=$(matrix_run paced-2s --only rate --fanout 100 --rate 20 --rate-secs 2)
    large=$(matrix_run paced-6s --only rate --fanout 100 --rate 20 --rate-secs 6)
    echo "Fan-out 1 x 100 at 20 messages/s: $(((large - small) / 8000)) instructions per delivery"
}

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ $# -eq 0 ]; then
    echo "roomgate $(git describe --always --dirty 2>/dev/null || echo '?'): user-space instructions (callgrind)"
else
    echo "$roomgate: user-space instructions (callgrind)"
fi
http
idle
fanout
paced
