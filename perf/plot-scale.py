"""Plots `perf/run-http.sh --scale` results: first executions' throughput
and p99 latency against the records resident in the store.

    perf/plot-scale.sh RESULTS_DIR/scale.csv perf/scale.png
"""

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

# An empty store has no place on a log axis: it is drawn at 10^2, labelled 0.
EMPTY_AT = 100


def main(src: str, out: str) -> None:
    series = defaultdict(list)
    with open(src, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["store"], row["connections"], row["generator"])
            series[key].append(
                (int(row["records"]), float(row["rps"]), float(row["p99_ms"]))
            )
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    styles = {"loadgen": "-o", "wrk": "--s"}
    for (store, conns, gen), points in sorted(series.items()):
        points.sort()
        xs = [n if n > 0 else EMPTY_AT for n, _, _ in points]
        label = f"{store}, {conns} connections ({gen})"
        style = styles.get(gen, "-x")
        top.plot(xs, [r for _, r, _ in points], style, label=label)
        bottom.plot(xs, [p for _, _, p in points], style, label=label)
    bottom.axhline(10, color="red", linewidth=0.8, linestyle=":", label="10 ms")
    top.set_xscale("log")
    for ax in (top, bottom):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    top.set_ylabel("first executions per second")
    bottom.set_ylabel("p99 latency, ms")
    bottom.set_xlabel("records resident in the store")
    ticks = sorted({x for pts in series.values() for x in (n or EMPTY_AT for n, _, _ in pts)})
    bottom.set_xticks(ticks)
    bottom.set_xticklabels(
        ["0" if t == EMPTY_AT else f"$10^{len(str(t)) - 1}$" for t in ticks]
    )
    fig.suptitle("First executions with records resident (one run, 64-byte bodies)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot-scale.py SCALE_CSV OUT_PNG")
    main(sys.argv[1], sys.argv[2])
