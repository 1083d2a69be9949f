"""Ray Train's torch backend with its rendezvous store on 127.0.0.1 (used by ``gradcomp-launch``).

Ray Train's ``TorchConfig`` sets up the process group with ``init_method="env://"``: rank 0's
``TCPStore`` then listens on every interface (torch binds ``::``/``0.0.0.0`` whatever
``MASTER_ADDR`` says), an unauthenticated key-value store anyone on the network can write to.
On the embedded single-node Ray every rank is local, so :class:`LoopbackTorchConfig` has rank 0
open the store's listening socket on 127.0.0.1 itself and hand it to ``TCPStore``
(``master_listen_fd``); the other ranks connect to it, and the group is created from that store
with the same backend and timeout Ray Train would use.

Imported only when Ray is (it subclasses Ray Train's private ``_TorchBackend``); a module of
its own so that Ray pickles these classes by reference.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_listener: socket.socket | None = None  # rank 0: the store's socket until TCPStore takes it


def _listen_on_loopback() -> int:
    """Rank 0: bind the rendezvous store's socket to 127.0.0.1; return its port."""
    global _listener
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    _listener = s
    return s.getsockname()[1]


def _init_process_group(backend: str, rank: int, world_size: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    global _listener
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray Train does
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        if _listener is None:
            raise RuntimeError("gradcomp: rank 0 has no rendezvous socket (worker restarted between setup steps)")
        fd = os.dup(_listener.fileno())  # TCPStore owns (and closes) the duplicate
        _listener.close()
        _listener = None
        store = dist.TCPStore("127.0.0.1", port, world_size, True, timeout, master_listen_fd=fd)
    else:
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):  # type: ignore[override]  # as _TorchBackend
        resources = worker_group.get_resources_per_worker()
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        v1_group: tuple[type, ...]
        try:
            from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup

            v1_group = (V1WorkerGroup,)
        except ImportError:  # pragma: no cover
            v1_group = ()
        if not isinstance(worker_group, v1_group):
            worker_group.execute(_set_torch_distributed_env_vars)
        port = worker_group.execute_single(0, _listen_on_loopback)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend, i, len(worker_group), port,
                                                   backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on 127.0.0.1 only (single-node clusters)."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend
