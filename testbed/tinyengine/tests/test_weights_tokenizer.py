from __future__ import annotations

import hashlib

import numpy as np
import pytest

import tinyengine as te
from tinyengine.hashing import block_hashes, hash_block
from tinyengine.weights import GGUF_SHA256


def test_fetch_is_idempotent(gguf_path):
    assert te.fetch() == gguf_path
    h = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert h == GGUF_SHA256


def test_config(model):
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.intermediate_size == 1536 and c.vocab_size == 49152
    assert c.rope_theta == 100000.0 and c.tied_embeddings
    assert c.eos_token_id == 2 and c.bos_token_id == 1


def test_weights_are_mmapped_float32(weights):
    tensors, meta = weights
    assert len(tensors) == 272
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert isinstance(tensors["token_embd.weight"], np.memmap)
    assert tensors["token_embd.weight"].shape == (49152, 576)
    assert meta["tokenizer.ggml.pre"] == "smollm"


TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "Numbers: 3.14159, 2024-01-01, 1,000,000 and x1y22z333",
    "Mixed\tTabs\nand\n\nnewlines\r\n   indented",
    "don't won't I'm you're they've we'll she'd",
    "def f(x):\n    return x ** 2  # comment\n",
    "Symbols: ~!@#$%^&*()_+-=[]{}|;':\",./<>?`",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


def test_round_trip_unicode(tokenizer):
    text = "Café naïve — 東京 🚀"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split(tokenizer):
    ids = tokenizer.encode("12345")
    assert len(ids) == 5
    assert [tokenizer.decode([i]) for i in ids] == list("12345")


def test_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    plain = tokenizer.encode("<|im_start|>", allow_special=False)
    assert 1 not in plain and len(plain) > 1
    assert tokenizer.decode(ids, skip_special=True) == "user\nhi"


def test_chat_template(tokenizer, chat_prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(chat_prompt) == text
    assert chat_prompt[:3] == [1, 9690, 198]  # <|im_start|> system \n
    assert chat_prompt[-4:] == [1, 520, 9531, 198]  # <|im_start|> ass istant \n
    own_system = tokenizer.chat([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert tokenizer.decode(own_system).count("<|im_start|>system") == 1


def test_block_hashes_definition():
    toks = list(range(40))
    hs = block_hashes(toks, 16)
    assert len(hs) == 2  # trailing partial block is not hashed
    h0 = hashlib.sha256(b"".join(t.to_bytes(4, "little") for t in range(16))).digest()
    h1 = hashlib.sha256(h0 + b"".join(t.to_bytes(4, "little") for t in range(16, 32))).digest()
    assert hs == [h0, h1]
    assert hash_block(None, toks[:16]) == h0
    # pinned: changing the definition breaks every store written with it
    assert h0.hex() == PINNED_H0
    other = block_hashes([999] + toks[1:], 16)
    assert other[0] != hs[0] and other[1] != hs[1]  # a hash names its whole prefix


PINNED_H0 = "5d85718ec594b982c252d0279e5966ffca33a5eaf2a455038d3ab331fde70cea"


# Token ids produced by llama.cpp (llama-cpp-python 0.3.36, pre-tokenizer "smollm") on this GGUF.
LLAMA_CPP_IDS = [
    (
        "Numbers: 3.14159, 2024-01-01 and x1y22z333",
        [39006, 42, 216, 35, 30, 33, 36, 33, 37, 41, 28, 216, 34, 32, 34, 36, 29, 32, 33, 29, 32, 33, 284,
         1792, 33, 105, 34, 34, 106, 35, 35, 35],
    ),
    (
        "don't  stop\n\tbelieving 'til \u6771\u4eac \U0001F680",
        [12420, 982, 216, 2853, 198, 197, 23282, 1103, 637, 100, 301, 17097, 247, 126, 16736, 122, 15107, 244, 218],
    ),
    (
        "def f(x):\n    return x ** 2  # comment\n",
        [1604, 275, 24, 104, 727, 472, 1003, 1792, 1903, 216, 34, 216, 907, 5189, 198],
    ),
]


@pytest.mark.parametrize("text,ids", LLAMA_CPP_IDS)
def test_matches_llama_cpp_tokenization(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
