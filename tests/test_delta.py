"""Issue 7: large files travel as deltas against the secondary's own copy, and stay exact.

Each case asserts the bytes on the secondary's disk and the bytes the publish report
says were sent; never timings.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import requests

from agent.demo import make_install
from agent.fleet import master_hash_cache, master_identity
from agent.push import Opening, ScanNews
from app import create_app
from app.core.delta import CHUNK_SIZE, DELTA_MIN, Base, first_difference
from app.core.express import select_secondaries
from app.core.manifest import ChunkFeed, HashCache, hash_chunks, scan
from app.core.settings import load_settings
from conftest import VERSION, session_from, set_files

MiB = 1024 * 1024
BIG = DELTA_MIN + 2 * MiB + 1234   # not a whole number of chunks
SLACK = 4096                        # frame headers and the JSON header line


def sent(report: dict) -> int:
    (only,) = report["secondaries"]
    assert only["state"] == "in-sync", report
    return only["bytes_sent"]


def publish_ok(f) -> dict:
    rc, report, out = f.publish()
    assert rc == 0, out
    for s in f.secondaries:
        assert set_files(s.data_dir) == set_files(f.master.data_dir)
    return report


def test_changed_middle_chunk_grown_shrunk_and_truncated_send_only_what_changed(fleet):
    f = fleet(1)
    big = f.master.data_dir / "indexes" / "big.idx"
    big.write_bytes(os.urandom(BIG))
    first = sent(publish_ok(f))
    assert first >= BIG  # a first push has nothing to build from

    # 1000 bytes inside one chunk in the middle: that chunk goes, nothing else
    with open(big, "r+b") as fh:
        fh.seek(3 * CHUNK_SIZE + 100)
        fh.write(os.urandom(1000))
    assert sent(publish_ok(f)) <= CHUNK_SIZE + SLACK
    # the secondary noted the new file's chunk list while rebuilding it (for the next delta)
    content = big.read_bytes()
    noted = f.secondaries[0].data_dir / ".esmirror" / "chunks" / hashlib.sha256(content).hexdigest()
    assert json.loads(noted.read_text())["chunks"] == [
        hashlib.sha256(content[i:i + CHUNK_SIZE]).hexdigest() for i in range(0, BIG, CHUNK_SIZE)]

    # a change across a chunk boundary: the two chunks it touches
    with open(big, "r+b") as fh:
        fh.seek(7 * CHUNK_SIZE - 500)
        fh.write(os.urandom(1000))
    assert sent(publish_ok(f)) <= 2 * CHUNK_SIZE + SLACK

    # grown by 300 KB at the end: the old short last chunk and the new bytes
    with open(big, "ab") as fh:
        fh.write(os.urandom(300_000))
    assert sent(publish_ok(f)) <= 300_000 + CHUNK_SIZE + SLACK

    # truncated to a little over DELTA_MIN: only the new, shorter last chunk's bytes
    with open(big, "r+b") as fh:
        fh.truncate(DELTA_MIN + 777)
    assert sent(publish_ok(f)) <= 777 + SLACK

    # shrunk below the threshold: sent whole, still exact
    with open(big, "r+b") as fh:
        fh.truncate(DELTA_MIN // 2)
    assert sent(publish_ok(f)) == DELTA_MIN // 2



def test_the_master_hashes_again_only_the_chunks_whose_crc32_changed(tmp_path):
    old = os.urandom(10 * CHUNK_SIZE + 5)
    path = tmp_path / "big.idx"
    path.write_bytes(old)
    sha, chunks, crcs = hash_chunks(path, CHUNK_SIZE, with_crc=True)
    assert sha == hashlib.sha256(old).hexdigest()
    assert crcs == [zlib.crc32(old[i:i + CHUNK_SIZE]) for i in range(0, len(old), CHUNK_SIZE)]

    new = bytearray(old)
    new[3 * CHUNK_SIZE + 7] ^= 1
    path.write_bytes(new)
    truth = [hashlib.sha256(new[i:i + CHUNK_SIZE]).hexdigest() for i in range(0, len(new), CHUNK_SIZE)]
    # previous hashes replaced by markers: the ones kept unhashed show through
    marked = [f"{n:064x}" for n in range(len(chunks))]
    new_sha, got, _ = hash_chunks(path, CHUNK_SIZE, previous=(marked, crcs))
    assert new_sha == hashlib.sha256(new).hexdigest()
    # chunk 3 changed; the last (short) chunk is always hashed
    assert got == [truth[n] if n in (3, 10) else marked[n] for n in range(11)]
    assert hash_chunks(path, CHUNK_SIZE, previous=(chunks, crcs))[1] == truth


def test_a_chunk_hash_kept_on_a_chance_crc32_match_costs_one_whole_send_never_a_wrong_file(fleet):
    """CRC-32 can match by chance: the master then lists a changed chunk as unchanged. The
    secondary refuses the rebuilt file (whole-file hash), the file goes whole, and the
    master drops the list, so the next change is a small delta again."""
    f = fleet(1)
    big = f.master.data_dir / "indexes" / "big.idx"
    old = os.urandom(BIG)
    big.write_bytes(old)
    publish_ok(f)
    kept = f.master.data_dir / ".esmirror" / "chunks" / hashlib.sha256(old).hexdigest()
    listing = json.loads(kept.read_text())
    assert len(listing["crc32"]) == len(listing["chunks"])

    # the next content changes chunk 5; make the kept CRC-32 of chunk 5 collide with it
    new = bytearray(old)
    new[5 * CHUNK_SIZE:5 * CHUNK_SIZE + 100] = os.urandom(100)
    listing["crc32"][5] = zlib.crc32(new[5 * CHUNK_SIZE:6 * CHUNK_SIZE])
    kept.write_text(json.dumps(listing))
    big.write_bytes(new)
    assert sent(publish_ok(f)) >= BIG  # exact on the secondary (publish_ok), sent whole
    assert not (kept.parent / hashlib.sha256(new).hexdigest()).exists()  # the wrong list is gone

    with open(big, "r+b") as fh:
        fh.seek(2 * CHUNK_SIZE)
        fh.write(os.urandom(10))
    assert sent(publish_ok(f)) <= CHUNK_SIZE + SLACK

def test_a_new_file_reuses_chunks_of_another_file_on_the_secondary(fleet):
    f = fleet(1)
    original = f.master.data_dir / "indexes" / "orthos-big.idx"
    original.write_bytes(os.urandom(BIG))
    publish_ok(f)

    # a copy under a new name with one chunk changed: built from the original there
    copy = f.master.data_dir / "overviews" / "orthos-copy.ovr"
    shutil.copyfile(original, copy)
    with open(copy, "r+b") as fh:
        fh.seek(CHUNK_SIZE * 5)
        fh.write(os.urandom(10))
    report = publish_ok(f)
    assert sent(report) <= CHUNK_SIZE + SLACK
    assert (f.secondaries[0].data_dir / "overviews" / "orthos-copy.ovr").read_bytes() == copy.read_bytes()


def test_full_sends_every_byte_without_deltas(fleet):
    f = fleet(1)
    big = f.master.data_dir / "indexes" / "big.idx"
    big.write_bytes(os.urandom(BIG))
    publish_ok(f)
    with open(big, "r+b") as fh:
        fh.write(b"changed")
    rc, report, out = f.publish("--full")
    assert rc == 0, out
    assert sent(report) >= sum(len(p.read_bytes()) for p in f.master.data_dir.rglob("*")
                               if p.is_file() and ".esmirror" not in p.parts)


def _big_file_published(f) -> tuple[str, bytes, str, Path]:
    """A large file on master and secondary: (receiver URL, its bytes, its sha256, the blob store)."""
    data = os.urandom(BIG)
    (f.master.data_dir / "indexes" / "big.idx").write_bytes(data)
    publish_ok(f)
    return (f.receivers[0].url, data, hashlib.sha256(data).hexdigest(),
            f.secondaries[0].data_dir / ".esmirror" / "blobs")


def test_a_large_file_that_arrived_whole_gets_its_chunk_list_from_the_next_scan_that_reads_it(fleet):
    """The secondary's first browse after the upload reads the new file anyway (it was
    written seconds ago); it keeps the file's chunk list then, so the first delta
    against it does not wait for a second read of the whole file."""
    f = fleet(1)
    url, data, here, blobs = _big_file_published(f)
    listing = blobs.parent / "chunks" / here
    assert requests.get(f"{url}/browse", timeout=30).status_code == 200
    assert json.loads(listing.read_text())["chunks"] == hash_chunks(f.master.data_dir / "indexes" / "big.idx",
                                                                    CHUNK_SIZE)[1]
    assert requests.get(f"{url}/chunks/{here}", params={"path": "indexes/big.idx"},
                        timeout=30).json()["chunks"][-1] == hashlib.sha256(data[-(BIG % CHUNK_SIZE):]).hexdigest()


def test_delta_route_keeps_only_a_file_that_hashes_to_its_name(fleet):
    """Bad or lying delta bodies are refused (400/409), never a 500, and store nothing."""
    f = fleet(1, secondary_ini={"allow_admin": "127.0.0.9"})  # chunks/delta are push routes
    url, data, here, blobs = _big_file_published(f)

    chunks = requests.get(f"{url}/chunks/{here}", params={"path": "indexes/big.idx"}, timeout=30)
    assert chunks.status_code == 200, chunks.text
    listing = chunks.json()
    assert listing["chunk_size"] == CHUNK_SIZE
    assert listing["chunks"][0] == hashlib.sha256(data[:CHUNK_SIZE]).hexdigest()
    assert len(listing["chunks"]) == -(-BIG // CHUNK_SIZE)
    assert requests.get(f"{url}/chunks/{'0' * 64}", params={"path": "indexes/big.idx"},
                        timeout=30).status_code == 404
    assert requests.get(f"{url}/chunks/{here}", params={"path": "../../etc/passwd"},
                        timeout=30).status_code == 404
    stranger = session_from("127.0.0.2")  # not in allow_push: these are push routes
    assert stranger.get(f"{url}/chunks/{here}", timeout=30).status_code == 403
    assert stranger.post(f"{url}/delta/{here}", data=b"x", timeout=30).status_code == 403

    new = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    target = hashlib.sha256(new).hexdigest()
    head = ('{"size": %d, "bases": [{"sha256": "%s", "path": "indexes/big.idx"}]}\n'
            % (len(new), here)).encode()
    good = head + b"L 101\n" + new[:101] + f"C 0 101 {len(new) - 101}\n".encode()
    lying = head + b"L 101\n" + new[:101] + f"C 0 100 {len(new) - 101}\n".encode()  # off by one
    cases = {
        "hashes wrong": (lying, 400),
        "garbage frame": (head + b"Z 1\n", 400),
        "copy past the file": (head + f"C 0 0 {len(new) + 1}\n".encode(), 400),
        "no such base": (head.replace(here.encode(), b"1" * 64).replace(b"indexes/big.idx",
                                                                         b"indexes/none.idx"), 409),
        "unsafe base path": (head.replace(b"indexes/big.idx", b"../x"), 400),
        "not json": (b"hello\n", 400),
    }
    for name, (body, status) in cases.items():
        answer = requests.post(f"{url}/delta/{target}", data=body, timeout=30)
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert "error" in answer.json(), name
        assert not (blobs / target).exists(), name
    answer = requests.post(f"{url}/delta/{target}", data=good, timeout=30)
    assert answer.status_code == 201, answer.text
    assert (blobs / target).read_bytes() == new


def test_one_read_gives_the_file_hash_and_its_chunk_hashes(tmp_path):
    """The master hashes a changed large file once; the delta plan uses those chunk hashes."""
    from app.core.delta import Base, Copy, Literal, plan
    from app.core.manifest import HashCache, scan

    content = os.urandom(BIG)
    (tmp_path / "big.idx").write_bytes(content)
    cache = HashCache(None, chunked=(DELTA_MIN, CHUNK_SIZE))
    result = scan(tmp_path, cache)
    sha, chunk_size, chunks = result.chunk_lists["big.idx"]
    assert sha == hashlib.sha256(content).hexdigest() == result.manifest.files["big.idx"].sha256
    assert chunk_size == CHUNK_SIZE
    assert chunks == [hashlib.sha256(content[i:i + CHUNK_SIZE]).hexdigest()
                      for i in range(0, BIG, CHUNK_SIZE)]
    # an old copy on the secondary that differs in chunk 2 only
    old = chunks[:2] + ["0" * 64] + chunks[3:]
    base = Base("1" * 64, "big.idx", tuple(old), CHUNK_SIZE)
    expected = [Copy(0, 0, 2 * CHUNK_SIZE), Literal(2 * CHUNK_SIZE, CHUNK_SIZE),
                Copy(0, 3 * CHUNK_SIZE, BIG - 3 * CHUNK_SIZE)]
    assert plan(tmp_path / "big.idx", BIG, [base], chunks) == expected
    assert plan(tmp_path / "big.idx", BIG, [base]) == expected  # reading the file itself
    # a small file gets no chunk list; a file that changed size since is refused
    (tmp_path / "small.dat").write_bytes(b"x" * 100)
    assert "small.dat" not in scan(tmp_path, HashCache(None, chunked=(DELTA_MIN, CHUNK_SIZE))).chunk_lists
    try:
        plan(tmp_path / "big.idx", BIG + CHUNK_SIZE, [base], chunks)
    except OSError as exc:
        assert "changed size" in str(exc)
    else:
        raise AssertionError("a chunk list that does not fit the size was accepted")


def test_a_rebuild_hashes_on_a_second_thread_and_always_ends_it(tmp_path):
    """The receiver hashes a rebuilt file, and writes it (O_DIRECT), on threads of their
    own; a refused delta (wrong bytes, broken frame) must still end both: gunicorn workers
    live for days."""
    import io
    import threading

    import pytest

    from app.core.errors import BadRequest
    from app.core.store import BlobStore

    data = os.urandom(BIG)
    base = tmp_path / "big.idx"
    base.write_bytes(data)
    here = hashlib.sha256(data).hexdigest()
    new = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    target = hashlib.sha256(new).hexdigest()
    head = ('{"size": %d, "bases": [{"sha256": "%s", "path": "big.idx"}]}\n'
            % (len(new), here)).encode()
    store = BlobStore(tmp_path / "state")
    bodies = {"hashes wrong": head + b"L 101\n" + new[:101] + f"C 0 100 {len(new) - 101}\n".encode(),
              "garbage frame": head + b"L 101\n" + new[:101] + b"Z 1\n"}
    for name, body in bodies.items():
        with pytest.raises(BadRequest):
            store.put_delta(target, io.BytesIO(body), len(body), lambda sha, rel: base)
        assert not store.has(target), name
        assert not [t for t in threading.enumerate()
                    if t.name in ("esmirror-hash", "esmirror-write")], name
    good = head + b"L 101\n" + new[:101] + f"C 0 101 {len(new) - 101}\n".encode()
    assert store.put_delta(target, io.BytesIO(good), len(good), lambda sha, rel: base) == (target, len(new))
    assert store.path(target).read_bytes() == new
    assert not [t for t in threading.enumerate() if t.name in ("esmirror-hash", "esmirror-write")]


def _settled(path) -> None:
    """Date a file back so the master's hash cache keeps its hash (it skips files written
    in the last seconds): a later change is then a change of known content."""
    old = time.time() - 60
    os.utime(path, (old, old))


def _published_then_changed(f, at: int) -> Path:
    """A large file, settled and published, then 100 bytes of it rewritten at ``at``."""
    big = f.master.data_dir / "indexes" / "big.idx"
    big.write_bytes(os.urandom(BIG))
    _settled(big)
    publish_ok(f)
    with open(big, "r+b") as fh:
        fh.seek(at)
        fh.write(os.urandom(100))
    return big


def test_a_changed_large_file_goes_ahead_as_a_stream_while_the_master_reads_it(fleet):
    """gunicorn passes a chunked body on as it comes: the secondary rebuilds the file
    while the master's scan is still reading it, and the push sends only the rest."""
    f = fleet(1, server="gunicorn")
    big = _published_then_changed(f, 5 * CHUNK_SIZE + 10)
    content = big.read_bytes()
    sha = hashlib.sha256(content).hexdigest()

    # the publish's own steps: an opening per secondary hears of the file as the scan reads it
    settings = load_settings(f.master.root)
    (secondary,) = select_secondaries(settings)
    news = ScanNews()
    opening = Opening(secondary, settings, news, master_identity(settings))
    try:
        scanned = scan(settings.data_dir, master_hash_cache(settings, news.reading_files))
        news.done()
        ahead = opening.sent_ahead()
    finally:
        news.done()
        opening.close()
    assert scanned.manifest.files["indexes/big.idx"].sha256 == sha
    assert sha in ahead and ahead[sha] <= CHUNK_SIZE + SLACK, ahead
    assert (f.secondaries[0].data_dir / ".esmirror" / "blobs" / sha).read_bytes() == content

    # a publish after one more change: against the secondary's live copy, both changed chunks
    with open(big, "r+b") as fh:
        fh.seek(9 * CHUNK_SIZE)
        fh.write(os.urandom(100))
    assert sent(publish_ok(f)) <= 2 * CHUNK_SIZE + SLACK


