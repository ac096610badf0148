"""A real SLURM 22.05 cluster on this machine for the launch tests: munge, slurmctld and two slurmd
emulating nodes n1 and n2 on loopback ports, all state in a temporary directory.

Daemons are started in the foreground as children and stopped by the PIDs recorded here, never by name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def missing_tools() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_hosts(names: tuple[str, ...]) -> None:
    """Node names must resolve: map them to loopback in /etc/hosts (needs root, as in CI)."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    missing = [n for n in names if not any(n in line.split()[1:] for line in text.splitlines() if line.strip())]
    if missing:
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # polar-mamba slurm tests\n")


@dataclass
class SlurmCluster:
    root: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    cpus_per_node: int = 2
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def _write_config(self) -> None:
        host = socket.gethostname()
        ctl_port = _free_port()
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus_per_node} "
            f"State=UNKNOWN" for n in self.nodes
        )
        r = self.root
        (r / "slurm.conf").write_text(f"""ClusterName=polartest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctl_port}
AuthType=auth/munge
AuthInfo=socket={r}/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
InactiveLimit=0
KillWait=30
MinJobAge=300
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _spawn(self, *cmd: str) -> None:
        log = open(self.root / f"{Path(cmd[0]).name}-{len(self.procs)}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self, timeout: float = 60) -> SlurmCluster:
        for d in ("state", *(f"spool-{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        _ensure_hosts(self.nodes)
        self._write_config()
        r = self.root
        self._spawn("munged", "-F", "--force", f"--socket={r}/munge.socket", "--key-file=/etc/munge/munge.key",
                    f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed")
        self._wait(lambda: (r / "munge.socket").exists(), timeout, "munged did not start")
        self._spawn("slurmctld", "-D", "-i")
        for n in self.nodes:
            self._spawn("slurmd", "-D", "-N", n)
        self._wait(self.all_idle, timeout, "nodes did not become idle")
        return self

    def all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return sorted(states) == sorted(self.nodes) and all(s == "idle" for s in states.values())

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError(f"{what}; logs in {self.root}: {self.logs()[-3000:]}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for tok in out.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
