"""gradcomp.app.lm (GPT byte-level decoder) and gradcomp.app.corpus (stdlib sources split by file)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from gradcomp.app.corpus import SEPARATOR, fixed_batches, lm_batch, load_python_corpus, stdlib_files
from gradcomp.app.lm import build_lm, lm_loss, lm_num_parameters

SMALL = dict(d_model=32, n_layer=2, n_head=4, context=16)


def test_default_lm_size_pre_ln_and_tied():
    m = build_lm()
    n = sum(p.numel() for p in m.parameters())
    assert n >= 5_000_000
    assert n == lm_num_parameters(256, 128, 256, 7) == 5_627_136
    assert m.head.weight is m.tok.weight  # one Parameter: DDP and AdamW see it once
    assert len(list(m.parameters())) == 4 + 12 * 7  # tok, pos, ln_f (2) + 12 per block
    blk = m.blocks[0]
    assert isinstance(blk.ln1, torch.nn.LayerNorm) and isinstance(blk.ln2, torch.nn.LayerNorm)


def test_shapes_loss_and_tied_gradient():
    m = build_lm(**SMALL, seed=3)
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    logits = m(x)
    assert logits.shape == (3, 16, 256)
    targets = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(9))
    loss = lm_loss(logits, targets)
    assert abs(float(loss.detach()) - torch.log(torch.tensor(256.0)).item()) < 0.2  # near uniform at init
    loss.backward()
    assert m.tok.weight.grad is m.head.weight.grad and m.tok.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_causal():
    m = build_lm(**SMALL, seed=0).eval()
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[0, :10], b[0, :10]) and not torch.equal(a[0, 10:], b[0, 10:])


def test_seeded_init_is_deterministic_and_leaves_global_rng():
    state = torch.get_rng_state()
    a, b, c = build_lm(**SMALL, seed=5), build_lm(**SMALL, seed=5), build_lm(**SMALL, seed=6)
    assert torch.equal(state, torch.get_rng_state())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(a.tok.weight, c.tok.weight)
    assert float(a.blocks[0].proj.weight.detach().std()) < float(a.blocks[0].qkv.weight.detach().std())  # scaled residual init


@pytest.mark.parametrize("kw", [dict(d_model=30, n_head=4), dict(n_layer=0), dict(seed=-1), dict(vocab_size=1)])
def test_invalid_config(kw):
    with pytest.raises(ValueError):
        build_lm(**kw)


@pytest.fixture(scope="module")
def corpus():
    return load_python_corpus()


def test_corpus_is_the_stdlib_split_by_file(corpus):
    files = stdlib_files()
    assert len(files) == corpus.files_train + corpus.files_val > 500
    assert not any("site-packages" in f for f in files)
    assert 0.05 < corpus.files_val / len(files) < 0.15
    # each split holds whole files: file count = separator count, and the split sizes add up
    assert int((corpus.train == SEPARATOR).sum()) == corpus.files_train
    assert int((corpus.val == SEPARATOR).sum()) == corpus.files_val
    root = corpus.root
    total = sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert corpus.train.numel() + corpus.val.numel() == total + len(files)
    # a validation file's bytes appear in the validation split, not in training
    val_file = next(f for f in files if int.from_bytes(hashlib.sha256(f.encode()).digest()[:8], "big") % 10000 < 1000
                    and os.path.getsize(os.path.join(root, f)) > 2000)
    with open(os.path.join(root, val_file), "rb") as f:
        chunk = f.read()
    assert chunk in bytes(corpus.val.numpy()) and chunk not in bytes(corpus.train.numpy())


def test_corpus_deterministic(corpus):
    again = load_python_corpus()
    assert again.sha256 == corpus.sha256
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    d = corpus.describe()
    assert d["python"] and d["files"] == len(stdlib_files()) and len(d["sha256"]) == 64


def test_corpus_split_by_file_on_a_small_tree(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_bytes(f"x = {i}\n".encode())
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "skip.py").write_bytes(b"no\n")
    a = load_python_corpus(0.25, root=str(tmp_path))
    assert a.files_train + a.files_val == 40
    # moving one file in or out changes no other file's side
    (tmp_path / "extra.py").write_bytes(b"y = 1\n")
    b = load_python_corpus(0.25, root=str(tmp_path))
    assert a.files_val + a.files_train + 1 == b.files_val + b.files_train
    assert bytes(a.val.numpy()) in bytes(b.val.numpy()) or b.files_val == a.files_val + 1
    with pytest.raises(ValueError):
        load_python_corpus(1.0, root=str(tmp_path))


def test_batches(corpus):
    x, y = lm_batch(corpus.train, 8, 64, seed=0, step=3)
    assert x.shape == y.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = lm_batch(corpus.train, 8, 64, seed=0, step=3)
    assert torch.equal(x, x2)
    assert not torch.equal(x, lm_batch(corpus.train, 8, 64, seed=0, step=4)[0])
    r1, _ = lm_batch(corpus.train, 8, 64, seed=0, step=3, rank=1, world_size=4)
    assert torch.equal(r1, x[1::4])  # a rank's rows of the global batch
    with pytest.raises(ValueError):
        lm_batch(corpus.train, 6, 64, seed=0, step=0, world_size=4)
    v1, v2 = fixed_batches(corpus.val, 2, 4, 64), fixed_batches(corpus.val, 2, 4, 64)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2))
