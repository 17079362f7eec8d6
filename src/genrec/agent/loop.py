"""The agent loop: the LLM reasons and calls the TRM over several turns, then ranks what it retrieved.

:func:`run_agent` plays the protocol of ``genrec.agent.protocol`` for a batch of users at once:
every turn is one batched generation (``generate_until``, stopping at ``</pref>`` or
``</think>``), the well-formed calls of the turn are one batched TRM retrieval, and the
tool's answers are appended to each context. After ``agent.max_turns`` calls, or when the LLM
closes its reasoning, ``</think> <answer>`` follows, and the answer is the retrieved
candidates ranked by the LLM's log-probability of each candidate's SID at the answer
position (``score_candidates``: one pass over the shared context). Ranking over the
candidates is how "the LLM ranks what it retrieved" is made exact: every answer is a real,
retrieved item, whatever the model writes. Where the candidates are fewer than ``k``, the
list continues with the TRM's ranking without a preference, and ``Transcript`` says so.

For RL (``sample_answer=True``) the top answer is drawn from the softmax of the candidate
scores, so the ranking is part of the policy: its SID tokens are appended to the trajectory
as generated tokens, and ``AgentRollout`` keeps, per user, the trajectory's ids and which of
them the LLM wrote (the tool's lists and forced tags are not the policy's and take no loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from genrec.agent.config import AgentConfig
from genrec.agent.protocol import (
    AGENT_TASK,
    CALL,
    CLOSE,
    ITEMS,
    ITEMS_END,
    MALFORMED,
    PREF_END,
    THINK,
    THINK_END,
    Transcript,
    Turn,
    item_names,
    parse_turn,
)
from genrec.agent.trm import top_items
from genrec.decode.beam import score_candidates
from genrec.decode.text import generate_until, left_pad


@dataclass
class AgentRollout:
    transcripts: list[Transcript]
    ids: list[list[int]]  # (B,) the whole trajectory, prompt included
    generated: list[list[bool]]  # (B,) True where the LLM wrote the token
    ranked: np.ndarray  # (B, k) item_ids, -1 pads


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class AgentFormat:
    """The token ids of the protocol's tags and of each item's entry in a tool answer."""

    def __init__(self, recommender, titles: Sequence[str], cfg: AgentConfig):
        tok, fmt = recommender.tokenizer, recommender.fmt
        if AGENT_TASK not in fmt.heads:
            raise ValueError(
                f"this model was not trained with the {AGENT_TASK!r} task, so it has no agent mode: run the "
                "agent_sft stage (docs/deeprec.md), or use the direct mode"
            )
        self.tokenizer, self.fmt = tok, fmt
        self.head = fmt.head(AGENT_TASK)
        self.think, self.think_end = encode(tok, THINK), encode(tok, THINK_END)
        self.pref_end = encode(tok, PREF_END)
        self.items, self.items_end = encode(tok, ITEMS), encode(tok, ITEMS_END)
        self.sid_ids = recommender.sid_ids  # (N, L)
        self.names = item_names(tok, titles, cfg.title_tokens)

    def prompt(self, recommender, history: Sequence[int]) -> list[int]:
        seqrec = len(recommender.fmt.head("seqrec"))
        # prompt_ids checks the item ids; past the seqrec head it holds the history's SID ids.
        return self.head + recommender.prompt_ids(history)[seqrec:] + self.think

    def item_list(self, items: Sequence[int]) -> list[int]:
        """The tool's answer: ``<items> sid title <sep> ... </items>``."""
        ids = list(self.items)
        for j, item in enumerate(items):
            ids += self.sid_ids[item].tolist() + self.names[item]
            if j + 1 < len(items):
                ids += self.fmt.sep
        return ids + self.items_end

    def error(self, message: str) -> list[int]:
        return self.items + encode(self.tokenizer, " error: " + message) + self.items_end


def run_agent(
    recommender,
    retriever,
    agent_fmt: AgentFormat,
    histories: Sequence[np.ndarray],
    seen: Sequence[np.ndarray],
    cfg: AgentConfig,
    k: int,
    temperature: float = 0.0,
    sample_answer: bool = False,
    generator: torch.Generator | None = None,
) -> AgentRollout:
    """Play the protocol for every history (see the module docstring); ``seen`` items are never retrieved."""
    model, fmt, tok = recommender.model, recommender.fmt, recommender.tokenizer
    batch = len(histories)
    ctx = [agent_fmt.prompt(recommender, h) for h in histories]
    gen = [[False] * len(c) for c in ctx]
    transcripts = [Transcript() for _ in range(batch)]
    excluded = [set(map(int, s)) for s in seen]
    open_rows = list(range(batch))
    stops, tags = [agent_fmt.pref_end, agent_fmt.think_end], (PREF_END, THINK_END)

    def add(b: int, ids: Sequence[int], by_model: bool) -> None:
        ctx[b] += list(ids)
        gen[b] += [by_model] * len(ids)

    for _ in range(cfg.max_turns + 1):
        if not open_rows:
            break
        out = generate_until(
            model, [ctx[b] for b in open_rows], stops, fmt.eos_id, fmt.pad_id, cfg.turn_tokens, temperature, generator
        )
        calls: list[int] = []
        for b, ids, stop in zip(open_rows, out.ids, out.stop):
            # The stop tag, or the eos, is the model's own last token (RL puts gradient on it).
            tag = stops[stop] if stop >= 0 else [fmt.eos_id] if stop == -1 else []
            add(b, ids + tag, True)
            parsed = parse_turn(tok.decode(ids, skip_special_tokens=False), tags[stop] if stop >= 0 else "")
            if parsed.kind == CALL and len(transcripts[b].calls) >= cfg.max_turns:
                parsed = Turn(MALFORMED, parsed.reasoning, parsed.preference, f"no calls left after {cfg.max_turns}")
            transcripts[b].turns.append(parsed)
            if parsed.kind == CALL:
                calls.append(b)
            elif parsed.kind == MALFORMED:
                add(b, agent_fmt.error(parsed.error), False)
            else:
                transcripts[b].closed = True
        if calls:
            items, _ = retriever.retrieve(
                [histories[b] for b in calls],
                [transcripts[b].turns[-1].preference for b in calls],
                min(cfg.retrieve_n, retriever.num_items),
                exclude=[np.fromiter(excluded[b], dtype=np.int64) for b in calls],
            )
            for b, row in zip(calls, items):
                row = [int(i) for i in row if i >= 0]
                transcripts[b].retrieved.append(row)
                excluded[b].update(row)
                add(b, agent_fmt.item_list(row), False)
        open_rows = [b for b in open_rows if transcripts[b].turns[-1].kind != CLOSE]
    for b in open_rows:  # out of turns: the close is forced, and is no token of the policy
        add(b, agent_fmt.think_end, False)

    ranked = rank_answers(
        recommender,
        retriever,
        agent_fmt,
        histories,
        seen,
        transcripts,
        ctx,
        gen,
        k,
        sample_answer,
        temperature,
        generator,
        cfg.trm_weight,
    )
    return AgentRollout(transcripts, ctx, gen, ranked)


