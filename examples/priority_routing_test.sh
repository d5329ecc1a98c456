#!/usr/bin/env bash
# Checks examples/priority_routing as a client would, in both modes: clients bound to 127.0.0.2
# are handled by the special worker, clients from 127.0.0.1 by the normal one; connections reset
# by their client before the worker answers do not end a worker; SIGTERM stops it with 0 and a
# worker's death with 1, neither flooding the log while clients keep connecting; a second one on
# a busy port names its worker's error; bad arguments give a message and exit 2. Loopback only;
# every wait is bounded. Needs bash and python3 (for clients bound to a source address).
#   priority_routing_test.sh path/to/priority_routing
set -uo pipefail
exe=$1
[ -x "$exe" ] || { echo "priority_routing: not built here, skipped"; exit 77; }
command -v python3 >/dev/null || { echo "priority_routing: no python3, skipped"; exit 77; }
passed=0
failed=0
check() {  # check NAME CONDITION...
  local name=$1
  shift
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $name"; fi
}

# ---- bad input: a clear message and exit 2 ----
bad_input() {  # bad_input EXPECTED_WORDS ARGS...
  local words=$1
  shift
  local out rc
  out=$(timeout 10 "$exe" "$@" 2>&1 >/dev/null)
  rc=$?
  [ "$rc" -eq 2 ] && grep -q -- "$words" <<<"$out" || { echo "rc=$rc: $out"; return 1; }
}
check "no --port" bad_input "--port is required"
check "port out of range" bad_input "out of range" --port 70000
check "port not a number" bad_input "not a number" --port 80x
check "unknown argument" bad_input "unknown argument" --port 0 --bogus
check "missing value" bad_input "needs a value" --port
check "bad host" bad_input "not an IP address" --port 0 --host nowhere
check "bad special" bad_input "not an IP address" --port 0 --special nowhere
check "bad mode" bad_input "expected send or dispatch" --port 0 --mode fork
check "bad grace" bad_input "expected whole seconds" --port 0 --grace -1

# client SOURCE: connects from SOURCE to 127.0.0.1:$port and prints the answer.
client() {
  timeout 10 python3 - "$1" "$port" <<'PY'
import socket, sys
src, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.bind((src, 0))
s.connect(("127.0.0.1", port))
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
PY
}

# resets N SOURCE...: N rounds of one connection from each SOURCE to 127.0.0.1:$port, each
# closed at once with a RST (a connection closed in transit); one Python for all of them.
resets() {
  timeout 20 python3 - "$port" "$@" <<'PY'
import socket, struct, sys
port, rounds, sources = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
for _ in range(rounds):
    for src in sources:
        s = socket.socket()
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
PY
}

# hammer SOURCE: connects from SOURCE again and again, reading each answer to its end, until a
# connection is refused (or 20 s); one line per connection: the answer, (closed) or (reset).
hammer() {
  timeout 25 python3 - "$1" "$port" <<'PY'
import socket, sys, time
src, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    s = socket.socket()
    s.bind((src, 0))
    try:
        s.connect(("127.0.0.1", port))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        line = data.decode().strip() or "(closed)"
    except ConnectionRefusedError:
        break
    except OSError:
        line = "(reset)"
    print(line, flush=True)
    s.close()
PY
}

# start MODE [PREFIX...]: starts it (after PREFIX, e.g. a ulimit) on a free port, with
# --grace $grace when grace is set; sets server, port, out, err. Returns 1 (a failure, the server killed) if it does not print its port.
start() {
  local mode=$1
  shift
  out=$(mktemp)
  err=$(mktemp)
  "$@" "$exe" --port 0 --special 127.0.0.2 --mode "$mode" ${grace:+--grace "$grace"} >"$out" 2>"$err" &
  server=$!
  for _ in $(seq 300); do
    grep -q '^listening on ' "$out" && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.05
  done
  port=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$out")
  if [ -z "$port" ] || [ "$port" = 0 ]; then
    echo "priority_routing --mode $mode did not start: $(cat "$out" "$err")"
    kill -KILL "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    failed=$((failed + 1))
    rm -f "$out" "$err"
    return 1
  fi
}

