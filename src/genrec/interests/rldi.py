"""Reward labels of mined interests (RLDI): a small binary classifier over interest embeddings.

DeepInterestGR labels each mined interest positive or negative with a lightweight classifier
and uses the labels as reward signals. Here the classifier is a logistic regression (or a
one-hidden-layer MLP) over the phrase's sentence embedding; it is trained on labels from one
of two sources and then labels every interest of the ``interests`` stage:

- ``behaviour`` (offline, no LLM): each user's training part is cut into a mining prefix and
  the last ``holdout`` training items. The user's interests are mined again from the prefix
  alone (same backends, same call cache). An interest is positive when the held-out items
  match it more often than the average training interaction does:

      future(u, x) = |{j in heldout(u): x matches j}| / |heldout(u)|
      base(x)      = sum_j pop(j) 1[x matches j] / sum_j pop(j)       (training interactions)
      label(u, x)  = 1[future(u, x) > base(x)]

  where ``x matches j`` when the embedding of x has cosine >= ``match_threshold`` with one of
  item j's mined interests. Comparing with ``base`` keeps "drama" (which half the catalogue
  matches) from being positive merely for being everywhere. Only training items are read:
  never a valid or test item.
- ``judge``: an LLM labels each item's interests with DeepInterestGR's rubric (1 = specific,
  actionable, grounded in the item's content; 0 = vague, generic or unsupported).

The labelled interests are split by owner (user or item) into a training and a held-out
part; accuracy and AUC on the held-out part are reported, and the classifier refitted on all
labelled interests labels every interest. Its input is the phrase alone, so an interest's
label says what kind of interest it is, not whose it is.

Outputs (the ``rldi`` stage): the interests of the ``interests`` stage with ``p_positive`` and
``label``; ``prefix_user_interests.parquet`` (the prefix mining, labelled, with ``prefix_end``);
``item_interest_emb.npy`` (N, D) and ``user_interest_emb.npy`` (U, D), the weight-averaged unit
embeddings of each item's and each user's positive interests (the user's from the prefix
mining, so that no target among the held-out items shaped its own profile), zero rows where
there are none; ``item_quality.npy`` (N,), DeepInterestGR's q = sum(c_k l_k) / sum(c_k); and
``rldi.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from genrec.data.dataset import Dataset
from genrec.interests.config import InterestsConfig, RLDIConfig
from genrec.interests.merge import EmbedFn
from genrec.interests.schema import MalformedAnswer, extract_json
from genrec.io import write_json
from genrec.text.encode import unit_rows

log = logging.getLogger("genrec")

JUDGE_SYSTEM = (
    "You judge interest descriptors mined for products. You use only the product information you are "
    "given, and you answer with one JSON object and nothing else."
)


# --------------------------------------------------------------------------- the training prefix


def prefix_dataset(dataset: Dataset, holdout: int, user_ids: Sequence[int] | None = None) -> tuple[Dataset, dict]:
    """A Dataset whose training part is each user's training items but the last ``holdout``.

    Returns it and ``{user: held-out items}`` for the users with at least one prefix item (the
    users to mine). The view has no valid or test targets; its users keep their ids.
    """
    train = dataset.train_sequences()
    wanted = range(dataset.num_users) if user_ids is None else user_ids
    heldout = {int(u): train[u][-holdout:] for u in wanted if len(train[u]) > holdout}
    prefixes = [train[u][: len(train[u]) - holdout] if u in heldout else train[u][:0] for u in range(len(train))]
    sequences = pd.DataFrame(
        {
            "user_id": np.arange(dataset.num_users),
            "raw_user": dataset.raw_users,
            "item_ids": prefixes,
            "timestamps": [np.arange(len(p), dtype=np.float64) for p in prefixes],
            "valid_pos": -1,
            "test_pos": -1,
        }
    )
    return Dataset(dataset.items, sequences, dataset.max_history), heldout


# --------------------------------------------------------------------------- behaviour labels


def behaviour_labels(
    pairs: pd.DataFrame,
    heldout: dict,
    item_interests: pd.DataFrame,
    popularity: np.ndarray,
    vectors: dict[str, np.ndarray],
    match_threshold: float,
    chunk: int = 512,
) -> pd.DataFrame:
    """``future``, ``base`` and ``label`` for each (user_id, interest) row of ``pairs``.

    ``heldout[u]``: the user's held-out training items; ``item_interests``: (item_id, interest)
    rows; ``popularity`` (N,): training interactions per item; ``vectors``: phrase -> unit embedding.

    >>> vec = {"lips": np.array([1.0, 0.0]), "hair": np.array([0.0, 1.0])}
    >>> items = pd.DataFrame({"item_id": [0, 1, 2], "interest": ["lips", "lips", "hair"]})
    >>> pairs = pd.DataFrame({"user_id": [0, 0], "interest": ["lips", "hair"]})
    >>> behaviour_labels(pairs, {0: np.array([2, 2])}, items, np.array([3, 1, 1]), vec, 0.8)[
    ...     ["future", "base", "label"]].values.tolist()
    [[0.0, 0.8, False], [1.0, 0.2, True]]
    """
    from scipy import sparse

    num_items = len(popularity)
    phrases_q = sorted(set(item_interests["interest"]))
    q_index = {p: i for i, p in enumerate(phrases_q)}
    # (Q, N): item j has phrase q among its mined interests.
    member = sparse.csr_matrix(
        (
            np.ones(len(item_interests), dtype=np.float32),
            ([q_index[p] for p in item_interests["interest"]], item_interests["item_id"].to_numpy()),
        ),
        shape=(len(phrases_q), num_items),
    )
    emb_q = np.stack([vectors[p] for p in phrases_q]) if phrases_q else np.zeros((0, 1), np.float32)  # (Q, D)
    pop = np.asarray(popularity, dtype=np.float64)
    phrases_p = sorted(set(pairs["interest"]))
    future = np.zeros(len(pairs))
    base = np.zeros(len(pairs))
    rows_of: dict[str, list[int]] = {}
    for r, phrase in enumerate(pairs["interest"]):
        rows_of.setdefault(phrase, []).append(r)
    users = pairs["user_id"].to_numpy()
    for start in range(0, len(phrases_p), chunk):
        block = phrases_p[start : start + chunk]
        emb_p = np.stack([vectors[p] for p in block])  # (c, D)
        close = sparse.csr_matrix((emb_p @ emb_q.T >= match_threshold).astype(np.float32))  # (c, Q)
        matches = (close @ member).toarray() > 0  # (c, N): phrase matches item
        block_base = matches @ pop / max(pop.sum(), 1.0)  # (c,)
        for k, phrase in enumerate(block):
            for r in rows_of[phrase]:
                future[r] = matches[k, heldout[int(users[r])]].mean()
                base[r] = block_base[k]
    out = pairs.copy()
    out["future"], out["base"], out["label"] = future, base, future > base
    return out


# --------------------------------------------------------------------------- judge labels


def judge_messages(item: dict, phrases: Sequence[str], max_chars: int) -> list[dict]:
    """DeepInterestGR's judge rubric over one item's descriptors, answered as ``{"labels": [0 or 1, ...]}``."""
    from genrec.interests.prompts import describe_item

    listed = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(phrases))
    user = (
        f"A product:\n{describe_item(item, max_chars)}\n\nInterest descriptors mined for it:\n{listed}\n\n"
        "Label each descriptor 1 if it is specific, actionable and grounded in the product's content, or 0 if it "
        "is vague, generic or unsupported by it. Answer with exactly this JSON object and nothing else:\n"
        f'{{"labels": [<0 or 1 for each of the {len(phrases)} descriptors, in order>]}}'
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judge(text: str, n: int) -> list[int]:
    """The ``n`` labels of a judge answer, strictly (a list of n values, each 0 or 1)."""
    obj = extract_json(text)
    labels = obj.get("labels")
    if not isinstance(labels, list) or len(labels) != n:
        raise MalformedAnswer("schema", f'"labels" must be a list of exactly {n} values 0 or 1, got {labels!r}')
    if any(isinstance(v, bool) or v not in (0, 1) for v in labels):
        raise MalformedAnswer("schema", f'every entry of "labels" must be 0 or 1, got {labels!r}')
    return [int(v) for v in labels]


def judge_labels(
    items: pd.DataFrame, item_interests: pd.DataFrame, backend, cache, icfg: InterestsConfig, item_ids
) -> tuple[pd.DataFrame, list[dict]]:
    """(item_id, interest, label) rows for ``item_ids`` from the judge, and the failures (never fatal)."""
    from genrec.interests.miner import _run_questions, ask

    records = items.to_dict("records")
    phrases = item_interests.groupby("item_id")["interest"].apply(list).to_dict()
    ids = [int(i) for i in item_ids if int(i) in phrases]

    def answer(b, item_id: int) -> list[int]:
        messages = judge_messages(records[item_id], phrases[item_id], icfg.max_field_chars)
        parse = functools.partial(parse_judge, n=len(phrases[item_id]))
        return ask(b, messages, cache, parse, icfg.malformed_retries)

    got, failures = _run_questions(ids, [backend], answer, "judge", progress=False)
    rows = [
        {"item_id": i, "interest": p, "label": bool(lab)}
        for i, per in got.items()
        for p, lab in zip(phrases[i], per[backend.name])
    ]
    return pd.DataFrame(rows, columns=["item_id", "interest", "label"]), failures


# --------------------------------------------------------------------------- the classifier


def make_classifier(cfg: RLDIConfig, seed: int):
    """A scikit-learn binary classifier over (D,) interest embeddings."""
    if cfg.classifier == "logreg":
        from sklearn.linear_model import LogisticRegression

        # Balanced class weights, so that p = 0.5 separates the classes even when positives are rare.
        return LogisticRegression(C=1.0 / cfg.l2, class_weight="balanced", max_iter=2000)
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(
        hidden_layer_sizes=(cfg.hidden,), alpha=cfg.l2, max_iter=500, early_stopping=False, random_state=seed
    )


def fit_and_measure(
    x: np.ndarray, y: np.ndarray, owners: np.ndarray, cfg: RLDIConfig, seed: int
) -> tuple[object, dict]:
    """Held-out accuracy and AUC (split by owner), then the classifier refitted on everything.

    x (M, D) embeddings, y (M,) bool labels, owners (M,) the user or item each interest belongs to.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=bool)
    unique = np.unique(owners)
    rng = np.random.default_rng(seed)
    test_owners = rng.choice(unique, size=max(1, int(round(cfg.test_fraction * len(unique)))), replace=False)
    test = np.isin(owners, test_owners)
    metrics: dict = {
        "labelled": int(len(y)),
        "positive_share": round(float(y.mean()), 4) if len(y) else None,
        "train": int((~test).sum()),
        "heldout": int(test.sum()),
        "heldout_owners": int(len(test_owners)),
    }
    if len(np.unique(y[~test])) < 2:
        raise ValueError(
            f"rldi: the training labels are all {bool(y[0]) if len(y) else '-'}: no classifier can be trained. "
            "More users (or a larger rldi.holdout) give both classes"
        )
    clf = make_classifier(cfg, seed).fit(x[~test], y[~test])
    p = clf.predict_proba(x[test])[:, 1]
    pred = p >= cfg.threshold
    metrics["heldout_accuracy"] = round(float((pred == y[test]).mean()), 4)
    # The accuracy of always answering the held-out part's majority class, for comparison.
    metrics["heldout_majority_accuracy"] = round(float(max(y[test].mean(), 1 - y[test].mean())), 4)
    metrics["heldout_auc"] = round(float(roc_auc_score(y[test], p)), 4) if len(np.unique(y[test])) == 2 else None
    return make_classifier(cfg, seed).fit(x, y), metrics


