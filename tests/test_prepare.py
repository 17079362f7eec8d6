import numpy as np
import pytest

from genrec.config import DataConfig
from genrec.data.dataset import Dataset
from genrec.data.prepare import build_sequences, deduplicate, kcore, prepare, split_positions
from genrec.data.raw import BadLineReport, Interaction, RawSource


def source_of(rows, items=None, has_timestamps=True):
    items = items if items is not None else [{"item": i, "title": f"T{i}"} for i in {r[1] for r in rows}]
    return RawSource(
        lambda: (Interaction(*r) for r in rows), lambda: iter(items), has_timestamps, BadLineReport(), "test rows"
    )


def test_deduplicate_keeps_earliest():
    users = np.array([0, 0, 0, 1])
    items = np.array([5, 5, 6, 5])
    times = np.array([3.0, 1.0, 2.0, 1.0])
    assert deduplicate(users, items, times).tolist() == [1, 2, 3]


def test_kcore_is_iterative():
    # user 2 has 1 interaction; removing it leaves item 9 with 1 -> removed -> user 1 drops to 1 ...
    users = np.array([0, 0, 1, 1, 2])
    items = np.array([7, 8, 7, 9, 9])
    keep = kcore(users, items, 2)
    # item 9 (2 interactions) survives round 1 but user 2 (1) does not; then item 9 has 1 -> out;
    # then user 1 has 1 -> out; then item 7 has 1 -> out; user 0 has 1 -> out: empty core.
    assert keep.tolist() == [False] * 5
    assert kcore(np.array([0, 0, 1, 1]), np.array([1, 2, 1, 2]), 2).all()


def test_stable_time_order_with_ties():
    users = np.array([0, 0, 0])
    items = np.array([3, 1, 2])
    times = np.array([5.0, 5.0, 1.0])
    _, seqs, _ = build_sequences(users, items, times)
    assert seqs[0].tolist() == [2, 3, 1]  # 1.0 first, then the tie in file order


def test_loo_and_chrono_split_positions():
    v, t, _ = split_positions([np.arange(5.0), np.arange(2.0)], "loo")
    assert v.tolist() == [3, -1] and t.tolist() == [4, -1]
    times = [np.array([1.0, 2, 3, 8, 9, 10]), np.array([1.0, 2])]
    v, t, info = split_positions(times, "chrono", 0.25, 0.25)
    assert info["t_valid"] < info["t_test"]
    assert t[0] > v[0] >= 1 and v[1] == -1 and t[1] == -1


def test_prepare_end_to_end_reindexes_and_reports_missing_titles():
    rows = []
    for u in range(6):
        for j, i in enumerate([1, 2, 3, 4, 5][u % 2 :] + [10]):
            rows.append((f"u{u}", str(i), float(j)))
    rows.append(("u0", "1", 99.0))  # duplicate, later: dropped
    items = [{"item": str(i), "title": "" if i == 3 else f"T{i}", "brand": "B"} for i in [1, 2, 3, 4, 5, 10]]
    items_df, seqs, stats = prepare(source_of(rows, items), DataConfig(kcore=2))
    assert stats["duplicates_dropped"] == 1
    assert items_df.raw_id.tolist() == ["1", "2", "3", "4", "5", "10"]  # natural order of integer ids
    assert stats["items_without_title"] == 1
    ds = Dataset(items_df, seqs)
    assert ds.num_users == 6
    for u in range(ds.num_users):
        train = ds.train_sequences()[u]
        assert len(train) == len(ds.sequences[u]) - 2
    ex = ds.examples("test")
    assert (ex.targets == items_df.index[items_df.raw_id == "10"][0]).all()


def test_prepare_chrono_needs_timestamps():
    with pytest.raises(ValueError, match="needs timestamps"):
        prepare(source_of([("u", "1", 0.0)], has_timestamps=False), DataConfig(protocol="chrono"))


def test_prepare_empty_core_is_an_error():
    with pytest.raises(ValueError, match="lower data.kcore"):
        prepare(source_of([("u", "1", 0.0), ("v", "2", 0.0)]), DataConfig(kcore=5))
