import numpy as np
import pytest
import torch

from genrec.baselines.popularity import popularity_ranker
from genrec.baselines.sasrec import SASRec, train_sasrec, training_windows
from genrec.config import SASRecConfig


def test_training_windows_cover_every_target_once():
    inputs, targets = training_windows([np.arange(7), np.arange(2)], max_len=3)
    # shifted ids: sequence 1..7 -> targets 2..7 once each; sequence 1..2 -> target 2
    got = sorted(t for row in targets for t in row if t > 0)
    assert got == sorted([2, 3, 4, 5, 6, 7, 2])
    assert (inputs[targets > 0] > 0).all()


def test_popularity_counts_only_training_items(tiny_dataset):
    scores = popularity_ranker(tiny_dataset)([np.array([0])])[0]
    counts = np.zeros(tiny_dataset.num_items)
    for seq in tiny_dataset.train_sequences():
        counts[seq] += 1
    assert np.array_equal(scores, counts)


def test_sasrec_padding_does_not_change_the_representation():
    torch.manual_seed(0)
    model = SASRec(num_items=20, max_len=6, hidden_size=16, num_layers=1, num_heads=2, dropout=0.0).eval()
    a = model.score([np.array([3, 4, 5])])
    full = model(torch.tensor([[0, 0, 0, 4, 5, 6]]))[:, -1]
    assert torch.allclose(a, model.item_logits(full), atol=1e-5)
    assert torch.isfinite(model(torch.tensor([[0, 0, 0, 0, 0, 1]]))).all()


