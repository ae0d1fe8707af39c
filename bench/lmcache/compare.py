"""Runs LMCache's own L2 benchmark, ``lmcache bench l2``, twice with the same
workload. One run uses Strata's adapter (``strata.integrations.lmcache``,
Unix socket, zero-copy arena); the other uses LMCache's RESP adapter
against a local ``redis-server``. It prints store and load throughput per
adapter and the ratio Strata ÷ Redis.

Every run gets a fresh ``stratad`` / ``redis-server``: a second store of the
same keys would otherwise be a no-op for Strata ("already present") and an
overwrite for Redis. Repeats alternate which adapter goes first; the
median of the repeats counts. Run it through ``bench/lmcache/run``, which
builds the virtualenv and exports ``STRATA_BIN``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from strata.testing import Daemon, free_port, stratad_binary

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out"
LMCACHE = Path(sys.executable).with_name("lmcache")
ENV = {**os.environ, "DO_NOT_TRACK": "1", "LMCACHE_TRACK_USAGE": "false",
       "LMCACHE_DISABLE_BANNER": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-kb", default="256,2048", help="object sizes in KiB, comma-separated")
    p.add_argument("--num-keys", type=int, default=32, help="keys per submitted task")
    p.add_argument("--in-flight", type=int, default=4, help="tasks in flight per round")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per phase (plus 1 warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="runs per adapter and size")
    p.add_argument("--workers", type=int, default=2,
                   help="I/O threads of each adapter (Strata num_workers, RESP num_workers)")
    return p.parse_args()


class Redis:
    """A private ``redis-server`` on loopback, no persistence."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.log = open(workdir / f"redis-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"redis-server did not start; see {self.log.name}")
            time.sleep(0.05)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()

    def __enter__(self) -> "Redis":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bench(spec: dict, size_kb: int, args, tag: str, workdir: Path) -> dict:
    """One ``lmcache bench l2`` run; returns its per-operation metrics."""
    out, log = workdir / f"{tag}.json", workdir / f"{tag}.log"
    cmd = [str(LMCACHE), "bench", "l2", "--l2-adapter", json.dumps(spec),
           "--num-keys", str(args.num_keys), "--in-flight", str(args.in_flight),
           "--data-size-kb", str(size_kb), "--rounds", str(args.rounds), "--no-skip-verify",
           "--format", "json", "--output", str(out), "--quiet"]
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=1200).returncode
    if rc != 0:
        raise SystemExit(f"{tag}: `lmcache bench l2` exited {rc} (error or failed round-trip "
                         f"verification); see {log}")
    metrics = json.loads(out.read_text())["metrics"]
    ops = {v["operation"]: v for k, v in metrics.items() if k.startswith("op_")}
    for name in ("Store", "Load"):
        op = ops[name]
        if op["rounds_timed_out"] or op["total_success"] != op["total_keys"]:
            raise SystemExit(f"{tag}: {name} moved {op['total_success']} of {op['total_keys']} keys "
                             f"({op['rounds_timed_out']} rounds timed out); see {log}")
    return ops


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def gbps(op: dict) -> float:
    """The harness reports MiB/s; GB here is 10^9 bytes."""
    return op["throughput_avg_mbps"] * (1 << 20) / 1e9


def main() -> None:
    args = parse_args()
    sizes = [int(s) for s in args.sizes_kb.split(",")]
    binary = stratad_binary()
    workdir = Path(tempfile.mkdtemp(prefix="lmcache-bench-", dir=ROOT / "target"))
    print(f"stratad: {binary}\nlogs: {workdir}", flush=True)
    runs: dict[int, dict[str, list[dict]]] = {}
    for size in sizes:
        need = args.num_keys * args.in_flight * (args.rounds + 1) * size * 1024
        dram_mib = max(256, int(need * 1.25) >> 20)
        runs[size] = {"strata": [], "redis": []}
        for rep in range(args.repeats):
            for who in (("strata", "redis") if rep % 2 == 0 else ("redis", "strata")):
                tag = f"{who}-{size}k-{rep}"
                if who == "strata":
                    with Daemon(dram=f"{dram_mib}MiB", nvme="0") as d:
                        spec = {"type": "plugin", "module_path": "strata.integrations.lmcache",
                                "class_name": "StrataL2Adapter",
                                "adapter_params": {"endpoint": d.unix_endpoint, "num_workers": args.workers}}
                        ops = bench(spec, size, args, tag, workdir)
                else:
                    with Redis(workdir) as r:
                        spec = {"type": "resp", "host": "127.0.0.1", "port": r.port,
                                "num_workers": args.workers}
                        ops = bench(spec, size, args, tag, workdir)
                runs[size][who].append(ops)
                print(f"{tag}: store {gbps(ops['Store']):.2f} GB/s, load {gbps(ops['Load']):.2f} GB/s, "
                      f"lookup {ops['Lookup']['duration_avg_ms']:.2f} ms/round", flush=True)

    def med(size, who, op, f=gbps):
        return statistics.median(f(r[op]) for r in runs[size][who])

    lines = [
        f"`lmcache bench l2` (LMCache 0.5.5), {args.num_keys} keys x {args.in_flight} in flight, "
        f"{args.rounds} rounds (+1 warm-up), round-trip verified, {args.workers} I/O workers per adapter, "
        f"median of {args.repeats} runs; {datetime.date.today()}, {os.cpu_count()} vCPU, "
        f"{cpu_model()}; stratad {binary.parent.name} build.",
        "",
        "| object | Strata store GB/s | Redis store GB/s | store ratio | Strata load GB/s | Redis load GB/s "
        "| load ratio | lookup ms/round (Strata / Redis) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lookup_ms = lambda op: op["duration_avg_ms"]  # noqa: E731
    for size in sizes:
        ss, rs = med(size, "strata", "Store"), med(size, "redis", "Store")
        sl, rl = med(size, "strata", "Load"), med(size, "redis", "Load")
        lk = f"{med(size, 'strata', 'Lookup', lookup_ms):.2f} / {med(size, 'redis', 'Lookup', lookup_ms):.2f}"
        lines.append(f"| {size} KiB | {ss:.2f} | {rs:.2f} | {ss / rs:.2f} | {sl:.2f} | {rl:.2f} "
                     f"| {sl / rl:.2f} | {lk} |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lmcache.md").write_text(report)
    (OUT / "lmcache.json").write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=1))
    print(f"written to {OUT / 'lmcache.md'}")


if __name__ == "__main__":
    main()
