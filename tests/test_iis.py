"""The IIS web.config: what IIS reads, and the exact command HttpPlatformHandler runs."""
from __future__ import annotations

import ntpath
import os
import shlex
import sys

from lxml import etree

from agent.demo import free_port, make_install
from conftest import esmirror, spawn_listening, stop_session


def rendered(tmp_path, **ini: str):
    install = make_install(tmp_path / "install", {"allow_push": "192.0.2.10 2001:db8::/32",
                                                  "trusted_proxies": "127.0.0.1 ::1", **ini})
    out = tmp_path / "iis"
    rc, _, text = esmirror("deploy", "iis", "--install-dir", str(install.root), "--out", str(out),
                           "--venv", r"C:\esmirror\venv")
    assert rc == 0, text
    return install, etree.parse(str(out / "web.config"))


def test_web_config_has_handler_limits_and_ip_security(tmp_path):
    _, doc = rendered(tmp_path)
    web = doc.getroot().find("system.webServer")
    handler = web.find("handlers/add")
    assert handler.get("modules") == "httpPlatformHandler" and handler.get("path") == "*"
    platform = web.find("httpPlatform")
    assert platform.get("processPath") == ntpath.join(r"C:\esmirror\venv", "Scripts", "python.exe")
    assert "%HTTP_PLATFORM_PORT%" in platform.get("arguments")
    assert "--bind 127.0.0.1:%HTTP_PLATFORM_PORT%" in platform.get("arguments")  # loopback only
    hours, minutes, _ = platform.get("requestTimeout").split(":")
    assert int(hours) * 60 + int(minutes) >= 30  # the 2-minute default would cut large pushes
    # 4G asked for; HttpPlatformHandler forwards no body over 2 GiB - 1
    limits = web.find("security/requestFiltering/requestLimits")
    assert limits.get("maxAllowedContentLength") == str(2**31 - 1)
    # WebDAV Publishing, where installed, would answer PUT blobs and DELETE archive itself (405)
    assert web.find("modules/remove").get("name") == "WebDAVModule"
    assert web.find("handlers/remove").get("name") == "WebDAV"
    ip = web.find("security/ipSecurity")
    assert ip.get("allowUnlisted") == "false"
    entries = {(a.get("ipAddress"), a.get("subnetMask"), a.get("allowed")) for a in ip.findall("add")}
    assert entries == {("192.0.2.10", "255.255.255.255", "true"), ("2001:db8::", "32", "true"),
                       ("127.0.0.1", "255.255.255.255", "true"), ("::1", "128", "true")}


def test_smaller_max_upload_bytes_is_the_iis_limit(tmp_path):
    _, doc = rendered(tmp_path, max_upload_bytes="512M")
    limits = doc.getroot().find("system.webServer/security/requestFiltering/requestLimits")
    assert limits.get("maxAllowedContentLength") == str(512 * 1024**2)


def test_the_exact_launch_command_serves_browse(tmp_path):
    install, doc = rendered(tmp_path, express_version="10.1.0")
    platform = doc.getroot().find("system.webServer/httpPlatform")
    port = free_port()
    # what HttpPlatformHandler does: substitute the port, set the environment, start processPath
    argv = [sys.executable, *shlex.split(platform.get("arguments").replace("%HTTP_PLATFORM_PORT%", str(port)))]
    env = {**os.environ, **{e.get("name"): e.get("value")
                            for e in platform.findall("environmentVariables/environmentVariable")},
           "HTTP_PLATFORM_PORT": str(port)}
    assert env["ESMIRROR_INSTALL_DIR"] == str(install.root)
    proc = spawn_listening(argv, port, tmp_path / "waitress.log", env=env, cwd=tmp_path)
    try:
        rc, info, text = esmirror("browse", f"127.0.0.1:{port}", "--json")
        assert rc == 0, text
        assert info["express_version"] == "10.1.0" and info["master"] is None
        # behind HttpPlatformHandler no body over 2 GiB - 1: the master sends larger in parts
        assert info["max_upload_bytes"] == 2**31 - 1
    finally:
        stop_session(proc)
