"""One build of the native kernels at a time, and never a wait on a build that is gone.

torch's `cpp_extension.load` marks a build with a `lock` file that it removes when the build ends; a
process killed during the build leaves the file behind, and every later `load` waits for it forever.
Builders here first take an flock on a file of their own, which the operating system releases when
its holder dies: holding it, a torch `lock` file can only be a dead build's, and is removed.
"""

from __future__ import annotations

import fcntl
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TORCH_LOCK = "lock"  # the file torch's FileBaton creates in the build folder
OUR_LOCK = "tokensieve-build.lock"


@contextmanager
def exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold the build folder alone: wait (saying so) while another live process builds in it, then
    clear a lock that a killed build left behind."""
    with open(build_dir / OUR_LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("tokensieve: waiting for another process that is building the CPU kernels...", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / TORCH_LOCK).unlink(missing_ok=True)  # no live builder holds it: a killed build's
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
