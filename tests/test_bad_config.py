"""Bad configuration and damaged records: one line naming the file or setting and what to do,
exit 2 for configuration (1 for a failed operation), never a traceback (SPEC §4)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from agent.demo import make_install
from conftest import esmirror

MIRRORS = [("127.0.0.1", 1, "none")]


def install_with(tmp_path: Path, ini: dict[str, str] | None = None, host: str = "127.0.0.1",
                 port: str = "1"):
    install = make_install(tmp_path / "install", ini or {}, MIRRORS)
    cfg = install.etc_dir / "iserv-cfg.xml"
    cfg.write_text(cfg.read_text().replace('host="127.0.0.1" port="1"', f'host="{host}" port="{port}"'))
    return install


def one_line_error(rc: int, out: str, code: int, *words: str) -> None:
    assert rc == code, out
    assert "Traceback" not in out, out
    assert out.startswith("esmirror: "), out
    assert all(w in out for w in words), (words, out)


@pytest.mark.parametrize("host,port,words", [
    ("127.0.0.1", "\u00b2", ["port="]),                    # isdigit() says yes, int() says no
    ("127.0.0.1", "\u0661\u0662", ["port="]),              # Arabic-Indic 12: not a port either
    ("127.0.0.1", "9" * 5000, ["port="]),
    ("a..b", "80", ["host=", "neither an IP address nor a host name"]),
    ("a" * 64 + ".example", "80", ["host="]),
    ("http://127.0.0.1", "80", ["host="]),
])
def test_a_mirrors_entry_that_is_not_a_host_and_port_is_a_configuration_error(tmp_path, host, port, words):
    install = install_with(tmp_path, host=host, port=port)
    rc, _, out = esmirror("publish", "--dry-run", "--install-dir", str(install.root))
    one_line_error(rc, out, 2, "iserv-cfg.xml:", *words)


def test_a_wrong_element_in_namespaced_mirrors_is_named_as_written(tmp_path):
    """Under <ImageServer xmlns="…"> no <Mirrors> was found at all, so a typo in it was
    never named: publish said this server is not a master."""
    install = install_with(tmp_path)
    cfg = install.etc_dir / "iserv-cfg.xml"
    namespaced = '<ImageServer xmlns="http://www.lizardtech.com/iserv">'
    cfg.write_text(cfg.read_text().replace("<ImageServer>", namespaced).replace("<Secondary ", "<Secondry "))
    rc, _, out = esmirror("publish", "--dry-run", "--install-dir", str(install.root))
    one_line_error(rc, out, 2, "iserv-cfg.xml:5: <Secondry> inside <Mirrors>; only <Secondary> belongs there")


@pytest.mark.parametrize("key,value,words", [
    ("reload_command", '"unbalanced', ["reload_command", "No closing quotation"]),
    ("reload_timeout", "inf", ["reload_timeout"]),
    ("retry_max", "nan", ["retry_max"]),
    ("check_interval", "1e300", ["check_interval"]),
    ("allow_admin", "127.0.0.3/24", ["write 127.0.0.0/24 for the whole network, or 127.0.0.3"]),
    ("allow_push", "10.0.0.1/0", ["allow_push", "bits set after the prefix"]),  # not: everyone
])
def test_a_setting_that_cannot_work_is_refused_when_read(tmp_path, key, value, words):
    install = install_with(tmp_path, {key: value})
    rc, _, out = esmirror("archive", "list", "--install-dir", str(install.root))
    one_line_error(rc, out, 2, "esmirror.ini", *words)


@pytest.mark.parametrize("secret,words", [
    ("/dev/zero", ["not a regular file"]),
    ("~no-such-user-here/secret", ["shared_secret_file"]),
])
def test_a_secret_file_that_is_no_file_is_a_configuration_error(tmp_path, secret, words):
    install = install_with(tmp_path, {"shared_secret_file": secret})
    rc, _, out = esmirror("publish", "--dry-run", "--install-dir", str(install.root), timeout=30)
    one_line_error(rc, out, 2, *words)


def test_an_install_dir_in_a_symlink_loop_is_a_configuration_error(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    rc, _, out = esmirror("archive", "list", "--install-dir", str(tmp_path / "a"))
    one_line_error(rc, out, 2, "install dir")


@pytest.mark.parametrize("argv,words", [
    (["browse", "127.0.0.1:\u00b2"], ["HOST[:PORT]"]),
    (["serve", "--bind", "[:::1]:18080"], ["--bind"]),
    (["deploy", "apache", "--backend", "localhost:8081"], ["--backend"]),
    (["deploy", "apache", "--backend", "::1:8081"], ["--backend"]),
])
def test_a_command_line_address_that_is_not_one_is_a_usage_error(tmp_path, argv, words):
    install = install_with(tmp_path)
    rc, _, out = esmirror(*argv, "--install-dir", str(install.root), timeout=30)
    one_line_error(rc, out, 2, *words)


def _archive_entry(install, name: str, record: str | None) -> Path:
    entry = install.data_dir / "archive" / name
    (entry / "files").mkdir(parents=True)
    (entry / "files" / "old.idx").write_bytes(b"replaced once")
    if record is not None:
        (entry / "archive.json").write_text(record)
    return entry


def test_archive_clear_removes_the_entry_folder_never_what_its_record_names(tmp_path):
    install = install_with(tmp_path)
    keep = install.root / "ImageServer" / "etc"
    record = json.dumps({"id": "../../../etc", "created": "2026-01-01T00:00:00+00:00", "files": []})
    entry = _archive_entry(install, "20260101T000000.000000Z-g1-abcdef", record)
    rc, _, out = esmirror("archive", "clear", "--all", "--install-dir", str(install.root))
    assert rc == 0, out
    assert not entry.exists() and keep.is_dir() and (keep / "iserv-cfg.xml").is_file()


def test_a_damaged_archive_record_is_listed_and_can_be_cleared(tmp_path):
    install = install_with(tmp_path)
    entry = _archive_entry(install, "20260101T000000.000000Z-g1-abcdef", '{"id": "half-writ')
    rc, listing, out = esmirror("archive", "list", "--json", "--install-dir", str(install.root))
    assert rc == 0 and "Traceback" not in out, out
    assert [e["id"] for e in listing["archive"]] == [entry.name] and listing["archive"][0]["damaged"]
    rc, _, out = esmirror("archive", "clear", "--older-than", "1", "--install-dir", str(install.root))
    assert rc == 0 and not entry.exists(), out


def test_a_damaged_record_is_named_with_what_to_do(tmp_path):
    install = install_with(tmp_path)
    ledger = install.data_dir / ".esmirror" / "ledger.json"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_bytes(b"\xff\xfe not json")
    rc, _, out = esmirror("status", "--install-dir", str(install.root), timeout=60)
    one_line_error(rc, out, 1, str(ledger), "damaged", "move it aside")


@pytest.mark.parametrize("ini_text,words", [
    ("[esmirror]\narchive_keep\n", ["esmirror.ini:2", "'archive_keep' is not 'key = value'"]),
    ("[DEFAULT]\narchive_keep = x\n", ["[DEFAULT]", "[esmirror]"]),
    ("[esmirror]\nprefix = /lizardtech/../mirror\n", ["prefix"]),
])
def test_an_ini_file_written_wrong_is_named_by_line(tmp_path, ini_text, words):
    install = install_with(tmp_path)
    (install.etc_dir / "esmirror.ini").write_text(ini_text)
    rc, _, out = esmirror("archive", "list", "--install-dir", str(install.root))
    one_line_error(rc, out, 2, *words)


NOTEPAD_INI = "[esmirror]\r\n; the masters' network (café)\r\nallow_push = 10.1.2.0/24\r\n"


@pytest.mark.parametrize("saved", [
    b"\xff\xfe" + NOTEPAD_INI.encode("utf-16-le"),  # Notepad's "Unicode"
    b"\xfe\xff" + NOTEPAD_INI.encode("utf-16-be"),  # "Unicode big endian"
    NOTEPAD_INI.replace("\r\n", "\r").encode("utf-8"),  # old Mac line ends
], ids=["utf-16-le", "utf-16-be", "cr"])
def test_an_ini_saved_by_a_windows_editor_is_read(tmp_path, saved):
    """Saved as UTF-16 with a byte-order mark, esmirror.ini was refused with "'utf-8' codec
    can't decode byte 0xff in position 0"."""
    install = install_with(tmp_path)
    (install.etc_dir / "esmirror.ini").write_bytes(saved)
    out_dir = tmp_path / "out"
    rc, _, out = esmirror("deploy", "apache", "--httpd-conf", "", "--out", str(out_dir),
                          "--install-dir", str(install.root))
    assert rc == 0, out
    assert "Require ip 10.1.2.0/24" in (out_dir / "esmirror-wsgi.conf").read_text()


