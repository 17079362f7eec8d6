"""GREAM: chains (data-derived, denoised, teacher), no leakage, tasks and curriculum, reasoning mode, config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import TINY_GENERATIVE, held_out_dataset, load_bench, tiny_codes  # noqa: E402
from genrec.config import ConfigError, load_config  # noqa: E402
from genrec.decode.text import find_end  # noqa: E402
from genrec.interests.backends import ChatResult  # noqa: E402
from genrec.interests.cache import CallCache  # noqa: E402
from genrec.methods.gream.chains import apply_teacher, build_chains, data_chain, item_labels  # noqa: E402
from genrec.methods.gream.config import GREAMConfig  # noqa: E402
from genrec.methods.gream.reasoning import generate_rationales, reasoning_recommend  # noqa: E402
from genrec.methods.gream.tasks import CoSIDTask, ReasonTask, curriculum_stage, gream_builders  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_GENERATIVE


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_denoised_rewrite_drops_items_outside_the_inferred_preferences():
    labels = item_labels(["Drama", "Drama", "Horror", "Comedy", "Drama, Comedy", "Western", ""], max_share=0.9)
    cfg = GREAMConfig(evidence_labels=3, preference_labels=1)
    chain = data_chain(0, 6, np.array([0, 2, 1, 6, 5, 3]), 4, labels, cfg)
    assert chain.evidence == "evidence: Drama 2, Comedy 1, Horror 1."
    # Recency weights (j + 1) / 6: Drama 1/6 + 3/6, Comedy 6/6 -> Comedy leads; the target's Comedy is the intent.
    assert (chain.preferences, chain.intent) == ("preferences: Comedy.", "intent: Comedy.")
    # Drama, Horror and Western items go; the unlabelled item 6 cannot be judged and stays.
    assert chain.rewrite.tolist() == [6, 3]
    with pytest.raises(ValueError, match="need item categories"):
        build_chains([np.arange(6)], [""] * 6, cfg, 5)
    # A label on more than max_share of the items is dropped as uninformative.
    assert item_labels(["Beauty, Skin", "Beauty, Hair", "Beauty"], 0.5) == [("Skin",), ("Hair",), ()]


def test_no_valid_or_test_item_enters_a_chain_or_a_training_example():
    dataset = held_out_dataset()
    held = set(range(30, 110))
    cfg = GREAMConfig(chains_per_user=0, min_history=2)
    chains = build_chains(dataset.train_sequences(), dataset.items["categories"].tolist(), cfg, 5)
    assert len(chains) == sum(len(s) - 2 for s in dataset.train_sequences())
    for c in chains:
        assert held.isdisjoint({c.target, *c.history.tolist(), *c.rewrite.tolist()})

    from genrec.model.prompt import PromptFormat
    from genrec.model.tokenizer import build_scratch_tokenizer
    from genrec.tasks.base import TaskData

    codes = tiny_codes(dataset.num_items)
    tok = build_scratch_tokenizer(dataset.titles, 300, [4, 8, 8], ["co2sid", "gream_reason"])
    fmt = PromptFormat.markers(tok, ["co2sid", "gream_reason"])
    from genrec.model.vocab import SIDVocab

    vocab = SIDVocab.from_tokenizer(tok, [4, 8, 8])
    data = TaskData(dataset.train_sequences(), vocab.sid_to_ids(codes), dataset.titles, dataset.titles, tok, 5)
    sets = [builder(data, fmt) for builder in gream_builders(cfg, chains).values()]
    sid_of = {tuple(row): item for item, row in enumerate(vocab.sid_to_ids(codes).tolist())}
    first_level = set(range(vocab.offsets[0], vocab.offsets[0] + 4))
    for examples in sets:
        for i in range(len(examples)):
            ids = examples[i].input_ids.tolist()
            named = {sid_of[tuple(ids[j : j + 3])] for j, t in enumerate(ids) if t in first_level}
            assert named and held.isdisjoint(named)


def test_co_interaction_alignment_task():
    from genrec.model.prompt import PromptFormat
    from genrec.tasks.base import TaskData

    class Tok:  # the task tokenizes nothing; TaskData only stores it
        pass

    sid_ids = np.arange(12).reshape(4, 3) + 100
    data = TaskData([np.array([0, 1, 2]), np.array([1, 2])], sid_ids, ["a"] * 4, ["a"] * 4, Tok(), 5)
    fmt = PromptFormat("markers", {"seqrec": [1, 2], "co2sid": [1, 3]}, [4], [5], 6, 0)
    task = CoSIDTask(data, fmt, GREAMConfig(co_window=1, co_items=2))
    assert task.items.tolist() == [0, 1, 2]  # item 3 is in no training sequence
    ex = task[1]  # item 1: item 2 twice, item 0 once
    assert ex.input_ids.tolist() == [1, 3, 103, 104, 105, 4, 106, 107, 108, 100, 101, 102, 6]
    assert ex.labels.tolist() == [-100] * 6 + [106, 107, 108, 100, 101, 102, 6]
    assert task.lengths.tolist() == [len(task[i].input_ids) for i in range(3)]


def test_curriculum_walks_the_five_stages():
    assert [curriculum_stage(e, 5) for e in range(7)] == [1, 2, 3, 4, 5, 5, 5]
    assert curriculum_stage(0, 0) == 5

    from genrec.model.prompt import PromptFormat
    from genrec.model.tokenizer import build_scratch_tokenizer
    from genrec.model.vocab import SIDVocab
    from genrec.tasks.base import TaskData

    dataset = held_out_dataset()
    chains = build_chains(dataset.train_sequences(), dataset.items["categories"].tolist(), GREAMConfig(), 5)
    tok = build_scratch_tokenizer(dataset.titles, 300, [4, 8, 8], ["gream_reason"])
    fmt = PromptFormat.markers(tok, ["gream_reason"])
    vocab = SIDVocab.from_tokenizer(tok, [4, 8, 8])
    data = TaskData(
        dataset.train_sequences(), vocab.sid_to_ids(tiny_codes(110)), dataset.titles, dataset.titles, tok, 5
    )
    task = ReasonTask(data, fmt, chains, curriculum_epochs=5)
    chain = chains[0]
    target_sid = vocab.sid_to_ids(tiny_codes(110))[chain.target].tolist()
    seen = []
    for epoch in range(5):
        task.set_epoch(epoch)
        ex = task[0]
        text = tok.decode(ex.input_ids[ex.labels != -100].tolist())
        seen.append(ex.input_ids.tolist())
        # The prompt never carries loss; the answer SID (then eos) is trained from stage 4 on.
        assert (ex.labels[: len(task.prompt(chain))] == -100).all()
        assert ("evidence:" in text, "preferences:" in text, "intent:" in text) == (True, epoch >= 1, epoch >= 2)
        assert ("</think>" in text, "rewrite:" in text) == (epoch >= 3, epoch >= 4)
        assert (ex.input_ids[-4:-1].tolist() == target_sid) == (epoch >= 3)
        assert len(ex.input_ids) <= task.lengths[0]
    assert all(len(a) < len(b) for a, b in zip(seen, seen[1:]))


class FakeTeacher:
    """A ChatBackend answering from a script, counting its calls."""

    name, model, max_concurrency, params = "fake-teacher", "scripted", 1, {"temperature": 0.0}

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def complete(self, messages, **params):
        self.calls += 1
        return ChatResult(self.answers(messages), 10, 5)


def test_teacher_chains_are_cached_and_a_malformed_answer_stays_data_derived(tmp_path):
    dataset = held_out_dataset()
    cats = dataset.items["categories"].tolist()
    cfg = GREAMConfig(chains_per_user=1)

    def answers(messages):
        if "1. item 0 title" in messages[1]["content"]:
            return "Sorry, I cannot do that."
        return "evidence: many Sub1 items\npreferences: Sub1\nintent: another Sub1 item"

    teacher = FakeTeacher(answers)
    chains = build_chains(dataset.train_sequences(), cats, cfg, 5)
    data_steps = [(c.evidence, c.intent) for c in chains]
    with CallCache(tmp_path / "calls.sqlite") as cache:
        counts = apply_teacher(chains, teacher, cache, dataset.titles, cats)
    malformed = [i for i, c in enumerate(chains) if c.history[0] == 0]
    assert 0 < len(malformed) < len(chains)
    assert counts == {"asked": 40, "taught": 40 - len(malformed), "malformed": len(malformed), "failed": 0}
    for i, c in enumerate(chains):
        if i in malformed:
            assert (c.source, (c.evidence, c.intent)) == ("data", data_steps[i])
        else:
            assert (c.source, c.intent) == ("fake-teacher", "intent: another Sub1 item")
    calls = teacher.calls
    with CallCache(tmp_path / "calls.sqlite") as cache:
        again = build_chains(dataset.train_sequences(), cats, cfg, 5)
        apply_teacher(again, teacher, cache, dataset.titles, cats)
        assert cache.stats()["hits"] == 40
    assert teacher.calls == calls and [c.intent for c in again] == [c.intent for c in chains]
    # The teacher prompt names the target, and only training items.
    assert "The next item was: item" in teacher_prompt(chains[0], dataset)


def teacher_prompt(chain, dataset):
    from genrec.methods.gream.chains import teacher_messages

    return teacher_messages(chain, dataset.titles, dataset.items["categories"].tolist())[1]["content"]


def test_rationale_ends_at_the_answer_marker_eos_or_the_budget():
    assert find_end([5, 6, 9, 7], [[9]], eos_id=2) == (2, 0)
    assert find_end([5, 2, 9], [[9]], eos_id=2) == (1, -1)
    assert find_end([5, 8, 9, 1], [[8, 9]], eos_id=2) == (1, 0)
    assert find_end([5, 8, 1], [[8, 9]], eos_id=2) == (3, -2)
    assert find_end([5, 8, 1, 9], [[9], [8, 1]], eos_id=2) == (1, 1)


class ScriptedLM(torch.nn.Module):
    """A causal LM whose next token depends only on the last input token: ``table[last]``."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True, logits_to_keep=0
    ):
        from types import SimpleNamespace

        logits = torch.nn.functional.one_hot(self.table[input_ids], len(self.table)).float() * 10
        return SimpleNamespace(logits=logits[:, -1:] if logits_to_keep else logits, past_key_values=None)


