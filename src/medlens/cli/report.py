"""`medlens report RESULT_DIR [--pdf]`: one page per explained scan of a result folder, as HTML and, on request, PDF.

Gathers the folder and hands it to `medlens.io.report_pages`, which reads what was written and lays out the pages.
"""
from __future__ import annotations

from pathlib import Path

import click

from medlens.io.report_pages import find_results, read_page, write_html, write_pdf


@click.command("report")
@click.argument("result_dir", type=click.Path(path_type=Path))
@click.option("--pdf", is_flag=True, default=False, help="Also write RESULT_DIR/report.pdf, one page per scan.")
def report_command(result_dir: Path, pdf: bool) -> None:
    """A report a person keeps of RESULT_DIR (written by `medlens explain` or `medlens batch`): per scan the
    prediction, the overlays with colour bars and region outline, region scores, provenance in plain words."""
    pages = [read_page(folder) for folder in find_results(result_dir)]
    written = [write_html(result_dir, pages)]
    if pdf:
        written.append(write_pdf(result_dir, pages))
    click.echo(f"wrote {', '.join(str(p) for p in written)} ({len(pages)} scan(s))")


COMMANDS = [report_command]