@pytest.mark.parametrize("saved,words", [
    # Latin-1 (or cp1252) é in a comment: the line to fix, not a byte offset
    (b"[esmirror]\narchive_keep = 3\n; caf\xe9 au lait\n",
     ["esmirror.ini:3: not UTF-8 (byte 0xe9); save the file as UTF-8"]),
    # a NUL after a value (a bad copy): said plainly, not as a strange address
    (b"[esmirror]\nallow_admin = ::1\x00\n",
     ["esmirror.ini:2: holds a NUL character (binary junk"]),
    (b"\x00" * 512, ["esmirror.ini:1: holds a NUL character"]),  # zeroed by a crash
    ("[esmirror]\narchive_keep = 3\n".encode("utf-16-le"),
     ["esmirror.ini: holds NUL characters between all its letters", "UTF-16 saved without a "
      "byte-order mark; save the file as UTF-8"]),
    # UTF-16 is read as such: its lines are counted as the editor shows them
    (b"\xff\xfe" + "[esmirror]\r\n; é\r\nallow_admin = 127.0.0.3/24\r\n".encode("utf-16-le"),
     ["esmirror.ini:3: bad value for allow_admin"]),
    (b"\xff\xfe" + "[esmirror]\r\narchive_keep = 3\r\n".encode("utf-16-le") + b"\x0a",
     ["esmirror.ini:3: not UTF-16 (byte 0x0a); save the file as UTF-8"]),
], ids=["latin-1", "nul", "zeroed", "utf-16-no-bom", "utf-16-bad-value", "utf-16-odd-byte"])
def test_an_ini_in_another_encoding_or_with_junk_is_named_by_line(tmp_path, saved, words):
    install = install_with(tmp_path)
    (install.etc_dir / "esmirror.ini").write_bytes(saved)
    rc, _, out = esmirror("archive", "list", "--install-dir", str(install.root))
    one_line_error(rc, out, 2, *words)
    assert "position" not in out and "\\x00" not in out, out


