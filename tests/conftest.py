"""Shared fixtures: tiny datasets made by the tests, and where the real shared data lives."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(os.environ.get("GENREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def one_torch_thread():
    """torch on one thread inside the test (timings and float sums stay stable), its thread count after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Overrides that make the generative model, its SFT and its decoding tiny enough for a test.
TINY_GENERATIVE = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "model.text_vocab_size=300",
    "sft.batch_tokens=512",
    "sft.warmup_steps=2",
    "data.max_history=5",
    "decode.num_beams=10",
    "decode.batch_size=16",
    "eval.ks=[1,5]",
    "eval.bootstrap=0",
]


def held_out_dataset(num_users: int = 40, train_items: int = 30, max_train: int = 12):
    """Users over items 0..train_items-1 in training; every valid and test target an item of its own.

    User u's valid and test targets are items ``train_items + 2u`` and ``train_items + 2u + 1``,
    so any of them in a training example is a leak that a test can see.
    """
    from genrec.data.dataset import Dataset

    items, sequences = make_dataset_frames(num_users=num_users, num_items=train_items + 2 * num_users)
    rng = np.random.default_rng(1)
    seqs = []
    for u in range(len(sequences)):
        train = rng.choice(train_items, size=int(rng.integers(6, max_train)), replace=False)
        seqs.append(np.concatenate([train, [train_items + 2 * u, train_items + 2 * u + 1]]).astype(np.int64))
    sequences = sequences.assign(
        item_ids=seqs, valid_pos=[len(s) - 2 for s in seqs], test_pos=[len(s) - 1 for s in seqs]
    )
    return Dataset(items, sequences, max_history=5)


def tiny_codes(num_items: int) -> np.ndarray:
    """Unique random 3-level SIDs (4 x 8 x 8) for ``num_items`` items: (N, 3)."""
    flat = np.random.default_rng(0).choice(4 * 8 * 8, size=num_items, replace=False)
    return np.stack([flat // 64, flat // 8 % 8, flat % 8], axis=1)


def shared_data_or_skip(sub: str = "") -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set GENREC_SHARED_DATA to the shared/data directory)")
    return path


def make_dataset_frames(num_users: int = 40, num_items: int = 30, min_len: int = 5, max_len: int = 12, seed: int = 0):
    """Random items/sequences frames in the prepared format (leave-one-out split)."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": np.arange(num_items),
            "raw_id": [f"i{i}" for i in range(num_items)],
            "title": [f"item {i} title" for i in range(num_items)],
            "brand": [f"brand{i % 4}" for i in range(num_items)],
            "categories": [f"Cat, Sub{i % 3}" for i in range(num_items)],
            "description": ["" for _ in range(num_items)],
        }
    )
    seqs = []
    for _ in range(num_users):
        n = int(rng.integers(min_len, max_len + 1))
        seqs.append(rng.choice(num_items, size=n, replace=False).astype(np.int64))
    sequences = pd.DataFrame(
        {
            "user_id": np.arange(num_users),
            "raw_user": [f"u{u}" for u in range(num_users)],
            "item_ids": seqs,
            "timestamps": [np.arange(len(s), dtype=np.float64) for s in seqs],
            "valid_pos": [len(s) - 2 for s in seqs],
            "test_pos": [len(s) - 1 for s in seqs],
        }
    )
    return items, sequences


@pytest.fixture
def tiny_dataset():
    from genrec.data.dataset import Dataset

    items, sequences = make_dataset_frames()
    return Dataset(items, sequences, max_history=5)


def load_bench(name: str):
    """The module of ``bench/<name>.py`` (bench scripts are not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
