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
    """Best of ``rounds`` timings of ``f``; an ``f`` that returns a float
    has timed itself (the part that is the load)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = f()
        times.append(r if isinstance(r, float) else time.perf_counter() - t0)
    return min(times)


def bench_bandwidth(model, n_blocks: int, rounds: int, out):
    """Plain client and every adapter that can run here, loading the same
    N stored blocks into an engine-shaped destination."""
    layout = smollm_layout()
    shape = layout.block_shape()
    nbytes = layout.block_bytes * n_blocks
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal(shape).astype(np.float16) for _ in range(n_blocks)]
    # Keys are the engine's chained block hashes of a token sequence: the
    # plain client, vLLM (block_hashes) and SGLang (page hashes, the same
    # SHA-256 chain) all address the same stored blocks.
    tokens = [(7 * i) % 49000 + 10 for i in range(n_blocks * 16 + 1)]
    keys = te.block_hashes(tokens, 16)[:n_blocks]
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
            for name, fn in adapter_loaders(d, model, tokens, n_blocks, shape):
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


def adapter_loaders(d, model, tokens, n_blocks, shape):
    """(name, zero-argument load function) for each engine adapter, each
    loading the N stored blocks into its engine's own buffers the way its
    engine asks for them. Only the load is timed: the scheduler-side lookup
    (vLLM) or existence check (SGLang) runs before, untimed."""
    from sglang_driver import MHAHostPool, sglang_page_hashes
    from vllm_driver import vllm_engine

    from strata.integrations.lmcache import ObjectKey, StrataL2Adapter, StrataL2AdapterConfig
    from strata.integrations.sglang import HiCacheStorageConfig, StrataHiCacheStorage

    # vLLM: scheduler lookup (lease) untimed; timed: update_state_after_alloc,
    # build_connector_meta, worker start_load_kv into the paged cache,
    # get_block_ids_with_load_errors.
    eng, driver = vllm_engine(model, d.unix_endpoint, num_blocks=n_blocks + 2)
    rounds = iter(range(1 << 30))

    def vllm_load():
        req = te.Request(f"bw{next(rounds)}", list(tokens), 1)
        req.block_ids = list(range(n_blocks + 1))
        n = driver.lookup(req)
        t0 = time.perf_counter()
        failed = driver.load(req, req.block_ids[:n // 16], eng.kv_cache)
        dt = time.perf_counter() - t0
        if n != n_blocks * 16 or failed:
            raise SystemExit(f"vLLM connector loaded {n} tokens, failed {failed}")
        return dt

    # SGLang: batch_get_v1 into the host pool (page_first, the default).
    pool = MHAHostPool(30, 3, 64, pages=n_blocks + 1, layout="page_first")
    cfg = HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=True, model_name=MODEL_ID,
        extra_config={"backend_name": "strata", "module_path": "strata.integrations.sglang",
                      "class_name": "StrataHiCacheStorage", "interface_v1": 1, "endpoint": d.unix_endpoint})
    backend = StrataHiCacheStorage(cfg, {})
    backend.register_mem_pool_host(pool)
    pages = sglang_page_hashes(tokens, 16)[:n_blocks]
    host = pool.alloc(n_blocks * 16)

    def sglang_load():
        if backend.batch_exists(pages) != n_blocks:
            raise SystemExit("SGLang backend does not see the stored pages")
        t0 = time.perf_counter()
        ok = backend.batch_get_v1(pages, host)
        dt = time.perf_counter() - t0
        if not all(ok):
            raise SystemExit("SGLang backend failed a page")
        return dt

    # LMCache: its own keyspace; N objects of one block's size stored first
    # (untimed), then submit_load_task until the load eventfd says done.
    import os
    import select
    adapter = StrataL2Adapter(StrataL2AdapterConfig(endpoint=d.unix_endpoint), l1_memory_desc=None)
    size = int(np.prod(shape)) * 2
    lm_keys = [ObjectKey(i.to_bytes(16, "big"), MODEL_ID, 0, 0, "") for i in range(n_blocks)]
    bufs = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(n_blocks)]

    class Obj:
        def __init__(self, raw):
            self.raw = raw

        def get_size(self):
            return self.raw.size

        def get_physical_size(self):
            return self.raw.size

        @property
        def byte_array(self):
            return memoryview(self.raw)

    def wait(fd):
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(60_000):
            raise SystemExit("LMCache adapter did not signal within 60 s")
        os.eventfd_read(fd)

    tid = adapter.submit_store_task(lm_keys, [Obj(b) for b in bufs])
    done: dict = {}
    while tid not in done:
        wait(adapter.get_store_event_fd())
        done.update(adapter.pop_completed_store_tasks())
    dsts = [Obj(np.zeros(size, np.uint8)) for _ in range(n_blocks)]

    def lmcache_load():
        t0 = time.perf_counter()
        tid = adapter.submit_load_task(lm_keys, dsts)
        while True:
            wait(adapter.get_load_event_fd())
            r = adapter.query_load_result(tid)
            if r is not None:
                break
        dt = time.perf_counter() - t0
        if r.popcount() != n_blocks or not np.array_equal(dsts[-1].raw, bufs[-1]):
            raise SystemExit("LMCache adapter failed a load")
        return dt

    return [("vLLM connector (start_load_kv into the paged cache)", vllm_load),
            ("SGLang backend (batch_get_v1 into the page_first host pool)", sglang_load),
            ("LMCache L2 adapter (submit_load_task, eventfd)", lmcache_load)]


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
    model = te.load_model()
    if "bandwidth" in only:
        print("load bandwidth ...", flush=True)
        bench_bandwidth(model, a.blocks, a.rounds, out)
    if "ttft" in only:
        print("TTFT ...", flush=True)
        bench_ttft(model, model.tokenizer, [int(x) for x in a.prefixes.split(",")], out)
    text = "\n".join(out)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