def test_a_utf16_ini_is_read_again_by_the_agent_and_watched_by_the_receiver(tmp_path, caplog):
    """The agent reads esmirror.ini again when it changes, a receiver warns that it changed:
    both kept saying the UTF-16 file 'cannot be used' / would not start on it at all."""
    import logging

    from agent.daemon import Agent
    from app import create_app
    from app.core.settings import load_settings

    install = install_with(tmp_path, {"allow_push": "127.0.0.1", "express_version": "9.5"})
    ini = install.etc_dir / "esmirror.ini"
    ini.write_bytes(ini.read_text().encode("utf-16"))
    client = create_app(load_settings(install.root)).test_client()

    def stale() -> bool:
        answer = client.get("/browse", environ_base={"REMOTE_ADDR": "127.0.0.1"})
        assert answer.status_code == 200, answer.text
        return any("changed since this receiver started" in w for w in answer.json["warnings"])
    assert not stale()
    os.utime(ini)  # touched, not changed
    assert not stale()
    agent = Agent(load_settings(install.root))
    ini.write_bytes((ini.read_text(encoding="utf-16") + "exclude = overviews/**\n").encode("utf-16"))
    assert stale()
    with caplog.at_level(logging.INFO, logger="esmirror.agent"):
        agent.reread_settings()
    assert "esmirror.ini changed: settings read again" in caplog.text, caplog.text
    assert agent.settings.exclude == ("overviews/**",)


def test_a_reload_command_that_is_a_folder_is_named(tmp_path):
    from app.core.apply import run_reload
    from app.core.settings import load_settings

    install = install_with(tmp_path, {"reload_command": str(tmp_path)})
    ok, output = run_reload(load_settings(install.root))
    assert not ok and "reload_command" in output and "cannot be run" in output, output
    # where it is set, so the admin on the master finds it
    assert f"({install.etc_dir / 'esmirror.ini'}:" in output, output


