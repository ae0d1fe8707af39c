"""Method lists recorded from the pinned upstream sources (vllm.json,
sglang.json, lmcache.json) and the implementer's notes (NOTES.md)."""
