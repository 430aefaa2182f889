"""What a run writes to its output folder:

- results.json: {"schema_version": 1, "environment": {...}, "cases": [record, ...]}; a record
  is {suite, name, group, params, error, baseline, sparsity, bytes, flops: {dense, sparse},
  ideal_speedup, overheads: {name: fraction}, wall_s, methods: {name: {status, ...}}} with status
  "ok" (median_s, q25_s, q75_s, min_s, max_s, rounds, first_call_s, peak_mem_bytes, speedup,
  efficiency, gbps, pct_of_copy; null where not applicable), "unavailable" (reason) or
  "error" (error, traceback). A case that failed as a whole (building it, or an error outside
  its methods) has error set and no methods.
- results.md: the tables the terminal shows, one per suite, the rows not to be trusted (see
  `unreliable`) with what to do about them, then the plots.
- speedup_<suite>_<group>.png: speedup over the baseline against sparsity, one curve per
  method (error bars: the interquartile range of its rounds) and the ideal, for every group
  of cases with at least two sparsities; an outlier is drawn at a clipped axis's edge.
"""
import json
import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SCHEMA_VERSION = 1
# A row whose spread (half its interquartile range over its median: the "±" shown), or its
# baseline's, passes this is marked unreliable: its speedup divides two medians that moved.
SPREAD_LIMIT = 0.10


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:160]


def header(env: dict) -> str:
    device = env["device_type"]  # ops that run stock torch ops on this device are not listed
    kernels = ", ".join(f"{op} {b[device]}" for op, b in env["backends"].items() if b[device] != "torch")
    return (f"# sparse_ops benchmarks — {env['device']}, {env['dtype']}\n\n"
            f"`{env['command']}` on {env['date']}; commit {env['git_commit'][:12]}"
            f"{' (uncommitted changes)' if env['git_dirty'] else ''}; torch {env['torch']}, triton {env['triton']}, "
            f"timm {env['timm']}, sparse_ops {env['sparse_ops']}, {env['cpu_threads']} CPU threads, "
            f"torch.compile {'on' if env['compile'] else 'off'}; "
            f"{env['timer']}; sparse_ops kernels: {kernels}.\n")


def columns(suite, device: str) -> list:
    cols = ["case", "method", "median", "spread (IQR)", "speedup"]
    cols += ["GB/s", "% of copy"] if suite.MEMORY_BOUND else ["ideal", "efficiency"]
    return cols + (["peak memory"] if device == "cuda" else []) + ["unreliable"]


def spread(m: dict) -> float:
    """Half the interquartile range of a method's rounds over their median (the "±" shown)."""
    return (m["q75_s"] - m["q25_s"]) / 2 / m["median_s"]


def unreliable(record: dict, name: str) -> list:
    """Why the row of method `name` in a case's record is not to be trusted (empty: no
    reason found): its spread or its baseline's above SPREAD_LIMIT, or an efficiency above
    100 % (faster than the FLOP ideal: noise, or work the FLOP count leaves out)."""
    m = record["methods"][name]
    if m["status"] != "ok":
        return []
    checked = {"spread": m}
    if record["baseline"] != name:
        checked[f"{record['baseline']}'s spread"] = record["methods"].get(record["baseline"])
    reasons = [f"{what} ±{100 * spread(of):.1f} %" for what, of in checked.items()
               if of is not None and of["status"] == "ok" and spread(of) > SPREAD_LIMIT]
    if m["efficiency"] is not None and m["efficiency"] > 1.0:
        reasons.append(f"efficiency {m['efficiency']:.0%} > 100 %")
    return reasons


def suite_header(suite, device: str) -> str:
    cols = columns(suite, device)
    return (f"\n## {suite.NAME}\n\n{suite.__doc__.split(':', 1)[1].strip()}\n\n"
            f"| {' | '.join(cols)} |\n|{'---|' * len(cols)}\n")


def _method_cells(m: dict) -> dict:
    if m["status"] == "unavailable":
        return {"median": f"unavailable: {m['reason']}"}
    if m["status"] == "error":
        return {"median": f"error: {m['error']}"}
    cells = {"median": _time(m["median_s"]),
             "spread (IQR)": f"±{50 * (m['q75_s'] - m['q25_s']) / m['median_s']:.1f} %"}
    for column, key, fmt in (("speedup", "speedup", "{:.2f}×"), ("efficiency", "efficiency", "{:.0%}"),
                             ("GB/s", "gbps", "{:.1f}"), ("% of copy", "pct_of_copy", "{:.0f}%")):
        if m[key] is not None:
            cells[column] = fmt.format(m[key])
    if m["peak_mem_bytes"] is not None:
        cells["peak memory"] = f"{m['peak_mem_bytes'] / 2**20:.1f} MiB"
    return cells


