#!/usr/bin/env bash
# Build llama.cpp's llama-bench from the llama.cpp copy vendored in the llama-cpp-python sdist on PyPI,
# and convert the model-core benchmark's OLMoE checkpoint to a bf16 GGUF (benchmarks/llama_cpp.md).
#
# Everything goes under .bench/ (git-ignored); each step is skipped when its output is already there.
# A manual benchmarking helper: never run it from tests or CI (it downloads ~75 MB, compiles for a few
# minutes and writes a 7 GB file).
#
#   benchmarks/build_llama_cpp.sh [CHECKPOINT_DIR]      # default /tmp/emo-bench/olmoe-4l
#   nice -n 19 benchmarks/build_llama_cpp.sh            # while something else needs the cores
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36, the version this was checked with),
#              JOBS (default: nproc), PYTHON (default python3), FORCE_CONVERT=1 to rewrite the GGUF.
# Results: .bench/llama.cpp/build/bin/llama-bench and .bench/olmoe-4l-bf16.gguf
set -euo pipefail

if [[ -n "${CI:-}" || -n "${PYTEST_CURRENT_TEST:-}" ]]; then
    echo "build_llama_cpp.sh: not meant for tests or CI" >&2
    exit 1
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/.bench"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CHECKPOINT="${1:-/tmp/emo-bench/olmoe-4l}"
JOBS="${JOBS:-$(nproc)}"
PYTHON="${PYTHON:-python3}"
SRC="$BENCH/llama.cpp-src/llama_cpp_python-$VERSION/vendor/llama.cpp"
VENV="$BENCH/llama-venv"
GGUF="$BENCH/olmoe-4l-bf16.gguf"
mkdir -p "$BENCH/dl" "$BENCH/llama.cpp-src"

# 1. the sdist (it vendors llama.cpp under vendor/llama.cpp)
SDIST="$BENCH/dl/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: --dest "$BENCH/dl" "llama-cpp-python==$VERSION"
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    tar -xzf "$SDIST" -C "$BENCH/llama.cpp-src"
fi
ln -sfn "$SRC" "$BENCH/llama.cpp"

# 2. llama-bench (CPU only; LLAMA_CURL is gone in recent llama.cpp and only warns; the prebuilt web UI
#    would be fetched from Hugging Face, so it is off along with everything we do not need)
if [[ ! -f "$SRC/build/CMakeCache.txt" ]]; then
    cmake -S "$SRC" -B "$SRC/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
fi
cmake --build "$SRC/build" -j"$JOBS" --target llama-bench
"$SRC/build/bin/llama-bench" --version || true

# 3. a venv for the converter: its own gguf (the vendored gguf-py), sentencepiece and protobuf; torch,
#    transformers, safetensors, numpy and tokenizers are reused from the project venv through a .pth
#    file (read-only), so neither venv's packages change the other's
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PROJECT_SITE="$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$PROJECT_SITE" > "$SITE/emo-serve-venv.pth"
if ! "$VENV/bin/python" -c 'import gguf, sentencepiece, google.protobuf, torch, transformers, tokenizers' 2>/dev/null; then
    "$VENV/bin/pip" install sentencepiece 'protobuf>=4.21,<5' -e "$SRC/gguf-py"
fi

# 4. the checkpoint as a bf16 GGUF (staging folder with symlinks + a small tokenizer next to it)
if [[ ! -f "$CHECKPOINT/config.json" ]]; then
    echo "no checkpoint in $CHECKPOINT: run benchmarks/bench_model.py once (it writes it)" >&2
    exit 1
fi
if [[ ! -s "$GGUF" || -n "${FORCE_CONVERT:-}" ]]; then
    rm -f "$GGUF.part"
    "$VENV/bin/python" "$ROOT/benchmarks/llama_cpp_convert.py" --llama-cpp "$SRC" \
        --checkpoint "$CHECKPOINT" --out "$GGUF.part" --staging "$BENCH/olmoe-4l-bf16.hf"
    mv "$GGUF.part" "$GGUF"
fi

echo "llama-bench: $BENCH/llama.cpp/build/bin/llama-bench"
echo "gguf:        $GGUF"