def profiles(frame: pd.DataFrame, id_column: str, num: int, vectors: dict[str, np.ndarray]) -> np.ndarray:
    """(num, D): per id, the weight-averaged unit embedding of its positive interests; 0 rows where none."""
    dim = len(next(iter(vectors.values()))) if vectors else 1
    out = np.zeros((num, dim), dtype=np.float32)
    pos = frame[frame["label"]]
    for i, group in pos.groupby(id_column):
        emb = np.stack([vectors[p] for p in group["interest"]])  # (k, D)
        w = np.maximum(group["weight"].to_numpy(np.float32), 1e-6)
        out[int(i)] = w @ emb
    return unit_rows(out)  # zero rows stay zero


def item_quality(frame: pd.DataFrame, num_items: int) -> np.ndarray:
    """DeepInterestGR's q = sum(c_k l_k) / sum(c_k) over each item's interests; 0 for an item without any.

    >>> f = pd.DataFrame({"item_id": [0, 0, 1], "confidence": [0.75, 0.25, 0.5], "label": [True, False, False]})
    >>> item_quality(f, 3).tolist()
    [0.75, 0.0, 0.0]
    """
    q = np.zeros(num_items)
    c = frame["confidence"].to_numpy(np.float64)
    num = np.bincount(frame["item_id"], weights=c * frame["label"].to_numpy(bool), minlength=num_items)
    den = np.bincount(frame["item_id"], weights=c, minlength=num_items)
    np.divide(num, den, out=q, where=den > 0)
    return q


