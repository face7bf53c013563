"""A Slurm cluster over the namespace hosts of netns_hosts: slurmctld on h0, a slurmd per host
(`NodeName=hN NodeAddr=<its address>`), all with a slurm.conf, munge key and socket of their own in
the test's directory (SLURM_CONF points sbatch, srun and scontrol at it), so the machine's own
cluster, if any, is neither used nor touched. The daemons live in the hosts' namespaces, so
`Cluster.close` ends them with everything else.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

from netns_hosts import Cluster


def unavailable_reason() -> Optional[str]:
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install slurm-wlm munge, or bash .ci/slurm_setup.sh)"
    return None


class Slurm:
    def __init__(self, cluster: Cluster, cpus_per_node: int = 1):
        self.cluster = cluster
        self.dir = cluster.dir / "slurm"
        self.dir.mkdir()
        self.conf = self.dir / "slurm.conf"
        self.socket = self.dir / "munge.socket"
        self._start_munge()
        self._write_conf(cpus_per_node)
        for sub in ["ctld"] + [f"spool-{h.name}" for h in cluster.hosts]:
            (self.dir / sub).mkdir()
        head = cluster[0]
        self._daemon(head, "slurmctld", ["slurmctld", "-D", "-i"])
        for host in cluster.hosts:
            self._daemon(host, f"slurmd-{host.name}", [
                "sh", "-c", f'set -e; {_mount_cgroups()} exec "$@"', "-", "slurmd", "-D", "-N", host.name])
        self._wait_idle()

    def env(self) -> Dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _start_munge(self) -> None:
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # On h0 like the other daemons; the socket is a file, so every host's daemons reach it.
        self._daemon(self.cluster[0], "munged", [
            "munged", "-F", "--force", f"--socket={self.socket}", f"--key-file={key}",
            f"--pid-file={self.dir / 'munged.pid'}", f"--log-file={self.dir / 'munged.log'}",
            f"--seed-file={self.dir / 'munged.seed'}"])
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {(self.dir / 'munged.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def _write_conf(self, cpus: int) -> None:
        d = self.dir
        nodes = "".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs={cpus} RealMemory=1000 State=UNKNOWN\n"
                        for h in self.cluster.hosts)
        names = ",".join(h.name for h in self.cluster.hosts)
        self.conf.write_text(
            "ClusterName=lisa-netns\n"
            f"SlurmctldHost={self.cluster[0].name}({self.cluster[0].addr})\n"
            "SlurmUser=root\n"
            "AuthType=auth/munge\n"
            "CredType=cred/munge\n"
            f"AuthInfo=socket={self.socket}\n"
            f"StateSaveLocation={d / 'ctld'}\n"
            f"SlurmdSpoolDir={d / 'spool-%n'}\n"
            f"SlurmctldPidFile={d / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={d / 'slurmd-%n.pid'}\n"
            f"SlurmctldLogFile={d / 'slurmctld.log'}\n"
            f"SlurmdLogFile={d / 'slurmd-%n.log'}\n"
            "ProctrackType=proctrack/linuxproc\n"
            "TaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            "SelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\n"
            "MpiDefault=none\n"
            "ReturnToService=2\n"
            + nodes +
            f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP\n")

    def _daemon(self, host, name: str, argv) -> None:
        log = open(self.dir / f"{name}.out", "w")
        host.popen(argv, env=dict(os.environ, SLURM_CONF=str(self.conf)), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.cluster[0].run(["sinfo", "-h", "-N", "-o", "%N %T"], env=dict(os.environ, **self.env()))
            state = proc.stdout + proc.stderr
            lines = [line.split() for line in proc.stdout.splitlines() if line.strip()]
            if len(lines) == len(self.cluster.hosts) and all(s in ("idle", "mixed") for _, s in lines):
                return
            time.sleep(0.5)
        logs = {p.name: p.read_text()[-1500:] for p in self.dir.glob("*.log")}
        raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f} s: {state}\n{logs}")


def _mount_cgroups() -> str:
    """Shell commands mounting the cgroup hierarchies this machine has at /sys/fs/cgroup (v1, hybrid or
    v2): `ip netns exec` mounts a fresh /sys without them and slurmd refuses to start. They land in the
    host's own mount namespace only."""
    cmds = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, fstype, opts = line.split()[:4]
        if not where.startswith("/sys/fs/cgroup"):
            continue
        if fstype == "tmpfs":
            cmds.append(f"mount -t tmpfs -o mode=755 cgroup_root {where};")
        elif fstype in ("cgroup", "cgroup2"):
            cmds.append(f"mkdir -p {where}; mount -t {fstype} -o {opts} {fstype} {where};")
    return " ".join(cmds)
