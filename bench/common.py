"""What the benchmark scripts share: a timestamped log line, a two-panel figure over token counts, and writing the
result as JSON + table + PNG. (Scripts run as `python bench/<name>.py`, so this folder is on sys.path.)"""
from __future__ import annotations

import json
import pathlib
import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def two_panels(path: pathlib.Path):
    """(plt, fig, ax1, ax2) for a 1x2 figure, or None (with a message) when matplotlib is not installed."""
    from linearize.report.plots import pyplot

    plt = pyplot(path.name)
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    return plt, fig, ax1, ax2


def token_axes(axes, counts, xlabel: str) -> None:
    """Log2 x axes labelled 1k, 4k, ... with a grid and a legend."""
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in counts])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()


def save_figure(plt, fig, path: pathlib.Path, title: str) -> bool:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(result: dict, out: pathlib.Path, stem: str, print_table, plot) -> dict:
    """out/<stem>.json, the table on stdout, out/<stem>.png."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {json_path}")
    png = out / f"{stem}.png"
    if plot(result, png):
        print(f"wrote {png}")
    return result
