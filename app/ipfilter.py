"""WSGI middleware: who is calling, and may they use this route class?

Wraps every route of the receiver. The caller is the socket peer unless that
peer is a trusted proxy; then it is the rightmost ``X-Forwarded-For`` entry
that is not itself a trusted proxy (SPEC §6). Anything unparsable is refused.
"""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Callable, Iterable

from .core.settings import PUSH_ROUTES, Network, Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_PORT_RE = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3}):\d+$")


def json_answer(start_response: Callable[..., Any], status: str, document: dict[str, Any]) -> list[bytes]:
    """An error answer from WSGI middleware, before Flask and its error handlers (app/errors.py)
    have the request: the same JSON shape."""
    body = json.dumps(document).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it: ``a.b.c.d``, ``a.b.c.d:port``, ``v6``, ``[v6]:port``.

    IPv4-mapped IPv6 becomes IPv4; zone ids and garbage give None.
    """
    text = text.strip()
    if text.startswith("["):
        text, sep, rest = text[1:].partition("]")
        if not sep or (rest and not re.fullmatch(r":\d{1,5}", rest)):
            return None  # "[v6]" or "[v6]:port" and nothing else
    else:
        match = _PORT_RE.match(text)
        if match:
            text = match.group(1)
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def allowed(address: IPAddress, networks: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def client_address(environ: dict[str, Any], trusted: tuple[Network, ...]) -> IPAddress | None:
    peer = parse_address(environ.get("REMOTE_ADDR", ""))
    if peer is None or not trusted or not allowed(peer, trusted):
        return peer
    forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
    hops = [h for h in (x.strip() for x in forwarded.split(",")) if h]
    if not hops:
        return peer
    parsed = [parse_address(h) for h in hops]
    for hop in reversed(parsed):
        if hop is None:
            return None
        if not allowed(hop, trusted):
            return hop
    return parsed[0]  # every hop is a trusted proxy: the leftmost


def route_class(path_info: str) -> str:
    """``push``, ``browse`` (push or admin) or ``admin`` (everything else)."""
    first = path_info.strip("/").split("/", 1)[0]
    if first == "browse":
        return "browse"
    return "push" if first in PUSH_ROUTES else "admin"


class IPFilter:
    def __init__(self, app: Callable[..., Any], settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        s = self.settings
        address = client_address(environ, s.trusted_proxies)
        kind = route_class(environ.get("PATH_INFO", ""))
        if address is not None:
            environ["esmirror.client"] = str(address)
            may_push = allowed(address, s.allow_push)
            if kind == "push" and may_push:
                return self.app(environ, start_response)
            if kind == "admin" and allowed(address, s.allow_admin):
                return self.app(environ, start_response)
            if kind == "browse" and (may_push or allowed(address, s.allow_admin)):
                # (a master let in by allow_admin alone would look fine and fail at its push)
                environ["esmirror.may_push"] = may_push
                return self.app(environ, start_response)
        setting = {"push": "allow_push", "admin": "allow_admin",
                   "browse": "allow_push or allow_admin"}[kind]
        who = str(address) if address else f"unparsable address {environ.get('REMOTE_ADDR', '')!r}"
        # the ini named as an admin knows it, not by where this install lives: the caller is a stranger
        message = (f"address {who} may not use this route; add it to {setting} in "
                   "ImageServer/etc/esmirror.ini on this server")
        peer = parse_address(environ.get("REMOTE_ADDR", ""))
        if address is None and peer is not None:
            # a trusted proxy's X-Forwarded-For that does not parse: the proxy is what to fix
            message = (f"X-Forwarded-For from {peer}, a trusted proxy, is "
                       f"{environ.get('HTTP_X_FORWARDED_FOR', '')[:100]!r}, which holds something that "
                       "is not an address; fix what that proxy sends (or trusted_proxies in "
                       "ImageServer/etc/esmirror.ini on this server)")
        if peer is not None and peer.is_loopback and not allowed(peer, s.trusted_proxies) \
                and environ.get("HTTP_X_FORWARDED_FOR"):
            # a web server in front (IIS, mod_proxy) whose forwarding is not trusted: every
            # caller looks like it, and adding loopback to the list would admit them all
            message = (f"address {who} may not use this route: it is the web server in front of this "
                       "receiver, which names the real caller in X-Forwarded-For. Set trusted_proxies "
                       "= 127.0.0.1 ::1 in ImageServer/etc/esmirror.ini on this server (not "
                       f"{setting}) and restart the receiver")
        return json_answer(start_response, "403 Forbidden",
                           {"error": message, "address": str(address) if address else None})


class PrefixMount:
    """Serve the app at the prefix whether the server strips it (mod_wsgi, IIS) or not.

    Under ``WSGIScriptAlias /lizardtech/mirror`` the prefix is already in
    SCRIPT_NAME; under gunicorn/waitress it is still at the head of PATH_INFO.
    """

    def __init__(self, app: Callable[..., Any], prefix: str) -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        script = environ.get("SCRIPT_NAME", "").rstrip("/")
        path = environ.get("PATH_INFO", "")
        if script.endswith(self.prefix) and script:
            return self.app(environ, start_response)
        if path == self.prefix or path.startswith(self.prefix + "/"):
            environ["SCRIPT_NAME"] = script + self.prefix
            environ["PATH_INFO"] = path[len(self.prefix):]
            return self.app(environ, start_response)
        return json_answer(start_response, "404 Not Found",
                           {"error": f"not found: esmirror is mounted at {self.prefix}/"})