def test_a_publish_streams_a_changed_large_file_ahead_under_either_server(fleet):
    for server in ("gunicorn", "waitress"):  # waitress de-chunks the body before the app sees it
        f = fleet(1, server=server)
        _published_then_changed(f, 2 * CHUNK_SIZE + 1)
        (only,) = publish_ok(f)["secondaries"]
        assert only["files_ahead"] == 1 and only["bytes_sent"] <= CHUNK_SIZE + SLACK, (server, only)
        f.stop()


def test_a_file_streamed_ahead_counts_as_sent_when_the_manifest_lists_it_as_uploaded(fleet):
    """The stream ahead and the secondary's manifest run side by side. A manifest listed
    after the stream landed shows its file among the uploads waiting for a commit (here:
    already there before it), and the report said nothing went ahead, its bytes left out
    of bytes_sent: a publish to a secondary with many files, whose scan is slow, did so
    often, and this test's sibling did now and then."""
    f = fleet(1, server="gunicorn")
    big = _published_then_changed(f, 2 * CHUNK_SIZE + 1)
    content = big.read_bytes()
    blobs = f.secondaries[0].data_dir / ".esmirror" / "blobs"
    blobs.mkdir(exist_ok=True)
    (blobs / hashlib.sha256(content).hexdigest()).write_bytes(content)
    (only,) = publish_ok(f)["secondaries"]
    assert only["files_ahead"] == 1 and only["files_sent"] == 1, only
    assert 0 < only["bytes_sent"] <= CHUNK_SIZE + SLACK, only
    assert f.secondaries[0].data_dir.joinpath("indexes", "big.idx").read_bytes() == content


