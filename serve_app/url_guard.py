"""Which addresses an image URL may reach: public unicast only, unless allowed by config.

A URL from a stranger must not make the server fetch from its own network (loopback,
private ranges, link-local, cloud metadata services): that would turn the edit route
into a proxy into the operator's infrastructure. IPv6 spellings of IPv4 addresses are
judged by the IPv4 address they stand for.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services (AWS/GCP/Azure, AWS over IPv6, Alibaba). Already refused as
# link-local / private / shared space; named so that an allowed network does not re-open them.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in
                               ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
# The well-known NAT64 prefix: the IPv4 address is the last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Never public, though Python before 3.13 may call them global: local-use NAT64 (an operator
# picks the prefix length, /48 to /96, so where the IPv4 address sits is unknown) and the
# deprecated site-local range.
_NEVER_PUBLIC = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64, Teredo), if any.

    `::ffff:127.0.0.1` reaches 127.0.0.1, yet Python before 3.13 calls it global.
    """
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_forbidden_address(address: IPAddress) -> bool:
    """True for anything but a plain public unicast address; an IPv6 one that wraps IPv4 is judged by that."""
    embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if embedded is not None:
        return is_forbidden_address(embedded)
    if isinstance(address, ipaddress.IPv6Address) and any(address in network for network in _NEVER_PUBLIC):
        return True
    return (address in METADATA_ADDRESSES or not address.is_global or address.is_private
            or address.is_loopback or address.is_link_local or address.is_multicast
            or address.is_reserved or address.is_unspecified)


class HostPolicy:
    """`allowed_hosts`: names or IP literals (matched exactly) and IP networks (CIDR)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.names = {_normal_host(entry) for entry in entries}
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for name in self.names:
            try:
                self.networks.append(ipaddress.ip_network(name, strict=False))
            except ValueError:
                pass  # a host name

    def allows(self, host: str, address: IPAddress) -> bool:
        """May this host, resolved to this address, be connected to?

        A listed name or IP literal allows whatever it resolves to; a listed
        network allows its addresses except the metadata services, which only
        an exact entry re-opens.
        """
        if _normal_host(host) in self.names:
            return True
        if not _is_metadata(address) and any(address in net for net in self.networks):
            return True
        return not is_forbidden_address(address)


def _is_metadata(address: IPAddress) -> bool:
    """A metadata service's address, or an IPv6 one wrapping it (`::ffff:169.254.169.254` under
    an allowed `::ffff:0:0/96`)."""
    embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    return address in METADATA_ADDRESSES or embedded in METADATA_ADDRESSES


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()
