"""Outbound HTTP to venue-supplied URLs: only https, only public addresses, bounded in time and size.

A venue's webhook URL is data anyone with venue access can edit, so the relay must not become a
way into cloud metadata endpoints or internal services. :func:`post`:

- refuses any scheme but https (http too when WEBHOOK_ALLOW_HTTP is true);
- resolves the host once and refuses it when any address is loopback, private, link-local,
  multicast, reserved, unspecified or otherwise not public, judging IPv4-mapped, NAT64 and 6to4
  IPv6 addresses by the IPv4 address they carry, unless WEBHOOK_ALLOWED_NETWORKS lists it;
- connects to the address it checked (the URL's host is replaced by that address; the Host header
  and TLS SNI/certificate check keep the name), so a second DNS answer cannot rebind it;
- follows no redirect, reads at most :data:`RESPONSE_BODY_LIMIT` bytes of the answer, and gives
  the whole exchange (DNS included) one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import certifi
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESPONSE_BODY_LIMIT = 4096
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CATEGORIES = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)
# getaddrinfo cannot be cancelled: lookups run here, not in asyncio's default executor, which
# asyncio.run would wait for after the deadline.
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")


class EgressRefused(Exception):
    """The URL or the address it resolves to is not allowed (permanent: retrying cannot help)."""


@dataclass(frozen=True)
class Answer:
    status: int
    location: str | None
    body: bytes


def _judged(address: IPAddress) -> list[IPAddress]:
    """The addresses that decide where a connection to ``address`` really ends up."""
    if isinstance(address, ipaddress.IPv4Address):
        return [address]
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    judged: list[IPAddress] = [address]
    if address.sixtofour is not None:
        judged.append(address.sixtofour)
    if address.teredo is not None:
        judged.extend(address.teredo)
    return judged


def forbidden_reason(address: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why a connection to ``address`` is refused, or None when it is public or allowed."""
    networks = list(allowed)

    def permitted(candidate: IPAddress) -> bool:
        return any(candidate in network for network in networks)

    if permitted(address):
        return None
    for candidate in _judged(address):
        if permitted(candidate):
            continue
        for attribute, label in _CATEGORIES:
            if getattr(candidate, attribute):
                return f"{candidate} is a {label} address"
        if not candidate.is_global:
            return f"{candidate} is not a public address"
    return None


def check_url(url: str, *, allow_http: bool) -> httpx.URL:
    """The parsed URL, or EgressRefused for a scheme or shape we do not send to."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise EgressRefused(f"invalid webhook URL: {error}") from None
    if parsed.scheme == "http" and not allow_http:
        raise EgressRefused("webhook URL must use https (WEBHOOK_ALLOW_HTTP is false)")
    if parsed.scheme not in ("https", "http"):
        raise EgressRefused(f"webhook URL scheme {parsed.scheme!r} is not allowed")
    if not parsed.raw_host:
        raise EgressRefused("webhook URL has no host")
    return parsed


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.run_in_executor(
            _RESOLVER,
            lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM),
        )
    except socket.gaierror as error:
        raise httpx.ConnectError(f"cannot resolve {host}: {error.strerror}") from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise httpx.ConnectError(f"cannot resolve {host}: no address")
    return addresses


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


async def _post(
    url: httpx.URL,
    content: bytes,
    headers: Mapping[str, str],
    timeout: float,
    allowed: list[IPNetwork],
    tls: ssl.SSLContext,
) -> Answer:
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = await _resolve(host, port)
    for address in addresses:
        reason = forbidden_reason(address, allowed)
        if reason is not None:
            raise EgressRefused(
                f"webhook host {host} is not allowed: {reason} "
                "(WEBHOOK_ALLOWED_NETWORKS can permit it)"
            )
    pinned_headers = {
        "Accept-Encoding": "identity",
        **headers,
        "Host": url.netloc.decode("ascii"),
    }
    async with httpx.AsyncClient(
        verify=tls, trust_env=False, follow_redirects=False, timeout=timeout
    ) as client:
        last_error: httpx.ConnectError | None = None
        for address in addresses:
            try:
                async with client.stream(
                    "POST",
                    url.copy_with(host=str(address)),
                    content=content,
                    headers=pinned_headers,
                    extensions={"sni_hostname": host},
                ) as response:
                    body = await _read_capped(response, RESPONSE_BODY_LIMIT)
                    return Answer(response.status_code, response.headers.get("location"), body)
            except httpx.ConnectError as error:
                last_error = error
        assert last_error is not None
        raise last_error


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else certifi.where())


def post(
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    timeout: float,
    allow_http: bool = False,
    allowed_networks: Iterable[IPNetwork] = (),
    ca_file: Path | None = None,
) -> Answer:
    """POST ``content`` to ``url`` under the rules above, within ``timeout`` seconds in all.

    Raises EgressRefused (permanent), TimeoutError, or httpx.HTTPError (transport failures).
    """
    parsed = check_url(url, allow_http=allow_http)
    request = _post(parsed, content, headers, timeout, list(allowed_networks), tls_context(ca_file))
    return asyncio.run(asyncio.wait_for(request, timeout))