def test_a_stream_over_the_upload_limit_is_refused_by_the_server_and_the_file_goes_in_parts(fleet, tmp_path):
    """A large file rewritten through and through streams as one long literal. Over
    max_upload_bytes, waitress itself answers 413 (plain text, not our JSON) while the
    body is still coming; the master drops the head start and sends the file whole, in
    parts the limit allows."""
    for server in ("waitress", "gunicorn"):
        f = fleet(1, server=server, secondary_ini={"max_upload_bytes": "2M"})
        big = f.master.data_dir / "indexes" / "big.idx"
        big.write_bytes(os.urandom(6 * MiB))
        _settled(big)
        publish_ok(f)
        big.write_bytes(os.urandom(6 * MiB))  # every chunk changed
        (only,) = publish_ok(f)["secondaries"]
        assert only["files_ahead"] == 0, (server, only)
        assert 6 * MiB <= only["bytes_sent"] < 7 * MiB, (server, only)
        assert "Traceback" not in (tmp_path / "secondary1.log").read_text(), server
        f.stop()


def test_the_streamed_delta_route_keeps_only_a_file_that_hashes_to_its_last_line(fleet, tmp_path):
    f = fleet(1, server="gunicorn")
    url, data, here, blobs = _big_file_published(f)
    new = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    target = hashlib.sha256(new).hexdigest()
    head = ('{"size": %d, "bases": [{"sha256": "%s", "path": "indexes/big.idx"}]}\n'
            % (len(new), here)).encode()
    frames = b"L 101\n" + new[:101] + f"C 0 101 {len(new) - 101}\n".encode()

    def chunked(body: bytes):
        return iter([body[i:i + 65536] for i in range(0, len(body), 65536)])  # no length: chunked

    cases = {
        "names another hash": (head + frames + b"E " + here.encode() + b"\n", 400),
        "no last line": (head + frames, 400),
        "bytes after the last line": (head + frames + b"E " + target.encode() + b"\nmore", 400),
        "a frame of no bytes": (head + b"C 0 0 0\n" * 50, 400),
        "literal past the file": (head + f"L {len(new) + 1}\n".encode() + b"x", 400),
    }
    for name, (body, status) in cases.items():
        answer = requests.post(f"{url}/delta", data=chunked(body), timeout=30)
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert "error" in answer.json(), name
        assert not (blobs / target).exists(), name

    def broken_off():  # the master stops mid-stream (its publish was stopped)
        yield head + b"L 101\n" + new[:50]
        raise OSError("stopped")

    try:
        requests.post(f"{url}/delta", data=broken_off(), timeout=30)
    except requests.ConnectionError:
        pass
    answer = requests.post(f"{url}/delta", data=chunked(head + frames + b"E " + target.encode() + b"\n"),
                           timeout=30)
    assert answer.status_code == 201, answer.text
    assert answer.json()["sha256"] == target
    assert (blobs / target).read_bytes() == new
    assert not list((blobs.parent / "tmp").iterdir())  # the broken-off body left nothing behind
    assert "Traceback" not in (tmp_path / "secondary1.log").read_text()


