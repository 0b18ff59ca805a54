"""How a publish looks to a person: one line per secondary, then what went wrong."""
from __future__ import annotations

import sys
import threading
from typing import Any

import click

from app.core.express import Secondary

from .fleet import Observer, PublishReport
from .push import PushResult


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def print_publish(report: PublishReport) -> None:
    click.echo(f"{'dry run of ' if report.dry_run else ''}generation {report.generation}: {report.files} files, "
               f"{human_bytes(report.bytes)}, digest {report.digest[:16]}…")
    for warning in report.warnings:
        click.echo(f"warning: {warning}")
    width = max([len(r.name) for r in report.secondaries] + [9])
    click.echo(f"{'secondary':{width}}  {'state':11}  {'files sent':>10}  {'bytes sent':>11}")
    for r in report.secondaries:
        click.echo(f"{r.name:{width}}  {r.state:11}  {r.files_sent:>10}  "
                   f"{human_bytes(r.bytes_sent):>11}")
    for r in report.secondaries:
        if r.error:  # (most errors name the secondary first already)
            click.echo(r.error if r.error.startswith(r.name) else f"{r.name}: {r.error}", err=True)
        for warning in r.warnings:
            click.echo(f"{r.name}: warning: {warning}")
    failed = [r for r in report.secondaries if not r.ok]
    if report.dry_run:
        click.echo("dry run: nothing was sent; the files and bytes above are what a publish would send")
        if not failed:
            return
    click.echo("all secondaries in sync" if not failed else
               f"{len(failed)} of {len(report.secondaries)} secondaries not in sync")


class ProgressBars(Observer):
    """One bar per secondary (bytes sent) on a terminal; nothing at all otherwise."""

    def __init__(self, secondaries: list[Secondary], enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[Secondary, Any] = {}
        self.secondaries = secondaries
        self.lock = threading.Lock()

    def __enter__(self) -> "ProgressBars":
        if self.enabled:
            import shutil

            from tqdm import tqdm

            columns = shutil.get_terminal_size().columns or 80  # a pty may report 0 columns
            width = max(len(s.name) for s in self.secondaries) if self.secondaries else 10
            for position, secondary in enumerate(self.secondaries):
                self.bars[secondary] = tqdm(desc=f"{secondary.name:{width}}", unit="B",
                                            unit_scale=True, unit_divisor=1024, position=position,
                                            leave=True, file=sys.stderr, ncols=columns)
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self.bars.values():
            bar.close()

    def waiting(self, why: str) -> None:
        with self.lock:
            click.echo(f"esmirror: {why}", err=True)

    def progress(self, secondary: Secondary, sent: int, files_sent: int = 0) -> None:
        bar = self.bars.get(secondary)
        if bar is not None:
            with self.lock:
                bar.update(sent)

    def done(self, secondary: Secondary, result: PushResult) -> None:
        bar = self.bars.get(secondary)
        if bar is not None:
            with self.lock:
                bar.set_postfix_str(result.state, refresh=True)


def print_status(status: dict[str, Any]) -> None:
    published = status.get("generation")
    click.echo(f"master: last published generation {published if published is not None else 'none'}"
               f"; agent {'running' if status['agent']['running'] else 'NOT running'}")
    width = max([len(s["name"]) for s in status["secondaries"]] + [9])
    click.echo(f"{'secondary':{width}}  {'state':11}  {'generation':>10}  {'archive':>10}  last contact")
    for s in status["secondaries"]:
        archive = human_bytes(s["archive_bytes"]) if s["archive_bytes"] is not None else "?"
        generation = "-" if s["generation"] is None else str(s["generation"])
        click.echo(f"{s['name']:{width}}  {s['state']:11}  {generation:>10}  {archive:>10}  "
                   f"{s['last_contact'] or 'never'}")
    for s in status["secondaries"]:
        if s["state"] != "in-sync":
            click.echo(f"{s['name']}: {s['state']}: {s['detail']}")
        for warning in s["warnings"]:
            click.echo(f"{s['name']}: warning: {warning}")
    if status.get("publishes"):
        click.echo("last publishes (newest first):")
    for p in (status.get("publishes") or [])[:5]:
        # counted within the request itself: the fleet may have grown or shrunk since
        pushed = [s for s in p.get("secondaries") or [] if isinstance(s, dict)]
        missed = sum(s.get("state") != "in-sync" for s in pushed)
        outcome = {True: f": all {len(pushed)} in sync" if pushed else ": all in sync",
                   False: f": {missed} of {len(pushed)} not in sync" if pushed else ": not all in sync"
                   }.get(p["ok"], "")
        generation = f"  generation {p['generation']}" if p["generation"] is not None else ""
        click.echo(f"  {p['created']}  {p['caller'] or '?'}  {p['state']}{outcome}{generation}"
                   + (f"  ({p['error']})" if p["error"] else ""))
    for problem in status.get("problems") or []:
        click.echo(f"problem: {problem}")
    bad = [s for s in status["secondaries"] if s["state"] != "in-sync"]
    click.echo("all secondaries in sync" if not bad else
               f"{len(bad)} of {len(status['secondaries'])} secondaries not in sync"
               + ("; a publish is under way" if status.get("publishing") else ""))
