"""IPv6 secondaries end to end: one spelling per address, in brackets wherever a port follows."""
from __future__ import annotations

import pytest
import requests

from agent.demo import free_port, make_install, write_sample_set
from app.core.errors import ConfigError
from app.core.express import parse_host_port, read_mirrors
from conftest import VERSION, esmirror


@pytest.mark.parametrize("text,expected", [
    ("[::1]:8080", ("::1", 8080)), ("[0:0:0:0:0:0:0:1]", ("::1", None)), ("[0::1]:9", ("::1", 9)),
    ("Mirror.Example.", ("mirror.example", None)), ("10.0.0.1:443", ("10.0.0.1", 443)),
])
def test_host_port_forms_read_as_one_spelling(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text,needle", [
    ("::1:8080", "write an IPv6 address in brackets"), ("[::1]junk", "is not HOST[:PORT]"),
    ("[::1", "is not HOST[:PORT]"), ("[10.0.0.1]:80", "brackets are for IPv6 addresses only"),
    ("[fe80::1%eth0]:80", "zone id"), ("[::1]:0", "the port is not 1-65535"),
    # a URL was called an IPv6 address without brackets, or a bad port
    ("http://127.0.0.1:53213", "is a URL: give HOST[:PORT] without http:// and a path (write 127.0.0.1:53213)"),
    ("https://es2.example.org/lizardtech/mirror", "(write es2.example.org)"),
])
def test_ambiguous_or_broken_forms_are_refused_saying_why(text, needle):
    with pytest.raises(ConfigError) as refused:
        parse_host_port(text)
    assert needle in refused.value.message


def test_one_server_spelt_three_ways_is_listed_twice_and_zone_ids_are_refused(tmp_path):
    cfg = tmp_path / "iserv-cfg.xml"
    cfg.write_text('<ImageServer><Mirrors><Secondary host="::1" port="21602"/>'
                   '<Secondary host="0:0:0:0:0:0:0:1" port="21602" ssl="noverify"/></Mirrors></ImageServer>')
    with pytest.raises(ConfigError) as twice:
        read_mirrors(cfg)
    assert "[::1]:21602 is listed twice" in twice.value.message
    cfg.write_text('<ImageServer><Mirrors><Secondary host="::1%lo" port="1"/></Mirrors></ImageServer>')
    with pytest.raises(ConfigError) as zone:
        read_mirrors(cfg)
    assert "zone id" in zone.value.message


def test_publish_to_an_ipv6_secondary_names_it_in_brackets(tmp_path, make_receiver):
    secondary = make_install(tmp_path / "s", {"allow_push": "::1", "express_version": VERSION})
    receiver = make_receiver(secondary, host="::1", port=free_port("::1"))
    master = make_install(tmp_path / "m", {"express_version": VERSION},
                          [("0:0:0:0:0:0:0:1", receiver.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    name = f"[::1]:{receiver.port}"
    rc, _, out = esmirror("publish", "--install-dir", str(master.root), "--secondary", f"[0::1]:{receiver.port}",
                          "--canary", name)
    assert rc == 0, out
    assert f"{name}  in-sync" in out.replace("   ", "  ")
    rc, status, out = esmirror("status", "--install-dir", str(master.root), "--json")
    assert rc == 0 and status["secondaries"][0]["name"] == name, out
    assert status["publishes"][0]["secondaries"][0]["name"] == name
    rc, _, out = esmirror("publish", "--install-dir", str(master.root), "--secondary", f"::1:{receiver.port}")
    assert rc == 2 and "write an IPv6 address in brackets" in out, out
    rc, info, out = esmirror("browse", name, "--json", "--install-dir", str(master.root))
    assert rc == 0 and info["generation"] == 1, out


def test_waitress_on_every_address_takes_ipv4_and_ipv6(tmp_path, make_receiver):
    """waitress's IPv6 sockets take IPv6 only: [::] listened on IPv6 alone, gunicorn's on both."""
    install = make_install(tmp_path / "s", {"allow_push": "127.0.0.1 ::1"})
    port = free_port()
    receiver = make_receiver(install, server="waitress", host="::", port=port)
    assert receiver is not None
    for url in (f"http://127.0.0.1:{port}/lizardtech/mirror/browse",
                f"http://[::1]:{port}/lizardtech/mirror/browse"):
        assert requests.get(url, timeout=20).status_code == 200, url