def test_a_server_that_does_not_pass_chunked_bodies_gets_411_and_the_master_sends_a_length(tmp_path):
    install = make_install(tmp_path / "secondary", {"allow_push": "127.0.0.1", "express_version": VERSION})
    client = create_app(load_settings(install.root)).test_client()
    # a body without a length, from a server that does not say where it ends (wsgiref, say)
    answer = client.post("/delta", input_stream=io.BytesIO(b"{}\n"),
                         headers={"Transfer-Encoding": "chunked"}, environ_base={"REMOTE_ADDR": "127.0.0.1"},
                         environ_overrides={"wsgi.input_terminated": False})
    assert answer.status_code == 411, answer.text
    assert "chunked" in answer.json["error"]


def hash_chunks_of(path, content: bytes):
    path.write_bytes(content)
    return hash_chunks(path, CHUNK_SIZE)[:2]


def test_a_stream_starts_only_at_the_first_chunk_that_differs_from_the_base(tmp_path):
    old = os.urandom(10 * CHUNK_SIZE + 5)
    path = tmp_path / "big.idx"
    old_sha, old_chunks = hash_chunks_of(path, old)
    base = Base(old_sha, "big.idx", tuple(old_chunks), CHUNK_SIZE)

    def follow(content: bytes):
        feed = ChunkFeed("big.idx", str(path), len(content), CHUNK_SIZE, old_sha)
        path.write_bytes(content)
        hash_chunks(path, CHUNK_SIZE, feed)  # as the scan would, before anyone follows
        return first_difference(feed, base)

    assert follow(old) is None  # rewritten with the same bytes: nothing to send
    changed = old[:4 * CHUNK_SIZE] + bytes([old[4 * CHUNK_SIZE] ^ 0xFF]) + old[4 * CHUNK_SIZE + 1:]
    assert list(follow(changed)) == hash_chunks_of(path, changed)[1]  # every chunk, from the first
    cut = old[:6 * CHUNK_SIZE]
    assert list(follow(cut)) == old_chunks[:6]


