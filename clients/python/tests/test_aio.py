import pytest

import strata
from strata import AsyncClient, Block, PutResult, Tier
from strata.keys import chain_keys

from conftest import payload, small_layout


async def test_async_roundtrip(daemon):
    l = small_layout("test/aio")
    async with AsyncClient(daemon.unix_endpoint) as c:
        await c.wait_ready()
        ns = await c.register_layout(l)
        keys = chain_keys(list(range(48)), 16)
        data = [payload(l, 10 + i) for i in range(3)]
        out = await c.put(ns, [Block(k, d) for k, d in zip(keys, data)])
        assert [o.result for o in out] == [PutResult.STORED] * 3
        r = await c.lookup(ns, keys, lease_ttl_ms=2000)
        assert r.hits == 3 and r.tiers == [Tier.DRAM] * 3
        got = await c.get(ns, keys, lease=r.lease)
        assert [g.data for g in got] == [d.tobytes() for d in data]
        assert await c.release(r.lease) == 3
        assert (await c.delete(ns, keys[2:])).deleted == 1


async def test_async_errors_are_typed(daemon):
    async with AsyncClient(daemon.endpoint) as c:
        ns = await c.register_layout(small_layout("test/aio-bad"))
        with pytest.raises(strata.NotFound):
            await c.get(ns, [b"absent"])
        with pytest.raises(strata.InvalidArgument):
            await c.lookup(ns, [b""])
