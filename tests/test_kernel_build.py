"""The native kernels' build: it says when it compiles, and a build killed half-way (a closed terminal,
a kill) never blocks a later run."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tokensieve.kernels import _build_dir, native_kernels
from tokensieve.kernels.build_lock import TORCH_LOCK

LOAD = "from tokensieve.kernels import native_kernels; assert native_kernels() is not None; print('loaded')"

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or native_kernels() is None, reason="no C++ compiler to build the kernels")


def run_load(cache, timeout):
    env = {**os.environ, "TOKENSIEVE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=timeout)


def fresh_build_dir(cache, monkeypatch):
    monkeypatch.setenv("TOKENSIEVE_CACHE", str(cache))
    return _build_dir()


def test_a_lock_left_by_a_killed_build_is_taken_over(tmp_path, monkeypatch):
    built = _build_dir()  # this session's build, in the usual cache
    build_dir = fresh_build_dir(tmp_path, monkeypatch)
    shutil.copytree(built, build_dir, dirs_exist_ok=True)
    (build_dir / "tokensieve_kernels.so").unlink()  # killed before linking: the objects are there, the library not
    (build_dir / TORCH_LOCK).touch()  # what a build killed with SIGKILL leaves: torch would wait on it forever
    # a hang would last forever; a relink takes seconds, but a checkout newer than the objects recompiles them
    done = run_load(tmp_path, timeout=600)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr
    assert (build_dir / "tokensieve_kernels.so").is_file()  # linked again
    again = run_load(tmp_path, timeout=60)
    assert again.returncode == 0 and "building" not in again.stderr  # built: loaded as it is, nothing to say


def test_a_broken_library_is_built_again_not_loaded(tmp_path):
    from tokensieve.kernels import _import_built

    broken = tmp_path / "tokensieve_kernels.so"
    broken.write_bytes(b"\x7fELF cut short")
    assert _import_built(broken) is None and _import_built(tmp_path / "missing.so") is None
    assert _import_built(_build_dir() / "tokensieve_kernels.so").paged_scores is not None


def test_a_build_interrupted_by_sighup_does_not_block_the_next_run(tmp_path, monkeypatch):
    build_dir = fresh_build_dir(tmp_path, monkeypatch)
    env = {**os.environ, "TOKENSIEVE_CACHE": str(tmp_path)}
    # SIGHUP's default action, as in a terminal (a runner started under nohup would pass it on ignored)
    hangs_up = "import signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); " + LOAD
    first = subprocess.Popen([sys.executable, "-c", hangs_up], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (build_dir / TORCH_LOCK).exists():  # torch's build is under way
        assert first.poll() is None and time.monotonic() < deadline, "the build did not start"
        time.sleep(0.1)
    time.sleep(2)
    os.killpg(first.pid, signal.SIGHUP)  # a closed terminal: the whole process group
    first.wait(30)
    assert "building the CPU kernels" in first.stderr.read()  # the build said so as it began
    assert (build_dir / TORCH_LOCK).exists()  # left behind
    done = run_load(tmp_path, timeout=900)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr
    assert "CPU kernels built in" in done.stderr