def test_sasrec_learns_a_deterministic_pattern_and_resumes(tiny_dataset, tmp_path):
    cfg = SASRecConfig(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        dropout=0.0,
        max_epochs=4,
        eval_every=1,
        patience=100,
        batch_size=16,
        lr=5e-3,
    )
    m1, curves1 = train_sasrec(tiny_dataset, cfg, 5, seed=1, work_dir=tmp_path / "a")
    assert curves1[-1]["loss"] < curves1[0]["loss"]
    # Stop after 2 epochs, then resume to 4: same weights as the uninterrupted run.
    (tmp_path / "b").mkdir()
    half = SASRecConfig(**{**cfg.__dict__, "max_epochs": 2})
    train_sasrec(tiny_dataset, half, 5, seed=1, work_dir=tmp_path / "b")
    m2, curves2 = train_sasrec(tiny_dataset, cfg, 5, seed=1, work_dir=tmp_path / "b")
    assert [r["loss"] for r in curves1] == [r["loss"] for r in curves2]
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_train_sasrec_trains_the_model_that_build_model_gives(tiny_dataset, tmp_path):
    cfg = SASRecConfig(hidden_size=16, num_heads=2, dropout=0.0, max_epochs=3, eval_every=1, batch_size=16, lr=5e-3)
    built = []

    def build():
        built.append(SASRec(tiny_dataset.num_items, max_len=4, hidden_size=8, num_layers=1, num_heads=1, dropout=0.0))
        return built[-1]

    torch.manual_seed(1)  # train_sasrec seeds before it builds, so this is its starting point
    before = {k: v.clone() for k, v in build().state_dict().items()}
    model, curves = train_sasrec(tiny_dataset, cfg, 5, seed=1, work_dir=tmp_path, build_model=build)
    assert model is built[-1] and model.max_len == 4 and model.item_emb.embedding_dim == 8
    assert curves[-1]["loss"] < curves[0]["loss"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bench_qwen2_items_ignores_padding_and_trains_in_sasrecs_loop(tiny_dataset, tmp_path):
    from conftest import load_bench

    Qwen2Items = load_bench("bench_backbone_ids").Qwen2Items
    torch.manual_seed(0)
    model = Qwen2Items(num_items=20, max_len=6, hidden=16, layers=1, heads=2, ffn=32, dropout=0.0).eval()
    a = model.score([np.array([3, 4, 5])])  # left-padded to 6 inside
    alone = model.item_logits(model(torch.tensor([[4, 5, 6]]))[:, -1])
    assert torch.allclose(a, alone, atol=1e-5)
    assert torch.isfinite(model(torch.tensor([[0, 0, 0, 0, 0, 1]]))).all()

    cfg = SASRecConfig(hidden_size=16, num_heads=2, dropout=0.0, max_epochs=3, eval_every=1, batch_size=16, lr=5e-3)
    n = tiny_dataset.num_items
    trained, curves = train_sasrec(
        tiny_dataset, cfg, 5, seed=1, work_dir=tmp_path, build_model=lambda: Qwen2Items(n, 5, 16, 1, 2, 32, 0.1)
    )
    assert isinstance(trained, Qwen2Items) and curves[-1]["loss"] < curves[0]["loss"]


def test_bench_two_token_layout_windows_and_exact_scores():
    from conftest import load_bench

    TwoTokenItems = load_bench("bench_backbone_ids").TwoTokenItems
    groups = np.array([0, 0, 1, 2, 1, 2, 0])  # 7 items in 3 groups: token 1 + g, item token 1 + 3 + j
    torch.manual_seed(0)
    model = TwoTokenItems(groups, max_len=4, hidden=16, layers=1, heads=2, ffn=32, dropout=0.0).eval()
    # SASRec's windows of shifted ids: items 0..3 (inputs 1..3, targets 2..4) and items 2, 4.
    x, y = model.window_tokens(torch.tensor([[0, 1, 2, 3], [0, 0, 0, 3]]), torch.tensor([[0, 2, 3, 4], [0, 0, 0, 5]]))
    assert x.tolist() == [[0, 0, 1, 4, 1, 5, 2, 6, 3], [0, 0, 0, 0, 0, 0, 2, 6, 2]]
    # The next tokens, + 1 as train_sasrec shifts its targets (0 = none).
    assert y.tolist() == [[0, 0, 5, 2, 6, 3, 7, 4, 8], [0, 0, 0, 0, 0, 0, 7, 3, 9]]
    # Constrained: after an item the 3 group codes, after group g its items; every target among them.
    model.constrained = True
    logits = model.item_logits(model(x)[y > 0])
    inputs = x[x > 0]
    allowed = torch.isfinite(logits)
    assert allowed.gather(1, (y[y > 0] - 1)[:, None]).all()
    for row, tok in zip(allowed, inputs.tolist()):
        expect = np.zeros(1 + 3 + 7, dtype=bool)
        if tok > 3:
            expect[1:4] = True
        else:
            expect[4:] = groups == tok - 1
        assert np.array_equal(row.numpy(), expect), tok
    model.constrained = False

    for carry in (False, True):
        model.carry, model.top_groups = carry, 3
        history = np.array([0, 3])
        scores = model.score([history])[0]
        seq = model.tokens(model._batch([history]))
        log_group = torch.log_softmax(model.token_logits(model(seq)[:, -1])[0, 1:4], dim=-1)
        for j, g in enumerate(groups):  # teacher-force each item's two tokens, renormalised inside the trie
            logits = model.token_logits(model(torch.cat([seq, torch.tensor([[1 + g]])], 1))[:, -1])[0, 4:]
            expected = torch.log_softmax(logits.masked_fill(torch.as_tensor(groups != g), float("-inf")), -1)[j]
            assert torch.allclose(scores[j], expected + log_group[g], atol=1e-5), (carry, j)
    model.top_groups = 1  # only the best group's items are scored
    kept = (model.score([history])[0] > -1e8).numpy()
    assert np.array_equal(kept, groups == int(log_group.argmax()))


def test_bench_two_token_layout_trains_in_sasrecs_loop(tiny_dataset, tmp_path):
    from conftest import load_bench

    TwoTokenItems = load_bench("bench_backbone_ids").TwoTokenItems
    groups = np.arange(tiny_dataset.num_items) % 3
    cfg = SASRecConfig(hidden_size=16, num_heads=2, dropout=0.0, max_epochs=3, eval_every=1, batch_size=16, lr=5e-3)
    valid = tiny_dataset.examples("valid")
    model, curves = train_sasrec(
        tiny_dataset,
        cfg,
        5,
        seed=1,
        work_dir=tmp_path,
        build_model=lambda: TwoTokenItems(groups, 5, 16, 1, 2, 32, 0.0),
        valid_examples=valid,
    )
    assert isinstance(model, TwoTokenItems) and curves[-1]["loss"] < curves[0]["loss"]
    assert all(0.0 <= r["valid_ndcg@10"] <= 1.0 for r in curves)


def test_fit_epochs_cuts_the_learning_rate_at_a_plateau_from_the_best_weights(tmp_path):
    from types import SimpleNamespace

    from genrec.train.epochs import fit_epochs

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scores = iter([0.1, 0.3, 0.2, 0.2, 0.4, 0.35, 0.35, 0.9])  # best at epochs 2 and 5; two plateaus of 2

    def train_epoch(epoch: int) -> dict:
        with torch.no_grad():
            model.weight.add_(1.0)  # the weight counts the epochs that trained it
        return {"loss": 0.0}

    def valid() -> float:
        return next(scores)

    cfg = SimpleNamespace(max_epochs=50, eval_every=1, patience=2, max_minutes=0, lr_drops=1, lr_drop_factor=0.1)
    curves = fit_epochs("t", model, opt, train_epoch, valid, cfg, tmp_path)
    # Epoch 4 is the first plateau: back to epoch 2's weights, lr x0.1; epoch 7 the second: a stop.
    assert [row.get("lr_cut_to") for row in curves] == [None, None, None, pytest.approx(0.1), None, None, None]
    assert len(curves) == 7 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    # The best evaluated weights, epoch 5's: epochs 1, 2, then 5 after the return to epoch 2.
    assert model.weight.item() == 3.0
