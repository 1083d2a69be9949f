"""Process groups of a training run: set-up, the few collectives the run needs, teardown.

:func:`setup_distributed` reads the standard environment contract (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) unless a process group already exists (Ray
Train creates one before calling the train function; tests create one on a ``FileStore``), or
initialises Horovod for ``transport="horovod"``. It returns a :class:`DistContext` that
:func:`teardown_distributed` undoes. One process (``WORLD_SIZE`` unset or 1) needs no group.

Example:
    >>> import torch
    >>> from gradcomp.app.config import TrainConfig
    >>> ctx = setup_distributed(TrainConfig(), torch.device("cpu"))  # doctest: +SKIP
    >>> ctx.rank, ctx.world_size  # doctest: +SKIP
    (0, 1)
    >>> teardown_distributed(ctx)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradcomp.app.config import TrainConfig


@dataclass
class DistContext:
    """Where this process stands in the run: its rank, the world size and the group to use.

    ``owned``: :func:`setup_distributed` created the default group, so
    :func:`teardown_distributed` destroys it. ``group``: the group the run communicates on
    (``None``: the default group). ``horovod``: the ``horovod.torch`` module when
    ``transport == "horovod"``.

    >>> DistContext().world_size
    1
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False
    group: Any = None
    horovod: Any = None


def select_device(config: TrainConfig, local_rank: int) -> torch.device:
    """Return the device ``config.device`` asks for (``"auto"``: CUDA if torch sees one).

    On CUDA the device index is ``local_rank`` modulo the visible devices; ``"cuda"`` without a
    CUDA device raises ``ValueError``.

    >>> from gradcomp.app.config import TrainConfig
    >>> select_device(TrainConfig(device="cpu"), 0)
    device(type='cpu')
    """
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("TrainConfig.device='cuda' but torch sees no CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_distributed(config: TrainConfig, device: torch.device) -> DistContext:
    """Join (or create) the run's process group; return where this process stands.

    Horovod transport: ``hvd.init()``. An existing default group (someone else's, with their
    timeout): a new group of the same ranks with ``config.timeout`` seconds, so a stalled peer
    fails this run after ``config.timeout``. Otherwise ``WORLD_SIZE > 1`` creates the default
    group (``nccl`` on CUDA, ``gloo`` on CPU, ``env://``, ``config.timeout``); a missing
    ``RANK``/``MASTER_ADDR``/``MASTER_PORT`` raises ``RuntimeError`` naming them.
    """
    if config.transport == "horovod":
        from gradcomp.comm.horovod import _import_hvd

        hvd = _import_hvd()
        hvd.init()
        return DistContext(hvd.rank(), hvd.size(), hvd.local_rank(), owned=False, horovod=hvd)
    if dist.is_available() and dist.is_initialized():
        # Someone else made the default group (Ray Train, a test), with their timeout: DDP, the
        # hook and train()'s own collectives run on a group of the same ranks with ours, so a
        # stalled peer fails this run after config.timeout (DDP's buffer broadcast and
        # all-reduce would otherwise wait out the default group's timeout, 30 min in torch).
        group = None
        if dist.get_world_size() > 1:
            group = dist.new_group(timeout=datetime.timedelta(seconds=config.timeout), group_desc="gradcomp_train")
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), group=group)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, "
                           "gradcomp-launch, or set the env:// contract (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=config.timeout))
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def teardown_distributed(d: DistContext) -> None:
    """Destroy the groups :func:`setup_distributed` created (the run's own group; the default
    group only if ``d.owned``). Safe to call after a failure."""
    if d.group is not None and dist.is_initialized():
        try:
            dist.destroy_process_group(d.group)
        except (RuntimeError, ValueError):
            pass
    if d.owned and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: DistContext) -> None:
    """Wait for every rank (Horovod: ``join``); a no-op with one process."""
    if d.horovod is not None:
        d.horovod.join()
    elif d.world_size > 1:
        dist.barrier(group=d.group)


def all_gather_object(d: DistContext, obj: Any) -> list:
    """Return every rank's ``obj`` (picklable), indexed by rank."""
    if d.horovod is not None:
        return list(d.horovod.allgather_object(obj))
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj, group=d.group)
    return out


@torch.no_grad()
def sync_buffers(model: nn.Module, d: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm/ST running statistics) before evaluating.

    Each rank updates its running statistics from its own batches; DDP only overwrites them
    with rank 0's at the next forward. Evaluating with rank 0's makes every rank report the
    same accuracy as the checkpoint (saved by rank 0) would give, and changes nothing in
    training, since DDP would broadcast the same values next.
    """
    if d.world_size <= 1:
        return
    if d.horovod is not None:
        d.horovod.broadcast_parameters(dict(model.named_buffers()), root_rank=0)
        return
    for b in model.buffers():
        dist.broadcast(b, src=0, group=d.group)


def fully_shard_model(model: nn.Module, d: DistContext, device: torch.device) -> None:
    """FSDP2: ``fully_shard`` each top-level child that holds parameters, then the root.

    The mesh is ``d.group`` (the run's group with ``config.timeout``) or the default group.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if d.group is not None:
        # A dimension name unique to this group: meshes over the same ranks compare equal, and
        # DTensor's caches would hand a later run (a second train() in the process) the mesh of
        # an earlier run's destroyed group.
        mesh = DeviceMesh.from_group(d.group, device.type, mesh_dim_names=(f"dp_{d.group.group_name}",))
    else:
        mesh = init_device_mesh(device.type, (d.world_size,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
