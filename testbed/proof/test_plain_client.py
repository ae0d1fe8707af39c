"""Proof on the real model through the plain Python client: prefixes
served by a real stratad (from DRAM and from NVMe) give exactly the output
of recomputing them; a killed daemon costs recomputation, never a wrong or
failed request; after a restart hits resume; another namespace or a wrong
layout is never loaded."""

from __future__ import annotations

import time

import pytest
import tinyengine as te

from strata import Client, Tier
from strata.integrations.link import StoreLink

from proofkit import SYSTEM, assert_identical, smollm_layout
from plain_hooks import StrataHooks

NEW = 3


def engine(model, link, layout="flash_attn", num_blocks=48):
    return te.Engine(model, num_blocks=num_blocks, layout=layout, hooks=StrataHooks(link))


def run(eng, prompt, tag):
    r = eng.add_request(prompt, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id=tag)
    eng.run()
    return r


def test_multi_turn_and_shared_system_prompt(model, tok, make_daemon, reference):
    d = make_daemon(dram="64MiB")
    link = StoreLink(d.unix_endpoint, smollm_layout())
    link.connect()
    turn1 = tok.chat([{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "What is a key-value cache?"}])
    eng = engine(model, link)
    r1 = run(eng, turn1, "t1")
    assert r1.num_loaded_tokens == 0
    assert_identical(r1, reference(turn1, NEW))
    # Turn two extends turn one (prompt, answer, new question); a new engine
    # (another process's cache) loads the whole shared prefix from Strata.
    turn2 = turn1 + r1.output_token_ids + tok.encode("<|im_end|>\n<|im_start|>user\nWhy keep it?<|im_end|>\n"
                                                    "<|im_start|>assistant\n")
    eng2 = engine(model, link, layout="flashinfer")
    r2 = run(eng2, turn2, "t2")
    assert r2.num_loaded_tokens == 16 * ((len(turn1) + NEW - 1) // 16)
    assert_identical(r2, reference(turn2, NEW))
    # Another user with the same system prompt: its blocks hit too.
    other = tok.chat([{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "Name a prime number."}])
    r3 = run(engine(model, link), other, "u2")
    common = next(i for i, (a, b) in enumerate(zip(turn1, other)) if a != b)
    assert r3.num_loaded_tokens == 16 * (common // 16) > 0
    assert_identical(r3, reference(other, NEW))


def test_nvme_hits_are_bit_identical(model, tok, make_daemon, reference):
    # 4 MiB of DRAM holds about 11 blocks of 360 KiB: the first prompt's
    # blocks are evicted by the second's and come back from NVMe.
    d = make_daemon(dram="4MiB", nvme="64MiB")
    layout = smollm_layout()
    link = StoreLink(d.unix_endpoint, layout)
    a = tok.chat([{"role": "user", "content": "Describe the ocean in a few calm words, " * 3}])
    b = tok.chat([{"role": "user", "content": "List three facts about the moon and why, " * 22}])
    assert len(b) > 16 * 12
    run(engine(model, link), a, "a")
    run(engine(model, link), b, "b")
    keys = te.block_hashes(a, 16)
    with Client(d.endpoint) as c:
        tiers = c.lookup(layout.namespace_id(), keys).tiers
    assert Tier.NVME in tiers, tiers
    ra = run(engine(model, link), a, "a2")
    assert ra.num_loaded_tokens == 16 * ((len(a) - 1) // 16)
    assert_identical(ra, reference(a, NEW))


def test_daemon_killed_mid_run_then_restarted(model, tok, make_daemon, reference):
    d = make_daemon(dram="64MiB")
    link = StoreLink(d.unix_endpoint, smollm_layout(), retry_after_s=0.2, timeout_s=2.0)
    p = tok.chat([{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Explain paging in operating systems briefly."}])
    run(engine(model, link), p, "warm")

    # The daemon dies after the engine's first step: r1 (admitted with its
    # prefix loaded) finishes with its saves failing, r2 (admitted after)
    # finds nothing and recomputes; both outputs stay exact.
    eng = engine(model, link, num_blocks=64)
    q = p[:-4] + tok.encode(" Be brief.") + p[-4:]
    r1 = eng.add_request(p, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id="r1")
    eng.step()
    d.kill()
    r2 = eng.add_request(q, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id="r2")
    eng.run()
    assert r1.num_loaded_tokens > 0
    assert r2.num_external_tokens == 0
    assert_identical(r1, reference(p, NEW))
    assert_identical(r2, reference(q, NEW))
    assert link.stats.errors + link.stats.down_answers >= 1
    # Restarted on the same data directory: the write-through blocks are
    # back and hits resume.
    d.start()
    time.sleep(0.3)  # past the link's back-off
    r3 = run(engine(model, link), p, "after")
    assert r3.num_loaded_tokens == 16 * ((len(p) - 1) // 16)
    assert_identical(r3, reference(p, NEW))


def test_other_namespace_and_wrong_layout_never_load(model, tok, make_daemon, reference):
    d = make_daemon(dram="64MiB")
    p = tok.chat([{"role": "user", "content": "Say hello to the storage tier, please."}])
    run(engine(model, StoreLink(d.unix_endpoint, smollm_layout())), p, "store")
    # Same tokens, same keys, another model id: another namespace, no hits.
    other = StoreLink(d.unix_endpoint, smollm_layout(model_id="someone/else"))
    r = run(engine(model, other), p, "other")
    assert r.num_external_tokens == 0 and r.num_loaded_tokens == 0
    assert_identical(r, reference(p, NEW))
    # A layout that does not describe the engine's cache is refused before
    # anything is copied.
    wrong = StoreLink(d.unix_endpoint, smollm_layout(model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                                                     head_dim=32, num_kv_heads=6))
    eng = te.Engine(model, num_blocks=32)
    with pytest.raises(ValueError, match="does not describe"):
        StrataHooks.check(wrong.layout, eng.kv_cache)
