"""A cluster of slow devices on one machine: every rank gets its own CPU share and its own link.

Used by `make bench-overlap` (benchmarks/cpu_overlap.py), as root. On a GPU cluster each rank has a
device and a network link of its own: while a rank waits on its all-to-all, nobody else uses its
device, and its traffic does not slow anyone else's. Plain processes on one machine have neither:
a rank waiting on the network lends its core to another rank, and all ranks share one loopback.
Both would hide the effect overlap is meant to have. So:

- **Network**: a network namespace of its own (only its loopback, only loopback addresses). Each
  rank's sockets carry the net_cls class id of its rank; an nftables rule in the namespace turns
  the class id into the packet's priority, and an htb class per rank on the loopback, selected by
  that priority, sends at the link rate. A rank's outgoing traffic is shaped at the rate, as a NIC
  of that rate would, and waiting on it costs no CPU. How a link serves its connections is a choice
  (`fair`): by default one queue, first in first out, so a message waits for every byte queued
  before it; fair, each connection (hashed by its TCP ports into one of `FLOWS` buckets, child
  classes of the rank's) gets its share in turn, as a NIC serves its queue pairs. The two bound
  what overlap gains: with two exchanges in flight, one queue finishes the first one first, fair
  sharing finishes both late, but lets a small message (an exchange's counts) pass a large one.
- **Compute**: a cpu cgroup per rank, capped at cores / ranks of CPU time, so that a rank's unused
  share stays unused (`join`).

`ShapedCluster` creates the namespace and the cgroups (`create`), shapes the links (`shape`), and
removes everything again (`remove`, also after a failure; a leftover of a killed run is removed
first). `ip netns exec` mounts a fresh /sys, which hides the cgroup controllers, so they are
mounted under /run, where the ranks in the namespace see them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

NAMESPACE = "k2bench-overlap"
RUN = Path("/run") / NAMESPACE
CPU, NET_CLS = RUN / "cpu", RUN / "net_cls"
PERIOD_US = 10_000  # a short CFS period: a rank's CPU share comes in slices of a few milliseconds
MAX_RANKS = 8
FLOWS = 16  # fair sharing: buckets per rank's link (two connections share one with chance 1/16)


def _run(command: list[str], **kwargs) -> None:
    subprocess.run(command, check=True, **kwargs)


def _htb_minor(rank: int) -> int:
    """`rank`'s htb class on the loopback's qdisc 1: is 1:(0x10 + rank); 1:1 is the unshaped rest."""
    return 0x10 + rank


def _flow_minor(rank: int) -> int:
    """The first of `rank`'s `FLOWS` bucket classes, children of its class: 1:(0x100 + 0x20 * rank)."""
    return 0x100 + 0x20 * rank


def _class_id(rank: int) -> int:
    """The net_cls class id of `rank`, 0x0001_00RR: the handle of its htb class, which the nftables
    rule copies into the packet's priority (or hashes into one of its buckets')."""
    return 0x10000 + _htb_minor(rank)


