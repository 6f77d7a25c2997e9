"""What every benchmark result records about the run that made it, so that its table and plot can
say where they come from: the command, model, threads, machine, versions and commit."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def machine_name() -> str:
    """The CPU's model name and how many CPUs this process may use, e.g. "AMD EPYC, 2 CPUs"."""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    cpu = match.group(1).strip() if match else (platform.processor() or platform.machine())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cpus} CPUs"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def source_commit() -> str | None:
    """The git commit of the tokensieve source that runs, with "+changes" when it has uncommitted
    edits; None outside a git checkout."""
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=source, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def engine_settings(engine) -> dict:
    """What the engine runs, its "auto" settings resolved (recorded beside run_info's)."""
    return {"activations": engine.activations, "kv_dtype": engine.stats()["kv_dtype"]}


def run_info(args) -> dict:
    """The run's provenance: stored at the top of each benchmark's JSON and named in its plot."""
    return {
        "command": args.command_line,
        "model": args.model,
        "dtype": args.dtype,
        "activations": args.activations,
        "threads": torch.get_num_threads(),
        "machine": machine_name(),
        "date": datetime.date.today().isoformat(),
        "commit": source_commit(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
    }


def versions(result: dict) -> str:
    """"commit 2761d4e, 2026-12-04, torch 2.13.0+cpu, transformers 5.2.0": where a table comes from."""
    return (f"commit {result['commit']}, {result['date']}, torch {result['torch']}, "
            f"transformers {result['transformers']}")
