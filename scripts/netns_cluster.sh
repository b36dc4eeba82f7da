#!/usr/bin/env bash
# N "nodes" on one machine: network namespaces with their own addresses on a private subnet, joined by
# a bridge, for multi-node tests of distlora (and for trying `distlora launch --nodes N` by hand).
#
#   scripts/netns_cluster.sh up N           create nodes 0..N-1 (idempotent; an existing cluster of
#                                            another size is replaced)
#   scripts/netns_cluster.sh exec I CMD...  run CMD inside node I (its network only; files and processes
#                                            are shared with the machine, as on nodes with a shared FS)
#   scripts/netns_cluster.sh addr I         node I's address
#   scripts/netns_cluster.sh slow I RATE    rate-limit node I's link both ways (tc tbf, e.g. 20mbit);
#                                            RATE "off" removes the limit
#   scripts/netns_cluster.sh link I down|up take node I's link down (packets dropped, as a cut cable:
#                                            the node keeps its address and routes) or bring it back
#   scripts/netns_cluster.sh status         nodes, addresses, link state, qdisc
#   scripts/netns_cluster.sh down           kill the processes still running in its nodes, remove everything
#                                            this prefix created (idempotent)
#
# Settings (environment): DISTLORA_NETNS_PREFIX (dl-) prefixes every name this creates: the bridge
# <prefix>br, namespaces <prefix>node<I>, host-side veth ends <prefix>h<I> (Linux allows 15 characters
# per interface name: keep the prefix short). Parallel runs use different prefixes. The subnet
# DISTLORA_NETNS_SUBNET (10.77.0) gives node I the address <subnet>.<I+1>/24 on its eth0; the bridge
# holds no address, so clusters with different prefixes may use the same subnet without meeting.
# Needs root (or CAP_NET_ADMIN) and iproute2; `tc ... tbf` for `slow`. netem (delay, loss) is not
# used: some kernels (this project's CI) lack it.
set -euo pipefail

PREFIX=${DISTLORA_NETNS_PREFIX:-dl-}
SUBNET=${DISTLORA_NETNS_SUBNET:-10.77.0}
BRIDGE=${PREFIX}br
# tbf's queue: 1 s delays rather than drops a collective's burst (drops would stall TCP far below the
# rate). Its bucket (burst): 10 ms of traffic at the rate, at least 4 KiB (a full-size frame fits, and
# the kernel's timer tick can refill it); a larger bucket would let a whole small collective through
# unthrottled. DISTLORA_NETNS_BURST (tc units, e.g. 64kb) sets it instead.
TBF_LATENCY=${DISTLORA_NETNS_LATENCY:-1s}

# burst_bytes RATE: the bucket size in bytes for a tc rate like 20mbit, 512kbit, 1gbit, 100000bit
burst_bytes() {
  local rate=$1 num unit mult
  [[ "$rate" =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] || die "slow: RATE must look like 512kbit, 20mbit or 1gbit, got '$rate'"
  num=${BASH_REMATCH[1]}
  unit=${BASH_REMATCH[2]}
  case "$unit" in bit) mult=1 ;; kbit) mult=1000 ;; mbit) mult=1000000 ;; gbit) mult=1000000000 ;; esac
  local b=$((num * mult / 8 / 100))
  echo $((b > 4096 ? b : 4096))
}

die() { echo "netns_cluster: $*" >&2; exit 2; }
ns() { echo "${PREFIX}node$1"; }
host_end() { echo "${PREFIX}h$1"; }
addr() { echo "$SUBNET.$(($1 + 1))"; }

[ "${#BRIDGE}" -le 15 ] || die "DISTLORA_NETNS_PREFIX '$PREFIX' is too long: interface names are at most 15 characters"
command -v ip >/dev/null || die "iproute2 ('ip') is not installed"

