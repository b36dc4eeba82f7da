#!/usr/bin/env bash
# Builds the wheelhouse the one-call GPU check carries to the H200 box, and prints the device `run` call.
#
#   bash benchmarks/gpu_check_prepare.sh          # from the repository root, on a machine with pip and network
#
# The box (Python 3.12, manylinux x86_64, no network) has torch, transformers, accelerate, peft, triton,
# numpy, tqdm, psutil, ninja, einops, msgpack and py-cpuinfo, and lacks what is downloaded here: pydantic
# (distlora's config) and its pieces, hjson (DeepSpeed's), liger-kernel, and DeepSpeed, whose sdist is built
# into a pure-Python wheel with DS_BUILD_OPS=0 (no compiled ops: distlora's ZeRO path steps torch's AdamW).
# distlora itself needs no wheel: the working tree travels with every call and the check puts it on
# PYTHONPATH. Versions are those of this project's own environment (.venv), where the tests pass.
set -euo pipefail

WHL=.whl                     # ignored (.gitignore): named in the call's carry list
PY=${PY:-python3}            # any pip; the downloads name the box's platform, not this one's
BUILD_PY=${BUILD_PY:-.venv/bin/python}  # builds DeepSpeed's wheel: its setup.py imports torch
LIMIT_MIB=48                 # the call carries 64 MiB in all, the working tree included

[ -f benchmarks/gpu_check.py ] || { echo "run from the repository root" >&2; exit 2; }
rm -rf "$WHL" && mkdir -p "$WHL"

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$WHL" \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 hjson==3.1.0 liger-kernel==0.8.5

sdist=$(mktemp -d)
trap 'rm -rf "$sdist"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$sdist" deepspeed==0.19.8
DS_BUILD_OPS=0 "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "$sdist"/deepspeed-*.tar.gz

ls -l "$WHL"
size=$(du -sm "$WHL" | cut -f1)
echo "wheelhouse: $size MiB in $WHL (limit $LIMIT_MIB MiB here, 64 MiB per call with the working tree)"
[ "$size" -le "$LIMIT_MIB" ] || { echo "wheelhouse too large for one call" >&2; exit 1; }

# The call: install into a user site (the box's own packages stay as they are), then the check. Its own
# budget (--budget-s 450) ends it inside the 540 s; each stage's line is in $OUT/gpu_check.jsonl as it ends.
cmd="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHL/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --budget-s 450"
echo
echo "device run call (command ${#cmd} chars, at most 2000):"
echo "  command:   $cmd"
echo "  carry:     [\"$WHL\"]"
echo "  timeout_s: 540"
