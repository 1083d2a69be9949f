#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + Gloo; no MPI, TensorFlow or MXNet) into a venv.
#
# Usage: launch/build_horovod.sh [VENV]        (VENV defaults to .venv at the repository root)
#
# Why a script: 0.28.1 is Horovod's last release and does not build against torch >= 2.1 as
# shipped (its CMakeLists ask for C++14; torch's headers need C++17). We fetch the sdist from
# the package index, set CMAKE_CXX_STANDARD 17 in the top-level and horovod/torch CMakeLists,
# and build with `pip install --no-build-isolation` against the venv's own torch.
#
# Idempotent: exits at once when `import horovod.torch` already works in the venv against the
# torch it was built for (a stamp file records that torch version; a torch upgrade rebuilds).
# Environment (all optional):
#   HOROVOD_BUILD_LOG    log file (default: VENV/horovod-build/build.log)
#   HOROVOD_BUILD_JOBS   parallel compile jobs (default: nproc)
#   HOROVOD_FORCE=1      rebuild even when horovod.torch imports
# Needs: a C++17 compiler (g++ >= 7) and make on PATH; cmake >= 3.13 (installed from PyPI into
# the venv when the system has none or an older one). Takes about 4 minutes on 2 cores.
set -euo pipefail

HOROVOD_VERSION=0.28.1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
PY="$VENV/bin/python"
WORK="$VENV/horovod-build"
LOG="${HOROVOD_BUILD_LOG:-$WORK/build.log}"
JOBS="${HOROVOD_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

die() {
    echo "build_horovod.sh: ERROR: $*" >&2
    if [[ -f "$LOG" ]]; then
        echo "build_horovod.sh: last lines of the log ($LOG):" >&2
        tail -n 40 "$LOG" >&2 || true
    fi
    exit 1
}
say() { echo "build_horovod.sh: $*"; echo "== $(date '+%F %T') $*" >>"$LOG"; }

[[ -x "$PY" ]] || { echo "build_horovod.sh: ERROR: no python at $PY (create the venv first: python3 -m venv $VENV)" >&2; exit 1; }
mkdir -p "$WORK" "$(dirname "$LOG")"

# ---------------------------------------------------------------- already built?
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" \
    || { echo "build_horovod.sh: ERROR: torch is not importable in $VENV; install torch first" >&2; exit 1; }
STAMP_CHECK='
import os, sys, horovod, horovod.torch as hvd
want_torch, want_hvd = sys.argv[1], sys.argv[2]
assert horovod.__version__ == want_hvd, f"horovod {horovod.__version__} installed, want {want_hvd}"
assert hvd.gloo_built(), "this horovod has no gloo"
stamp = os.path.join(os.path.dirname(horovod.__file__), ".gradcomp-torch-version")
if os.path.exists(stamp):
    built = open(stamp).read().strip()
    assert built == want_torch, f"horovod was built against torch {built}, venv has {want_torch}"
'
if [[ "${HOROVOD_FORCE:-0}" != 1 ]] && "$PY" -c "$STAMP_CHECK" "$TORCH_VERSION" "$HOROVOD_VERSION" >/dev/null 2>&1; then
    echo "build_horovod.sh: horovod $HOROVOD_VERSION already works in $VENV (torch $TORCH_VERSION); nothing to do"
    exit 0
fi

: >"$LOG"
START=$(date +%s)
say "building horovod $HOROVOD_VERSION into $VENV (torch $TORCH_VERSION, $JOBS jobs); log: $LOG"

# ---------------------------------------------------------------- toolchain
for tool in g++ make; do
    command -v "$tool" >/dev/null || die "'$tool' not found on PATH; install a C++17 compiler and make (Debian: apt-get install -y g++ make)"
done
echo 'int main(){ if constexpr (true) return 0; }' >"$WORK/cxx17.cc"
g++ -std=c++17 -o "$WORK/cxx17" "$WORK/cxx17.cc" >>"$LOG" 2>&1 || die "g++ cannot compile C++17; Horovod needs g++ >= 7"

cmake_ok() {  # cmake >= 3.13 (Horovod's minimum) and < 4 (its bundled gloo says cmake 2.8.12)
    "$1" --version 2>/dev/null | "$PY" -c '
import re, sys
m = re.search(r"version\s*(\d+)\.(\d+)", sys.stdin.read())
sys.exit(0 if m and (3, 13) <= (int(m[1]), int(m[2])) < (4, 0) else 1)'
}
CMAKE=""
for c in "$VENV/bin/cmake" "$(command -v cmake || true)"; do
    if [[ -n "$c" && -x "$c" ]] && cmake_ok "$c"; then CMAKE="$c"; break; fi
