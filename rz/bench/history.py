"""The results history: one JSON result per line, appended by every run, read by `report` and the gate."""

import json
from pathlib import Path

from rz.bench.errors import BenchError
from rz.bench.schema import validate_result

DEFAULT_HISTORY = Path("benchmarks/results/history.jsonl")


def append_history(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(result, separators=(",", ":")) + "\n")


def load_results(path: Path) -> list[dict]:
    """Every result in a .jsonl history or a single .json result file, each validated."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise BenchError(f"cannot read results file {path}: {error.strerror or error}") from None
    if path.suffix != ".jsonl" and text.lstrip().startswith("{") and "\n{" not in text.strip():
        documents = [(1, text)]
    else:
        documents = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    results = []
    for number, document in documents:
        try:
            result = json.loads(document)
        except ValueError as error:
            raise BenchError(f"{path}:{number} is not JSON: {error}") from None
        try:
            validate_result(result)
        except BenchError as error:
            raise BenchError(f"{path}:{number}: {error}") from None
        results.append(result)
    if not results:
        raise BenchError(f"{path} holds no results")
    return results
