"""``esmirror``: thin click commands over the core and the agent.

One place maps errors to exit codes: 0 success, 1 the operation failed,
2 usage or configuration error (SPEC §4).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import gc
import io
import json
import math
import os
import sys
from typing import Any, Callable, Iterator

import click

from app.core.errors import ConfigError, MirrorError, one_line
from app.core.settings import DEFAULT_MAX_PARALLEL, Settings, load_settings

from .signals import stop_signals_interrupt

# seconds `status` waits for the secondaries' answers: a monitoring check must not wait out
# each browse's own limit (60 s) for a host that drops packets or a receiver that hangs
STATUS_TIMEOUT = 20.0


def fail(message: str, code: int) -> None:
    click.echo(f"esmirror: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any] | None = None, *, interrupted: str = "") -> Any:
    """A command's failures as one line and an exit code; ``interrupted``, what Ctrl-C adds."""
    if fn is None:
        return functools.partial(handle_errors, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def failed(message: str, code: int, reasons: list[str] | None = None) -> None:
            if kwargs.get("as_json"):  # --json promises one document on stdout, failures too
                click.echo(json.dumps({"ok": False, "error": message, "reasons": reasons or []}, indent=2))
            fail("\n  ".join([message, *(reasons or [])]), code)

        try:
            return fn(*args, **kwargs)
        except MirrorError as exc:
            failed(exc.message, exc.exit_code, list(getattr(exc, "reasons", None) or []))
        except OSError as exc:
            full = "; free some space on this machine, then run the command again" \
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) else _as_owner(exc)
            failed((f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc.strerror or exc))
                   + full, 1)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors and the like: click reports them (exit 2)
        except KeyboardInterrupt:
            # now, without waiting for threads still talking to a secondary (an exit would
            # join them); the kernel drops the publish lock with the process
            if kwargs.get("as_json"):  # (a stopped job's caller still gets its one document)
                click.echo(json.dumps({"ok": False, "error": f"interrupted{interrupted}", "reasons": []},
                                      indent=2))
            click.echo(f"esmirror: interrupted{interrupted}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except Exception as exc:  # a bug: one line for the operator; the traceback on request
            if os.environ.get("ESMIRROR_TRACEBACK"):
                raise
            failed(f"unexpected {exc.__class__.__name__}: {one_line(exc)}; this is an esmirror bug, "
                   "please report it (ESMIRROR_TRACEBACK=1 shows where)", 1)
    return wrapper


@contextlib.contextmanager
def start_up() -> Iterator[None]:
    """Around a command's imports: what they make lives as long as the process.

    requests, lxml, click and the core make ~100k objects (modules, classes, functions)
    that the cyclic collector would walk again and again: while they are made, in every
    later full collection, and at exit. On a 2-core VM that was 60-90 ms of a 0.4 s no-op
    publish. The collector is off while they are made; gc.freeze() then keeps them out of
    its sight for good (the use its documentation names). Nothing is lost: they were never
    garbage.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


class _Output(io.BufferedIOBase):
    """stdout's bytes, whose failure ends the output, not the command: a reader gone
    (``| head``, ``| true``) or a full disk after a publish ran must not report the
    publish failed.

    The first error is kept and fd 1 becomes /dev/null (so no flush at exit fails again);
    run() then says what happened, and the exit code stays the command's. It sits under
    the text layer, so a text wrapper click makes itself (over an ASCII stdout) writes
    through it too.
    """

    def __init__(self, out: io.BufferedIOBase) -> None:
        super().__init__()
        self._out = out
        self.failed: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self._out.write(data)
        except OSError as exc:
            self._fail(exc)
            return len(data)

    def flush(self) -> None:
        try:
            self._out.flush()
        except OSError as exc:
            self._fail(exc)

    @property
    def name(self) -> Any:
        return self._out.name

    @property
    def mode(self) -> str:
        return "wb"

    def fileno(self) -> int:
        return self._out.fileno()

    def isatty(self) -> bool:
        return self._out.isatty()

    def _fail(self, exc: OSError) -> None:
        if self.failed is None:
            self.failed = exc
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._out.fileno())
        os.close(devnull)

    def reader_gone(self) -> bool:
        """The failure was a pipe whose reader went away (Windows reports that as EINVAL)."""
        return self.failed is not None and (self.failed.errno == errno.EPIPE
                                            or (os.name == "nt" and self.failed.errno == errno.EINVAL))


def _streams() -> _Output | None:
    """Standard streams a command can always write to: one closed (cron's ``2>&-``) is
    /dev/null, as no stream at all made a publish fail before it started."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
    out = sys.stdout
    if not isinstance(out, io.TextIOWrapper) or out.name != "<stdout>":
        return None  # (a test harness's capture, or stdout replaced above)
    out.flush()
    safe = _Output(out.detach())
    sys.stdout = io.TextIOWrapper(safe, encoding=out.encoding, errors=out.errors,  # type: ignore[arg-type]
                                  line_buffering=out.line_buffering, write_through=out.write_through)
    return safe


def run() -> None:
    """``esmirror`` as a program (the console script, ``python -m agent``)."""
    from app.core.state import keep_owner_rights

    keep_owner_rights()
    out = _streams()
    try:
        main(prog_name="esmirror")
    finally:
        if out is not None:
            sys.stdout.flush()
            if out.failed is not None and not out.reader_gone():
                click.echo(f"esmirror: cannot write to standard output: {out.failed.strerror or out.failed}; "
                           "the command itself ran (its exit code says how it went)", err=True)
        # Spare the interpreter's last collections at exit a walk over everything made
        # since start_up(): the process is ending, so it all goes anyway.
        gc.freeze()


def report_and_exit(report: Any, as_json: bool, show: Callable[[Any], None]) -> None:
    """One JSON document on stdout, or the human form; exit 0 only if the report is ok."""
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        show(report)
    sys.exit(0 if report.ok else 1)


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")

install_dir_option = click.option(
    "--install-dir", envvar="ESMIRROR_INSTALL_DIR", type=click.Path(file_okay=False),
    help="Express Server install dir (holds ImageServer/); or set ESMIRROR_INSTALL_DIR.")


def _as_owner(exc: OSError) -> str:
    """For 'Permission denied' on a file another account owns: which account to run as."""
    if exc.errno not in (errno.EACCES, errno.EPERM) or not exc.filename or os.name == "nt":
        return ""
    import pwd

    folder = os.path.dirname(os.path.abspath(os.fsdecode(exc.filename)))
    try:
        owner = pwd.getpwuid(os.stat(folder).st_uid).pw_name
    except (OSError, KeyError):
        return ""
    if owner == pwd.getpwuid(os.geteuid()).pw_name:
        return ""
    return (f"; {folder} belongs to {owner}: run esmirror as that account (runuser -u {owner} -- "
            f"esmirror …, or sudo -u {owner} with --install-dir)")


def settings_from(install_dir: str | None, writes_state: bool = False, as_owner: bool = True) -> Settings:
    """The install's settings. ``writes_state``: the command writes var/data/.esmirror. Run
    as root where another account (LT_IS_USER) owns var/data, it then runs as that account,
    as ``sudo -u`` would: files root left there would stop the agent and the receiver,
    which run as that account, with 'Permission denied' (cron running status as root, a
    publish with sudo). ``as_owner=False`` (serve: it may bind a port only root can) warns."""
    from app.core.state import run_as_data_owner

    settings = load_settings(install_dir)
    if writes_state:
        warning = run_as_data_owner(settings.data_dir, settings.state_dir, switch=as_owner)
        if warning:
            click.echo(f"esmirror: warning: {warning}", err=True)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="esmirror", prog_name="esmirror")
def main() -> None:
    """Keep Express Server configuration sets in step: a master publishes, secondaries apply."""


@main.command()
@install_dir_option
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to listen on.")
@click.option("--server", type=click.Choice(["waitress", "gunicorn"]), default="waitress",
              show_default=True)
@click.option("--certfile", type=click.Path(dir_okay=False, exists=True), help="TLS certificate (gunicorn).")
@click.option("--keyfile", type=click.Path(dir_okay=False, exists=True), help="TLS key (gunicorn).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="gunicorn worker processes.")
@handle_errors
def serve(install_dir: str | None, bind: str, server: str, certfile: str | None,
          keyfile: str | None, workers: int) -> None:
    """Run the receiver standalone, mounted at the prefix."""
    from app.serve import run_server

    if server == "waitress":  # (gunicorn's arbiter has its own graceful stop)
        # waitress stops on KeyboardInterrupt, and run_server then waits for a commit under
        # way: a SIGTERM (systemctl stop, a reboot) must not kill one mid-switch
        stop_signals_interrupt()
    run_server(settings_from(install_dir, writes_state=True, as_owner=False), bind, server, certfile,
               keyfile, workers)


@main.command()
@install_dir_option
@click.option("--secondary", "secondaries", multiple=True, metavar="HOST[:PORT]",
              help="Push only to this member of Mirrors (repeatable).")
@click.option("--full", is_flag=True, help="Resend every byte, even what a secondary already holds.")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; change nothing.")
@click.option("--force", is_flag=True,
              help="Publish even if this master's catalogs.xml fails esmirror's own check "
                   "(secondaries still validate it).")
@click.option("--canary", metavar="HOST[:PORT]",
              help="Push to this secondary first; if it fails, push to no other.")
@click.option("--max-parallel", type=click.IntRange(min=1), metavar="N",
              help=f"Push to at most N secondaries at once (default: {DEFAULT_MAX_PARALLEL}).")
@click.option("--stop-on-failure", is_flag=True,
              help="Once a secondary fails, start no further pushes.")
@json_option
@handle_errors(interrupted="; a secondary applies a set whole or not at all, so none is left "
                           "half-applied: 'esmirror status' shows what each holds")
def publish(install_dir: str | None, secondaries: tuple[str, ...], full: bool, dry_run: bool,
            force: bool, canary: str | None, max_parallel: int | None, stop_on_failure: bool,
            as_json: bool) -> None:
    """Validate, reload and push this master's set to its secondaries."""
    with start_up():
        from app.core.audit import command_line_caller

        from .fleet import publish as run_publish
        from app.core.express import resolve_canary, select_secondaries
        from .report import ProgressBars, print_publish

    stop_signals_interrupt()
    settings = settings_from(install_dir, writes_state=True)
    targets = select_secondaries(settings, secondaries)
    first = resolve_canary(targets, canary)
    with ProgressBars(targets, enabled=sys.stderr.isatty()) as bars:
        report = run_publish(settings, targets, full=full, dry_run=dry_run, force=force,
                             canary=first, max_parallel=max_parallel,
                             stop_on_failure=stop_on_failure, observer=bars, caller=command_line_caller())
    report_and_exit(report, as_json, print_publish)


@main.command()
@install_dir_option
@click.argument("server", metavar="HOST[:PORT]")
@click.option("--ssl", "ssl_mode", type=click.Choice(["none", "noverify", "strict"]), default="none",
              show_default=True)
@json_option
@handle_errors
def browse(install_dir: str | None, server: str, ssl_mode: str, as_json: bool) -> None:
    """Show a server's esmirror and Express versions, platform, generation, digest, master."""
    from pathlib import Path

    from app.core.express import parse_secondary_spec

    from .client import SecondaryClient

    try:
        settings = settings_from(install_dir)
    except ConfigError:
        if ssl_mode == "strict":
            raise
        settings = Settings(install_dir=Path("."))  # browsing needs no install unless strict
    client = SecondaryClient(parse_secondary_spec(server, ssl_mode), settings, as_master=False)
    try:
        info = client.browse()  # (a failure: handle_errors says it, as JSON too with --json)
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key in ("esmirror_version", "express_version", "platform", "generation", "digest",
                "master", "self"):
        click.echo(f"{key:18} {info.get(key)}")
    for warning in info.get("warnings") or []:
        click.echo(f"warning: {warning}")


@main.command()
@install_dir_option
@json_option
@click.option("--timeout", type=click.FloatRange(min=0.1), default=STATUS_TIMEOUT, show_default=True,
              help="Seconds to wait for the secondaries' answers; one that has not answered "
              "by then is reported unreachable.")
@handle_errors
def status(install_dir: str | None, as_json: bool, timeout: float) -> None:
    """On the master: each secondary's state now; exit 0 only if all are in sync."""
    with start_up():
        from .report import print_status
        from .status import live_status

    report = live_status(settings_from(install_dir, writes_state=True), timeout)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_status(report)
    sys.exit(0 if report["ok"] else 1)


@main.command()
@install_dir_option
@click.option("-v", "--verbose", is_flag=True, help="Log every step, not only what matters.")
@handle_errors
def agent(install_dir: str | None, verbose: bool) -> None:
    """The push agent: runs publish requests from the web endpoint and catches secondaries up."""
    with start_up():
        from .daemon import run_agent

    run_agent(settings_from(install_dir, writes_state=True), verbose)


@main.command()
@install_dir_option
@handle_errors
def release(install_dir: str | None) -> None:
    """On a secondary: forget which master owns it, so another master may push."""
    from app.core.apply import WorkingDir
    from app.core.audit import command_line_caller

    workdir = WorkingDir(settings_from(install_dir, writes_state=True))
    owner = workdir.release(command_line_caller())
    click.echo(f"released from master {owner}" if owner else "no master owned this server")


@main.group()
def archive() -> None:
    """The archive of files that pushes overwrote or removed on this server."""


@archive.command("list")
@install_dir_option
@json_option
@handle_errors
def archive_list(install_dir: str | None, as_json: bool) -> None:
    """The archive's entries, oldest first: id, when, which generations, files, bytes."""
    from app.core.apply import WorkingDir

    entries = WorkingDir(settings_from(install_dir)).archives()
    if as_json:
        click.echo(json.dumps({"archive": entries}, indent=2))
        return
    if not entries:
        click.echo("the archive is empty")
    for e in entries:
        if e.get("damaged"):
            click.echo(f"{e['id']}  {e['created']}  damaged ({e['damaged']}): 'esmirror archive clear' "
                       f"can remove it  {e['bytes']} bytes")
            continue
        what = f"restore of {e['restored_from']}" if e.get("restored_from") else \
            f"generation {e['replaced_generation'] if e['replaced_generation'] is not None else '-'} -> " \
            f"{e['generation'] if e['generation'] is not None else '-'}"
        kept = f" (+{len(e['set_aside'])} found outside the set)" if e.get("set_aside") else ""
        click.echo(f"{e['id']}  {e['created']}  {what}  {len(e.get('files') or [])} file(s){kept}  "
                   f"{e['bytes']} bytes")


@archive.command("clear")
@install_dir_option
@click.option("--keep", type=click.IntRange(min=0), help="Keep the newest N entries.")
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS",
              help="Remove entries older than DAYS (with --keep: beyond N and older).")
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@handle_errors
def archive_clear(install_dir: str | None, keep: int | None, older_than: float | None,
                  everything: bool) -> None:
    """Delete archive entries for good (the newest beyond --keep, those older than DAYS, or all)."""
    from app.core.apply import WorkingDir
    from app.core.audit import command_line_caller

    if keep is None and older_than is None and not everything:
        raise click.UsageError("say what to clear: --keep N, --older-than DAYS or --all")
    if everything and (keep is not None or older_than is not None):
        # (--all would win and remove the entries --keep was given to keep)
        raise click.UsageError("--all removes every entry: give it alone, or --keep/--older-than without it")
    if older_than is not None and not math.isfinite(older_than):
        raise click.UsageError("--older-than takes a number of days, not inf or nan")
    workdir = WorkingDir(settings_from(install_dir, writes_state=True))
    cleared = workdir.clear_archive(keep, older_than, everything, command_line_caller())
    click.echo(cleared.summary())


@archive.command("restore")
@install_dir_option
@click.argument("archive_id", metavar="ID")
@json_option
@handle_errors
def archive_restore(install_dir: str | None, archive_id: str, as_json: bool) -> None:
    """Make the set exactly what it was just before the apply that created ID."""
    from app.core.apply import WorkingDir
    from app.core.audit import command_line_caller

    result = WorkingDir(settings_from(install_dir, writes_state=True)).restore(archive_id, command_line_caller())
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(f"restored the set as it was before {archive_id}: {result.added} added, "
               f"{result.changed} changed, {result.removed} removed"
               + (f"; what it replaced is archived as {result.archive_id}" if result.archive_id else ""))
    for warning in result.warnings:
        click.echo(f"warning: {warning}")


@main.command()
@install_dir_option
@click.option("--httpd-conf", type=click.Path(dir_okay=False),
              help="httpd's main config file (default: Debian's, then RHEL's usual place).")
@click.option("--env-sh", type=click.Path(dir_okay=False),
              help="Express Server's env.sh (default: ImageServer/etc/env.sh).")
@click.option("--unit", type=click.Path(dir_okay=False),
              help="The gunicorn receiver's systemd unit (mod_proxy variant; default: "
                   "/etc/systemd/system/esmirror-receiver.service when it exists).")
@click.option("--web-config", type=click.Path(dir_okay=False),
              help="The IIS application's web.config (default: the one 'deploy iis' rendered, if any).")
@click.option("--fix", is_flag=True,
              help="Set LT_IS_USER in env.sh to httpd's user (a backup is kept); never edits httpd.conf.")
@json_option
@handle_errors
def check(install_dir: str | None, httpd_conf: str | None, env_sh: str | None, unit: str | None,
          web_config: str | None, fix: bool, as_json: bool) -> None:
    """Doctor: settings, Mirrors, ca-bundle, catalogs, permissions, Apache User vs LT_IS_USER,
    IIS's web.config vs allow_push/allow_admin."""
    from .doctor import print_check, run_check

    report = run_check(install_dir, httpd_conf, env_sh, fix=fix, unit=unit, web_config=web_config)
    report_and_exit(report, as_json, print_check)


@main.command()
@install_dir_option
@click.argument("target", type=click.Choice(["apache", "iis"]))
@click.option("--user", help="Account to render for; must equal LT_IS_USER of env.sh (the default).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the rendered files (default: ImageServer/etc/<apache|iis>/esmirror).")
@click.option("--venv", help="The venv the web server runs esmirror from (default: this one).")
@click.option("--backend", default="127.0.0.1:8081", show_default=True,
              help="apache: loopback HOST:PORT of gunicorn for the mod_proxy variant.")
@click.option("--httpd-conf", metavar="FILE",
              help="apache: refuse when this httpd config's User differs from LT_IS_USER (default: "
                   "this machine's, as check finds it; '' for none, to render for another machine).")
@handle_errors
def deploy(install_dir: str | None, target: str, user: str | None, out_dir: str | None,
           venv: str | None, backend: str, httpd_conf: str | None) -> None:
    """Render the Apache (mod_wsgi, mod_proxy) or IIS files for this install."""
    from pathlib import Path

    from .deploy import TEMPLATES, render_apache, render_iis

    settings = settings_from(install_dir)
    out = Path(out_dir) if out_dir else settings.etc_dir / target / "esmirror"
    if target == "apache":
        rendered = render_apache(settings, out, user, venv, backend, httpd_conf)
    else:
        rendered = render_iis(settings, out, user, venv)
    for path in rendered.files:
        click.echo(f"wrote {path}")
    if rendered.user:
        click.echo(f"account: {rendered.user}")
    for note in rendered.notes:
        click.echo(f"note: {note}")
    click.echo(f"where each file goes: {TEMPLATES / target / 'README.md'}")


@main.command()
@click.option("--keep", is_flag=True, help="Keep the demo folder and print where it is.")
@handle_errors
def demo(keep: bool) -> None:
    """A master and two secondaries on loopback: one publish, the result shown."""
    from .demo import run_demo

    stop_signals_interrupt()  # (its receivers run in sessions of their own: stopped, not orphaned)
    sys.exit(run_demo(keep=keep))


if __name__ == "__main__":
    main()
