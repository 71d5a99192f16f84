#!/usr/bin/env bash
# Installs the real inference server of the llama.cpp tests
# (tests/tests/llama_cpp.rs): llama-cpp-python[server], which builds
# llama.cpp from source, and gguf, which writes the tiny model.
#
# The llama-cpp-python wheel is built once into a cache directory
# (ALLOT_WHEEL_CACHE, default ~/.cache/allot/wheels) and installed from
# there afterwards, so only the first run on a machine pays for the build.
# The build is CPU-only and minimal: no BLAS, no GPU backends, no
# multimodal library, no examples, tools, tests or server binaries of
# llama.cpp itself, and portable code (GGML_NATIVE=OFF) so that a cached
# wheel runs on any x86-64 machine.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
GGUF_VERSION=0.19.0
cache="${ALLOT_WHEEL_CACHE:-$HOME/.cache/allot/wheels}"

if python3 -c 'import llama_cpp.server.app, gguf' >/dev/null 2>&1; then
  exit 0
fi

mkdir -p "$cache"
if ! ls "$cache"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl >/dev/null 2>&1; then
  echo "install_llama_server: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source into $cache (the first run on a machine; about 10 minutes on 2 cores)"
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    python3 -m pip wheel --quiet --no-deps --wheel-dir "$cache" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  echo "install_llama_server: built in $(( $(date +%s) - start )) s"
fi

python3 -m pip install --quiet --find-links "$cache" \
  "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" "gguf==$GGUF_VERSION"
