#!/usr/bin/env python3
"""Draws growth.svg (at the top of the repository) from benches/growth.json: prepare latency against vault
size, and latency and memory against the number of vaults. Plain SVG, no plotting library.

    python3 scripts/plot-growth.py            # reads benches/growth.json, writes growth.svg
"""
import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = json.loads((ROOT / "benches" / "growth.json").read_text())

W, H = 960, 430
PANEL_W, PANEL_H = 380, 280
COLORS = {"p50": "#1f77b4", "p99": "#d62728", "rss": "#2ca02c"}


def panel(x0, y0, title, xlabel, xs, series, ylabel, ymax, right=None):
    """One log-x panel. series: {name: [y...]}; right: (name, [y...], ymax, label)."""
    out = []
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    span = max(hi - lo, 1e-9)

    def px(x):
        return x0 + (math.log10(x) - lo) / span * PANEL_W

    def py(y, top=ymax):
        return y0 + PANEL_H - y / top * PANEL_H

    out.append(f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 - 12}" text-anchor="middle" font-weight="bold">{title}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 + PANEL_H + 36}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="{x0 - 44}" y="{y0 + PANEL_H / 2}" text-anchor="middle" transform="rotate(-90 {x0 - 44} {y0 + PANEL_H / 2})">{ylabel}</text>')
    for x in xs:
        out.append(f'<text x="{px(x)}" y="{y0 + PANEL_H + 16}" text-anchor="middle" font-size="11">{x:,}</text>')
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{x0 - 6}" y="{py(y) + 4}" text-anchor="end" font-size="11">{y:g}</text>')
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{py(y)}" y2="{py(y)}" stroke="#eee"/>')
    for name, ys in series.items():
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{points}" fill="none" stroke="{COLORS[name]}" stroke-width="2"/>')
        for x, y in zip(xs, ys):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{COLORS[name]}"/>')
            out.append(f'<text x="{px(x) + 5:.1f}" y="{py(y) - 5:.1f}" font-size="10" fill="{COLORS[name]}">{y:g}</text>')
    if right:
        name, ys, top, label = right
        for i in range(5):
            y = top * i / 4
            out.append(f'<text x="{x0 + PANEL_W + 6}" y="{py(y, top) + 4}" font-size="11" fill="{COLORS[name]}">{y:g}</text>')
        out.append(f'<text x="{x0 + PANEL_W + 52}" y="{y0 + PANEL_H / 2}" text-anchor="middle" fill="{COLORS[name]}" transform="rotate(90 {x0 + PANEL_W + 52} {y0 + PANEL_H / 2})">{label}</text>')
        points = " ".join(f"{px(x):.1f},{py(y, top):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{points}" fill="none" stroke="{COLORS[name]}" stroke-width="2" stroke-dasharray="6 4"/>')
        for x, y in zip(xs, ys):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y, top):.1f}" r="3" fill="{COLORS[name]}"/>')
            out.append(f'<text x="{px(x) + 5:.1f}" y="{py(y, top) + 14:.1f}" font-size="10" fill="{COLORS[name]}">{y:g}</text>')
    return out


def nice(value):
    step = 10 ** math.floor(math.log10(value))
    return math.ceil(value / step * 1.15) * step


size = DATA["vault_size"]
count = DATA["vault_count"]
latency_max = nice(max(max(r["p99_ms"] for r in size), max(r["p99_ms"] for r in count)))
parts = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
    f'<rect width="{W}" height="{H}" fill="white"/>',
    f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{DATA["title"]}</text>',
]
parts += panel(
    70, 60, "One vault: prepare latency by vault size", "memories in the vault (log scale)",
    [r["memories"] for r in size],
    {"p50": [r["p50_ms"] for r in size], "p99": [r["p99_ms"] for r in size]},
    "prepare ms (16 clients, 60 req/s)", latency_max,
)
parts += panel(
    520, 60, "100 memories a vault: by number of vaults", "vaults on the node (log scale)",
    [r["vaults"] for r in count],
    {"p50": [r["p50_ms"] for r in count], "p99": [r["p99_ms"] for r in count]},
    "prepare ms", latency_max,
    right=("rss", [r["rss_mib"] for r in count], nice(max(r["rss_mib"] for r in count)), "daemon RSS MiB (dashed)"),
)
legend_y = H - 14
parts.append(f'<text x="70" y="{legend_y}" fill="{COLORS["p50"]}">— p50</text>')
parts.append(f'<text x="130" y="{legend_y}" fill="{COLORS["p99"]}">— p99</text>')
parts.append(f'<text x="190" y="{legend_y}" fill="{COLORS["rss"]}">- - RSS after the index loads</text>')
parts.append(f'<text x="{W - 10}" y="{legend_y}" text-anchor="end" font-size="10">{DATA["source"]}</text>')
parts.append("</svg>")
(ROOT / "growth.svg").write_text("\n".join(parts) + "\n")
print("wrote", ROOT / "growth.svg")