done
if [[ -z "$CMAKE" ]]; then
    say "no cmake in [3.13, 4) on PATH; installing cmake from PyPI into the venv"
    "$PY" -m pip install 'cmake>=3.13,<4' >>"$LOG" 2>&1 || die "pip install cmake failed"
    CMAKE="$VENV/bin/cmake"
    cmake_ok "$CMAKE" || die "cmake from PyPI does not run"
fi
say "cmake: $CMAKE ($("$CMAKE" --version | head -n1))"

# ---------------------------------------------------------------- Python requirements
# Horovod's install_requires (setup.py): cloudpickle, psutil, pyyaml, packaging, cffi>=1.4.0.
# They must be present before the build: --no-build-isolation uses this venv as the build env,
# and setup.py passes them as setup_requires. wheel: for setuptools versions without bdist_wheel.
say "installing build requirements"
"$PY" -m pip install cloudpickle psutil pyyaml packaging 'cffi>=1.4.0' setuptools wheel >>"$LOG" 2>&1 \
    || die "pip install of horovod's requirements failed"

# ---------------------------------------------------------------- source
SRC="$WORK/horovod-$HOROVOD_VERSION"
SDIST="$WORK/horovod-$HOROVOD_VERSION.tar.gz"
if [[ ! -s "$SDIST" ]]; then
    say "downloading the horovod $HOROVOD_VERSION sdist"
    "$PY" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK" >>"$LOG" 2>&1 \
        || die "pip download horovod==$HOROVOD_VERSION failed (is the package index reachable?)"
fi
[[ -s "$SDIST" ]] || die "pip download did not produce $SDIST"
rm -rf "$SRC"
tar -xzf "$SDIST" -C "$WORK" || die "cannot unpack $SDIST"

# ---------------------------------------------------------------- the C++17 fix
patch_std() {
    local file="$1"
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$file" || die "expected 'set(CMAKE_CXX_STANDARD 14)' in $file; the sdist changed?"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$file"
    grep -q 'set(CMAKE_CXX_STANDARD 17)' "$file" || die "patching $file failed"
}
patch_std "$SRC/CMakeLists.txt"
patch_std "$SRC/horovod/torch/CMakeLists.txt"
say "patched CMAKE_CXX_STANDARD 14 -> 17 in CMakeLists.txt and horovod/torch/CMakeLists.txt"

# ---------------------------------------------------------------- build + install
say "compiling (the slow part, about 4 minutes on 2 cores)"
(
    cd "$SRC"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CMAKE="$CMAKE" \
           MAKEFLAGS="-j$JOBS" CMAKE_POLICY_VERSION_MINIMUM=3.5 PATH="$VENV/bin:$PATH"
    "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -v . >>"$LOG" 2>&1
) || die "building horovod failed (see the log)"

# ---------------------------------------------------------------- verify
"$PY" - "$TORCH_VERSION" "$HOROVOD_VERSION" >>"$LOG" 2>&1 <<'EOF' || die "horovod installed but does not work (see the log)"
import os, sys
import horovod, horovod.torch as hvd
assert horovod.__version__ == sys.argv[2], horovod.__version__
assert hvd.gloo_built() and not hvd.mpi_built(), (hvd.gloo_built(), hvd.mpi_built())
with open(os.path.join(os.path.dirname(horovod.__file__), ".gradcomp-torch-version"), "w") as f:
    f.write(sys.argv[1] + "\n")
print("horovod", horovod.__version__, "gloo", hvd.gloo_built(), "mpi", hvd.mpi_built())
EOF
[[ -x "$VENV/bin/horovodrun" ]] || die "horovodrun was not installed into $VENV/bin"
"$VENV/bin/horovodrun" --check-build >>"$LOG" 2>&1 || die "horovodrun --check-build failed"
rm -rf "$SRC" "$WORK/cxx17" "$WORK/cxx17.cc"  # keep the sdist (a rebuild skips the download) and the log
say "done in $(( $(date +%s) - START )) s: horovod $HOROVOD_VERSION with PyTorch + Gloo in $VENV"
