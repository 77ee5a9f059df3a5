"""Small server-rendered SVG charts for the admin: no JavaScript, no CDN."""

import math

from django.utils.html import format_html, format_html_join

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 12, 28


def _ticks(low, high, count=4):
    if high == low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def _decimals(ticks):
    """Enough decimals that neighbouring tick labels differ (a loss moving by 0.003 over a short
    run would otherwise print 6.253 twice), at least three."""
    if len(ticks) < 2:
        return 3
    step = abs(ticks[1] - ticks[0])
    return max(3, math.ceil(-math.log10(step)) + 1) if step > 0 else 3


def loss_chart(series):
    """``series``: (label, colour, [[step, loss], ...]) tuples -> an SVG line
    chart with axes; an empty string when there is nothing to draw."""
    series = [(label, colour, points) for label, colour, points in series if points]
    if not series:
        return ""
    steps = [step for _, _, points in series for step, _ in points]
    losses = [loss for _, _, points in series for _, loss in points]
    x_low, x_high = 0, max(max(steps), 1)
    y_low, y_high = min(losses), max(losses)
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    span_x, span_y = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    y_ticks = _ticks(y_low, y_high)
    decimals = _decimals(y_ticks)

    # Coordinates as text: format_html escapes its arguments, so numbers are formatted first.
    def x(step):
        return f"{LEFT + (step - x_low) / (x_high - x_low) * span_x:.1f}"

    def y(loss):
        return f"{TOP + (y_high - loss) / (y_high - y_low) * span_y:.1f}"

    grid = format_html_join(
        "",
        '<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="#ddd"/>'
        '<text x="{}" y="{}" dy="4" font-size="11" text-anchor="end" fill="#666">{}</text>',
        ((LEFT, WIDTH - RIGHT, y(v), y(v), LEFT - 6, y(v), f"{v:.{decimals}f}") for v in y_ticks),
    )
    x_labels = format_html_join(
        "",
        '<text x="{}" y="{}" font-size="11" text-anchor="middle" fill="#666">{}</text>',
        ((x(v), HEIGHT - 8, v) for v in sorted({round(v) for v in _ticks(x_low, x_high)})),
    )
    lines = []
    for _, colour, points in series:
        if len(points) == 1:
            step, loss = points[0]
            lines.append(format_html('<circle cx="{}" cy="{}" r="3" fill="{}"/>', x(step), y(loss), colour))
        else:
            coords = " ".join(f"{x(step)},{y(loss)}" for step, loss in points)
            lines.append(
                format_html('<polyline points="{}" fill="none" stroke="{}" stroke-width="1.5"/>', coords, colour)
            )
            if len(points) <= 30:  # few points (validation): mark them
                lines.extend(
                    format_html('<circle cx="{}" cy="{}" r="2.5" fill="{}"/>', x(s), y(v), colour) for s, v in points
                )
    legend = format_html_join(
        "",
        '<span style="color:{};margin-right:1em">&#9632; {}</span>',
        ((colour, label) for label, colour, _ in series),
    )
    return format_html(
        '<div><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="loss by training step">'
        '<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>{}{}{}</svg>'
        '<div style="font-size:12px">{} <span style="color:#666">x: step, y: loss</span></div></div>',
        grid,
        x_labels,
        format_html_join("", "{}", ((line,) for line in lines)),
        legend,
        w=WIDTH,
        h=HEIGHT,
    )