def case_rows(record: dict, cols: list) -> str:
    label = record["name"].split("/", 1)[1]
    if record["error"] is not None:
        rows = [{"case": label, "method": "(case)", "median": f"error: {record['error']['error']}"}]
    else:
        rows = [{"case": label if i == 0 else "", "method": name, **_method_cells(m),
                 "unreliable": "; ".join(f"⚠ {why}" for why in unreliable(record, name))}
                for i, (name, m) in enumerate(record["methods"].items())]
        if record["ideal_speedup"] is not None:
            rows[0]["ideal"] = f"{record['ideal_speedup']:.2f}×"
        rows += [{"method": f"{name} overhead", "median": "n/a" if v is None else f"{100 * v:+.1f} %"}
                 for name, v in record["overheads"].items()]
    return "".join(f"| {' | '.join(_cell(row.get(c, '')) for c in cols)} |\n" for row in rows)


def unreliable_section(records: list) -> str:
    """The rows marked unreliable, with their reasons and what to do about them."""
    rows = [(r["name"], name, why) for r in records if r["error"] is None
            for name in r["methods"] if (why := unreliable(r, name))]
    if not rows:
        return ""
    return (f"\n## Unreliable rows\n\n{len(rows)} rows are marked ⚠. A spread above ±{SPREAD_LIMIT:.0%} (the row's or "
            "its baseline's) means the machine's noise moved the medians the speedup divides; an efficiency above "
            "100 % is that noise, or work that pruning saves and the FLOP ideal leaves out. Rerun these cases with "
            "more rounds on a quiet machine (nothing else running), e.g. "
            "`python -m benchmarks --rounds 30 --case <name>`:\n\n"
            + "".join(f"- {case} {name}: {'; '.join(why)}\n" for case, name, why in rows))


def write(out, env: dict, records: list, markdown: str) -> None:
    (out / "results.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "environment": env, "cases": records}, indent=1) + "\n")
    (out / "results.md").write_text(markdown)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def speedup_band(record: dict, name: str) -> tuple:
    """(low, median, high) speedup of a method over the baseline's median: its own rounds'
    interquartile range, as the plots' error bars."""
    m, base = record["methods"][name], record["methods"][record["baseline"]]["median_s"]
    return base / m["q75_s"], m["speedup"], base / m["q25_s"]


def axis_limit(values: list, ideals: list):
    """The top of a plot's speedup axis when some value passes it, else None: twice the largest
    ideal (without ideals, three times the median value), so that one outlier (a noisy round
    gave naive 311x against an ideal of 1.32x) does not flatten every other curve."""
    if not values:
        return None
    limit = 2 * max(ideals) if ideals else 3 * sorted(values)[len(values) // 2]
    return limit if max(values) > limit else None


def plot(records: list, suites: dict, out, env: dict) -> list:
    """Writes the speedup plots; returns their file names."""
    groups = {}
    for r in records:
        if r["error"] is None and r["sparsity"] is not None:
            groups.setdefault((r["suite"], r["group"]), []).append(r)
    names = []
    for (suite, group), rs in groups.items():
        if len({r["sparsity"] for r in rs}) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["sparsity"])
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.axhline(1.0, color="0.6", linewidth=0.8)
        if rs[0]["ideal_speedup"] is not None:
            ax.plot([r["sparsity"] for r in rs], [r["ideal_speedup"] for r in rs], "k--", label="ideal (FLOPs)")
        methods = [m for m in rs[0]["methods"] if m not in (rs[0]["baseline"], "copy")]
        bands = {method: [(r["sparsity"], *speedup_band(r, method)) for r in rs
                          if r["methods"].get(method, {}).get("speedup") is not None] for method in methods}
        limit = axis_limit([p[3] for points in bands.values() for p in points],
                           [r["ideal_speedup"] for r in rs if r["ideal_speedup"] is not None])
        for method, points in bands.items():
            if not points:
                continue
            x, low, mid, high = (list(v) for v in zip(*points))
            shown = [min(v, limit) if limit else v for v in mid]
            line = ax.errorbar(x, shown, yerr=[[max(s - lo, 0) for s, lo in zip(shown, low)],
                                               [max(min(hi, limit or hi) - s, 0) for s, hi in zip(shown, high)]],
                               marker="o", capsize=3, label=method)
            for xi, value in zip(x, mid):
                if limit and value > limit:  # an outlier: at the edge, its value written beside it
                    ax.plot(xi, limit, marker="^", markersize=9, color=line[0].get_color())
                    ax.annotate(f"{value:.2f}×", (xi, limit), textcoords="offset points", xytext=(4, -12), fontsize=7)
        clipped = f"; axis clipped at {limit:.2f}×, ▲ = above it" if limit else ""
        if limit:
            ax.set_ylim(0, limit * 1.05)
        ax.set_xlabel(f"sparsity ({suites[suite].X_LABEL})")
        ax.set_ylabel(f"speedup over {rs[0]['baseline']}")
        ax.set_title(f"{suite}: {group}\n{env['device']}, {env['dtype']}; error bars: IQR of the rounds{clipped}",
                     fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"speedup_{slug(suite)}_{slug(group)}.png"
        fig.savefig(out / name)
        plt.close(fig)
        names.append(name)
    return names


def plots_section(names: list) -> str:
    if not names:
        return ""
    return "\n## Plots\n\n" + "".join(f"![{n}]({n})\n" for n in names)
