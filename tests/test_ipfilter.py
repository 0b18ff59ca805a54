"""Issue 4: who is calling. Table-driven, on the pure function and through real servers.

The receiver's 403 names the address it decided on, so a receiver that admits
nobody we send from shows exactly what the app concluded for every row.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent.demo import free_port, make_install
from app.core.settings import parse_networks
from app.ipfilter import allowed, client_address, parse_address
from conftest import VERSION, session_from, spawn_listening, stop_session

TRUSTED = parse_networks("127.0.0.2 127.0.0.3 ::1")
ALLOWED = "192.0.2.7"  # a documentation address: only ever a header value here

# (name, REMOTE_ADDR, X-Forwarded-For or None, decided address or None for "refused")
ADDRESS_TABLE = [
    ("direct peer", "127.0.0.9", None, "127.0.0.9"),
    ("direct IPv6 peer", "::2", None, "::2"),
    ("forged XFF from untrusted peer is ignored", "127.0.0.9", "192.0.2.7", "127.0.0.9"),
    ("forged XFF chain from untrusted peer is ignored", "127.0.0.9", "192.0.2.7, 127.0.0.2",
     "127.0.0.9"),
    ("trusted proxy, one hop", "127.0.0.2", "192.0.2.7", "192.0.2.7"),
    ("trusted proxy, two hops", "127.0.0.2", "192.0.2.7, 127.0.0.3", "192.0.2.7"),
    ("trusted proxy, client forged the left part", "127.0.0.2", "198.51.100.1, 192.0.2.7",
     "192.0.2.7"),
    ("trusted proxy, every hop trusted: leftmost", "127.0.0.2", "127.0.0.3, 127.0.0.2",
     "127.0.0.3"),
    ("trusted proxy, empty XFF: the proxy itself", "127.0.0.2", "", "127.0.0.2"),
    ("ip:port as IIS writes it", "127.0.0.2", "192.0.2.7:51234", "192.0.2.7"),
    ("[v6]:port", "127.0.0.2", "[2001:db8::7]:443", "2001:db8::7"),
    ("bare v6", "127.0.0.2", "2001:db8::7", "2001:db8::7"),
    ("mapped IPv4 in XFF", "127.0.0.2", "::ffff:192.0.2.7", "192.0.2.7"),
    ("mapped IPv4 peer counts as IPv4", "::ffff:127.0.0.2", "192.0.2.7", "192.0.2.7"),
    ("garbage in XFF", "127.0.0.2", "not-an-address", None),
    ("garbage hop right of the client", "127.0.0.2", "192.0.2.7, bogus", None),
    ("garbage left of the chosen hop does not matter", "127.0.0.2", "bogus, 192.0.2.7",
     "192.0.2.7"),
    ("zone id refused", "127.0.0.2", "fe80::1%eth0", None),
    ("CIDR is not an address", "127.0.0.2", "192.0.2.0/24", None),
    ("[v6] with junk after the bracket", "127.0.0.2", "[2001:db8::7]junk", None),
    ("unclosed bracket", "127.0.0.2", "[2001:db8::7", None),
    ("v4 with a bad port", "127.0.0.2", "192.0.2.7:http", None),
    ("garbage peer", "not-an-address", None, None),
    ("empty peer (a unix socket)", "", None, None),
]


@pytest.mark.parametrize("name,peer,xff,expected", ADDRESS_TABLE, ids=[r[0] for r in ADDRESS_TABLE])
def test_client_address_table(name, peer, xff, expected):
    environ = {"REMOTE_ADDR": peer}
    if xff is not None:
        environ["HTTP_X_FORWARDED_FOR"] = xff
    got = client_address(environ, TRUSTED)
    assert (str(got) if got is not None else None) == expected


def test_an_ipv4_mapped_entry_admits_that_ipv4_caller():
    """Callers arrive as IPv4 (::ffff:a.b.c.d is mapped): an entry written mapped must match."""
    nets = parse_networks("::ffff:127.0.0.3 ::ffff:10.0.0.0/104")
    assert nets == (ipaddress.ip_network("127.0.0.3/32"), ipaddress.ip_network("10.0.0.0/8"))
    assert allowed(parse_address("::ffff:127.0.0.3"), nets)


def test_parse_address_forms():
    assert parse_address("192.0.2.7:80") == ipaddress.ip_address("192.0.2.7")
    assert parse_address(" [::1]:8080 ") == ipaddress.ip_address("::1")
    assert parse_address("[::1]") == ipaddress.ip_address("::1")
    assert parse_address("::ffff:10.1.2.3") == ipaddress.ip_address("10.1.2.3")
    for bad in ("", "1.2.3", "1.2.3.4.5", "[::1]:", "[::1]:123456", "fe80::1%1", "::1:80x"):
        assert parse_address(bad) is None, bad


# --- route classes, each with its own list (the real app, in process) ---------

@pytest.fixture
def app_with_lists(tmp_path):
    from app import make_wsgi
    from app.core.settings import load_settings

    install = make_install(tmp_path / "s", {"allow_push": "127.0.0.5", "allow_admin": "127.0.0.6",
                                            "express_version": VERSION})
    from werkzeug.test import Client

    return Client(make_wsgi(load_settings(install.root)))


@pytest.mark.parametrize("peer,method,route,status,setting", [
    ("127.0.0.5", "GET", "manifest", 200, None),
    ("127.0.0.5", "GET", "browse", 200, None),
    ("127.0.0.5", "GET", "archive", 403, "allow_admin"),
    ("127.0.0.5", "GET", "", 403, "allow_admin"),
    ("127.0.0.6", "GET", "archive", 200, None),
    ("127.0.0.6", "GET", "browse", 200, None),
    ("127.0.0.6", "GET", "manifest", 403, "allow_push"),
    ("127.0.0.6", "POST", "commit", 403, "allow_push"),
    ("127.0.0.6", "POST", "/commit", 403, "allow_push"),   # "//commit" is still a push route
    ("127.0.0.6", "PUT", f"blobs/{'0' * 64}", 403, "allow_push"),
    ("127.0.0.7", "GET", "browse", 403, "allow_push or allow_admin"),
])
def test_push_and_admin_routes_have_their_own_list(app_with_lists, peer, method, route, status,
                                                   setting):
    answer = app_with_lists.open(f"/lizardtech/mirror/{route}", method=method,
                                 environ_base={"REMOTE_ADDR": peer})
    assert answer.status_code == status, answer.get_data(as_text=True)
    if setting:
        error = answer.json["error"]
        assert peer in error and setting in error and "esmirror.ini" in error
        assert answer.json["address"] == peer


def test_a_proxy_in_front_that_is_not_trusted_is_named_as_one(app_with_lists):
    """Behind IIS or mod_proxy with trusted_proxies unset, every caller arrives from loopback:
    the refusal says to trust the proxy, not to add loopback to allow_push (which would
    let every caller the web server admits push)."""
    answer = app_with_lists.open("/lizardtech/mirror/manifest", environ_base={"REMOTE_ADDR": "127.0.0.1"},
                                 headers={"X-Forwarded-For": "127.0.0.5"})
    assert answer.status_code == 403
    error = answer.json["error"]
    assert "web server in front" in error and "trusted_proxies = 127.0.0.1 ::1" in error, error
    assert "(not allow_push)" in error
    plain = app_with_lists.open("/lizardtech/mirror/manifest", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert "trusted_proxies" not in plain.json["error"]  # no proxy, no such advice


def test_a_trusted_proxy_forwarding_a_local_caller_gets_no_advice_to_trust_it(tmp_path):
    from werkzeug.test import Client

    from app import make_wsgi
    from app.core.settings import load_settings

    install = make_install(tmp_path / "s", {"allow_push": "127.0.0.5", "trusted_proxies": "127.0.0.1 ::1",
                                            "express_version": VERSION})
    answer = Client(make_wsgi(load_settings(install.root))).open(
        "/lizardtech/mirror/manifest", environ_base={"REMOTE_ADDR": "127.0.0.1"},
        headers={"X-Forwarded-For": "127.0.0.1"})  # a caller on the host itself, through IIS
    assert answer.status_code == 403
    assert "trusted_proxies" not in answer.json["error"] and "allow_push" in answer.json["error"]


# --- real servers: what waitress and gunicorn hand the app -----------------------

SERVER_ROWS = [
    # (source address, X-Forwarded-For headers, decided address)
    ("127.0.0.9", [], "127.0.0.9"),
    ("127.0.0.9", ["192.0.2.7"], "127.0.0.9"),                 # forged, untrusted peer
    ("127.0.0.2", ["192.0.2.7"], ALLOWED),                     # trusted proxy, one hop
    ("127.0.0.2", ["192.0.2.7, 127.0.0.3"], ALLOWED),          # two hops
    ("127.0.0.2", ["198.51.100.1", "192.0.2.7"], ALLOWED),     # two header lines: joined, rightmost
    ("127.0.0.2", ["192.0.2.7, 198.51.100.1"], "198.51.100.1"),
    ("127.0.0.2", ["192.0.2.7:443"], ALLOWED),
    ("127.0.0.2", ["[2001:db8::7]:443"], "2001:db8::7"),
    ("127.0.0.2", ["::ffff:192.0.2.7"], ALLOWED),
    ("127.0.0.2", ["garbage"], None),
]


def _decided(source: str, url: str, xff: list[str]) -> tuple[int, str | None]:
    """(status, the address the receiver decided on) for GET manifest sent from ``source``.

    http.client, not requests: requests would merge repeated X-Forwarded-For lines.
    """
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.putrequest("GET", parts.path + "/manifest")
        for value in xff:
            conn.putheader("X-Forwarded-For", value)
        conn.endheaders()
        answer = conn.getresponse()
        body = answer.read().decode()
    finally:
        conn.close()
    data = json.loads(body)
    if answer.status == 200:
        return 200, ALLOWED
    assert answer.status == 403, body
    assert "Traceback" not in body
    return 403, data.get("address")


@pytest.mark.parametrize("server", ["waitress", "gunicorn"])
def test_real_servers_pass_the_peer_and_xff_through(tmp_path, make_receiver, server):
    install = make_install(tmp_path / "s", {"allow_push": ALLOWED, "express_version": VERSION,
                                            "trusted_proxies": "127.0.0.2 127.0.0.3"})
    receiver = make_receiver(install, server=server)
    for source, xff, expected in SERVER_ROWS:
        status, address = _decided(source, receiver.url, xff)
        assert address == expected, (source, xff, status)
        assert status == (200 if expected == ALLOWED else 403), (source, xff)


@pytest.mark.parametrize("server", ["waitress", "gunicorn"])
def test_a_stranger_cannot_make_the_server_take_in_a_big_body(tmp_path, make_receiver, server):
    """waitress spools a whole body before the app (and its IP check) runs: a caller in no
    allow list may send at most 64 KiB, so a huge one is refused once its headers are in,
    not after gigabytes went to a temp file. gunicorn hands over the headers first."""
    import socket
    import time

    install = make_install(tmp_path / "s", {"allow_push": "127.0.0.1", "express_version": VERSION})
    receiver = make_receiver(install, server=server)
    route = urlsplit(receiver.url).path + "/commit"
    for source, expected in (("127.0.0.5", (403, 413)), ("127.0.0.1", (None,))):
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=10,
                                      source_address=(source, 0)) as conn:
            conn.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {100 * 1024**2}\r\n\r\n".encode())
            conn.sendall(b"{" * 1024)
            conn.settimeout(5)
            started = time.monotonic()
            try:
                status = int(conn.recv(4096).split(b" ", 2)[1])
            except (socket.timeout, IndexError, ConnectionError):
                status = None  # still reading the body it was promised: an admitted caller
            assert status in expected, (source, status)
            if source != "127.0.0.1":
                assert time.monotonic() - started < 4, "refused only after waiting for the body"
    # a stranger's small request still gets the 403 that names it
    answer = session_from("127.0.0.5").post(f"{receiver.url}/commit", data=b"{}", timeout=10)
    assert answer.status_code == 403 and "127.0.0.5" in answer.json()["error"], answer.text


def test_real_server_on_ipv6_loopback(tmp_path, make_receiver):
    install = make_install(tmp_path / "s", {"allow_push": ALLOWED, "express_version": VERSION,
                                            "trusted_proxies": "::1"})
    receiver = make_receiver(install, host="::1", port=free_port("::1"))
    assert _decided("::1", receiver.url, [])[1] == "::1"
    assert _decided("::1", receiver.url, ["[2001:db8::7]:8443"]) == (403, "2001:db8::7")
    assert _decided("::1", receiver.url, ["192.0.2.7:1"]) == (200, ALLOWED)


# --- one real proxy hop: Apache httpd's mod_proxy in front of gunicorn ---------

APACHE = shutil.which("apache2") or ("/usr/sbin/apache2" if os.path.exists("/usr/sbin/apache2") else None)
MODULES = Path("/usr/lib/apache2/modules")


class ApacheProxy:
    """httpd with mod_proxy_http forwarding the prefix to a backend, as a site would."""

    def __init__(self, root: Path, listen: str, port: int, backend: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, port
        user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
        conf = f"""
