"""DeepRec's agent: protocol parsing, rewards, candidate scoring, warm-up data, the loop and RL on tiny data."""

from __future__ import annotations

import doctest

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import TINY_GENERATIVE, held_out_dataset, tiny_codes  # noqa: E402
from genrec.agent import loop, protocol, rewards, trajectories  # noqa: E402
from genrec.agent.protocol import CLOSE, MALFORMED, PREF_END, THINK_END, parse_turn  # noqa: E402
from genrec.config import ConfigError, load_config  # noqa: E402

TINY = [
    *TINY_GENERATIVE,
    "sft.batch_tokens=2048",
    "agent.retrieve_n=4",
    "agent.max_turns=2",
    "agent.turn_tokens=12",
    "agent.answer_items=2",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_literal_examples_in_the_docstrings_hold():
    from genrec.decode import text
    from genrec.methods.gream import chains

    for module in (protocol, rewards, trajectories, text, chains):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


def test_turns_are_parsed_and_malformed_ones_say_why():
    assert parse_turn(" evidence: Drama 2. <pref> Drama; War", PREF_END).preference == "Drama; War"
    assert parse_turn("ok", THINK_END).kind == CLOSE
    for text, stop, why in [
        ("Drama", PREF_END, "</pref> without <pref>"),
        ("<pref> ;; ", PREF_END, "empty preference"),
        ("<pref>\n;\t", PREF_END, "empty preference"),
        ("<pref> Drama", "", "ended without"),
    ]:
        turn = parse_turn(text, stop)
        assert turn.kind == MALFORMED and why in turn.error
    assert parse_turn("a <pref> x <pref> Drama", PREF_END).preference == "Drama"  # the last opener counts


def test_hierarchical_rewards_literal_values():
    cols = {
        "well_formed": np.array([True, True, False, True]),
        "num_calls": np.array([1, 3, 2, 2]),
        "pref_cosine": np.array([np.nan, 0.25, 0.0, 1.0]),
        "target_retrieved": np.array([False, True, True, True]),
        "target_rank": np.array([-1, 0, 0, 4]),
    }
    total, parts = rewards.combine({"format": 1.0, "calls": 1.0, "diversity": 1.0}, **cols)
    assert parts["format"].tolist() == [0.0, 0.0, -1.0, 0.0]
    assert parts["calls"].tolist() == [0.0, 1.0, 0.5, 0.5]
    assert np.allclose(parts["diversity"], [0.0, 0.15, 0.2, 0.0])
    assert np.allclose(total, [0.0, 1.15, -0.3, 0.5])
    total, parts = rewards.combine({"format": 1.0, "outcome": 1.0, "recall": 0.5}, **cols)
    # A malformed answer earns no outcome even with the target on top.
    assert np.allclose(parts["outcome"], [0.0, 3.0, 0.0, 2.2])
    assert np.allclose(total, [0.0, 3.5, -0.5, 2.7])
    adv = rewards.group_baseline_advantages(np.array([[3.0, 3.0], [1.0, 1.0]]))
    assert adv.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def tiny_lm(vocab: int = 40):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        use_sliding_window=False,
    )
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def test_candidate_scores_equal_a_full_forward_per_candidate():
    from genrec.decode.beam import score_candidates
    from genrec.decode.text import left_pad

    model = tiny_lm()
    prompts = [[1, 5, 6, 7], [2, 9]]
    cands = torch.tensor([[[20, 30], [21, 31], [-1, -1]], [[22, 32], [20, 30], [23, 33]]])
    ids, mask = left_pad(prompts, 0, "cpu")
    got = score_candidates(model, ids, mask, cands)
    assert torch.isneginf(got[0, 2])
    for b, prompt in enumerate(prompts):
        for m in range(3):
            if cands[b, m, 0] < 0:
                continue
            seq = torch.tensor([prompt + cands[b, m].tolist()])
            logp = torch.log_softmax(model(seq).logits[0].detach().float(), -1)
            want = sum(float(logp[len(prompt) - 1 + t, cands[b, m, t]]) for t in range(2))
            assert got[b, m].item() == pytest.approx(want, abs=1e-4)


