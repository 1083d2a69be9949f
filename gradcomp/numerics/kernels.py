"""Native fast paths for FP encode+pack and unpack+decode, with the eager path as reference.

``gradcomp/numerics/csrc/`` holds the C++ kernels (float32 input, CPU, parallel on torch's intra-op
threads):

* ``fpcodec.cpp``: the integer algorithm of :mod:`gradcomp.numerics.quant` and the bit layout of
  :mod:`gradcomp.numerics.packing` fused into one pass over memory (encode+pack, unpack+decode), and the
  fused decode-sum-divide of N payloads that ends every compressed all-reduce;
* ``sparse.cpp``: stochastic pruning fused with the compaction of the sparse codecs, and the
  Rice coding of positions (:mod:`gradcomp.codecs.sparse`).

Input checks inside the kernels raise ``ValueError`` (``TORCH_CHECK_VALUE``); the Python
callers check payload lengths and counts first, so a malformed payload raises the same
``ValueError`` message whether the kernels are used or not.

They are built with ``torch.utils.cpp_extension`` the first time they are needed (about a
minute, announced on stderr only when a compiler runs); call :func:`warmup` at start-up to pay
that before training. Results are bit-identical to the eager path (``tests/unit/test_kernels.py``,
``tests/unit/test_codec_kernels.py``).

The build cache (:func:`cache_dir`) is shared by every Python environment of the user: one
folder per *key* (:func:`build_key`), a hash of everything the binary depends on -- the torch
version and build (git revision, C++ ABI), the Python version, the compiler and its version,
the compile and link flags, this CPU's instruction-set flags (``-march=native`` code must not
run on another CPU) and the sources. Two environments with the same key load the same build;
a different torch, compiler or flag set builds its own folder. A file lock (``<key>.lock``)
serialises building and loading: a second process waits for the first's build and then loads
it without compiling; a build counts as finished only once ``<key>/COMPLETE`` is written, so a
build that was killed halfway is redone, not loaded.

``GRADCOMP_KERNEL_CACHE`` sets the cache folder (default ``$TORCH_EXTENSIONS_DIR/gradcomp`` when
that is set, else ``$XDG_CACHE_HOME/gradcomp/kernels``, ``~/.cache`` without XDG).

``GRADCOMP_KERNELS`` selects: ``auto`` (default: native where it applies and builds, eager
otherwise), ``native`` (fail if it cannot build), ``eager`` (never build).
``GRADCOMP_KERNELS_SANITIZE=address`` builds (under its own name) with AddressSanitizer, for
``launch/asan_fuzz.sh``; the process must then run with libasan preloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import platform
import struct
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from gradcomp.numerics.formats import FPFormat

MODES = ("auto", "native", "eager")
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("fpcodec.cpp", "sparse.cpp", "module.cpp")
# -mprefer-vector-width=512: the encode loops are compute-bound, and on AVX-512 CPUs GCC's
# default 256-bit vectors leave half the throughput unused (FP6 stochastic encode: 1.6 -> 3.8
# GB/s, one thread). -ffp-contract=off: no fused multiply-add may change a float32 result.
_CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_COMPLETE = "COMPLETE"  # written into a build folder once its module has loaded


def kernel_mode() -> str:
    """The selected mode from ``GRADCOMP_KERNELS`` (validated)."""
    mode = os.environ.get("GRADCOMP_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"GRADCOMP_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _sanitize_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Extra (compile, link) flags of ``GRADCOMP_KERNELS_SANITIZE`` (``""`` or ``"address"``)."""
    which = os.environ.get("GRADCOMP_KERNELS_SANITIZE", "").strip().lower()
    if not which:
        return (), ()
    if which != "address":
        raise ValueError(f"GRADCOMP_KERNELS_SANITIZE must be empty or 'address', got {which!r}")
    return ("-fsanitize=address", "-fno-omit-frame-pointer", "-g"), ("-fsanitize=address",)


