#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine, and Serve deploys onto it.
#
#   cluster/local_cluster.sh start                       # head + two worker raylets
#   cluster/local_cluster.sh deploy [CONFIG] [--no-wait] # serve deploy (default serve_config.yaml), wait for RUNNING
#   cluster/local_cluster.sh status                      # nodes, resources, Serve applications
#   cluster/local_cluster.sh stop                        # Serve stopped gracefully, then exactly what `start` started
#
# Three raylets share this host, each with its own custom resource so a model's
# `deployment.resources` can pin its replicas to one of them:
#
#   head    --num-cpus 1  --resources '{"head": 1}'    (GCS, dashboard, Serve controller)
#   node_a  --num-cpus 1  --resources '{"node_a": 1}'
#   node_b  --num-cpus 1  --resources '{"node_b": 1}'
#
# Everything lives under $SERVE_APP_CLUSTER_DIR (default /tmp/serve_app_cluster): one Ray
# temp dir per node (head/, node_a/, node_b/), HAProxy's files per node (hd/, ha/, hb/),
# one log and pid file per node, the deployed config. `start` uses the folder only if it is new, empty or marked as made by `start`
# (.serve_app_local_cluster), and then deletes only those files of its previous run.
# Each node runs as `ray start --block` in its own process group; `stop` signals only this
# cluster's processes and never runs `ray stop` (which would kill every Ray of the user).
#
# Serve runs with the fast settings of scripts/serve.sh (HAProxy ingress, throughput-
# optimized Serve); `RAY_SERVE_ENABLE_HA_PROXY=0` or `RAY_SERVE_THROUGHPUT_OPTIMIZED=0` in
# the environment of `start` turns one off. Serve reads them at import in its controller,
# proxies and replicas, so they are in the environment of every node's `ray start`.
#
# Ports are fixed and away from Ray's and Serve's defaults, so a default `ray start`,
# `ray.init()` or scripts/serve.sh on the same machine does not clash:
#   SERVE_APP_GCS_PORT        6390   GCS (the address workers and `ray status` use)
#   SERVE_APP_DASHBOARD_PORT  8275   dashboard / REST API (`serve deploy -a`, `serve status -a`)
#   SERVE_APP_HTTP_PORT       1088   Serve HTTP, on the head node's proxy
#   SERVE_APP_PORT_BASE       20000  all other ports, BASE..BASE+1999 (20000-21999: above Ray's
#                                    default worker ports 10002-19999, below Serve's default
#                                    direct-ingress ports 30000-30999 / 40000-40999 and the
#                                    kernel's ephemeral ports 32768+):
#     BASE+10*i+0..9   node i (head 0, node_a 1, node_b 2): raylet, object manager, dashboard
#                      agent (2), metrics, runtime-env agent, HAProxy stats, HAProxy metrics,
#                      and the node's Serve proxy HTTP/gRPC ports (the head's proxy listens on
#                      SERVE_APP_HTTP_PORT; the head's two are Serve's fallback proxy)
#     BASE+30          Ray client server (head)
#     BASE+100..999    Ray worker ports, 300 per node
#     BASE+1000..1499  Serve direct-ingress HTTP ports, BASE+1500..1999 gRPC: Serve's controller
#                      hands them out per node from this one range, so the nodes of this machine
#                      share it (a replica whose port another node's replica holds gets the next)
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
VENV="$(realpath -ms -- "${SERVE_APP_VENV:-$ROOT/.venv}")"  # absolute: start cds to the repo root
RAY="$VENV/bin/ray"
SERVE="$VENV/bin/serve"
PYTHON="$VENV/bin/python"
TOOL="$ROOT/cluster/cluster_tool.py"

