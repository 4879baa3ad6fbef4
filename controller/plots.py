"""Server-side plots for the status page: small inline SVGs, no JavaScript, no external assets.

Pure functions from numbers to SVG text; every label is HTML-escaped. Each
plot has a ``<title>`` and an ``aria-label`` so it reads without the picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

WIDTH, HEIGHT = 560, 160
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 26
COLOURS = ("#0969da", "#cf222e", "#1a7f37", "#9a6700")


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M")


def _fmt(value: float) -> str:
    if abs(value) >= 1e9:
        return f"{value / 1e9:.1f}G"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.3g}"


def _frame(title: str, body: str, y_max: float, unit: str) -> str:
    plot_h = HEIGHT - TOP - BOTTOM
    grid = "".join(
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h * (1 - f):.1f}" y2="{TOP + plot_h * (1 - f):.1f}" '
        f'stroke="#e1e4e8"/><text x="{LEFT - 4}" y="{TOP + plot_h * (1 - f) + 4:.1f}" text-anchor="end" '
        f'font-size="10" fill="#6e7781">{escape(_fmt(y_max * f))}</text>' for f in (0, 0.5, 1))
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">'
            f'<title>{escape(title)}</title>{grid}'
            f'<text x="2" y="9" font-size="9" fill="#6e7781">{escape(unit)}</text>{body}</svg>')


def render_bars(title: str, bars: Sequence[tuple[str, float]], *, unit: str = "") -> str:
    """Vertical bars, e.g. incidents per hour; every ``len/8``-th label is printed."""
    if not bars:
        return f'<p class="muted">{escape(title)}: no data yet.</p>'
    y_max = max([1.0, *(v for _, v in bars)])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / len(bars)
    every = max(1, len(bars) // 8)
    parts = []
    for i, (label, value) in enumerate(bars):
        h = plot_h * value / y_max
        x = LEFT + i * step
        parts.append(f'<rect x="{x + 1:.1f}" y="{TOP + plot_h - h:.1f}" width="{max(1.0, step - 2):.1f}" '
                     f'height="{h:.1f}" fill="{COLOURS[0]}"><title>{escape(label)}: {escape(_fmt(value))}</title>'
                     f'</rect>')
        if i % every == 0:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{HEIGHT - 12}" text-anchor="middle" font-size="10" '
                         f'fill="#6e7781">{escape(label)}</text>')
    return _frame(title, "".join(parts), y_max, unit)


def render_lines(title: str, series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *, unit: str = "",
                 marker: float | None = None, marker_label: str = "") -> str:
    """Time series (x = epoch seconds) sharing one y axis; ``marker`` draws a vertical line at that time."""
    points = [p for _, pts in series for p in pts]
    if not points:
        return f'<p class="muted">{escape(title)}: no data yet.</p>'
    xs = [x for x, _ in points] + ([marker] if marker is not None else [])
    x_min, x_max = min(xs), max(xs)
    span = max(x_max - x_min, 1e-9)
    y_max = max([1e-9, *(y for _, y in points)]) * 1.1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(x: float, y: float) -> str:
        return f"{LEFT + plot_w * (x - x_min) / span:.1f},{TOP + plot_h * (1 - y / y_max):.1f}"

    parts = []
    for i, (name, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        if len(pts) == 1:
            x, y = xy(*pts[0]).split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                         f'points="{" ".join(xy(x, y) for x, y in pts)}"/>')
        parts.append(f'<text x="{WIDTH - RIGHT}" y="{TOP + 10 + 12 * i}" text-anchor="end" font-size="10" '
                     f'fill="{colour}">{escape(name)}</text>')
    if marker is not None:
        mx = LEFT + plot_w * (marker - x_min) / span
        parts.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#cf222e" '
                     f'stroke-dasharray="4 3"/><text x="{mx + 3:.1f}" y="{TOP + 10}" font-size="10" '
                     f'fill="#cf222e">{escape(marker_label)}</text>')
    parts.append(f'<text x="{LEFT}" y="{HEIGHT - 12}" font-size="10" fill="#6e7781">{escape(_clock(x_min))}</text>'
                 f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 12}" text-anchor="end" font-size="10" fill="#6e7781">'
                 f'{escape(_clock(x_max))} UTC</text>')
    return _frame(title, "".join(parts), y_max, unit)
