"""Separate hosts on one machine for multi-node launcher tests: a network namespace per host.

`Cluster(n)` builds hosts h0..h(n-1): one network namespace each, all joined by a bridge in a
namespace of their own (`<prefix>-sw`, the "switch"), each host with one address 10.213.0.(i+1)/24
on its `eth0` and loopback; no default route, so nothing can leave the namespaces. Per host:

- its own hostname (a UTS namespace: `hostname`, `MPI.Get_processor_name()` and gloo's address
  lookup see h0, h1, ... as on separate machines);
- /etc/hosts naming every host (iproute2 bind-mounts /etc/netns/<ns>/hosts over /etc/hosts for
  `ip netns exec`), and /etc/ssh holding an ssh_config with a test key and known_hosts, so a plain
  `ssh h1 cmd` works non-interactively from any host (pdsh and Open MPI's ssh launcher call just that);
- an sshd (Debian's openssh-server) on the host's address, key authentication only, whose sessions
  get PATH with this Python's bin directory first (like a cluster's login profile).

The filesystem is shared by every host, as a cluster's NFS home and project directories are.
`close()` kills every process left in the namespaces, deletes them (their veths go with them)
and removes /etc/netns/<ns>; the pytest fixtures call it whatever the test did.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SUBNET = "10.213.0"
NETNS_ETC = Path("/etc/netns")


def unavailable_reason() -> Optional[str]:
    """Why hosts cannot be built here, or None."""
    if os.geteuid() != 0:
        return "multi-node tests need root (network namespaces, sshd)"
    for tool in ("ip", "unshare", "sshd", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 util-linux openssh-server openssh-client)"
    probe = f"lisa-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


class Host:
    def __init__(self, cluster: "Cluster", index: int):
        self.name = f"h{index}"
        self.netns = f"{cluster.prefix}-{self.name}"
        self.addr = f"{SUBNET}.{index + 1}"
        self.dir = cluster.dir / self.name
        self.sshd: Optional[subprocess.Popen] = None

    def command(self, argv: Sequence[str]) -> List[str]:
        """argv run on this host: inside its network namespace, under its hostname."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Started in a session of its own, so `Cluster.close` and timeouts can end its whole tree."""
        return subprocess.Popen(self.command(argv), start_new_session=True, **kwargs)

    def run(self, argv: Sequence[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.command(argv), timeout=timeout, text=True, **kwargs)

    def pids(self) -> List[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> int:
        """SIGKILL every process on this host (sshd, launchers, ranks): the host crashed. Returns how many."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)


class Cluster:
    def __init__(self, n: int, workdir: Path, self_on_loopback: bool = False):
        """self_on_loopback: each host's /etc/hosts maps its own name to 127.0.1.1, as Debian's
        installer writes it, so a process that binds to its hostname's address binds loopback."""
        self.self_on_loopback = self_on_loopback
        self.prefix = f"lisa-{uuid.uuid4().hex[:6]}"
        self.dir = Path(workdir)
        self.hosts = [Host(self, i) for i in range(n)]
        self.switch = f"{self.prefix}-sw"
        self._netns: List[str] = []
        self.ssh_config = self.dir / "ssh" / "ssh_config"
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    # --- building ------------------------------------------------------------------------------------

    def _ip(self, *args: str, netns: Optional[str] = None) -> None:
        cmd = ["ip", *(["-n", netns] if netns else []), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")

    def _build(self) -> None:
        for ns in [self.switch] + [h.netns for h in self.hosts]:
            self._ip("netns", "add", ns)
            self._netns.append(ns)
            self._ip("link", "set", "lo", "up", netns=ns)
        self._ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        self._ip("link", "set", "br0", "up", netns=self.switch)
        for i, host in enumerate(self.hosts):
            # Both ends are created in the switch namespace (no name clash with the machine's links),
            # then one end moves into the host and is renamed eth0 there.
            port, end = f"p{i}", f"e{i}"
            self._ip("link", "add", port, "type", "veth", "peer", "name", end, netns=self.switch)
            self._ip("link", "set", end, "netns", host.netns, "name", "eth0", netns=self.switch)
            self._ip("link", "set", port, "master", "br0", "up", netns=self.switch)
            self._ip("addr", "add", f"{host.addr}/24", "dev", "eth0", netns=host.netns)
            self._ip("link", "set", "eth0", "up", netns=host.netns)
        self._write_keys_and_configs()
        for host in self.hosts:
            self._start_sshd(host)
        self._wait_for_ssh()

    def hosts_file_text(self, host: Host) -> str:
        lines = ["127.0.0.1 localhost"] + [
            f"{'127.0.1.1' if self.self_on_loopback and h is host else h.addr} {h.name}" for h in self.hosts]
        return "\n".join(lines) + "\n"

    def _write_keys_and_configs(self) -> None:
        ssh_dir = self.ssh_config.parent
        ssh_dir.mkdir(parents=True)
        key = ssh_dir / "id_ed25519"
        _keygen(key)
        (self.dir / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        known = []
        for host in self.hosts:
            host.dir.mkdir(parents=True)
            _keygen(host.dir / "ssh_host_ed25519_key")
            known.append(f"{host.name},{host.addr} {(host.dir / 'ssh_host_ed25519_key.pub').read_text().strip()}")
        (ssh_dir / "known_hosts").write_text("\n".join(known) + "\n")
        self.ssh_config.write_text(
            "Host *\n"
            "  User root\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {ssh_dir / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 5\n"
            "  ServerAliveInterval 5\n"
            "  ServerAliveCountMax 2\n"
            "  LogLevel ERROR\n")
        session_path = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        for host in self.hosts:
            etc = NETNS_ETC / host.netns
            (etc / "ssh").mkdir(parents=True)
            (etc / "hosts").write_text(self.hosts_file_text(host))
            shutil.copy(self.ssh_config, etc / "ssh" / "ssh_config")
            (host.dir / "sshd_config").write_text(
                # Every address of the host's namespace (loopback and eth0): nothing else can reach it.
                "ListenAddress 0.0.0.0\n"
                f"HostKey {host.dir / 'ssh_host_ed25519_key'}\n"
                f"PidFile {host.dir / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                # pytest's tmp directories are not root-owned 0755 all the way up.
                "StrictModes no\n"
                "PrintMotd no\n"
                "UseDNS no\n"
                # pdsh and Open MPI open one connection per host at once; several launches may overlap.
                "MaxStartups 64\n"
                "MaxSessions 64\n"
                f"SetEnv PATH={session_path}\n")

    def _start_sshd(self, host: Host) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        log = open(host.dir / "sshd.log", "w")
        host.sshd = host.popen([shutil.which("sshd"), "-D", "-e", "-f", str(host.dir / "sshd_config")],
                               stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _wait_for_ssh(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        pairs = [(a, b) for a in self.hosts for b in self.hosts]
        while pairs:
            a, b = pairs[0]
            proc = a.run(["ssh", b.name, "hostname"], timeout=15)
            if proc.returncode == 0 and proc.stdout.strip() == b.name:
                pairs.pop(0)
                continue
            if time.monotonic() > deadline:
                logs = {h.name: (h.dir / "sshd.log").read_text()[-2000:] for h in self.hosts}
                raise RuntimeError(f"ssh {a.name} -> {b.name} failed: {proc.stdout}{proc.stderr}\nsshd logs: {logs}")
            time.sleep(0.2)

    # --- using and closing -----------------------------------------------------------------------------

    def hostfile(self, path: Path, slots: int) -> Path:
        """A hostfile naming every host: DeepSpeed's and Open MPI's both read `name slots=N`."""
        path.write_text("".join(f"{h.name} slots={slots}\n" for h in self.hosts))
        return path

    def close(self) -> None:
        # Processes first: a namespace whose processes live on is only unlinked, not freed.
        for _ in range(3):
            alive = sum(h.kill_all() for h in self.hosts if h.netns in self._netns)
            if not alive:
                break
            time.sleep(0.2)
        for host in self.hosts:
            if host.sshd is not None:
                try:
                    host.sshd.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for ns in reversed(self._netns):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self._netns.clear()
        for host in self.hosts:
            shutil.rmtree(NETNS_ETC / host.netns, ignore_errors=True)
        try:
            NETNS_ETC.rmdir()  # only if no other namespace has files there
        except OSError:
            pass


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lisa-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


def env_for_hosts(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The launch environment (launch_util.launch_env) without this machine's rendezvous variables."""
    from launch_util import launch_env
    env = launch_env(extra)
    for var in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if extra is None or var not in extra:
            env.pop(var, None)
    return env
