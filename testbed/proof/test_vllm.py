"""Proof on the real model through the vLLM connector
(:class:`strata.integrations.vllm.StrataConnector`), driven in vLLM's call
order by :mod:`vllm_driver` over a real stratad: prefixes loaded through the
connector (from DRAM and from NVMe, across cache layouts) give exactly the
tokens and logits of recomputing them; a killed daemon costs recomputation,
never a wrong or failed request, and hits resume after a restart; a wrong
layout is refused at ``register_kv_caches``; another namespace never loads.
"""

from __future__ import annotations

import re
import time

import pytest
import tinyengine as te

from strata import Client, Tier

from proofkit import SYSTEM, assert_identical, smollm_layout
from vllm_driver import VllmDriver, layer_name, vllm_engine


NEW = 3
BS = 16


def run(eng, prompt, tag, new=NEW):
    r = eng.add_request(prompt, max_new_tokens=new, record_logits=True, ignore_eos=True, request_id=tag)
    eng.run()
    return r


def metric(daemon, name: str, **labels) -> float:
    """Sum of a Prometheus metric's samples matching ``labels``."""
    total = 0.0
    for line in daemon.metrics().splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def chat_of_length(tok, content: str, mod: int) -> list[int]:
    """A chat prompt (system prompt + ``content``) padded with words until
    its length is ``mod`` modulo the block size."""
    for pad in range(40):
        p = tok.chat([{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": content + " please" * pad}])
        if len(p) % BS == mod:
            return p
    raise AssertionError(f"no padding of {content!r} gives a length of {mod} mod {BS}")


def wait_events(driver: VllmDriver, want, timeout_s: float = 10.0) -> list:
    """Events taken from the scheduler until ``want(events)`` holds."""
    deadline = time.monotonic() + timeout_s
    while not want(driver.events):
        assert time.monotonic() < deadline, f"events never matched; got {driver.events}"
        time.sleep(0.05)
        driver.events.extend(driver.scheduler.take_events())
    return driver.events


@pytest.mark.parametrize("store_layout,load_layout", [("flash_attn", "flashinfer"),
                                                      ("flashinfer", "flash_attn")])
def test_multi_turn_and_shared_system_prompt(model, tok, make_daemon, reference, store_layout, load_layout):
    d = make_daemon(dram="64MiB")
    # Turn one is 14 mod 16 tokens long: its third block is completed by the
    # two decode steps, so turn two also loads a block written by decode.
    turn1 = chat_of_length(tok, "What is a key-value cache?", 14)
    eng1, drv1 = vllm_engine(model, d.unix_endpoint, layout=store_layout, events=True)
    r1 = run(eng1, turn1, "t1")
    assert r1.num_external_tokens == 0
    assert_identical(r1, reference(turn1, NEW))
    full1 = (len(turn1) + NEW - 1) // BS
    assert [ids for rid, ids in drv1.store_jobs if rid == "t1"] == [r1.block_ids[:full1 - 1],
                                                                  [r1.block_ids[full1 - 1]]]

    # Turn two extends turn one (prompt, answer, new question) in another
    # engine with the other cache layout (another vLLM instance).
    turn2 = turn1 + r1.output_token_ids + tok.encode(
        "<|im_end|>\n<|im_start|>user\nWhy keep it?<|im_end|>\n<|im_start|>assistant\n")
    eng2, drv2 = vllm_engine(model, d.unix_endpoint, layout=load_layout)
    r2 = run(eng2, turn2, "t2")
    assert r2.num_external_tokens == r2.num_loaded_tokens == BS * full1
    assert_identical(r2, reference(turn2, NEW))
    assert drv2.stats.data["lookup_hit_blocks"] == full1
    assert drv2.stats.data["loaded_blocks"] == drv2.stats.data["link_blocks_loaded"] == full1
    assert "load_error_blocks" not in drv2.stats.data

    # Another user with the same system prompt, in the first engine: the
    # system prompt's blocks load.
    other = tok.chat([{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "Name a prime number."}])
    r3 = run(eng1, other, "u2")
    common = next(i for i, (a, b) in enumerate(zip(turn1, other)) if a != b)
    assert r3.num_loaded_tokens == BS * (common // BS) > 0
    assert_identical(r3, reference(other, NEW))

    # Two more users at once in the second engine: both load the system
    # prompt in the same step and run batched.
    pair = [tok.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            for q in ("Name a color.", "Name an animal.")]
    rs = [eng2.add_request(p, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id=f"p{i}")
          for i, p in enumerate(pair)]
    eng2.run()
    for r, p in zip(rs, pair):
        assert r.num_loaded_tokens == BS * (common // BS)
        assert_identical(r, reference(p, NEW))

    # Routers see the stored blocks as vLLM events, token ids included, in
    # DRAM ("CPU") and, written through, on NVMe ("STORAGE").
    first = int.from_bytes(te.block_hashes(turn1, BS)[0][-8:], "big")

    def stored(events, medium):
        return [e for e in events if e["type"] == "BlockStored" and e["block_hashes"] == [first]
                and e["medium"] == medium]
    events = wait_events(drv1, lambda ev: stored(ev, "CPU") and stored(ev, "STORAGE"))
    assert stored(events, "CPU")[0]["token_ids"] == turn1[:BS]
    assert stored(events, "CPU")[0]["parent_block_hash"] is None
    # Every lease taken by a lookup was released by the worker that loaded.
    assert metric(d, "strata_store_leases") == 0
    assert metric(d, "strata_store_leases_granted_total") >= 2
    drv1.close()
    drv2.close()


def test_nvme_hits_are_bit_identical(model, tok, make_daemon, reference):
    # 4 MiB of DRAM holds about 11 blocks of 360 KiB: the first prompt's
    # blocks (tails first) are pushed out by the next two and come back from
    # NVMe.
    d = make_daemon(dram="4MiB", nvme="64MiB")
    eng, drv = vllm_engine(model, d.unix_endpoint)
    a = tok.chat([{"role": "user", "content": "Describe the ocean in a few calm words, " * 3}])
    run(eng, a, "a", new=1)
    for i, topic in enumerate(["the moon", "volcanoes"]):
        b = tok.chat([{"role": "user", "content": f"List three facts about {topic} and why, " * 12}])
        assert len(b) > 6 * BS
        run(eng, b, f"b{i}", new=1)
    keys = te.block_hashes(a, BS)
    with Client(d.endpoint) as c:
        tiers = c.lookup(smollm_layout().namespace_id(), keys).tiers
    assert Tier.NVME in tiers, tiers
    nvme_hits = metric(d, "strata_store_lookup_hits_total", tier="nvme")
    promoted = metric(d, "strata_store_promotions_total")
    eng2, drv2 = vllm_engine(model, d.unix_endpoint, layout="flashinfer")
    ra = run(eng2, a, "a2")
    loaded = ra.num_loaded_tokens // BS
    assert loaded == (len(a) - 1) // BS > 0
    assert_identical(ra, reference(a, NEW))
    # The connector's lookup found them on NVMe; the load brought them up.
    on_nvme = sum(t is Tier.NVME for t in tiers[:loaded])
    assert on_nvme > 0
    assert metric(d, "strata_store_lookup_hits_total", tier="nvme") >= nvme_hits + on_nvme
    assert metric(d, "strata_store_promotions_total") >= promoted + on_nvme
    drv.close()
    drv2.close()


def test_daemon_killed_mid_run_then_restarted(model, tok, make_daemon, reference):
    d = make_daemon(dram="64MiB")
    p = tok.chat([{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Explain paging in operating systems briefly."}])
    warm, wdrv = vllm_engine(model, d.unix_endpoint)
    run(warm, p, "warm")
    wdrv.close()

    # The daemon dies between r1's lookup (a hit, leased) and its load: the
    # load fails, get_block_ids_with_load_errors reports it, the engine
    # recomputes. r1's saves and r2's lookup then meet a dead daemon; r2
    # recomputes. Both outputs stay exact.
    eng, drv = vllm_engine(model, d.unix_endpoint, num_blocks=64)
    drv.before_load = lambda request: d.kill()
    q = p[:-4] + tok.encode(" Be brief.") + p[-4:]
    r1 = eng.add_request(p, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id="r1")
    eng.step()
    drv.before_load = None
    r2 = eng.add_request(q, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id="r2")
    eng.run()
    assert r1.num_external_tokens == BS * ((len(p) - 1) // BS) > 0
    assert r1.num_loaded_tokens == 0
    assert r2.num_external_tokens == 0
    assert_identical(r1, reference(p, NEW))
    assert_identical(r2, reference(q, NEW))
    assert drv.stats.data["load_error_blocks"] == r1.num_external_tokens // BS
    assert drv.stats.data.get("link_errors", 0) + drv.stats.data.get("link_down_answers", 0) >= 2

    # Restarted on the same data directory: the written-through blocks are
    # back and hits resume in the same engine, through the same connectors.
    d.start()
    time.sleep(0.3)  # past the links' back-off
    r3 = run(eng, p, "after")
    assert r3.num_loaded_tokens == BS * ((len(p) - 1) // BS)
    assert_identical(r3, reference(p, NEW))
    drv.close()


def test_wrong_layout_refused_and_other_namespace_never_loads(model, tok, make_daemon, reference):
    d = make_daemon(dram="64MiB")
    # A layout that does not describe the engine's cache is refused at
    # register_kv_caches, naming what disagrees; nothing is loaded or saved.
    cache = te.Engine(model, num_blocks=8).kv_caches
    for kw, match in [(dict(num_kv_heads=6, head_dim=32), "num_kv_heads is 3, the Strata layout says 6"),
                      (dict(extra={"block_size": 32}), "block_size is 16, the Strata layout says 32"),
                      (dict(num_layers=24), "30 KV cache layers registered, the Strata layout says 24"),
                      (dict(extra={"dtype": "bf16"}), "is float16, the Strata layout says bf16")]:
        drv = VllmDriver(d.unix_endpoint, num_blocks=8, **kw)
        with pytest.raises(ValueError, match=match):
            drv.worker.register_kv_caches({layer_name(l): cache[l] for l in range(len(cache))})
        drv.close()

    # Same tokens, same keys, another model id: another namespace, no hits.
    p = tok.chat([{"role": "user", "content": "Say hello to the storage tier, please."}])
    eng, drv = vllm_engine(model, d.unix_endpoint)
    run(eng, p, "store")
    other, odrv = vllm_engine(model, d.unix_endpoint, model_id="someone/else")
    r = run(other, p, "other")
    assert r.num_external_tokens == 0 and r.num_loaded_tokens == 0
    assert odrv.stats.data["lookups"] >= 1 and "lookup_hit_blocks" not in odrv.stats.data
    assert_identical(r, reference(p, NEW))
    # The original namespace still hits.
    r2 = run(eng, p, "again")
    assert r2.num_loaded_tokens == BS * ((len(p) - 1) // BS) > 0
    drv.close()
    odrv.close()
