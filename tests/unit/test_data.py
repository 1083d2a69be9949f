"""Data sets (no download, deterministic) and per-rank sharded loaders."""

import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from gradcomp.app import data
from gradcomp.app.data import DATASETS, load_dataset, make_loader


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets an empty cache directory of its own."""
    monkeypatch.setenv("GRADCOMP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _labels(ds):
    return ds.tensors[1]


# ---------------------------------------------------------------------------------------------
# load_dataset


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        load_dataset("cifar10")
    for name in DATASETS:
        assert name in str(exc.value)


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": 1.5}, {"num_train": 0}, {"num_test": True},
                                    {"num_train": 1500, "num_test": 300}, {"input_shape": (1, 8, 8)}])
def test_digits_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_dataset("digits", **kwargs)


def test_digits_shapes_standardized_and_seeded_split():
    b = load_dataset("digits")
    assert (b.name, b.input_shape, b.num_classes) == ("digits", (1, 8, 8), 10)
    x, y = b.train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(b.test) == 360 and set(y.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-3
    again = load_dataset("digits")
    assert torch.equal(again.train.tensors[0], x) and torch.equal(again.test.tensors[1], b.test.tensors[1])
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.train.tensors[1], y)
    small = load_dataset("digits", num_train=100, num_test=50)
    assert (len(small.train), len(small.test)) == (100, 50)
    # The train split is a prefix of the same permutation: shrinking it keeps the first samples.
    assert torch.equal(_labels(small.train), y[:100])


def test_mnist1d_generated_cached_and_rng_preserved(private_cache, monkeypatch):
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    b = load_dataset("mnist1d", seed=3, num_train=200, num_test=57)
    assert (b.input_shape, b.num_classes, len(b.train), len(b.test)) == ((1, 40), 10, 200, 57)
    x, y = b.train.tensors
    assert x.shape == (200, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9 and torch.isfinite(x).all()
    # mnist1d reseeds numpy's and Python's global RNGs; we restore them.
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    files = os.listdir(private_cache)
    assert len(files) == 1 and files[0].startswith("mnist1d-") and files[0].endswith(".npz")

    import mnist1d.data

    def boom(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(mnist1d.data, "make_dataset", boom)
    again = load_dataset("mnist1d", seed=3, num_train=200, num_test=57)
    assert torch.equal(again.train.tensors[0], x) and torch.equal(again.test.tensors[1], b.test.tensors[1])
    # A corrupt cache file is regenerated, not trusted.
    monkeypatch.undo()
    monkeypatch.setenv("GRADCOMP_CACHE", str(private_cache))
    with open(os.path.join(private_cache, files[0]), "wb") as f:
        f.write(b"garbage")
    assert torch.equal(load_dataset("mnist1d", seed=3, num_train=200, num_test=57).train.tensors[0], x)


def test_mnist1d_matches_the_package_generator(monkeypatch):
    import mnist1d

    monkeypatch.setenv("GRADCOMP_CACHE", "off")
    assert data.cache_dir() is None
    b = load_dataset("mnist1d", seed=5, num_train=240, num_test=60)
    args = mnist1d.get_dataset_args()
    args.num_samples, args.seed = 300, 5
    d = mnist1d.data.make_dataset(args)  # its own 0.8 split of the same 300 samples
    ours = torch.cat([b.train.tensors[0], b.test.tensors[0]])[:, 0].numpy()
    theirs = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(torch.cat([b.train.tensors[1], b.test.tensors[1]]).numpy(),
                          np.concatenate([d["y"], d["y_test"]]))
    other = load_dataset("mnist1d", seed=6, num_train=240, num_test=60)
    assert not torch.equal(other.train.tensors[0], b.train.tensors[0])


def test_synthetic_configurable_and_deterministic():
    b = load_dataset("synthetic", num_train=300, num_test=100, input_shape=(3, 5), num_classes=4)
    assert (b.input_shape, b.num_classes) == ((3, 5), 4)
    assert b.train.tensors[0].shape == (300, 3, 5) and b.train.tensors[0].dtype == torch.float32
    assert set(_labels(b.train).tolist()) == {0, 1, 2, 3}
    same = load_dataset("synthetic", num_train=300, num_test=100, input_shape=(3, 5), num_classes=4)
    assert torch.equal(same.train.tensors[0], b.train.tensors[0])
    # Test set drawn from its own stream: independent of num_train.
    more = load_dataset("synthetic", num_train=500, num_test=100, input_shape=(3, 5), num_classes=4)
    assert torch.equal(more.test.tensors[0], b.test.tensors[0])
    other = load_dataset("synthetic", seed=1, num_train=300, num_test=100, input_shape=(3, 5), num_classes=4)
    assert not torch.equal(other.train.tensors[0], b.train.tensors[0])
    default = load_dataset("synthetic", num_train=10, num_test=10)
    assert default.input_shape == (1, 32, 32) and default.num_classes == 10


@pytest.mark.parametrize("kwargs", [{"input_shape": ()}, {"input_shape": (0, 3)}, {"input_shape": (2.0,)},
                                    {"num_classes": 1}, {"num_train": 2**20, "input_shape": (4096,)}])
def test_synthetic_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_dataset("synthetic", **kwargs)


# ---------------------------------------------------------------------------------------------
# make_loader


def _indices(n):
    return TensorDataset(torch.arange(n))


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return torch.cat([b[0] for b in loader]).tolist()


@pytest.mark.parametrize("n,world", [(100, 1), (100, 3), (97, 4)])
def test_shards_are_disjoint_and_cover(n, world):
    seen = [_epoch(make_loader(_indices(n), 1, rank=r, world_size=world, seed=7), 0) for r in range(world)]
    assert len({len(s) for s in seen}) == 1  # every rank the same number of steps
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == (n // world) * world  # disjoint; only the tail dropped
    # Without drop_last every sample appears (the sampler pads by repeating a few).
    padded = [_epoch(make_loader(_indices(n), 1, rank=r, world_size=world, drop_last=False), 0)
              for r in range(world)]
    assert set(i for s in padded for i in s) == set(range(n))


def test_loader_deterministic_per_seed_and_epoch_and_batches_full():
    ds = _indices(103)
    a = make_loader(ds, 10, rank=1, world_size=2, seed=3)
    b = make_loader(ds, 10, rank=1, world_size=2, seed=3)
    assert _epoch(a, 0) == _epoch(b, 0) and _epoch(a, 5) == _epoch(b, 5)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(make_loader(ds, 10, rank=1, world_size=2, seed=4), 0) != _epoch(a, 0)
    assert len(a) == 5 and all(len(x) == 10 for (x,) in a)  # 51 per rank, last partial batch dropped
    unshuffled = make_loader(ds, 10, rank=1, world_size=2, shuffle=False)
    assert _epoch(unshuffled, 0) == list(range(1, 101, 2))


def test_loader_never_touches_global_rng():
    state = torch.get_rng_state()
    loader = make_loader(_indices(50), 8)
    for e in range(2):
        _epoch(loader, e)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 2.0}, {"rank": 2, "world_size": 2},
                                    {"rank": -1}, {"world_size": 0}, {"rank": True}, {"seed": -1},
                                    {"shuffle": 1}, {"batch_size": 30, "world_size": 4}])
def test_loader_bad_arguments(kwargs):
    args = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError):
        make_loader(_indices(100), args.pop("batch_size"), **args)


def test_loader_rejects_empty_and_unsized():
    with pytest.raises(ValueError):
        make_loader(TensorDataset(torch.zeros(0)), 1)
    with pytest.raises(ValueError):
        make_loader(iter(range(3)), 1)