# Absolute and without symlinks: the tag below and `kill-tagged` compare it literally.
CLUSTER_DIR="$(realpath -m -- "${SERVE_APP_CLUSTER_DIR:-/tmp/serve_app_cluster}")"
MARKER="$CLUSTER_DIR/.serve_app_local_cluster"   # written by `start`; cluster_tool.py knows the name
GCS_PORT="${SERVE_APP_GCS_PORT:-6390}"
DASHBOARD_PORT="${SERVE_APP_DASHBOARD_PORT:-8275}"
HTTP_PORT="${SERVE_APP_HTTP_PORT:-1088}"
HTTP_HOST="${SERVE_APP_HTTP_HOST:-}"          # empty: keep the config's http_options.host
PORT_BASE="${SERVE_APP_PORT_BASE:-20000}"
NODE_IP="${SERVE_APP_NODE_IP:-127.0.0.1}"
HEAD_CPUS="${SERVE_APP_HEAD_CPUS:-1}"
WORKER_CPUS="${SERVE_APP_WORKER_CPUS:-1}"
OBJECT_STORE_BYTES="${SERVE_APP_OBJECT_STORE_BYTES:-268435456}"  # 256 MiB per node
START_TIMEOUT_S="${SERVE_APP_START_TIMEOUT_S:-120}"
DEPLOY_TIMEOUT_S="${SERVE_APP_DEPLOY_TIMEOUT_S:-300}"
STOP_TIMEOUT_S="${SERVE_APP_STOP_TIMEOUT_S:-30}"  # per step: the workers, then the head
SHUTDOWN_TIMEOUT_S="${SERVE_APP_SHUTDOWN_TIMEOUT_S:-120}"  # the withdrawal and `serve shutdown`, before that
DRAIN_TIMEOUT_S="${SERVE_APP_DRAIN_TIMEOUT_S:-30}"  # HAProxy's requests in flight, before `serve shutdown`

export RAY_AUTH_MODE="${SERVE_APP_AUTH_MODE:-disabled}"
export RAY_ADDRESS="$NODE_IP:$GCS_PORT"                 # `ray status` and friends: this cluster only
export RAY_DASHBOARD_ADDRESS="http://$NODE_IP:$DASHBOARD_PORT"
export RAY_USAGE_STATS_ENABLED=0
# As scripts/serve.sh: model paths may be hub ids (set HF_HUB_OFFLINE=1 for no network).
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# Serve's fast serving path, as scripts/serve.sh sets it (README, "Serving path").
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
# HAProxy with kernel splicing off, as scripts/serve.sh runs it (where setup has installed it).
if [[ -z "${RAY_SERVE_HAPROXY_BINARY_PATH:-}" && -x "$VENV/bin/serve-app-haproxy" ]]; then
  export RAY_SERVE_HAPROXY_BINARY_PATH="$VENV/bin/serve-app-haproxy"
fi
export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
# As scripts/serve.sh: a stopping ingress replica stays reachable 5 s, not Ray's 30, so that
# `stop`'s Serve shutdown fits in Serve's own 30 s and the registrar gets to unregister.
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="${RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S:-5}"
# Cluster-wide Serve ports (read by the controller on the head; see the layout above).
export RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=$((PORT_BASE + 1000))
export RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=$((PORT_BASE + 1500))   # exclusive
export RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT=$((PORT_BASE + 1500))
export RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT=$((PORT_BASE + 2000))   # exclusive
export RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=$((PORT_BASE + 8))
export RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=$((PORT_BASE + 9))
# A SIGTERM'd node drains (lets Serve move traffic away) for at most this long.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"
# Tag every process of this cluster (inherited by raylets, agents, workers and HAProxy),
# so `stop` can find them without guessing by name.
export SERVE_APP_LOCAL_CLUSTER="$CLUSTER_DIR"

