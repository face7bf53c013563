#!/usr/bin/env bash
# lisa-train under the DeepSpeed launcher: one node, or many listed in a hostfile (reached over pdsh/ssh).
#
# Usage: [ENV=...] launch/deepspeed.sh [lisa-train flags]
#   launch/deepspeed.sh --model meta-llama/Llama-2-7b-hf --activated-layers 2 --interval-steps 20
#   NUM_GPUS=4 DS_CONFIG=ds_configs/zero1.json launch/deepspeed.sh --model /models/llama2-7b
#   HOSTFILE=hosts DS_CONFIG=ds_configs/zero3.json launch/deepspeed.sh --model /models/llama2-70b
#   DRY_RUN=1 launch/deepspeed.sh ...     # print the command instead of running it
#
# Environment (default):
#   DS_CONFIG      DeepSpeed JSON (ds_configs/zero2.json)
#   NUM_GPUS       processes per node (every visible GPU); CPU-only machines must set it
#   HOSTFILE       "hostname slots=8" per line for multi-node (unset: this node only)
#   NUM_NODES      use the first N hosts of HOSTFILE (all)
#   MASTER_ADDR    rank 0's address (with HOSTFILE: DeepSpeed runs `ssh <first host> hostname -I` and takes
#                  the first address; else 127.0.0.1)
#   MASTER_PORT    rendezvous port (29500)
#   LAUNCHER_ARGS  extra `deepspeed` launcher flags, word-split (e.g. "--launcher openmpi")
#   DRY_RUN        1: echo the command and exit
# The module form `python -m lisa_dist.train` is lisa-train; it makes every node run the launcher's Python.
# Multi-node: remote ranks get only PYTHON*/UCX*/MV2* and the accelerator's variables (NCCL_* on GPUs)
# from this shell; list anything else as VAR=value lines in ./.deepspeed_env or ~/.deepspeed_env (or
# the file DS_ENV_FILE names). On CPU (gloo) that includes GLOO_SOCKET_IFNAME where a host's name
# resolves to loopback (launch/netif.sh says why); there is no default for it here, since this
# script runs on one host only and cannot see the others' interfaces.
set -euo pipefail

DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
[[ -f $DS_CONFIG ]] || { echo "deepspeed.sh: DS_CONFIG=$DS_CONFIG not found; run from the repository root or set DS_CONFIG" >&2; exit 2; }
[[ -z ${HOSTFILE:-} || -f $HOSTFILE ]] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE not found" >&2; exit 2; }

# A GLOO_SOCKET_IFNAME set only in this shell would silently reach this host's ranks alone.
if [[ -n ${HOSTFILE:-} && -n ${GLOO_SOCKET_IFNAME:-} ]]; then
    env_file=${DS_ENV_FILE:-.deepspeed_env}
    grep -qs '^GLOO_SOCKET_IFNAME=' "$env_file" "$HOME/$env_file" ||
        echo "deepspeed.sh: warning: GLOO_SOCKET_IFNAME reaches only this host's ranks; list it in $env_file to set it on every host" >&2
fi

run() { if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@" | sed 's/ $/\n/'; else exec "$@"; fi; }

# shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of flags on purpose
run deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${NUM_NODES:+--num_nodes "$NUM_NODES"} ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --master_port "$MASTER_PORT" ${LAUNCHER_ARGS:-} --module lisa_dist.train --backend deepspeed --deepspeed "$DS_CONFIG" "$@"
