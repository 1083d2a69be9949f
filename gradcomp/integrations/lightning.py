"""Lightning: a DDP strategy whose gradient all-reduce is gradcomp's compression hook.

Lightning's own :class:`~lightning.pytorch.strategies.DDPStrategy` registers its
``ddp_comm_hook`` only when the root device is CUDA; on CPU (gloo) it drops the hook without a
word and trains with plain fp32 all-reduce. :class:`GradcompDDPStrategy` registers
:func:`gradcomp.compression_hook` on every device.

Example::

    import lightning as L
    from gradcomp.codecs import FPCodec
    from gradcomp.integrations.lightning import GradcompDDPStrategy

    strategy = GradcompDDPStrategy(codec=FPCodec(6), error_feedback=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=100)
    trainer.fit(model, train_loader)
    print(strategy.stats()["compression_ratio"])  # this rank's statistics

Needs ``pip install gradcomp[lightning]`` (Lightning >= 2.4, < 2.7: the strategy overrides
``DDPStrategy._register_ddp_hooks``, which those versions call once DDP wraps the model).
"""

from __future__ import annotations

import inspect
from typing import Any

try:
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as exc:  # the optional extra is not installed (or does not import)
    raise ImportError(
        f"gradcomp.integrations.lightning needs Lightning: pip install gradcomp[lightning] ({exc})"
    ) from exc

from torch.nn.parallel import DistributedDataParallel

from gradcomp.codecs import Codec
from gradcomp.comm.hook import CompressionState, compression_hook

if not callable(getattr(DDPStrategy, "_register_ddp_hooks", None)):
    raise ImportError(
        "gradcomp.integrations.lightning: this Lightning version's DDPStrategy has no "
        "_register_ddp_hooks(), so the hook could not be registered; pip install gradcomp[lightning] "
        "installs a supported version (>= 2.4, < 2.7)"
    )

# DDPStrategy's own hook arguments: the strategy registers gradcomp's hook instead.
_COMM_HOOK_ARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper")


def _parameter_names(fn) -> set[str]:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _state_option_names() -> set[str]:
    """CompressionState keyword options the strategy accepts (not the codec, not the group or
    transport: the strategy reduces over DDP's group)."""
    return _parameter_names(CompressionState.__init__) - {"codec", "process_group", "transport"}


class GradcompDDPStrategy(DDPStrategy):
    """A Lightning ``DDPStrategy`` that reduces gradients with :func:`gradcomp.compression_hook`.

    Args:
        codec: a :class:`gradcomp.codecs.Codec`; the strategy builds
            ``CompressionState(codec, **options)`` from it.
        state: a ready :class:`gradcomp.CompressionState` instead (exactly one of ``codec`` and
            ``state``).
        **kwargs: :class:`gradcomp.CompressionState`'s keyword options (``error_feedback``,
            ``warmup_steps``, ``refit_every``, ``seed``, ``collective``, ``reduce_codec``) go to
            the state; every other keyword goes to ``DDPStrategy`` (``timeout``,
            ``find_unused_parameters``, ``static_graph``, ``start_method``, ...). A name both
            accept means ``DDPStrategy``'s: ``timeout`` sets Lightning's process group timeout,
            which the hook's collectives then inherit (a different hook timeout: ``state=``).

    The state is built here, before Lightning starts the processes, for the default process
    group (the one Lightning's DDP uses); it binds to the group at its first bucket. When DDP
    wraps the model the strategy registers the hook and calls ``state.bind_model`` (so error
    feedback residuals checkpoint by parameter). On GPU it replaces Lightning's hook
    registration as well; on CPU it adds the one Lightning leaves out. After a ``fit`` that
    ended normally, ``teardown`` closes the state (its worker thread and process group; it
    rebinds if used again); the statistics stay readable. With ``start_method="spawn"`` or
    ``"fork"`` (``ddp_spawn``, notebooks) the ranks train on copies of the state, so the
    statistics are the workers', not this object's.

    Attributes:
        state: the :class:`gradcomp.CompressionState` (this rank's statistics, ``state_dict()``).

    Raises:
        ValueError: neither or both of ``codec`` and ``state``; ``codec`` not a ``Codec``;
            ``state`` not a ``CompressionState``; state options together with ``state=``;
            ``process_group`` (the strategy uses DDP's group); ``ddp_comm_state``,
            ``ddp_comm_hook`` or ``ddp_comm_wrapper`` (the strategy's hook is gradcomp's); an
            invalid state option (raised by ``CompressionState``).
    """

    def __init__(self, codec: Codec | None = None, *, state: CompressionState | None = None,
                 **kwargs: Any) -> None:
        if (codec is None) == (state is None):
            raise ValueError("GradcompDDPStrategy needs exactly one of codec= and state=")
        given = sorted(k for k in _COMM_HOOK_ARGS if k in kwargs)
        if given:
            raise ValueError(f"GradcompDDPStrategy registers gradcomp's hook itself; remove {given}")
        if "process_group" in kwargs:
            raise ValueError("GradcompDDPStrategy reduces over the DDP model's process group; "
                             "remove process_group=")
        names = _state_option_names() - _parameter_names(DDPStrategy.__init__)
        options = {k: kwargs.pop(k) for k in sorted(names & kwargs.keys())}
        if state is not None:
            if not isinstance(state, CompressionState):
                raise ValueError(f"state must be a gradcomp.CompressionState, got {type(state).__name__}")
            if options:
                raise ValueError(f"{sorted(options)} are CompressionState options: with state=, pass "
                                 "them to CompressionState(...) instead")
        else:
            if not isinstance(codec, Codec):
                raise ValueError(f"codec must be a gradcomp.codecs.Codec, got {type(codec).__name__}")
            state = CompressionState(codec, **options)
        super().__init__(**kwargs)
        self._gradcomp_state = state
        self._gradcomp_failed = False

    @property
    def state(self) -> CompressionState:
        """The hook's state (the same object before, during and after ``fit``)."""
        return self._gradcomp_state

    def stats(self) -> dict:
        """This rank's :meth:`gradcomp.CompressionState.stats` (``steps`` 0: the hook never ran)."""
        return self._gradcomp_state.stats()

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._gradcomp_failed = True  # teardown then leaves the state open: no waiting on peers

    def teardown(self) -> None:
        super().teardown()
        if not self._gradcomp_failed:
            self._gradcomp_state.close()

    def _register_ddp_hooks(self) -> None:
        """Register gradcomp's hook on the DDP-wrapped model, on any device (Lightning: CUDA only)."""
        model = self.model
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(f"expected the DDP-wrapped model here, got {type(model).__name__}")
        self._gradcomp_state.bind_model(model)
        model.register_comm_hook(self._gradcomp_state, compression_hook)
