"""`python -m rz.bench report`: the history as markdown tables and a plot of tok/s over commits."""

from pathlib import Path

from rz.bench.tables import markdown_table, throughput_table


def render_report(results: list[dict], plot_path: Path | None) -> str:
    """Markdown: per model, the latest run's table and tok/s run by run; then serving runs."""
    engine_runs = [r for r in results if r["mode"] == "engines"]
    serving_runs = [r for r in results if r["mode"] == "serving"]
    parts = ["# rz benchmarks"]
    if plot_path is not None and engine_runs:
        parts.append(f"![tok/s over commits]({plot_path.name})")
    for sha, runs in _by_model(engine_runs).items():
        latest = runs[-1]
        parts.append(f"## {latest['model'].get('description') or latest['model']['file_name']} "
                     f"({latest['model']['file_name']}, sha256 {sha[:12]}…)")
        parts.append(f"Latest run, {latest['created']} at {_commit(latest)}:\n\n{throughput_table(latest)}")
        parts.append(f"Run by run (mean tok/s):\n\n{trend_table(runs)}")
    if serving_runs:
        parts.append("## Serving\n\n" + serving_table(serving_runs))
    return "\n\n".join(parts) + "\n"


def trend_table(runs: list[dict]) -> str:
    """One row per run (date, commit), one column per engine and test, then the subject/peer ratios."""
    columns, ratio_columns = [], []
    for run in runs:
        for entry in run["results"]:
            key = (entry["engine"], entry["test"]["name"])
            if entry["status"] == "ok" and key not in columns:
                columns.append(key)
        for ratio in run["ratios"]:
            key = (ratio["engine"], ratio["peer"], ratio["test"])
            if key not in ratio_columns:
                ratio_columns.append(key)
    header = ["date", "commit", "threads"] + [f"{engine} {test}" for engine, test in columns] + [f"{a}/{b} {test}" for a, b, test in ratio_columns]
    rows = []
    for run in runs:
        means = {(e["engine"], e["test"]["name"]): e["tokens_per_second"]["mean"] for e in run["results"] if e["status"] == "ok"}
        ratios = {(r["engine"], r["peer"], r["test"]): r["ratio"] for r in run["ratios"]}
        rows.append([run["created"][:16].replace("T", " "), _commit(run), str(run["settings"].get("threads", ""))]
                    + [f"{means[key]:.2f}" if key in means else "" for key in columns]
                    + [f"{ratios[key]:.2f}" if key in ratios else "" for key in ratio_columns])
    return markdown_table(header, rows, right_from=3)


def serving_table(runs: list[dict]) -> str:
    header = ["date", "commit", "engine", "url", "arrivals", "requests", "req/s", "out tok/s", "TTFT p50/p99 ms",
              "TPOT p50 ms", "ITL p99 ms"]
    rows = []
    for run in runs:
        s = run["serving"]
        arrivals = s["arrivals"]
        shape = f"{arrivals['concurrency']} clients" if arrivals.get("concurrency") else f"Poisson {arrivals.get('rate')}/s"
        rows.append([
            run["created"][:16].replace("T", " "), _commit(run), s["engine"], s["url"], shape,
            f"{s['completed']}/{s['requests']}", f"{s['request_throughput']:.2f}", f"{s['output_token_throughput']:.1f}",
            _pair(s["ttft_s"]), f"{s['tpot_s']['p50'] * 1e3:.1f}" if s["tpot_s"] else "-",
            f"{s['itl_s']['p99'] * 1e3:.1f}" if s["itl_s"] else "-",
        ])
    return markdown_table(header, rows, right_from=5)


def plot_history(results: list[dict], path: Path) -> Path | None:
    """A PNG with one panel per (model, test): tok/s with stdev bars, run by run, a line per engine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels: dict[tuple[str, str], dict[str, list]] = {}
    runs_by_model = _by_model([r for r in results if r["mode"] == "engines"])
    for sha, runs in runs_by_model.items():
        for index, run in enumerate(runs):
            for entry in run["results"]:
                if entry["status"] != "ok":
                    continue
                panel = panels.setdefault((sha, entry["test"]["name"]), {})
                summary = entry["tokens_per_second"]
                panel.setdefault(entry["engine"], []).append((index, summary["mean"], summary["stdev"]))
    if not panels:
        return None
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for axis, ((sha, test), engines) in zip(axes[:, 0], panels.items()):
        runs = runs_by_model[sha]
        model = runs[-1]["model"]["file_name"]
        for engine, points in engines.items():
            xs, ys, errors = zip(*points)
            axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=engine)
        axis.set_title(f"{model}: {test}")
        axis.set_ylabel("tok/s")
        axis.set_xticks(range(len(runs)))
        axis.set_xticklabels([f"{_commit(run)} t{run['settings'].get('threads', '?')}" for run in runs],
                             rotation=30, ha="right", fontsize=8)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _by_model(runs: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: r["created"]):
        grouped.setdefault(run["model"]["sha256"], []).append(run)
    return grouped


def _commit(run: dict) -> str:
    git = run["environment"]["rz_git"]
    return (git["commit"] or "unknown")[:8] + ("+" if git["dirty"] else "")


def _pair(latency: dict | None) -> str:
    return f"{latency['p50'] * 1e3:.1f}/{latency['p99'] * 1e3:.1f}" if latency else "-"
