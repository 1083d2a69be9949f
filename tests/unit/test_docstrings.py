"""Every docstring example of the library runs and prints what it shows (doctest).

Docstrings are contracts; an example that no longer runs is a broken contract.
"""

import doctest
import importlib
import pkgutil

import pytest

import gradcomp

# The training application's launcher and the Ray helpers import Ray at module level; their
# examples (if any) need a cluster. Everything else is checked.
SKIP = {"gradcomp.app.launch", "gradcomp.app._ray_loopback", "gradcomp.integrations.lightning"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(gradcomp.__path__, "gradcomp.")
                 if m.name not in SKIP and not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
