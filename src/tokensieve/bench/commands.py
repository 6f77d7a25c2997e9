"""How a `tokensieve bench` sub-command runs: its command line is recorded for the result's provenance
(run_info reads it), and the benchmark's module is imported only then."""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def benchmark_command(module: str, function: str) -> Callable[[object], None]:
    """The `func` of a bench sub-parser: `module`'s `function` called with the parsed arguments."""

    def run(args) -> None:
        args.command_line = "tokensieve " + " ".join(sys.argv[1:])
        getattr(importlib.import_module(module), function)(args)

    return run
