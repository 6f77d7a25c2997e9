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
    parts = [result.get("model", "model not recorded")]
    if result.get("activations") == "int8":
        parts.append("int8 activations")
    elif result.get("dtype"):
        parts.append(result["dtype"])
    parts += [f"{result['threads']} threads" if "threads" in result else "threads not recorded",
              result.get("machine", "machine not recorded")]
    return ", ".join(parts)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    pyplot().close(fig)
