#!/usr/bin/env bash
# Start the server in the foreground with Ray Serve's fastest documented settings
# (see README, "Serving path"). Any of them can be turned off from the environment,
# e.g. `RAY_SERVE_ENABLE_HA_PROXY=0 ./scripts/serve.sh`.
#
#   ./scripts/serve.sh [CONFIG]        CONFIG defaults to the repo's serve_config.yaml; a relative
#                                      path is read from the current directory first, then the repo's
set -euo pipefail
config="${1:-serve_config.yaml}"
if [[ $# -ge 1 && -f "$config" ]]; then  # a file named from the caller's directory, before the cd below
    config="$(realpath "$config")"
fi
cd "$(dirname "$0")/.."

# HAProxy in front instead of Serve's Python proxy (the binary ships with ray[serve]).
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
# Fewer hops and threads per request: gRPC between proxy and replicas, direct ingress,
# user code on the replica's event loop (model code runs torch on its own worker thread).
export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
# One setting for every Ray process of this server: Ray 2.60 enables token auth once a
# token exists, and `serve status` / `ray start --address` must agree with the cluster.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"

exec .venv/bin/serve run "$config"
