"""`opd serve` in a process of its own, as a user starts it: the reliability benchmark's server and perf's sampler.

Also the environment every such child process gets, and how to read the one line a failed CLI leaves in its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from opd.lm.remote.vllm import free_port  # noqa: F401 (re-exported: the benchmarks start servers on it)

# One intra-op thread per process (the machine is shared); no hub look-ups; errors as the user sees them.
ENV = {k: v for k, v in os.environ.items() if k != "OPD_DEBUG"} | {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


def last_line(path: Path) -> str:
    """The last non-empty line of a log (where the CLI writes its one-line error)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1] if lines else ""


@dataclass
class Server:
    """An `opd serve` process on 127.0.0.1, its log appended to `log`."""

    model_dir: str
    port: int
    log: Path
    proc: subprocess.Popen | None = None
    threads: int = 1
    """torch threads of the server process."""
    weights_root: str | None = None
    """The server's --weights-root (where it may load pushed weights from); None: it refuses pushes."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> Server:
        """Start the server and wait until /health answers."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "opd.cli", "serve", self.model_dir, "--port", str(self.port), "--device",
                   "cpu"] + (["--weights-root", self.weights_root] if self.weights_root else [])
        with open(self.log, "ab") as log:
            # Run from the log's folder: a fuzzed weight update of "." must not find the model's weights there.
            env = ENV | {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.log.parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`opd serve` did not come up on port {self.port}: {last_line(self.log)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10.0).json()

    def log_errors(self) -> list[str]:
        """Log lines that mean an unhandled exception (uvicorn logs them as ERROR with a traceback)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if line.startswith("ERROR") or "Traceback" in line]

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, open connections just drop."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """Ctrl-C, as a user stops it; SIGKILL if it does not exit within 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
