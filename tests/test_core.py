"""The config-set core without servers: paths, manifest, digest, cache, settings, Mirrors."""
from __future__ import annotations

import hashlib
import os
import unicodedata
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.core.apply import prune_emptied
from app.core.catalogs import validate_catalogs
from app.core.errors import ConfigError, InvalidSet
from app.core.express import read_mirrors
from app.core.manifest import HashCache, Manifest, diff, path_problem, scan
from app.core.settings import load_settings, parse_size

SHA = "a" * 64


@pytest.mark.parametrize("path", [
    "catalogs.xml", "indexes/a.idx", "a/b/c/d.ovr", "ünïcode/naïve.idx", ".hidden",
    "console/x", "aux1.txt", "com10", "x" * 255,
])
def test_safe_paths_pass(path):
    assert path_problem(path) is None


@pytest.mark.parametrize("path,why", [
    ("", "empty"), ("/etc/passwd", "absolute"), ("C:/x", "drive"), ("C:\\x", "drive"), ("a/../b", "'..'"),
    ("a:b.idx", "drive"),  # (on Windows, b.idx in drive A's current folder: not a name)
    ("./a", "'.'"), ("a//b", "empty"), ("a\\b", "backslash"), ("a\0b", "control"),
    ("a\nb", "control"), ("ab:c", "':'"), ("a|b", "'|'"), ("a?b", "'?'"), ("a*b", "'*'"),
    ('a"b', "'\"'"), ("a<b", "'<'"), ("CON", "reserved"), ("nul.txt", "reserved"),
    ("dir/COM1.idx", "reserved"), ("lpt9", "reserved"), ("a.", "dot or a space"),
    ("a ", "dot or a space"), ("archive/x", "esmirror's own"), (".esmirror/state.json", "esmirror's own"),
    ("Archive/x", "esmirror's own"), ("x" * 256, "255"), ("/".join(["d" * 200] * 6), "1024"),
])
def test_unsafe_paths_are_named(path, why):
    problem = path_problem(path)
    assert problem is not None and why in problem


def test_case_and_unicode_collisions_are_refused():
    with pytest.raises(InvalidSet) as info:
        Manifest.from_list([{"path": "A.idx", "sha256": SHA, "size": 1},
                            {"path": "a.idx", "sha256": SHA, "size": 1}])
    assert "differ only by case" in info.value.reasons[0]
    with pytest.raises(InvalidSet):
        Manifest.from_list([{"path": "caf\u00e9", "sha256": SHA, "size": 1},
                            {"path": "cafe\u0301", "sha256": SHA, "size": 1}])


def test_digest_is_the_spec_formula_and_order_free():
    files = [{"path": "b", "sha256": SHA, "size": 3}, {"path": "a", "sha256": "b" * 64, "size": 1}]
    expected = hashlib.sha256(f"a\0{'b' * 64}\0{1}\nb\0{SHA}\0{3}\n".encode()).hexdigest()
    assert Manifest.from_list(files).digest == expected
    assert Manifest.from_list(files[::-1]).digest == expected


def test_diff_add_change_remove():
    old = Manifest.from_list([{"path": "a", "sha256": SHA, "size": 1},
                              {"path": "b", "sha256": SHA, "size": 1}])
    new = Manifest.from_list([{"path": "a", "sha256": "b" * 64, "size": 1},
                              {"path": "c", "sha256": SHA, "size": 1}])
    d = diff(old, new)
    assert (d.added, d.changed, d.removed) == (["c"], ["a"], ["b"])


