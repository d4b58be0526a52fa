#!/usr/bin/env bash
# Start the server in the foreground with Ray Serve's fastest documented settings
# (see README, "Serving path"). Any of them can be turned off from the environment,
# e.g. `RAY_SERVE_ENABLE_HA_PROXY=0 ./scripts/serve.sh`.
#
#   ./scripts/serve.sh [CONFIG]        CONFIG defaults to the repo's serve_config.yaml; a relative
#                                      path is read from the current directory first, then the repo's
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the header above is the usage
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
config="${1:-serve_config.yaml}"
if [[ $# -ge 1 && -f "$config" ]]; then  # a file named from the caller's directory, before the cd below
    config="$(realpath "$config")"
fi
cd "$(dirname "$0")/.."

# The config's mistakes fail here, in a second, each named: `serve run` would start Ray and then
# wait for ever on an application its controller cannot build (serve_app/check_config.py).
if ! .venv/bin/python -m serve_app.check_config "$config"; then
    echo "serve.sh: $config has the problems above; nothing was started" >&2
    exit 1
fi

# HAProxy in front instead of Serve's Python proxy (the binary ships with ray[serve]).
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
# That HAProxy with kernel splicing off, which made it miss about half the hang-ups of clients
# waiting for a non-streamed answer, so their generation ran on (serve_app/haproxy_launcher.py).
if [[ -z "${RAY_SERVE_HAPROXY_BINARY_PATH:-}" ]]; then
    if [[ -x .venv/bin/serve-app-haproxy ]]; then
        export RAY_SERVE_HAPROXY_BINARY_PATH="$PWD/.venv/bin/serve-app-haproxy"
    else  # a checkout updated since setup: Serve's own HAProxy, until ./scripts/setup.sh reinstalls
        echo "serve.sh: .venv/bin/serve-app-haproxy is missing (run ./scripts/setup.sh): HAProxy keeps" \
             "kernel splicing on, and misses some clients' hang-ups" >&2
    fi
fi
# Fewer hops and threads per request: gRPC between proxy and replicas, direct ingress,
# user code on the replica's event loop (model code runs torch on its own worker thread).
export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
# A replaced or stopping ingress replica stays reachable this long before it refuses new
# connections (Ray's default, 30 s, is for load balancers outside Ray that take that long to
# deregister it). Here Serve's own HAProxy is in front: it learns of the change within 0.1 s and
# retries a refused connection on another replica. At 30 s, stopping the server spent Serve's
# whole 30 s shutdown on the ingress, and the other replicas (the registrar among them, which
# withdraws the models from the AI network's nodes) were killed without their graceful stop.
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="${RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S:-5}"
# One setting for every Ray process of this server: Ray 2.60 enables token auth once a
# token exists, and `serve status` / `ray start --address` must agree with the cluster.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"

# Say when every model is live: `serve run`'s own output ends at "Submitted deploy config",
# before any model has loaded. A background check of /ready once a second (bash's /dev/tcp: no
# interpreter started per check), that ends with the server.
read -r host port prefix < <(.venv/bin/python - "$config" <<'PY' 2>/dev/null || echo "127.0.0.1 1088 /"
import sys, yaml
config = yaml.safe_load(open(sys.argv[1])) or {}
apps, http = config.get("applications") or [{}], config.get("http_options") or {}
host = http.get("host") or "127.0.0.1"  # Serve's default; every address (0.0.0.0, ::) includes loopback
print("127.0.0.1" if host in ("0.0.0.0", "::") else host, http.get("port", 8000),
      (apps[0].get("route_prefix") or "/").rstrip("/") or "/")
PY
)
# Not ready after SERVE_SH_NOT_READY_NOTE_S seconds (180), it says so once, with /ready's answer:
# Serve's replica failures reach only its log files under the fast settings.
announce_when_ready() {
    local server=$1 path="${prefix%/}/ready" status="" body="" line="" noted=0
    local note_after="${SERVE_SH_NOT_READY_NOTE_S:-180}"
    trap '' PIPE  # a connection closed under the request (the port changing hands at start) is one more try
    while kill -0 "$server" 2>/dev/null; do
        sleep 1
        status="" body=""
        if { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
            { printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$host" >&3 && read -r -t 5 _ status _ <&3 &&
              while IFS= read -r -t 5 line || [[ -n "$line" ]]; do body="$line"; line=""; done <&3; } 2>/dev/null || true
            exec 3<&-
        fi
        if [[ "$status" != 200 && "$noted" == 0 && "$SECONDS" -ge "$note_after" ]]; then
            noted=1
            echo "serve.sh: not every model is live after ${SECONDS} s (GET ${path}: ${body:-no answer yet}): a model" \
                 "may still be loading (a hub checkpoint downloads first), waiting for a GPU, or failing to start;" \
                 "'.venv/bin/serve status' says which (replica logs: logs/serve/ in Ray's session folder)" >&2
        fi
        if [[ "$status" == 200 ]]; then
            echo "serve.sh: ready: every model is live at http://$host:$port${prefix%/} (GET ${path})" >&2
            return
        elif [[ "$status" == 401 ]]; then  # /ready behind the API keys (auth.protect_health): not told here
            echo "serve.sh: the server answers at http://$host:$port${prefix%/}; ${path} needs an API key" \
                 "(auth.protect_health), so whether every model is live is not checked here" >&2
            return
        fi
    done
}
announce_when_ready $$ &

# `serve run` shuts Serve down gracefully (replicas drain, the registrar withdraws the models from
# the AI network's nodes) only on SIGINT; a SIGTERM (kill, systemd, Docker) ends it through
# ray.init's handler, abruptly, and the nodes keep forwarding users to a dead port. So it runs as
# a job of its own (`set -m`: its own process group, which Ctrl-C does not reach directly), with
# SIGINT handled even where this script inherited it ignored (serve_app/serve_run.py), and this
# shell turns its own SIGTERM, SIGINT, SIGHUP (the terminal closed) or SIGQUIT into one SIGINT to
# it; a second signal stops it at once.
# Serve's HAProxy keeps its config, sockets and logs in /tmp/haproxy-serve/<node id>/, a new
# folder for every start of Ray that nothing removes: here they go in a folder of this run's
# (short: HAProxy takes socket paths of 97 characters at most, and Serve adds the node id's 56),
# removed as it ends. Made just before the trap that removes it; not where Ray runs already
# (RAY_ADDRESS: its HAProxy has its settings) or where any of these is set.
haproxy_dir=""
if [[ -z "${RAY_ADDRESS:-}${RAY_SERVE_HAPROXY_CONFIG_FILE_LOC:-}${RAY_SERVE_HAPROXY_SOCKET_PATH:-}${RAY_SERVE_HAPROXY_SERVER_STATE_BASE:-}${RAY_SERVE_HAPROXY_SERVER_STATE_FILE:-}${RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH:-}" ]]; then
    haproxy_dir="$(mktemp -d /tmp/sa-hap.XXXXXX)"
    export RAY_SERVE_HAPROXY_CONFIG_FILE_LOC="$haproxy_dir/haproxy.cfg" \
        RAY_SERVE_HAPROXY_SOCKET_PATH="$haproxy_dir/admin.sock" \
        RAY_SERVE_HAPROXY_SERVER_STATE_BASE="$haproxy_dir" \
        RAY_SERVE_HAPROXY_SERVER_STATE_FILE="$haproxy_dir/server-state" \
        RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH="$haproxy_dir/metrics.sock"
fi
remove_haproxy_dir() {  # unless an HAProxy still runs from it (one a stop at once left behind)
    [[ -n "$haproxy_dir" ]] || return 0
    if pgrep -f -- "$haproxy_dir/" >/dev/null 2>&1; then
        echo "serve.sh: HAProxy still runs from $haproxy_dir; left in place" >&2 2>/dev/null || true
    else
        rm -rf -- "$haproxy_dir" || true
    fi
}
server=""
stop_server() {
    if [[ -z "$server" ]]; then  # nothing started yet
        remove_haproxy_dir
        exit 143
    fi
    trap 'kill -TERM "$server" 2>/dev/null || true' TERM INT HUP QUIT
    echo "serve.sh: stopping: Serve shuts down gracefully (signal again to stop at once)" >&2 2>/dev/null || true
    kill -INT "$server" 2>/dev/null || true
}
trap stop_server TERM INT HUP QUIT
set -m
.venv/bin/python -m serve_app.serve_run "$config" &
server=$!
set +m
status=0
wait "$server" || status=$?  # also when it has ended already (bash keeps its status)
while kill -0 "$server" 2>/dev/null; do  # a trap interrupted the wait: wait again for its end
    status=0
    wait "$server" || status=$?
done
remove_haproxy_dir
exit "$status"
