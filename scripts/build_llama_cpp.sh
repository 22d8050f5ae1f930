#!/usr/bin/env bash
# Build llama.cpp's multimodal CLI (and llama-bench) for the side-by-side bench, or cut a trimmed source tarball
# that builds offline.
#
#   scripts/build_llama_cpp.sh build SRC BUILD_DIR [cuda|cpu]   # default: cuda
#   scripts/build_llama_cpp.sh trim  SRC OUT.tar.gz
#
# SRC: the llama-cpp-python sdist tarball (llama_cpp_python-X.tar.gz, llama.cpp under vendor/llama.cpp), a tarball
# made by `trim`, or an unpacked llama.cpp directory.
#
# build: copies the source into BUILD_DIR/src, adds one line to llama-mtmd-cli (flush its asynchronous logger
# before exit: the timings it prints last are otherwise often lost), configures with cmake + ninja (Release,
# shared libs; no tests, examples, server, web UI or HTTPS) and builds only the targets llama-mtmd-cli (libllama,
# libmtmd, ggml), llama-quantize (what `vismmoe export-gguf --type q4_k|q4_k_m` calls) and llama-bench, with
# -j$(nproc). cuda mode adds -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90}. Binaries land in
# BUILD_DIR/bin next to build_info.json (llama.cpp commit, mode, cmake flags, compiler, seconds the build took).
#
# trim: keeps what the build above needs (cmake files, ggml with its CPU and CUDA backends, src, include, common,
# vendor, tools minus server / web UI / test media) plus gguf-py and the converter for reference, and drops models/
# (vocab files, 75 MB), docs, tests, media, app, benches, examples, the other ggml backends. The tarball's top folder
# is llama.cpp/, with a COMMIT file holding the commit it came from. About 8 MB compressed.
#
# The commit is read from SRC's git (rev-parse), from the sdist's .git/modules/vendor/llama.cpp/HEAD, or from the
# COMMIT file of a trimmed tarball; "unknown" when none exists.
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 3 ] || usage
mode=$1; src=$2; dest=$3; kind=${4:-cuda}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Unpack SRC if it is a tarball; print the llama.cpp root (a folder with CMakeLists.txt and tools/mtmd).
resolve_root() {
    local s=$1 top
    if [ -d "$s" ]; then top=$s
    elif [ -f "$s" ]; then mkdir -p "$tmp/src"; tar -xzf "$s" -C "$tmp/src"; top=$tmp/src
    else echo "build_llama_cpp.sh: no such file or folder: $s" >&2; exit 2
    fi
    local root
    root=$(find "$top" -maxdepth 6 -type d -path '*/tools/mtmd' -printf '%h\n' 2>/dev/null | sed 's#/tools$##' | head -1)
    if [ -z "$root" ] || [ ! -f "$root/CMakeLists.txt" ]; then
        echo "build_llama_cpp.sh: no llama.cpp source (CMakeLists.txt + tools/mtmd) under $s" >&2; exit 2
    fi
    echo "$root"
}

# The commit SRC came from, or "unknown".
find_commit() {
    local root=$1 c=""
    if [ -f "$root/COMMIT" ]; then c=$(cat "$root/COMMIT"); fi
    if [ -z "$c" ] && git -C "$root" rev-parse HEAD >/dev/null 2>&1 \
        && [ "$(git -C "$root" rev-parse --show-toplevel)" = "$(cd "$root" && pwd -P)" ]; then
        c=$(git -C "$root" rev-parse HEAD)
    fi
    if [ -z "$c" ]; then
        local head
        head=$(find "$root/../.." -maxdepth 5 -path '*/.git/modules/vendor/llama.cpp/HEAD' 2>/dev/null | head -1)
        [ -n "$head" ] && c=$(tr -d '[:space:]' < "$head")
    fi
    echo "${c:-unknown}"
}

root=$(resolve_root "$src")
commit=$(find_commit "$root")

