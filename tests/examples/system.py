"""Real systems for the launcher tests: hosts as network namespaces, a one-node SLURM.

Both need root and system packages (iproute2; slurm-wlm and munge), which .ci/run installs.
Where they are missing a test is skipped, unless LCE_REQUIRE_SYSTEM_TESTS=1 (set by .ci/run)
makes that a failure: CI must never pass by skipping them.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from engine.parallel.ports import free_port
from tests.distributed import REPO, test_env


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (LCE_REQUIRE_SYSTEM_TESTS=1) when ``condition`` is false."""
    if condition:
        return
    if os.environ.get("LCE_REQUIRE_SYSTEM_TESTS") == "1":
        pytest.fail(f"{reason} (LCE_REQUIRE_SYSTEM_TESTS=1: CI must run this test)")
    pytest.skip(reason)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def recipe_env(**settings) -> dict:
    """Environment for the examples/prolong scripts with TINY=1, no dry run in --check (its
    own test runs it) and ``settings``."""
    env = test_env(**{"TINY": 1, "DRY_RUN": 0, **settings})
    if "MASTER_PORT" not in settings:
        # The scripts' own default (29500, or the sbatch wrapper's port from the job id).
        env.pop("MASTER_PORT")
    return env


class Process:
    """A launched script: its own session (so the whole group can be signalled), output in a file."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        self._file = open(log, "w")
        self.popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._file,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"timed out after {timeout}s; output:\n{self.output()[-4000:]}")
        finally:
            self._file.flush()

    def terminate_script(self) -> None:
        """SIGTERM to the script's shell only, as `kill PID` would send it."""
        self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()

    def output(self) -> str:
        self._file.flush()
        return self.log.read_text(errors="replace")


class NetnsHosts:
    """Two hosts on this machine: network namespaces joined by a veth pair.

    Inside each, the link is called `lce0` (as every node of a cluster names its fabric the
    same), with addresses 10.231.N.1 and 10.231.N.2. Leaving the context kills every process
    in the namespaces and deletes them, the veth pair with them, whatever happened.
    """

    IFNAME = "lce0"

    def __init__(self):
        tag = os.getpid() % 10_000
        self.namespaces = [f"lce{tag}h0", f"lce{tag}h1"]
        subnet = 1 + os.getpid() % 250
        self.addresses = [f"10.231.{subnet}.1", f"10.231.{subnet}.2"]
        self._veth = (f"lce{tag}a", f"lce{tag}b")

    def __enter__(self) -> "NetnsHosts":
        try:
            for ns in self.namespaces:
                _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", self._veth[0], "type", "veth", "peer", "name", self._veth[1])
            for ns, veth, address in zip(self.namespaces, self._veth, self.addresses):
                _run("ip", "link", "set", veth, "netns", ns)
                _run("ip", "-n", ns, "link", "set", veth, "name", self.IFNAME)
                _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", self.IFNAME)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "link", "set", self.IFNAME, "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.namespaces:
            self.kill_host(self.namespaces.index(ns))
            _run("ip", "netns", "del", ns, check=False)
        _run("ip", "link", "del", self._veth[0], check=False)  # if it never moved

    def pids(self, host: int) -> list[int]:
        result = _run("ip", "netns", "pids", self.namespaces[host], check=False)
        return [int(pid) for pid in result.stdout.split()]

    def kill_host(self, host: int) -> None:
        """The host dies: SIGKILL to every process in its namespace."""
        for pid in self.pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def launch(self, host: int, script: str, env: dict, log: Path) -> Process:
        """Run ``script`` as node ``host`` of the two (NODE_RANK, addresses, interface set)."""
        env = dict(env, NNODES="2", NODE_RANK=str(host), MASTER_ADDR=self.addresses[0],
                   LOCAL_ADDR=self.addresses[host], SOCKET_IFNAME=self.IFNAME)
        return Process(["ip", "netns", "exec", self.namespaces[host], "bash", script], env, log)

    @staticmethod
    def available() -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "network namespaces need root"
        if shutil.which("ip") is None:
            return False, "iproute2 (ip) is not installed"
        probe = f"lceprobe{os.getpid()}"
        result = _run("ip", "netns", "add", probe, check=False)
        _run("ip", "netns", "del", probe, check=False)
        if result.returncode != 0:
            return False, f"cannot create a network namespace: {result.stderr.strip()}"
        return True, ""


class SlurmCluster:
    """Debian's slurm-wlm on this machine: munged, slurmctld and one slurmd, configured in a
    temporary folder (nothing under /etc is touched). Leaving the context cancels every job and
    stops the daemons."""

    NODE = "lcenode"

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pidfiles = [root / "slurmd.pid", root / "slurmctld.pid", root / "munged.pid"]

    def __enter__(self) -> "SlurmCluster":
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        root = self.root
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = root / "munge.sock"
        _run("munged", "--force", f"--socket={socket_path}", f"--key-file={key}",
             f"--log-file={root / 'log' / 'munged.log'}", f"--pid-file={root / 'munged.pid'}",
             f"--seed-file={root / 'munge.seed'}")
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=lcetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            # No cgroups in a container: track processes by parentage, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            "KillWait=30",
            f"NodeName={self.NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} "
            f"RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        # SLURM_CONF in the daemons' environment too: every process of a job inherits it, which
        # is how __exit__ finds what a job left behind.
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True,
                       capture_output=True)
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", self.NODE], env=self.env,
                       check=True, capture_output=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.slurm("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (root / "log").glob("*.log"))
        raise AssertionError(f"the SLURM node did not become idle (sinfo: {state!r}):\n{logs}")

    def __exit__(self, *exc) -> None:
        if self.conf.exists():
            self.slurm("scancel", "--full", "--signal=KILL", "--user=root", check=False)
            deadline = time.time() + 60
            while time.time() < deadline and self.slurm(
                    "squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)
        for pidfile in self._pidfiles:  # slurmd, slurmctld, then munged
            if not pidfile.exists():
                continue
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
        # Whatever a job left (its step daemons and processes carry this cluster's SLURM_CONF).
        for pid in self._processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _processes(self) -> list[int]:
        """Processes whose environment names this cluster's slurm.conf."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    def slurm(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def submit(self, args: list[str], env: dict) -> int:
        result = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO,
                                env=dict(env, SLURM_CONF=str(self.conf)), capture_output=True,
                                text=True)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        return int(result.stdout.strip().split(";")[0])

    def job_state(self, job: int) -> tuple[str, str]:
        """(JobState, ExitCode) of ``job`` as slurmctld reports it."""
        info = self.slurm("scontrol", "show", "job", "-o", str(job)).stdout
        fields = dict(item.split("=", 1) for item in info.split() if "=" in item)
        return fields["JobState"], fields["ExitCode"]

    def wait(self, job: int, timeout: float) -> tuple[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job)
            if state[0] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                return state
            time.sleep(1)
        raise AssertionError(f"job {job} still {self.job_state(job)} after {timeout}s")

    @staticmethod
    def available() -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "the test SLURM runs its daemons as root"
        missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scancel")
                   if shutil.which(tool) is None]
        if missing:
            return False, f"slurm-wlm / munge not installed (missing {', '.join(missing)})"
        return True, ""


def wait_for(predicate, timeout: float, what: str, process: Process | None = None) -> None:
    """Poll ``predicate`` every 0.2 s; fail naming ``what`` (and the process output)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({process.popen.returncode}) "
                                 f"first:\n{process.output()[-4000:]}")
        time.sleep(0.2)
    tail = f"\n{process.output()[-4000:]}" if process is not None else ""
    raise AssertionError(f"{what}: not within {timeout}s{tail}")
