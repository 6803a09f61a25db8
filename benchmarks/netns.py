"""The slow-interconnect mode: two "hosts" in network namespaces joined by a rate-limited veth pair.

Each rank runs in its own namespace, launched by torchrun's normal (static) rendezvous with the
master address on the veth link, so this is also a multi-host run of the library. The link's
bandwidth is limited with `tc ... tbf` on both ends (netem is not available in this kernel). The
namespaces (and with them the veth pair) are deleted afterwards, also when the run fails.
Only the private addresses 10.200.0.1-2 inside our own namespaces are used.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from ladder.comm import TRANSPORT_ENV

from .session import SessionSpec

NAMESPACES = ("ladder-bench-0", "ladder-bench-1")
DEVICES = ("lbveth0", "lbveth1")
ADDRESSES = ("10.200.0.1", "10.200.0.2")
MASTER_PORT = 29517


class SlowLinkUnavailable(RuntimeError):
    """The namespaces cannot be created here (not root, no iproute2); the message says what is missing."""


def availability() -> str | None:
    """None if the mode can run, else why not."""
    if os.geteuid() != 0:
        return "the slow-interconnect mode needs root (it creates network namespaces)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"the slow-interconnect mode needs iproute2 ({', '.join(missing)} not found; apt-get install iproute2)"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SlowLinkUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


@dataclass
class SlowLink:
    """Context manager owning the two namespaces; `rate=None` leaves the veth pair unthrottled."""

    rate: str | None = "20mbit"
    burst: str = "32kb"
    queue_latency: str = "400ms"

    def __enter__(self) -> SlowLink:
        reason = availability()
        if reason:
            raise SlowLinkUnavailable(reason)
        self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self.teardown()  # leftovers of a run that was killed
        try:
            self._setup()
        except BaseException:
            self.teardown()
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.teardown()
        signal.signal(signal.SIGTERM, self._previous_sigterm)

    def _setup(self) -> None:
        for ns in NAMESPACES:
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", DEVICES[0], "netns", NAMESPACES[0], "type", "veth",
             "peer", "name", DEVICES[1], "netns", NAMESPACES[1])
        for ns, dev, address in zip(NAMESPACES, DEVICES, ADDRESSES, strict=True):
            _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            if self.rate:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", self.rate, "burst", self.burst, "latency", self.queue_latency)

    @staticmethod
    def teardown() -> None:
        """Delete our namespaces if they exist (the veth pair goes with them)."""
        existing = _run("ip", "netns", "list", check=False).stdout
        for ns in NAMESPACES:
            if ns in existing.split():
                _run("ip", "netns", "del", ns, check=False)

    def describe(self) -> dict[str, Any]:
        return {"rate": self.rate or "unlimited", "burst": self.burst if self.rate else None,
                "queue_latency": self.queue_latency if self.rate else None,
                "namespaces": list(NAMESPACES), "addresses": list(ADDRESSES), "qdisc": "tbf" if self.rate else None}

    def run_session(self, spec: SessionSpec, timeout_s: float = 3600.0) -> list[dict[str, Any]]:
        """Both ranks of `spec`, one per namespace, through torchrun; returns each rank's result."""
        with tempfile.TemporaryDirectory(prefix="ladder-slow-link-") as tmp:
            out = Path(tmp)
            spec_file = out / "spec.pkl"
            spec_file.write_bytes(pickle.dumps(spec))
            procs, logs = [], []
            for node, (ns, dev) in enumerate(zip(NAMESPACES, DEVICES, strict=True)):
                log = open(out / f"node{node}.log", "w")  # noqa: SIM115 - closed below
                logs.append(log)
                # gloo over the veth link: the ranks share this host, and shared memory would bypass it.
                command = ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={dev}", f"{TRANSPORT_ENV}=gloo",
                           sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                           "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", ADDRESSES[0],
                           "--master-port", str(MASTER_PORT), "--max-restarts", "0",
                           "-m", "ladder_benchmarks.session", str(spec_file), str(out)]
                procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout_s
            try:
                for proc in procs:
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                for log in logs:
                    log.close()
            failed = [n for n, proc in enumerate(procs) if proc.returncode != 0]
            if failed:
                tails = "\n".join(f"--- node {n} ---\n" + "\n".join(
                    (out / f"node{n}.log").read_text().splitlines()[-15:]) for n in failed)
                raise RuntimeError(f"slow-link run failed on node(s) {failed}:\n{tails}")
            return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so that the namespaces are still deleted."""
    raise SystemExit(128 + signum)