def test_scan_skips_archive_state_and_symlinks(tmp_path):
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "old").write_text("x")
    (tmp_path / ".esmirror").mkdir()
    (tmp_path / ".esmirror" / "state.json").write_text("{}")
    (tmp_path / "catalogs.xml").write_text("<CatalogConfig/>")
    os.symlink(tmp_path / "catalogs.xml", tmp_path / "link.xml")
    os.mkfifo(tmp_path / "pipe.idx")
    result = scan(tmp_path)
    assert list(result.manifest.files) == ["catalogs.xml"]
    # each skipped entry is called what it is (a FIFO was called a symlink)
    assert "link.xml: skipped, a symlink (only regular files are mirrored)" in result.warnings
    assert "pipe.idx: skipped, a named pipe (FIFO) (only regular files are mirrored)" in result.warnings


def test_two_names_that_print_alike_are_shown_as_code_points(tmp_path):
    """'indexes/café.idx' and 'indexes/café.idx' (composed, decomposed) told a person nothing."""
    composed, decomposed = "café.idx", unicodedata.normalize("NFD", "café.idx")
    with pytest.raises(InvalidSet) as refused:
        Manifest.from_list([{"path": decomposed, "sha256": "a" * 64, "size": 1},
                            {"path": composed, "sha256": "b" * 64, "size": 1}])
    assert "'caf\\xe9.idx'" in " ".join(refused.value.reasons), refused.value.reasons
    assert "'cafe\\u0301.idx'" in " ".join(refused.value.reasons), refused.value.reasons
    (tmp_path / composed).write_bytes(b"1")
    (tmp_path / decomposed).write_bytes(b"2")
    (tmp_path / "Foo.idx").write_bytes(b"3")
    (tmp_path / "foo.idx").write_bytes(b"4")
    unsafe = scan(tmp_path).unsafe
    assert any("caf\\xe9.idx" in u and "cafe\\u0301.idx" in u for u in unsafe), unsafe
    assert any("Foo.idx" in u and "\\x" not in u for u in unsafe), unsafe  # (case shows as it is)


def test_scan_include_exclude(tmp_path):
    (tmp_path / "idx").mkdir()
    for name in ("catalogs.xml", "idx/a.idx", "idx/a.tmp", "notes.txt"):
        (tmp_path / name).write_text(name)
    result = scan(tmp_path, include=["catalogs.xml", "idx/**"], exclude=["**/*.tmp"])
    assert sorted(result.manifest.files) == ["catalogs.xml", "idx/a.idx"]


def test_hash_cache_skips_unchanged_files_and_catches_same_size_edits(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    f = data / "big.idx"
    f.write_bytes(b"A" * 1000)
    old = time.time() - 60
    os.utime(f, (old, old))
    cache_path = tmp_path / "cache.json"
    first = scan(data, HashCache(cache_path)).manifest
    # a cached entry is trusted: prove it by poisoning the cache's hash
    cache = HashCache(cache_path)
    cache.entries["big.idx"][4] = "f" * 64
    cache.dirty = True
    cache.save(["big.idx"])
    assert scan(data, HashCache(cache_path)).manifest.files["big.idx"].sha256 == "f" * 64
    # the same size, rewritten: the cache key moves, so the file is read again
    f.write_bytes(b"B" * 1000)
    third = scan(data, HashCache(cache_path)).manifest
    assert third.files["big.idx"].sha256 == hashlib.sha256(b"B" * 1000).hexdigest()
    assert third.files["big.idx"].sha256 != first.files["big.idx"].sha256
    # rewritten at the same size with its old mtime put back (cp -p, rsync -t, touch -r): the
    # size and mtime say nothing changed; the ctime, which nothing can set back, does
    os.utime(f, (old, old))
    scan(data, HashCache(cache_path))  # B, cached under its size and that mtime
    time.sleep(0.02)  # (a kernel with coarse timestamps moves the ctime once per tick)
    f.write_bytes(b"C" * 1000)
    os.utime(f, (old, old))
    fourth = scan(data, HashCache(cache_path)).manifest
    assert fourth.files["big.idx"].sha256 == hashlib.sha256(b"C" * 1000).hexdigest()


def write_ini(tmp_path, text):
    etc = tmp_path / "ImageServer" / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "esmirror.ini").write_text(text)
    return tmp_path


