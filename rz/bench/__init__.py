"""rz.bench: statistically sound benchmarks of rz side by side with llama.cpp and Ollama.

`python -m rz.bench --model M.gguf --engines rz,llama.cpp` runs llama-bench's tests (pp512,
tg128, pp+tg, at a KV depth, for a batch) on every engine, interleaved, repeating until the
coefficient of variation settles; prints llama-bench's table with the rz/peer ratios; writes a
result that validates against rz.bench.schema; and appends it to benchmarks/results/history.jsonl,
which `python -m rz.bench report` renders as tables and a plot. See rz/bench/cli.py for the commands.
"""
