"""Markdown tables of a result: llama-bench's throughput table with ratios, then latency and resources."""


def markdown_tables(result: dict) -> str:
    """Every table of one engines-mode result, and the notes that qualify its numbers."""
    return "\n\n".join(part for part in (throughput_table(result), latency_table(result), engine_table(result), notes(result)) if part)


def throughput_table(result: dict) -> str:
    """model | size | params | engine | backend | threads | test | t/s | subject/peer ..."""
    model = result["model"]
    engines = {engine["name"]: engine for engine in result["engines"]}
    ratios = {(r["test"], r["peer"]): r for r in result["ratios"]}
    subject = result["engines"][0]["name"] if result["engines"] else None
    peers = [name for name in engines if name != subject and any(r["peer"] == name for r in result["ratios"])]
    header = ["model", "size", "params", "engine", "backend", "threads", "test", "t/s"] + [f"{subject} / {peer}" for peer in peers]
    rows = []
    for entry in result["results"]:
        description = engines.get(entry["engine"], {}).get("description", {})
        row = [
            model.get("description") or model["file_name"],
            _bytes(model["file_bytes"]),
            f"{model['parameters'] / 1e6:.2f} M",
            entry["engine"],
            str(description.get("backend") or ""),
            str(description.get("threads") if description.get("threads") is not None else "-"),
            entry["test"]["name"],
            _throughput(entry),
        ]
        for peer in peers:
            ratio = ratios.get((entry["test"]["name"], peer)) if entry["engine"] == subject else None
            row.append(_ratio(ratio) if ratio else "")
        rows.append(row)
    return markdown_table(header, rows, right_from=7)


def latency_table(result: dict) -> str:
    """Per test and engine: TTFT, TPOT and ITL percentiles, bandwidth, repetitions and outliers."""
    header = ["engine", "test", "TTFT p50/p95/p99 ms", "TPOT p50 ms", "ITL p50/p95/p99 ms", "GB/s (of machine)",
              "warm-up s", "reps (stop)", "outliers"]
    rows = []
    for entry in result["results"]:
        if entry["status"] != "ok":
            continue
        latency = entry["latency"]
        bandwidth = entry["bandwidth"]
        share = ""
        if bandwidth:
            fraction = bandwidth["fraction_of_machine"]
            share = f"{bandwidth['achieved_gb_per_s']:.1f}" + (f" ({fraction:.0%})" if fraction else "")
        warmup = entry["warmup"][0]["seconds"] if entry["warmup"] else None
        rows.append([
            entry["engine"], entry["test"]["name"], _percentiles(latency["ttft_s"]),
            _ms(latency["tpot_s"]["p50"]) if latency["tpot_s"] else "-", _percentiles(latency["itl_s"]), share or "-",
            f"{warmup:.2f}" if warmup is not None else "-",
            f"{entry['tokens_per_second']['n']} ({entry['stop_reason']})",
            ", ".join(f"#{o['index'] + 1} {o['value']:.1f} (z {o['robust_z']:+.1f})" for o in entry["outliers"]) or "-",
        ])
    return markdown_table(header, rows, right_from=2) if rows else ""


def engine_table(result: dict) -> str:
    """Per engine: version, load time, compile time and peak memory."""
    header = ["engine", "version", "load s", "compile s", "peak RSS", "RSS before load"]
    rows = []
    for engine in result["engines"]:
        resources = engine["resources"]
        compiled = resources.get("compile_seconds") or {}
        rows.append([
            engine["name"],
            str(engine["description"].get("version") or engine.get("url") or "-"),
            f"{engine['load_seconds']:.2f}" if engine["load_seconds"] is not None else "-",
            f"{sum(compiled.values()):.2f} ({len(compiled)} steps)" if compiled else "-",
            _bytes(resources.get("peak_rss_bytes")),
            _bytes(resources.get("rss_before_load_bytes")),
        ])
    return markdown_table(header, rows, right_from=2)


def notes(result: dict) -> str:
    """What the reader needs to trust the numbers: machine, method, skipped and failed tests."""
    environment = result["environment"]
    cpu = environment["cpu"]
    git = environment["rz_git"]
    settings = result["settings"]
    lines = [
        f"- machine: {cpu['model']}, {cpu['usable_cores']} usable cores, flags {' '.join(cpu['flags']) or '-'}, "
        f"{_bytes(environment['memory_bytes'])} RAM; load average at start {_load(environment.get('load_average'))}; "
        f"rz's CPU kernels {environment.get('cpu_kernels') or 'off (XLA paths)'}",
        f"- rz {environment['packages'].get('rz')} at {(git['commit'] or 'unknown')[:10]}{' (uncommitted changes)' if git['dirty'] else ''}; "
        f"model {result['model']['file_name']} sha256 {result['model']['sha256'][:12]}…",
        f"- method: {settings['warmup']} warm-up repetition(s) discarded; repetitions until CV ≤ {settings['cv_threshold']:.0%} "
        f"(at least {settings['reps_min']}, at most {settings['reps_max']} or {settings['max_time_s']:g} s); engines interleaved, "
        "order alternating each round; t/s is mean ± sample stdev; ratios ± their propagated stdev",
    ]
    bandwidth = result.get("machine_bandwidth")
    if bandwidth:
        lines.append(f"- machine bandwidth: {bandwidth['gb_per_s']:.1f} GB/s ({bandwidth['method']}, {bandwidth['threads']} threads); "
                     f"decode reads {_bytes(result['model']['weight_bytes_per_token'])} of weights per step")
    if any(e["test"]["depth"] for e in result["results"] if e["engine"] == "rz"):
        lines.append("- rz at a depth: the prefix prefilled into an emptied prefix cache first, untimed; the timed request reuses it")
    for engine in result["engines"]:
        for note in engine.get("notes", []):
            lines.append(f"- {engine['name']}: {note}")
    for entry in result["results"]:
        if entry["status"] != "ok":
            lines.append(f"- {entry['engine']} {entry['test']['name']}: {entry['status']}: {entry['reason']}")
    return "\n".join(lines)


def _throughput(entry: dict) -> str:
    if entry["status"] != "ok":
        return entry["status"]
    summary = entry["tokens_per_second"]
    spread = f"{summary['stdev']:.2f}" if summary["n"] > 1 else "n/a"
    return f"{summary['mean']:.2f} ± {spread}"


def _ratio(ratio: dict) -> str:
    spread = f"{ratio['ratio'] * ratio['cv']:.2f}" if ratio["cv"] is not None else "n/a"
    return f"{ratio['ratio']:.2f} ± {spread}"


def _percentiles(latency: dict | None) -> str:
    if not latency:
        return "-"
    return "/".join(_ms(latency[key]) for key in ("p50", "p95", "p99"))


def _ms(seconds: float) -> str:
    milliseconds = seconds * 1e3
    return f"{milliseconds:.1f}" if milliseconds >= 10 else f"{milliseconds:.2f}"


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _load(load_average) -> str:
    return " ".join(f"{value:.2f}" for value in load_average) if load_average else "-"


def markdown_table(header: list[str], rows: list[list[str]], right_from: int) -> str:
    """A markdown table with columns padded to their widest cell; numeric columns right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    def line(cells):
        return "| " + " | ".join(
            str(cell).rjust(width) if index >= right_from else str(cell).ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths))
        ) + " |"
    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i >= right_from else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), rule] + [line(row) for row in rows])
