#!/bin/bash
# What one request costs each process of a server: CPU time, context switches and system calls
# per request, for the master and for its workers apart, under wrk with `Connection: close`
# (or keep-alive: --keep-alive).
#   benchmarks/cost_per_request.sh [--workers N] [--seconds S] [--connections C] [--keep-alive]
#                                  [--deferred] SERVER...
# SERVER: a hello_cluster policy (rr, none, reuseport, leastconn, sticky), raw-rr / raw-none
# (raw_rr_server: no framework) or nginx (`listen reuseport`, `return 200`, as policy_bench
# configures it). --deferred: every server's listener with TCP_DEFER_ACCEPT (nginx's `listen
# ... deferred`, hello_cluster and raw_rr_server --defer-accept 60: a connection reaches
# accept() once its request has arrived). Each is started in a session of its own (setsid, as
# policy_bench does), warmed up for a second, then measured with `perf stat -p` on the master and on its workers
# while wrk runs (as root: the syscall tracepoints are in tracefs; their names are x86-64's).
# The figures divide by the requests wrk completed: all system calls (raw_syscalls), then the
# ones named below. Whole seconds only (wrk's -d).
# Needs wrk and perf (apt-get install wrk linux-perf) and a release build:
#   meson setup build-release --buildtype=release
#   ninja -C build-release examples/hello_cluster benchmarks/raw_rr_server benchmarks/policy_bench
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
build=${BUILD:-$here/../build-release}
workers=2 seconds=4 connections=64 close=(-H "Connection: close") defer=()
servers=()
while (($#)); do
  case $1 in
    --workers) workers=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --keep-alive) close=(); shift ;;
    --deferred) defer=(--defer-accept 60); shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) servers+=("$1"); shift ;;
  esac
done
((${#servers[@]})) || servers=(rr raw-rr)
for tool in wrk perf; do
  command -v $tool >/dev/null || { echo "$tool not installed (apt-get install wrk linux-perf)" >&2; exit 1; }
done

calls=(epoll_wait epoll_ctl accept4 recvmsg sendmsg recvfrom sendto read write writev close newfstatat)
export LC_ALL=C  # perf's and awk's numbers without thousands separators of a locale
events=task-clock,context-switches,raw_syscalls:sys_enter
for c in "${calls[@]}"; do events+=,syscalls:sys_enter_$c; done
tmp=$(mktemp -d)
server_pid=
cleanup() {
  [[ -n $server_pid ]] && kill -KILL -- "-$server_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

for s in "${servers[@]}"; do
  # Below the ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, 32768 up by default):
  # the load client's TIME_WAIT sockets, tens of thousands after a run, sit there, and a
  # listener cannot bind a port one of them holds (EADDRINUSE; the server never started).
  read -r low high < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || { low=32768; high=60999; }
  if ((low > 21000)); then port=$((20000 + RANDOM % (low - 20000)))
  elif ((high < 64535)); then port=$((high + 1 + RANDOM % (65535 - high)))
  else echo "no port outside the ephemeral range $low-$high" >&2; exit 1
  fi
  case $s in
    raw-rr|raw-none) cmd=("$build/benchmarks/raw_rr_server" --workers "$workers" --port "$port" --policy "${s#raw-}" "${defer[@]}") ;;
    nginx)  # the configuration policy_bench compares against
      mkdir -p "$tmp/nginx"
      "$build/benchmarks/policy_bench" --nginx-conf "$port" --workers "$workers" --concurrency "$connections" \
        >"$tmp/nginx/nginx.conf"
      if ((${#defer[@]})); then sed -i 's/ reuseport;/ reuseport deferred;/' "$tmp/nginx/nginx.conf"; fi
      cmd=(nginx -c "$tmp/nginx/nginx.conf" -p "$tmp/nginx" -e "$tmp/nginx/error.log") ;;
    *) cmd=("$build/examples/hello_cluster" --workers "$workers" --port "$port" --policy "$s" "${defer[@]}") ;;
  esac
  setsid "${cmd[@]}" >"$tmp/out" 2>&1 &
  server_pid=$!
  ready() {
    kill -0 "$server_pid" 2>/dev/null || return 1
    if [[ $s == nginx ]]; then (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; else grep -q "listening on" "$tmp/out"; fi
  }
  failed() {
    echo "$s: $1" >&2
    cat "$tmp/out" "$tmp/nginx/error.log" 2>/dev/null >&2
    exit 1
  }
  for _ in $(seq 100); do ready && break; sleep 0.1; done
  ready || failed "did not start"
  sleep 0.2  # (nginx: its workers start after the master's socket listens)
  kids=$(pgrep -P "$server_pid" | paste -sd,) || true
  [[ -n $kids ]] || failed "no worker processes (the port taken? try again)"
  wrk -t2 -c"$connections" -d1s "${close[@]}" "http://127.0.0.1:$port/" >/dev/null  # warm-up
  # perf counts a little longer than wrk runs (an idle server adds next to nothing), so that
  # none of wrk's requests falls outside it.
  perf stat -e "$events" -p "$server_pid" -o "$tmp/master" -- sleep $((seconds + 1)) &
  p1=$!
  perf stat -e "$events" -p "$kids" -o "$tmp/workers" -- sleep $((seconds + 1)) &
  p2=$!
  sleep 0.3
  wrk -t2 -c"$connections" -d"${seconds}s" "${close[@]}" "http://127.0.0.1:$port/" >"$tmp/wrk" || failed "wrk failed"
  wait "$p1" || failed "perf stat failed on the master"
  wait "$p2" || failed "perf stat failed on the workers"
  kill -KILL -- "-$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
  requests=$(awk '/requests in/ {print $1}' "$tmp/wrk")
  [[ ${requests:-0} -gt 0 ]] || failed "wrk completed no request"
  if grep -qE "Socket errors|Non-2xx" "$tmp/wrk"; then echo "$s: wrk: $(grep -E "Socket errors|Non-2xx" "$tmp/wrk" | paste -sd' ')" >&2; fi
  echo "== $s: $workers workers, $connections connections$([[ ${#close[@]} == 0 ]] && echo ", keep-alive")$( ((${#defer[@]})) && echo ", deferred"), $requests requests in ${seconds} s ($(awk '/Requests\/sec/ {print $2}' "$tmp/wrk")/s)"
  for who in master workers; do
    awk -v r="$requests" -v who="$who" '
      { gsub(",", "", $1) }
      $1 !~ /^[0-9.]+$/ { next }  # <not counted>: a process with nothing to do (ReusePort'"'"'s master)
      /task-clock/ { cpu = $1 }
      /context-switches/ { cs = $1 }
      /raw_syscalls:sys_enter/ { all = $1; next }
      /syscalls:sys_enter_/ { if ($1 > 0) { n = $2; sub("syscalls:sys_enter_", "", n); line = line sprintf(" %s %.2f", n, $1 / r) } }
      END {
        printf "  %-8s CPU %6.1f us/request, context switches %.2f\n", who, cpu * 1000 / r, cs / r
        printf "           system calls per request %.2f, of which%s\n", all / r, line
      }' "$tmp/$who"
  done
done