class ShapedCluster:
    """The namespace, per-rank cgroups and per-rank link classes of the benchmark; `fair`: each
    link shares its rate between its connections rather than serving one queue in order."""

    def __init__(self, fair: bool = False):
        self.fair = fair

    def create(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("bench-overlap creates a network namespace and cgroups, and needs root.")
        missing = [tool for tool in ("ip", "tc", "nft") if shutil.which(tool) is None]
        if missing:
            raise SystemExit(f"bench-overlap needs {', '.join(missing)} on the PATH "
                             "(Debian: apt-get install iproute2 nftables).")
        self.remove()  # a leftover of a killed run
        _run(["ip", "netns", "add", NAMESPACE])
        _run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"])
        for controller, mount in (("cpu", CPU), ("net_cls", NET_CLS)):
            mount.mkdir(parents=True, exist_ok=True)
            _run(["mount", "-t", "cgroup", "-o", controller, controller, str(mount)])
        rules = []
        for rank in range(MAX_RANKS):
            for mount in (CPU, NET_CLS):
                (mount / NAMESPACE / f"rank{rank}").mkdir(parents=True, exist_ok=True)
            (NET_CLS / NAMESPACE / f"rank{rank}" / "net_cls.classid").write_text(str(_class_id(rank)))
            target = (f"jhash tcp sport . tcp dport mod {FLOWS} offset {0x10000 + _flow_minor(rank):#x}" if self.fair
                      else f"1:{_htb_minor(rank):x}")
            rules.append(f"meta cgroup {_class_id(rank):#x} meta priority set {target}")
        table = ("table inet k2bench {\n chain out {\n  type filter hook output priority 0; policy accept;\n  "
                 + "\n  ".join(rules) + "\n }\n}\n")
        _run(["ip", "netns", "exec", NAMESPACE, "nft", "-f", "-"], input=table.encode())

    def shape(self, rate: str, burst: str) -> None:
        """Every rank's outgoing traffic at `rate` (a tc rate, e.g. 200mbit); the rest unshaped. Called
        again, it sets the new rate (htb cannot change its root in place, so it is made anew);
        `unshape` removes the shaping."""
        self.unshape()
        lines = ["qdisc add dev lo root handle 1: htb default 1",
                 "class replace dev lo parent 1: classid 1:1 htb rate 100gbit quantum 200000"]
        for rank in range(MAX_RANKS):
            lines.append(f"class replace dev lo parent 1: classid 1:{_htb_minor(rank):x} htb rate {rate} burst {burst} "
                         "quantum 20000")
            if self.fair:  # every bucket may take the whole link; busy ones take turns, a quantum each
                lines += [f"class replace dev lo parent 1:{_htb_minor(rank):x} classid 1:{_flow_minor(rank) + flow:x} "
                          f"htb rate {rate_bits(rate) // FLOWS}bit ceil {rate} burst {burst} quantum 20000"
                          for flow in range(FLOWS)]
        done = subprocess.run(["ip", "netns", "exec", NAMESPACE, "tc", "-batch", "-"], capture_output=True,
                              input="\n".join(lines).encode() + b"\n")
        if done.returncode:
            raise RuntimeError(f"tc refused the links' classes: {done.stderr.decode().strip()}")

    def unshape(self) -> None:
        """The loopback unshaped again."""
        subprocess.run(["ip", "netns", "exec", NAMESPACE, "tc", "qdisc", "del", "dev", "lo", "root"],
                       capture_output=True)

    def remove(self) -> None:
        """Everything `create` made, whatever exists of it. Ranks still in its cgroups (a killed
        benchmark's, whose process server outlived it) are killed first: a cgroup with a process
        in it cannot be removed."""
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
        for mount in (CPU, NET_CLS):
            group = mount / NAMESPACE
            if group.is_dir():
                for child in group.glob("rank*"):
                    _kill_members(child)
                    child.rmdir()
                group.rmdir()
            if mount.is_mount():
                _run(["umount", str(mount)])
            if mount.is_dir():
                mount.rmdir()
        if RUN.is_dir():
            RUN.rmdir()


def _kill_members(group: Path) -> None:
    """Kill every process in the cgroup `group` and wait (up to 10 s) until it is empty."""
    for _ in range(100):
        pids = [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"{group}: processes {pids} are still in the benchmark's cgroup after SIGKILL.")


def rate_bits(rate: str) -> int:
    """A tc rate ("500mbit", "1gbit", "150000kbit") in bits per second."""
    for unit, scale in (("kbit", 1e3), ("mbit", 1e6), ("gbit", 1e9)):
        if rate.endswith(unit) and rate[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(rate[: -len(unit)]) * scale)
    raise ValueError(f"link rate {rate!r}: expected a number followed by kbit, mbit or gbit.")


def join(rank: int, cpu_share: float) -> None:
    """Move this process (before it opens a socket) into `rank`'s cgroups: its traffic goes through
    `rank`'s link, and it gets `cpu_share` of one core."""
    if rank >= MAX_RANKS:
        raise ValueError(f"rank {rank}: the shaped cluster has links for {MAX_RANKS} ranks.")
    cpu = CPU / NAMESPACE / f"rank{rank}"
    (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (cpu / "cpu.cfs_quota_us").write_text(str(max(1000, int(PERIOD_US * cpu_share))))
    for group in (cpu, NET_CLS / NAMESPACE / f"rank{rank}"):
        (group / "cgroup.procs").write_text(str(os.getpid()))