@pytest.mark.parametrize("server", ["waitress", "gunicorn"])
def test_serve_on_a_port_in_use_or_a_name_that_does_not_resolve_says_so(tmp_path, server):
    """gunicorn used to retry for 5 s printing its own errors, and waitress called a name it
    cannot resolve an esmirror bug."""
    import socket

    install = install_with(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, out = esmirror("serve", "--server", server, "--bind", f"127.0.0.1:{port}", "--install-dir",
                              str(install.root), timeout=30)
    one_line_error(rc, out, 1, f"cannot listen on 127.0.0.1:{port}")
    rc, _, out = esmirror("serve", "--server", server, "--bind", "no-such-host.invalid:8080",
                          "--install-dir", str(install.root), timeout=30)
    one_line_error(rc, out, 1, "cannot listen on no-such-host.invalid:8080")


@pytest.mark.parametrize("make,words", [
    (lambda p: None, ["catalogs.xml does not exist", "nothing was sent"]),
    (lambda p: p.mkdir(), ["catalogs.xml is not a file", "nothing was sent"]),
])
def test_a_master_without_a_catalogs_file_says_which_and_sends_nothing(tmp_path, make, words):
    install = install_with(tmp_path)
    make(install.data_dir / "catalogs.xml")
    rc, _, out = esmirror("publish", "--install-dir", str(install.root))
    one_line_error(rc, out, 1, str(install.data_dir / "catalogs.xml"), *words)


def test_serve_refuses_a_certificate_it_cannot_use_before_listening(tmp_path):
    import trustme

    install = install_with(tmp_path)
    ca = trustme.CA()
    one, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    cert, key, garbage = tmp_path / "cert.pem", tmp_path / "other.key", tmp_path / "garbage.pem"
    one.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))  # a key, but not this certificate's
    garbage.write_text("not a certificate\n")
    for certfile, keyfile in ((garbage, key), (cert, key), (cert, garbage)):
        rc, _, out = esmirror("serve", "--server", "gunicorn", "--bind", "127.0.0.1:1",
                              "--certfile", str(certfile), "--keyfile", str(keyfile),
                              "--install-dir", str(install.root), timeout=30)
        one_line_error(rc, out, 2, f"--certfile {certfile} with --keyfile {keyfile} cannot serve TLS")


@pytest.mark.parametrize("doc", ["README.md", "deploy/apache/README.md"])
def test_the_ini_the_docs_show_loads_comments_and_all(tmp_path, doc):
    import re

    from app.core.settings import load_settings
    from conftest import REPO

    blocks = re.findall(r"```ini\n(.*?)```", (REPO / doc).read_text(), re.S)
    assert blocks, f"{doc} shows no esmirror.ini"
    install = install_with(tmp_path)
    for block in blocks:
        text = block if block.lstrip().startswith("[esmirror]") else "[esmirror]\n" + block
        (install.etc_dir / "esmirror.ini").write_text(text)
        settings = load_settings(install.root)
        for line in text.splitlines()[1:]:  # every key the doc sets is taken, without its comment
            key = line.split("=")[0].strip()
            if key:
                assert getattr(settings, key), (doc, line)
                assert ";" not in repr(getattr(settings, key)), (doc, line)


def test_root_runs_as_the_account_that_owns_the_working_dir(tmp_path, open_tmp):
    """Run as root (cron running status, a publish with sudo), a command left root's files
    in .esmirror/, which then stopped the agent and the receiver running as LT_IS_USER with
    'Permission denied'. It now runs as that account, as sudo -u would; serve, which may
    bind a port only root can, says so instead."""
    import pwd
    import subprocess

    from agent.demo import Receiver, free_port

    if os.geteuid() != 0:
        pytest.skip("needs root")
    install = install_with(open_tmp)
    rc, _, out = esmirror("archive", "clear", "--all", "--install-dir", str(install.root))
    assert rc == 0 and "warning" not in out, out  # root's own data: nothing to say
    owner = pwd.getpwnam("nobody")
    subprocess.run(["chown", "-R", "nobody:", str(install.data_dir)], check=True)
    (install.data_dir / ".esmirror" / "ledger.json").write_text("{}")  # root's, from before
    rc, _, out = esmirror("archive", "clear", "--all", "--install-dir", str(install.root))
    assert rc == 0 and "warning" not in out, out
    made = [p for p in (install.data_dir / ".esmirror").rglob("*") if p.stat().st_uid != owner.pw_uid]
    assert made == [], made
    assert (install.data_dir / ".esmirror" / "audit.log").stat().st_mtime > time.time() - 60
    log = tmp_path / "serve.log"
    receiver = Receiver(install, free_port(), log=log).start()
    receiver.stop()
    assert "warning: running as root" in log.read_text() and "sudo -u nobody esmirror" in log.read_text()