NODES=(head node_a node_b)

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
node_pid() {  # the pid of a node's `ray start`, if it runs and carries this cluster's tag
  local pid
  pid="$(cat "$CLUSTER_DIR/$1.pid" 2>/dev/null || true)"
  if [[ -f "$MARKER" && "$pid" =~ ^[0-9]+$ ]] \
      && grep -qzxF -- "SERVE_APP_LOCAL_CLUSTER=$CLUSTER_DIR" "/proc/$pid/environ" 2>/dev/null; then
    echo "$pid"
  fi
}

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
  # Each node runs its own Serve proxy (HAProxy: its files in a folder of this node's, its own
  # stats and metrics ports). A worker node's proxy listens on its own ports (the head's on
  # SERVE_APP_HTTP_PORT): HAProxy binds without SO_REUSEPORT, so they cannot share one.
  # Serve adds the node id (56 characters) to the socket paths and HAProxy takes 97 at most:
  # the folder's name is short (hd, ha, hb).
  local haproxy="$CLUSTER_DIR/h${name: -1}"
  local node_env=(
    RAY_SERVE_HAPROXY_CONFIG_FILE_LOC="$haproxy/haproxy.cfg"
    RAY_SERVE_HAPROXY_SOCKET_PATH="$haproxy/admin.sock"
    RAY_SERVE_HAPROXY_SERVER_STATE_BASE="$haproxy"
    RAY_SERVE_HAPROXY_SERVER_STATE_FILE="$haproxy/server-state"
    RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH="$haproxy/metrics.sock"
    RAY_SERVE_HAPROXY_STATS_PORT=$((base + 6))
    RAY_SERVE_HAPROXY_METRICS_PORT=$((base + 7))
    RAY_SERVE_WORKER_PROXY_HTTP_PORT=$((base + 8))   # Serve ignores both on the head
    RAY_SERVE_WORKER_PROXY_GRPC_PORT=$((base + 9))
  )
  mkdir -p "$haproxy"
  # Own session (process group) per node, pid recorded before exec.
  setsid bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$CLUSTER_DIR/$name.pid" \
    env "${node_env[@]}" "$RAY" start "${args[@]}" >"$CLUSTER_DIR/$name.log" 2>&1 </dev/null &
  local waited=0
  while [[ ! -s "$CLUSTER_DIR/$name.pid" ]] && (( waited < 50 )); do sleep 0.1; waited=$((waited + 1)); done
  log "$name: pid $(node_pid "$name"), log $CLUSTER_DIR/$name.log"
}

check_folder() {  # CLUSTER_DIR is new, empty, or made by `start`: never someone else's files
  [[ -f "$MARKER" || ! -e "$CLUSTER_DIR" ]] && return 0
  [[ -d "$CLUSTER_DIR" ]] || die "SERVE_APP_CLUSTER_DIR=$CLUSTER_DIR is not a folder"
  local entries
  entries="$(ls -A -- "$CLUSTER_DIR")" || die "cannot read $CLUSTER_DIR"
  [[ -z "$entries" ]] || die "$CLUSTER_DIR is not empty and was not made by '$0 start'" \
    "(no $(basename "$MARKER")): set SERVE_APP_CLUSTER_DIR to a new folder"
}

abort_start() {  # start failed or was interrupted: stop what it started
  local rc="${1:-$?}"
  trap - EXIT INT TERM
  log "start did not finish: stopping what it started"
  cmd_stop
  exit $(( rc ? rc : 1 ))
}

