"""How a publish looks to a person: one line per secondary, then what went wrong."""
from __future__ import annotations

import click

from .fleet import PublishReport


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def print_publish(report: PublishReport) -> None:
    click.echo(f"generation {report.generation}: {report.files} files, "
               f"{human_bytes(report.bytes)}, digest {report.digest[:16]}…")
    for warning in report.warnings:
        click.echo(f"warning: {warning}")
    width = max([len(f"{r.host}:{r.port}") for r in report.secondaries] + [9])
    click.echo(f"{'secondary':{width}}  {'state':11}  {'files sent':>10}  {'bytes sent':>11}")
    for r in report.secondaries:
        click.echo(f"{r.host + ':' + str(r.port):{width}}  {r.state:11}  {r.files_sent:>10}  "
                   f"{human_bytes(r.bytes_sent):>11}")
    for r in report.secondaries:
        if r.error:
            click.echo(f"{r.host}:{r.port}: {r.error}", err=True)
        for warning in r.warnings:
            click.echo(f"{r.host}:{r.port}: warning: {warning}")
    failed = [r for r in report.secondaries if not r.ok]
    click.echo("all secondaries in sync" if not failed else
               f"{len(failed)} of {len(report.secondaries)} secondaries not in sync")
