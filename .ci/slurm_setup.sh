#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the `slurm` launch tests (tests/slurm/test_slurm.py).
#
# Usage (as root; idempotent, safe to re-run):  bash .ci/slurm_setup.sh
#
# Installs slurm-wlm and munge from the distribution if sbatch is missing, writes a slurm.conf for a
# single node named after `hostname -s` with this machine's CPUs and memory, starts munged,
# slurmctld and slurmd (no systemd in CI containers, so they are started directly) and waits until
# the node is idle. Daemons already running are left alone.
set -euo pipefail

if [[ $(id -u) != 0 ]]; then
    echo "slurm_setup.sh: must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

node=$(hostname -s)
cpus=$(nproc)
# Leave 1 GiB to the OS: slurmd drains a node whose RealMemory exceeds what it finds.
mem_mib=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge

# munge refuses keys and directories that others can read or write.
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge

# Root runs the daemons (SlurmUser=root); no cgroups (containers rarely allow them), so process
# tracking is by parent pid and tasks are not pinned.
cat > "$conf_dir/slurm.conf.new" <<CONF
ClusterName=lisa-ci
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
NodeName=$node CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
changed=0
if ! cmp -s "$conf_dir/slurm.conf.new" "$conf_dir/slurm.conf"; then
    mv "$conf_dir/slurm.conf.new" "$conf_dir/slurm.conf"
    changed=1
else
    rm "$conf_dir/slurm.conf.new"
fi

running() { pgrep -x "$1" >/dev/null; }

if ! running munged; then
    runuser -u munge -- munged
fi
if (( changed )) && running slurmctld; then
    # A new node definition needs both daemons restarted, not just reconfigured.
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 30); do running slurmctld || running slurmd || break; sleep 1; done
fi
if ! running slurmctld; then slurmctld; fi
if ! running slurmd; then slurmd; fi

for _ in $(seq 60); do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    case $state in
        idle|mixed|allocated) echo "slurm_setup.sh: node $node is $state"; exit 0 ;;
        drain*|down*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
echo "slurm_setup.sh: node $node did not become idle in 60 s (state: ${state:-unknown}); see /var/log/slurm/" >&2
exit 1
