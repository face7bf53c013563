"""The launchers across two hosts: network namespaces with their own addresses, hostnames and sshd
(tests/netns_hosts.py), the tiny preset on CPU (gloo), one rank per host unless said otherwise.

- torchrun.sh once per host, c10d rendezvous at h0: every rank of every host logs the same schedule;
  with --max-restarts 1 and --resume auto, a rank SIGKILLed on h1 restarts on both hosts from the
  last checkpoint and the run ends with the uninterrupted run's weights, bit for bit;
- a crashed host (every process in h1's namespace SIGKILLed mid-run) fails the job on h0 within
  seconds, with torchrun naming the failed rank, instead of hanging;
- hosts whose /etc/hosts maps their own name to 127.0.1.1 (Debian's default): gloo would bind to
  loopback, torchrun.sh's GLOO_SOCKET_IFNAME default (launch/netif.sh) makes the job work;
- deepspeed.sh with a hostfile naming both hosts: DeepSpeed's pdsh runner over ssh, 2 ranks per host,
  MASTER_ADDR found by DeepSpeed as `ssh h0 hostname -I`;
- mpirun.sh across both hosts: Open MPI's ssh launcher, DeepSpeed's MPI discovery (rank and size from
  MPI, LOCAL_RANK from the processor names, MASTER_ADDR from rank 0's `hostname -I`);
- a two-node Slurm cluster (tests/netns_slurm.py: slurmctld on h0, a slurmd per host with its NodeAddr):
  generic.sbatch --nodes 2 (srun -> torchrun per node -> FSDP2) and the 70B A100 recipe (-> DeepSpeed
  ZeRO-3) with the tiny model saved as a local directory standing in.

Marker `multinode`; these need root and `ip netns` and are skipped otherwise. They run in their own
step (`python -m pytest -q -m multinode tests/multinode`, .ci/run), not in the default run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Sequence

import fault_injection
import pytest

import netns_slurm
from launch_checks import rank_schedules
from launch_util import ROOT
from lisa_dist.config import LisaConfig
from lisa_dist.sampling import LayerSampler
from netns_hosts import Cluster, Host, env_for_hosts, unavailable_reason

TINY_LAYERS, K = 8, 2
TINY = ["--interval-steps", str(K), "--batch-size", "2", "--max-length", "32", "--log-every", "2"]
TIMEOUT = 300


@pytest.fixture(scope="session")
def _hosts_possible():
    return unavailable_reason()


@pytest.fixture(scope="module", autouse=True)
def _own_step(request, _hosts_possible):
    """Module-scoped, so it runs before the module's host fixtures build anything."""
    # The default run (the README's `python -m pytest -q`) would run them a second time in CI.
    markexpr = request.config.option.markexpr or ""
    if "multinode" not in markexpr or "not multinode" in markexpr:
        pytest.skip("multi-node tests run in their own step: python -m pytest -q -m multinode tests/multinode")
    if _hosts_possible is not None:
        pytest.skip(_hosts_possible)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    hosts = Cluster(2, tmp_path_factory.mktemp("hosts"))
    try:
        yield hosts
    finally:
        hosts.close()


# --- helpers ---------------------------------------------------------------------------------------