if [ "$mode" = trim ]; then
    out=$(realpath -m "$dest")
    stage=$tmp/stage/llama.cpp
    mkdir -p "$stage"
    (cd "$root" && tar -cf - --exclude='.git' \
        CMakeLists.txt CMakePresets.json LICENSE README.md cmake licenses include src common vendor ggml tools \
        gguf-py conversion convert_hf_to_gguf.py) | tar -xf - -C "$stage"
    # ggml: keep the CPU and CUDA backends (ggml_add_backend only enters the folders of enabled backends)
    for d in "$stage"/ggml/src/ggml-*/; do
        case $(basename "$d") in ggml-cpu|ggml-cuda) ;; *) rm -rf "$d" ;; esac
    done
    rm -rf "$stage/tools/ui" "$stage/tools/server" "$stage/tools/cli" "$stage/tools/rpc" "$stage/tools/tuning" \
        "$stage/tools/mtmd/tests" "$stage/tools/mtmd/test-"* "$stage/tools/mtmd/legacy-models" \
        "$stage/gguf-py/tests" "$stage/ggml/tests" "$stage/ggml/examples"
    echo "$commit" > "$stage/COMMIT"
    mkdir -p "$(dirname "$out")"
    tar -C "$tmp/stage" -czf "$out" llama.cpp
    echo "trimmed llama.cpp $commit -> $out ($(du -h "$out" | cut -f1))"
    exit 0
fi

[ "$mode" = build ] || usage
case $kind in cuda|cpu) ;; *) echo "build_llama_cpp.sh: mode must be cuda or cpu, got $kind" >&2; exit 2 ;; esac
mkdir -p "$dest"
build=$(realpath "$dest")
flags=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DMTMD_VIDEO=OFF
    -DLLAMA_BUILD_COMMIT="${commit:0:12}")
if [ "$kind" = cuda ]; then
    flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}")
fi
# build from a copy in BUILD_DIR/src (a tarball's unpacked tree is temporary; a given folder stays untouched)
if [ "$(realpath "$root")" != "$build/src" ]; then
    mkdir -p "$build/src"; cp -a "$root/." "$build/src/"; root=$build/src
fi
# One patch, to the CLI only: llama-mtmd-cli exits without flushing its asynchronous logger (the logger is leaked
# on purpose, llama.cpp issue 22142), so the timings it prints last are often lost. Flush before main returns.
patched=$(python3 - "$root/tools/mtmd/mtmd-cli.cpp" <<'EOF'
import sys
path = sys.argv[1]
src = open(path).read()
call, flush = "llama_perf_context_print(ctx.lctx);", "common_log_flush(common_log_main());"
if flush in src:
    print("already")
elif src.count(call) == 1:
    open(path, "w").write(src.replace(call, call + " " + flush + " // flush the async logger before exit"))
    print("yes")
else:
    print("no")
EOF
)
if [ "$patched" = no ]; then echo "build_llama_cpp.sh: warning: could not add the log flush to mtmd-cli.cpp" >&2; fi
start=$(date +%s)
cmake -S "$root" -B "$build" "${flags[@]}"
cmake --build "$build" -j"$(nproc)" --target llama-mtmd-cli llama-quantize llama-bench
seconds=$(( $(date +%s) - start ))
compiler=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
python3 - "$build/bin/build_info.json" "$commit" "$kind" "$seconds" "$compiler" "$(nproc)" "$patched" "${flags[@]}" <<'EOF'
import json, sys
path, commit, kind, seconds, compiler, jobs, patched, *flags = sys.argv[1:]
patches = ["tools/mtmd/mtmd-cli.cpp: common_log_flush() after llama_perf_context_print (timings not lost at exit)"]
targets = ["llama-mtmd-cli", "llama-quantize", "llama-bench"]
json.dump({"llama_cpp_commit": commit, "mode": kind, "cmake_flags": flags, "targets": targets,
           "patches": patches if patched != "no" else [], "cxx_compiler": compiler, "jobs": int(jobs),
           "build_seconds": int(seconds)}, open(path, "w"), indent=1)
EOF
echo "built llama.cpp $commit ($kind) in ${seconds}s: $build/bin/llama-mtmd-cli"
