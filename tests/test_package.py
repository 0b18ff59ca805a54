"""esmirror as pip installs it from a checkout (a wheel, not this editable tree): the
deploy templates and the status page template come along, so `deploy` works."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from agent.demo import make_install
from conftest import REPO


def run(*argv: str) -> str:
    # from / : a `python -c` in the checkout would import the checkout's packages
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_an_installed_esmirror_renders_its_deploy_files(tmp_path):
    # the source files only, as a clean clone or a release holds them (not this venv or build)
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "test-artifacts", ".pytest_cache",
        ".hypothesis"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", str(tmp_path / "dist"), str(source))
    [wheel] = (tmp_path / "dist").glob("esmirror-*.whl")
    env = tmp_path / "env"
    run(sys.executable, "-m", "venv", "--without-pip", str(env))
    python = env / "bin" / "python"
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # its dependencies from this venv; esmirror itself only from the wheel
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
        str(wheel))
    where = run(str(python), "-c", "import agent, app; print(agent.__file__, app.__file__)")
    assert str(REPO) not in where and str(site) in where, where

    install = make_install(tmp_path / "install", {"allow_push": "192.0.2.10"})
    out = tmp_path / "rendered"
    for target in ("apache", "iis"):
        text = run(str(env / "bin" / "esmirror"), "deploy", target, "--install-dir", str(install.root),
                   "--out", str(out / target), *(["--httpd-conf", ""] if target == "apache" else []))
        assert f"where each file goes: {env}/share/esmirror/deploy/{target}/README.md" in text, text
        assert (env / "share" / "esmirror" / "deploy" / target / "README.md").is_file()
    assert sorted(os.listdir(out / "apache")) == ["esmirror-agent.service", "esmirror-proxy.conf",
                                                  "esmirror-receiver.service", "esmirror-wsgi.conf",
                                                  "esmirror.wsgi"]
    assert "Require ip 192.0.2.10" in (out / "apache" / "esmirror-wsgi.conf").read_text()
    assert os.listdir(out / "iis") == ["web.config"]
    # the status page's template is package data too
    page = run(str(python), "-c", "import app, pathlib; print(pathlib.Path(app.__file__).parent / "
               "'templates' / 'status.html')").strip()
    assert Path(page).is_file()