def expected_schedule(steps: int) -> List[tuple]:
    sampler = LayerSampler(TINY_LAYERS, LisaConfig(activated_layers=2, interval_steps=K, seed=0))
    return [(k, k * K, sampler.active_layers(k)) for k in range(steps // K + 1)]


def assert_same_schedule(text: str, world_size: int, steps: int) -> None:
    schedules = rank_schedules(text)
    assert sorted(schedules) == [(r, world_size) for r in range(world_size)], (
        f"schedule lines from (rank, world size) {sorted(schedules)}:\n{text[-6000:]}")
    for (rank, _), schedule in schedules.items():
        assert schedule == expected_schedule(steps), f"rank {rank} logged {schedule}"


def assert_trained(out_dir: Path, world_size: int, steps: int) -> None:
    log = json.loads((out_dir / "lisa_log.json").read_text())
    assert log["world_size"] == world_size and len(log["losses"]) == steps


def stop_jobs(cluster: Cluster) -> None:
    """Whatever a launch left on any host (ranks reached over ssh are in no process group of ours)."""
    for host in cluster.hosts:
        for pid in host.pids():
            if host.sshd is None or pid != host.sshd.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def wait_all(procs: Sequence[subprocess.Popen], timeout: float) -> List[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]


def run_on(host: Host, cmd: Sequence[str], env: Dict[str, str], log: Path, timeout: float = TIMEOUT) -> str:
    """cmd on host, from the repository root; returns its output after asserting exit code 0."""
    with open(log, "w") as f:
        proc = host.popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    rc = wait_all([proc], timeout)[0]
    out = log.read_text()
    assert rc == 0, f"{cmd[:2]} on {host.name} exited {rc}:\n{out[-8000:]}"
    assert "terminate called" not in out, f"a rank aborted at exit:\n{out[-8000:]}"
    return out


def torchrun_on_hosts(cluster: Cluster, args: Sequence[str], out_dir: Path, env: Dict[str, str],
                      timeout: float = TIMEOUT):
    """launch/torchrun.sh on every host at once; returns (exit codes, per-host logs)."""
    env = env_for_hosts({"BACKEND": "deepspeed", "DS_CONFIG": "ds_configs/zero2.json",
                         "NNODES": str(len(cluster.hosts)),
                         "NPROC_PER_NODE": "1", "MASTER_ADDR": cluster[0].name, "MASTER_PORT": "29400",
                         "RDZV_ID": out_dir.name, **env})
    cmd = ["bash", "launch/torchrun.sh", *args, "--output-dir", str(out_dir)]
    logs = [out_dir.parent / f"{out_dir.name}-{h.name}.log" for h in cluster.hosts]
    procs = []
    try:
        for host, log in zip(cluster.hosts, logs):
            with open(log, "w") as f:
                procs.append(host.popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        codes = wait_all(procs, timeout)
    finally:
        stop_jobs(cluster)
    return codes, [log.read_text() for log in logs]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "model.safetensors"))


# --- the hosts themselves ------------------------------------------------------------------------------

def test_hosts_are_separate_and_reach_each_other_by_name(cluster):
    for host in cluster.hosts:
        proc = host.run(["sh", "-c", "hostname; hostname -I; ip -o route; for h in h0 h1; do ssh $h hostname; done"])
        assert proc.returncode == 0, proc.stderr
        name, addrs, *rest = proc.stdout.splitlines()
        assert name == host.name and addrs.split() == [host.addr]
        routes, ssh_names = rest[:-2], rest[-2:]
        # One on-link route and no default route: nothing leaves the namespaces.
        assert len(routes) == 1 and routes[0].startswith("10.213.0.0/24 dev eth0"), routes
        assert ssh_names == ["h0", "h1"]


# --- torchrun ------------------------------------------------------------------------------------------

TORCHRUN_STEPS = 6
TORCHRUN_ARGS = ["--steps", str(TORCHRUN_STEPS), *TINY, "--save-steps", "2", "--resume", "auto"]


@pytest.fixture(scope="module")
def torchrun_straight(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "straight"
    codes, logs = torchrun_on_hosts(cluster, TORCHRUN_ARGS, out, {})
    return out, codes, logs


@pytest.mark.timeout(TIMEOUT + 60)
def test_torchrun_once_per_host(torchrun_straight):
    out, codes, logs = torchrun_straight
    assert codes == [0, 0], f"exit codes {codes}:\n" + "\n".join(log[-4000:] for log in logs)
    assert not any("terminate called" in log for log in logs)
    assert_same_schedule("\n".join(logs), 2, TORCHRUN_STEPS)
    # Each host's log holds only its own rank: the ranks really ran on separate hosts.
    assert sorted(sorted(rank_schedules(log)) for log in logs) == [[(0, 2)], [(1, 2)]]
    assert_trained(out, 2, TORCHRUN_STEPS)


@pytest.mark.timeout(TIMEOUT + 60)
def test_torchrun_restart_after_a_rank_on_h1_is_killed(cluster, torchrun_straight, tmp_path):
    straight, straight_codes, _ = torchrun_straight
    assert straight_codes == [0, 0], "the uninterrupted run failed (test_torchrun_once_per_host)"
    out = tmp_path / "restarted"
    codes, logs = torchrun_on_hosts(
        cluster, TORCHRUN_ARGS, out,
        {"TORCHRUN_ARGS": "--max-restarts 1", **fault_injection.env(kill_at_step=5, kill_rank=1)})
    text = "\n".join(logs)
    assert codes == [0, 0], f"exit codes {codes}:\n{text[-8000:]}"
    assert "exitcode: -9" in text, "rank 1 was not killed"
    assert "step-00000004 at step 4" in text and "resumed from" in text, text[-8000:]
    a, b = weights(out), weights(straight)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "the restarted run's weights differ from the uninterrupted run's"


@pytest.mark.timeout(TIMEOUT + 60)
def test_crashed_host_fails_the_job_fast(tmp_path):
    """Every process on h1 (its torchrun agent, rank and sshd) SIGKILLed mid-run, as when the machine
    dies with its kernel still answering: h0's rank sees the closed connections, exits, and torchrun on
    h0 ends the job non-zero in seconds, naming the failed rank; no hang until gloo's 30-minute timeout."""
    hosts = Cluster(2, tmp_path / "hosts")
    try:
        out = tmp_path / "crash"
        env = env_for_hosts({"BACKEND": "deepspeed", "DS_CONFIG": "ds_configs/zero2.json", "NNODES": "2",
                             "NPROC_PER_NODE": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29400", "RDZV_ID": "crash"})
        cmd = ["bash", "launch/torchrun.sh", "--steps", "100000", *TINY, "--no-save", "--output-dir", str(out)]
        logs = [tmp_path / f"{h.name}.log" for h in hosts.hosts]
        procs = []
        for host, log in zip(hosts.hosts, logs):
            with open(log, "w") as f:
                procs.append(host.popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT
        while "switch 2 at step 4" not in logs[1].read_text():
            assert procs[0].poll() is None and procs[1].poll() is None, logs[0].read_text()[-4000:]
            assert time.monotonic() < deadline, "the job never reached step 4"
            time.sleep(0.5)
        killed_at = time.monotonic()
        assert hosts[1].kill_all() >= 3  # sshd, torchrun's agent, the rank
        try:
            rc = procs[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"h0 still running 120 s after h1 crashed:\n{logs[0].read_text()[-4000:]}")
        seconds = time.monotonic() - killed_at
        text = logs[0].read_text()
        assert rc != 0, text[-4000:]
        assert seconds < 60, f"h0 took {seconds:.0f} s to give up"
        # gloo names the lost peer by address; torchrun's summary names the failed rank on h0.
        assert re.search(r"Connection (reset|closed) by peer", text) and "[10.213.0.2]" in text, text[-4000:]
        assert "lisa_dist.train FAILED" in text and "host      : h0" in text, text[-4000:]
    finally:
        hosts.close()


# --- deepspeed (pdsh over ssh) and mpirun (Open MPI over ssh) ------------------------------------------

SHORT_STEPS = 4
SHORT_ARGS = ["--steps", str(SHORT_STEPS), *TINY, "--no-save"]


def host_of_lines(text: str) -> Dict[str, str]:
    """pdsh prefixes every remote line with `host: `: host -> its lines."""
    by_host: Dict[str, List[str]] = {}
    for line in text.splitlines():
        m = re.match(r"(h\d+): (.*)", line)
        if m:
            by_host.setdefault(m.group(1), []).append(m.group(2))
    return {h: "\n".join(lines) for h, lines in by_host.items()}


@pytest.mark.timeout(TIMEOUT + 60)
def test_deepspeed_hostfile_two_hosts_two_ranks_each(cluster, tmp_path):
    hostfile = cluster.hostfile(tmp_path / "hostfile", slots=2)
    # Remote ranks get PYTHON* from this shell and what the DeepSpeed env file lists (deepspeed.sh header).
    ds_env = tmp_path / "deepspeed_env"
    forwarded = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if os.environ.get("TORCH_EXTENSIONS_DIR"):  # where this shell's DeepSpeed ops are built
        forwarded["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    ds_env.write_text("".join(f"{k}={v}\n" for k, v in forwarded.items()))
    env = env_for_hosts({"HOSTFILE": str(hostfile), "DS_CONFIG": "ds_configs/zero2.json", "DS_ENV_FILE": str(ds_env)})
    try:
        out = run_on(cluster[0], ["bash", "launch/deepspeed.sh", *SHORT_ARGS, "--output-dir", str(tmp_path / "run")],
                     env, tmp_path / "launcher.log")
    finally:
        stop_jobs(cluster)
    assert "--master_addr=10.213.0.1" in out, out[-6000:]  # DeepSpeed's `ssh h0 hostname -I`
    assert_same_schedule(out, 4, SHORT_STEPS)
    by_host = host_of_lines(out)
    assert {h: sorted(r for r, _ in rank_schedules(t)) for h, t in by_host.items()} == {"h0": [0, 1], "h1": [2, 3]}
    assert_trained(tmp_path / "run", 4, SHORT_STEPS)


@pytest.mark.timeout(TIMEOUT + 60)
def test_mpirun_two_hosts_deepspeed_mpi_discovery(cluster, tmp_path):
    pytest.importorskip("mpi4py", reason="mpirun.sh needs mpi4py (pip install mpi4py)")
    hostfile = cluster.hostfile(tmp_path / "hostfile", slots=1)
    env = env_for_hosts({"NP": "2", "HOSTFILE": str(hostfile), "MPIRUN_ARGS": "--display map",
                         "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    try:
        out = run_on(cluster[0], ["bash", "launch/mpirun.sh", *SHORT_ARGS, "--output-dir", str(tmp_path / "run")],
                     env, tmp_path / "launcher.log")
    finally:
        stop_jobs(cluster)
    # Open MPI's map (--display map): rank 0 on h0, rank 1 on h1, each started by a daemon on its host.
    placed = dict(re.findall(r"Data for node: (h\d).*?App rank: (\d+)", out, re.S))
    assert placed == {"h0": "0", "h1": "1"}, out[-6000:]
    assert_same_schedule(out, 2, SHORT_STEPS)
    assert_trained(tmp_path / "run", 2, SHORT_STEPS)


# --- interface selection -----------------------------------------------------------------------------

@pytest.mark.timeout(TIMEOUT + 60)
def test_torchrun_fsdp2_on_hosts_whose_name_is_loopback(tmp_path):
    """Each host's /etc/hosts maps its own name to 127.0.1.1 (Debian's installer does): gloo, binding to
    its hostname's address, would bind loopback and the other host could not connect. torchrun.sh's
    GLOO_SOCKET_IFNAME default (launch/netif.sh) picks eth0 on both hosts, and FSDP2 trains across them."""
    hosts = Cluster(2, tmp_path / "hosts", self_on_loopback=True)
    try:
        for host in hosts.hosts:
            probe = host.run(["bash", "-c",
                              "getent ahostsv4 $(hostname) | head -n 1; source launch/netif.sh; gloo_ifname h0"],
                             cwd=ROOT)
            assert probe.stdout.split()[::3] == ["127.0.1.1", "eth0"], probe.stdout + probe.stderr
        out = tmp_path / "run"
        codes, logs = torchrun_on_hosts(hosts, SHORT_ARGS, out, {"BACKEND": "fsdp2"})
        text = "\n".join(logs)
        assert codes == [0, 0], f"exit codes {codes}:\n{text[-8000:]}"
        assert "terminate called" not in text
        assert_same_schedule(text, 2, SHORT_STEPS)
        assert sorted(sorted(rank_schedules(log)) for log in logs) == [[(0, 2)], [(1, 2)]]
        assert_trained(out, 2, SHORT_STEPS)
    finally:
        hosts.close()


def test_deepspeed_sh_warns_when_gloo_ifname_would_stay_on_this_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("h0 slots=1\nh1 slots=1\n")
    env_file = tmp_path / "deepspeed_env"

    def dry_stderr() -> str:
        proc = subprocess.run(["bash", "launch/deepspeed.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, DRY_RUN="1", HOSTFILE=str(hostfile), GLOO_SOCKET_IFNAME="eth0",
                                       DS_ENV_FILE=str(env_file)))
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "GLOO_SOCKET_IFNAME reaches only this host's ranks" in dry_stderr()
    env_file.write_text("GLOO_SOCKET_IFNAME=eth0\n")
    assert dry_stderr() == ""


# --- Slurm, two nodes ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = netns_slurm.unavailable_reason()
    if reason:
        pytest.skip(reason)
    hosts = Cluster(2, tmp_path_factory.mktemp("slurm-hosts"))
    try:
        yield hosts, netns_slurm.Slurm(hosts)
    finally:
        hosts.close()


def sbatch_on_h0(slurm, script: str, env: Dict[str, str], sbatch_args: Sequence[str], args: Sequence[str],
                 tmp_path: Path) -> str:
    """`sbatch --wait --nodes=2` from h0; returns the job's output. The job is cancelled whatever happens."""
    hosts, cluster = slurm
    job_out = tmp_path / "job.out"
    cmd = ["sbatch", "--wait", "--nodes=2", "--time=10", f"--output={job_out}", *sbatch_args, script, *args]
    env = env_for_hosts({**cluster.env(), **env})
    try:
        submit = run_on(hosts[0], cmd, env, tmp_path / "sbatch.log")
    except AssertionError as e:
        job_log = job_out.read_text() if job_out.exists() else "(no job output)"
        raise AssertionError(f"{e}\njob output:\n{job_log[-8000:]}") from None
    finally:
        hosts[0].run(["scancel", "--user=root"], env=env)
    assert "Submitted batch job" in submit
    return job_out.read_text()


@pytest.mark.timeout(TIMEOUT + 60)
def test_slurm_generic_two_nodes(slurm, tmp_path):
    out = tmp_path / "run"
    log = sbatch_on_h0(slurm, "launch/slurm/generic.sbatch", {"NPROC_PER_NODE": "1", "BACKEND": "fsdp2"}, [],
                       [*SHORT_ARGS, "--output-dir", str(out)], tmp_path)
    assert "terminate called" not in log
    # One rank per node and world size 2: srun started a torchrun on each of the two nodes.
    assert_same_schedule(log, 2, SHORT_STEPS)
    assert_trained(out, 2, SHORT_STEPS)


@pytest.mark.timeout(TIMEOUT + 60)
def test_slurm_70b_a100_recipe_two_nodes_with_tiny_model(slurm, tmp_path):
    import torch
    import transformers

    from lisa_dist.recipe import presets

    model_dir = tmp_path / "model"
    tokenizer = presets.default_tokenizer()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(presets.PRESETS["tiny-llama"](tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    log = sbatch_on_h0(slurm, "launch/slurm/llama2_70b_a100_80g.sbatch",
                       {"MODEL": str(model_dir), "NPROC_PER_NODE": "1"},
                       ["--gpus-per-node=0"], [*SHORT_ARGS, "--output-dir", str(out)], tmp_path)
    assert "terminate called" not in log
    assert f"lisa-train: {model_dir} | backend deepspeed x2" in log
    assert_same_schedule(log, 2, SHORT_STEPS)
    assert_trained(out, 2, SHORT_STEPS)
