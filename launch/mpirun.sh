#!/usr/bin/env bash
# lisa-train with DeepSpeed under Open MPI's mpirun: one rank per GPU, any number of hosts.
# Ranks find each other through DeepSpeed's MPI discovery (deepspeed.init_distributed with
# auto_mpi_discovery, via mpi4py): with no RANK/WORLD_SIZE in the environment it takes rank and size
# from MPI.COMM_WORLD, LOCAL_RANK from the processor names and MASTER_ADDR from rank 0's `hostname -I`.
#
# Usage: [ENV=...] launch/mpirun.sh [lisa-train flags]
#   NP=8 launch/mpirun.sh --model meta-llama/Llama-2-7b-hf
#   NP=32 HOSTFILE=hosts DS_CONFIG=ds_configs/zero3.json launch/mpirun.sh --model /models/llama2-70b
#   DRY_RUN=1 NP=2 launch/mpirun.sh ...     # print the command instead of running it
# As root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
#
# Environment (default):
#   NP           total ranks (required)
#   HOSTFILE     Open MPI hostfile, "node0 slots=8" per line (unset: this host)
#   DS_CONFIG    DeepSpeed JSON (ds_configs/zero2.json)
#   MASTER_PORT  rendezvous port, forwarded to the ranks (29500)
#   PYTHON       interpreter on every host (this host's python3)
#   GLOO_SOCKET_IFNAME  interface gloo binds to on every host (with HOSTFILE: the one this host reaches
#                the first host of HOSTFILE through, launch/netif.sh, so the same name on every host;
#                without: gloo's own choice). Set it where the hosts' interface names differ.
#   NCCL_SOCKET_IFNAME  forwarded when set (unset: NCCL's own choice, which skips lo and docker*)
#   MPIRUN_ARGS  extra mpirun flags, word-split (e.g. "--oversubscribe" or "--mca btl_tcp_if_include eth0")
#   DRY_RUN      1: echo the command and exit
# Requires mpi4py in the training environment (pip install mpi4py).
set -euo pipefail

DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
PYTHON=${PYTHON:-$(command -v python3)}
export MASTER_PORT=${MASTER_PORT:-29500}
[[ -n ${NP:-} ]] || { echo "mpirun.sh: set NP to the total number of ranks (GPUs over all hosts)" >&2; exit 2; }
[[ -f $DS_CONFIG ]] || { echo "mpirun.sh: DS_CONFIG=$DS_CONFIG not found; run from the repository root or set DS_CONFIG" >&2; exit 2; }
[[ -z ${HOSTFILE:-} || -f $HOSTFILE ]] || { echo "mpirun.sh: HOSTFILE=$HOSTFILE not found" >&2; exit 2; }

# gloo binds to its hostname's address, loopback where /etc/hosts maps the hostname to 127.0.1.1.
if [[ -n ${HOSTFILE:-} && -z ${GLOO_SOCKET_IFNAME:-} ]]; then
    # shellcheck source=launch/netif.sh
    source "$(dirname "${BASH_SOURCE[0]}")/netif.sh"
    GLOO_SOCKET_IFNAME=$(gloo_ifname "$(awk '$1 !~ /^#/ && NF {print $1; exit}' "$HOSTFILE")")
    [[ -z $GLOO_SOCKET_IFNAME ]] || export GLOO_SOCKET_IFNAME
fi

# Remote ranks start with a bare environment: forward what the training process reads, if set here.
forward=()
for var in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV MASTER_PORT OMP_NUM_THREADS HF_HOME HF_HUB_OFFLINE \
           TORCH_EXTENSIONS_DIR NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA GLOO_SOCKET_IFNAME; do
    [[ -n ${!var:-} ]] && forward+=(-x "$var")
done

run() { if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@" | sed 's/ $/\n/'; else exec "$@"; fi; }

# --bind-to none: Open MPI pins each rank to one core by default, which starves data loading and the
# communication threads of a GPU rank.
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of flags on purpose
run mpirun -np "$NP" ${HOSTFILE:+--hostfile "$HOSTFILE"} --bind-to none "${forward[@]}" ${MPIRUN_ARGS:-} "$PYTHON" -m lisa_dist.train --backend deepspeed --deepspeed "$DS_CONFIG" "$@"
