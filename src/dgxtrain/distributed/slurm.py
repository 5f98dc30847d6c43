"""What a SLURM job needs to know about itself: head node, rendezvous port, run id, end time.

Standard library only: the batch script runs this file with the host's python3, outside any
container and before the venv matters:
    eval "$(python3 src/dgxtrain/distributed/slurm.py env)"
prints MASTER_ADDR, MASTER_PORT, DGXTRAIN_RUN_ID and DGXTRAIN_JOB_END_TIME as exports.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping

PORT_BASE, PORT_SPAN = 15000, 20000  # below the usual ephemeral range (32768+)


class SlurmError(RuntimeError):
    """The job's environment does not say what is needed; the message says what to set."""


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list in order: 'dgx[01-02,7],cpu1' -> dgx01 dgx02 dgx7 cpu1."""
    hosts = []
    for prefix, ranges, rest in re.findall(r"([^,\[]*)(?:\[([^\]]*)\])?([^,\[]*),?", hostlist):
        if not (prefix or ranges):
            continue
        if not ranges:
            hosts.append(prefix + rest)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise SlurmError(f"cannot parse SLURM host list {hostlist!r}; fix: set MASTER_ADDR")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{rest}")
    if not hosts:
        raise SlurmError(f"empty SLURM host list {hostlist!r}; fix: set MASTER_ADDR")
    return hosts


def rendezvous_port(job_id: int | str) -> int:
    """A port derived from the job id: two jobs sharing a node never both take 29500."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def run_id(env: Mapping[str, str]) -> str | None:
    """The job's name for its run dir: stable across requeues, the same on every node."""
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    return None


def _scontrol(*args: str) -> str | None:
    """scontrol's answer, or None where there is none (inside a container, say)."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _field(record: str, key: str) -> str | None:
    m = re.search(rf"(?:^|\s){key}=(\S+)", record)
    return m.group(1) if m else None


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def head_address(nodelist: str, num_nodes: int, node_record: str | None = None) -> str:
    """The address the other nodes reach the first node at.

    One node: loopback. Several: the node's NodeAddr as slurmctld knows it (slurmctld
    reaches slurmd there, so the other nodes can too); a hostname that resolves to
    loopback (Debian's 127.0.1.1 line in /etc/hosts) would send every node to itself.
    """
    if num_nodes <= 1:
        return "127.0.0.1"
    head = expand_hostlist(nodelist)[0]
    record = node_record if node_record is not None else _scontrol("show", "node", "-o", head)
    addr = _field(record or "", "NodeAddr") or head
    if record is None and _is_loopback(addr):
        raise SlurmError(f"the head node {head} resolves to a loopback address here and "
                         "scontrol is not available to ask for its NodeAddr; fix: export "
                         "MASTER_ADDR=<its address> before srun")
    return addr


def end_time(job_id: str, job_record: str | None = None) -> float | None:
    """The job's end time (Unix seconds: start + time limit), or None without a limit."""
    record = job_record if job_record is not None else _scontrol("show", "job", "-o", job_id)
    value = _field(record or "", "EndTime")
    if not value or not value[:1].isdigit():  # Unknown, or no limit
        return None
    # scontrol prints the controller's local time without a zone; this host's zone it is.
    return datetime.datetime.fromisoformat(value).timestamp()


def job_exports(env: Mapping[str, str]) -> dict[str, str]:
    """The variables the batch script exports for every node's launcher."""
    if not env.get("SLURM_JOB_ID"):
        raise SlurmError("not inside a SLURM job (SLURM_JOB_ID unset); fix: submit with sbatch")
    out = {
        "MASTER_ADDR": env.get("MASTER_ADDR") or head_address(
            env["SLURM_JOB_NODELIST"], int(env.get("SLURM_JOB_NUM_NODES") or 1)),
        "MASTER_PORT": env.get("MASTER_PORT") or str(rendezvous_port(env["SLURM_JOB_ID"])),
        "DGXTRAIN_RUN_ID": env.get("DGXTRAIN_RUN_ID") or run_id(env) or "",
    }
    end = end_time(env["SLURM_JOB_ID"])
    if end is not None:
        out["DGXTRAIN_JOB_END_TIME"] = f"{end:.0f}"
    return out


def main(argv: list[str]) -> int:
    if argv[1:] != ["env"]:
        sys.stderr.write("usage: slurm.py env   (inside a SLURM job)\n")
        return 2
    try:
        exports = job_exports(os.environ)
    except SlurmError as e:
        sys.stderr.write(f"dgxtrain: slurm error: {e}\n")
        return 2
    for k, v in exports.items():
        sys.stdout.write(f"export {k}={shlex.quote(v)}\n")  # for the shell to eval
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
