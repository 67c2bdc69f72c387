"""The engines rz.bench compares, by the names --engines takes."""

from dataclasses import replace

from rz.bench.engines.base import Engine, EngineSettings, Sample
from rz.bench.engines.http_engines import LlamaServerEngine, OllamaEngine, OpenAIServerEngine
from rz.bench.engines.llamacpp import LlamaCppEngine
from rz.bench.engines.rz_engine import RzEngine
from rz.bench.engines.worker import WorkerEngine
from rz.bench.errors import BenchError

ENGINES = {engine.name: engine for engine in (RzEngine, LlamaCppEngine, LlamaServerEngine, OpenAIServerEngine, OllamaEngine)}
DEFAULT_URLS = {"llama-server": "http://127.0.0.1:8080", "ollama": "http://127.0.0.1:11434", "openai": "http://127.0.0.1:8000"}


def parse_engines(text: str) -> list[tuple[str, str | None]]:
    """(name, url) for each item of 'rz,llama.cpp,llama-server=http://host:8080,ollama'."""
    parsed = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        name, _, url = item.partition("=")
        name = name.strip().lower()
        if name not in ENGINES:
            raise BenchError(f"unknown engine {name!r}: choose from {', '.join(ENGINES)}")
        if url and ENGINES[name].kind != "http":
            raise BenchError(f"engine {name} runs in process and takes no URL (got {item!r})")
        if any(name == seen for seen, _ in parsed):
            raise BenchError(f"engine {name} is named twice in --engines")
        parsed.append((name, url.strip() or DEFAULT_URLS.get(name)))
    if not parsed:
        raise BenchError("--engines is empty: name at least one engine, like rz,llama.cpp")
    return parsed


def create_engine(name: str, url: str | None, settings: EngineSettings) -> Engine:
    """The engine called name; in-process engines get a worker process when settings.isolated."""
    engine_class = ENGINES[name]
    settings = replace(settings, url=url)
    if engine_class.kind == "in-process" and settings.isolated:
        return WorkerEngine(engine_class, settings)
    return engine_class(replace(settings, isolated=False))


__all__ = ["ENGINES", "Engine", "EngineSettings", "Sample", "create_engine", "parse_engines"]
