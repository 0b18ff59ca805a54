"""Issue 4: TLS to secondaries exactly as SPEC §1, against real gunicorn HTTPS receivers.

Certificates are made here: a CA with trustme, and a truly self-signed leaf with
cryptography. The master's ``strict`` trusts its ca-bundle.crt and nothing else.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.demo import make_install, write_sample_set
from conftest import VERSION, esmirror, set_files, tree


def self_signed(folder: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A leaf certificate signed by its own key, valid for ``name``: (certfile, keyfile)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = folder / "self-signed.pem", folder / "self-signed.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def leaf(ca: trustme.CA, folder: Path, *names: str, **kwargs: object) -> tuple[Path, Path]:
    cert = ca.issue_cert(*names, **kwargs)  # type: ignore[arg-type]
    tag = "-".join(names) + ("-expired" if "not_after" in kwargs else "")
    certfile, keyfile = folder / f"{tag}.pem", folder / f"{tag}.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    ca, other_ca = trustme.CA(), trustme.CA()
    bundle, other_bundle = folder / "ca.pem", folder / "other-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    other_ca.cert_pem.write_to_path(str(other_bundle))
    yesterday = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    return {
        "bundle": bundle, "other_bundle": other_bundle,
        "good": leaf(ca, folder, "127.0.0.1", "localhost"),
        "wrong_name": leaf(ca, folder, "es9.example.org"),
        "expired": leaf(ca, folder, "127.0.0.1", not_before=yesterday - dt.timedelta(days=30),
                        not_after=yesterday),
        "self_signed": self_signed(folder),
    }


@pytest.fixture
def https_pair(tmp_path, make_receiver):
    """Start a gunicorn HTTPS secondary with a certificate; a master that mirrors to it."""

    def build(cert: tuple[Path, Path], mode: str, bundle: Path | None):
        secondary = make_install(tmp_path / "secondary",
                                 {"allow_push": "127.0.0.1", "express_version": VERSION})
        receiver = make_receiver(secondary, server="gunicorn",
                                 extra=["--certfile", str(cert[0]), "--keyfile", str(cert[1]),
                                        "--workers", "1"])
        master = make_install(tmp_path / "master", {"express_version": VERSION},
                              [("127.0.0.1", receiver.port, mode)])
        write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
        if bundle is not None:
            (master.etc_dir / "ca-bundle.crt").write_bytes(bundle.read_bytes())
        return master, secondary

    return build


def publish(master, env=None):
    return esmirror("publish", "--install-dir", str(master.root), "--json", env=env)


def test_strict_with_the_ca_in_the_bundle_is_in_sync(https_pair, certs):
    master, secondary = https_pair(certs["good"], "strict", certs["bundle"])
    rc, report, out = publish(master)
    assert rc == 0, out
    assert report["secondaries"][0]["state"] == "in-sync"
    assert set_files(secondary.data_dir) == set_files(master.data_dir)


@pytest.mark.parametrize("cert,why", [
    ("self_signed", "its certificate is self-signed"),
    ("wrong_name", "its certificate is not valid for the name 127.0.0.1"),
    ("expired", "its certificate has expired"),
])
def test_strict_refuses_and_says_why_in_plain_words(https_pair, certs, cert, why):
    master, secondary = https_pair(certs[cert], "strict", certs["bundle"])
    before = tree(secondary.data_dir)
    rc, report, out = publish(master)
    assert rc == 1, out
    result = report["secondaries"][0]
    assert result["state"] != "in-sync"
    assert "TLS to 127.0.0.1:" in result["error"] and why in result["error"], result
    assert result["bytes_sent"] == 0 and result["files_sent"] == 0
    assert tree(secondary.data_dir) == before  # the handshake failed: no request was made


def test_strict_refusal_sends_not_one_byte_of_http(tmp_path, certs):
    """A TLS listener that records what arrives after the handshake: under strict with a
    self-signed certificate the master aborts the handshake, so no request ever arrives."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*map(str, certs["self_signed"]))
    handshakes_failed: list[str] = []
    received: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(1.0)
        port = listener.getsockname()[1]
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                with conn:
                    conn.settimeout(10)
                    try:
                        with server.wrap_socket(conn, server_side=True) as tls:
                            received.append(tls.recv(65536))
                    except (ssl.SSLError, OSError) as exc:
                        handshakes_failed.append(str(exc))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        master = make_install(tmp_path / "master", {"express_version": VERSION},
                              [("127.0.0.1", port, "strict")])
        write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
        (master.etc_dir / "ca-bundle.crt").write_bytes(certs["bundle"].read_bytes())
        try:
            rc, report, out = publish(master)
        finally:
            stop.set()
            thread.join(timeout=15)
    assert rc == 1, out
    assert "self-signed" in report["secondaries"][0]["error"]
    assert handshakes_failed, "the master never tried the handshake"
    assert received == [], received