def test_generate_rationales_greedy_stop_and_forced():
    # 3 -> 4 -> 5 -> 9 (the answer marker); 7 -> 7 -> 7 ... never stops.
    table = [0, 0, 0, 4, 5, 9, 0, 7, 0, 0]
    out = generate_rationales(ScriptedLM(table), [[1, 3], [7]], stop=[9], eos_id=2, pad_id=0, max_new_tokens=5)
    assert out.ids == [[4, 5], [7, 7, 7, 7, 7]]
    assert out.forced.tolist() == [False, True]


def test_reasoning_mode_trains_and_always_answers_with_items(tmp_path):
    from genrec.methods.gream.stage import evaluate_modes, model_modes
    from genrec.model.recommender import GenerativeRecommender
    from genrec.train.sft import train_sft

    dataset = held_out_dataset()
    codes = tiny_codes(dataset.num_items)
    texts = [f"{t}. {c}" for t, c in zip(dataset.titles, dataset.items["categories"])]
    cfg = load_config(
        None,
        [
            "run_dir=unused",
            *TINY,
            "sft.max_epochs=2",
            "gream.curriculum_epochs=1",
            "sft.tasks={seqrec: 1.0, co2sid: 0.5, gream_reason: 1.0}",
        ],
    )
    chains = build_chains(dataset.train_sequences(), dataset.items["categories"].tolist(), cfg.gream, 5)
    train_sft(
        cfg, dataset, codes, texts, tmp_path / "out", tmp_path / "work", extra_tasks=gream_builders(cfg.gream, chains)
    )
    rec = GenerativeRecommender.load(tmp_path / "out" / "model", device="cpu")
    histories = dataset.examples("test").histories[:4]
    out, rationales = reasoning_recommend(rec, histories, k=5, max_think_tokens=3)
    assert out.items.shape == (4, 5) and bool((out.items >= 0).all()) and bool((out.items < 110).all())
    assert all(r.startswith("<think>") for r in rationales)
    # A one-token budget is always exhausted: the answer marker is forced, and the answer is still an item.
    stats = {}
    out, rationales = reasoning_recommend(rec, histories, k=5, max_think_tokens=1, stats=stats)
    assert all(r.endswith("[forced]") for r in rationales) and bool((out.items >= 0).all())
    assert stats == {"users": 4, "forced": 4, "tokens": 4}
    # Sampled rationales (malformed text, stray SID tokens) never break the constrained answer.
    gen = torch.Generator().manual_seed(0)
    out, _ = reasoning_recommend(rec, histories, k=5, max_think_tokens=8, temperature=3.0, generator=gen)
    assert bool((out.items >= 0).all())
    res = evaluate_modes(cfg, dataset, rec, tmp_path / "eval", "tiny", splits=("test",))
    assert set(res) == {"direct", "reasoning"}
    assert (tmp_path / "eval" / "reasoning" / "metrics.json").is_file()
    rat = res["reasoning"]["rationales"]
    assert rat["users"] == len(dataset.examples("test")) and 0.0 <= rat["forced_share"] <= 1.0
    assert 0 < rat["mean_tokens"] <= cfg.gream.max_think_tokens
    ranked = pd.read_parquet(tmp_path / "eval" / "reasoning" / "predictions.parquet")["ranked"]
    assert all((np.asarray(r) >= 0).all() for r in ranked)

    check_reasoning_srpo(rec, dataset, cfg, tmp_path)

    seqrec_only = load_config(None, ["run_dir=unused", *TINY, "sft.max_epochs=1"])
    train_sft(seqrec_only, dataset, codes, texts, tmp_path / "o2", tmp_path / "w2")
    plain = GenerativeRecommender.load(tmp_path / "o2" / "model", device="cpu")
    with pytest.raises(ValueError, match="not trained with the 'gream_reason' task"):
        reasoning_recommend(plain, histories, k=5)
    # The gream_eval and gream_rl stages evaluate such a model in the direct mode only.
    assert model_modes(plain) == ("direct",) and model_modes(rec) == ("direct", "reasoning")


