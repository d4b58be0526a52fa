#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine, and Serve deploys onto it.
#
#   cluster/local_cluster.sh start            # head + two worker raylets
#   cluster/local_cluster.sh deploy [CONFIG]  # serve deploy (default: serve_config.yaml), waits until RUNNING
#   cluster/local_cluster.sh status           # nodes, resources, Serve applications
#   cluster/local_cluster.sh stop             # stops exactly what `start` started
#
# Three raylets share this host, each with its own custom resource so a model's
# `deployment.resources` can pin its replicas to one of them:
#
#   head    --num-cpus 1  --resources '{"head": 1}'    (GCS, dashboard, Serve controller)
#   node_a  --num-cpus 1  --resources '{"node_a": 1}'
#   node_b  --num-cpus 1  --resources '{"node_b": 1}'
#
# Everything lives under $SERVE_APP_CLUSTER_DIR (default /tmp/serve_app_cluster):
# one Ray temp dir per node (head/, node_a/, node_b/), one log and pid file per node.
# Each node runs as `ray start --block` in its own process group, so `stop` signals
# only those groups and never touches another Ray instance on the machine (it never
# runs `ray stop`, which would kill every Ray process of the user).
#
# Ports are fixed and away from Ray's defaults (6379, 8265, 10001, 52365, 10002-19999),
# so a default `ray start` / `ray.init()` on the same machine does not clash:
#   SERVE_APP_GCS_PORT        6390   GCS (the address workers and `ray status` use)
#   SERVE_APP_DASHBOARD_PORT  8275   dashboard / REST API (`serve deploy -a`, `serve status -a`)
#   SERVE_APP_HTTP_PORT       1088   Serve HTTP (a proxy on every node, sharing the port)
#   SERVE_APP_PORT_BASE       30000  per-node ports: BASE+10*i+0..8 and worker ports BASE+100+300*i..+299
#
# Auth: Ray 2.60 turns on token authentication by default once ~/.ray/auth_token exists
# (any local `ray.init()` creates it), and then `ray start --address`, `serve deploy` and
# `serve status` fail unless every side agrees. This script exports RAY_AUTH_MODE=disabled
# (accepted values: `disabled`, `token`) for every command it runs, whatever RAY_AUTH_MODE
# it inherits (a Python process that called `ray.init()` has set RAY_AUTH_MODE=token in its
# own environment, and its children inherit that). SERVE_APP_AUTH_MODE=token runs the
# cluster with the token of ~/.ray/auth_token (or RAY_AUTH_TOKEN) instead. Use the same
# RAY_AUTH_MODE in any shell that talks to this cluster.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SERVE_APP_VENV:-$ROOT/.venv}"
RAY="$VENV/bin/ray"
SERVE="$VENV/bin/serve"
PYTHON="$VENV/bin/python"
TOOL="$ROOT/cluster/cluster_tool.py"

CLUSTER_DIR="${SERVE_APP_CLUSTER_DIR:-/tmp/serve_app_cluster}"
GCS_PORT="${SERVE_APP_GCS_PORT:-6390}"
DASHBOARD_PORT="${SERVE_APP_DASHBOARD_PORT:-8275}"
HTTP_PORT="${SERVE_APP_HTTP_PORT:-1088}"
HTTP_HOST="${SERVE_APP_HTTP_HOST:-}"          # empty: keep the config's http_options.host
PORT_BASE="${SERVE_APP_PORT_BASE:-30000}"
NODE_IP="${SERVE_APP_NODE_IP:-127.0.0.1}"
HEAD_CPUS="${SERVE_APP_HEAD_CPUS:-1}"
WORKER_CPUS="${SERVE_APP_WORKER_CPUS:-1}"
OBJECT_STORE_BYTES="${SERVE_APP_OBJECT_STORE_BYTES:-268435456}"  # 256 MiB per node
START_TIMEOUT_S="${SERVE_APP_START_TIMEOUT_S:-120}"
DEPLOY_TIMEOUT_S="${SERVE_APP_DEPLOY_TIMEOUT_S:-300}"

