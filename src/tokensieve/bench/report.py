"""`tokensieve bench report FOLDER`: a recorded run's Markdown table and plot written again from its
JSON (after a change to the report, or to draw a run made elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def rewrite_report(folder: str) -> list[Path]:
    """Write the table and plot of the run recorded in `folder`; returns the paths written."""
    from . import longctx_report, spec_report, speed_report

    renderers = {"speed.json": speed_report.render, "spec.json": spec_report.render, "longctx.json": longctx_report.render}
    out = Path(folder)
    found = [name for name in renderers if (out / name).is_file()]
    if not found:
        raise ConfigError(f"{out} holds no benchmark result (one of {', '.join(renderers)})")
    written = []
    for name in found:
        try:
            result = json.loads((out / name).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{out / name} is not valid JSON: {exc}") from None
        try:
            written += renderers[name](result, out)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{out / name} is not a result of this tokensieve's bench {name[:-5]}: it lacks {exc}") from None
    return written