class FakeRetriever:
    """Scores items by a fixed random vector; a preference naming ``SubK`` lifts the items of category K."""

    def __init__(self, num_items: int):
        self.num_items = num_items
        self.base = torch.from_numpy(np.random.default_rng(0).normal(size=num_items)).float()
        self.rank_base = torch.from_numpy(np.random.default_rng(1).normal(size=num_items)).float()
        self.calls = []

    def retrieve(self, histories, preferences, n, exclude=None):
        self.calls.append(list(preferences))
        scores = self.base.repeat(len(histories), 1)
        for b, pref in enumerate(preferences):
            for k in range(3):
                if pref and f"Sub{k}" in pref:
                    scores[b, torch.arange(self.num_items) % 3 == k] += 10
            if exclude is not None and len(exclude[b]):
                scores[b, torch.as_tensor(np.asarray(exclude[b], dtype=np.int64))] = -torch.inf
        top = scores.topk(n, dim=1)
        ids = top.indices.numpy().astype(np.int64)
        ids[np.isneginf(top.values.numpy())] = -1
        return ids, top.values.numpy()

    def score(self, histories, preferences=None):
        """Logits over the catalogue for the final ranking: another random vector than retrieval's."""
        return self.rank_base.repeat(len(histories), 1)

    def embed_preferences(self, prefs):
        out = torch.zeros(len(prefs), 3)
        for i, p in enumerate(prefs):
            for k in range(3):
                out[i, k] = float(f"Sub{k}" in p)
        return torch.nn.functional.normalize(out + 1e-3, dim=-1)


def test_warm_up_trajectories_use_training_items_only_and_mask_the_tool():
    from genrec.agent.trajectories import AgentTask, build_trajectories
    from genrec.model.prompt import PromptFormat
    from genrec.model.tokenizer import build_scratch_tokenizer
    from genrec.tasks.base import TaskData

    dataset = held_out_dataset(num_users=30, max_train=10)
    cfg = load_config(None, ["run_dir=x", *TINY]).agent
    retriever = FakeRetriever(dataset.num_items)
    trajs = build_trajectories(dataset.train_sequences(), dataset.items["categories"].tolist(), retriever, cfg, 5)
    assert trajs and all(t.answer[0] == t.target for t in trajs)
    held_out = set(range(30, dataset.num_items))
    for t in trajs:
        seq = dataset.train_sequences()[t.user]
        assert t.target == seq[t.position] and not set(t.history.tolist()) & held_out
        retrieved = np.concatenate(t.retrieved)
        # Seen items are never retrieved, and the two calls return different items.
        assert not set(retrieved.tolist()) & set(seq[: t.position].tolist())
        assert len(set(retrieved.tolist())) == len(retrieved)
    # The second call is the target's own label: the fake TRM then lifts the target's category.
    assert trajs[0].preferences[1] == f"Sub{trajs[0].target % 3}"

    codes = tiny_codes(dataset.num_items)
    texts = dataset.titles
    tok = build_scratch_tokenizer(texts, 300, [4, 8, 8], ["deeprec"])
    fmt = PromptFormat.markers(tok, ["deeprec"])
    from genrec.model.vocab import SIDVocab

    vocab = SIDVocab.from_tokenizer(tok, [4, 8, 8])
    data = TaskData(dataset.train_sequences(), vocab.sid_to_ids(codes), texts, dataset.titles, tok, 5)
    task = AgentTask(data, fmt, trajs, cfg)
    ex = task[0]
    assert len(ex.input_ids) == task.lengths[0]
    text = tok.decode(ex.input_ids, skip_special_tokens=False)
    assert text.count("<pref>") == 2 and text.count("<items>") == 2
    # No loss on the tool's lists: every <items> ... </items> span is -100, and the answer is learnt.
    ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
    open_id, close_id = tok.convert_tokens_to_ids(["<items>", "</items>"])
    inside = False
    for i, label in zip(ids, labels):
        inside = inside or i == open_id
        if inside:
            assert label == -100
        inside = inside and i != close_id
    assert labels[-1] == fmt.eos_id


