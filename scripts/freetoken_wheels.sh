#!/usr/bin/env bash
# Download every wheel that FreeToken and vismmoe's server need on the GPU machine (Python 3.12, x86_64 Linux,
# no package index; torch 2.11, triton 3.6 and transformers 5.17 already there), for
# `python -m vismmoe.bench.freetoken` (docs/freetoken.md).
#
#   scripts/freetoken_wheels.sh DIR          # e.g. .whl-ft (carried to the GPU machine with the repo; there
#                                            # scripts/freetoken_gpu.sh prepare installs them)
#
# What it fetches: freetoken==0.1.2 and its whole dependency closure, plus fastapi<0.119 (FreeToken's pin range
# allows newer ones, which pull extra packages), openai<3, uvicorn, pydantic, prometheus_client, httpx, httpcore
# (vismmoe's server and the bench's clients), as cp312 manylinux x86_64 wheels. torch, triton and transformers are
# not fetched: the resolver is given empty stand-ins of the GPU machine's versions (built here in a temporary
# folder), so it neither downloads them nor their CUDA wheels. The packages that torch and transformers bring,
# which that machine therefore has (numpy, safetensors, huggingface_hub, tokenizers, tqdm, ...: SKIP below), are
# left out too, and so are what FreeToken's serving path never imports (NOT_RUN below: numba and llvmlite, 64 MB,
# serve only flashlib's hdbscan; modelscope and what it pulls, only for --model-source modelscope; nvidia-cutlass-dsl,
# only flashlib's CuTe DSL kernels, loaded lazily). At the end it prints the size of DIR and the install line to run on the GPU machine.
set -euo pipefail

[ $# -eq 1 ] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
dest=$1
py=${PYTHON:-python3}

WANT=(freetoken==0.1.2 'fastapi<0.119' 'openai<3' 'uvicorn>=0.30' 'pydantic>=2.9' 'prometheus_client>=0.20'
      'httpx>=0.27' 'httpcore>=1.0')
# On the GPU machine already (torch 2.11, triton 3.6, transformers 5.17 and what they depend on).
HAVE=(torch==2.11.0 triton==3.6.0 transformers==5.17.0)
SKIP='^(torch|triton|transformers|nvidia-.*|cuda-.*|numpy|safetensors|huggingface-hub|tokenizers|hf-xet|tqdm|regex|pyyaml|fsspec|filelock|setuptools|sympy|mpmath|networkx|jinja2|markupsafe)$'
NOT_RUN='^(numba|llvmlite|modelscope|modelscope-hub|cryptography|cffi|pycparser|protobuf)$'
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Empty wheels named like the GPU machine's torch/triton/transformers, with a local version "+present" so that the
# constraints below pick them over the real ones.
mkdir -p "$tmp/stubs"
for spec in "${HAVE[@]}"; do
    "$py" - "$tmp/stubs" "${spec%%==*}" "${spec##*==}+present" <<'EOF'
import sys, zipfile
out, name, ver = sys.argv[1:]
di = f"{name}-{ver}.dist-info"
with zipfile.ZipFile(f"{out}/{name}-{ver}-py3-none-any.whl", "w") as z:
    z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
    z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{di}/RECORD", "")
EOF
    echo "${spec%%==*}==${spec##*==}+present" >> "$tmp/constraints.txt"
done

echo "resolving ${WANT[*]} for cp312 manylinux x86_64 ..." >&2
PIP_CONSTRAINT="$tmp/constraints.txt" "$py" -m pip install --dry-run --ignore-installed --quiet \
    --report "$tmp/report.json" --find-links "$tmp/stubs" --target "$tmp/target" "${PLATFORM[@]}" "${WANT[@]}"

"$py" - "$tmp/report.json" "$SKIP" "$NOT_RUN" > "$tmp/pins.txt" <<'EOF'
import json, re, sys
report, skip, not_run = sys.argv[1:]
for item in json.load(open(report))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if not re.match(skip, name) and not re.match(not_run, name):
        print(f"{name}=={item['metadata']['version']}")
EOF
echo "downloading $(wc -l < "$tmp/pins.txt") wheels into $dest ..." >&2
mkdir -p "$dest"
"$py" -m pip download --no-deps --quiet -d "$dest" "${PLATFORM[@]}" -r "$tmp/pins.txt"
cp "$tmp/pins.txt" "$dest/PINS.txt"

echo >&2
sed 's/^/  /' "$dest/PINS.txt" >&2
echo "size of $dest: $(du -sh "$dest" | cut -f1) ($(du -sb "$dest" | cut -f1) bytes); everything carried must stay under 64 MiB" >&2
echo "install on the GPU machine (from the repo root):" >&2
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $dest/*.whl && export PYTHONPATH=\$PWD/src:/tmp/site"
