#!/usr/bin/env bash
# lisa-train under torchrun, one node or many (c10d rendezvous), with FSDP2 or DeepSpeed.
# Run this script once per node; every node gets the same NNODES and RDZV_ENDPOINT.
#
# Usage: [ENV=...] launch/torchrun.sh [lisa-train flags]
#   NPROC_PER_NODE=8 launch/torchrun.sh --model meta-llama/Llama-2-7b-hf
#   # two nodes, on each (NODE_RANK=0 on node0, 1 on node1):
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=node0 launch/torchrun.sh --model /models/llama2-70b
#   BACKEND=deepspeed DS_CONFIG=ds_configs/zero3.json NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh ...
#   DRY_RUN=1 launch/torchrun.sh ...     # print the command instead of running it
#
# Environment (default):
#   BACKEND         fsdp2 or deepspeed (fsdp2); DeepSpeed reads torchrun's RANK/WORLD_SIZE/MASTER_* env
#   DS_CONFIG       with BACKEND=deepspeed (ds_configs/zero2.json)
#   NNODES          nodes (1)
#   NPROC_PER_NODE  processes per node (gpu: one per visible GPU; CPU-only machines must set a number)
#   NODE_RANK       this node's rank (0); used by RDZV_BACKEND=static only: c10d numbers nodes by arrival
#   MASTER_ADDR     host of the rendezvous store, reachable from every node (127.0.0.1)
#   MASTER_PORT     its port (29500)
#   RDZV_ENDPOINT   host:port of the rendezvous ($MASTER_ADDR:$MASTER_PORT)
#   RDZV_BACKEND    c10d or static (c10d)
#   RDZV_ID         job id shared by all nodes (lisa)
#   GLOO_SOCKET_IFNAME  interface gloo binds to (NNODES > 1: the one this node reaches the rendezvous
#                   host through, launch/netif.sh; one node: gloo's own choice, the hostname's address)
#   NCCL_SOCKET_IFNAME  passed through (unset: NCCL's own choice, which skips lo and docker*)
#   TORCHRUN_ARGS   extra torchrun flags, word-split (e.g. "--max_restarts 1")
#   DRY_RUN         1: echo the command and exit
# The module form `python -m lisa_dist.train` is lisa-train.
set -euo pipefail

BACKEND=${BACKEND:-fsdp2}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
RDZV_ID=${RDZV_ID:-lisa}
# Restarted workers (--max_restarts) otherwise reuse the rendezvous store and read the dead rank's
# stale address: gloo's connectFullMesh is then refused (torch 2.13, tests/distributed/test_checkpoint.py).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# gloo binds to its hostname's address, loopback where /etc/hosts maps the hostname to 127.0.1.1.
if [[ $NNODES != 1 && -z ${GLOO_SOCKET_IFNAME:-} ]]; then
    # shellcheck source=launch/netif.sh
    source "$(dirname "${BASH_SOURCE[0]}")/netif.sh"
    GLOO_SOCKET_IFNAME=$(gloo_ifname "${RDZV_ENDPOINT%:*}")
    [[ -z $GLOO_SOCKET_IFNAME ]] || export GLOO_SOCKET_IFNAME
fi

case $BACKEND in
    fsdp2) backend_args=(--backend fsdp2) ;;
    deepspeed)
        DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
        [[ -f $DS_CONFIG ]] || { echo "torchrun.sh: DS_CONFIG=$DS_CONFIG not found; run from the repository root or set DS_CONFIG" >&2; exit 2; }
        backend_args=(--backend deepspeed --deepspeed "$DS_CONFIG") ;;
    *) echo "torchrun.sh: BACKEND must be fsdp2 or deepspeed, got '$BACKEND'" >&2; exit 2 ;;
esac
node_args=()
[[ $RDZV_BACKEND == static ]] && node_args=(--node_rank "$NODE_RANK")

run() { if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@" | sed 's/ $/\n/'; else exec "$@"; fi; }

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags on purpose
run torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${node_args[@]}" --rdzv_backend "$RDZV_BACKEND" --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" ${TORCHRUN_ARGS:-} -m lisa_dist.train "${backend_args[@]}" "$@"
