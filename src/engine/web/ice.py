"""Which local addresses WebRTC offers as ICE host candidates.

aioice (under aiortc) offers every address of every interface except the
loopback ones, and has no setting for it. A server bound to 127.0.0.1 must
offer 127.0.0.1 (a browser on the same machine, or a test in a network
namespace with only loopback up, has nothing else to pair with), and a
server bound to one address should not offer the others. aioice looks its
address function up as a module global at each gathering, so replacing that
function is the one place to choose; aiortc's own peers in the same process
(a test's client) follow the same choice.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import aioice.ice

_original: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses
_addresses: list[str] | None = None


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if _addresses is None:
        return _original(use_ipv4, use_ipv6)
    return [a for a in _addresses if (use_ipv4 if ipaddress.ip_address(a).version == 4 else use_ipv6)]


def offer_addresses(host: str) -> list[str] | None:
    """Offer only `host` when it is one address (127.0.0.1, ::1, 192.0.2.7), every
    non-loopback address when it is a wildcard (0.0.0.0, ::, a name). Returns the
    addresses offered (None = aioice's own choice)."""
    global _addresses
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    _addresses = None if ip is None or ip.is_unspecified else [str(ip)]
    aioice.ice.get_host_addresses = _host_addresses
    return _addresses