# finish: waits (20 s at most, then SIGKILL) for the server to exit; sets rc.
finish() {
  timeout 20 tail -s 0.05 --pid="$server" -f /dev/null
  if kill -0 "$server" 2>/dev/null; then
    echo "priority_routing did not exit within 20 s: killed"
    kill -KILL "$server"
  fi
  wait "$server"
  rc=$?
}

# until_lines FILE N: waits (10 s at most) until FILE has N lines.
until_lines() {
  for _ in $(seq 200); do
    [ "$(grep -c . "$1")" -ge "$2" ] && return
    sleep 0.05
  done
}

run_mode() {
  local mode=$1 i reply
  start "$mode" || return
  local normal=0 special=0 wrong=0
  for i in 1 2 3 4 5; do
    reply=$(client 127.0.0.1)
    [ "$reply" = "handled by normal priority" ] && normal=$((normal + 1)) || { wrong=$((wrong + 1)); echo "127.0.0.1 got: $reply"; }
    reply=$(client 127.0.0.2)
    [ "$reply" = "handled by special priority" ] && special=$((special + 1)) || { wrong=$((wrong + 1)); echo "127.0.0.2 got: $reply"; }
  done
  check "$mode: 127.0.0.1 is handled with normal priority" [ "$normal" -eq 5 ]
  check "$mode: 127.0.0.2 is handled with special priority" [ "$special" -eq 5 ]
  check "$mode: no other answer" [ "$wrong" -eq 0 ]
  # Connections closed in transit, to both workers; then both still answer.
  resets 20 127.0.0.1 127.0.0.2
  check "$mode: after resets in transit the normal worker answers" [ "$(client 127.0.0.1)" = "handled by normal priority" ]
  check "$mode: after resets in transit the special worker answers" [ "$(client 127.0.0.2)" = "handled by special priority" ]
  check "$mode: no worker died" bash -c "! grep -q 'died' '$err'"
  echo "$mode: $(grep -c 'closed in transit' "$err") of 40 resets reached a worker closed"
  # The same, deterministically: while the special worker is stopped, its clients reset their
  # connections; once it runs again, it finds them closed, says so and carries on.
  special_pid=$(pgrep -P "$server" -f ' special$' | head -n 1)
  check "$mode: the special worker is a child named by its argument" [ -n "$special_pid" ]
  if [ -n "$special_pid" ]; then
    : >"$err.before"
    grep -c "special worker: a connection closed in transit" "$err" >"$err.before" || true
    kill -STOP "$special_pid"
    resets 5 127.0.0.2
    kill -CONT "$special_pid"
    check "$mode: the special worker answers after the resets it found" [ "$(client 127.0.0.2)" = "handled by special priority" ]
    reported() { [ "$(grep -c "special worker: a connection closed in transit" "$err")" -gt "$(cat "$err.before")" ]; }
    for i in $(seq 200); do reported && break; sleep 0.05; done  # a bounded wait for its report
    check "$mode: a connection reset while its worker was stopped is reported closed in transit" reported
    rm -f "$err.before"
  fi
  # The port in use, in --mode dispatch: a worker says it cannot listen and exits; the master
  # names that worker's exit (not an error lost with it) and stops with 1.
  local busy busy_rc
  busy=$(timeout 20 "$exe" --port "$port" --mode dispatch 2>&1 >/dev/null)
  busy_rc=$?
  check "$mode: a second one on its port (dispatch) exits with 1" [ "$busy_rc" -eq 1 ]
  check "$mode: ... its worker says why" grep -q "cannot listen on 127.0.0.1:$port: Address already in use" <<<"$busy"
  check "$mode: ... and its master points at that line" grep -q "exited (code 1) before listening (see its error above)" <<<"$busy"
  check "$mode: ... not at an error lost with the worker" bash -c "! grep -q 'not connected' <<<\"\$1\"" _ "$busy"
  [ "$failed" -eq 0 ] || echo "--- the second one said: $busy"
  # SIGTERM while a client keeps connecting: the master stops accepting first, so no connection
  # is accepted only to be closed, and none is reported as a send to a worker not connected.
  hammer 127.0.0.1 >"$err.hammer" &
  local hammering=$!
  until_lines "$err.hammer" 20
  kill -TERM "$server"
  finish
  check "$mode: SIGTERM stops it with 0" [ "$rc" -eq 0 ]
  wait "$hammering"
  check "$mode: a client connecting through SIGTERM is answered before it" grep -q "handled by normal priority" "$err.hammer"
  check "$mode: no 'send to worker' line after SIGTERM" bash -c "! grep -q 'send to worker' '$err'"
  rm -f "$err.hammer"
  if [ "$failed" -ne 0 ]; then echo "--- stderr of --mode $mode (its end):"; tail -n 40 "$err"; fi
  rm -f "$out" "$err"
}

