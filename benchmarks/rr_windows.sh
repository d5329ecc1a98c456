#!/bin/bash
# rr_windows.sh: RoundRobin's window against the raw round-robin master, under wrk, in rounds.
#   benchmarks/rr_windows.sh [--workers N] [--connections C] [--rounds R] [--seconds S] [--windows "1 2 4 8"]
#                            [--own-session]
# Each round starts every server afresh (examples/hello_cluster --policy rr --window W for each
# window, and benchmarks/raw_rr_server), in an order that rotates from round to round, and
# loads it with `wrk -t2 -cC` and `Connection: close` for S seconds after a 1 s warm-up. It
# prints each round's requests/s, then each window's rate over raw-rr's in the same round:
# the median and the range over the rounds. On a noisy machine the rounds' interleaving is what
# makes the ratios comparable: the load of the moment falls on every server of a round alike.
# --own-session starts each server with setsid, as policy_bench and a service manager do. Where
# the kernel groups processes by session for scheduling (CONFIG_SCHED_AUTOGROUP; it is on where
# /proc/sys/kernel/sched_autogroup_enabled is 1), the server then shares the CPUs with wrk
# session against session, not thread against thread, and the ratios change
# (benchmarks/README.md, "The server's session").
# Binaries from build-release/ (BUILD=DIR to change); wrk must be installed.
set -euo pipefail

usage() { echo "rr_windows.sh: $1 (--help)" >&2; exit 64; }
workers=2 connections=64 rounds=6 seconds=3 windows="1 2 4 8" own_session=false
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    --workers|--connections|--rounds|--seconds|--windows) [ $# -ge 2 ] || usage "$1 wants a value" ;;&
    --workers) workers=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --windows) windows=$2; shift 2 ;;
    --own-session) own_session=true; shift ;;
    *) usage "unknown argument $1" ;;
  esac
done
for n in "$workers" "$connections" "$rounds" "$seconds"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || usage "counts are whole numbers from 1, not \`$n'"
done
seen=" "
for w in $windows; do
  [[ $w =~ ^[1-9][0-9]*$ ]] || usage "windows are whole numbers from 1, not \`$w'"
  [[ $seen == *" $w "* ]] && usage "window $w given twice"
  seen="$seen$w "
done

root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-$root/build-release}
hello=$build/examples/hello_cluster
raw=$build/benchmarks/raw_rr_server
command -v wrk >/dev/null || { echo "rr_windows.sh: wrk is not installed (apt-get install wrk)" >&2; exit 69; }
for b in "$hello" "$raw"; do
  [ -x "$b" ] || { echo "rr_windows.sh: no $b (ninja -C $build examples/hello_cluster benchmarks/raw_rr_server)" >&2; exit 69; }
done

names=()
for w in $windows; do names+=("w$w"); done
names+=(raw)
out=$(mktemp -d)
server=0
trap '[ "$server" -gt 0 ] && kill -TERM "$server" 2>/dev/null; rm -rf "$out"' EXIT

session=
$own_session && session=", each server in its own session (setsid; sched_autogroup_enabled: $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo unknown))"
echo "rr_windows: $workers workers, wrk -t2 -c$connections, Connection: close, ${seconds} s per server after 1 s, $rounds rounds$session"
echo "machine: $(nproc) CPUs ($(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1)); wrk runs on the same CPUs"
for round in $(seq 1 "$rounds"); do
  line="round $round:"
  for k in $(seq 0 $((${#names[@]} - 1))); do
    name=${names[$(((k + round) % ${#names[@]}))]}
    if [ "$name" = raw ]; then set -- "$raw" --workers "$workers" --port 0 --policy rr
    else set -- "$hello" --workers "$workers" --port 0 --policy rr --window "${name#w}"; fi
    # (setsid execs the server in place: a background job of this script leads no process
    # group, so setsid(2) needs no fork, and $! is the server's pid.)
    if $own_session; then setsid "$@" >"$out/server" 2>&1 &
    else "$@" >"$out/server" 2>&1 &
    fi
    server=$!
    port=
    for _ in $(seq 100); do
      port=$(sed -n 's/^listening on [^ ]*:\([0-9][0-9]*\)$/\1/p' "$out/server" | head -1)
      [ -n "$port" ] && break
      sleep 0.1
    done
    [ -n "$port" ] || { echo "rr_windows.sh: $name did not start:" >&2; cat "$out/server" >&2; exit 1; }
    url=http://127.0.0.1:$port/
    wrk -t2 -c"$connections" -d1s -H "Connection: close" "$url" >/dev/null 2>&1 || true
    rate=$(wrk -t2 -c"$connections" -d"${seconds}s" -H "Connection: close" "$url" | awk '/Requests\/sec/ {print $2}') || true
    kill -TERM "$server" 2>/dev/null || true  # (it may have died: its rate says so)
    wait "$server" 2>/dev/null || true
    server=0
    echo "$round $name ${rate:-0}" >>"$out/rates"
    line="$line $name ${rate:-0}"
  done
  echo "$line"
done

echo
echo "requests/s x raw-rr (same round): median (min-max over $rounds rounds)"
awk -v order="${names[*]}" '
  { rate[$1, $2] = $3; if ($1 > last) last = $1 }
  END {
    n = split(order, name, " ")
    for (i = 1; i < n; ++i) {
      m = 0
      for (r = 1; r <= last; ++r) if (rate[r, "raw"] > 0) v[++m] = rate[r, name[i]] / rate[r, "raw"]
      if (m == 0) { print "  no round has a raw-rr rate to compare with"; exit }
      for (a = 1; a <= m; ++a) for (b = a + 1; b <= m; ++b) if (v[b] < v[a]) { t = v[a]; v[a] = v[b]; v[b] = t }
      med = m % 2 ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
      printf "  window %-4s %.2f (%.2f-%.2f)\n", substr(name[i], 2), med, v[1], v[m]
    }
  }' "$out/rates"
