"""A real text corpus that needs no download: the running Python's standard library sources.

:func:`load_python_corpus` reads every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``
(``site-packages``, ``dist-packages`` and ``__pycache__`` directories skipped, symlinks not
followed), in sorted order of their paths relative to that root, as raw bytes. Each file goes
to the validation split when the first 8 bytes of ``sha256(relative path)``, read as an
integer, modulo 10000 are below ``val_fraction * 10000``, otherwise to training: the split is
by file (no file contributes to both), depends only on the file's path, and a file added to or
removed from the library moves no other file. Each split is the concatenation of its files,
each followed by one :data:`SEPARATOR` byte (0, which Python sources do not contain).

The corpus therefore differs between Python versions and installations; :class:`TextCorpus`
records the Python version, the root, the file counts and a sha256 over every file's relative
path and bytes, so a result names exactly what it trained on.

Batches (:func:`lm_batch`, :func:`fixed_batches`) are windows of ``context + 1`` bytes at
offsets drawn from a ``torch.Generator`` seeded from the arguments (never torch's global RNG):
inputs are the first ``context`` bytes, targets the next-byte shift. A global batch is a
function of ``(seed, step)`` only; rank ``r`` of ``N`` takes rows ``r, r+N, ...``, so the global
batch is the same for every world size that divides it.

Example:
    >>> c = load_python_corpus()
    >>> x, y = lm_batch(c.train, 8, 128, seed=0, step=0)
    >>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([8, 128]), torch.int64, True)
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass

import torch

from gradcomp.numerics.rng import derive_key

__all__ = ["TextCorpus", "SEPARATOR", "VOCAB_SIZE", "load_python_corpus", "lm_batch", "fixed_batches",
           "stdlib_files"]

SEPARATOR = 0
VOCAB_SIZE = 256
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SPLIT_BUCKETS = 10000
# derive_key stream tags (keep batch draws apart from other uses of the same seed).
_TRAIN_STREAM = 0x7E57
_VAL_STREAM = 0x5A11


@dataclass(frozen=True)
class TextCorpus:
    """A byte corpus split by file: ``train`` / ``val`` are 1-D uint8 tensors."""

    name: str
    root: str
    python: str
    files_train: int
    files_val: int
    sha256: str
    train: torch.Tensor
    val: torch.Tensor
    val_fraction: float

    def describe(self) -> dict:
        """Return what identifies the corpus (for result headers): no tensors."""
        return {"name": self.name, "root": self.root, "python": self.python,
                "files": self.files_train + self.files_val, "files_train": self.files_train,
                "files_val": self.files_val, "sha256": self.sha256, "bytes_train": int(self.train.numel()),
                "bytes_val": int(self.val.numel()), "val_fraction": self.val_fraction,
                "split": "by file: sha256(relative path) mod 10000 < val_fraction * 10000 -> validation"}


def stdlib_files(root: str | None = None) -> list[str]:
    """Return the relative paths (``/``-separated, sorted) of the ``*.py`` files under ``root``
    (default: this Python's standard library), skipping site-/dist-packages and __pycache__."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise ValueError(f"stdlib_files: {root!r} is not a directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def _is_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return h % _SPLIT_BUCKETS < round(val_fraction * _SPLIT_BUCKETS)


def load_python_corpus(val_fraction: float = 0.1, root: str | None = None) -> TextCorpus:
    """Load the standard library's ``*.py`` sources as a byte corpus split by file.

    Args:
        val_fraction: share of files (by path hash) in the validation split, in (0, 1).
        root: directory to read instead of the standard library (tests).

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), ``root`` missing, or a split left empty.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"load_python_corpus: val_fraction must be in (0, 1), got {val_fraction!r}")
    root = root or sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    digest = hashlib.sha256()
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        parts[_is_val(rel, val_fraction)].append(data + bytes([SEPARATOR]))
    if not parts[False] or not parts[True]:
        raise ValueError(f"load_python_corpus: {len(files)} files under {root!r} leave a split empty")

    def cat(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return TextCorpus(name="python-stdlib", root=root, python=platform.python_version(),
                      files_train=len(parts[False]), files_val=len(parts[True]), sha256=digest.hexdigest(),
                      train=cat(parts[False]), val=cat(parts[True]), val_fraction=float(val_fraction))


def _windows(data: torch.Tensor, batch: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if data.dim() != 1 or data.numel() <= context + 1:
        raise ValueError(f"corpus split of {data.numel()} bytes is too short for context {context}")
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    w = data[idx].long()
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def lm_batch(data: torch.Tensor, batch: int, context: int, *, seed: int, step: int,
             rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return this rank's rows of global training batch ``step``: inputs and next-byte targets.

    The global batch (``batch`` windows of ``context`` bytes) depends on ``(seed, step)`` only;
    rank ``rank`` takes rows ``rank::world_size`` (``batch`` must divide by ``world_size``).
    """
    if batch < 1 or context < 1 or world_size < 1 or not 0 <= rank < world_size or batch % world_size:
        raise ValueError(f"lm_batch: need batch >= 1 divisible by world_size, 0 <= rank < world_size, "
                         f"context >= 1; got batch={batch}, context={context}, rank={rank}, world_size={world_size}")
    gen = torch.Generator().manual_seed(derive_key(seed, step, _TRAIN_STREAM))
    x, y = _windows(data, batch, context, gen)
    return x[rank::world_size], y[rank::world_size]


def fixed_batches(data: torch.Tensor, count: int, batch: int, context: int, seed: int = 0) -> list:
    """Return ``count`` fixed (inputs, targets) batches of ``data`` (the held-out evaluation set)."""
    if count < 1 or batch < 1 or context < 1:
        raise ValueError(f"fixed_batches: count, batch and context must be >= 1, got {count}, {batch}, {context}")
    gen = torch.Generator().manual_seed(derive_key(seed, _VAL_STREAM))
    return [_windows(data, batch, context, gen) for _ in range(count)]