@pytest.mark.parametrize("umask", ["0277", "0777"])
def test_a_umask_that_denies_the_owner_leaves_nothing_esmirror_cannot_use_later(open_tmp, make_receiver,
                                                                                  umask, as_nobody):
    """A unit's UMask= typo made .esmirror/ and its records unusable for good, even for
    later commands under a sane umask; esmirror keeps its owner's rights. Run as an
    account that permissions bind (root's do not)."""
    import shlex
    import subprocess
    import sys

    from agent.demo import write_sample_set
    from conftest import REPO, VERSION, set_files

    base = open_tmp
    secondary = make_install(base / "secondary", {"allow_push": "127.0.0.1", "express_version": VERSION})
    receiver = make_receiver(secondary)
    master = make_install(base / "master", {"express_version": VERSION},
                          [("127.0.0.1", receiver.port, "none")])
    write_sample_set(master.data_dir, base / "images", big_mb=1)
    subprocess.run(["chown", "-R", "nobody:", str(master.root)], check=True)

    def publish(umask: str) -> subprocess.CompletedProcess:
        line = f"umask {umask}; exec {shlex.quote(sys.executable)} -m agent publish --install-dir " \
               f"{shlex.quote(str(master.root))}"
        return subprocess.run([*as_nobody, "sh", "-c", line], capture_output=True, text=True, cwd=REPO,
                              timeout=120)

    done = publish(umask)
    assert done.returncode == 0, done.stdout + done.stderr
    catalogs = master.data_dir / "catalogs.xml"
    catalogs.write_text(catalogs.read_text() + "<!-- again -->\n", encoding="utf-8")
    done = publish("0022")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set_files(secondary.data_dir) == set_files(master.data_dir)


def test_browse_json_says_its_failure_as_json():
    """browse --json printed nothing on stdout when the server could not be reached: a
    check parsing it got no document (status --json and publish --json give one)."""
    from agent.demo import free_port

    port = free_port()
    rc, data, out = esmirror("browse", f"127.0.0.1:{port}", "--json")
    assert rc == 1, out
    assert data is not None and data["ok"] is False and "connection refused" in data["error"], out


def test_install_dir_on_the_command_line_beats_the_environment(tmp_path):
    """Settings precedence: the command line, then ESMIRROR_INSTALL_DIR (a service's
    Environment= left in a shell, say, must not redirect a command told where to work)."""
    install = install_with(tmp_path)
    elsewhere = tmp_path / "not-an-install"
    elsewhere.mkdir()
    env = {"ESMIRROR_INSTALL_DIR": str(elsewhere)}
    rc, data, out = esmirror("archive", "list", "--json", "--install-dir", str(install.root), env=env)
    assert rc == 0 and data == {"archive": []}, out
    rc, _, out = esmirror("archive", "list", env=env)  # and without it, the environment's
    one_line_error(rc, out, 2, str(elsewhere))


@pytest.mark.parametrize("record,words", [
    ("[1, 2]", "a JSON list where a dict belongs"),
    ('{"generation": "7"}', "generation is '7', not a generation number"),
])
def test_a_master_record_of_the_wrong_shape_is_named_damaged(tmp_path, record, words):
    """It used to be 'unexpected AttributeError …; this is an esmirror bug'."""
    install = install_with(tmp_path)
    state = install.data_dir / ".esmirror"
    state.mkdir(exist_ok=True)
    (state / "master.json").write_text(record)
    (install.data_dir / "catalogs.xml").write_text(
        '<CatalogConfig><Catalog name="a"><Path>/x</Path></Catalog></CatalogConfig>')
    rc, _, out = esmirror("publish", "--dry-run", "--install-dir", str(install.root))
    assert rc != 0 and "esmirror bug" not in out and "Traceback" not in out, out
    assert f"{state / 'master.json'} is damaged ({words}); it is esmirror's own record" in out, out


