"""Cost per 1,000 descriptions and latency of one, by where the service runs: CPU and GPU,
serverless and provisioned. Prices come from docs/prices.json (list prices with their sources and
date), speeds from docs/measured_serving.json (`bench/serve_bench.py --summary`, 2 CPU cores); GPU
speeds are an assumption in prices.json, labelled as such wherever they are used.

    python docs/costs.py                 # print the table
    python docs/costs.py --write         # and put it in docs/REPORT.md between the markers

Cost per 1,000 = hours an instance needs for them x its price per hour (+ per-request fees),
with the instance kept busy by 8 requests at once (the measured aggregate rate). An instance
that is not kept busy costs more per description when provisioned, the same when serverless.
"""

import argparse
import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BEGIN = "<!-- costs:begin -->"
END = "<!-- costs:end -->"
SPEEDS = ("one_stream_tokens_per_second", "aggregate_8_clients_tokens_per_second")
PRICE_STYLES = (
    ("usd_per_hour",),
    ("usd_per_vcpu_hour", "usd_per_gib_hour"),
    ("usd_per_vcpu_second", "usd_per_gib_second"),
)


class InputError(ValueError):
    """A price or measurement file lacks a field or has a wrong one; the message names it."""


def _number(data, key, where, *, positive=True):
    if key not in data:
        raise InputError(f"{where}.{key}: missing")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (positive and value == 0):
        raise InputError(f"{where}.{key}: must be a {'positive' if positive else 'non-negative'} number, not {value!r}")
    return value


def _text(data, key, where, choices=None):
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}.{key}: missing")
    if choices and value not in choices:
        raise InputError(f"{where}.{key}: must be one of {', '.join(choices)}, not {value!r}")
    return value


def check_prices(prices):
    for key in ("currency", "as_of", "note"):
        _text(prices, key, "prices")
    assumptions = prices.get("assumptions") or {}
    _number(assumptions, "tokens_per_description", "assumptions")
    _number(assumptions, "hours_per_month", "assumptions")
    for key in ("one_stream_tokens_per_second", "aggregate_8_clients_tokens_per_second"):
        _number(assumptions.get("gpu") or {}, key, "assumptions.gpu")
    options = prices.get("options")
    if not isinstance(options, list) or not options:
        raise InputError("options: must be a non-empty list")
    for index, option in enumerate(options):
        where = f"options[{index}]"
        for key in ("id", "name"):
            _text(option, key, where)
        _text(option, "kind", where, ("serverless", "provisioned"))
        _text(option, "hardware", where, ("cpu", "gpu"))
        if not _text(option, "source", where).startswith("https://"):
            raise InputError(f"{where}.source: must start with the https:// address of the price page")
        if not isinstance(option.get("scales_to_zero"), bool):
            raise InputError(f"{where}.scales_to_zero: must be true or false")
        _number(option, "vcpu", where)
        _number(option, "memory_gib", where)
        styles = [style for style in PRICE_STYLES if any(key in option for key in style)]
        if len(styles) != 1:
            raise InputError(f"{where}: give exactly one of usd_per_hour, usd_per_vcpu_hour + usd_per_gib_hour, "
                             "usd_per_vcpu_second + usd_per_gib_second")  # fmt: skip
        for key in styles[0]:
            _number(option, key, where)
        for key in ("usd_per_gpu_second", "usd_per_million_requests"):
            if key in option:
                _number(option, key, where, positive=False)
    return prices


def check_measured(measured):
    """``measured`` as bench/serve_bench.py --summary writes it: the engine's settings (rows), the
    baseline and the anchors, each with its speeds; refused by field when one is missing."""
    for key in ("command", "workload", "machine", "model", "when"):
        _text(measured, key, "measured")
    rows = measured.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise InputError("measured.rows: must name at least one engine setting")
    for setting, row in rows.items():
        _text(row, "label", f"measured.rows.{setting}")
        for key in SPEEDS:
            _number(row, key, f"measured.rows.{setting}")
    _number(measured.get("baseline") or {}, "one_stream_tokens_per_second", "measured.baseline")
    for name, row in (measured.get("anchors") or {}).items():
        _text(row, "label", f"measured.anchors.{name}")
        _number(row, "one_stream_tokens_per_second", f"measured.anchors.{name}")
    return measured


def usd_per_hour(option):
    if "usd_per_hour" in option:
        hourly = option["usd_per_hour"]
    elif "usd_per_vcpu_hour" in option:
        hourly = option["vcpu"] * option["usd_per_vcpu_hour"] + option["memory_gib"] * option["usd_per_gib_hour"]
    else:
        per_second = (
            option["vcpu"] * option["usd_per_vcpu_second"] + option["memory_gib"] * option["usd_per_gib_second"]
        )
        hourly = 3600 * per_second
    return hourly + 3600 * option.get("gpus", 1) * option.get("usd_per_gpu_second", 0)