export RAY_AUTH_MODE="${SERVE_APP_AUTH_MODE:-disabled}"
export RAY_ADDRESS="$NODE_IP:$GCS_PORT"                 # `ray status` and friends: this cluster only
export RAY_DASHBOARD_ADDRESS="http://$NODE_IP:$DASHBOARD_PORT"
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# A SIGTERM'd node drains (lets Serve move traffic away) for at most this long.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"
# Tag every process of this cluster (inherited by raylets, agents and workers), so
# `stop` can find stragglers without guessing by name.
export SERVE_APP_LOCAL_CLUSTER="$CLUSTER_DIR"

NODES=(head node_a node_b)

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
node_pid() { cat "$CLUSTER_DIR/$1.pid" 2>/dev/null || true; }

start_node() {  # start_node NAME INDEX ray-start-args...
  local name="$1" index="$2"; shift 2
  local base=$((PORT_BASE + 10 * index))
  local wmin=$((PORT_BASE + 100 + 300 * index))
  local args=(
    --block --disable-usage-stats
    --temp-dir "$CLUSTER_DIR/$name"
    --node-ip-address "$NODE_IP"
    --object-store-memory "$OBJECT_STORE_BYTES"
    --node-manager-port "$base"
    --object-manager-port $((base + 1))
    --dashboard-agent-listen-port $((base + 2))
    --dashboard-agent-grpc-port $((base + 3))
    --metrics-export-port $((base + 4))
    --runtime-env-agent-port $((base + 5))
    --min-worker-port "$wmin" --max-worker-port $((wmin + 299))
    "$@"
  )
  # If HAProxy ingress is on (RAY_SERVE_ENABLE_HA_PROXY=1), each node runs its own HAProxy:
  # its files in this node's dir and its own stats/metrics ports, as nodes share this machine.
  local haproxy="$CLUSTER_DIR/$name/haproxy"
  local node_env=(
    RAY_SERVE_HAPROXY_CONFIG_FILE_LOC="$haproxy/haproxy.cfg"
    RAY_SERVE_HAPROXY_SOCKET_PATH="$haproxy/admin.sock"
    RAY_SERVE_HAPROXY_SERVER_STATE_BASE="$haproxy"
    RAY_SERVE_HAPROXY_SERVER_STATE_FILE="$haproxy/server-state"
    RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH="$haproxy/metrics.sock"
    RAY_SERVE_HAPROXY_STATS_PORT=$((base + 7))
    RAY_SERVE_HAPROXY_METRICS_PORT=$((base + 8))
  )
  mkdir -p "$haproxy"
  # Own session (process group) per node, pid recorded before exec: `stop` signals the group.
  setsid bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$CLUSTER_DIR/$name.pid" \
    env "${node_env[@]}" "$RAY" start "${args[@]}" >"$CLUSTER_DIR/$name.log" 2>&1 </dev/null &
  local waited=0
  while [[ ! -s "$CLUSTER_DIR/$name.pid" ]] && (( waited < 50 )); do sleep 0.1; waited=$((waited + 1)); done
  log "$name: pid $(node_pid "$name"), log $CLUSTER_DIR/$name.log"
}

