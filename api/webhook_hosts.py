"""Webhook URL checks at the API edge: http(s) with a host, and the optional host allow-list
(`webhook_allowed_hosts`: exact names or IP addresses, or "*.example.org" for any subdomain
of example.org; empty allows any host).

URLs are parsed with httpx, the parser the channel process sends with, so a URL cannot mean
one host here and another there (`http://allowed.org@evil.com/` is evil.com to both). Names
are compared in their IDNA (punycode) form, lower-cased, without a final dot; an IP address
matches only an entry for the same address, never a wildcard.
"""

from __future__ import annotations

import functools
import ipaddress
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import httpx

if TYPE_CHECKING:
    from collections.abc import Sequence

SCHEMES: Final = frozenset({"http", "https"})
#: What each placeholder stands for while a template is checked: a value URL-quoting leaves
#: as it is, and that is valid in a host name.
_SAMPLE: Final = "placeholder"
_FORMATTER: Final = string.Formatter()

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: str) -> _Address | None:
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _name(host: str) -> str:
    """A host name as compared: IDNA-encoded as httpx sends it, lower case, no final dot."""
    try:
        raw = httpx.URL(f"http://{host}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeDecodeError):
        raw = host
    return raw.lower().removesuffix(".")


@dataclass(frozen=True, slots=True)
class AllowedHosts:
    """The allow-list, normalised once."""

    names: frozenset[str]
    domains: tuple[str, ...]
    addresses: frozenset[_Address]

    @classmethod
    def parse(cls, entries: Sequence[str]) -> AllowedHosts:
        return _parse(tuple(entries))

    @classmethod
    def _build(cls, entries: tuple[str, ...]) -> AllowedHosts:
        names: set[str] = set()
        domains: list[str] = []
        addresses: set[_Address] = set()
        for entry in entries:
            entry = entry.strip()
            if entry.startswith("*."):
                domains.append(_name(entry[2:]))
            elif (address := _ip(entry)) is not None:
                addresses.add(address)
            elif entry:
                names.add(_name(entry))
        return cls(frozenset(names), tuple(domains), frozenset(addresses))

    def __bool__(self) -> bool:
        return bool(self.names or self.domains or self.addresses)

    def allows(self, host: str) -> bool:
        """Whether `host` (as httpx gives it in `URL.raw_host`) may be posted to."""
        address = _ip(host)
        if address is not None:
            return address in self.addresses
        name = _name(host)
        return name in self.names or any(name.endswith("." + d) for d in self.domains)


@functools.lru_cache(maxsize=8)
def _parse(entries: tuple[str, ...]) -> AllowedHosts:
    # Parsed once per setting, not on every send that carries an event_url.
    return AllowedHosts._build(entries)


def _authority_is_literal(template: str) -> bool:
    """Whether the scheme and host of a URL template come before its first placeholder.

    Rendered values are URL-quoted with every reserved character escaped (channel_proc's
    templates), so once the authority has ended at a literal "/", "?" or "#", no value can
    reach back into it.
    """
    prefix = ""
    for literal, name, _, _ in _FORMATTER.parse(template):
        prefix += literal
        if name is not None:
            _, slashes, rest = prefix.partition("//")
            return bool(slashes) and any(mark in rest for mark in "/?#")
    return True


def _sample(template: str) -> str:
    """The template rendered with a sample value in each placeholder (`{{` as `{`)."""
    return "".join(
        literal + ("" if name is None else _SAMPLE)
        for literal, name, _, _ in _FORMATTER.parse(template)
    )


def webhook_url_problem(url: str, allowed: AllowedHosts, *, template: bool) -> str | None:
    """Why `url` may not be used as a webhook, or None when it may.

    `template`: `url` has placeholders (already checked for syntax and names).
    """
    if template and allowed and not _authority_is_literal(url):
        return (
            "with webhook_allowed_hosts set, the scheme and host may not contain a "
            "placeholder (placeholders belong in the path or query)"
        )
    try:
        parsed = httpx.URL(_sample(url) if template else url)
    except httpx.InvalidURL as exc:
        return f"not a valid URL ({exc})"
    if parsed.scheme not in SCHEMES:
        shown = f"{parsed.scheme!r}" if parsed.scheme else "none"
        return f"the scheme must be http or https (got {shown})"
    host = parsed.raw_host.decode("ascii", errors="replace")
    if not host:
        return "the URL has no host (write it as http://host/path)"
    if allowed and not allowed.allows(host):
        return f"host {parsed.host!r} is not in webhook_allowed_hosts"
    return None
