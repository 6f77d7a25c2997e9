"""matplotlib for the benchmarks' plots (the `bench` extra), drawn off-screen, and the caption that
names the model, threads and machine of the run a plot shows."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def require_matplotlib() -> None:
    """Fail before a benchmark runs, not after, when its plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("the benchmarks draw their plots with matplotlib: pip install 'tokensieve[bench]'") from None


def pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def caption(result: dict) -> str:
    """"smollm2-135m, float32, 2 threads, AMD EPYC, 2 CPUs": what a plot's title names."""
    numbers = "int8 activations" if result["activations"] == "int8" else result["dtype"]
    return f"{result['model']}, {numbers}, {result['threads']} threads, {result['machine']}"


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
