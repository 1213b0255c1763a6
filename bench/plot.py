#!/usr/bin/env python3
"""Plots the growth series of `streamsnap-bench realistic --json FILE`: time to ready against the
data layer's size for the full pull, streamsnap cold and warm, and the physical limit.

    python3 bench/plot.py RESULTS.json OUT.png

Needs matplotlib (bench/run.sh installs it into a venv under the cache dir).
"""

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ready(samples):
    return [s["ready_s"] for s in samples]


def main(src, out):
    with open(src) as f:
        figures = json.load(f)
    points = [p for p in figures["points"] if not p.get("skipped") and p["cold"]]
    sizes = [p["data_gib"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, label, style in [
        ("overlay", "overlayfs: full pull + run", "o-"),
        ("cold", "streamsnap, cold cache", "s-"),
        ("profiled", "streamsnap, cold cache + start-up profile", "D-"),
        ("warm", "streamsnap, warm cache", "^-"),
    ]:
        if not all(p.get(key) for p in points):
            continue
        med = [statistics.median(ready(p[key])) for p in points]
        lo = [m - min(ready(p[key])) for m, p in zip(med, points)]
        hi = [max(ready(p[key])) - m for m, p in zip(med, points)]
        ax.errorbar(sizes, med, yerr=[lo, hi], fmt=style, capsize=3, label=label)
    ax.plot(sizes, [p["limit"]["limit_s"] for p in points], "kx--", label="physical limit (lazy start)")
    ax.set_xlabel("data layer (GiB)")
    ax.set_ylabel("time to ready (s, log scale), median, min..max")
    ax.set_xticks(sizes)
    # Log scale: the full pull takes tens of seconds, the streamsnap series a few, and on a
    # linear axis the three streamsnap series are indistinguishable.
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title(
        "Time to ready, %.0f Mbit/s + %.0f ms RTT, %d runs each"
        % (figures["link_mbit"], figures["rtt_ms"], figures["runs"])
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
