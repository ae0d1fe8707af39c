"""Engine integrations: drop-in KV tiers for the engines our users run.

- :mod:`strata.integrations.vllm`: a ``KVConnectorBase_V1`` connector
  (``kv_connector_module_path="strata.integrations.vllm"``);
- :mod:`strata.integrations.sglang`: a HiCache storage backend
  (``--hicache-storage-backend dynamic``);
- :mod:`strata.integrations.lmcache`: an L2 adapter for LMCache's
  multiprocess server (``--l2-adapter '{"type": "plugin", ...}'``).

All three talk to ``stratad`` through :class:`~strata.integrations.link.StoreLink`,
which never lets a daemon failure fail an engine request: a call that
cannot reach the daemon is a miss (load) or a skipped save, and the link
backs off before it tries again.

The upstream versions these follow method for method are pinned in
``upstream/*.json`` (method lists recorded from the pinned sources) and
``upstream/NOTES.md``.
"""
