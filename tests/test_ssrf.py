"""The fetcher never becomes a proxy into private networks.

End-to-end cases only target loopback. Private, link-local and other ranges are tested at the
policy and resolver level with a fake resolver: no test sends a packet beyond 127.0.0.0/8 and ::1,
even if the guard were broken.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
import requests
from inprocess import serve
from support import AppProcess, LocalHTTPServer, image_bytes, synthetic_image
from yarl import URL

from app.serving.app import create_app
from app.serving.config import Settings
from app.serving.errors import STATUSES
from app.serving.fetch import (
    DestinationNotAllowed,
    FetchError,
    GuardedResolver,
    check_url,
    literal_address,
    public_only,
)

IMAGE = image_bytes(synthetic_image((200, 40, 40)))


@pytest.fixture(scope="module")
def strict_server(tiny_export, tmp_path_factory):
    """The real server with the default setting: private destinations refused."""
    app = AppProcess({"MODEL_PATH": str(tiny_export)}, tmp_path_factory.mktemp("strict") / "server.log")
    yield app.wait_ready()
    app.stop()


@pytest.fixture
def target():
    server = LocalHTTPServer(routes={"/a.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE)})
    yield server
    server.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "2130706433", "127.1", "0x7f.1",
                                  "127.0.0.1.nip.io.invalid"])
def test_loopback_in_any_spelling_is_refused_and_never_connected(strict_server, target, host):
    resp = requests.get(strict_server.url + "/classify-url", params={"url": f"http://{host}:{target.port}/a.jpg"})
    if host.endswith(".invalid"):  # a name that does not resolve: not allowed to reach anything either
        assert resp.status_code in (403, 502)
    else:
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["code"] == "destination_not_allowed"
    assert target.requests == []


def test_redirects_are_rechecked_on_every_hop(tiny_export):
    """Policy: only 127.0.0.2 is allowed. A redirect from it to 127.0.0.1 is refused."""
    allowed = ipaddress.ip_address("127.0.0.2")
    inner = LocalHTTPServer(host="127.0.0.1", routes={"/a.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE)})
    outer = LocalHTTPServer(host="127.0.0.2", routes={
        "/a.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE),
        "/hop": (302, {"Location": inner.url("/a.jpg")}, b""),
        "/relative": (302, {"Location": "/a.jpg"}, b""),
    })
    app = create_app(Settings(model_path=tiny_export, threads=1), policy=lambda ip: ip == allowed)
    try:
        with serve(app) as base:
            ok = requests.get(base + "/classify-url", params={"url": outer.url("/a.jpg")})
            assert ok.status_code == 200, ok.text
            relative = requests.get(base + "/classify-url", params={"url": outer.url("/relative")})
            assert relative.status_code == 200, relative.text
            refused = requests.get(base + "/classify-url", params={"url": outer.url("/hop")})
            assert refused.status_code == 403, refused.text
    finally:
        inner.close()
        outer.close()
    assert "/hop" in outer.requests
    assert inner.requests == []


def test_redirect_limit(tiny_export):
    loop = LocalHTTPServer()
    loop.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    app = create_app(Settings(model_path=tiny_export, threads=1, allow_private_urls=True))
    try:
        with serve(app) as base:
            resp = requests.get(base + "/classify-url", params={"url": loop.url("/loop")})
    finally:
        loop.close()
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "too_many_redirects"
    assert len(loop.requests) == 4  # the first request and three redirects


BLOCKED = ["10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1", "169.254.169.254",
           "127.0.0.1", "127.8.9.10", "0.0.0.0", "100.64.0.1", "224.0.0.1", "239.255.255.250", "240.0.0.1",
           "255.255.255.255", "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1",
           "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:a00:1::1", "64:ff9b::a00:1"]
PUBLIC = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::200e"]


@pytest.mark.parametrize("address", BLOCKED)
def test_policy_refuses_non_public_addresses(address):
    assert not public_only(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_policy_allows_public_addresses(address):
    assert public_only(ipaddress.ip_address(address))


class FakeResolver:
    """Answers from a table; never touches the network."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table

    async def resolve(self, host, port=0, family=0):
        return [{"hostname": host, "host": a, "port": port, "family": 0, "proto": 0, "flags": 0}
                for a in self.table[host]]

    async def close(self):
        pass


@pytest.mark.parametrize("address", BLOCKED)
def test_resolver_refuses_names_that_resolve_to_private_addresses(address):
    resolver = GuardedResolver(public_only, FakeResolver({"evil.example": [address]}))
    with pytest.raises(DestinationNotAllowed):
        asyncio.run(resolver.resolve("evil.example", 80))


def test_resolver_refuses_a_name_mixing_public_and_private_addresses():
    resolver = GuardedResolver(public_only, FakeResolver({"rebind.example": ["93.184.216.34", "10.0.0.1"]}))
    with pytest.raises(DestinationNotAllowed):
        asyncio.run(resolver.resolve("rebind.example", 80))
    ok = GuardedResolver(public_only, FakeResolver({"fine.example": ["93.184.216.34"]}))
    assert asyncio.run(ok.resolve("fine.example", 80))[0]["host"] == "93.184.216.34"


@pytest.mark.parametrize("url", ["http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data/",
                                 "http://[fe80::1]/x", "http://[::ffff:10.0.0.1]/x", "http://[fc00::1]:8080/x",
                                 "http://0xa9.0xfe.0xa9.0xfe/x", "http://2852039166/x", "http://192.168.1/x"])
def test_literal_addresses_are_refused_before_any_connection(url):
    with pytest.raises(FetchError) as err:
        check_url(URL(url), public_only)
    assert STATUSES[err.value.code] == 403


def test_legacy_ipv4_forms_are_understood():
    assert str(literal_address("2130706433")) == "127.0.0.1"
    assert str(literal_address("127.1")) == "127.0.0.1"
    assert literal_address("example.com") is None
    assert check_url(URL("http://2130706433:8000/a"), lambda ip: True).host == "127.0.0.1"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://x/", "ftp://example.com/a.jpg", "http:///a.jpg"])
def test_only_http_and_https(url):
    with pytest.raises(FetchError) as err:
        check_url(URL(url), public_only)
    assert STATUSES[err.value.code] == 400