cmd_start() {
  local name pid
  check_folder
  for name in "${NODES[@]}"; do
    pid="$(node_pid "$name")"
    [[ -z "$pid" ]] || die "$name is already running (pid $pid); run '$0 stop' first"
  done
  [[ -x "$RAY" ]] || die "$RAY not found: run ./scripts/setup.sh first"
  # Ray's sockets allow 40 characters here; HAProxy's (with Serve's node id in them) 24.
  local longest=40
  [[ "$RAY_SERVE_ENABLE_HA_PROXY" == 1 ]] && longest=24
  (( ${#CLUSTER_DIR} <= longest )) \
    || die "SERVE_APP_CLUSTER_DIR is too long for the socket paths in it (at most $longest characters)"
  "$PYTHON" "$TOOL" check-ports --host "$NODE_IP" "$GCS_PORT" "$DASHBOARD_PORT" "$HTTP_PORT" \
    "$PORT_BASE-$((PORT_BASE + 30))" "$((PORT_BASE + 100))-$((PORT_BASE + 999))" \
    --skippable "$((PORT_BASE + 1000))-$((PORT_BASE + 1999))" \
    || die "a port of this cluster is in use (another local cluster or Serve running?)"
  trap abort_start EXIT
  trap 'abort_start 130' INT
  trap 'abort_start 143' TERM
  # Only what an earlier `start` created; anything else in the folder stays.
  for name in "${NODES[@]}"; do
    rm -rf -- "${CLUSTER_DIR:?}/$name" "$CLUSTER_DIR/h${name: -1}" "$CLUSTER_DIR/$name.pid" "$CLUSTER_DIR/$name.log"
  done
  rm -f -- "$CLUSTER_DIR/deployed_config.yaml"
  mkdir -p "$CLUSTER_DIR"
  echo "made by $0 start: head/ node_a/ node_b/ hd/ ha/ hb/ *.pid *.log deployed_config.yaml" >"$MARKER"
  cd "$ROOT"  # workers inherit this working directory
  log "starting head on $NODE_IP:$GCS_PORT (dashboard $RAY_DASHBOARD_ADDRESS, auth $RAY_AUTH_MODE," \
    "HAProxy $RAY_SERVE_ENABLE_HA_PROXY, throughput-optimized $RAY_SERVE_THROUGHPUT_OPTIMIZED)"
  start_node head 0 --head --port "$GCS_PORT" --num-cpus "$HEAD_CPUS" --resources '{"head": 1}' \
    --include-dashboard true --dashboard-host "$NODE_IP" --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port $((PORT_BASE + 30))
  "$PYTHON" "$TOOL" wait-nodes --dashboard "$RAY_DASHBOARD_ADDRESS" --resources head \
    --timeout "$START_TIMEOUT_S" --pid "$(cat "$CLUSTER_DIR/head.pid")" \
    || { tail -n 30 "$CLUSTER_DIR/head.log" >&2; die "the head did not come up"; }
  start_node node_a 1 --address "$NODE_IP:$GCS_PORT" --num-cpus "$WORKER_CPUS" --resources '{"node_a": 1}'
  start_node node_b 2 --address "$NODE_IP:$GCS_PORT" --num-cpus "$WORKER_CPUS" --resources '{"node_b": 1}'
  "$PYTHON" "$TOOL" wait-nodes --dashboard "$RAY_DASHBOARD_ADDRESS" --resources head node_a node_b \
    --timeout "$START_TIMEOUT_S" --pid "$(cat "$CLUSTER_DIR/node_a.pid")" --pid "$(cat "$CLUSTER_DIR/node_b.pid")" \
    || { tail -n 30 "$CLUSTER_DIR/node_a.log" "$CLUSTER_DIR/node_b.log" >&2; die "the workers did not join"; }
  trap - EXIT INT TERM
  log "cluster up: 3 nodes. Next: $0 deploy [serve_config.yaml]"
}

cmd_deploy() {
  local config="" wait=1 arg
  for arg in "$@"; do
    case "$arg" in
      --no-wait) wait=0 ;;
      -*) die "unknown option $arg (deploy [CONFIG] [--no-wait])" ;;
      *) [[ -z "$config" ]] || die "one config file at a time"; config="$arg" ;;
    esac
  done
  config="${config:-$ROOT/serve_config.yaml}"
  if [[ "${SERVE_APP_DEPLOY_WAIT:-1}" == "0" ]]; then wait=0; fi
  [[ -f "$config" ]] || die "no config file $config"
  [[ -n "$(node_pid head)" ]] || die "the cluster is not running: $0 start"
  local rendered="$CLUSTER_DIR/deployed_config.yaml"
  # Same config, with http_options.port set to $SERVE_APP_HTTP_PORT and relative model
  # paths / image_dir made absolute against the config's folder.
  "$PYTHON" "$TOOL" render "$config" "$rendered" --http-port "$HTTP_PORT" ${HTTP_HOST:+--http-host "$HTTP_HOST"} \
    || die "$config has the problems above; nothing was deployed"
  # A mistake in it is named here, not found by waiting for the deploy to fail.
  "$PYTHON" -m serve_app.check_config "$rendered" || die "$config has the problems above; nothing was deployed"
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
  local name pid
  for name in "${NODES[@]}"; do
    pid="$(node_pid "$name")"
    if [[ -n "$pid" ]]; then log "$name: running (pid $pid)"; else log "$name: not running"; fi
  done
  [[ -n "$(node_pid head)" ]] || return 0
  "$RAY" status --address "$NODE_IP:$GCS_PORT" || true
  "$SERVE" status -a "$RAY_DASHBOARD_ADDRESS" || true
}