def rank_answers(
    recommender,
    retriever,
    agent_fmt,
    histories,
    seen,
    transcripts,
    ctx,
    gen,
    k,
    sample_answer,
    temperature,
    generator,
    trm_weight: float = 0.0,
):
    """Rank each transcript's candidates by the LLM's SID log-probability after ``<answer>``
    (plus ``trm_weight`` x the TRM's log-probability of the item, when > 0); fill to ``k``."""
    fmt = recommender.fmt
    batch = len(transcripts)
    for b in range(batch):
        ctx[b] += list(fmt.answer)
        gen[b] += [False] * len(fmt.answer)
    cands = [t.candidates() for t in transcripts]
    width = max(1, max(len(c) for c in cands))
    cand_ids = torch.full((batch, width, agent_fmt.sid_ids.shape[1]), -1, dtype=torch.long)
    for b, c in enumerate(cands):
        if c:
            cand_ids[b, : len(c)] = torch.as_tensor(agent_fmt.sid_ids[c])
    input_ids, attention_mask = left_pad(ctx, fmt.pad_id, recommender.device)
    was_training = recommender.model.training
    recommender.model.eval()
    try:
        scores = score_candidates(
            recommender.model,
            input_ids,
            attention_mask,
            cand_ids.to(recommender.device),
            recommender.trie if recommender.sid_softmax == "trie" else None,
            recommender.vocab.offsets,
        ).cpu()
    finally:
        recommender.model.train(was_training)
    trm = retriever.score(list(histories)).float().cpu()  # (B, N), no preference: the ranking and the fill
    if trm_weight > 0:
        item_ids = torch.zeros(batch, width, dtype=torch.long)  # padding reads item 0; its score stays -inf
        for b, c in enumerate(cands):
            item_ids[b, : len(c)] = torch.as_tensor(c, dtype=torch.long)
        scores = scores + trm_weight * trm.log_softmax(dim=-1).gather(1, item_ids)
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, M)
    if sample_answer:
        for b, c in enumerate(cands):
            if c:
                probs = (scores[b, : len(c)] / temperature).softmax(0)
                device = generator.device if generator is not None else "cpu"
                first = int(torch.multinomial(probs.to(device), 1, generator=generator))
                order[b] = torch.cat([order[b][order[b] == first], order[b][order[b] != first]])
    # The TRM without a preference continues each list past its candidates (excluding them and the seen items).
    fill, _ = top_items(
        trm,
        min(k, retriever.num_items),
        exclude=[np.concatenate([s, np.asarray(c, dtype=np.int64)]) for s, c in zip(seen, cands)],
    )
    ranked = np.full((batch, k), -1, dtype=np.int64)
    for b, c in enumerate(cands):
        answer = [c[j] for j in order[b, : len(c)].tolist()][:k]
        transcripts[b].answer = answer
        row = answer + [int(i) for i in fill[b] if i >= 0][: k - len(answer)]
        ranked[b, : len(row)] = row
        if sample_answer and answer:
            top = agent_fmt.sid_ids[answer[0]].tolist()
            ctx[b] += top
            gen[b] += [True] * len(top)
    return ranked


def agent_ranker(
    recommender,
    retriever,
    titles: Sequence[str],
    cfg: AgentConfig,
    k: int,
    seed: int,
    log: list | None = None,
    agent_fmt: AgentFormat | None = None,
):
    """A ranker for ``genrec.eval.evaluate.evaluate`` in agent mode; ``log`` collects the transcripts.

    The harness passes every item before each target as ``seen`` (``wants_seen``): the agent
    never retrieves them, as in its warm-up trajectories and RL rollouts. ``agent_fmt`` reuses
    the caller's tokenized tags and item names.
    """
    agent_fmt = agent_fmt or AgentFormat(recommender, titles, cfg)
    generator = torch.Generator(device=recommender.device).manual_seed(seed) if cfg.eval_temperature > 0 else None

    def rank(histories: list[np.ndarray], seen: list[np.ndarray]) -> np.ndarray:
        out = run_agent(
            recommender, retriever, agent_fmt, histories, seen, cfg, k, cfg.eval_temperature, False, generator
        )
        if log is not None:
            log.extend(out.transcripts)
        return out.ranked

    rank.wants_seen = True
    return rank
