"""The hook on CUDA tensors: stream-correct futures (runs only where a GPU is present).

Each of 2 gloo ranks (gloo carries CUDA tensors; both ranks may share one GPU) produces a
bucket on a side stream with a long kernel chain and submits it *without synchronising*, as
DDP does from its backward stream; the hook must wait for that stream before reading, and its
future must make the consumer's stream wait for the result. The result must equal, bit for
bit, the CPU path's on the same input (same codec, seed, keys), and replicas must agree.
Without a GPU this module is skipped: the CPU path is covered by tests/distributed.
"""

import pytest
import torch

import gradcomp
from gradcomp.codecs import FPCodec, PruneFPCodec

from .harness import FakeBucket, spawn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_vs_cpu(rank: int, world: int) -> dict:
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    out = {}
    for name, codec in (("fp6", FPCodec(6)), ("prune_fp", PruneFPCodec(0.85, 6))):
        gpu = gradcomp.CompressionState(codec, warmup_steps=0, seed=5)
        cpu = gradcomp.CompressionState(codec, warmup_steps=0, seed=5)
        params = [torch.nn.Parameter(torch.empty(1))]
        for step in range(4):
            g = torch.Generator().manual_seed(100 * rank + step)
            x = torch.randn(1 << 20, generator=g).mul_(3).sub_(6).exp_()
            producer = torch.cuda.Stream(device)
            with torch.cuda.stream(producer):
                big = torch.randn(4096, 4096, device=device)
                for _ in range(8):  # keep the producer stream busy well past submit()
                    big = big @ big / 64
                buf = x.to(device, non_blocking=False) + big[0, 0] * 0  # ready only after the chain
                fut = gpu.submit(FakeBucket(buf, params=params))
                y = fut.wait()  # the consumer stream (producer) now waits on the result
                y_host = y.to("cpu")
            ref = cpu.submit(FakeBucket(x.clone(), params=params)).wait()
            out[(name, step)] = {"equal_cpu": torch.equal(y_host.view(torch.int32), ref.view(torch.int32)),
                                 "y": y_host}
        gpu.close()
        cpu.close()
    return out


def test_cuda_hook_is_stream_correct_and_matches_cpu(tmp_path):
    results = spawn(2, _cuda_vs_cpu, tmp_path, timeout=300)
    for key, r0 in results[0].items():
        assert torch.equal(r0["y"].view(torch.int32), results[1][key]["y"].view(torch.int32)), key
        for r in results:
            assert r[key]["equal_cpu"], key
