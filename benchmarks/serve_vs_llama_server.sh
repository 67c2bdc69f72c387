#!/usr/bin/env bash
# rz serve (HTTP and gRPC) against llama-server, SmolLM2 Q4_1, 2 threads, one server at a time,
# N requests (default 16) of 128 prompt / 64 generated tokens at 1 and 8 clients.
#   LLAMA_SERVER=path/to/llama-server [REQUESTS=32] [SUFFIX=-session11-run2] bash benchmarks/serve_vs_llama_server.sh
# llama-server from the llama.cpp sources vendored in llama-cpp-python's sdist:
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
#   cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
#     -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build build --target llama-server -j2
# llama-server runs with --no-repack: its extra (REPACK/AMX) buffers crash on AMX CPUs, as
# rz.bench.llamacpp_setup turns them off for llama-cpp-python.
set -u
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-16}
SUFFIX=${SUFFIX:-}
M=$(.venv/bin/python -c "from rz.model_files import smollm2_135m_path as p; print(p())")
OUT=benchmarks/results
LS=${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}
grep -o 'avx[^ ]*\|amx[^ ]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
wait_http() { for i in $(seq 1 300); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; return 1; }
# llama-server: 8 slots of 512 positions (as rz's --max-batch 8 --n-ctx 512), 2 threads, extra buffer types off (AMX crash)
$LS -m "$M" -t 2 -tb 2 -c 4096 --parallel 8 --port 18183 --no-repack > /tmp/ls.log 2>&1 &
LSPID=$!
wait_http http://127.0.0.1:18183/health || { echo "llama-server failed"; tail /tmp/ls.log; }
for c in 1 8; do
  .venv/bin/python -m rz.bench serve --url http://127.0.0.1:18183 --engine llama-server --model "$M" --concurrency $c --requests "$REQUESTS" --no-history --json $OUT/serve-llama-server-c$c$SUFFIX.json
done
kill $LSPID; wait $LSPID 2>/dev/null
.venv/bin/python -m rz serve --model "$M" --n-ctx 512 --max-batch 8 --port 18182 --http-port 18181 --metrics-port -1 > /tmp/rzs.log 2>&1 &
RZPID=$!
wait_http http://127.0.0.1:18181/health || { echo "rz failed"; tail /tmp/rzs.log; }
# SERVING comes before the other shapes compile (in the background); measure a warm server.
until grep -q "background warm-up done" /tmp/rzs.log; do sleep 1; done
for c in 1 8; do
  .venv/bin/python -m rz.bench serve --url http://127.0.0.1:18181 --engine openai --model "$M" --concurrency $c --requests "$REQUESTS" --no-history --json $OUT/serve-rz-http-c$c$SUFFIX.json
  .venv/bin/python -m rz.bench serve --url grpc://127.0.0.1:18182 --model "$M" --concurrency $c --requests "$REQUESTS" --no-history --json $OUT/serve-rz-grpc-c$c$SUFFIX.json
done
kill $RZPID; wait $RZPID 2>/dev/null
