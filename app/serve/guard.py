"""Who may talk to the server at all: the Host header (DNS rebinding) and the Origin header (web pages), checked
before anything else — before the API key, before CORS, on /health too.

Why both, for a server on 127.0.0.1 without a key:
- A page on any site can make the visitor's browser send a "simple" request (a POST with `Content-Type: text/plain`,
  no preflight) to http://127.0.0.1:8080. The body still parses as JSON, so the model runs; CORS only hides the
  answer from the page. Such a request carries the page's `Origin`, so one whose Origin is neither the server's own
  nor allowed with `--allow-origin` is refused, whatever its method and content type.
- DNS rebinding goes further: the page's own name (attacker.example) is made to resolve to 127.0.0.1 after it
  loaded, so its requests are same-origin, read the answers and carry `Host: attacker.example`. A Host that names no
  address of this server is refused. An IP address in Host cannot have been rebound, so the address a client
  dialled is accepted when it is this server's.

Pure logic plus a small ASGI middleware; no Starlette import at the top (build_app imports this module).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from dataclasses import dataclass, field

from malhae.ui import printable

# names that no outside DNS server can point at this machine: RFC 6761's .localhost, mDNS's .local (answered on the
# LAN only) and ICANN's private-use .internal (Docker's host.docker.internal); Ollama accepts the same
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
SHOWN = 120  # characters of a client's header quoted back in an error
ORIGIN = re.compile(r"https?://[^/\s]+")  # a web page's origin, as --allow-origin takes it


def host_name(header: str) -> str:
    """The name or address a Host header gives: no port, no brackets, lower case, no trailing dot."""
    value = header.strip().lower()
    if value.startswith("["):  # [::1]:8080
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])  # fe80::1%eth0: the zone does not matter here
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _shown(value: str) -> str:
    value = printable(value)  # the one rule for text from outside (app.ui): a client's header is that
    return value if len(value) <= SHOWN else value[:SHOWN] + "…"


@dataclass(frozen=True)
class Hosts:
    """The Host headers this server answers: localhost and any loopback address, the address or name it is bound to,
    this machine's host name, names under LOCAL_SUFFIXES, the names given with --allow-host ("*": any Host), and any
    IP address when bound to every interface (0.0.0.0 or ::)."""

    bound: str = "127.0.0.1"
    allowed: tuple[str, ...] = ()
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        own = {"localhost", host_name(self.bound), *(host_name(a) for a in self.allowed if a != "*")}
        with contextlib.suppress(OSError):
            own.add(socket.gethostname().lower())
        object.__setattr__(self, "names", frozenset(own - {""}))

    @property
    def wildcard(self) -> bool:
        address = _address(host_name(self.bound))
        return address is not None and address.is_unspecified

    def allows(self, header: str | None) -> bool:
        """Whether a request with this Host header (None or empty: none given, as HTTP/1.0 clients may; browsers
        always send one) may be answered."""
        if not header or "*" in self.allowed:
            return True
        name = host_name(header)
        if name in self.names or name.endswith(LOCAL_SUFFIXES):
            return True
        address = _address(name)
        if address is None:
            return False
        bound = _address(host_name(self.bound))
        return address.is_loopback or address.is_unspecified or address == bound or self.wildcard

    def refusal(self, header: str) -> str:
        name = _shown(host_name(header))
        return (f"Host {_shown(header)!r} is not a name of this server (a guard against DNS rebinding); if clients "
                f"reach it by that name, start it with --allow-host {name}")


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request a web page at `origin` sent may be answered: the page is the server's own (scheme://Host),
    or allowed with --allow-origin ("*": any page)."""
    if "*" in allowed:
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in (a.lower().rstrip("/") for a in allowed):
        return True
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and host is not None and rest == host.strip().lower()


def is_origin(value: str) -> bool:
    """Whether `value` is what --allow-origin takes: a web page's origin, scheme://host[:port], no path."""
    return ORIGIN.fullmatch(value) is not None


def origin_refusal(origin: str) -> str:
    shown = _shown(origin)
    # "null" (a sandboxed frame, a page opened from a file) names no page that could be allowed alone
    fix = f"--allow-origin {shown}" if is_origin(origin) else "--allow-origin * (any page: it names no site)"
    return (f"requests from the web page {shown!r} are refused (a page on another site must not use the model "
            f"through your browser); to let it, start the server with {fix}")


class Guard:
    """ASGI middleware: a request whose Host or Origin is not allowed gets a 403 JSON error (Ollama's shape under
    /api/) and never reaches the API key check, CORS or a route."""

    def __init__(self, app, hosts: Hosts, origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = origin = None
        for key, value in scope["headers"]:  # the first of each, as Starlette's request.headers.get reads them
            if key == b"host" and host is None:
                host = value.decode("latin-1")
            elif key == b"origin" and origin is None:
                origin = value.decode("latin-1")
        if not self.hosts.allows(host):
            await self._refuse(scope, receive, send, self.hosts.refusal(host or ""), "host_not_allowed")
        elif origin is not None and not origin_allowed(origin, host, self.origins):
            await self._refuse(scope, receive, send, origin_refusal(origin), "origin_not_allowed")
        else:
            await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, message: str, code: str) -> None:
        from malhae.serve.errors import ApiError
        from malhae.serve.routes import error_response

        e = ApiError(message, 403, code=code, kind="permission_error")
        await error_response(e, scope["path"].startswith("/api/"))(scope, receive, send)