ServerRoot "{root}"
ServerName {listen}
Listen {listen}:{port}
PidFile "{root}/httpd.pid"
DefaultRuntimeDir "{root}"
ErrorLog "{root}/error.log"
LogLevel warn
{user}LoadModule mpm_event_module {MODULES}/mod_mpm_event.so
LoadModule authz_core_module {MODULES}/mod_authz_core.so
LoadModule proxy_module {MODULES}/mod_proxy.so
LoadModule proxy_http_module {MODULES}/mod_proxy_http.so
StartServers 1
ServerLimit 1
ThreadsPerChild 8
ProxyPass /lizardtech/mirror {backend}/lizardtech/mirror
ProxyPassReverse /lizardtech/mirror {backend}/lizardtech/mirror
"""
        self.conf = root / "httpd.conf"
        self.conf.write_text(conf)
        self.proc = None  # the apache2 process once started

    def start(self) -> "ApacheProxy":
        assert APACHE
        try:
            self.proc = spawn_listening([APACHE, "-f", str(self.conf), "-DFOREGROUND"], self.port,
                                        self.root / "stdout.log")
        except RuntimeError as exc:
            log = self.root / "error.log"
            raise RuntimeError(f"{exc}\n{log.read_text()[-2000:] if log.exists() else ''}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc)


@pytest.fixture
def apache_in_front(tmp_path, make_receiver):
    if not APACHE or not (MODULES / "mod_proxy_http.so").exists():
        pytest.skip("apache2 is not installed (bash .ci/system-packages installs it)")
    install = make_install(tmp_path / "s", {"allow_push": "127.0.0.5", "express_version": VERSION,
                                            "trusted_proxies": "127.0.0.1"})
    backend = make_receiver(install, server="gunicorn")
    proxy = ApacheProxy(tmp_path / "httpd", "127.0.0.1", free_port(),
                        f"http://127.0.0.1:{backend.port}").start()
    try:
        yield proxy, backend
    finally:
        proxy.stop()


def test_apache_proxy_hop_in_front_of_gunicorn(apache_in_front):
    proxy, backend = apache_in_front
    via = f"http://127.0.0.1:{proxy.port}/lizardtech/mirror"
    # Apache appends the real peer; the app believes Apache (a trusted proxy) and takes it
    assert _decided("127.0.0.4", via, []) == (403, "127.0.0.4")
    # a forged header from the client only moves further left: the rightmost untrusted wins
    assert _decided("127.0.0.4", via, ["127.0.0.5"]) == (403, "127.0.0.4")
    assert _decided("127.0.0.4", via, ["127.0.0.5, 127.0.0.1"]) == (403, "127.0.0.4")
    # the allowed client really is admitted through the proxy
    session = session_from("127.0.0.5")
    answer = session.get(f"{via}/manifest", timeout=10)
    assert answer.status_code == 200, answer.text
    assert "digest" in answer.json()
    # straight to gunicorn, the same forged header from an untrusted peer changes nothing
    assert _decided("127.0.0.4", backend.url, ["127.0.0.5"]) == (403, "127.0.0.4")


def test_garbage_from_a_trusted_proxy_names_the_proxy_not_its_address(tmp_path):
    """It said "address unparsable address '127.0.0.1' may not use this route; add it to
    allow_push": the proxy's own, valid address called unparsable, and to be allowed."""
    from werkzeug.test import Client

    from app import make_wsgi
    from app.core.settings import load_settings

    install = make_install(tmp_path / "s", {"allow_push": "127.0.0.5", "trusted_proxies": "127.0.0.1",
                                            "express_version": VERSION})
    answer = Client(make_wsgi(load_settings(install.root))).open(
        "/lizardtech/mirror/manifest", environ_base={"REMOTE_ADDR": "127.0.0.1"},
        headers={"X-Forwarded-For": "garbage"})
    assert answer.status_code == 403
    assert answer.json["error"] == (
        "X-Forwarded-For from 127.0.0.1, a trusted proxy, is 'garbage', which holds something that is "
        "not an address; fix what that proxy sends (or trusted_proxies in ImageServer/etc/esmirror.ini "
        "on this server)"), answer.json
