"""The core install (torch, numpy, scipy, ninja) is enough to import gradcomp's modules.

The packages of the extras (train: mnist1d, scikit-learn, tqdm; bench: matplotlib; ray; horovod;
lightning; accelerate) are imported lazily, where the training application or an integration
needs them. A child interpreter blocks them all and imports every module of the package.
"""

import json
import subprocess
import sys

EXTRA_PACKAGES = ["mnist1d", "sklearn", "tqdm", "matplotlib", "ray", "horovod", "lightning",
                  "pytorch_lightning", "accelerate", "psutil"]
# Modules that exist only to connect to an extra and import it at the top, by design.
NEED_AN_EXTRA = {"gradcomp.app._ray_loopback": "ray", "gradcomp.integrations.lightning": "lightning"}

_CHILD = r"""
import importlib, importlib.abc, json, pkgutil, re, sys

blocked = set(json.loads(sys.argv[1]))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
import gradcomp

failed = {}
names = ["gradcomp"] + [m.name for m in pkgutil.walk_packages(gradcomp.__path__, "gradcomp.")]
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as e:
        # the missing package, also when a module re-raises with its own advice
        found = re.search(r"No module named '([\w.]+)'", str(e))
        failed[name] = found.group(1) if found else str(e)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
print(json.dumps({"names": names, "failed": failed, "leaked": leaked}))
"""


def test_every_module_imports_with_the_extras_blocked(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(EXTRA_PACKAGES)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"gradcomp.app.train", "gradcomp.app.data", "gradcomp.app.launch", "gradcomp.numerics.kernels",
            "gradcomp.comm.hook", "gradcomp.codecs"} <= set(out["names"])
    failed = {name: blocked.split(".")[0].strip("'") for name, blocked in out["failed"].items()}
    assert failed == NEED_AN_EXTRA, out["failed"]
    assert out["leaked"] == []


def test_the_blocker_blocks(tmp_path):
    # The test above is only worth something if a blocked import really fails in the child.
    code = _CHILD.replace("import gradcomp\n", "import gradcomp\nimport tqdm\n", 1)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(["tqdm"])], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr
