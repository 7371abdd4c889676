# Sourced by the measurement scripts that run a fresh `tessera dev`.
#
#   start_dev NAME BIN SHARDS [FLAGS...]
#                        starts `BIN/tessera dev --shards SHARDS FLAGS` in a
#                        fresh folder /var/tmp/tessera-NAME.XXXX (data in
#                        DIR/data, its output in DIR/log), sets `dir` and
#                        `pid`, and waits for it (wait_ready)
#   wait_ready PID DIR   waits (up to 10 min) for `ready` in DIR/log; when it
#                        does not come, prints the log's last lines, kills PID,
#                        removes DIR and exits 1
#   stop_dev PID         sends SIGTERM and waits (up to 60 s) for PID to exit
#   remove_dev PID DIR   kills PID if it is still there, reaps it, removes DIR
#   udp                  UDP datagrams this machine has sent (/proc/net/snmp)
#   cpu PID              CPU ticks PID has used (/proc/PID/stat: user + system)

start_dev() {
  local name=$1 bin=$2 shards=$3
  shift 3
  dir=$(mktemp -d "/var/tmp/tessera-$name.XXXX")
  (cd "$dir" && exec "$bin/tessera" dev --data-dir "$dir/data" --shards "$shards" "$@") > "$dir/log" 2>&1 &
  pid=$!
  wait_ready "$pid" "$dir"
}

wait_ready() {
  local pid=$1 dir=$2
  for _ in $(seq 1 1200); do
    grep -q "^ready" "$dir/log" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  grep -q "^ready" "$dir/log" && return 0
  echo "not ready:"; grep -v '^ ' "$dir/log" | tail -3
  remove_dev "$pid" "$dir"; exit 1
}

stop_dev() {
  kill "$1"
  for _ in $(seq 1 120); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
}

remove_dev() {
  kill -9 "$1" 2>/dev/null
  wait "$1" 2>/dev/null
  rm -rf "$2"
}

udp() { awk '/^Udp:/ {n++; if (n == 2) print $5}' /proc/net/snmp; }

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
