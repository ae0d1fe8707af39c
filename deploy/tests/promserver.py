"""A real Prometheus server (Debian's package) for tests: its own config,
a temporary TSDB, a free loopback port, stopped at the end. The package's
system service is never used."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from strata.testing import free_port


def binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: run deploy/tests/setup.sh (installs Debian's prometheus)")
    return found


class Prometheus:
    def __init__(self, targets: list[str], rule_files: list[Path], interval_s: int = 1):
        self._tmp = tempfile.TemporaryDirectory(prefix="prometheus-")
        self.dir = Path(self._tmp.name)
        self.targets = targets
        config = {
            "global": {
                "scrape_interval": f"{interval_s}s",
                "scrape_timeout": f"{interval_s}s",
                "evaluation_interval": f"{interval_s}s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{
                "job_name": "strata",
                "static_configs": [{"targets": targets}],
            }],
        }
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "Prometheus":
        for _ in range(5):
            self.port = free_port()
            args = [binary("prometheus"), f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=log)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                time.sleep(0.1)
            self.stop()
            if "address already in use" not in self.log.read_text(errors="replace"):
                break
        raise RuntimeError(f"prometheus did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; returns `data`, raises with Prometheus's error."""
        q = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{q}" if q else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PromError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query; the result vector (or raises on a bad query)."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, what: str, check, timeout_s: float = 60.0):
        """Polls check() until it returns something truthy; fails naming
        `what` and the last value after the deadline (a bound on waiting,
        not an assertion on speed)."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}\n"
                             f"prometheus log:\n{self.log.read_text(errors='replace')[-2000:]}")


class PromError(Exception):
    pass


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=120)
