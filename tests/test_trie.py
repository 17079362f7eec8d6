"""SIDTrie against a brute-force reference on random codes."""

import numpy as np
import pytest
import torch

from genrec.sid.trie import SIDTrie


def random_unique_codes(n: int, sizes: list[int], seed: int = 0) -> np.ndarray:
    """n distinct SIDs drawn uniformly from the product of the codebooks, in random item order."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(int(np.prod(sizes)), size=n, replace=False)
    return np.stack(np.unravel_index(flat, sizes), axis=1).astype(np.int64)


def brute_allowed(codes: np.ndarray, prefix: np.ndarray, size: int) -> np.ndarray:
    t = len(prefix)
    match = (codes[:, :t] == prefix).all(axis=1)
    mask = np.zeros(size, dtype=bool)
    mask[codes[match, t]] = True
    return mask


@pytest.mark.parametrize("sizes", [[4, 3, 5], [8, 8, 8, 2], [6]])
def test_allowed_and_lookup_match_brute_force(sizes):
    codes = random_unique_codes(min(60, int(np.prod(sizes))), sizes, seed=len(sizes))
    trie = SIDTrie(codes, sizes)
    assert trie.num_levels == len(sizes) and trie.num_items == len(codes) and trie.codebook_sizes == sizes
    assert trie.transitions[0].shape == (1, sizes[0])
    rng = np.random.default_rng(1)
    for t in range(len(sizes)):
        # Half the prefixes are real item prefixes, half are random (often no item's).
        real = codes[rng.integers(0, len(codes), 40), :t]
        rand = np.stack([rng.integers(0, s, 40) for s in sizes[:t]], axis=1) if t else np.zeros((40, 0), np.int64)
        prefixes = np.concatenate([real, rand]).astype(np.int64)
        got = trie.allowed(torch.from_numpy(prefixes)).numpy()
        assert got.shape == (80, sizes[t])
        want = np.stack([brute_allowed(codes, p, sizes[t]) for p in prefixes])
        np.testing.assert_array_equal(got, want)

    perm = rng.permutation(len(codes))
    assert trie.lookup(torch.from_numpy(codes[perm])).tolist() == perm.tolist()
    random_sids = np.stack([rng.integers(0, s, 50) for s in sizes], axis=1)
    index = {tuple(c): i for i, c in enumerate(codes.tolist())}
    want = [index.get(tuple(c), -1) for c in random_sids.tolist()]
    assert trie.lookup(torch.from_numpy(random_sids)).tolist() == want


def test_step_by_step_walk_equals_allowed():
    sizes = [5, 5, 5]
    codes = random_unique_codes(80, sizes, seed=3)
    trie = SIDTrie(torch.from_numpy(codes))  # sizes inferred from the codes; tensors accepted
    nodes = torch.zeros(len(codes), dtype=torch.long)
    for t in range(3):
        mask = trie.allowed_mask(t, nodes)
        assert mask[torch.arange(len(codes)), torch.from_numpy(codes[:, t])].all()
        torch.testing.assert_close(mask, trie.allowed(torch.from_numpy(codes[:, :t])))
        nodes = trie.advance(t, nodes, torch.from_numpy(codes[:, t]))
    assert nodes.tolist() == list(range(len(codes)))


def test_invalid_nodes_and_codes_allow_nothing():
    trie = SIDTrie(np.array([[0, 1], [1, 0]]), [2, 2])
    nodes = torch.tensor([0, -1])
    assert trie.allowed_mask(0, nodes).tolist() == [[True, True], [False, False]]
    # Unknown prefix (0, 0) -> -1; out-of-range code -> -1; -1 stays -1.
    n1 = trie.advance(0, torch.tensor([0, 0, -1]), torch.tensor([0, 7, 0]))
    assert n1.tolist()[1:] == [-1, -1]
    assert trie.advance(1, n1[:1], torch.tensor([0])).tolist() == [-1]
    assert trie.allowed(torch.tensor([[0], [1]])).tolist() == [[False, True], [True, False]]
    assert trie.lookup(torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1]])).tolist() == [0, 1, -1, -1]


def test_save_load_and_device_roundtrip(tmp_path):
    codes = random_unique_codes(50, [4, 4, 4], seed=5)
    trie = SIDTrie(codes, [4, 4, 4])
    trie.save(tmp_path / "trie.pt")
    loaded = SIDTrie.load(tmp_path / "trie.pt").to("cpu")
    assert loaded.codebook_sizes == [4, 4, 4] and loaded.num_items == 50 and loaded.num_levels == 3
    for a, b in zip(trie.transitions, loaded.transitions):
        assert torch.equal(a, b)
    assert loaded.lookup(torch.from_numpy(codes)).tolist() == list(range(50))


def test_bad_codes_are_errors_that_name_the_items():
    with pytest.raises(ValueError, match=r"items \[0, 2\] all have SID \[1, 2\]"):
        SIDTrie(np.array([[1, 2], [0, 0], [1, 2]]))
    with pytest.raises(ValueError, match="outside codebook_sizes"):
        SIDTrie(np.array([[0, 3]]), [2, 2])
    with pytest.raises(ValueError, match=">= 0"):
        SIDTrie(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="shape"):
        SIDTrie(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="2 entries"):
        SIDTrie(np.array([[0, 1, 1]]), [2, 2])