def test_settings_defaults_and_values(tmp_path):
    s = load_settings(write_ini(tmp_path, "[esmirror]\nallow_push = 10.0.0.0/8, ::1\n"
                                          "max_upload_bytes = 2G\narchive_keep = 3\n"))
    assert [str(n) for n in s.allow_push] == ["10.0.0.0/8", "::1/128"]
    assert s.max_upload_bytes == 2 * 1024**3 and s.archive_keep == 3
    assert [str(n) for n in s.allow_admin] == ["127.0.0.1/32", "::1/128"]
    assert s.prefix == "/lizardtech/mirror"
    assert parse_size("512K") == 524288


@pytest.mark.parametrize("text,needle", [
    ("[esmirror]\nallow_pushh = 1.2.3.4\n", ":2: unknown key 'allow_pushh'"),
    ("[esmirror]\n\narchive_keep = many\n", ":3: bad value for archive_keep"),
    # said in words, not Python's ("invalid literal for int() with base 10")
    ("[esmirror]\narchive_keep = abc\n", "'abc' is not a whole number"),
    ("[esmirror]\nretry_max = soon\n", "'soon' is not a number of seconds"),
    ("[esmirror]\nallow_push = 300.1.1.1\n", ":2: bad value for allow_push"),
    ("[esmirror]\nallow_push = fe80::1%eth0\n", "zone ids"),
    ("allow_push = 1.2.3.4\n", ":1: the first line must be the section header"),
    ("[esmirror]\nprefix = /a b\n", "bad value for prefix"),
    ("[other]\nx = 1\n", "unknown section [other]"),
])
def test_settings_errors_name_file_and_line(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load_settings(write_ini(tmp_path, text))
    assert "esmirror.ini" in info.value.message and needle in info.value.message
    assert info.value.exit_code == 2


def iserv(tmp_path, body):
    path = tmp_path / "iserv-cfg.xml"
    path.write_text(f'<?xml version="1.0"?>\n<ImageServer>\n<ImageManager/>\n{body}\n</ImageServer>\n')
    return path


def test_mirrors_defaults_and_both_spellings(tmp_path):
    path = iserv(tmp_path, '<Mirrors>\n<Secondary host="es2" port="8080" ssl="noverify"/>\n'
                           '<Secondary host="es3" sslstrictness="strict"/>\n<Secondary host="es4"/>\n'
                           '</Mirrors>')
    got = [(s.host, s.port, s.ssl) for s in read_mirrors(path)]
    assert got == [("es2", 8080, "noverify"), ("es3", 80, "strict"), ("es4", 80, "none")]
    # an attribute like none of esmirror's (the vendor's own) is left alone
    path = iserv(tmp_path, '<Mirrors>\n<Secondary host="es2" description="west" timeout="30"/>\n</Mirrors>')
    assert [(s.host, s.port) for s in read_mirrors(path)] == [("es2", 80)]


@pytest.mark.parametrize("body,needle", [
    ('<Mirrors>\n<Secondary host="a" ssl="none" sslstrictness="strict"/>\n</Mirrors>', ":5: ssl="),
    ('<Mirrors>\n<Secondary port="80"/>\n</Mirrors>', ':5: <Secondary> needs host'),
    ('<Mirrors>\n<Secondary host="a" port="http"/>\n</Mirrors>', ":5: port='http'"),
    ('<Mirrors>\n<Secondary host="a" ssl="tls"/>\n</Mirrors>', ":5: TLS mode 'tls'"),
    ('<Mirrors>\n<Secondary host="a"/>', "not readable XML"),
    # a misspelt attribute used to be dropped: Port= sent to port 80, sslstrictnes= over HTTP
    ('<Mirrors>\n<Secondary host="a" Port="8443"/>\n</Mirrors>', ':5: <Secondary> attribute Port="8443" '
     "is not one esmirror reads; did you mean port?"),
    ('<Mirrors>\n<Secondary host="a" sslstrictnes="strict"/>\n</Mirrors>', "did you mean sslstrictness?"),
    ('<Mirrors>\n<Secondary HOST="a"/>\n</Mirrors>', "did you mean host?"),
])
def test_mirrors_errors_name_file_and_line(tmp_path, body, needle):
    with pytest.raises(ConfigError) as info:
        read_mirrors(iserv(tmp_path, body))
    assert "iserv-cfg.xml" in info.value.message and needle in info.value.message


def test_catalogs_validation_reasons_have_lines():
    good = b'<CatalogConfig><Catalog name="a"><Path>/x</Path><Watermark/></Catalog></CatalogConfig>'
    assert validate_catalogs(good).problems == []
    bad = (b'<CatalogConfig>\n<Catalog name="a b"><Path>/x</Path></Catalog>\n'
           b'<Catalog name="c"/>\n<MultiCatalog name="m"><SubCatalog name="zz"/></MultiCatalog>\n'
           b'</CatalogConfig>')
    problems = validate_catalogs(bad).problems
    assert any(":2:" in p and "'a b'" in p for p in problems)
    assert any(":3:" in p and "no <Path>" in p for p in problems)
    assert any(":4:" in p and "'zz'" in p for p in problems)
    assert "root element" in validate_catalogs(b"<Other/>").problems[0]
    # Express Server addresses a catalog by its name: one name, one catalog, and none without
    twice = validate_catalogs(b'<CatalogConfig>\n<Catalog name="a"><Path>/x</Path></Catalog>\n'
                              b'<Catalog name="a"><Path>/y</Path></Catalog>\n'
                              b'<Catalog><Path>/z</Path></Catalog>\n</CatalogConfig>').problems
    assert any(":3:" in p and "'a' is already used on line 2" in p for p in twice), twice
    assert any(":4:" in p and 'has no name="…"' in p for p in twice), twice
    assert "DOCTYPE" in validate_catalogs(
        b'<!DOCTYPE c [<!ENTITY x SYSTEM "file:///etc/passwd">]><CatalogConfig>&x;</CatalogConfig>'
    ).problems[0]


def test_catalog_names_in_any_script_and_paths_around_comments_are_taken():
    """Letters are letters in any script; a comment inside <Path> is not part of it; a name
    that ends in a newline (&#10;) is no name of letters."""
    good = ('<CatalogConfig><Catalog name="été-2024"><Path><!-- moved 2024 -->/x</Path></Catalog>'
            '<MultiCatalog name="ünion"><SubCatalog name="été-2024"/></MultiCatalog></CatalogConfig>')
    report = validate_catalogs(good.encode())
    assert report.problems == [] and report.catalog_paths == {"été-2024": "/x"}
    bad = validate_catalogs(b'<CatalogConfig><Catalog name="a&#10;"><Path>/x</Path></Catalog>'
                            b'<Catalog name="b"><Path><!-- only a comment --></Path></Catalog></CatalogConfig>')
    assert len(bad.problems) == 2, bad.problems
    assert "'a\\n' may hold only letters" in bad.problems[0] and "no <Path>" in bad.problems[1]


def test_large_blobs_bypass_the_page_cache_and_keep_every_byte(tmp_path):
    """Blobs of DIRECT_MIN and more are written with O_DIRECT in whole blocks: the tail is
    padded, then cut back. Every size around the edges comes back byte for byte, on the
    disk and on a tmpfs (older kernels refuse O_DIRECT there: the page cache is used)."""
    import io
    import shutil
    import tempfile

    from app.core.store import DIRECT_MIN, BlobStore, BlobWriter

    places = [tmp_path]
    if os.path.isdir("/dev/shm"):
        places.append(__import__("pathlib").Path(tempfile.mkdtemp(dir="/dev/shm")))
    try:
        for place in places:
            store = BlobStore(place / "state")
            for size in (DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, DIRECT_MIN + 4095,
                         5 * 1024 * 1024 + 3 * 4096, 6 * 1024 * 1024 + 123):
                data = os.urandom(size)
                sha = hashlib.sha256(data).hexdigest()
                assert store.put(sha, io.BytesIO(data), size) == size
                assert store.path(sha).read_bytes() == data, (place, size)
            probe = place / "probe"
            if place == tmp_path and hasattr(os, "O_DIRECT"):  # the disk takes O_DIRECT
                with BlobWriter(probe, DIRECT_MIN) as writer:
                    assert writer.direct
            with BlobWriter(probe, DIRECT_MIN - 1) as writer:
                assert not writer.direct
    finally:
        for place in places[1:]:
            shutil.rmtree(place, ignore_errors=True)


def test_folders_a_commit_left_empty_go_with_their_empty_parents_and_no_others(tmp_path):
    """Every empty folder of the working dir used to go at every commit, one rolled back
    too: an admin's or Express Server's own empty folder included."""
    for folder in ("a/b/c", "keep/empty", "localcache", "indexes/emptysub"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "keep" / "catalog.idx").write_bytes(b"x")
    (tmp_path / "indexes" / "tile.idx").write_bytes(b"x")
    prune_emptied(tmp_path, ["a/b/c/gone.idx", "keep/gone.idx", "indexes/gone.idx", "top.idx"])
    assert not (tmp_path / "a").exists()  # c, then b, then a: each left empty
    assert (tmp_path / "keep" / "catalog.idx").exists() and (tmp_path / "keep" / "empty").is_dir()
    assert (tmp_path / "localcache").is_dir() and (tmp_path / "indexes" / "emptysub").is_dir()
    assert (tmp_path / "indexes" / "tile.idx").exists()


def test_a_commit_tells_the_hash_cache_what_it_put_so_the_next_scan_reads_nothing(tmp_path):
    """Every file a commit puts was verified on the way in. Before this, the first browse or
    commit after a full push re-read the whole set on the secondary. Blobs uploaded more
    than RACY_SECONDS before the commit are trusted at once; one written just now is
    read again next time, like any racy file."""

    from agent.demo import make_install, write_sample_set
    from app.core.apply import CommitRequest, WorkingDir
    from app.core.manifest import UNTRUSTED_KEY

    master = tmp_path / "master"
    master.mkdir()
    write_sample_set(master, tmp_path / "images", big_mb=1)
    (master / "indexes" / "fresh.idx").write_bytes(b"uploaded a moment ago")
    wanted = scan(master).manifest
    install = make_install(tmp_path / "secondary", {"allow_push": "127.0.0.1"})
    workdir = WorkingDir(load_settings(str(install.root)))
    earlier = time.time() - 60
    for path, entry in wanted.files.items():
        with open(master / path, "rb") as fh:
            workdir.store.put(entry.sha256, fh, entry.size)
        if path != "indexes/fresh.idx":  # the rest came in a minute ago
            os.utime(workdir.store.path(entry.sha256), (earlier, earlier))
    workdir.commit(CommitRequest(1, "m1", workdir.scan().manifest.digest, wanted))

    cache = HashCache(workdir.state_dir / "hashcache.json")
    assert set(cache.entries) == set(wanted.files)
    assert cache.entries["indexes/fresh.idx"][:4] == UNTRUSTED_KEY
    # trusted: a poisoned hash in the cache is what the next scan reports, so it read nothing
    cache.entries["indexes/tile-1.idx"][4] = "f" * 64
    cache.dirty = True
    cache.save(wanted.files)
    again = workdir.scan().manifest
    assert again.files["indexes/tile-1.idx"].sha256 == "f" * 64
    assert again.files["indexes/fresh.idx"].sha256 == wanted.files["indexes/fresh.idx"].sha256
    assert again.files["catalogs.xml"].sha256 == wanted.files["catalogs.xml"].sha256


def _dirty_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def test_flushing_a_push_leaves_what_is_dirty_on_other_filesystems_alone(tmp_path):
    """Many files are made durable by flushing their filesystem, not the whole machine: a
    push must not wait for what another program left dirty on another disk."""
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    from app.core.store import FSYNC_AT_MOST, durable_flush

    shm = Path("/dev/shm")
    if not sys.platform.startswith("linux") or not shm.is_dir():
        pytest.skip("needs Linux and a tmpfs at /dev/shm")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip(f"{tmp_path} is on the same filesystem as /dev/shm")
    pushed = Path(tempfile.mkdtemp(prefix="esmirror-flush-", dir=shm))
    files = []
    try:
        for i in range(FSYNC_AT_MOST + 8):
            files.append(pushed / f"blob{i}")
            files[-1].write_bytes(b"x" * 4096)
        other = tmp_path / "someone-elses-big-write"
        with open(other, "wb") as fh:  # written, never flushed: dirty pages on the disk
            for _ in range(64):
                fh.write(b"\xa5" * (1 << 20))
        before = _dirty_bytes()
        if before < 48 << 20:
            pytest.skip(f"the kernel wrote the data back at once (Dirty: {before >> 20} MiB)")
        durable_flush(files)
        after = _dirty_bytes()
        other.unlink()  # its dirty pages go without being written
    finally:
        shutil.rmtree(pushed)
    assert after >= before // 2, (f"flushing {len(files)} files on /dev/shm flushed the disk "
                                  f"too: Dirty {before >> 20} MiB -> {after >> 20} MiB")