def test_shipped_config_and_bad_values():
    cfg = load_config(ROOT / "configs" / "gream-ml-100k.yaml")
    assert (cfg.rl.advantage, cfg.rl.rewards, cfg.rl.kl_coef, cfg.rl.dual_clip) == ("bgae", {"rsvr": 1.0}, 0.001, 10.0)
    assert cfg.sft.tasks["gream_reason"] > 0 and cfg.gream.curriculum_epochs > 0
    with pytest.raises(ConfigError, match="gream.preference_labels must be >= 1 and <= gream.evidence_labels"):
        load_config(None, ["run_dir=x", "gream.preference_labels=5"])
    with pytest.raises(ConfigError, match="gream.teacher.kind must be openai or hf"):
        load_config(None, ["run_dir=x", "gream.teacher={kind: offline}"])


MARKER_BONUS = 4.0


def check_reasoning_srpo(rec, dataset, cfg, tmp_path):
    """Reasoning rollouts (rationale + answer SID) and SRPO on them, from the model trained above."""
    import json
    from dataclasses import replace

    from genrec.methods.gream.reasoning import reasoning_prompts
    from genrec.methods.gream.srpo import reasoning_rollout, train_reasoning_srpo

    histories = dataset.examples("test").histories[:4]
    gen = torch.Generator().manual_seed(0)
    ro = reasoning_rollout(rec, histories, 3, max_think_tokens=4, temperature=3.0, generator=gen)
    assert ro.items.shape == (4, 3) and ro.codes.shape[:2] == (4, 3) and len(ro.ids) == 12
    # A malformed rollout (no answer marker of its own) has no answer; a well-formed one answers with an item.
    assert ((ro.items >= 0) == ro.well_formed).all() and ((ro.codes >= 0).all(axis=2) == ro.well_formed).all()
    prompts = reasoning_prompts(rec, histories)
    levels = ro.codes.shape[2]
    for r, (ids, gen_mask) in enumerate(zip(ro.ids, ro.generated)):
        b, j = divmod(r, 3)
        n = len(prompts[b])
        assert ids[:n] == prompts[b] and not any(gen_mask[:n]) and len(ids) == len(gen_mask)
        # The SID takes loss only when the rollout is well formed; the rationale always does.
        assert (
            all(gen_mask[-levels:]) == bool(ro.well_formed[b, j]) and sum(gen_mask[n:-levels]) >= ro.think_tokens[b, j]
        )
    forced = reasoning_rollout(rec, histories, 2, max_think_tokens=1, temperature=1.0, generator=gen)
    assert (forced.think_tokens <= 1).all()

    srpo = replace(
        cfg,
        rl=replace(
            cfg.rl,
            rewards={"rsvr": 1.0, "valid_penalty": 0.5},
            advantage="bgae",
            rollout="sample",
            group_size=3,
            batch_size=4,
            steps=2,
            eval_every=1,
            eval_users=4,
            lr=0.01,
        ),
        gream=replace(cfg.gream, max_think_tokens=40, rl_rollout="reasoning"),
    )
    # This tiny model rarely writes the answer marker within the budget, so every group would be
    # all-malformed (equal rewards, nothing to learn). A logit bonus on the marker gives a policy
    # that writes it about every few tokens: well-formed and malformed rollouts in one group.
    marker = rec.fmt.answer[0]

    def marker_bonus(module, args, output):
        output[..., marker] += MARKER_BONUS
        return output

    hook = rec.model.get_output_embeddings().register_forward_hook(marker_bonus)
    summary = train_reasoning_srpo(srpo, dataset, rec, tmp_path / "srpo", tmp_path / "srpo_w")
    assert summary["steps"] == 2 and (tmp_path / "srpo" / "rl_curves.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "srpo" / "rl_curves.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all("well_formed" in r and "reward/rsvr" in r for r in rows[1:])
    assert any(r["loss_tokens"] > 0 for r in rows[1:]), "no informative group: the update path went untested"
    # A run stopped after step 1 and resumed takes the same step 2 as the uninterrupted one.
    from genrec.model.recommender import GenerativeRecommender

    model_dir = tmp_path / "out" / "model"
    hook.remove()

    def biased():
        model = GenerativeRecommender.load(model_dir, device="cpu")
        model.model.get_output_embeddings().register_forward_hook(marker_bonus)
        return model

    one = replace(srpo, rl=replace(srpo.rl, steps=1))
    train_reasoning_srpo(one, dataset, biased(), tmp_path / "a", tmp_path / "aw")
    train_reasoning_srpo(srpo, dataset, biased(), tmp_path / "a", tmp_path / "aw")
    fresh = tmp_path / "b"
    train_reasoning_srpo(srpo, dataset, biased(), fresh, tmp_path / "bw")
    resumed = [json.loads(x) for x in (tmp_path / "a" / "rl_curves.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (fresh / "rl_curves.jsonl").read_text().splitlines()]
    assert resumed[2]["loss_tokens"] > 0  # the resumed step did learn something
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight
    ]
    with pytest.raises(ValueError, match="rank depends on beam order"):
        train_reasoning_srpo(
            replace(srpo, rl=replace(srpo.rl, rewards={"rank": 1.0})), dataset, rec, tmp_path / "c", tmp_path / "cw"
        )
    with pytest.raises(ValueError, match="use rl.prompts=targets"):
        train_reasoning_srpo(
            replace(srpo, rl=replace(srpo.rl, prompts="histories")), dataset, rec, tmp_path / "d", tmp_path / "dw"
        )


def test_bench_variants_and_rows(tmp_path):
    import json

    bench = load_bench("bench_gream")
    full = bench.variant_config("ml-100k", "full", tmp_path, [f"run_dir={tmp_path / 'r'}"])
    shipped = load_config(ROOT / "configs" / "gream-ml-100k.yaml", [f"run_dir={tmp_path / 'r'}"])
    assert full == shipped  # the full variant is the shipped config
    align = bench.variant_config("ml-100k", "align", tmp_path, [])
    assert "gream_reason" not in align.sft.tasks and align.sft.tasks["co2sid"] == shipped.sft.tasks["co2sid"]
    assert "gream_rl" not in align.stages and align.run_dir == str(tmp_path / "ml-100k" / "align")
    assert bench.variant_config("ml-100k", "no-curriculum", tmp_path, []).gream.curriculum_epochs == 0

    def fake(path: Path, ndcg: float, ms: float) -> None:
        path.mkdir(parents=True, exist_ok=True)
        test = {"hr@5": 2 * ndcg, "ndcg@5": ndcg, "hr@10": 3 * ndcg, "ndcg@10": ndcg, "ms_per_user": ms}
        (path / "metrics.json").write_text(json.dumps({"test": test, "valid": test}))

    for s, bump in ((1, 0.0), (2, 0.02)):
        run = tmp_path / "full" / f"seed_{s}"
        fake(run / "gream_eval" / "direct", 0.10 + bump, 5.0)
        fake(run / "gream_eval" / "reasoning", 0.05 + bump, 30.0)
        rationales = {"forced_share": 0.1 * s, "mean_tokens": 80.0, "max_think_tokens": 96}
        (run / "gream_eval" / "reasoning" / "rationales.json").write_text(json.dumps(rationales))
        fake(run / "gream_rl" / "eval" / "direct", 0.11 + bump, 5.0)
        fake(tmp_path / "align" / f"seed_{s}" / "gream_eval" / "direct", 0.20 + bump, 4.0)
        (run / "gream_sft").mkdir()
        summary = {"epochs": 8, "best_valid_ndcg@10": 0.1, "train_seconds": 120.0}
        (run / "gream_sft" / "done.json").write_text(json.dumps({"summary": summary}))
    (tmp_path / "full" / "seed_1" / "prepare").mkdir()
    (tmp_path / "full" / "seed_1" / "prepare" / "stats.json").write_text(json.dumps({"users": 943, "items": 1349}))
    rows = bench.variant_rows(tmp_path, [1, 2])
    assert list(rows) == [
        "curriculum (direct)",
        "curriculum (reasoning)",
        "curriculum + SRPO (direct)",
        "alignment only (direct)",
    ]
    assert rows["curriculum (reasoning)"]["ndcg@10"]["values"] == pytest.approx([0.05, 0.07])
    assert rows["alignment only (direct)"]["ndcg@10"]["mean"] == pytest.approx(0.21)
    section = bench.dataset_section("ml-100k", tmp_path, [1, 2], "python bench/bench_gream.py", 60.0)
    assert section.startswith("### ml-100k: 943 users, 1,349 items")
    assert "| curriculum + SRPO (direct) | 2 | 0.2400 ± 0.0283 | 0.1200 ± 0.0141 |" in section
    assert (
        "- curriculum (reasoning): 30.0 ± 0.0; rationale 80.0 ± 0.0 tokens, 15.0 ± 7.1% forced (budget 96)" in section
    )
    assert "- curriculum (direct): 5.0 ± 0.0\n" in section
    assert "| full | 8.0 ± 0.0 | 0.1000 ± 0.0000 | 2.0 ± 0.0 | - | - |" in section


def test_rationale_stats_warn_when_the_budget_cuts_most_rationales(caplog):
    from genrec.methods.gream.stage import _rationale_stats

    with caplog.at_level("WARNING", logger="genrec"):
        out = _rationale_stats({"users": 4, "forced": 3, "tokens": 190}, 48)
    assert out == {"users": 4, "forced_share": 0.75, "mean_tokens": 47.5, "max_think_tokens": 48}
    assert "75% of the rationales ran out of gream.max_think_tokens=48" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="genrec"):
        assert _rationale_stats({"users": 4, "forced": 2, "tokens": 100}, 48)["forced_share"] == 0.5
    assert caplog.text == ""
