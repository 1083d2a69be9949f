"""Trainer integrations of gradcomp's DDP hook.

Each integration is its own module and imports its trainer only when imported itself, so
``import gradcomp`` never needs a trainer installed:

- :mod:`gradcomp.integrations.lightning`: :class:`~gradcomp.integrations.lightning.GradcompDDPStrategy`,
  a Lightning ``DDPStrategy`` that registers the hook on CPU and GPU
  (``pip install gradcomp[lightning]``).

Accelerate and torchrun need no integration module: they hand you the DDP model, and
:func:`gradcomp.register` does the rest (see ``examples/accelerate_ddp.py`` and
``examples/torchrun_ddp.py``).
"""