def _compiler() -> str:
    """The C++ compiler ``torch.utils.cpp_extension`` runs (``$CXX``, else ``c++``) and its
    version line; ``"<name>: not found"`` when it does not run."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
        version = (out.stdout or out.stderr).strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"{cxx}: not found"
    return f"{cxx}: {version[0] if version else 'unknown version'}"


def _sources() -> list[Path]:
    return sorted(p for p in _CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def build_key_parts() -> dict[str, str]:
    """Everything the built binary depends on, by name (what :func:`build_key` hashes)."""
    cflags, ldflags = _sanitize_flags()
    h = hashlib.sha256()
    for p in _sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return {
        "torch": f"{torch.__version__} {getattr(torch.version, 'git_version', '')} "
                 f"cxx11abi={int(torch.compiled_with_cxx11_abi())}",
        "python": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('SOABI') or ''}",
        "platform": f"{sys.platform} {platform.machine()}",
        "compiler": _compiler(),
        "cflags": " ".join(_CFLAGS + cflags),
        "ldflags": " ".join(_LDFLAGS + ldflags),
        "cpu": _cpu_flags().strip(),
        "sources": h.hexdigest(),
    }


def build_key(parts: dict[str, str] | None = None) -> str:
    """The build's name and cache folder: ``gradcomp_codecs_`` and 16 hex digits of a hash of
    :func:`build_key_parts` (or of ``parts``)."""
    parts = build_key_parts() if parts is None else parts
    h = hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(parts.items())).encode())
    return "gradcomp_codecs_" + h.hexdigest()[:16]


def cache_dir() -> Path:
    """The folder that holds one build folder per key (shared by every environment)."""
    if os.environ.get("GRADCOMP_KERNEL_CACHE"):
        return Path(os.environ["GRADCOMP_KERNEL_CACHE"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "gradcomp"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "gradcomp" / "kernels"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released when the process dies, unlike a lock file
    that only exists or not); no lock where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _import_built(name: str, directory: Path) -> ModuleType:
    so = directory / f"{name}.so"  # torch.utils.cpp_extension's name for it (POSIX)
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {so}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_built(key: str | None = None) -> bool:
    """Whether the cache holds a finished build of ``key`` (default: this environment's key)."""
    return (cache_dir() / (key or build_key()) / _COMPLETE).is_file()


def _load_or_build() -> ModuleType:
    """Load this key's build from the cache, building it first (under the lock) if needed."""
    from torch.utils import cpp_extension

    key = build_key()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    directory = root / key
    with _locked(root / f"{key}.lock"):
        if (directory / _COMPLETE).is_file():
            return _import_built(key, directory)
        print("gradcomp: building the native codec kernels (about a minute, once; cached "
              f"afterwards in {directory}; GRADCOMP_KERNELS=eager skips it)", file=sys.stderr, flush=True)
        directory.mkdir(exist_ok=True)
        # torch's own lock file: stale if a build was killed, and we hold the real lock
        (directory / "lock").unlink(missing_ok=True)
        cflags, ldflags = _sanitize_flags()
        module = cpp_extension.load(name=key, sources=[str(_CSRC / s) for s in _SOURCES],
                                    extra_cflags=list(_CFLAGS + cflags), extra_ldflags=list(_LDFLAGS + ldflags),
                                    build_directory=str(directory), verbose=False)
        (directory / _COMPLETE).write_text("\n".join(f"{k}={v}" for k, v in build_key_parts().items()) + "\n")
        return module


@functools.lru_cache(maxsize=1)
def _build() -> ModuleType | None:
    """Build (or load the cached build of) the extension; ``None`` if that fails (``auto``)."""
    try:
        return _load_or_build()
    except Exception as exc:  # no compiler, no ninja, ...: stay correct, just slower
        if kernel_mode() == "native":
            raise
        warnings.warn(f"gradcomp: native codec kernels unavailable, using the eager path ({exc})", stacklevel=2)
        return None


def native():
    """The native module if the mode allows it and it builds, else ``None``."""
    return None if kernel_mode() == "eager" else _build()


def warmup() -> bool:
    """Build/load the native kernels now; return whether they are in use."""
    return native() is not None


def _native_unless(not_applicable: bool):
    """The native module, or ``None`` when the inputs do not suit it or it is unavailable."""
    return None if not_applicable else native()


def _applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def _encode_args(x: torch.Tensor, fmt: FPFormat, stochastic: bool, key: int, scale_exp: int) -> tuple:
    src_min_exponent, src_min_subnormal_exponent = -126, -149
    return (x.contiguous(), fmt.exp_bits, fmt.man_bits, fmt.bias, scale_exp, stochastic,
            key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF,
            fmt.min_exponent + scale_exp < src_min_exponent,
            fmt.min_subnormal_exponent + scale_exp <= src_min_subnormal_exponent)


def encode_pack(x: torch.Tensor, fmt: FPFormat, stochastic: bool, key: int, scale_exp: int) -> torch.Tensor | None:
    """Packed codes of float32 CPU ``x`` (same bits as the eager path), or ``None`` if not applicable."""
    mod = _native_unless(not _applies(x))
    if mod is None:
        return None
    return mod.encode_pack(*_encode_args(x, fmt, stochastic, key, scale_exp), 0, None)


def encode_pack_with_stats(x: torch.Tensor, fmt: FPFormat, stochastic: bool, key: int, scale_exp: int,
                           offset: int) -> tuple[torch.Tensor, float, bool] | None:
    """Like :func:`encode_pack`, with ``offset`` free bytes in front of the codes (for a payload
    header) and, from the same pass over ``x``, ``max |x|`` over finite entries and whether ``x``
    holds an inf or NaN: ``(buffer, max_abs, nonfinite)``, or ``None`` if not applicable."""
    mod = _native_unless(not _applies(x))
    if mod is None:
        return None
    stats = torch.zeros(2, dtype=torch.int64)
    out = mod.encode_pack(*_encode_args(x, fmt, stochastic, key, scale_exp), offset, stats)
    max_bits, bad = stats.tolist()
    (max_abs,) = struct.unpack("<f", struct.pack("<I", max_bits))  # the float32 of those bits
    return out, max_abs, bool(bad)


def _check_packed(packed: torch.Tensor, bits: int, numel: int) -> None:
    """``ValueError`` (the message of :func:`gradcomp.numerics.packing.unpack`) unless ``packed`` holds
    exactly ``ceil(numel * bits / 8)`` bytes: checked before a kernel reads it."""
    expected = (numel * bits + 7) // 8
    if packed.numel() != expected:
        raise ValueError(f"unpack: {numel} codes of {bits} bits need {expected} bytes, got {packed.numel()}")


def unpack_decode(packed: torch.Tensor, table: torch.Tensor, bits: int, out: torch.Tensor) -> bool:
    """Decode ``packed`` through the float32 ``table`` into contiguous float32 CPU ``out``.

    ``packed`` must hold exactly the bytes of ``out.numel()`` codes (else ``ValueError``, the
    eager :func:`gradcomp.numerics.packing.unpack`'s message)."""
    mod = _native_unless(packed.device.type != "cpu" or not out.is_contiguous() or out.dtype != torch.float32)
    if mod is None:
        return False
    _check_packed(packed, bits, out.numel())
    mod.unpack_decode(packed.contiguous(), table.contiguous(), bits, out)
    return True


def decode_mean(packed: list[torch.Tensor], tables: list[torch.Tensor], bits: list[int],
                divisor: int, out: torch.Tensor) -> bool:
    """Write ``(decode(packed[0]) + ... + decode(packed[-1])) / divisor`` into float32 CPU ``out``.

    Sums left to right and divides in float32, as the eager decode, ``add_`` and ``div_`` do,
    in one pass over ``out``; ``False`` (nothing written) when the native path does not apply.
    Each ``packed[i]`` must hold exactly the bytes of ``out.numel()`` codes of ``bits[i]`` bits
    (else ``ValueError``, as :func:`gradcomp.numerics.packing.unpack` raises eagerly).
    """
    mod = _native_unless(out.device.type != "cpu" or not out.is_contiguous() or out.dtype != torch.float32
                         or any(p.device.type != "cpu" for p in packed))
    if mod is None:
        return False
    if not len(packed) == len(tables) == len(bits) or not packed:
        raise ValueError("decode_mean: one table and one width per payload, at least one payload")
    for p, b in zip(packed, bits):
        _check_packed(p, b, out.numel())
    mod.decode_mean([p.contiguous() for p in packed], [t.contiguous() for t in tables],
                    list(bits), float(divisor), out)
    return True


def prune_select(x: torch.Tensor, alpha: float, key: int):
    """Stochastically prune float32 CPU ``x`` at ``alpha`` (uniforms of ``key``) and compact it.

    Returns ``(positions int32, kept values float32, packed kept flags, packed signs, max finite
    |kept|, any non-finite input)`` -- what :func:`gradcomp.numerics.pruning.stochastic_prune` followed by
    the sparse encoder's compaction gives, bit for bit -- or ``None`` if not applicable.
    """
    mod = _native_unless(not _applies(x) or x.numel() >= 2**31)
    if mod is None:
        return None
    pos, kept, flags, signs, stats = mod.prune_select(x.contiguous(), float(alpha),
                                                      key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF)
    top, bad = stats.tolist()
    return pos, kept, flags, signs, top, bool(bad)


def rice_encode(idx: torch.Tensor, candidates: list[int]):
    """Rice-code sorted CPU positions with the cheapest of ``candidates``: ``(rem, unary, bits, k)``
    or ``None`` if not applicable."""
    mod = _native_unless(idx.device.type != "cpu")
    if mod is None:
        return None
    rem, unary, info = mod.rice_encode(idx.contiguous(), list(candidates))
    unary_bits, k = info.tolist()
    return rem, unary, unary_bits, k


def rice_decode(rem: torch.Tensor, unary: torch.Tensor, unary_bits: int, k: int, n: int, numel: int):
    """``(positions int64, status)`` of a Rice-coded stream (status 0 ok, 1 count, 2 range), or ``None``."""
    mod = _native_unless(rem.device.type != "cpu" or unary.device.type != "cpu")
    if mod is None:
        return None
    pos, status = mod.rice_decode(rem, unary, unary_bits, k, n, numel)
    return pos, int(status[0])


def prune_scatter(values, flags, signs, rem, unary, unary_bits, k, n, alpha, out,
                  accumulate: bool = False) -> int | None:
    """Decode PRUNE / PRUNE_FP streams into float32 CPU ``out`` (zeroed first; with
    ``accumulate``, added to ``out`` at the nonzero positions instead): the status code (0 ok,
    1 count, 2 range, 3 kept flags), or ``None`` if not applicable."""
    mod = _native_unless(out.device.type != "cpu" or not out.is_contiguous() or out.dtype != torch.float32)
    if mod is None:
        return None
    return int(mod.prune_scatter(values, flags, signs, rem, unary, unary_bits, k, n, float(alpha),
                                 out, bool(accumulate)))


# ---- the format functions (gradcomp.encode / decode / pack / unpack) on unpacked codes


def encode_codes(x: torch.Tensor, fmt: FPFormat, stochastic: bool, key: int,
                 scale_exp: int) -> tuple[torch.Tensor, bool] | None:
    """``(codes, x holds NaN)`` for float32 CPU ``x`` (codes of ``x``'s shape; uint8 up to 8
    bits, int32 above), or ``None`` if not applicable."""
    mod = _native_unless(not _applies(x))
    if mod is None:
        return None
    codes, nan = mod.encode_codes(*_encode_args(x, fmt, stochastic, key, scale_exp), fmt.bits > 8)
    return codes, bool(nan.item())


def pack_codes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, bool] | None:
    """``(packed bytes, every code in 0 .. 2**bits - 1)`` for uint8/int32 CPU ``codes`` (the bytes
    are meaningful only when the flag is true), or ``None`` if not applicable."""
    mod = _native_unless(codes.device.type != "cpu" or codes.dtype not in (torch.uint8, torch.int32))
    if mod is None:
        return None
    packed, ok = mod.pack_codes(codes, bits)
    return packed, bool(ok.item())


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor | None:
    """``numel`` codes of a packed CPU stream (sizes checked by the caller), or ``None``."""
    mod = _native_unless(packed.device.type != "cpu")
    return None if mod is None else mod.unpack_codes(packed, bits, numel)


def decode_codes(codes: torch.Tensor, table: torch.Tensor,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool] | None:
    """``(table[codes] as float32, all codes in range)`` for uint8/int32 CPU codes, or ``None``.

    Writes into ``out`` (contiguous float32, ``codes``' shape) when given."""
    mod = _native_unless(codes.device.type != "cpu" or codes.dtype not in (torch.uint8, torch.int32))
    if mod is None:
        return None
    if out is None:
        out = torch.empty(codes.shape, dtype=torch.float32)
    return out, bool(mod.decode_codes(codes, table.contiguous(), out))
