"""The Python client against real daemons that authenticate TCP clients:
bearer tokens, and mutual TLS with certificates made here with the
``openssl`` command (no private key is committed)."""

import asyncio
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import strata
from strata import AsyncClient, Block, Client, Credentials, Layout, credentials_from
from strata.events import EventFeed
from strata.integrations.link import StoreLink
from strata.testing import Daemon
from strata.types import BlockStored

from conftest import payload, small_layout

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"

TENANTS = """
[[tenants]]
name = "alice"
tls_names = ["alice-engine"]
[[tenants]]
name = "bob"
tls_names = ["bob.engines.example"]
"""


@pytest.fixture(scope="module")
def token_daemon(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "tokens").write_text(f"alice {ALICE}\nbob {BOB}\n")
    daemon = Daemon(config=f'[auth]\ntcp = "token"\ntokens_file = "{d / "tokens"}"\n{TENANTS}').start()
    yield daemon
    daemon.close()


def test_tokens_pick_the_tenant_and_tenants_are_separated(token_daemon):
    l = small_layout("test/auth")
    with Client(token_daemon.endpoint, credentials=Credentials(token=ALICE)) as alice, \
            Client(token_daemon.endpoint, credentials=Credentials(token=BOB)) as bob:
        assert alice.stats().tenant == "alice"
        ns = alice.register_layout(l)
        # The daemon folds the tenant into the namespace; the client derives
        # the same id when told the tenant.
        assert ns.id == l.namespace_id("alice") != l.namespace_id()
        alice.put(ns, [Block(b"k0", payload(l, 1))])
        assert bytes(alice.get(ns, [b"k0"])[0].data) == bytes(payload(l, 1))
        with pytest.raises(strata.PermissionDenied) as e:
            bob.get(ns, [b"k0"])
        assert f"{ns.id:016x}" in e.value.message and "tenant bob" in e.value.message
        with pytest.raises(strata.PermissionDenied):
            bob.delete(ns, [b"k0"])
        assert bob.register_layout(l).id == l.namespace_id("bob")
        s = alice.stats(per_namespace=True)
        assert [t.name for t in s.tenant_stats] == ["alice"]
        assert [n.tenant for n in s.namespace_stats] == ["alice"]
    for creds, want in [(None, "authorization: Bearer"),
                        (Credentials(token=ALICE + "x"), "not one this daemon knows")]:
        with Client(token_daemon.endpoint, credentials=creds) as c:
            with pytest.raises(strata.Unauthenticated) as e:
                c.stats()
            assert want in e.value.message


