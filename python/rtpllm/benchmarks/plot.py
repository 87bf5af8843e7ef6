"""`--plot FILE.png`: the TTFT and ITL distributions and the output throughput over the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtpllm.benchmarks.request_client import RequestResult
from rtpllm.benchmarks.serve_metrics import output_token_timeline


def plot_serve_run(path: Path, results: list[RequestResult], output_lens: list[int], start_time: float,
                   title: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("plot: needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    ttfts_ms = np.array([r.ttft for r in ok]) * 1000.0
    itls_ms = np.array([gap for r in ok for gap in r.itl]) * 1000.0
    times, tokens = output_token_timeline(results, output_lens)

    fig, (ax_ttft, ax_itl, ax_rate) = plt.subplots(1, 3, figsize=(16, 4.5))
    fig.suptitle(title)
    _histogram(ax_ttft, ttfts_ms, "Time to first token (ms)")
    _histogram(ax_itl, itls_ms, "Inter-token latency (ms)")
    if times.size:
        elapsed = times - start_time
        bin_s = max(elapsed.max() / 60.0, 0.05)  # about 60 bins whatever the run's length
        edges = np.arange(0.0, elapsed.max() + bin_s, bin_s)
        counts, _ = np.histogram(elapsed, bins=edges, weights=tokens)
        ax_rate.plot(edges[:-1] + bin_s / 2, counts / bin_s)
    ax_rate.set_xlabel("Time since start (s)")
    ax_rate.set_ylabel("Output tokens / s")
    ax_rate.set_title("Output throughput over the run")
    ax_rate.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histogram(ax, values_ms: np.ndarray, label: str) -> None:
    if values_ms.size:
        ax.hist(values_ms, bins=50)
        for q, style in ((50, "-"), (99, "--")):
            ax.axvline(np.percentile(values_ms, q), color="black", linestyle=style, label=f"p{q}")
        ax.legend()
    ax.set_xlabel(label)
    ax.set_ylabel("Count")
    ax.set_title(label.split(" (")[0])
    ax.grid(alpha=0.3)