def test_agent_mode_trains_answers_with_items_and_survives_malformed_output(tmp_path):
    from genrec.agent.loop import AgentFormat, agent_ranker, run_agent
    from genrec.agent.rl import train_agent_rl
    from genrec.agent.stage import protocol_stats
    from genrec.agent.trajectories import agent_builders, build_trajectories
    from genrec.eval.evaluate import evaluate
    from genrec.model.recommender import GenerativeRecommender
    from genrec.train.sft import train_sft

    dataset = held_out_dataset(num_users=30, max_train=10)
    codes = tiny_codes(dataset.num_items)
    cfg = load_config(
        None,
        ["run_dir=unused", *TINY, "sft.max_epochs=3", "sft.tasks={seqrec: 1.0, deeprec: 1.0}", "sft.lr=0.01"],
    )
    retriever = FakeRetriever(dataset.num_items)
    trajs = build_trajectories(dataset.train_sequences(), dataset.items["categories"].tolist(), retriever, cfg.agent, 5)
    train_sft(
        cfg,
        dataset,
        codes,
        dataset.titles,
        tmp_path / "sft",
        tmp_path / "w",
        extra_tasks=agent_builders(trajs, cfg.agent),
    )
    rec = GenerativeRecommender.load(tmp_path / "sft" / "model", device="cpu")
    test = dataset.examples("test")
    agent_fmt = AgentFormat(rec, dataset.titles, cfg.agent)

    greedy = run_agent(rec, retriever, agent_fmt, test.histories[:6], test.seen[:6], cfg.agent, k=8)
    assert greedy.ranked.shape == (6, 8) and (greedy.ranked >= 0).all()
    for tr, row, seen in zip(greedy.transcripts, greedy.ranked, test.seen[:6]):
        assert len(set(row.tolist())) == 8 and not set(row.tolist()) & set(seen.tolist())
        assert tr.answer == row[: len(tr.answer)].tolist() and set(tr.answer) <= set(tr.candidates())

    # The final ranking of given candidates: the LLM's order with trm_weight 0, the TRM's when it dominates.
    def answers(weight):
        from genrec.agent.loop import rank_answers
        from genrec.agent.protocol import Transcript

        hist, seen = test.histories[:6], test.seen[:6]
        pool = [np.setdiff1d(np.arange(dataset.num_items), s)[:6].tolist() for s in seen]
        trs = [Transcript(retrieved=[p]) for p in pool]
        ctx = [agent_fmt.prompt(rec, h) for h in hist]
        gen = [[False] * len(c) for c in ctx]
        ranked = rank_answers(rec, retriever, agent_fmt, hist, seen, trs, ctx, gen, 8, False, 0.0, None, weight)
        # Past its candidates each list continues with the TRM's own order, without seen or candidate items.
        for row, s, p in zip(ranked, seen, pool):
            rest = [i for i in retriever.rank_base.argsort(descending=True).tolist() if i not in set(s) | set(p)]
            assert row[len(p) :].tolist() == rest[: 8 - len(p)]
        return [t.answer for t in trs], pool

    llm, pool = answers(0.0)
    fused, _ = answers(1e6)
    ordered = [(retriever.rank_base[a][:-1] >= retriever.rank_base[a][1:]).all() for a in fused]
    assert all(sorted(a) == sorted(p) for a, p in zip(fused, pool)) and all(ordered)
    assert llm != fused, "the LLM's own order should differ from the TRM's somewhere, or the check proves nothing"
    # Wild sampling and a budget too small for any tag: malformed turns are answered, never raised.
    gen = torch.Generator().manual_seed(0)
    wild = run_agent(rec, retriever, agent_fmt, test.histories, test.seen, cfg.agent, 8, temperature=5.0, generator=gen)
    assert (wild.ranked >= 0).all()
    starved = load_config(None, ["run_dir=x", *TINY, "agent.turn_tokens=4"]).agent
    out = run_agent(rec, retriever, agent_fmt, test.histories, test.seen, starved, 8, temperature=5.0, generator=gen)
    assert (out.ranked >= 0).all()
    stats = protocol_stats(wild.transcripts + out.transcripts, 1.0)
    assert stats["malformed_turns"] > 0 and 0 <= (stats["well_formed_call_share"] or 0) <= 1

    log = []
    res = evaluate(
        agent_ranker(rec, retriever, dataset.titles, cfg.agent, 5, 0, log), dataset, cfg.eval, tmp_path / "e"
    )
    assert len(log) == 2 * dataset.num_users and res["test"]["users"] == dataset.num_users
    ranked = pd.read_parquet(tmp_path / "e" / "predictions.parquet")["ranked"]
    assert all((np.asarray(r) >= 0).all() for r in ranked)

    rl_cfg = load_config(
        None,
        [
            "run_dir=unused",
            *TINY,
            "agent.stage1_steps=1",
            "agent.stage2_steps=1",
            "agent.batch_size=4",
            "agent.group_size=2",
            "agent.eval_users=6",
            "agent.eval_every=1",
            "agent.trm_top=0",
            "agent.lr=0.01",
        ],
    )
    before = {n: p.detach().clone() for n, p in rec.model.named_parameters()}
    summary = train_agent_rl(rl_cfg, dataset, rec, retriever, tmp_path / "rl", tmp_path / "rlw")
    assert summary["steps"] == 2 and (tmp_path / "rl" / "curves.png").is_file()
    rows = [pd.read_json(tmp_path / "rl" / "curves.jsonl", lines=True)]
    assert rows[0]["stage"].dropna().tolist() == [1.0, 2.0]
    assert "reward_outcome" in rows[0] and "reward_calls" in rows[0]
    if summary["best_step"] > 0:
        assert any(not torch.equal(before[n], p) for n, p in rec.model.named_parameters())
    # Stopped after step 1 (the stage-1 step) and resumed, it takes the same stage-2 step as a straight run.
    # (This tiny agent never calls the tool, so its updates are zero: that the optimiser state
    # resumes is tested on the shared genrec.train.rl_run.RLRun through train_rl in test_rl.py.)
    from dataclasses import replace

    def sft_model():
        return GenerativeRecommender.load(tmp_path / "sft" / "model", device="cpu")

    one = replace(rl_cfg, agent=replace(rl_cfg.agent, stage2_steps=0))
    train_agent_rl(one, dataset, sft_model(), retriever, tmp_path / "a", tmp_path / "aw")
    resumed = train_agent_rl(rl_cfg, dataset, sft_model(), retriever, tmp_path / "a", tmp_path / "aw")
    straight = train_agent_rl(rl_cfg, dataset, sft_model(), retriever, tmp_path / "b", tmp_path / "bw")
    curves = [pd.read_json(tmp_path / d / "curves.jsonl", lines=True).drop(columns="seconds") for d in "ab"]
    assert resumed["steps"] == 2 and curves[0]["stage"].dropna().tolist() == [1.0, 2.0]
    pd.testing.assert_frame_equal(curves[0], curves[1])
    assert {k: v for k, v in resumed.items() if k != "train_seconds"} == {
        k: v for k, v in straight.items() if k != "train_seconds"
    }
    with pytest.raises(ValueError, match="use rl.prompts=targets"):
        train_agent_rl(
            replace(rl_cfg, rl=replace(rl_cfg.rl, prompts="histories")),
            dataset,
            rec,
            retriever,
            tmp_path / "c",
            tmp_path / "cw",
        )


def test_agent_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="agent.stage2_rewards"):
        load_config(None, ["run_dir=x", "agent.stage2_rewards={hit: 1}"])
    with pytest.raises(ConfigError, match="agent.group_size"):
        load_config(None, ["run_dir=x", "agent.group_size=1"])
    with pytest.raises(ValueError, match="not trained with the 'deeprec' task"):
        from types import SimpleNamespace

        loop.AgentFormat(SimpleNamespace(tokenizer=None, fmt=SimpleNamespace(heads={"seqrec": [1]})), [], None)
