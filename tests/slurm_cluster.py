"""A throwaway single-node SLURM cluster on this machine, for the ``slurm`` tests.

Everything lives in one folder: the munge key and socket, ``slurm.conf`` and
``gres.conf``, state, spool, logs, and four fake GPUs (character devices made with
``mknod``; SLURM only hands out their indices as ``CUDA_VISIBLE_DEVICES``). The
daemons run as root on free loopback ports and are stopped by pid, so nothing
outside that folder is touched or left behind.

Needs root and Debian's ``slurm-wlm`` + ``munge`` packages (``make slurm-deps``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol")
NUM_GPUS = 4


def missing_requirements() -> str | None:
    """Why a cluster cannot start here, as one line, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM tests start slurmctld/slurmd/munged and need root"
    missing = [tool for tool in DAEMONS + CLIENTS if shutil.which(tool, path=_sbin_path()) is None]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing); "
            "`make slurm-deps` installs Debian's slurm-wlm and munge"
        )
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(tool: str) -> str:
    found = shutil.which(tool, path=_sbin_path())
    if found is None:
        raise RuntimeError(f"{tool} not found")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """Start with ``start()``, stop with ``stop()``; ``env`` points clients at it."""

    def __init__(self, root: Path, cpus: int = 4, memory_mb: int = 256000):
        self.root = Path(root)
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict:
        """Point SLURM's clients at this cluster (``bin/`` first: see ``_write_files``)."""
        return {
            "SLURM_CONF": str(self.conf),
            "PATH": os.pathsep.join([str(self.root / "bin"), _sbin_path()]),
        }

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log", "dev", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        for i in range(NUM_GPUS):
            device = self.root / "dev" / f"fakegpu{i}"
            if not device.exists():
                # /dev/null's numbers: a harmless character device SLURM can list.
                os.mknod(device, 0o600 | 0o020000, os.makedev(1, 3))
        # Inside a job, the plugin's jobstep drops every SLURM_* variable before it
        # calls srun, SLURM_CONF included; a real cluster keeps its slurm.conf in
        # /etc/slurm, which this one must not touch. So srun gets it back here.
        srun = self.root / "bin" / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{_which("srun")}" "$@"\n')
        srun.chmod(0o755)
        # SLURM's own record of the GPUs it gave each job, to check provenance against.
        prolog = self.root / "bin" / "prolog"
        prolog.write_text(
            "#!/bin/sh\n"
            f'echo "$SLURM_JOB_ID ${{SLURM_JOB_GPUS:-}}" >> "{self.root / "gpu_assignments.txt"}"\n'
        )
        prolog.chmod(0o755)
        log = self.root / "log"
        self.conf.write_text(f"""\
ClusterName=teacherlogits
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root / "slurmd.pid"}
SlurmctldLogFile={log / "slurmctld.log"}
SlurmdLogFile={log / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=5
Prolog={self.root / "bin" / "prolog"}
PrologFlags=Alloc
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{NUM_GPUS} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / "gres.conf").write_text(
            "AutoDetect=off\n"
            f"NodeName={self.node} Name=gpu File={self.root / 'dev'}/fakegpu[0-{NUM_GPUS - 1}]\n"
        )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        out.close()

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_files()
        munge = self.root / "munge"
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged")
        # -i: ignore any saved state; this cluster lives only as long as the test.
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, timeout, "the SLURM node to come up idle")
        return self

    def _node_idle(self) -> bool:
        result = self.client("sinfo", "-h", "-N", "-o", "%T", check=False)
        return result.returncode == 0 and result.stdout.strip().rstrip("*") == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) while waiting for "
                        f"{what}:\n{self.logs()}"
                    )
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def gpu_assignments(self) -> dict[str, str]:
        """{SLURM job id: the GPU indices SLURM allocated it}, from the job prolog."""
        path = self.root / "gpu_assignments.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return {job: gpus for job, _, gpus in (line.partition(" ") for line in lines)}

    def client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_which(args[0]), *args[1:]],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        # Jobs first, so slurmd does not leave their processes behind.
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.client("scancel", "--full", "--quiet", "-u", "root", check=False)
            deadline = time.monotonic() + 20
            while (
                time.monotonic() < deadline
                and self.client("squeue", "-h", "-o", "%i", check=False).stdout.strip()
            ):
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
