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


def _web_config_findings(install, *extra: str) -> tuple[int, list[dict], str]:
    rc, report, text = esmirror("check", "--install-dir", str(install.root), "--json", *extra)
    assert report is not None, text
    return rc, [f for f in report["findings"] if f["topic"] == "web-config"], text


def test_check_compares_the_web_config_with_the_allow_lists_until_it_is_rendered_again(tmp_path):
    """IIS filters on web.config's ipSecurity before the receiver sees a request: an
    allow_push changed without rendering it again had IIS refuse the new master with its own
    403.6, while check said nothing of IIS."""
    install = make_install(tmp_path / "install", {"allow_push": "192.0.2.10", "trusted_proxies": "127.0.0.1 ::1"})
    render = ("deploy", "iis", "--install-dir", str(install.root), "--venv", r"C:\esmirror\venv")
    assert esmirror(*render)[0] == 0  # (into ImageServer/etc/iis/esmirror, where check looks)
    web_config = install.etc_dir / "iis" / "esmirror" / "web.config"
    _, found, text = _web_config_findings(install)
    assert [f["level"] for f in found] == ["ok"], text

    ini = install.etc_dir / "esmirror.ini"
    ini.write_text(ini.read_text().replace("allow_push = 192.0.2.10", "allow_push = 192.0.2.20 2001:db8::/64"))
    rc, found, text = _web_config_findings(install)
    [bad] = found
    assert rc == 1 and bad["level"] == "error" and bad["file"] == str(web_config), text
    assert "IIS refuses 192.0.2.20 2001:db8::/64 (403.6)" in bad["message"], bad
    assert "IIS lets in 192.0.2.10, which allow_push and allow_admin do not list" in bad["message"], bad
    assert "esmirror deploy iis" in bad["fix"] and "recycle" in bad["fix"], bad
    assert esmirror(*render)[0] == 0
    assert [f["level"] for f in _web_config_findings(install)[1]] == ["ok"]

    # the application's own copy, edited by hand: a smaller body limit, unlisted admitted
    copy = tmp_path / "site" / "web.config"
    copy.parent.mkdir()
    copy.write_text(web_config.read_text().replace('allowUnlisted="false"', 'allowUnlisted="true"')
                    .replace(f'maxAllowedContentLength="{2**31 - 1}"', 'maxAllowedContentLength="30000000"'))
    rc, found, text = _web_config_findings(install, "--web-config", str(copy))
    unlisted, limit = (f["message"] for f in found)
    assert rc == 1 and len(found) == 2 and all(f["file"] == str(copy) for f in found), text
    assert "admits addresses it does not list (allowUnlisted is not false)" in unlisted, unlisted
    assert f"maxAllowedContentLength is 30000000 bytes, but the receiver tells masters it takes {2**31 - 1}" \
        in limit and "(404.13)" in limit, limit
    # IIS's other spellings of the same: a namespace, a <location path=".">, a <clear/> first
    text = web_config.read_text()
    copy.write_text(text.replace("<configuration>", '<configuration xmlns="urn:x"><location path=".">')
                    .replace("</configuration>", "</location></configuration>")
                    .replace('denyAction="Forbidden">', 'denyAction="Forbidden"><clear/>'))
    assert [f["level"] for f in _web_config_findings(install, "--web-config", str(copy))[1]] == ["ok"]
    copy.write_text(text.replace('denyAction="Forbidden">', 'denyAction="Forbidden"><add ipAddress="192.0.2.66"/>'))
    [denial] = _web_config_findings(install, "--web-config", str(copy))[1]  # (allowed: false unless set)
    assert denial["level"] == "warning" and "not compared" in denial["message"], denial
    # no ipSecurity at all: said, and the body limit still compared
    start, end = text.index("<ipSecurity"), text.index("</ipSecurity>") + len("</ipSecurity>")
    copy.write_text((text[:start] + text[end:]).replace(f'"{2**31 - 1}"', '"100"'))
    found = _web_config_findings(install, "--web-config", str(copy))[1]
    assert [f["level"] for f in found] == ["warning", "error"] and "(404.13)" in found[1]["message"], found
    copy.write_text("<configuration><system.webServer>")
    [broken] = _web_config_findings(install, "--web-config", str(copy))[1]
    assert "cannot be read as XML" in broken["message"], broken
    rc, _, text = esmirror("check", "--install-dir", str(install.root), "--web-config", str(tmp_path / "nope"))
    assert rc == 2 and "--web-config" in text and "no such file" in text