def rows(prices, measured):
    """One row per option and engine setting: the numbers of the table, before formatting."""
    tokens = prices["assumptions"]["tokens_per_description"]
    gpu = prices["assumptions"]["gpu"]
    out = []
    for option in prices["options"]:
        if option["hardware"] == "cpu":
            speeds = [(row["label"].removeprefix("engine, "), row, "measured") for row in measured["rows"].values()]
        else:
            speeds = [("fp32", gpu, "ASSUMED, not measured")]
        for weights, speed, basis in speeds:
            hourly = usd_per_hour(option)
            busy_hours = 1000 * tokens / speed["aggregate_8_clients_tokens_per_second"] / 3600
            requests = 1000 / 1e6 * option.get("usd_per_million_requests", 0)
            out.append(
                {
                    "option": option,
                    "weights": weights,
                    "basis": basis,
                    "usd_per_1000": busy_hours * hourly + requests,
                    "alone_seconds": tokens / speed["one_stream_tokens_per_second"],
                    "crowded_seconds": tokens / (speed["aggregate_8_clients_tokens_per_second"] / 8),
                    "usd_per_month": hourly * prices["assumptions"]["hours_per_month"],
                }
            )
    return out


def table(prices=None, measured=None):
    prices = check_prices(prices or json.loads((DOCS / "prices.json").read_text()))
    measured = check_measured(measured or json.loads((DOCS / "measured_serving.json").read_text()))
    tokens = prices["assumptions"]["tokens_per_description"]
    lines = [
        "| option | kind | engine setting (speed) | $ / 1,000 descriptions | one description alone | each of 8 at once "
        "| $ / month, one instance always on |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows(prices, measured):
        option = row["option"]
        kind = f"{option['kind']}, {option['hardware'].upper()}" + (
            ", scales to zero" if option["scales_to_zero"] else ""
        )
        lines.append(
            f"| {option['name']} | {kind} | {row['weights']} ({row['basis']}) | ${row['usd_per_1000']:.3f} "
            f"| {row['alone_seconds']:.1f} s | {row['crowded_seconds']:.1f} s | ${row['usd_per_month']:.0f} |"
        )
    cheapest = min((r for r in rows(prices, measured) if r["basis"] == "measured"), key=lambda r: r["usd_per_1000"])
    sources = "; ".join(f"{o['name']}: {o['source']}" for o in prices["options"])
    lines += [
        "",
        f"- **Prices must be checked before use.** {prices['note']} Prices as of {prices['as_of']}, "
        f"{prices['currency']}. Sources: {sources}.",
        f"- CPU speeds are measured: `{measured['command']}` ({measured['workload']}; {measured['machine']}; "
        f"{measured['model']}; {measured['when']}). A description is {tokens} tokens. "
        f"{prices['assumptions']['cpu_note']}",
        f"- GPU rows are **not measured**: {prices['assumptions']['gpu']['note']}",
        "- $ / 1,000 assumes an instance kept busy with 8 requests at once. Idle provisioned capacity "
        "adds its hourly price regardless; a serverless service that scales to zero costs nothing idle "
        "but its first request waits for a cold start (image pull and model load).",
        f"- Cheapest measured here: {cheapest['option']['name']} with {cheapest['weights']}, "
        f"${cheapest['usd_per_1000']:.3f} per 1,000 descriptions when kept busy.",
    ]
    return "\n".join(lines) + "\n"


def summary(prices=None, measured=None):
    """The table's rows as plain data, with the prices' date (for the slides)."""
    prices = check_prices(prices or json.loads((DOCS / "prices.json").read_text()))
    measured = check_measured(measured or json.loads((DOCS / "measured_serving.json").read_text()))
    out = []
    for row in rows(prices, measured):
        option = row.pop("option")
        out.append({"option": option["name"], "kind": option["kind"], "hardware": option["hardware"],
                    "scales_to_zero": option["scales_to_zero"], **row})  # fmt: skip
    return {"prices_as_of": prices["as_of"], "currency": prices["currency"], "rows": out}


def with_table(text, rendered):
    """``text`` with everything between the markers replaced by ``rendered``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise InputError(f"the report must have one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{rendered}{END}{tail}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Put the table into the report between the markers.")
    parser.add_argument("--report", type=Path, default=DOCS / "REPORT.md")
    args = parser.parse_args()
    try:
        rendered = table()
        if args.write:
            args.report.write_text(with_table(args.report.read_text(), rendered))
    except InputError as exc:
        sys.exit(f"costs: {exc}")
    print(rendered, end="")


if __name__ == "__main__":
    main()
