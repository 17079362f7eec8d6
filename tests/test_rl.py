"""RL post-training: losses (literal values), log-probs against beam scores, prompts, and the loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genrec.train.losses import k3_kl, listwise_loss, policy_loss  # noqa: E402
from genrec.train.rl import completion_log_probs, history_prompts, rl_prompts, training_prompts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- losses


def loss_of(logp, old, adv, mask, **kw):
    logp = torch.tensor(logp, requires_grad=True)
    loss, stats = policy_loss(logp, torch.tensor(old), torch.tensor(adv), torch.tensor(mask), **kw)
    loss.backward()
    return loss.item(), stats, logp.grad


def test_grpo_and_dapo_aggregation():
    logp = [[-1.0, -2.0], [-0.5, -0.7]]
    mask = [[1.0, 1.0], [1.0, 0.0]]
    # Ratio 1 everywhere: token loss = -A. grpo: sequence means (-1, 2) -> 0.5; dapo: (-1 - 1 + 2) / 3 = 0.
    grpo, stats, grad = loss_of(logp, logp, [1.0, -2.0], mask, kind="grpo")
    assert grpo == pytest.approx(0.5)
    assert stats == {"kl": 0.0, "clip_frac": 0.0, "ratio": 1.0}
    # d loss / d logp_t = -A / len / num_sequences on real tokens, 0 on padding.
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [1.0, 0.0]]))
    dapo, _, grad = loss_of(logp, logp, [1.0, -2.0], mask, kind="dapo")
    assert dapo == pytest.approx(0.0)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))


def test_token_clipping_and_dual_clip():
    old = [[0.0, 0.0]]
    logp = [[math.log(1.5), 0.0]]  # ratios 1.5 and 1
    # A > 0: the 1.5 token is clipped to 1.2 (no gradient), the other is not.
    loss, stats, grad = loss_of(logp, old, [1.0], [[1.0, 1.0]], kind="dapo", clip_eps=0.2)
    assert loss == pytest.approx((-1.2 - 1.0) / 2)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert grad[0, 0].item() == 0.0 and grad[0, 1].item() == pytest.approx(-0.5)
    # A < 0: the pessimistic (unclipped) 1.5 is kept...
    loss, stats, _ = loss_of(logp, old, [-1.0], [[1.0, 1.0]], kind="dapo", clip_eps=0.2)
    assert loss == pytest.approx((1.5 + 1.0) / 2) and stats["clip_frac"] == 0.0
    # ... unless dual clip bounds it at c |A| = 1.3.
    loss, _, _ = loss_of(logp, old, [-1.0], [[1.0, 1.0]], kind="dapo", clip_eps=0.2, dual_clip=1.3)
    assert loss == pytest.approx((1.3 + 1.0) / 2)
    # Clip-higher: eps_high = 0.6 lets the 1.5 ratio through.
    loss, _, _ = loss_of(logp, old, [1.0], [[1.0, 1.0]], kind="dapo", clip_eps=0.2, clip_eps_high=0.6)
    assert loss == pytest.approx((-1.5 - 1.0) / 2)


def test_gspo_sequence_ratio():
    old = [[0.0, 0.0]]
    logp = [[math.log(1.1), math.log(1.3)]]
    s = math.sqrt(1.1 * 1.3)  # exp(mean log-ratio) = 1.1958
    loss, stats, _ = loss_of(logp, old, [1.0], [[1.0, 1.0]], kind="gspo", clip_eps=0.2)
    assert loss == pytest.approx(-s) and stats["ratio"] == pytest.approx(s) and stats["clip_frac"] == 0.0
    loss, stats, grad = loss_of(logp, old, [1.0], [[1.0, 1.0]], kind="gspo", clip_eps=0.1)
    assert loss == pytest.approx(-1.1) and stats["clip_frac"] == 1.0
    assert (grad == 0).all()


def test_k3_kl_penalty():
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(math.exp(-1))
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
    logp, ref = [[-1.0, -1.0]], torch.tensor([[-2.0, -1.0]])
    # Loss = -A + kl_coef * mean k3 = 0 + 0.5 * (e^-1 + 0) / 2 with A = 0.
    loss, stats, _ = loss_of(logp, logp, [0.0], [[1.0, 1.0]], kind="dapo", ref_logp=ref, kl_coef=0.5)
    assert loss == pytest.approx(0.5 * math.exp(-1) / 2)
    assert stats["kl"] == pytest.approx(math.exp(-1) / 2)
    with pytest.raises(ValueError, match="ref_logp"):
        loss_of(logp, logp, [0.0], [[1.0, 1.0]], kl_coef=0.5)
    with pytest.raises(ValueError, match="rl.loss"):
        loss_of(logp, logp, [0.0], [[1.0, 1.0]], kind="ppo")


def test_chunked_losses_sum_to_the_batch_loss():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 3, generator=g)
    old = logp + 0.1 * torch.randn(6, 3, generator=g)
    adv = torch.randn(6, generator=g)
    mask = torch.ones(6, 3)
    mask[4, 1:] = 0
    for kind in ("grpo", "dapo", "gspo"):
        whole, _ = policy_loss(logp, old, adv, mask, kind=kind)
        parts = sum(
            policy_loss(logp[c], old[c], adv[c], mask[c], kind=kind, num_sequences=6, num_tokens=16)[0]
            for c in (slice(0, 4), slice(4, 6))
        )
        torch.testing.assert_close(parts, whole)


def test_listwise_loss_literal_and_masking():
    # One group of two live completions and one padding: target q = softmax(ref + r) over the live two.
    ref = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]])
    r = torch.tensor([[math.log(3.0), 0.0, 5.0]])  # q = (0.75, 0.25); the padding's reward must not count
    live = torch.tensor([[True, True, False]])
    s = torch.tensor([[0.0, 0.0, 9.0]], requires_grad=True)  # the policy: (0.5, 0.5) over the live two
    loss, stats = listwise_loss(s, ref, r, live)
    assert loss.item() == pytest.approx(math.log(2.0))  # -(0.75 + 0.25) log 0.5
    loss.backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.5 - 0.75, 0.5 - 0.25, 0.0]]))
    assert stats["agreement"] == 1.0  # both top-1s are completion 0 (the policy's by the tie rule)
    # Two chunks of one group each, weighed by the batch's group count, sum to the whole.
    s2, ref2, r2 = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    live2 = torch.ones(2, 4, dtype=torch.bool)
    whole = listwise_loss(s2, ref2, r2, live2)[0]
    parts = sum(listwise_loss(s2[c], ref2[c], r2[c], live2[c], num_groups=2)[0] for c in (slice(0, 1), slice(1, 2)))
    torch.testing.assert_close(parts, whole)
    with pytest.raises(ValueError, match="listwise"):
        policy_loss(s2, s2, torch.zeros(2), torch.ones(2, 4), kind="listwise")


# --------------------------------------------------------------------------- log-probs and prompts

NUM_TEXT, CODEBOOK, LEVELS = 8, 6, 3
OFFSETS = [NUM_TEXT + t * CODEBOOK for t in range(LEVELS)]


def tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=NUM_TEXT + LEVELS * CODEBOOK,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


def test_completion_log_probs_sum_to_the_beam_scores_and_match_full_forwards():
    from genrec.decode.beam import constrained_beam_search
    from genrec.sid.trie import SIDTrie

    model = tiny_lm()
    rng = np.random.default_rng(0)
    flat = rng.choice(CODEBOOK**LEVELS, size=40, replace=False)
    codes = np.stack([flat // CODEBOOK**2, flat // CODEBOOK % CODEBOOK, flat % CODEBOOK], axis=1)
    trie = SIDTrie(codes, [CODEBOOK] * LEVELS)
    # Left-padded prompts of different lengths.
    input_ids = torch.tensor([[0, 0, 0, 3, 4, 5], [2, 3, 4, 5, 6, 7], [0, 0, 7, 7, 2, 3]])
    attention_mask = (torch.arange(6) >= torch.tensor([[3], [0], [2]])).long()
    out = constrained_beam_search(model, input_ids, attention_mask, trie, OFFSETS, num_beams=5)
    logp = completion_log_probs(model, input_ids, attention_mask, out.token_ids)  # (B, G, L)
    torch.testing.assert_close(logp.sum(-1), out.scores, atol=1e-4, rtol=0)

    # The shared-prompt forward gives the values and gradients of one plain forward per unpadded
    # prompt + completion.
    logp.sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0.0
    for b in range(3):
        prompt = input_ids[b][attention_mask[b].bool()]
        for j in range(5):
            seq = torch.cat([prompt, out.token_ids[b, j]]).unsqueeze(0)  # (1, T_b + L)
            lp = torch.log_softmax(model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float(), dim=-1)  # (L, V)
            row = lp.gather(1, out.token_ids[b, j].unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(row, logp[b, j].detach(), atol=1e-4, rtol=0)
            total = total + row.sum()
    total.backward()
    for shared, plain in zip(shared_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-3)


def test_training_prompts_use_only_training_positions(tiny_dataset):
    prompts = training_prompts(tiny_dataset, targets_per_user=2, max_history=3)
    train = tiny_dataset.train_sequences()
    assert len(prompts) == sum(min(2, len(s) - 1) for s in train)
    for u, hist, target in zip(prompts.user_ids, prompts.histories, prompts.targets):
        seq = train[u]
        pos = int(np.flatnonzero(seq == target)[0])
        assert pos >= len(seq) - 2, "a target must be one of the last training positions"
        assert hist.tolist() == seq[max(0, pos - 3) : pos].tolist()
        held = tiny_dataset.sequences[u][len(seq) :]  # valid and test items
        assert target not in held and not np.isin(hist, held).any()


def test_history_prompts_are_each_users_training_part_without_a_target(tiny_dataset):
    prompts = history_prompts(tiny_dataset, max_history=3)
    train = tiny_dataset.train_sequences()
    assert prompts.user_ids.tolist() == [u for u, s in enumerate(train) if len(s)]
    assert (prompts.targets == -1).all()
    for u, hist in zip(prompts.user_ids, prompts.histories):
        assert hist.tolist() == train[u][-3:].tolist()
        assert not np.isin(hist, tiny_dataset.sequences[u][len(train[u]) :]).any()  # no valid or test item


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rl.rewards={trm_logp: 1.0, rank: 1.0}"], "rl.rewards.rank needs each prompt's target"),
        (["rl.rewards={trm_logp: 1.0}", "rl.advantage=bgae"], "rl.advantage=bgae"),
    ],
)
def test_unlabelled_prompts_refuse_what_needs_a_target(tiny_dataset, overrides, message):
    cfg = rl_config("rl.prompts=histories", *overrides)
    with pytest.raises(ValueError, match=message):
        rl_prompts(tiny_dataset, cfg.rl, 5)


# --------------------------------------------------------------------------- the loop and the stage

SIZES = [4, 4, 3]  # 48 SIDs for the 30 items of the tiny dataset


def tiny_recommender(tiny_dataset):
    from genrec.config import load_config
    from genrec.model.backbone import scratch_backbone
    from genrec.model.recommender import GenerativeRecommender
    from genrec.model.tokenizer import build_scratch_tokenizer
    from genrec.sid.trie import SIDTrie

    model_cfg = load_config(
        None,
        [
            "run_dir=x",
            "model.hidden_size=32",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.num_kv_heads=1",
            "model.intermediate_size=64",
            "model.dropout=0.1",
        ],
    ).model
    tokenizer = build_scratch_tokenizer(tiny_dataset.titles, 300, SIZES, ["seqrec"])
    bb = scratch_backbone(model_cfg, tokenizer, SIZES, ["seqrec"], seed=0)
    flat = np.random.default_rng(0).choice(int(np.prod(SIZES)), size=tiny_dataset.num_items, replace=False)
    codes = np.stack(np.unravel_index(flat, SIZES), axis=1).astype(np.int64)  # (N, 3)
    return GenerativeRecommender(bb.model, bb.tokenizer, bb.vocab, SIDTrie(codes, SIZES), codes, bb.fmt, 5)


def rl_config(*overrides: str):
    from genrec.config import load_config

    base = [
        "run_dir=x",
        "data.max_history=5",
        "rl.group_size=6",
        "rl.batch_size=8",
        "rl.micro_batch_size=3",
        "rl.steps=6",
        "rl.eval_every=3",
        "rl.save_every=2",
        "rl.lr=0.003",
        "decode.num_beams=6",
        "eval.ks=[10]",
    ]
    return load_config(None, base + list(overrides))


def mean_target_log_prob(recommender, prompts) -> float:
    input_ids, attention_mask = recommender.prompt_batch(prompts.histories)
    tokens = torch.as_tensor(recommender.sid_ids[prompts.targets]).unsqueeze(1)  # (P, 1, L)
    with torch.no_grad():
        return completion_log_probs(recommender.model.eval(), input_ids, attention_mask, tokens).sum(-1).mean().item()


@pytest.mark.parametrize(
    "overrides",
    [
        ["rl.rewards={exact: 1.0}"],
        ["rl.rewards={rank: 1.0}", "rl.loss=grpo", "rl.advantage=bgae"],
        ["rl.rewards={rsvr: 1.0}", "rl.rollout=sample", "rl.loss=gspo", "rl.updates_per_rollout=2"],
        ["rl.rewards={exact: 3.0}", "rl.loss=listwise"],
    ],
)
def test_rl_raises_the_likelihood_of_rewarded_targets(tiny_dataset, tmp_path, overrides):
    from genrec.train.rl import train_rl

    # Every step sees all 8 prompts (one per user of 8), so the gradient concentrates on them.
    cfg = rl_config("rl.targets_per_user=1", "rl.steps=12", "rl.eval_every=100", "rl.kl_coef=0.01", *overrides)
    sub = type(tiny_dataset)(tiny_dataset.items, _first_users(tiny_dataset, 8), max_history=5)
    rec = tiny_recommender(sub)
    prompts = training_prompts(sub, 1, 5)
    before = mean_target_log_prob(rec, prompts)
    summary = train_rl(cfg, sub, rec, tmp_path / "out", tmp_path / "work")
    rec.model.load_state_dict(torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)["model"])
    after = mean_target_log_prob(rec, prompts)
    assert after > before + 0.3, f"{overrides}: target log-prob {before:.3f} -> {after:.3f}"
    assert summary["steps"] == 12


@pytest.mark.parametrize("loss", ["dapo", "listwise"])
def test_rl_on_unlabelled_histories_follows_a_target_free_reward(tiny_dataset, tmp_path, loss):
    import json

    from genrec.train.rl import train_rl

    # A stand-in for SASRec that puts most of its mass on item 7 whatever the history.
    table = np.full(tiny_dataset.num_items, 0.1 / (tiny_dataset.num_items - 1))
    table[7] = 0.9
    cfg = rl_config(
        "rl.prompts=histories", "rl.rewards={trm_logp: 1.0}", "rl.steps=12", "rl.eval_every=100", f"rl.loss={loss}"
    )
    sub = type(tiny_dataset)(tiny_dataset.items, _first_users(tiny_dataset, 8), max_history=5)
    rec = tiny_recommender(sub)
    prompts = history_prompts(sub, 5)
    prompts.targets = np.full(len(prompts), 7)  # to measure item 7's log-prob; the trainer never saw a target
    before = mean_target_log_prob(rec, prompts)
    columns = {"trm_log_probs": lambda histories, **_: np.log(np.tile(table, (len(histories), 1)))}
    train_rl(cfg, sub, rec, tmp_path / "out", tmp_path / "work", extra_columns=columns)
    rec.model.load_state_dict(torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)["model"])
    after = mean_target_log_prob(rec, prompts)
    assert after > before + 0.3, f"item 7's log-prob {before:.3f} -> {after:.3f}"
    rows = [json.loads(line) for line in (tmp_path / "out" / "rl_curves.jsonl").read_text().splitlines()]
    assert all("hit_rate" not in r for r in rows), "no target, so no hit rate to log"
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def _first_users(dataset, n: int):
    import pandas as pd

    return pd.DataFrame(
        {
            "user_id": np.arange(n),
            "raw_user": dataset.raw_users[:n],
            "item_ids": dataset.sequences[:n],
            "timestamps": [np.arange(len(s), dtype=np.float64) for s in dataset.sequences[:n]],
            "valid_pos": dataset.valid_pos[:n],
            "test_pos": dataset.test_pos[:n],
        }
    )


def test_killed_run_resumes_to_the_same_weights_and_curves(tiny_dataset, tmp_path):
    import json

    from genrec.train.rl import train_rl

    cfg = rl_config("rl.rewards={rsvr: 1.0}", "rl.rollout=sample", "rl.updates_per_rollout=2")
    straight = tiny_recommender(tiny_dataset)
    train_rl(cfg, tiny_dataset, straight, tmp_path / "a" / "out", tmp_path / "a" / "work")

    calls = {"n": 0}

    def dies_in_step_4(**_):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # after step 3 was logged, with the last checkpoint at step 2
        return 0

    with pytest.raises(KeyboardInterrupt):
        train_rl(
            cfg,
            tiny_dataset,
            tiny_recommender(tiny_dataset),
            tmp_path / "b" / "out",
            tmp_path / "b" / "work",
            extra_columns={"probe": dies_in_step_4},
        )
    resumed = tiny_recommender(tiny_dataset)
    train_rl(cfg, tiny_dataset, resumed, tmp_path / "b" / "out", tmp_path / "b" / "work")

    def curves(run):
        rows = [json.loads(line) for line in (tmp_path / run / "out" / "rl_curves.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert [r["step"] for r in curves("b")] == list(range(7))
    assert curves("a") == curves("b")
    final = {run: torch.load(tmp_path / run / "work" / "checkpoint.pt", weights_only=False)["model"] for run in "ab"}
    for name, weight in final["a"].items():
        assert torch.equal(weight, final["b"][name]), name
    assert any(not torch.equal(w, tiny_recommender(tiny_dataset).model.state_dict()[n]) for n, w in final["a"].items())


def test_stage_writes_model_curves_and_eval(tiny_dataset, tmp_path):
    import json

    from conftest import make_dataset_frames
    from genrec.io import write_json
    from genrec.model.recommender import GenerativeRecommender
    from genrec.pipeline import STAGES, StageContext
    from genrec.train.rl import run

    run_dir = tmp_path / "run"
    items, sequences = make_dataset_frames()
    (run_dir / "prepare").mkdir(parents=True)
    items.to_parquet(run_dir / "prepare" / "items.parquet")
    sequences.to_parquet(run_dir / "prepare" / "sequences.parquet")
    sft = tiny_recommender(tiny_dataset)
    sft.save(run_dir / "sft" / "model")
    (run_dir / "embed").mkdir()
    np.save(run_dir / "embed" / "item_emb.npy", np.random.default_rng(0).normal(size=(tiny_dataset.num_items, 8)))
    for stage in ("prepare", "sft", "embed"):
        write_json(run_dir / stage / "done.json", {})

    cfg = rl_config(f"run_dir={run_dir}", "rl.rewards={rank: 1.0, semantic: 0.5}", "rl.steps=3", "eval.bootstrap=0")
    ctx = StageContext(cfg=cfg, run_dir=run_dir, stage=STAGES["rl"], out=tmp_path / "out", work=tmp_path / "work")
    summary = run(ctx)

    rows = [json.loads(line) for line in (ctx.out / "rl_curves.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("reward", "reward/rank", "reward/semantic", "hit_rate", "kl", "clip_frac", "loss", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in rows[1:]), key
    assert "valid_ndcg@10" in rows[0] and "valid_ndcg@10" in rows[3]
    assert (ctx.out / "rl_curves.png").stat().st_size > 1000
    metrics = json.loads((ctx.out / "eval" / "metrics.json").read_text())
    assert summary["test_ndcg@10"] == metrics["test"]["ndcg@10"]
    assert summary["best_valid_ndcg@10"] == max(r["valid_ndcg@10"] for r in rows if "valid_ndcg@10" in r)
    loaded = GenerativeRecommender.load(ctx.out / "model", device="cpu")
    assert loaded.recommend([[1, 2, 3]], num_beams=4, k=4).items.shape == (1, 4)


def test_bad_reward_config_fails_before_training(tiny_dataset, tmp_path):
    from genrec.train.rl import train_rl

    rec = tiny_recommender(tiny_dataset)
    with pytest.raises(ValueError, match="rl.rewards.nope: unknown reward"):
        train_rl(rl_config("rl.rewards={nope: 1.0}"), tiny_dataset, rec, tmp_path / "o", tmp_path / "w")
    with pytest.raises(ValueError, match="rl.rollout=beam"):
        train_rl(rl_config("rl.rollout=sample"), tiny_dataset, rec, tmp_path / "o", tmp_path / "w")


def test_rl_run_keeps_step_0_and_resumes_a_checkpoint_that_held_its_best_weights(tmp_path):
    """RLRun: the input model is the best until a later step beats it on valid; an older
    checkpoint (best weights inside it, no SFT score) resumes to the same outputs."""
    import json

    from genrec.train.rl_run import RLRun, rng_state, save_torch

    class Saver:
        def save(self, path):
            path.mkdir(parents=True)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scores = iter([0.5, 0.4, float("nan")])  # steps 0, 1, 2: never better than step 0
    run = RLRun("t", model, opt, tmp_path / "w", lambda: next(scores))
    for step in (1, 2):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        run.end_step({"step": step, "loss": 1.0}, evaluate=True, save=True)
    summary = run.finish(Saver(), tmp_path / "out")
    assert summary["best_step"] == 0 and summary["sft_valid_ndcg@10"] == 0.5 and summary["steps"] == 2
    assert all(torch.equal(model.state_dict()[n], w) for n, w in start.items())  # step 0's weights returned
    rows = [json.loads(r) for r in (tmp_path / "out" / "rl_curves.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["valid_ndcg@10"] == 0.4

    # The layout srpo.py and agent/rl.py wrote before RLRun: best weights in the checkpoint.
    old = tmp_path / "old"
    old.mkdir()
    best = {n: w + 1 for n, w in start.items()}
    state = {"step": 2, "best": 0.7, "best_step": 1, "seconds": 3.0}
    blob = {"model": start, "opt": opt.state_dict(), "state": state, "best": best, "rng": rng_state()}
    save_torch(blob, old / "checkpoint.pt")
    resumed = RLRun("t", model, opt, old, lambda: 0.0)
    assert resumed.step == 2 and resumed.best == 0.7
    out = resumed.finish(Saver(), tmp_path / "out2")
    assert out["best_step"] == 1 and out["sft_valid_ndcg@10"] is None
    assert all(torch.equal(model.state_dict()[n], w) for n, w in best.items())


def test_every_bench_reward_variant_loads_on_every_dataset_config(tiny_dataset):
    """A variant that a config change left invalid (say a target reward on unlabelled prompts)
    fails here, not an hour into a benchmark."""
    from pathlib import Path

    from conftest import load_bench
    from genrec.config import load_config

    bench = load_bench("bench_generative")
    root = Path(__file__).resolve().parents[1]
    for dataset, path in bench.CONFIGS.items():
        for variant, overrides in bench.REWARD_VARIANTS.items():
            cfg = load_config(root / path, ["run_dir=x", *overrides])
            try:
                rl_prompts(tiny_dataset, cfg.rl, 5)  # raises for rewards the prompts cannot score
            except ValueError as err:
                raise AssertionError(f"{dataset} {variant}: {err}") from err
