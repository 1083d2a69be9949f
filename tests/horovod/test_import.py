"""gradcomp imports without Horovod, and the Horovod entry points say how to get it."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("call", ["h.HorovodTransport()", "h.run_on_ray(print, num_workers=1)",
                                  "h.DistributedOptimizer(None)"])
def test_gradcomp_imports_without_horovod_and_names_the_build_script(call):
    # sys.modules[name] = None makes `import horovod` fail as if it were not installed.
    code = ("import sys; sys.modules['horovod'] = None; sys.modules['horovod.torch'] = None\n"
            "import gradcomp, gradcomp.comm.horovod as h, torch\n"
            f"try:\n    {call}\nexcept (ImportError, ValueError) as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if "DistributedOptimizer" in call:  # argument checks come first, and say what is wrong
        assert out.stdout.startswith("ValueError") and "torch.optim.Optimizer" in out.stdout
    else:
        assert out.stdout.startswith("ImportError") and "launch/build_horovod.sh" in out.stdout, out.stdout
