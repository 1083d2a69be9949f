"""The native kernels' build cache: its key, its folder, its lock, what counts as built.

Building is replaced by a stub here (a real build takes a minute); the real build and its reuse
by a second environment are tested in ``test_packaging.py`` (an installed wheel in a fresh venv
loads this environment's build without compiling).
"""

import threading
import time
import types
from pathlib import Path

import pytest

from gradcomp.numerics import kernels


def test_key_covers_every_part_and_nothing_else():
    parts = kernels.build_key_parts()
    assert {"torch", "python", "compiler", "cflags", "ldflags", "cpu", "sources"} <= parts.keys()
    key = kernels.build_key(parts)
    assert key == kernels.build_key(dict(parts)) == kernels.build_key()  # deterministic
    assert key.startswith("gradcomp_codecs_")
    for name in parts:
        changed = dict(parts, **{name: parts[name] + " changed"})
        assert kernels.build_key(changed) != key, name


def test_key_follows_torch_compiler_and_flags(monkeypatch):
    key = kernels.build_key()
    monkeypatch.setattr(kernels.torch, "__version__", "0.0.0-other")
    assert kernels.build_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "no-such-compiler-gradcomp")
    assert kernels.build_key_parts()["compiler"] == "no-such-compiler-gradcomp: not found"
    assert kernels.build_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("GRADCOMP_KERNELS_SANITIZE", "address")
    assert "-fsanitize=address" in kernels.build_key_parts()["cflags"]
    assert kernels.build_key() != key


def test_cache_dir_precedence(monkeypatch, tmp_path):
    for var in ("GRADCOMP_KERNEL_CACHE", "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert kernels.cache_dir() == Path.home() / ".cache" / "gradcomp" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernels.cache_dir() == tmp_path / "xdg" / "gradcomp" / "kernels"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert kernels.cache_dir() == tmp_path / "te" / "gradcomp"
    monkeypatch.setenv("GRADCOMP_KERNEL_CACHE", str(tmp_path / "gc"))
    assert kernels.cache_dir() == tmp_path / "gc"


@pytest.fixture
def stub_build(monkeypatch, tmp_path):
    """A cache in ``tmp_path`` and stubs for compiling (``calls["build"]``) and loading."""
    monkeypatch.setenv("GRADCOMP_KERNEL_CACHE", str(tmp_path / "cache"))
    calls = {"build": 0, "import": 0}

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls["build"] += 1
        assert Path(build_directory) == tmp_path / "cache" / name
        assert not (Path(build_directory) / "lock").exists()  # a stale torch lock is cleared first
        (Path(build_directory) / f"{name}.so").write_bytes(b"built")
        return types.SimpleNamespace(origin="built")

    def fake_import(name, directory):
        calls["import"] += 1
        return types.SimpleNamespace(origin="cache")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(kernels, "_import_built", fake_import)
    return calls


def test_builds_once_then_loads_and_announces_only_the_build(stub_build, capsys):
    key = kernels.build_key()
    (kernels.cache_dir() / key).mkdir(parents=True)
    (kernels.cache_dir() / key / "lock").write_text("")  # left by a killed torch build
    assert not kernels.is_built()
    assert kernels._load_or_build().origin == "built"
    assert "gradcomp: building" in capsys.readouterr().err
    assert kernels.is_built()
    record = (kernels.cache_dir() / key / "COMPLETE").read_text()
    assert "torch=" in record and "compiler=" in record
    for _ in range(2):  # another process, another venv with the same key: no compiler runs
        assert kernels._load_or_build().origin == "cache"
    assert "gradcomp: building" not in capsys.readouterr().err
    assert stub_build == {"build": 1, "import": 2}


def test_unfinished_build_is_redone(stub_build):
    key = kernels.build_key()
    (kernels.cache_dir() / key).mkdir(parents=True)
    (kernels.cache_dir() / key / f"{key}.so").write_bytes(b"half")  # killed before COMPLETE
    assert kernels._load_or_build().origin == "built"
    assert stub_build["build"] == 1


def test_a_second_loader_waits_for_the_lock(stub_build):
    key = kernels.build_key()
    kernels.cache_dir().mkdir(parents=True)
    done = threading.Event()

    def load():
        kernels._load_or_build()
        done.set()

    with kernels._locked(kernels.cache_dir() / f"{key}.lock"):  # a build in progress elsewhere
        t = threading.Thread(target=load)
        t.start()
        time.sleep(0.3)
        assert not done.is_set() and stub_build["build"] == 0
    t.join(timeout=30)
    assert done.is_set() and stub_build["build"] == 1
