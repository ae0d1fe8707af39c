"""Engine benchmark on the real model. See bench/README.md (section
"engine") for what each figure means; every figure is a ratio against a
reference measured in the same run.

1. TTFT: a prompt of P prefix tokens plus a short question, first token
   only. Reference: the engine recomputing the whole prompt. Measured: a
   fresh engine whose prefix comes from a real stratad through the plain
   client hooks (DRAM), and again after a daemon restart (every block read
   back from NVMe). The loaded run's logits must equal the recomputed ones
   bit for bit (checked; the bench fails otherwise).
2. Load bandwidth: N blocks of 360 KiB loaded into the engine's paged
   cache through each path. Reference (the zero-copy bound): one memcpy of
   the same bytes from the mapped arena into a contiguous buffer, no RPC.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tinyengine as te

from strata import Client, LocalClient
from strata.integrations.link import StoreLink
from strata.testing import Daemon

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "testbed" / "proof"))
from proofkit import MODEL_ID, WRITE_THROUGH, smollm_layout  # noqa: E402
from plain_hooks import StrataHooks  # noqa: E402

TEXT = ("Strata keeps the key-value cache of prompts an inference engine has already seen, so that a "
        "returning conversation loads its prefix instead of computing it again. ")


def prefix_tokens(tok, n: int, salt: int) -> list[int]:
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tok.encode(f"Paragraph {salt}.{i}: {TEXT}")
        i += 1
    return ids[:n]


def ttft(model, prompt, hooks=None, layout="flash_attn") -> tuple[float, "te.Request"]:
    eng = te.Engine(model, num_blocks=len(prompt) // 16 + 4, layout=layout, hooks=hooks)
    t0 = time.perf_counter()
    r = eng.add_request(prompt, max_new_tokens=1, record_logits=True, ignore_eos=True)
    eng.run()
    return time.perf_counter() - t0, r


def bench_ttft(model, tok, prefixes, out):
    layout = smollm_layout()
    with tempfile.TemporaryDirectory(prefix="strata-bench-engine-") as tmp:
        d = Daemon(dram="2GiB", nvme="4GiB", data_dir=tmp, config=WRITE_THROUGH).start()
        try:
            link = StoreLink(d.unix_endpoint, layout)
            link.connect()
            rows = []
            question = tok.encode("<|im_end|>\n<|im_start|>user\nSummarise the above in one line."
                                  "<|im_end|>\n<|im_start|>assistant\n")
            prompts = {p: prefix_tokens(tok, p, p) + question for p in prefixes}
            for p, prompt in prompts.items():
                t_re, r_re = ttft(model, prompt)
                ttft(model, prompt, StrataHooks(link))            # stores the prefix (untimed)
                t_dram, r_dram = ttft(model, prompt, StrataHooks(link))
                check(r_dram, r_re, f"{p} from DRAM")
                rows.append([p, len(prompt), r_dram.num_loaded_tokens, t_re, t_dram])
                print(f"  P={p}: recompute {t_re:.2f} s, loaded (DRAM) {t_dram:.3f} s", flush=True)
            # Restart: the tier is scanned back and every block comes from NVMe.
            d.stop()
            d.start()
            link = StoreLink(d.unix_endpoint, layout)
            link.connect()  # maps the new arena: a once-per-process cost, not the load's
            for row, (p, prompt) in zip(rows, prompts.items()):
                t_nvme, r_nvme = ttft(model, prompt, StrataHooks(link))
                check(r_nvme, None, f"{p} from NVMe", loaded=row[2])
                row.append(t_nvme)
                print(f"  P={p}: loaded (NVMe, after restart) {t_nvme:.3f} s", flush=True)
        finally:
            d.close()
    out.append("## TTFT: prefix loaded from Strata ÷ recomputed (SmolLM2-135M, tinyengine, 1 thread)\n")
    out.append("| prefix | prompt | loaded tokens | recompute s | DRAM s | NVMe s | DRAM ÷ recompute | NVMe ÷ recompute |")
    out.append("|---|---|---|---|---|---|---|---|")
    for p, n, loaded, t_re, t_dram, t_nvme in rows:
        out.append(f"| {p} | {n} | {loaded} | {t_re:.2f} | {t_dram:.3f} | {t_nvme:.3f} | "
                   f"{t_dram / t_re:.3f} | {t_nvme / t_re:.3f} |")
    out.append("")


_REF: dict = {}


def check(req, ref, what, loaded=None):
    if ref is not None:
        _REF[what.split()[0]] = ref
        if not all(np.array_equal(a, b) for a, b in zip(req.logits, ref.logits)):
            raise SystemExit(f"{what}: logits differ from recomputing (a wrong block was served)")
        if req.num_loaded_tokens == 0:
            raise SystemExit(f"{what}: nothing was loaded")
    else:
        ref = _REF[what.split()[0]]
        if not all(np.array_equal(a, b) for a, b in zip(req.logits, ref.logits)):
            raise SystemExit(f"{what}: logits differ from recomputing (a wrong block was served)")
        if req.num_loaded_tokens != loaded:
            raise SystemExit(f"{what}: loaded {req.num_loaded_tokens} tokens, expected {loaded}")


def best(f, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_bandwidth(n_blocks: int, rounds: int, out):
    """Plain client and every adapter that can run here, loading the same
    N stored blocks into an engine-shaped destination."""
    layout = smollm_layout()
    shape = layout.block_shape()
    nbytes = layout.block_bytes * n_blocks
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal(shape).astype(np.float16) for _ in range(n_blocks)]
    keys = [bytes([i % 256, i // 256]) + b"bench" * 5 for i in range(n_blocks)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="strata-bench-bw-") as tmp:
        d = Daemon(dram="1GiB", nvme="0", data_dir=tmp).start()
        try:
            link = StoreLink(d.unix_endpoint, layout)
            link.connect()
            stored = link.save(keys, [None] + keys[:-1], lambda i, o: o.__setitem__(slice(None), blocks[i].reshape(-1).view(np.uint8)))
            assert stored == n_blocks, stored
            # The zero-copy bound: the same bytes, arena -> contiguous
            # destination, one memcpy each, slots already mapped.
            with LocalClient(d.uds) as lc:
                slots = lc.lookup_slots(layout.namespace_id(), keys)
                dst = np.empty((n_blocks, layout.block_bytes), np.uint8)
                t_bound = best(lambda: [np.copyto(dst[i], v) for i, v in enumerate(slots.views)], rounds)
                lc.release(slots.lease)
            rows.append(("zero-copy bound (memcpy arena → buffer)", t_bound))
            # Plain client: lookup with lease + slots, copy, verify, release.
            dst2 = np.empty((n_blocks, layout.block_bytes), np.uint8)
            t_plain = best(lambda: link.load(keys, lambda i, v: np.copyto(dst2[i], v)), rounds)
            rows.append(("plain client (StoreLink.load, verified)", t_plain))
            # Into tinyengine's paged cache (scatter per layer), plain hooks.
            cache = te.PagedKVCache(30, n_blocks + 1, 16, 3, 64, "flash_attn", np.float16)

            def into_cache(i, v):
                kv = v.view(np.float16).reshape(shape)
                for layer in range(30):
                    cache.write_block(layer, i, kv[layer])
            t_paged = best(lambda: link.load(keys, into_cache), rounds)
            rows.append(("plain client into the paged cache (flash_attn)", t_paged))
            for name, fn in adapter_loaders(d, layout, keys, n_blocks):
                rows.append((name, best(fn, rounds)))
        finally:
            d.close()
    out.append(f"## Load bandwidth: {n_blocks} blocks of {layout.block_bytes // 1024} KiB "
               f"({nbytes / 2**20:.0f} MiB), best of {rounds}\n")
    out.append("| path | GB/s | ÷ zero-copy bound |")
    out.append("|---|---|---|")
    for name, t in rows:
        out.append(f"| {name} | {nbytes / t / 1e9:.2f} | {t_bound / t:.2f} |")
    out.append("")


def adapter_loaders(d, layout, keys, n_blocks):
    """(name, zero-argument load function) for each engine adapter; each
    loads the N blocks into its engine's own buffers."""
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefixes", default="512,1024,2048")
    ap.add_argument("--blocks", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="ttft,bandwidth")
    ap.add_argument("--out", default=str(HERE.parent / "out" / "engine.md"))
    a = ap.parse_args()
    out = [f"# Engine benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, model {MODEL_ID})\n"]
    only = set(a.only.split(","))
    if "bandwidth" in only:
        print("load bandwidth ...", flush=True)
        bench_bandwidth(a.blocks, a.rounds, out)
    if "ttft" in only:
        model = te.load_model()
        print("TTFT ...", flush=True)
        bench_ttft(model, model.tokenizer, [int(x) for x in a.prefixes.split(",")], out)
    text = "\n".join(out)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
