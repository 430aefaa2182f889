"""What a run writes to its output folder:

- results.json: {"schema_version": 1, "environment": {...}, "cases": [record, ...]}; a record
  is {suite, name, group, params, error, baseline, sparsity, bytes, flops: {dense, sparse},
  ideal_speedup, overheads: {name: fraction}, wall_s, methods: {name: {status, ...}}} with status
  "ok" (median_s, q25_s, q75_s, min_s, max_s, rounds, first_call_s, peak_mem_bytes, speedup,
  efficiency, gbps, pct_of_copy; null where not applicable), "unavailable" (reason) or
  "error" (error, traceback). A case that failed as a whole (building it, or an error outside
  its methods) has error set and no methods.
- results.md: the tables the terminal shows, one per suite, then the plots.
- speedup_<suite>_<group>.png: speedup over the baseline against sparsity, one curve per
  method and the ideal, for every group of cases with at least two sparsities.
"""
import json
import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SCHEMA_VERSION = 1


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
            f"timm {env['timm']}, sparse_ops {env['sparse_ops']}, torch.compile {'on' if env['compile'] else 'off'}; "
            f"{env['timer']}; sparse_ops kernels: {kernels}.\n")


def columns(suite, device: str) -> list:
    cols = ["case", "method", "median", "spread (IQR)", "speedup"]
    cols += ["GB/s", "% of copy"] if suite.MEMORY_BOUND else ["ideal", "efficiency"]
    return cols + (["peak memory"] if device == "cuda" else [])


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
        rows = [{"case": label if i == 0 else "", "method": name, **_method_cells(m)}
                for i, (name, m) in enumerate(record["methods"].items())]
        if record["ideal_speedup"] is not None:
            rows[0]["ideal"] = f"{record['ideal_speedup']:.2f}×"
        rows += [{"method": f"{name} overhead", "median": "n/a" if v is None else f"{100 * v:+.1f} %"}
                 for name, v in record["overheads"].items()]
    return "".join(f"| {' | '.join(_cell(row.get(c, '')) for c in cols)} |\n" for row in rows)


def write(out, env: dict, records: list, markdown: str) -> None:
    (out / "results.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "environment": env, "cases": records}, indent=1) + "\n")
    (out / "results.md").write_text(markdown)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


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
        for method in methods:
            points = [(r["sparsity"], r["methods"][method]["speedup"]) for r in rs
                      if r["methods"].get(method, {}).get("speedup") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xlabel(f"sparsity ({suites[suite].X_LABEL})")
        ax.set_ylabel(f"speedup over {rs[0]['baseline']}")
        ax.set_title(f"{suite}: {group}\n{env['device']}, {env['dtype']}", fontsize=9)
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
