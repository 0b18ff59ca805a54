"""Issue 4: fuzzing the two parsers that hostile input reaches first, with hypothesis.

Targets: manifest/path validation (path_problem, Manifest.from_list) and the
commit request parser (commit_json + CommitRequest.from_json, and POST commit
through the real app). Bounded: FUZZ_EXAMPLES examples per target (default 300,
seconds in CI; derandomized when CI is set so a run is repeatable). Run longer
with e.g. ``FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py``. Crashes found become
the regression cases at the bottom.
"""
from __future__ import annotations

import json
import os
import posixpath
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.core.apply import CommitRequest
from app.core.errors import BadRequest, InvalidSet, MirrorError
from app.core.manifest import (MAX_PATH_BYTES, MAX_SEGMENT_BYTES, RESERVED_TOP, Manifest,
                               _path_problem, collision_key, path_problem)

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# segments that sit on the edge of some rule
TRICKY = ["a", "A", "catalogs.xml", "Catalogs.XML", ".", "..", "...", "", " ", "a ", "a.", ".a",
          "CON", "con.txt", "Nul", "COM1", "com¹", "LPT9.log", "CONIN$", "aux .txt", "archive",
          "ARCHIVE", ".esmirror", ".ESMIRROR", "é", "e\u0301", "ß", "ss", "ﬀ", "K", "\u212a",
          "a:b", "a\\b", "a\x00", "\t", "\x7f", "a|b", "<", "?", "*", '"', "c:", "C:", "%2e%2e",
          "\u202e", "\ufeff", "a" * 255, "é" * 128, "a" * 256, "CON.idx", "lpt1", "com0.a.b",
          "a-b_c.idx", "-", "_", "x.", "x..", "Archive", "prn.", "a" * 254 + ".", "CONIN$", "conout$.x", "a\x85b", "\x9f"]
segment = st.one_of(st.sampled_from(TRICKY), st.text(min_size=0, max_size=12),
                    st.text(alphabet="aA.-_ é:\\/\x00\n", max_size=6))
paths = st.one_of(st.lists(segment, min_size=1, max_size=6).map("/".join),
                  st.text(max_size=40), st.sampled_from(["/", "//", "/etc/passwd", "C:/x", "\\\\srv\\x"]))


def assert_safe(path: str) -> None:
    """What an accepted path must be, restated independently of path_problem's code."""
    raw = path.encode("utf-8")
    assert 0 < len(raw) <= MAX_PATH_BYTES
    assert not path.startswith("/") and "\\" not in path and ":" not in path
    assert not any(ord(c) < 32 or 127 <= ord(c) <= 159 for c in path)
    assert not set('<>"|?*') & set(path)
    segments = path.split("/")
    assert segments[0].casefold() not in RESERVED_TOP
    for seg in segments:
        assert seg not in ("", ".", "..")
        assert len(seg.encode("utf-8")) <= MAX_SEGMENT_BYTES
        assert not seg.endswith((".", " "))
        assert seg.split(".")[0].strip().casefold() not in {"con", "prn", "aux", "nul", "conin$", "conout$"}
    # it stays where it is put, on POSIX and (with / as \) on Windows
    root = "/srv/var/data"
    joined = posixpath.join(root, path)
    assert posixpath.normpath(joined) == joined and joined.startswith(root + "/")
    assert posixpath.normpath(joined.replace("\\", "/")) == joined


@FUZZ
@given(paths)
@example("a/../b")
@example("con.tar.gz")
@example("indexes/\u212a.idx")
def test_path_rules_never_crash_and_accepted_paths_are_safe(path):
    problem = path_problem(path)
    assert problem is None or (isinstance(problem, str) and problem)
    if problem is None:
        assert_safe(path)


@FUZZ
@given(paths)
@example("a/" * 511 + "b")      # 1,023 bytes: the longest path allowed
@example("a/" * 511 + "bc")     # 1,024: still allowed
@example("a/" * 512 + "b")      # 1,025: too long
@example("é/" * 341 + "bcd")
@example("archive")
@example("x/archive")
@example("d00/CON.idx")
def test_the_fast_check_of_plain_names_agrees_with_the_full_rules(path):
    # path_problem takes a short cut for a plain file name in a folder found safe; it must
    # accept exactly what the full rules (kept, with their messages, for everything else) do
    assert (path_problem(path) is None) == (_path_problem(path) is None)


entry = st.fixed_dictionaries({
    "path": st.one_of(paths, st.integers(), st.none()),
    "sha256": st.one_of(st.sampled_from(["a" * 64, "b" * 64, "A" * 64, "g" * 64, "a" * 63]),
                        st.text(max_size=70), st.integers()),
    "size": st.one_of(st.integers(min_value=-2, max_value=2**64), st.floats(), st.booleans(),
                      st.text(max_size=3)),
}, optional={"extra": st.integers()})
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=20))
any_json = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


