"""Describe the machine a measurement ran on (for benchmark and run headers)."""

from __future__ import annotations

import os
import platform

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what the platform module reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """CPU, cores, torch threads, Python/torch/gradcomp versions, CUDA device if any."""
    from gradcomp import __version__

    env = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradcomp": __version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def write_report(directory: str | None, stem: str, data: dict, markdown: str) -> None:
    """Write ``{stem}.json`` and ``{stem}.md`` into ``directory`` (created); no-op for ``None``."""
    import json

    if directory is None:
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=2)
    with open(os.path.join(directory, f"{stem}.md"), "w") as f:
        f.write(markdown + "\n")