def test_a_port_that_does_not_speak_http_is_named_so(tmp_path):
    """An SSH daemon (or any other service) on a secondary's port used to show urllib3's
    internals: '_HTTPPool(host=…): Max retries exceeded … BadStatusLine('SSH-2.0-…')'."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    stop = threading.Event()

    def banner() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\n")

    thread = threading.Thread(target=banner, daemon=True)
    thread.start()
    try:
        install = install_with(tmp_path, port=str(port))
        (install.data_dir / "catalogs.xml").write_text(
            '<CatalogConfig><Catalog name="a"><Path>/x</Path></Catalog></CatalogConfig>')
        rc, report, out = esmirror("publish", "--install-dir", str(install.root), "--json")
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert rc == 1 and report is not None, out
    error = report["secondaries"][0]["error"]
    assert error == (f"127.0.0.1:{port} answered with something that is not HTTP ('SSH-2.0-OpenSSH_9.0'); "
                     "another service listens on that port: check the port in its <Secondary>"), error


def test_a_receiver_warns_when_its_changed_settings_no_longer_load(tmp_path):
    """Its warning said 'restart it to use the change' while the file it would restart with
    had a typo: restarted, it answers every request with 503."""
    from app import create_app
    from app.core.settings import load_settings

    install = install_with(tmp_path, {"allow_push": "127.0.0.1", "express_version": "9.5"})
    client = create_app(load_settings(install.root)).test_client()
    ini = install.etc_dir / "esmirror.ini"

    def warning() -> str:
        answer = client.get("/browse", environ_base={"REMOTE_ADDR": "127.0.0.1"})
        assert answer.status_code == 200, answer.text
        return next(w for w in answer.json["warnings"] if "changed since this receiver started" in w)
    ini.write_text(ini.read_text() + "archive_keep = 5\n")
    assert warning().endswith(": restart it to use the change (apachectl graceful, systemctl restart "
                              "esmirror-receiver, or recycle the IIS site)")
    ini.write_text(ini.read_text() + "bogus_key = 1\n")
    said = warning()
    assert "and it no longer loads: " in said and "bogus_key" in said and "restart it to use" not in said
    assert said.endswith("Fix that before restarting it"), said


@pytest.mark.parametrize("value", ["1K", "0", "1048575"])
def test_a_max_upload_bytes_too_small_to_push_through_is_refused_where_it_is_set(tmp_path, value):
    """Below 1 MiB no part of a large file fits: the master blamed an esmirror version
    mismatch ('is … an esmirror receiver of this version?') instead."""
    install = install_with(tmp_path, {"max_upload_bytes": value})
    rc, _, out = esmirror("serve", "--install-dir", str(install.root), "--bind", "127.0.0.1:0", timeout=30)
    one_line_error(rc, out, 2, "max_upload_bytes", "is below 1M")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_permission_denied_on_another_accounts_files_names_the_account(tmp_path):
    """'…/.esmirror/publish.lock: Permission denied' said nothing of whom to run as."""
    import errno

    from agent.cli import _as_owner

    state = tmp_path / "data" / ".esmirror"
    state.mkdir(parents=True)
    os.chown(state, 65534, 65534)
    import pwd

    nobody = pwd.getpwuid(65534).pw_name
    lock = state / "publish.lock"
    said = _as_owner(PermissionError(errno.EACCES, "Permission denied", str(lock)))
    assert said == (f"; {state} belongs to {nobody}: run esmirror as that account (runuser -u {nobody} "
                    f"-- esmirror …, or sudo -u {nobody} with --install-dir)"), said
    os.chown(state, 0, 0)  # our own: nothing to add
    assert _as_owner(PermissionError(errno.EACCES, "Permission denied", str(lock))) == ""
    assert _as_owner(FileNotFoundError(errno.ENOENT, "No such file", str(lock))) == ""


@pytest.mark.parametrize("make,words", [
    (lambda d: d.symlink_to("/nonexistent/data"), "is a symbolic link to /nonexistent/data, which does not exist"),
    (lambda d: d.write_text("x"), "is a file, not a folder"),
])
def test_a_working_dir_that_is_a_dangling_link_or_a_file_is_named(tmp_path, make, words):
    """They read 'var/data: File exists' and '.esmirror/self-id: Not a directory' (exit 1)."""
    install = install_with(tmp_path)
    shutil.rmtree(install.data_dir)
    make(install.data_dir)
    for command in (("publish",), ("archive", "list"), ("serve", "--bind", "127.0.0.1:0")):
        rc, _, out = esmirror(*command, "--install-dir", str(install.root), timeout=30)
        one_line_error(rc, out, 2, f"{install.data_dir} {words}")
    # check reports it as the working dir's, not as esmirror.ini's to correct
    rc, report, out = esmirror("check", "--install-dir", str(install.root), "--json", timeout=60)
    [found] = [f for f in report["findings"] if words in f["message"]]
    assert rc == 1 and found["topic"] == "working-dir" and "esmirror.ini" not in (found["fix"] or ""), found