def test_async_client_and_event_feed_send_the_token(token_daemon):
    l = small_layout("test/auth-aio")

    async def run():
        async with AsyncClient(token_daemon.endpoint, credentials=Credentials(token=BOB)) as c:
            ns = await c.register_layout(l)
            await c.put(ns, [Block(b"a", payload(l, 2))])
            assert (await c.stats()).tenant == "bob"
            return ns

    ns = asyncio.run(run())
    feed = EventFeed(token_daemon.endpoint, [ns.id], retry_s=0.1, credentials=Credentials(token=BOB))
    got = []
    t = threading.Thread(target=lambda: [got.append(i) for i in feed], daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not any(isinstance(e, BlockStored) for e in got) and time.monotonic() < deadline:
        time.sleep(0.02)
    feed.close()
    assert any(isinstance(e, BlockStored) and e.key == b"a" for e in got), got


def test_store_link_passes_credentials_through(token_daemon):
    l = small_layout("test/auth-link")
    link = StoreLink(token_daemon.endpoint, l, credentials=Credentials(token=ALICE))
    ns = link.connect()
    assert ns.id == link.namespace_id == l.namespace_id("alice")
    link.close()
    # Without credentials the link refuses at start, saying why.
    with pytest.raises(strata.Unauthenticated):
        StoreLink(token_daemon.endpoint, l).connect()


def test_namespace_folding_matches_the_daemons_pinned_value():
    # strata-proto's tenant_folding test pins the same layout and tenant.
    l = Layout(model_id="m", dtype="f16", num_layers=30, num_kv_heads=3, head_dim=64,
               tokens_per_block=16)
    assert l.namespace_id("alice") == 0x42A9B884794554AC
    assert l.namespace_id("default") == l.namespace_id() == 0x0F834C26B924C7BF


# ---- mutual TLS -------------------------------------------------------------------

def openssl(*args, cwd):
    exe = shutil.which("openssl")
    assert exe, "these tests make certificates with the openssl command (Debian: apt-get install openssl)"
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,digitalSignature", cwd=d)


def make_leaf(d: Path, ca: str, name: str, cn: str, ext: str):
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue")
    make_leaf(d, "ca", "server", "stratad", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client = "extendedKeyUsage=clientAuth\n"
    make_leaf(d, "ca", "alice", "alice-engine", client)
    make_leaf(d, "ca", "bob", "some host", "subjectAltName=DNS:bob.engines.example\n" + client)
    make_leaf(d, "rogue", "forged", "alice-engine", client)
    return d


@pytest.fixture(scope="module")
def mtls_daemon(pki):
    daemon = Daemon(config=f'[auth]\ntcp = "mtls"\ntls_cert = "{pki / "server.pem"}"\n'
                           f'tls_key = "{pki / "server.key"}"\ntls_client_ca = "{pki / "ca.pem"}"\n'
                           f"{TENANTS}").start()
    yield daemon
    daemon.close()


def tls(pki: Path, who: str | None) -> Credentials:
    return Credentials(root_certificates=(pki / "ca.pem").read_bytes(),
                       certificate_chain=(pki / f"{who}.pem").read_bytes() if who else None,
                       private_key=(pki / f"{who}.key").read_bytes() if who else None,
                       server_name="localhost")


def test_mutual_tls_maps_certificates_and_refuses_missing_or_forged_ones(mtls_daemon, pki):
    url = mtls_daemon.endpoint.replace("http://", "https://")
    l = small_layout("test/mtls")
    with Client(url, credentials=tls(pki, "alice")) as alice:
        assert alice.stats().tenant == "alice"
        ns = alice.register_layout(l)
        alice.put(ns, [Block(b"x", payload(l, 3))])
    with Client(url, credentials=tls(pki, "bob")) as bob:
        assert bob.stats().tenant == "bob"
        with pytest.raises(strata.PermissionDenied):
            bob.lookup(ns, [b"x"])
    # TLS without a client certificate: each call is refused, saying why.
    with Client(url, credentials=tls(pki, None)) as anon:
        with pytest.raises(strata.Unauthenticated) as e:
            anon.stats()
        assert "client certificate" in e.value.message
    # Another CA's certificate (or plain TCP): the transport fails.
    with Client(url, credentials=tls(pki, "forged"), timeout_s=5) as forged:
        with pytest.raises(strata.Unavailable):
            forged.stats()
    with Client(mtls_daemon.endpoint, timeout_s=5) as plain:
        with pytest.raises(strata.Unavailable):
            plain.stats()
    m = mtls_daemon.metrics()
    assert 'strata_auth_denied_total{reason="no_credential"} 1' in m


def test_credentials_from_an_adapter_config(pki, tmp_path):
    assert credentials_from({"endpoint": "x"}) is None
    (tmp_path / "tok").write_text(ALICE + "\n")
    c = credentials_from({"token_file": str(tmp_path / "tok"), "tls_ca_file": str(pki / "ca.pem"),
                          "tls_cert_file": str(pki / "alice.pem"),
                          "tls_key_file": str(pki / "alice.key"), "tls_server_name": "localhost"})
    assert c.token == ALICE and c.root_certificates.startswith(b"-----BEGIN CERTIFICATE")
    assert c.metadata() == (("authorization", f"Bearer {ALICE}"),)
    assert ALICE not in repr(c)
    with pytest.raises(strata.InvalidArgument):
        Client("http://127.0.0.1:1", credentials=Credentials(root_certificates=b"x"))
