"""Draws the main panels of Moat's Grafana dashboard from the data of an e2e run.

    /usr/bin/python3 e2e/dashboard-picture.py DATA.json OUT.png

DATA.json is what e2e/tests/prometheus.rs writes with MOAT_DASHBOARD_DATA set: every PromQL
expression of charts/moat/dashboards/moat.json (panel targets), run as a range query against the
real Prometheus that scraped the moat binary during the test's scenario (a model created before
its key, a drift repair, a failed decryption, a quarantine). Each panel is drawn with Debian's
matplotlib (python3-matplotlib), one line per series, labelled as the dashboard's legend would.
`make dashboard-picture` runs the test and this script into docs/dashboard.png.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The panels drawn, by title as in the dashboard, with the labels that name a series.
PANELS = [
    ("Models by condition", ["condition", "reason"]),
    ("Models not Ready", ["name", "reason"]),
    ("Drift repairs by kind", ["kind"]),
    ("Drift repairs by model", ["name", "kind"]),
    ("Certificate expiry", ["secret"]),
    ("Managed objects", ["kind"]),
    ("Reconciles", ["reason"]),
    ("Reconcile duration", []),
    ("API writes", ["kind", "verb"]),
    ("Leader", ["__name__"]),
    ("Image resolutions", ["outcome"]),
    ("Certificates issued", ["usage"]),
]


# Panels of counters whose series start at 1 with their first event: increase() sees no rise, so
# the first event of each label set does not show (docs/runbook.md, "What the e2e with a real
# Prometheus proves"). Noted on the panel rather than hidden.
FIRST_EVENT_HIDDEN = {
    "Drift repairs by kind",
    "Drift repairs by model",
    "Image resolutions",
    "Certificates issued",
}


def title_of(place):
    # 'panel 7 "Drift repairs by kind" A' -> Drift repairs by kind
    return place.split('"')[1] if '"' in place else place


def main(data_path, out_path):
    data = json.load(open(data_path, encoding="utf-8"))
    start = data["start"]
    by_title = {}
    for e in data["expressions"]:
        by_title.setdefault(title_of(e["place"]), []).append(e)
    cols = 3
    rows = (len(PANELS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 6, rows * 3.2))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        ax.set_title(title, fontsize=11, loc="left")
        ax.grid(alpha=0.3)
        ax.set_xlabel("seconds into the scenario", fontsize=8)
        drawn = 0
        for e in by_title.get(title, []):
            ref = e["place"].rsplit(" ", 1)[-1]
            for series in e["result"]:
                metric = series.get("metric", {})
                label = ", ".join(metric[k] for k in keys if k in metric) or ref
                if title == "Reconciles":
                    label = "errors: " + label if ref == "B" else "reconciles/s"
                if title == "Reconcile duration":
                    label = "p99" if "0.99" in e["expr"] else "p50"
                if title == "Leader":
                    label = {"A": "leader", "B": "caches synced", "C": "up"}.get(ref, ref)
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.step(xs, ys, where="post", label=label, linewidth=1.4)
                drawn += 1
        if title in FIRST_EVENT_HIDDEN:
            ax.text(
                0.02, 0.9, "0: a series' first event is not shown (it starts at 1)",
                transform=ax.transAxes, fontsize=8, color="firebrick",
            )
        if drawn == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif drawn <= 8:
            ax.legend(fontsize=7, loc="best")
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.suptitle(
        "Moat dashboard, main panels: the real Prometheus of e2e/tests/prometheus.rs "
        "(drift repair, failed decryption, quarantine)",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out_path, dpi=80)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
