#!/usr/bin/env python3
"""Plots the growth series of `streamsnap-bench realistic --json FILE`: time to ready against the
data layer's size for the full pull, streamsnap cold and warm, and the physical limit.

    python3 bench/plot.py RESULTS.json OUT.png

With --points, one group of bars per measured point of several invocations (other links, a
30 GiB image), each labelled:

    python3 bench/plot.py --points OUT.png "80 ms RTT=rtt80.json" "compressible=big30.json"

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


CONTENDERS = [
    ("overlay", "overlayfs: full pull + run"),
    ("cold", "streamsnap, cold cache"),
    ("profiled", "streamsnap, cold + profile"),
    ("warm", "streamsnap, warm cache"),
]


def points_main(out, labelled):
    groups = []
    for item in labelled:
        label, _, path = item.partition("=")
        with open(path) as f:
            figures = json.load(f)
        for p in figures["points"]:
            if p.get("skipped") or not p["cold"]:
                continue
            groups.append(
                (
                    "%s\n%d GiB, %.0f Mbit/s + %.0f ms"
                    % (label, p["data_gib"], figures["link_mbit"], figures["rtt_ms"]),
                    p,
                )
            )
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(groups)), 4.8), dpi=120)
    width = 0.8 / len(CONTENDERS)
    for i, (key, name) in enumerate(CONTENDERS):
        xs, med, lo, hi = [], [], [], []
        for g, (_, p) in enumerate(groups):
            samples = ready(p.get(key) or [])
            if not samples:
                continue
            m = statistics.median(samples)
            xs.append(g + (i - 1.5) * width)
            med.append(m)
            lo.append(m - min(samples))
            hi.append(max(samples) - m)
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=name)
    for g, (_, p) in enumerate(groups):
        limit = p["limit"]["limit_s"]
        ax.plot([g - 0.45, g + 0.45], [limit, limit], "k--", lw=1)
    ax.plot([], [], "k--", lw=1, label="physical limit (lazy start)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label for label, _ in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time to ready (s, log scale), median, min..max")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("Time to ready: other links and a 30 GiB image")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    fig.tight_layout()
    fig.savefig(out)
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--points":
        points_main(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