# A worker's death ends it with 1 (nothing replaces the worker), while a client keeps
# connecting to that worker: the master stops accepting at once, and a send to the dead worker
# is reported once, not once per connection.
run_death() {
  local mode=$1 normal_pid special_pid
  start "$mode" || return
  normal_pid=$(pgrep -P "$server" -f ' normal$' | head -n 1)
  special_pid=$(pgrep -P "$server" -f ' special$' | head -n 1)
  check "$mode: the workers are children named by their arguments" test -n "$normal_pid" -a -n "$special_pid"
  hammer 127.0.0.1 >"$err.hammer" &
  local hammering=$!
  until_lines "$err.hammer" 20
  [ -n "$normal_pid" ] && kill -KILL "$normal_pid"
  finish
  check "$mode: a worker's death ends it with 1" [ "$rc" -eq 1 ]
  check "$mode: ... and it says which worker died how" grep -q "worker 1 died (SIGKILL); stopping" "$err"
  check "$mode: ... after stopping the other worker" bash -c "! kill -0 '$special_pid' 2>/dev/null"
  wait "$hammering"
  check "$mode: ... with at most one 'send to worker' line" [ "$(grep -c 'send to worker' "$err")" -le 1 ]
  if [ "$failed" -ne 0 ]; then echo "--- stderr of --mode $mode, a worker killed (its end):"; tail -n 40 "$err"; fi
  rm -f "$out" "$err" "$err.hammer"
}

# stall N NORMAL_PID: with the normal worker stopped, opens N connections from 127.0.0.1 (all
# connected before going on), then one from 127.0.0.2 and prints the answer it gets; then
# continues the normal worker and prints how the N connections ended: "answered closed open".
stall() {
  timeout 90 python3 - "$port" "$1" "$2" <<'PY'
import os, resource, selectors, signal, socket, sys, time
port, n, normal_pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < n + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64 if hard == resource.RLIM_INFINITY else min(n + 64, hard), hard))
def ends(socks, wait):  # reads each socket to its end -> answered, closed unanswered, still open, bytes
    sel, got, done = selectors.DefaultSelector(), {}, set()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        got[s] = b""
    deadline = time.monotonic() + wait
    while len(done) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            try:
                chunk = key.fileobj.recv(4096)
            except OSError:
                chunk = b""
            if chunk:
                got[key.fileobj] += chunk
            else:
                done.add(key.fileobj)
                sel.unregister(key.fileobj)
    answered = sum(1 for s in done if got[s])
    return answered, len(done) - answered, len(socks) - len(done), got
normal, sel = [], selectors.DefaultSelector()
for _ in range(n):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    sel.register(s, selectors.EVENT_WRITE)
    normal.append(s)
left, deadline = n, time.monotonic() + 20
while left and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.1):
        sel.unregister(key.fileobj)
        left -= 1
special = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
_, _, _, got = ends([special], 15)
print("special:", got[special].decode().strip() or "(nothing)", flush=True)
os.kill(normal_pid, signal.SIGCONT)
answered, closed, still_open, _ = ends(normal, 30)
print(answered, closed, still_open, flush=True)
PY
}

