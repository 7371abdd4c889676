#!/usr/bin/env bash
# A 3-member etcd cluster on loopback, for comparing with Tessera (README,
# "Comparing with etcd"). Uses Debian's etcd-server (`etcd`, which
# tools/setup.sh installs).
#
#   bash tools/etcd-cluster.sh [start] DIR   start it in the background, data
#                                            and logs in DIR; print the client
#                                            endpoints (the only stdout line)
#   bash tools/etcd-cluster.sh stop DIR      stop the members started in DIR
#
# Members m1, m2, m3: client ports 2379, 22379, 32379; peer ports 2380,
# 22380, 32380. Started again on the same DIR, they resume their data.
set -euo pipefail

usage() { echo "usage: $0 [start] DIR | $0 stop DIR" >&2; exit 2; }
cmd=start
case "${1:-}" in
  start | stop) cmd="$1"; shift ;;
esac
[ $# -eq 1 ] || usage
dir="$1"

members=(m1 m2 m3)
declare -A client=([m1]=2379 [m2]=22379 [m3]=32379)
declare -A peer=([m1]=2380 [m2]=22380 [m3]=32380)
endpoints="127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379"

# True when something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True when the etcd member on client port $1 reports itself healthy.
healthy() {
  local reply
  reply="$(
    exec 2>/dev/null
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    timeout 2 cat <&3
  )" || return 1
  [[ "$reply" == *'"health":"true"'* ]]
}

# The pid in DIR/m.pid if that process is still an etcd.
member_pid() {
  local f="$dir/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = etcd ] && echo "$pid"
}

if [ "$cmd" = stop ]; then
  [ -d "$dir" ] || { echo "etcd-cluster: no folder $dir" >&2; exit 1; }
  pids=()
  for m in "${members[@]}"; do
    if pid="$(member_pid "$m")"; then
      kill -TERM "$pid"
      pids+=("$pid")
    fi
    rm -f "$dir/$m.pid"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do
      [ -d "/proc/$pid" ] || break
      sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
      echo "etcd-cluster: pid $pid still running after 10 s; sending SIGKILL" >&2
      kill -KILL "$pid"
    fi
  done
  echo "etcd-cluster: stopped ${#pids[@]} member(s) in $dir" >&2
  exit 0
fi

command -v etcd >/dev/null || {
  echo "etcd-cluster: etcd not found: install Debian's etcd-server (bash tools/setup.sh does)" >&2
  exit 1
}
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
for m in "${members[@]}"; do
  if member_pid "$m" >/dev/null; then
    echo "etcd-cluster: $m already runs from $dir (stop it first: $0 stop $dir)" >&2
    exit 1
  fi
done
for m in "${members[@]}"; do
  for port in "${client[$m]}" "${peer[$m]}"; do
    if listening "$port"; then
      echo "etcd-cluster: 127.0.0.1:$port is already in use (Debian's etcd service? sudo systemctl disable --now etcd)" >&2
      exit 1
    fi
  done
done

initial=""
for m in "${members[@]}"; do
  initial+="${initial:+,}$m=http://127.0.0.1:${peer[$m]}"
done
for m in "${members[@]}"; do
  c="http://127.0.0.1:${client[$m]}"
  p="http://127.0.0.1:${peer[$m]}"
  setsid etcd --name "$m" --data-dir "$dir/$m" --logger zap \
    --listen-client-urls "$c" --advertise-client-urls "$c" \
    --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" \
    --initial-cluster "$initial" --initial-cluster-token tessera-bench \
    --initial-cluster-state new \
    >"$dir/$m.log" 2>&1 </dev/null &
  echo $! >"$dir/$m.pid"
done

# Ready when every member answers /health with true (a leader is elected and
# the member serves): at most 30 s.
for m in "${members[@]}"; do
  ok=""
  for _ in $(seq 300); do
    if healthy "${client[$m]}"; then ok=1; break; fi
    member_pid "$m" >/dev/null || break
    sleep 0.1
  done
  if [ -z "$ok" ]; then
    echo "etcd-cluster: $m (127.0.0.1:${client[$m]}) not healthy within 30 s; its log ($dir/$m.log) ends:" >&2
    tail -n 20 "$dir/$m.log" >&2 || true
    "$0" stop "$dir" || true
    exit 1
  fi
done
echo "etcd-cluster: 3 members up in $dir (logs: $dir/m*.log; stop: $0 stop $dir)" >&2
echo "$endpoints"
