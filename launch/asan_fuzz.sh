#!/usr/bin/env bash
# Fuzz the native payload decoders under AddressSanitizer (optional; not part of CI's run).
#
#   bash launch/asan_fuzz.sh [pytest args]
#
# Builds the codec kernels with -fsanitize=address (GRADCOMP_KERNELS_SANITIZE=address, cached
# under a name of its own, about a minute the first time) and runs the payload validation tests
# (exhaustive truncation, byte corruption and random-bytes payloads against every decoder) with
# libasan preloaded into Python. Any out-of-bounds read or write aborts the run with ASan's
# report; exit status 0 means none was seen. Leak checking is off: CPython itself "leaks" at exit.
# test_kernel_entry_points_raise_value_error is left out: it calls the kernels past the Python
# checks so that they throw a C++ exception, and a C++ exception thrown from the sanitized module
# aborts the process under the preloaded runtime (seen with gcc 12 and torch 2.13); every other
# test feeds the decoders malformed payloads through their public paths.
# Measured here: 76 tests, 0 ASan reports, 10 s once the sanitized build is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GRADCOMP_VENV:-.venv}"
libasan="$(gcc -print-file-name=libasan.so)"
[[ -f "$libasan" ]] || { echo "asan_fuzz.sh: libasan not found (gcc -print-file-name=libasan.so)" >&2; exit 2; }
export GRADCOMP_KERNELS=native GRADCOMP_KERNELS_SANITIZE=address
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
LD_PRELOAD="$libasan" exec "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/unit/test_payload_validation.py tests/unit/test_codec_kernels.py \
    -k "not kernel_entry_points" "$@"
