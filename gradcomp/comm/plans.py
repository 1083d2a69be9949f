"""The plan cache of a compressing collective: fits and plans per shard and segment.

A compressed collective encodes every bucket as shards (one per destination rank in the
two-phase exchange, one in the all-gather), and every shard as segments: with ``per_tensor`` the
shard is cut at its tensors' boundaries (runs of parts under ``min_segment`` elements share one
segment), and every segment gets a lognormal fit of its own and a plan from it
(:meth:`gradcomp.codecs.Codec.plan_segments`), refreshed when the caller says ``refit`` and
reused in between. A shard of one segment is sent as the codec's plain payload; several as one
SEGMENTS payload (:mod:`gradcomp.codecs.segments`).

Drift: a codec whose payload size depends on the data (Prune, PruneFP, Budget) remembers each
shard's payload size at its last refit. When a step's payload leaves ``[size / DRIFT_DOWN, size *
DRIFT_UP]`` (``[size / DRIFT_DOWN, inf)`` with ``follow_growth=False``), the plans no longer
describe the data (gradients shrank or grew since the fit, so a cached threshold prunes far more
or far less than planned): the shard is refitted and encoded again at once (the first encoding
is discarded, never sent; the same random key). This costs nothing on steps without drift and
keeps the sparsity near the requested one between periodic refits. With error feedback the hook
passes ``follow_growth=False``: its input is the gradient plus the residual, and a threshold
that followed a growing residual up would keep the compression error proportional to the input,
so the residual would grow without bound; a threshold held until the periodic refit keeps more
of a growing input instead.

Keys: a shard is ``(bucket, phase, shard)``; its segment ``s`` is keyed ``(bucket, phase,
shard, s)``. Random keys of segments: ``derive_key(shard_key, 3, s)`` for the shard's key
``shard_key`` (a shard of one segment uses ``shard_key`` itself).

Example:
    >>> import torch
    >>> from gradcomp.codecs import FPCodec, decode_payload
    >>> cache = PlanCache(per_tensor=True)
    >>> layout = ((0, 100), (1, 50))  # (parameter key, numel) of the bucket's tensors
    >>> x = torch.cat([torch.full((100,), 1e-6), torch.full((50,), 3.0)])
    >>> points = cache.segment_points(layout, 0, 150)
    >>> points
    [0, 100, 150]
    >>> y = decode_payload(cache.encode(FPCodec(6), x, points, (0, 1, 0), key=1, refit=True), 150)
    >>> bool(torch.allclose(y, x, rtol=0.3))
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradcomp.codecs import Codec
from gradcomp.codecs.base import FLAG_NONFINITE, ShardFit, fit_or_none
from gradcomp.codecs.segments import join_segments, segments_wire_bytes, split_points
from gradcomp.numerics.rng import derive_key

# Parts of a shard smaller than this (tiny tensors: a classifier's bias) share one segment.
MIN_SEGMENT_NUMEL = 64
# Payload-size ratios against the last refit's beyond which a data-sized codec's shard is refitted:
# tight above (more bytes than planned breaks a bit budget), looser below (fewer bytes only cost
# accuracy, and shrinking gradients are the common case between refits).
DRIFT_UP, DRIFT_DOWN = 1.1, 1.3
_MISSING = object()  # a cache entry absent before a refit that is undone


class PlanCache:
    """Fits and plans per shard segment (see the module docstring); not thread-safe (one worker uses it)."""

    def __init__(self, per_tensor: bool = True, min_segment: int = MIN_SEGMENT_NUMEL,
                 follow_growth: bool = True):
        if not isinstance(per_tensor, bool):
            raise ValueError(f"per_tensor must be True or False, got {per_tensor!r}")
        self.drift_up = DRIFT_UP if follow_growth else math.inf
        self.per_tensor = per_tensor
        self.min_segment = min_segment
        self.fits: dict[tuple, ShardFit | None] = {}  # (bucket, phase, shard, segment)
        self.plans: dict[tuple, Any] = {}
        self._points: dict[tuple, list[int]] = {}  # (layout, start, stop) -> segment bounds
        self.sizes: dict[tuple, int] = {}  # (bucket, phase, shard) -> payload bytes at the last refit
        self.drift_refits = 0  # refits triggered by payload-size drift (see the module docstring)

    def segment_points(self, layout: tuple, start: int, stop: int) -> list[int]:
        """Segment boundaries of ``[start, stop)`` of a bucket of ``layout`` ((key, numel) per
        tensor), relative to ``start``: ``[0, ..., stop - start]`` (one segment if not per tensor)."""
        if not self.per_tensor or not layout:
            return [0, stop - start]
        key = (layout, start, stop)  # the layout tuple itself: no per-step rebuild on the hot path
        points = self._points.get(key)
        if points is None:
            points = split_points([n for _, n in layout], start, stop, self.min_segment)
            self._points[key] = points = points if len(points) > 1 else [0, stop - start]
        return points

    def shard_plans(self, codec: Codec, shard_key: tuple, shard: torch.Tensor, points: list[int],
                    refit: bool) -> list:
        """The plans of a shard's segments: fitted and planned together on ``refit`` (or when one
        is missing: after :meth:`load_state_dict` from the stored fits, so a resumed run encodes
        the same); cached otherwise. Codecs with ``uses_fit = False`` are not fitted."""
        keys = [shard_key + (s,) for s in range(len(points) - 1)]
        if refit or any(k not in self.plans for k in keys):
            fits = []
            for k, a, b in zip(keys, points, points[1:]):
                if not codec.uses_fit:
                    fit = None
                elif not refit and k in self.fits:
                    fit = self.fits[k]
                else:
                    fit = fit_or_none(shard[a:b])
                self.fits[k] = fit
                fits.append(fit)
            plans = codec.plan_segments(fits, [b - a for a, b in zip(points, points[1:])])
            self.plans.update(zip(keys, plans))
        return [self.plans[k] for k in keys]

    def encode(self, codec: Codec, shard: torch.Tensor, points: list[int], shard_key: tuple,
               key: int, refit: bool) -> torch.Tensor:
        """One payload of ``shard``: the codec's own for one segment, SEGMENTS for several.

        Codecs without a fit (``uses_fit = False``: TopK, Identity, Half) encode the shard whole:
        they have no plan to make per tensor, and a top-k per tensor would spread its entries
        evenly over the tensors instead of taking the shard's largest. For the others:

        * a segment planned without a fit (no nonzero finite entry then: an unused parameter, a
          non-finite step) whose data now has nonzero entries is refitted at once (a pruning plan
          without a fit sends zeros);
        * a shard whose payload is flagged non-finite leaves the cache as it was: fits from a
          poisoned step never plan later ones (the step itself is skipped by the optimizer);
        * codecs with data-dependent payload sizes are refitted on drift (module docstring).
        """
        if not codec.uses_fit:
            return self._encode(codec, shard, [0, points[-1]],
                                self.shard_plans(codec, shard_key, shard, [0, points[-1]], refit), key)
        keys = [shard_key + (s,) for s in range(len(points) - 1)]
        fresh = refit or any(k not in self.fits for k in keys)  # new fits this call
        if not fresh and any(self.fits[k] is None and bool(shard[a:b].any())
                             for k, a, b in zip(keys, points, points[1:])):
            fresh = refit = True
        before = self._snapshot(keys, shard_key) if fresh else None
        payload = self._encode(codec, shard, points, self.shard_plans(codec, shard_key, shard, points, refit), key)
        sized = codec.wire_bytes(1) is None
        if (fresh or sized) and int(payload[1]) & FLAG_NONFINITE:
            if before is not None:
                self._restore(before)
            return payload
        if not sized:
            return payload
        base = self.sizes.get(shard_key)
        if not fresh and base is not None and not base / DRIFT_DOWN <= payload.numel() <= base * self.drift_up:
            payload = self._encode(codec, shard, points,
                                   self.shard_plans(codec, shard_key, shard, points, True), key)
            self.drift_refits += 1
            fresh = True
        if fresh or base is None:
            self.sizes[shard_key] = int(payload.numel())
        return payload

    def _snapshot(self, keys: list, shard_key: tuple) -> tuple:
        return ([(k, self.fits.get(k, _MISSING), self.plans.get(k, _MISSING)) for k in keys],
                (shard_key, self.sizes.get(shard_key, _MISSING)))

    def _restore(self, snapshot: tuple) -> None:
        entries, (shard_key, size) = snapshot
        for k, fit, plan in entries:
            for table, value in ((self.fits, fit), (self.plans, plan)):
                if value is _MISSING:
                    table.pop(k, None)
                else:
                    table[k] = value
        if size is _MISSING:
            self.sizes.pop(shard_key, None)
        else:
            self.sizes[shard_key] = size

    @staticmethod
    def _encode(codec: Codec, shard: torch.Tensor, points: list[int], plans: list, key: int) -> torch.Tensor:
        if len(plans) == 1:
            return codec.encode(shard, key=key, plan=plans[0])
        parts = [codec.encode(shard[a:b], key=derive_key(key, 3, s), plan=plan)
                 for s, (a, b, plan) in enumerate(zip(points, points[1:], plans))]
        return join_segments(parts, [b - a for a, b in zip(points, points[1:])])

    def fixed_size(self, codec: Codec, layout: tuple):
        """``(start, stop) -> payload bytes`` of a fixed-size codec's shard (no size exchange
        needed), else ``None``."""
        if codec.wire_bytes(1) is None:
            return None

        def wire(numel: int) -> int:
            size = codec.wire_bytes(numel)
            if size is None:  # a fixed-size codec's size is known for every numel
                raise ValueError(f"{codec!r}: wire_bytes({numel}) is None for a fixed-size codec")
            return size

        def size(start: int, stop: int) -> int:
            points = self.segment_points(layout, start, stop) if codec.uses_fit else [0, stop - start]
            if len(points) <= 2:
                return wire(stop - start)
            return segments_wire_bytes([wire(b - a) for a, b in zip(points, points[1:])])
        return size

    def describe(self, codec: Codec, shard_key: tuple) -> dict:
        """The codec's summary of a shard's plan: its first segment's, with the segment count and
        every segment's format when there are several."""
        plans: list[Any] = []
        while (plan_key := shard_key + (len(plans),)) in self.plans:
            plans.append(self.plans[plan_key])
        info = codec.describe(plans[0] if plans else None)
        if len(plans) > 1:
            info["segments"] = len(plans)
            info["formats"] = sorted({str(codec.describe(p).get("format")) for p in plans})
        return info

    def state_dict(self) -> dict[str, list]:
        """The fits, ``"bucket/phase/shard/segment" -> [mu, sigma, count, max_abs, *sample]`` (``[]``: no fit)."""
        return {"/".join(str(int(t)) for t in key):
                [f.mu, f.sigma, float(f.count), getattr(f, "max_abs", math.inf), *getattr(f, "sample", ())]
                if f is not None else [] for key, f in self.fits.items()}

    def sizes_state_dict(self) -> dict[str, int]:
        """The drift baselines, ``"bucket/phase/shard" -> payload bytes at the last refit``."""
        return {"/".join(str(int(t)) for t in key): int(n) for key, n in self.sizes.items()}

    def load_state_dict(self, fits: dict, sizes: dict | None = None) -> None:
        """Restore :meth:`state_dict`'s fits and :meth:`sizes_state_dict`'s baselines (``None``:
        none saved; each shard's next payload sets its baseline). Plans are rebuilt from the fits
        at each key's first use, so a resumed run encodes as the uninterrupted one would."""
        loaded, baselines = {}, {}
        for k, v in fits.items():
            key = tuple(int(t) for t in k.split("/"))
            if len(key) != 4:
                raise ValueError(f"state_dict fit key {k!r} is not bucket/phase/shard/segment")
            loaded[key] = ShardFit(v[0], v[1], int(v[2]), v[3], tuple(v[4:])) if v else None
        for k, n in (sizes or {}).items():
            key = tuple(int(t) for t in k.split("/"))
            if len(key) != 3 or isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"state_dict payload size {k!r}: {n!r} is not bucket/phase/shard: bytes >= 1")
            baselines[key] = n
        self.fits, self.sizes = loaded, baselines
        self.plans.clear()
