"""TrainConfig.timeout: validated, and handed to the process group and the hook state."""

import datetime
import math
from types import SimpleNamespace

import pytest
import torch

from gradcomp.app.methods import CommHook
from gradcomp.app.train import TrainConfig


def test_timeout_default_and_validation():
    assert TrainConfig().timeout == 300.0
    for bad in (0, -1.0, math.nan, math.inf, "5", True, None):
        with pytest.raises(ValueError, match="TrainConfig.timeout must be a number"):
            TrainConfig(timeout=bad)
    assert TrainConfig.from_dict(TrainConfig(timeout=7.5).to_dict()).timeout == 7.5


def test_hook_state_gets_the_timeout():
    """What train() registers on DDP carries config.timeout (also when the group is not ours)."""
    registered = []
    fake_ddp = SimpleNamespace(process_group=None, register_comm_hook=lambda s, h: registered.append(s),
                               module=torch.nn.Linear(2, 2))
    model = fake_ddp.module
    hook = CommHook(TrainConfig(codec="fp", timeout=12.5), fake_ddp, model, 2)
    try:
        assert registered == [hook.state]
        assert hook.state.timeout == datetime.timedelta(seconds=12.5)
    finally:
        hook.close()


def test_owned_group_is_created_with_the_timeout(monkeypatch):
    """Under the env:// contract train() calls init_process_group(timeout=config.timeout)."""
    import torch.distributed as dist

    from gradcomp.app import distributed as D

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(backend, **kw):
        seen.update(kw, backend=backend)
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    for k, v in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Stop):
        D.setup_distributed(TrainConfig(timeout=42.0), torch.device("cpu"))
    assert seen["timeout"] == datetime.timedelta(seconds=42.0) and seen["backend"] == "gloo"