@FUZZ
@given(st.lists(st.one_of(entry, any_json), max_size=8))
def test_manifest_from_untrusted_list(items):
    try:
        manifest = Manifest.from_list(items)
    except (BadRequest, InvalidSet) as exc:
        assert exc.message
        return
    keys = set()
    for path, file in manifest.files.items():
        assert_safe(path)
        assert len(file.sha256) == 64 and file.size >= 0
        key = collision_key(path)
        assert key not in keys
        keys.add(key)
    assert manifest.digest == Manifest.from_list(manifest.to_list()).digest


commit_shaped = st.fixed_dictionaries({
    "generation": st.one_of(st.integers(min_value=-1, max_value=2**70), st.booleans(), st.text(max_size=3)),
    "master": st.one_of(st.text(max_size=140), st.integers()),
    "base": st.one_of(st.text(max_size=70), st.none()),
    "files": st.one_of(st.lists(entry, max_size=6), any_json),
}, optional={"more": any_json})


@FUZZ
@given(st.one_of(commit_shaped, any_json))
def test_commit_request_parser_only_says_400_or_422(data):
    try:
        request = CommitRequest.from_json(data)
    except MirrorError as exc:
        assert exc.status in (400, 422) and exc.message
        return
    assert isinstance(request.generation, int) and request.generation >= 0
    assert request.master.isalnum()
    for path in request.manifest.files:
        assert_safe(path)


@pytest.fixture(scope="module")
def commit_client(tmp_path_factory):
    from werkzeug.test import Client

    from agent.demo import make_install
    from app import make_wsgi
    from app.core.settings import load_settings

    install = make_install(tmp_path_factory.mktemp("fuzz") / "s",
                           {"allow_push": "127.0.0.1", "express_version": "1"})
    return Client(make_wsgi(load_settings(install.root)))


def _bodies():
    return st.one_of(
        st.binary(max_size=200),
        commit_shaped.map(lambda d: json.dumps(d).encode()),
        any_json.map(lambda d: json.dumps(d).encode()),
        st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(min_value=1, max_value=3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    )


@FUZZ
@given(body=_bodies())
@example(body=b"[" * 100_000)
@example(body=b'{"generation": 1e999}')
@example(body=b'{"generation": ' + b"9" * 5000 + b"}")
def test_commit_route_never_answers_500(commit_client, body):
    answer = commit_client.post("/lizardtech/mirror/commit", data=body,
                                environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert answer.status_code in (400, 409, 411, 422), answer.get_data(as_text=True)[:300]
    error = answer.json["error"]
    assert error and "Traceback" not in error


# --- regressions found by fuzzing and by hand ----------------------------------------

def test_regression_deep_json_is_400_not_500(commit_client):
    # json.loads raises RecursionError (not ValueError) on deep nesting: it was a 500
    answer = commit_client.post("/lizardtech/mirror/commit", data=b"[" * 200_000,
                                environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert answer.status_code == 400 and "not JSON" in answer.json["error"]


def test_regression_nfc_and_case_collisions_are_one_file():
    with pytest.raises(InvalidSet):
        Manifest.from_list([{"path": unicodedata.normalize("NFD", "Café.idx"), "sha256": "a" * 64,
                             "size": 1},
                            {"path": "café.idx", "sha256": "b" * 64, "size": 1}])


# --- the client address: whatever a proxy header holds --------------------------------

@FUZZ
@given(peer=st.one_of(st.text(max_size=50), st.sampled_from(["127.0.0.2", "::1", "::ffff:127.0.0.2"])),
       xff=st.one_of(st.none(), st.text(max_size=80),
                     st.lists(st.sampled_from(["192.0.2.7", "[2001:db8::1]:80", "127.0.0.2", "x",
                                               "", " ", "fe80::1%eth0", "1.2.3.4:5"]),
                              max_size=5).map(", ".join)))
def test_client_address_never_crashes(peer, xff):
    import ipaddress

    from app.core.settings import parse_networks
    from app.ipfilter import client_address

    environ = {"REMOTE_ADDR": peer}
    if xff is not None:
        environ["HTTP_X_FORWARDED_FOR"] = xff
    got = client_address(environ, parse_networks("127.0.0.2 ::1"))
    assert got is None or isinstance(got, (ipaddress.IPv4Address, ipaddress.IPv6Address))
    if got is not None and got.version == 6:
        assert got.ipv4_mapped is None  # mapped addresses always come out as IPv4