def test_a_file_inside_a_name_the_set_has_as_a_file_is_unsafe(tmp_path):
    """Linux holds A.idx (a file) beside a.idx/ (a folder); Windows, macOS and the commit cannot."""
    (tmp_path / "A.idx").write_bytes(b"a file")
    (tmp_path / "a.idx").mkdir()
    (tmp_path / "a.idx" / "x.idx").write_bytes(b"inside what Windows sees as that file")
    result = scan(tmp_path)
    assert result.unsafe == ["a.idx/x.idx: inside 'A.idx', which the set also has as a file"]
    assert set(result.manifest.files) == {"A.idx"}


@pytest.mark.parametrize("pattern,path,matches", [
    ("*_*_*.tmp", "a_b_c.tmp", True),
    ("*_*_*.tmp", "a_b.tmp", False),
    ("*a*a*ab", "xaayaab", True),
    ("*.i?x*", "tile.idx.bak", True),
    ("d*/*.idx", "data/tile.idx", True),
    ("d*/*.idx", "data/more/tile.idx", False),
    ("*a*b", "a/b", False),
])
def test_globs_with_several_stars_match_as_before(pattern, path, matches):
    from app.core.manifest import compile_glob

    assert bool(compile_glob(pattern).match(path)) is matches


def test_a_glob_with_many_stars_against_a_long_name_ends(tmp_path):
    """Compiled star by star, this exclude backtracked exponentially: publish spun for minutes."""
    (tmp_path / ("a" * 120)).write_bytes(b"x")
    (tmp_path / ("a" * 60 + "b")).write_bytes(b"x")
    code = ("import sys; from pathlib import Path; from app.core.manifest import scan; "
            "print(sorted(scan(Path(sys.argv[1]), exclude=['*a*a*a*a*a*a*a*a*ab']).manifest.files))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(["a" * 120])


def test_many_double_stars_against_a_long_name_end_and_match_as_the_regex_does():
    """**a**a**…b backtracked as the name's length to the power of its stars (an 80-character
    name took 14 s with six): such globs go through GlobNFA, which must mean the same."""
    import time

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from app.core.manifest import GlobNFA, compile_glob, glob_regex

    pattern = "**a" * 10 + "**b"
    started = time.monotonic()
    assert compile_glob(pattern).match("a" * 250) is False
    assert compile_glob(pattern).match("a/" * 125 + "b") is True
    assert time.monotonic() - started < 10  # (a bound on a hang, not a timing: regex took hours)

    parts = st.sampled_from(["a", "b", "/", ".", "*", "**", "**/", "?"])

    @settings(max_examples=3000, deadline=None)
    @given(st.lists(parts, max_size=8).map("".join), st.text("ab/.", max_size=10))
    def same(glob: str, text: str) -> None:
        assert GlobNFA(glob).match(text) is bool(glob_regex(glob).match(text)), (glob, text)

    same()


def test_upload_temp_files_of_dead_or_long_idle_uploads_are_swept(tmp_path):
    """Recovery removes an upload's temp file when its process is gone, and also when it sat
    untouched longer than any server lets a body wait: by then its pid may be another's."""
    import subprocess
    import sys

    from app.core.apply import IDLE_TMP, sweep_dead_tmp

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    files = {"live": tmp / f"aa.{os.getpid()}.1.tmp", "idle": tmp / f"bb.{os.getpid()}.2.tmp",
             "dead": tmp / f"cc.{dead.pid}.3.tmp"}
    for path in files.values():
        path.write_bytes(b"part of a body")
    old = time.time() - IDLE_TMP - 60
    os.utime(files["idle"], (old, old))
    sweep_dead_tmp(tmp_path)
    assert sorted(p.name for p in tmp.iterdir()) == [files["live"].name]


def test_a_quoted_windows_command_runs_the_program_it_names():
    from app.core.settings import command_argv
    line = r'"C:\Program Files\LizardTech\reload.cmd" --all "a b"'
    assert command_argv(line, windows=True) == [r"C:\Program Files\LizardTech\reload.cmd", "--all", "a b"]
    assert command_argv("sh '/opt/my reload.sh' -v", windows=False) == ["sh", "/opt/my reload.sh", "-v"]


def test_a_file_dated_ahead_is_trusted_once_its_ctime_is_settled(tmp_path):
    """A file whose mtime was set ahead (touch -d 2100-01-01, a copy from a clock ahead) was
    read again at every scan, until that date: for a large index, seconds each publish."""
    from app.core.manifest import RACY_SECONDS

    data = tmp_path / "data"
    data.mkdir()
    f = data / "big.idx"
    f.write_bytes(b"A" * 1000)
    ahead = 4102444800  # 2100-01-01
    os.utime(f, (ahead, ahead))
    time.sleep(RACY_SECONDS + 0.2)  # (its ctime, which the kernel set, is now settled)
    cache_path = tmp_path / "cache.json"
    scan(data, HashCache(cache_path))
    cache = HashCache(cache_path)
    cache.entries["big.idx"][4] = "f" * 64  # trusted, as the poisoned hash comes back shows
    cache.dirty = True
    cache.save(["big.idx"])
    assert scan(data, HashCache(cache_path)).manifest.files["big.idx"].sha256 == "f" * 64


def test_uploads_are_aged_by_the_clock_that_dated_them(tmp_path, monkeypatch):
    """A receiver whose clock runs a day ahead of its working dir's files (a share's server
    behind) dropped every upload as stale at the very commit that was to use it: 409
    'blobs never uploaded', the set sent three times, at every publish."""
    from agent.demo import make_install, write_sample_set
    from app.core import apply as apply_module
    from app.core.apply import CommitRequest, WorkingDir

    master = tmp_path / "master"
    master.mkdir()
    write_sample_set(master, tmp_path / "images", big_mb=1)
    wanted = scan(master).manifest
    install = make_install(tmp_path / "secondary", {"allow_push": "127.0.0.1"})
    workdir = WorkingDir(load_settings(str(install.root)))
    for path, entry in wanted.files.items():
        with open(master / path, "rb") as fh:
            workdir.store.put(entry.sha256, fh, entry.size)

    class Ahead:  # this process's clock, three days ahead of the one that dates the files
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def time() -> float:
            return time.time() + 3 * 86400

    monkeypatch.setattr(apply_module, "time", Ahead())
    workdir.commit(CommitRequest(1, "m1", workdir.scan().manifest.digest, wanted))
    assert scan(install.data_dir).manifest.digest == wanted.digest


def test_a_junction_counts_as_a_link_though_its_stat_says_folder():
    """Python 3.11's lstat of a Windows junction reports a folder: walking it, or writing
    through it, would reach outside the working dir. Its reparse tag tells it apart (the
    fields are those of os.stat_result on Windows; this machine's has no st_reparse_tag)."""
    import stat
    from types import SimpleNamespace

    from app.core.manifest import is_link

    folder = stat.S_IFDIR | 0o755
    assert is_link(SimpleNamespace(st_mode=folder, st_reparse_tag=0xA0000003))  # a junction
    assert not is_link(SimpleNamespace(st_mode=folder, st_reparse_tag=0))
    assert not is_link(SimpleNamespace(st_mode=folder, st_reparse_tag=0x80000013))  # deduplicated data
    assert is_link(SimpleNamespace(st_mode=stat.S_IFLNK | 0o777))
    assert not is_link(os.lstat(__file__))


def test_a_rename_refused_for_a_moment_on_windows_goes_through_once_the_file_is_free(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program has open (an antivirus scan, a
    thread reading the record): state.replace tries again for a second there. A file made
    immutable here refuses the same way, with the same PermissionError."""
    import threading

    from app.core import state

    target, new = tmp_path / "state.json", tmp_path / "new.tmp"
    target.write_text("old")
    new.write_text("new")
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root on a filesystem with the immutable flag")
    try:
        with pytest.raises(PermissionError):  # elsewhere: at once, as os.replace
            state.replace(new, target)
        monkeypatch.setattr(state, "WINDOWS", True)
        started = time.monotonic()
        with pytest.raises(PermissionError):  # held all along: refused after BUSY_WAIT
            state.replace(new, target)
        assert time.monotonic() - started >= state.BUSY_WAIT
        freed = threading.Timer(0.3, subprocess.run, (["chattr", "-i", str(target)],))
        freed.start()
        state.replace(new, target)
        freed.join()
        assert target.read_text() == "new" and not new.exists()
    finally:
        subprocess.run(["chattr", "-i", str(target)])


def test_a_path_too_long_for_windows_without_long_paths_is_found_live_or_in_its_archive(tmp_path):
    """Without LongPathsEnabled, Windows takes 259 characters a path: a longer one failed
    half way through the switch ("cannot find the path"). The receiver refuses it first, and
    counts the archive entry's folders, ~50 characters deeper, for a file it replaces."""
    from agent.demo import make_install
    from app.core.apply import ARCHIVE_ID_CHARS, WINDOWS_MAX_PATH, WorkingDir, too_long_here

    data = Path("C:/Program Files/LizardTech/Express Server/ImageServer/var/data")  # (its length)
    archive = data / "archive"
    fits = "indexes/" + "x" * (WINDOWS_MAX_PATH - len(str(data)) - 1 - len("indexes/"))
    assert too_long_here(data, archive, ["catalogs.xml", fits], []) is None  # 259 exactly
    assert too_long_here(data, archive, ["catalogs.xml", fits + "y"], []) == (fits + "y", 260)
    path, length = too_long_here(data, archive, [fits], [fits])  # replaced: archived too
    assert path == fits and length == 259 + len("/archive/") + ARCHIVE_ID_CHARS + len("/files/") - 1
    workdir = WorkingDir(load_settings(make_install(tmp_path / "install", {}).root))
    assert len(workdir._new_archive_id(10**10)) <= ARCHIVE_ID_CHARS  # (the entry's real name)