def test_noverify_accepts_a_self_signed_certificate(https_pair, certs):
    master, secondary = https_pair(certs["self_signed"], "noverify", None)
    rc, report, out = publish(master)
    assert rc == 0, out
    assert set_files(secondary.data_dir) == set_files(master.data_dir)


def test_environment_does_not_change_what_strict_trusts(https_pair, certs, tmp_path):
    # ca-bundle.crt holds another CA; every variable that could point OpenSSL or
    # requests at the right one is set: strict must still refuse
    master, secondary = https_pair(certs["good"], "strict", certs["other_bundle"])
    certdir = tmp_path / "certdir"
    certdir.mkdir()
    (certdir / "ca.pem").write_bytes(certs["bundle"].read_bytes())
    env = {"REQUESTS_CA_BUNDLE": str(certs["bundle"]), "CURL_CA_BUNDLE": str(certs["bundle"]),
           "SSL_CERT_FILE": str(certs["bundle"]), "SSL_CERT_DIR": str(certdir),
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    before = tree(secondary.data_dir)
    rc, report, out = publish(master, env=env)
    assert rc == 1, out
    assert "TLS to 127.0.0.1" in report["secondaries"][0]["error"]
    assert tree(secondary.data_dir) == before
    # and the other way round: the environment cannot take trust away either
    (master.etc_dir / "ca-bundle.crt").write_bytes(certs["bundle"].read_bytes())
    env.update(REQUESTS_CA_BUNDLE=str(certs["other_bundle"]),
               SSL_CERT_FILE=str(certs["other_bundle"]))
    rc, report, out = publish(master, env=env)
    assert rc == 0, out
    assert set_files(secondary.data_dir) == set_files(master.data_dir)


@pytest.mark.parametrize("content", [None, b"", b"not a certificate\n"])
def test_strict_without_a_usable_bundle_is_a_config_error_before_anything_is_sent(tmp_path, content):
    # a listening socket stands in for the secondary: it must see no connection at all
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        master = make_install(tmp_path / "master", {"express_version": VERSION},
                              [("127.0.0.1", port, "strict")])
        write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
        if content is not None:
            (master.etc_dir / "ca-bundle.crt").write_bytes(content)
        rc, report, out = publish(master)
        assert rc == 2, out
        assert "ca-bundle.crt" in out and "strict" in out, out
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()


def test_browse_strict_uses_the_install_bundle(https_pair, certs):
    master, _ = https_pair(certs["good"], "strict", certs["bundle"])
    port = master_port(master)
    rc, info, out = esmirror("browse", f"127.0.0.1:{port}", "--ssl", "strict", "--json",
                             "--install-dir", str(master.root))
    assert rc == 0, out
    assert info["express_version"] == VERSION
    (master.etc_dir / "ca-bundle.crt").write_bytes(certs["other_bundle"].read_bytes())
    rc, _, out = esmirror("browse", f"127.0.0.1:{port}", "--ssl", "strict",
                          "--install-dir", str(master.root))
    assert rc == 1 and "TLS to 127.0.0.1" in out, out


def master_port(master) -> int:
    from app.core.express import read_mirrors

    return read_mirrors(master.etc_dir / "iserv-cfg.xml")[0].port


def test_tls_to_a_plain_http_waitress_port_is_reported_after_one_handshake_timeout(
        tmp_path, make_receiver):
    """waitress never answers a TLS handshake (it waits for a request line): the publish
    names the likely cause after one connect timeout (10 s), not after four (42 s)."""
    import time

    secondary, receiver, master = _noverify_to_plain_http(tmp_path, make_receiver, "waitress")
    before = tree(secondary.data_dir)
    started = time.monotonic()
    rc, report, out = publish(master)
    took = time.monotonic() - started
    assert rc == 1, out
    error = report["secondaries"][0]["error"]
    assert "did not answer in time over TLS" in error and "ssl" in error, error
    assert took < 30, f"took {took:.0f} s: the handshake timeout was retried"
    assert tree(secondary.data_dir) == before


def test_plain_http_to_a_tls_port_says_to_check_ssl(https_pair, certs):
    """gunicorn drops a plain-HTTP request on its TLS port: that used to come out in
    urllib3's words (RemoteDisconnected, Max retries exceeded)."""
    master, _ = https_pair(certs["good"], "strict", certs["bundle"])
    port = master_port(master)
    rc, _, out = esmirror("browse", f"127.0.0.1:{port}", "--ssl", "none", "--install-dir", str(master.root))
    assert rc == 1, out
    assert (f"127.0.0.1:{port} closed the connection without answering; if that port speaks HTTPS, "
            "set its ssl to noverify or strict") in out, out
    assert "Max retries" not in out and "RemoteDisconnected" not in out


def test_tls_to_a_plain_http_gunicorn_port_says_to_set_ssl_to_none(tmp_path, make_receiver):
    _, receiver, master = _noverify_to_plain_http(tmp_path, make_receiver, "gunicorn")
    rc, report, out = publish(master)
    assert rc == 1, out
    error = report["secondaries"][0]["error"]
    assert error == (f"TLS to 127.0.0.1:{receiver.port} failed: it does not speak HTTPS on that port; "
                     "if it serves plain HTTP, set its ssl to none"), error


def _noverify_to_plain_http(tmp_path, make_receiver, server: str):
    """A master whose Mirrors says TLS (noverify) for a receiver that speaks plain HTTP."""
    secondary = make_install(tmp_path / "secondary", {"allow_push": "127.0.0.1",
                                                      "express_version": VERSION})
    receiver = make_receiver(secondary, server=server)
    master = make_install(tmp_path / "master", {"express_version": VERSION},
                          [("127.0.0.1", receiver.port, "noverify")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    return secondary, receiver, master




def test_a_tls_secondary_cut_off_mid_push_is_unreachable_not_a_tls_refusal(tmp_path, make_receiver, certs):
    """Its receiver killed while a body was on its way over TLS: the channel was right (it
    answered the push's first requests), so a cut connection is the server going away, not
    a certificate to fix. It was reported a TLS failure, and counted as a refusal."""
    secondary = make_install(tmp_path / "secondary", {"allow_push": "127.0.0.1", "express_version": VERSION})
    cert, key = certs["good"]
    receiver = make_receiver(secondary, server="gunicorn", env={"ESMIRROR_CRASH_AT": "upload-write:1"},
                             extra=["--certfile", str(cert), "--keyfile", str(key)])
    master = make_install(tmp_path / "master", {"express_version": VERSION},
                          [("127.0.0.1", receiver.port, "strict")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=8)
    (master.etc_dir / "ca-bundle.crt").write_bytes(certs["bundle"].read_bytes())
    rc, report, out = publish(master)
    result = report["secondaries"][0]
    assert rc == 1 and (result["state"], result["reason"]) == ("unreachable", "unreachable"), result
    assert "closed the connection without answering" in result["error"] and "TLS" not in result["error"], result
