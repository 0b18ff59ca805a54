"""Issue 6: the HTML status page, rendered by a real headless Chromium (Debian's package)."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agentproc import http
from conftest import REPO, esmirror, session_from

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium package is not installed (bash .ci/system-packages "
    "installs it as root)")


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", *extra, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_status_page_names_each_secondary_and_its_state_in_chromium(fleet, make_receiver, tmp_path):
    f = fleet(2)
    assert f.publish()[0] == 0
    f.receivers[1].stop()
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 1, out
    master = make_receiver(f.master)
    url = f"{master.url}/"

    page = http().get(url, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<meta name="viewport" content="width=device-width' in page.text
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', page.text)
    assert session_from("127.0.0.2").get(url, timeout=10).status_code == 403  # admin addresses only

    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "status-page.png"
    png.unlink(missing_ok=True)
    shot = chromium(url, tmp_path / "profile-shot", f"--screenshot={png}", "--window-size=412,915",
                    "--hide-scrollbars")
    assert png.is_file(), shot.stderr[-3000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (412, 915)  # the phone-sized window we asked for
    assert len(data) > 10_000  # a rendered page, not a blank one

    dom = chromium(url, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom.stdout))
    cards = re.findall(r'<div class="card ([a-z-]+)" id="secondary-\d+">\s*<h3>([^<]+)</h3>', dom.stdout)
    by_name = {name: state for state, name in cards}
    up, down = (f"127.0.0.1:{r.port}" for r in f.receivers)
    assert by_name == {up: "in-sync", down: "unreachable"}, dom.stdout[:3000]
    assert "in-sync" in text and "unreachable" in text and "connection refused" in text
    assert "command line" in text  # the last publish, and who asked
    flat = " ".join(text.split())
    assert re.search(r"free there [\d.]+ [KMG]iB", flat) and "last in sync 20" in flat, flat
    # no agent refreshes it: the page says its states are the last look's, not now's
    assert "1 of 2 secondaries not in sync" in " ".join(text.split()), text
    assert "no esmirror agent runs, so these states are as the last look left them" in text, text
