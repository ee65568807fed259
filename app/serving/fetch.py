"""Fetching an image from a URL a stranger gave us, without becoming their proxy (SSRF).

Every destination is checked against an address policy: the address aiohttp actually connects to
(names are resolved once, by `GuardedResolver`, and only approved addresses are handed to the
connector), again for every redirect hop, and once more on the connected socket's peer address.
Size, time and redirects are bounded; every failure is a `FetchError` whose code says whose fault
it is (`app.serving.errors` maps it to a status).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from app.core.errors import DomainError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]

MAX_REDIRECTS = 3


class FetchError(DomainError):
    """A URL that cannot be fetched, or a remote server that failed us. Codes: `missing_url`,
    `invalid_url`, `destination_not_allowed`, `image_too_large`, `remote_error`, `remote_not_image`,
    `remote_unreachable`, `too_many_redirects`, `remote_timeout`."""
_REDIRECTS = {301, 302, 303, 307, 308}


def public_only(ip: IPAddress) -> bool:
    """Allow only globally routable unicast addresses.

    Refuses loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16 with
    the cloud metadata service, fe80::/10), multicast, reserved, unspecified and shared (100.64/10)
    ranges, including IPv4 addresses hidden inside IPv6 (::ffff:a.b.c.d, 6to4, Teredo).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not public_only(embedded):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback)


def allow_any(ip: IPAddress) -> bool:
    """ALLOW_PRIVATE_URLS=true: for local development and tests against local servers."""
    return True


def forbidden(host: str) -> FetchError:
    return FetchError("destination_not_allowed", f"Fetching from {host} is not allowed: it is not a public address.")


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself, including legacy IPv4 forms (2130706433, 127.1, 0x7f.1)
    that the C library would otherwise quietly turn into an address."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def check_url(url: URL, policy: AddressPolicy) -> URL:
    """Refuse what no fetch may touch before any connection is made; raise FetchError."""
    if url.scheme not in ("http", "https"):
        raise FetchError("invalid_url", "Only http and https URLs can be fetched.")
    host = url.raw_host
    if not host:
        raise FetchError("invalid_url", "The URL has no host.")
    address = literal_address(host)
    if address is not None:
        if not policy(address):
            raise forbidden(host)
        # Normalise legacy forms so aiohttp connects to exactly the address we checked.
        return url.with_host(str(address)) if str(address) != host.strip("[]") else url
    return url


class DestinationNotAllowed(Exception):
    def __init__(self, host: str):
        super().__init__(host)
        self.host = host


class GuardedResolver(AbstractResolver):
    """Resolves names with `inner` and refuses them if any address breaks the policy (a name with
    one public and one private address is a DNS-rebinding trick, not a mistake)."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None):
        self._policy = policy
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[dict[str, Any]]:
        infos = await self._inner.resolve(host, port, family)
        if not infos or not all(self._policy(ipaddress.ip_address(info["host"])) for info in infos):
            raise DestinationNotAllowed(host)
        return infos

    async def close(self) -> None:
        await self._inner.close()


def make_session(
    policy: AddressPolicy, timeout_s: float, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy, resolver), force_close=True, limit=32)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),  # no cookies carried between strangers' requests
        auto_decompress=False,  # we decompress ourselves, bounded (gzip bombs)
        trust_env=False,
        headers={"User-Agent": "cuddle-or-not/1.0", "Accept": "image/*", "Accept-Encoding": "gzip, deflate, identity"},
    )


def parse_url(raw: str | None) -> URL:
    if not raw:
        raise FetchError("missing_url", "Give the image address as ?url=https://...")
    if len(raw) > 4096:
        raise FetchError("invalid_url", "The URL is too long.")
    try:
        url = URL(raw.strip())
    except (ValueError, TypeError):
        raise FetchError("invalid_url", "That is not a valid URL.") from None
    if not url.is_absolute():
        raise FetchError("invalid_url", "The URL must be absolute, like https://example.com/bear.jpg.")
    return url


async def fetch_image_bytes(session: aiohttp.ClientSession, url: URL, policy: AddressPolicy, max_bytes: int,
                            timeout_s: float) -> bytes:
    """GET `url` (following at most three redirects, each re-checked) and return the body."""
    try:
        async with asyncio.timeout(timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                url = check_url(url, policy)
                async with session.get(url, allow_redirects=False) as resp:
                    _check_peer(resp, policy, url)
                    if resp.status in _REDIRECTS and "Location" in resp.headers:
                        url = resp.url.join(URL(resp.headers["Location"]))
                        continue
                    if resp.status != 200:
                        raise FetchError("remote_error", f"The image server answered HTTP {resp.status}.")
                    return await _read_body(resp, max_bytes)
            raise FetchError("too_many_redirects", f"The image URL redirected more than {MAX_REDIRECTS} times.")
    except TimeoutError:
        raise FetchError("remote_timeout", f"The image server did not answer within {timeout_s:g} s.") from None
    except DestinationNotAllowed as exc:
        raise forbidden(exc.host) from None
    except aiohttp.InvalidURL:
        raise FetchError("invalid_url", "That is not a valid URL.") from None
    except aiohttp.ClientConnectorDNSError:
        raise FetchError("remote_unreachable", f"The host {url.host} could not be found.") from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise FetchError("remote_unreachable", f"Could not fetch the image ({type(exc).__name__}).") from None


def _check_peer(resp: aiohttp.ClientResponse, policy: AddressPolicy, url: URL) -> None:
    transport = resp.connection.transport if resp.connection else None
    peer = transport.get_extra_info("peername") if transport else None
    if peer and not policy(ipaddress.ip_address(peer[0].split("%")[0])):
        raise forbidden(url.host or "")


async def _read_body(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    too_big = FetchError("image_too_large", f"The image is larger than {max_bytes // (1024 * 1024)} MB.")
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise too_big
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate", "x-gzip", ""):
        raise FetchError("remote_error", f"The image server used an unsupported encoding ({encoding}).")
    # wbits 47 accepts both gzip and zlib framing; max_length bounds what one chunk may expand to.
    inflate = zlib.decompressobj(wbits=47) if encoding not in ("identity", "") else None
    parts, size = [], 0
    try:
        async for chunk in resp.content.iter_chunked(64 * 1024):
            if inflate is not None:
                chunk = inflate.decompress(chunk, max_bytes - size + 1)
            size += len(chunk)
            if size > max_bytes:
                raise too_big
            parts.append(chunk)
    except zlib.error:
        raise FetchError("remote_error", "The image server sent a corrupt compressed body.") from None
    return b"".join(parts)