def test_a_racy_file_is_read_again_but_its_content_is_the_base_of_the_next_delta(tmp_path):
    """The hash cache never trusts a file modified within RACY_SECONDS, yet its hash is the
    file's latest content: what the secondaries got, so the next delta's base."""
    data = tmp_path / "data"
    data.mkdir()
    big = data / "big.idx"
    big.write_bytes(os.urandom(DELTA_MIN))   # just written: racy
    feeds = []
    cache_file = tmp_path / "hashcache.json"
    first = scan(data, HashCache(cache_file, (DELTA_MIN, CHUNK_SIZE), feeds.append)).manifest
    big.write_bytes(os.urandom(DELTA_MIN))   # changed again, as racy
    second = scan(data, HashCache(cache_file, (DELTA_MIN, CHUNK_SIZE), feeds.append)).manifest
    assert feeds[0] is None  # never seen before: no base
    assert feeds[1] is not None and feeds[1].previous_sha == first.files["big.idx"].sha256
    assert second.files["big.idx"].sha256 == hashlib.sha256(big.read_bytes()).hexdigest()


def test_a_file_written_to_while_the_scan_reads_it_is_read_again_never_named_torn(tmp_path):
    """A large file rewritten in place while the scan reads it: the bytes read may mix two
    versions that never existed whole. The scan notices (its stat moved), ends the early
    delta's feed without a hash (nothing read is sent as the file), and reads it again as
    it is now; a file that never holds still is unsafe, and publish refuses the set."""
    data = tmp_path / "data"
    data.mkdir()
    big, small = data / "big.idx", data / "small.idx"
    big.write_bytes(os.urandom(DELTA_MIN))
    small.write_bytes(b"v0")
    cache_file = tmp_path / "hashcache.json"
    scan(data, HashCache(cache_file, (DELTA_MIN, CHUNK_SIZE)))  # known: a changed read gets a feed
    past = time.time() - 600
    for path in (big, small):
        os.utime(path, (past, past))
    big.write_bytes(os.urandom(DELTA_MIN))
    small.write_bytes(b"v1")
    writes = {"count": 0}
    feeds: list = []

    def write_in_place_twice(feed) -> None:  # called just before each file is read
        feeds.append(feed)
        if feed is not None and writes["count"] < 2:  # big.idx (the large one, known before)
            writes["count"] += 1
            with open(big, "r+b") as fh:
                fh.write(os.urandom(64))

    result = scan(data, HashCache(cache_file, (DELTA_MIN, CHUNK_SIZE), write_in_place_twice))
    assert result.unsafe == []
    for path in (big, small):
        entry = result.manifest.files[path.name]
        assert (entry.sha256, entry.size) == (hashlib.sha256(path.read_bytes()).hexdigest(),
                                              path.stat().st_size), path
    big_feeds = [f for f in feeds if f is not None]
    assert len(big_feeds) == 3 and big_feeds[0].sha is None is big_feeds[1].sha  # torn reads: unnamed
    assert big_feeds[2].sha == result.manifest.files["big.idx"].sha256

    def write_in_place_always(feed) -> None:
        with open(small, "r+b") as fh:
            fh.write(os.urandom(2))

    result = scan(data, HashCache(cache_file, (DELTA_MIN, CHUNK_SIZE), write_in_place_always))
    assert [u for u in result.unsafe if u.startswith("small.idx: kept changing")], result.unsafe
    assert "small.idx" not in result.manifest.files


