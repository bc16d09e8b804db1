"""Benchmark outputs: results.json, results.csv, table.md and one PNG plot per op."""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

from fastattn.bench.harness import MODES, OK, Row

SCHEMA = "fastattn-bench/1"
CSV_COLUMNS = [f for f in Row.__dataclass_fields__ if f != "params"] + ["params"]


def payload(environment: dict, settings: dict, unavailable: Sequence[dict], rows: Sequence[Row], interrupted: Optional[str]) -> dict:
    return {
        "schema": SCHEMA,
        "environment": environment,
        "settings": settings,
        "interrupted": interrupted,
        "unavailable_providers": list(unavailable),
        "rows": [row.to_dict() for row in rows],
    }


def rows_from(data: dict) -> list[Row]:
    return [Row(**row) for row in data["rows"]]


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a reader (or a kill mid-write) never sees half a file


def write_csv(path: str, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            record = row.to_dict()
            record["params"] = json.dumps(record["params"], sort_keys=True)
            writer.writerow(record)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _num(value: Optional[float], fmt: str = ".3g") -> str:
    return "" if value is None else format(value, fmt)


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _by_op(rows: Sequence[Row]) -> dict[str, list[Row]]:
    ops: dict[str, list[Row]] = {}
    for row in rows:
        ops.setdefault(row.op, []).append(row)
    return ops


def summary_table(rows: Sequence[Row]) -> str:
    """Per op: one line per (case, mode), one column per provider, median ms or the status."""
    parts = []
    for op, op_rows in _by_op(rows).items():
        providers = _ordered([r.provider for r in op_rows])
        metric = op_rows[0].metric
        parts.append(f"### {op}: median ms (and {metric}) per provider\n")
        parts.append("| case | mode | " + " | ".join(providers) + " |")
        parts.append("|---|---|" + "---|" * len(providers))
        cells: dict[tuple, dict[str, str]] = {}
        for r in op_rows:
            text = f"{r.median_ms:.3g} ({r.throughput:.3g})" if r.status == OK else r.status
            cells.setdefault((r.case, r.mode), {})[r.provider] = text
        for (case, mode), by_provider in cells.items():
            parts.append(f"| {case} | {mode} | " + " | ".join(by_provider.get(p, "") for p in providers) + " |")
        parts.append("")
    return "\n".join(parts)


def details_table(rows: Sequence[Row]) -> str:
    parts = []
    for op, op_rows in _by_op(rows).items():
        metric = op_rows[0].metric
        parts.append(f"### {op}\n")
        parts.append(
            f"| case | mode | provider | status | median ms | p20-p80 ms | {metric} | peak MiB | x naive | x best peer | check err | device | reason |"
        )
        parts.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in op_rows:
            spread = f"{r.p20_ms:.3g}-{r.p80_ms:.3g}" if r.p20_ms is not None else ""
            peer = f"{r.speedup_vs_best_peer:.2f} ({r.best_peer})" if r.speedup_vs_best_peer is not None else ""
            memory = _num(r.peak_mem_mib, ".4g") if r.peak_mem_mib is not None else _cell(r.memory_note, 40)
            parts.append(
                f"| {r.case} | {r.mode} | {r.provider} | {r.status} | {_num(r.median_ms)} | {spread} | "
                f"{_num(r.throughput)} | {memory} | {_num(r.speedup_vs_naive, '.2f')} | {peer} | "
                f"{_num(r.check_error, '.1e')} | {r.device} | {_cell(r.reason)} |"
            )
        parts.append("")
    return "\n".join(parts)


def markdown(data: dict, rows: Sequence[Row]) -> str:
    env, settings = data["environment"], data["settings"]
    lines = [f"# fastattn benchmarks on {env.get('device', '?')}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- command: `{settings.get('command', '')}`", f"- preset: {settings.get('preset')}, dtype: {settings.get('dtype')}"]
    if data.get("interrupted"):
        lines.append(f"- **interrupted**: {data['interrupted']}")
    lines += [
        "",
        "Times are medians (20th-80th percentile spread in the details) of the call in each mode: "
        "forward = inference under no_grad, backward = the backward alone, forward+backward = both. "
        "On a CPU the providers of one case and mode are timed together in interleaved rounds (one "
        "call each per round), so a slow phase of the machine slows them alike. "
        "Each provider's output and gradients were checked against the float64 reference before "
        "timing; a mismatch is reported as failed and not timed. x naive = naive's median over this "
        "one's; x best peer (fastattn rows) = the same for the fastest provider that is not a "
        "fastattn backend, naive included. Peak memory: allocated above the inputs during one "
        "call. Throughput formulas: fastattn/bench/<op>.py (attention_flops, norm_bytes, "
        "ffn_flops, model_tokens, decode_bytes).",
        "",
    ]
    if data["unavailable_providers"]:
        lines += ["## Providers not run on this machine", "", "| op | provider | reason |", "|---|---|---|"]
        lines += [f"| {u['op']} | {u['provider']} | {_cell(u['reason'], 300)} |" for u in data["unavailable_providers"]]
        lines.append("")
    lines += ["## Summary", "", summary_table(rows), "## Details", "", details_table(rows)]
    return "\n".join(lines)


def short_table(rows: Sequence[Row]) -> str:
    """Printed last: per op and variant, the largest case in forward+backward (else its last
    mode), one line per provider."""
    header = ("op", "case", "mode", "provider", "status", "ms", "throughput", "x naive")
    lines = [header]
    for op, op_rows in _by_op(rows).items():
        for variant in _ordered([r.variant for r in op_rows]):
            vrows = [r for r in op_rows if r.variant == variant]
            largest = max(r.x for r in vrows)
            modes = _ordered([r.mode for r in vrows])
            mode = "forward+backward" if "forward+backward" in modes else modes[-1]
            for r in vrows:
                if r.x == largest and r.mode == mode:
                    lines.append(
                        (
                            op,
                            r.case,
                            mode,
                            r.provider,
                            r.status,
                            _num(r.median_ms) or "-",
                            f"{r.throughput:.3g} {r.metric}" if r.throughput is not None else "-",
                            _num(r.speedup_vs_naive, ".2f") or "-",
                        )
                    )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def plot(rows: Sequence[Row], out_dir: str, device: str) -> tuple[list[str], Optional[str]]:
    """One PNG per op: throughput (top) and peak memory (bottom) against the swept size, one
    line per provider, one column per mode, one row pair per variant. (paths, reason if none)."""
    try:
        import matplotlib
    except ImportError as err:
        return [], f"matplotlib is not installed ({err})"
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = []
    for op, op_rows in _by_op(rows).items():
        ok = [r for r in op_rows if r.status == OK]
        if not ok:
            continue
        variants = _ordered([r.variant for r in op_rows])
        modes = [m for m in MODES if any(r.mode == m for r in op_rows)]
        fig, axes = plt.subplots(
            2 * len(variants), len(modes), figsize=(5.5 * len(modes), 3.6 * 2 * len(variants)), squeeze=False
        )
        for vi, variant in enumerate(variants):
            for mi, mode in enumerate(modes):
                top, bottom = axes[2 * vi][mi], axes[2 * vi + 1][mi]
                for provider in _ordered([r.provider for r in op_rows]):
                    line = sorted((r for r in ok if r.variant == variant and r.mode == mode and r.provider == provider), key=lambda r: r.x)
                    if line:
                        top.plot([r.x for r in line], [r.throughput for r in line], marker="o", label=provider)
                    mem = [r for r in line if r.peak_mem_mib is not None]
                    if mem:
                        bottom.plot([r.x for r in mem], [r.peak_mem_mib for r in mem], marker="o", label=provider)
                sweep, metric = op_rows[0].sweep, op_rows[0].metric
                top.set_title(f"{op} {variant}, {mode}", fontsize=10)
                top.set_ylabel(metric)
                bottom.set_ylabel("peak MiB above inputs")
                for ax in (top, bottom):
                    ax.set_xscale("log", base=2)
                    ax.set_xlabel(sweep)
                    ax.grid(True, alpha=0.3)
                top.legend(fontsize=7)
        fig.suptitle(f"fastattn {op} benchmark on {device}", fontsize=12)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths, None


def write_all(out_dir: str, data: dict, rows: Sequence[Row], plots: bool = True) -> list[str]:
    """results.json, results.csv, table.md and the plots; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("results.json", "results.csv", "table.md")]
    write_json(paths[0], data)
    write_csv(paths[1], rows)
    if plots:
        images, reason = plot(rows, out_dir, data["environment"].get("device", ""))
        paths += images
        if reason:
            data["settings"]["plots"] = f"not drawn: {reason}"
            write_json(paths[0], data)
    with open(paths[2], "w") as f:
        f.write(markdown(data, rows))
    return paths