stop_nodes() {  # stop_nodes NAME...: SIGTERM their `ray start` (it drains the node, then stops
  # its processes) and wait up to STOP_TIMEOUT_S; a node still running then has its whole
  # process group killed.
  local name pid pids=() deadline=$((SECONDS + STOP_TIMEOUT_S))
  for name in "$@"; do
    pid="$(node_pid "$name")"
    [[ -n "$pid" ]] || continue
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  for pid in ${pids[@]+"${pids[@]}"}; do  # none running: an empty array (bash <= 4.3 calls it unset)
    while alive "$pid" && (( SECONDS < deadline )); do sleep 0.5; done
    if alive "$pid"; then
      log "pid $pid did not stop within ${STOP_TIMEOUT_S}s: killing its process group"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for name in "$@"; do rm -f -- "$CLUSTER_DIR/$name.pid"; done
}

cmd_stop() {
  if [[ -f "$MARKER" ]]; then
    if [[ -n "$(node_pid head)" ]]; then
      # Serve first, gracefully (serve_app.shutdown): the AI network's nodes are told the models are
      # gone, so that they stop forwarding new requests; every node's HAProxy takes no new
      # connections while its requests in flight finish (`serve shutdown` alone kills it at once,
      # and every request in flight with it); then Serve shuts down and the replicas drain. Stopping
      # the raylets would skip all that (nothing deployed: a no-op). Bounded: a wedged cluster must
      # not hold `stop` (coreutils' timeout where there is one).
      local bounded=()
      command -v timeout >/dev/null && bounded=(timeout "$((SHUTDOWN_TIMEOUT_S + DRAIN_TIMEOUT_S))")
      log "stopping Serve gracefully: withdrawing the models from the AI network's nodes (where registration is on),"
      log "draining every node's HAProxy (up to ${DRAIN_TIMEOUT_S}s for the requests in flight), then serve shutdown"
      local stopped=0  # 2: Serve is down, less gracefully than asked (said above); else it failed
      "${bounded[@]+"${bounded[@]}"}" "$PYTHON" -m serve_app.shutdown --drain-timeout "$DRAIN_TIMEOUT_S" >&2 ||
        stopped=$?
      if (( stopped != 0 && stopped != 2 )); then
        log "the graceful stop failed or took over $((SHUTDOWN_TIMEOUT_S + DRAIN_TIMEOUT_S))s; stopping the nodes anyway"
      fi
    fi
    # Workers first, while the head (GCS) is up to accept their drain; then the head.
    stop_nodes node_a node_b
    stop_nodes head
  else
    log "no cluster of this script in $CLUSTER_DIR"
  fi
  # Stragglers that left the process groups (workers, agents, an HAProxy started by Serve):
  # processes that carry this cluster's tag, or a Ray temp dir inside its folder.
  "$PYTHON" "$TOOL" kill-tagged "$CLUSTER_DIR" || true
  [[ -f "$MARKER" ]] && log "stopped (logs kept in $CLUSTER_DIR)"
  return 0
}

case "${1:-}" in
  start) cmd_start ;;
  deploy) shift; cmd_deploy "$@" ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