# Send mode with a stalled worker and more of its clients than the master's fds (lowered to 512
# here): the master holds a bounded number for it and closes the rest, so the other worker's
# client is still answered; each closure burst is logged once.
run_stall() {
  local normal_pid lines answered closed still_open
  start send bash -c 'ulimit -n 512 && exec "$@"' _ || return
  normal_pid=$(pgrep -P "$server" -f ' normal$' | head -n 1)
  check "stalled: the normal worker is a child named by its argument" test -n "$normal_pid"
  if [ -n "$normal_pid" ]; then
    kill -STOP "$normal_pid"
    lines=$(stall 900 "$normal_pid")
    kill -CONT "$normal_pid"
    check "stalled: the special worker answers while the normal one is stopped" \
      grep -qx "special: handled by special priority" <<<"$lines"
    read -r answered closed still_open < <(tail -n 1 <<<"$lines")
    check "stalled: each of its 900 clients is answered or closed, once it runs again" \
      test "${still_open:-1}" -eq 0 -a $((${answered:-0} + ${closed:-0})) -eq 900
    check "stalled: no accept fails for want of fds" bash -c "! grep -q 'Too many open files' '$err'"
    check "stalled: closing its connections is logged once" test "$(grep -c 'closing its new ones' "$err")" -le 1
    [ "$failed" -eq 0 ] || echo "stalled: $lines"
  fi
  kill -TERM "$server"
  finish
  check "stalled: SIGTERM stops it with 0" [ "$rc" -eq 0 ]
  if [ "$failed" -ne 0 ]; then echo "--- stderr of the stalled run (its end):"; tail -n 40 "$err"; fi
  rm -f "$out" "$err"
}

# held N: opens N connections from 127.0.0.2, sends SIGTERM to the server, and prints how the
# connections ended within 25 s: "answered closed open".
held() {
  timeout 40 python3 - "$port" "$1" "$server" <<'PY'
import os, selectors, signal, socket, sys, time
port, n, server = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) for _ in range(n)]
os.kill(server, signal.SIGTERM)
sel, answered, closed = selectors.DefaultSelector(), 0, 0
for s in socks:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
deadline = time.monotonic() + 25
while answered + closed < n and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.1):
        try:
            got = key.fileobj.recv(4096)
        except OSError:
            got = b""
        sel.unregister(key.fileobj)
        if got:
            answered += 1
        else:
            closed += 1
print(answered, closed, n - answered - closed)
PY
}

# SIGTERM while the special worker is stopped and its clients wait: the master kills it after
# its grace, 1 s here (SIGKILL: a stopped process keeps a SIGTERM pending), closes what it held for it, and
# exits with 0; every such client is closed unanswered (as Node's master does).
run_stopped() {
  local mode=$1 special_pid answered closed still_open
  grace=1 start "$mode" || return
  special_pid=$(pgrep -P "$server" -f ' special$' | head -n 1)
  check "$mode, stopped: the special worker is a child named by its argument" test -n "$special_pid"
  [ -n "$special_pid" ] && kill -STOP "$special_pid"
  read -r answered closed still_open < <(held 50)
  finish
  check "$mode, stopped: SIGTERM stops it with 0" [ "$rc" -eq 0 ]
  check "$mode, stopped: the stopped worker is gone" bash -c "! kill -0 '$special_pid' 2>/dev/null"
  # If not, leave no stopped orphan (checked by name: the pid may be someone else's by now).
  pgrep -f " special$" | grep -qx "$special_pid" && kill -KILL "$special_pid"
  check "$mode, stopped: its 50 waiting clients are closed unanswered" test "${closed:-0}" -eq 50
  [ "$failed" -eq 0 ] || echo "$mode, stopped: answered=$answered closed=$closed open=$still_open"
  if [ "$failed" -ne 0 ]; then echo "--- stderr of --mode $mode, stopped (its end):"; tail -n 40 "$err"; fi
  rm -f "$out" "$err"
}

run_mode send
run_mode dispatch
run_death send
run_death dispatch
run_stall
run_stopped send
run_stopped dispatch

echo "priority_routing: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
