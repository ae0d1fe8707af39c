from strata import Layout
from strata.keys import chain_keys

# Shared with clients/rust/src/keys.rs (pinned_vector): a change breaks every
# cluster that mixes client versions.
PINNED = ["5211a8db825216270898ce701a11e56c", "7063b31de008879e8a93b874edee894b"]


def test_pinned_vector_matches_the_rust_client():
    assert [k.hex() for k in chain_keys(list(range(8)), 4)] == PINNED


def test_prefix_property_and_partial_blocks():
    a = list(range(64))
    b = list(a)
    b[40] = 999
    ka, kb = chain_keys(a, 16, seed=7), chain_keys(b, 16, seed=7)
    assert ka[:2] == kb[:2] and ka[2] != kb[2] and ka[3] != kb[3]
    assert chain_keys(a, 16, seed=8)[0] != ka[0]
    assert len(chain_keys(a[:63], 16)) == 3


def test_namespace_id_matches_the_daemons_encoding():
    # Pinned in proto/src/domain.rs (namespace_id_is_stable_and_field_sensitive).
    l = Layout("m", "f16", 30, 3, 64, 16)
    assert l.namespace_id() == 0x0F834C26B924C7BF
    assert l.block_bytes == 30 * 2 * 3 * 64 * 2 * 16