cmd_start() {
  for name in "${NODES[@]}"; do
    if alive "$(node_pid "$name")"; then die "$name is already running (pid $(node_pid "$name")); run '$0 stop' first"; fi
  done
  [[ -x "$RAY" ]] || die "$RAY not found: run ./scripts/setup.sh first"
  (( ${#CLUSTER_DIR} <= 40 )) || die "SERVE_APP_CLUSTER_DIR is too long for Ray's socket paths (keep it under 40 characters)"
  "$PYTHON" "$TOOL" check-ports "$GCS_PORT" "$DASHBOARD_PORT" \
    $(seq "$PORT_BASE" $((PORT_BASE + 28))) || die "a port of this cluster is in use (another local cluster running?)"
  rm -rf "$CLUSTER_DIR"; mkdir -p "$CLUSTER_DIR"
  cd "$ROOT"  # workers inherit this working directory
  log "starting head on $NODE_IP:$GCS_PORT (dashboard $RAY_DASHBOARD_ADDRESS, auth $RAY_AUTH_MODE)"
  start_node head 0 --head --port "$GCS_PORT" --num-cpus "$HEAD_CPUS" --resources '{"head": 1}' \
    --include-dashboard true --dashboard-host "$NODE_IP" --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port $((PORT_BASE + 6))
  "$PYTHON" "$TOOL" wait-nodes --dashboard "$RAY_DASHBOARD_ADDRESS" --resources head \
    --timeout "$START_TIMEOUT_S" --pid "$(node_pid head)" \
    || { tail -n 30 "$CLUSTER_DIR/head.log" >&2; cmd_stop; die "the head did not come up"; }
  start_node node_a 1 --address "$NODE_IP:$GCS_PORT" --num-cpus "$WORKER_CPUS" --resources '{"node_a": 1}'
  start_node node_b 2 --address "$NODE_IP:$GCS_PORT" --num-cpus "$WORKER_CPUS" --resources '{"node_b": 1}'
  "$PYTHON" "$TOOL" wait-nodes --dashboard "$RAY_DASHBOARD_ADDRESS" --resources head node_a node_b \
    --timeout "$START_TIMEOUT_S" --pid "$(node_pid node_a)" --pid "$(node_pid node_b)" \
    || { tail -n 30 "$CLUSTER_DIR/node_a.log" "$CLUSTER_DIR/node_b.log" >&2; cmd_stop; die "the workers did not join"; }
  log "cluster up: 3 nodes. Next: $0 deploy [serve_config.yaml]"
}

cmd_deploy() {
  local config="${1:-$ROOT/serve_config.yaml}" wait=1
  [[ "${2:-}" == "--no-wait" || "${SERVE_APP_DEPLOY_WAIT:-1}" == "0" ]] && wait=0
  [[ -f "$config" ]] || die "no config file $config"
  alive "$(node_pid head)" || die "the cluster is not running: $0 start"
  local rendered="$CLUSTER_DIR/deployed_config.yaml"
  # Same config, with http_options.port set to $SERVE_APP_HTTP_PORT and relative model
  # paths / image_dir made absolute against the config's folder.
  "$PYTHON" "$TOOL" render "$config" "$rendered" --http-port "$HTTP_PORT" ${HTTP_HOST:+--http-host "$HTTP_HOST"}
  local since
  since="$("$PYTHON" "$TOOL" now)"
  log "serve deploy $config (as $rendered) -> $RAY_DASHBOARD_ADDRESS"
  "$SERVE" deploy "$rendered" -a "$RAY_DASHBOARD_ADDRESS"
  if (( wait )); then
    "$PYTHON" "$TOOL" wait-apps "$rendered" --dashboard "$RAY_DASHBOARD_ADDRESS" --since "$since" \
      --timeout "$DEPLOY_TIMEOUT_S"
    log "serving on http://127.0.0.1:$HTTP_PORT (try: curl http://127.0.0.1:$HTTP_PORT/v1/models)"
  fi
}

cmd_status() {
  for name in "${NODES[@]}"; do
    local pid; pid="$(node_pid "$name")"
    if alive "$pid"; then log "$name: running (pid $pid)"; else log "$name: not running"; fi
  done
  alive "$(node_pid head)" || return 0
  "$RAY" status --address "$NODE_IP:$GCS_PORT" || true
  "$SERVE" status -a "$RAY_DASHBOARD_ADDRESS" || true
}

signal_group() {  # signal_group SIGNAL PID: the node's whole process group (it is a session leader)
  kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true
}

cmd_stop() {
  [[ -d "$CLUSTER_DIR" ]] || { log "nothing to stop ($CLUSTER_DIR does not exist)"; return 0; }
  # Workers first, then the head; each `ray start --block` drains its node and stops its
  # own processes on SIGTERM. Whatever is left of a group after the grace period is killed.
  local name pid
  for name in node_b node_a head; do
    pid="$(node_pid "$name")"
    alive "$pid" || continue
    log "stopping $name (pid $pid)"
    signal_group TERM "$pid"
  done
  local deadline=$((SECONDS + ${SERVE_APP_STOP_TIMEOUT_S:-30}))
  for name in node_b node_a head; do
    pid="$(node_pid "$name")"
    while alive "$pid" && (( SECONDS < deadline )); do sleep 0.5; done
    [[ -n "$pid" ]] && signal_group KILL "$pid"
    rm -f "$CLUSTER_DIR/$name.pid"
  done
  # Stragglers that left the process groups (workers, agents, an HAProxy started by Serve):
  # processes whose environment or command line names this cluster's folder.
  "$PYTHON" "$TOOL" kill-tagged "$CLUSTER_DIR" || true
  log "stopped (logs kept in $CLUSTER_DIR)"
}

case "${1:-}" in
  start) cmd_start ;;
  deploy) shift; cmd_deploy "$@" ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