# --------------------------------------------------------------------------- the stage


def label_interests(
    dataset: Dataset,
    item_interests: pd.DataFrame,
    user_interests: pd.DataFrame | None,
    icfg: InterestsConfig,
    cfg: RLDIConfig,
    out_dir: str | Path,
    cache_path: str | Path,
    embed_fn: EmbedFn,
    seed: int,
    reviews=None,
    sleep=time.sleep,
) -> dict:
    """Everything the ``rldi`` stage does (see the module docstring); returns the summary of ``rldi.json``."""
    from genrec.interests.backends import make_backend
    from genrec.interests.cache import CallCache
    from genrec.interests.miner import mine_user_interests

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train = dataset.train_sequences()
    user_ids = range(min(cfg.max_owners, dataset.num_users) if cfg.max_owners else dataset.num_users)
    view, heldout = prefix_dataset(dataset, cfg.holdout, user_ids)
    failures: list[dict] = []
    with CallCache(cache_path) as cache:
        backends = [make_backend(b, icfg, dataset.items, sleep) for b in icfg.backends]
        mined = mine_user_interests(view, backends, cache, icfg, embed_fn, reviews, None, sorted(heldout), False)
        prefix = mined.frame
        failures += mined.failures
        if cfg.labels == "judge":
            judge = make_backend(cfg.judge, icfg, dataset.items, sleep)
            n = min(cfg.max_owners, dataset.num_items) if cfg.max_owners else dataset.num_items
            labelled, failed = judge_labels(dataset.items, item_interests, judge, cache, icfg, range(n))
            failures += failed
        calls = cache.stats()
    prefix["prefix_end"] = [len(train[u]) - cfg.holdout for u in prefix["user_id"]]

    frames = [item_interests, prefix] + ([user_interests] if user_interests is not None else [])
    phrases = sorted({p for f in frames for p in f["interest"]})
    vectors = dict(zip(phrases, unit_rows(embed_fn(phrases)))) if phrases else {}
    if cfg.labels == "behaviour":
        labelled = behaviour_labels(
            prefix[["user_id", "interest"]],
            heldout,
            item_interests,
            dataset.item_popularity(),
            vectors,
            cfg.match_threshold,
        )
        owners = labelled["user_id"].to_numpy()
        prefix["behaviour_label"] = labelled["label"].to_numpy()
    else:
        owners = labelled["item_id"].to_numpy()
    if len(labelled) == 0:
        raise ValueError("rldi: no interest could be labelled (no user has more than rldi.holdout training items?)")
    x = np.stack([vectors[p] for p in labelled["interest"]])  # (M, D)
    clf, metrics = fit_and_measure(x, labelled["label"].to_numpy(bool), owners, cfg, seed)

    def apply(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        p = clf.predict_proba(np.stack([vectors[q] for q in frame["interest"]]))[:, 1] if len(frame) else []
        frame["p_positive"] = np.round(np.asarray(p, dtype=np.float64), 4)
        frame["label"] = frame["p_positive"] >= cfg.threshold if cfg.curate else True
        return frame

    item_out, prefix_out = apply(item_interests), apply(prefix)
    item_out.to_parquet(out_dir / "item_interests.parquet", index=False)
    prefix_out.to_parquet(out_dir / "prefix_user_interests.parquet", index=False)
    summary: dict = {"labels": cfg.labels, "classifier": cfg.classifier, "curate": cfg.curate, **metrics}
    summary["item_positive_share"] = round(float(item_out["label"].mean()), 4) if len(item_out) else None
    summary["prefix_user_positive_share"] = round(float(prefix_out["label"].mean()), 4) if len(prefix_out) else None
    if user_interests is not None:
        user_out = apply(user_interests)
        user_out.to_parquet(out_dir / "user_interests.parquet", index=False)
        summary["user_positive_share"] = round(float(user_out["label"].mean()), 4) if len(user_out) else None
    np.save(out_dir / "item_interest_emb.npy", profiles(item_out, "item_id", dataset.num_items, vectors))
    np.save(out_dir / "user_interest_emb.npy", profiles(prefix_out, "user_id", dataset.num_users, vectors))
    np.save(out_dir / "item_quality.npy", item_quality(item_out, dataset.num_items))
    summary.update(
        users_mined_on_prefix=len(heldout),
        calls=calls["misses"],
        cache_hits=calls["hits"],
        failures=len(failures),
        seconds=round(time.time() - started, 2),
    )
    write_json(out_dir / "failures.json", failures)
    write_json(out_dir / "rldi.json", summary)
    log.info("rldi: %s", json.dumps({k: summary[k] for k in ("labelled", "heldout_accuracy", "heldout_auc")}))
    return summary


def run(ctx) -> dict:
    """The ``rldi`` stage: reads ``prepare`` and ``interests``, writes into ``ctx.out``."""
    from genrec.interests.merge import load_embedder

    icfg: InterestsConfig = ctx.cfg.interests
    prepared, mined = ctx.input("prepare"), ctx.input("interests")
    dataset = Dataset.load(prepared, ctx.cfg.data.max_history)
    if not (mined / "item_interests.parquet").is_file():
        raise FileNotFoundError("rldi needs item interests: include 'items' in interests.mine")
    items = pd.read_parquet(mined / "item_interests.parquet")
    users = pd.read_parquet(mined / "user_interests.parquet") if (mined / "user_interests.parquet").is_file() else None
    import pyarrow.parquet as pq

    reviews = None
    if "reviews" in pq.read_schema(prepared / "sequences.parquet").names:
        reviews = [list(r) for r in pd.read_parquet(prepared / "sequences.parquet", columns=["reviews"])["reviews"]]
    cache_path = icfg.cache_path or Path(ctx.run_dir).resolve().parent / ".cache" / "interests" / "calls.sqlite"
    embed_fn = load_embedder(icfg.embedder)
    return label_interests(
        dataset, items, users, icfg, ctx.cfg.rldi, ctx.out, cache_path, embed_fn, ctx.seed, reviews=reviews
    )
