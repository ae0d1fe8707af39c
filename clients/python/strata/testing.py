"""A real ``stratad`` process for tests and examples: free ports, a private
data directory, started and stopped (or killed) on request.

The binary comes from ``$STRATA_BIN``, else the repository's
``target/debug`` or ``target/release`` build.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def stratad_binary() -> Path:
    env = os.environ.get("STRATA_BIN")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for root in [Path.cwd(), *here.parents]:
        for kind in ("debug", "release"):
            p = root / "target" / kind / "stratad"
            if p.exists():
                return p
    found = shutil.which("stratad")
    if found:
        return Path(found)
    raise FileNotFoundError("stratad not found: build it (cargo build --bins) or set STRATA_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """``Daemon(dram="64MiB", nvme="256MiB").start()``; ``stop()`` sends
    SIGTERM, ``kill()`` SIGKILL; ``start()`` again reuses the data
    directory (a restart)."""

    def __init__(self, dram: str = "64MiB", nvme: str = "256MiB", data_dir: str | None = None,
                 extra: list[str] | None = None, config: str | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="stratad-") if data_dir is None else None
        self.data_dir = Path(data_dir or self._tmp.name)
        self.dram, self.nvme = dram, nvme
        self.extra = list(extra or [])
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.port = self.metrics_port = 0
        self.uds = str(self.data_dir / "s.sock")
        self.log = self.data_dir / "stratad.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def unix_endpoint(self) -> str:
        return f"unix:{self.uds}"

    def start(self, timeout_s: float = 120.0) -> "Daemon":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            # A restart keeps its ports (clients reconnect to the same
            # address) unless they were taken meanwhile.
            if not (attempt == 0 and self.port):
                self.port, self.metrics_port = free_port(), free_port()
            args = [str(stratad_binary()), "--listen", f"127.0.0.1:{self.port}",
                    "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--uds", self.uds,
                    "--data-dir", str(self.data_dir), "--dram-bytes", self.dram,
                    "--nvme-bytes", self.nvme, *self.extra]
            if self.config:
                cfg = self.data_dir / "stratad.toml"
                cfg.write_text(self.config)
                args += ["--config", str(cfg)]
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
            if self.wait_ready(timeout_s):
                return self
            text = self.log.read_text(errors="replace")
            self.proc.kill()
            self.proc.wait()
            if "cannot listen" not in text:
                raise RuntimeError(f"stratad did not start:\n{text[-4000:]}")
        raise RuntimeError("no free ports after 5 tries")

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if self.readyz()[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
