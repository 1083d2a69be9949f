#!/usr/bin/env bash
# Join a Ray cluster as a node without CPUs, then run a command (the driver) on this node.
#
# Usage: bash docker/join-cluster.sh HEAD_HOST:PORT COMMAND [ARGS...]
#   e.g. bash docker/join-cluster.sh ray-head:6379 gradcomp-launch --address ray-head:6379 ...
#
# Why: a Ray driver connects through a raylet on its own machine (ray.init(address=...) looks
# for a local node of that cluster), so the job container must be a node of the cluster before
# gradcomp-launch runs. --num-cpus=0 keeps training workers off this node.
# Token authentication comes from the environment (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH
# set by docker/compose.yaml); nothing here handles the token itself.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: bash docker/join-cluster.sh HEAD_HOST:PORT COMMAND [ARGS...]" >&2
    exit 2
fi
head_address="$1"
shift

ray start --address="$head_address" --num-cpus=0
exec "$@"
