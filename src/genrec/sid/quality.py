"""How good a set of Semantic IDs is: the numbers written to ``quality.json``.

- collision rate before resolution: 1 - distinct SIDs / items;
- per level: utilisation (share of the codebook used) and perplexity exp(H), H the entropy
  of the code frequencies (K for perfectly even use, 1 when one code takes everything);
- reconstruction error of the embeddings from the codes: mean ||x - x_hat||^2, and relative
  to the variance, sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (0 perfect, 1 no better than the mean);
- semantic coherence: among item pairs that share their first-level code, the share that
  also share their top-level category, against the same share over all item pairs.
"""

from __future__ import annotations

import numpy as np


def code_usage(codes: np.ndarray, sizes: list[int]) -> list[dict]:
    """Per level: codes used, utilisation = used / size, perplexity = exp(entropy of the code frequencies)."""
    out = []
    for t, size in enumerate(sizes):
        counts = np.bincount(codes[:, t], minlength=size)
        p = counts[counts > 0] / counts.sum()
        out.append(
            {
                "level": t,
                "size": int(size),
                "used": int((counts > 0).sum()),
                "utilisation": float((counts > 0).mean()),
                "perplexity": float(np.exp(-(p * np.log(p)).sum())),
            }
        )
    return out


def category_labels(categories: list[str]) -> tuple[list[str | None], int]:
    """Each item's top-level category and which element of the path it is.

    The path is split on commas; the first element that is not the same for every item is
    used (Beauty's paths all start with "Beauty", so its second element is). Items whose
    path is too short get None.
    """
    paths = [[p.strip() for p in str(c or "").split(",") if p.strip()] for c in categories]
    depth = max((len(p) for p in paths), default=0)
    for pos in range(depth):
        values = {p[pos] for p in paths if len(p) > pos}
        if len(values) > 1:
            return [p[pos] if len(p) > pos else None for p in paths], pos
    return [p[0] if p else None for p in paths], 0


def _pairs(counts: np.ndarray) -> float:
    return float((counts * (counts - 1) / 2).sum())


def coherence(first_codes: np.ndarray, labels: list[str | None]) -> dict:
    """Share of same-first-code item pairs with the same category, vs all pairs (exact counts, no sampling)."""
    keep = np.array([lab is not None for lab in labels])
    if keep.sum() < 2:
        return {"items_with_category": int(keep.sum())}
    _, cat = np.unique(np.array([lab for lab in labels if lab is not None]), return_inverse=True)
    code = first_codes[keep]
    # Pair counts from the (code, category) contingency table.
    joint = np.unique(np.stack([code, cat], 1), axis=0, return_counts=True)[1]
    same_code_pairs = _pairs(np.unique(code, return_counts=True)[1])
    same_cat_pairs = _pairs(np.unique(cat, return_counts=True)[1])
    all_pairs = _pairs(np.array([len(code)]))
    within = _pairs(joint) / same_code_pairs if same_code_pairs else float("nan")
    random = same_cat_pairs / all_pairs
    return {
        "items_with_category": int(keep.sum()),
        "num_categories": int(cat.max() + 1),
        "same_category_same_code": within,
        "same_category_random": random,
        "lift": within / random if random else float("nan"),
    }


def quality_report(
    x: np.ndarray,
    codes_before: np.ndarray,
    codes: np.ndarray,
    sizes: list[int],
    quantizer,
    resolution: dict,
    categories: list[str] | None = None,
) -> dict:
    """All quality numbers of one SID assignment (``codes`` after resolution, ``codes_before`` straight from the quantiser)."""
    x_hat = quantizer.reconstruct(codes)
    sq = ((x - x_hat) ** 2).sum(1)
    report = {
        "quantizer": quantizer.name,
        "n_items": int(len(codes)),
        "levels": int(codes.shape[1]),
        "codebook_sizes": [int(s) for s in sizes],
        "collision_rate": resolution["before"]["collision_rate"],
        "resolution": resolution,
        "unique_after": bool(len(np.unique(codes, axis=0)) == len(codes)),
        "usage_before": code_usage(codes_before, list(quantizer.codebook_sizes)),
        "usage": code_usage(codes, sizes),
        "recon_mse": float(sq.mean()),
        "recon_rel": float(sq.sum() / ((x - x.mean(0)) ** 2).sum()),
    }
    if categories is not None:
        labels, pos = category_labels(categories)
        report["coherence"] = {"category_element": pos, **coherence(codes[:, 0], labels)}
    return report


def format_quality(q: dict) -> str:
    """The printed table of a quality report."""
    lines = [
        f"Semantic IDs: {q['quantizer']}, {q['n_items']:,} items, codebooks {q['codebook_sizes']}",
        f"  collision rate before resolution  {q['collision_rate']:.4f}  "
        f"(max group {q['resolution']['before']['max_group']}, resolved by {q['resolution']['strategy']}; "
        f"unique after: {q['unique_after']})",
        f"  reconstruction  mse {q['recon_mse']:.4f}  relative {q['recon_rel']:.4f}",
        "  level  size  used  utilisation  perplexity",
    ]
    for u in q["usage"]:
        lines.append(
            f"  {u['level']:>5}  {u['size']:>4}  {u['used']:>4}  {u['utilisation']:>11.3f}  {u['perplexity']:>10.1f}"
        )
    c = q.get("coherence")
    if c and "lift" in c:
        lines.append(
            f"  coherence: same category | same first code {c['same_category_same_code']:.3f} vs random pairs "
            f"{c['same_category_random']:.3f} (lift {c['lift']:.2f}; category = path element {c['category_element']})"
        )
    return "\n".join(lines)