def test_chunk_lists_of_content_gone_from_the_set_go_after_a_day(tmp_path):
    """The lists were capped by count alone (256, newest first): a deleted 4 GiB file's list
    (about 1 MB) stayed while the count allowed, and a list of a live file that rarely
    changes was the one pushed out."""
    from app.core.delta import ChunkIndex

    data, state = tmp_path / "data", tmp_path / "state"
    data.mkdir()
    (data / "live.idx").write_bytes(b"live content")
    live = hashlib.sha256(b"live content").hexdigest()
    gone, fresh = "a" * 64, "b" * 64
    index = ChunkIndex(state)
    for sha in (live, gone, fresh):
        index.save(sha, ["0" * 64])
    two_days_ago = time.time() - 2 * 86400
    for sha in (live, gone):
        os.utime(index.dir / sha, (two_days_ago, two_days_ago))
    stray_tmp = index.dir / f"{gone}.4242.1.tmp"  # a writer killed mid-save, long ago
    stray_tmp.write_text("{")
    os.utime(stray_tmp, (two_days_ago, two_days_ago))
    scan(data, HashCache(state / "hashes.json", chunk_index=index))
    # live content keeps its list however old; one saved just now may be an upload's
    assert sorted(p.name for p in index.dir.iterdir()) == sorted([live, fresh])
