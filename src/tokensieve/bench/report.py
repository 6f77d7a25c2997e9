"""A benchmark run written out: its JSON, Markdown table and plot, side by side in one folder; and
`tokensieve bench report FOLDER`, which writes a recorded run's table and plot again from its JSON
(after a change to the report, or to draw a run made elsewhere), or, for a `bench longctx` run stopped
before its end, from the cases every system finished."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from . import cpu_report, embed_report, longctx_report, serve_report, spec_report, speed_report

REPORTS = {"speed": speed_report, "spec": spec_report, "longctx": longctx_report, "serve": serve_report,
           "cpu": cpu_report, "embed": embed_report}  # each: markdown(), write_plot()


def render(kind: str, result: dict, out: Path) -> list[Path]:
    """KIND.md and KIND.png in `out`, from the result; returns their paths."""
    module = REPORTS[kind]
    table, plot = out / f"{kind}.md", out / f"{kind}.png"
    table.write_text(module.markdown(result))
    module.write_plot(result, plot)
    return [table, plot]


def write_report(kind: str, result: dict, out: Path) -> None:
    """KIND.json, KIND.md and KIND.png in `out` (the per-case lines are written during the run)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.json").write_text(json.dumps(result, indent=1))
    render(kind, result, out)


def rewrite_report(folder: str) -> list[Path]:
    """Write the table and plot of the run recorded in `folder`; returns the paths written."""
    out = Path(folder)
    if not (out / "longctx.json").is_file() and (out / "longctx_run.json").is_file():  # a bench longctx cut short
        from .longctx import result_of_cut_run

        write_report("longctx", result_of_cut_run(out), out)
    found = [kind for kind in REPORTS if (out / f"{kind}.json").is_file()]
    if not found:
        raise ConfigError(f"{out} holds no benchmark result (one of {', '.join(f'{k}.json' for k in REPORTS)})")
    written = []
    for kind in found:
        path = out / f"{kind}.json"
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        try:
            written += render(kind, result, out)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a result of this tokensieve's bench {kind}: it lacks {exc}") from None
    return written