# the nodes of this prefix, in order
nodes() {
  ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^${PREFIX//./\\.}node\([0-9][0-9]*\)$/\1/p" | sort -n
}

node_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$(ns "$1")"; }

need_node() {
  [[ "$1" =~ ^[0-9]+$ ]] || die "node index must be a number, got '$1'"
  node_exists "$1" || die "no node $1 (prefix '$PREFIX'): run '$0 up N' first"
}

cmd_down() {
  local i pid
  for i in $(nodes); do
    # processes still inside would keep a deleted namespace (and their ports) alive: end them first
    for pid in $(ip netns pids "$(ns "$i")" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip link del "$(host_end "$i")" 2>/dev/null || true  # deletes both ends of the pair
    ip netns del "$(ns "$i")" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

add_node() {
  local i=$1 n h
  n=$(ns "$i")
  h=$(host_end "$i")
  ip netns add "$n"
  ip link add "$h" type veth peer name eth0 netns "$n"
  ip link set "$h" master "$BRIDGE"
  ip link set "$h" up
  ip -n "$n" link set lo up
  ip -n "$n" addr add "$(addr "$i")/24" dev eth0
  ip -n "$n" link set eth0 up
}

cmd_up() {
  local want=$1 have i
  [[ "$want" =~ ^[1-9][0-9]*$ ]] || die "up: N must be a positive number, got '$want'"
  [ "$want" -le 250 ] || die "up: at most 250 nodes on one /24"
  have=$(nodes | wc -l)
  if [ "$have" != 0 ] && [ "$have" != "$want" ]; then cmd_down; fi
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip link set "$BRIDGE" up
  for ((i = 0; i < want; i++)); do
    if node_exists "$i"; then
      # an earlier run may have left it slowed or cut: back to a plain, working link
      ip link set "$(host_end "$i")" up 2>/dev/null || { ip netns del "$(ns "$i")"; add_node "$i"; continue; }
      set_rate "$i" off
    else
      add_node "$i"
    fi
  done
}

set_rate() {
  local i=$1 rate=$2 h n
  h=$(host_end "$i")
  n=$(ns "$i")
  if [ "$rate" = off ]; then
    tc qdisc del dev "$h" root 2>/dev/null || true
    ip netns exec "$n" tc qdisc del dev eth0 root 2>/dev/null || true
    return 0
  fi
  command -v tc >/dev/null || die "slow: 'tc' (iproute2) is not installed"
  local burst
  burst=${DISTLORA_NETNS_BURST:-$(burst_bytes "$rate")b}
  # egress of the host end = traffic into the node; egress of eth0 = traffic out of it
  tc qdisc replace dev "$h" root tbf rate "$rate" burst "$burst" latency "$TBF_LATENCY"
  ip netns exec "$n" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency "$TBF_LATENCY"
}

cmd_status() {
  local i
  for i in $(nodes); do
    printf '%s %s %s link=%s qdisc=%s\n' "$i" "$(ns "$i")" "$(addr "$i")" \
      "$(cat "/sys/class/net/$(host_end "$i")/operstate" 2>/dev/null || echo missing)" \
      "$(tc qdisc show dev "$(host_end "$i")" 2>/dev/null | awk 'NR == 1 {print $2}')"
  done
}

[ $# -ge 1 ] || die "usage: $0 up N | exec I CMD... | addr I | slow I RATE|off | link I down|up | status | down"
action=$1
shift
case "$action" in
  up)
    [ $# = 1 ] || die "usage: $0 up N"
    cmd_up "$1"
    ;;
  down) cmd_down ;;
  status) cmd_status ;;
  addr)
    [ $# = 1 ] || die "usage: $0 addr I"
    need_node "$1"
    addr "$1"
    ;;
  exec)
    [ $# -ge 2 ] || die "usage: $0 exec I CMD..."
    need_node "$1"
    n=$(ns "$1")
    shift
    exec ip netns exec "$n" "$@"
    ;;
  slow)
    [ $# = 2 ] || die "usage: $0 slow I RATE (e.g. 20mbit) | off"
    need_node "$1"
    set_rate "$1" "$2"
    ;;
  link)
    [ $# = 2 ] && [[ "$2" =~ ^(up|down)$ ]] || die "usage: $0 link I down|up"
    need_node "$1"
    ip link set "$(host_end "$1")" "$2"
    ;;
  *) die "unknown action '$action' (up, exec, addr, slow, link, status, down)" ;;
esac
