"""Residual k-means quantisers: plain (faiss) and balanced (size-constrained).

Level t clusters the residuals left by levels 0..t-1 into K centroids; an item's code at
level t is its centroid there, and its residual loses that centroid. Reconstruction is the
sum of the chosen centroids (no learned encoder).

With ``pca_dim`` > 0 the quantiser first projects the embeddings on their top principal
components (centred). In fewer dimensions 3 x 256 centroids make much finer cells, so
near-duplicate items separate more often: on Beauty with MiniLM (384-d), collisions
before resolution fall from 15.5% (no projection) to 5.9% (32), 4.6% (24) and 2.8% (16),
while first-level coherence is unchanged and reconstruction of the full embedding is
coarser (see docs/sid.md). The projection is part of the saved state.

The balanced variant caps every cluster at ceil(N / K) items (GREAM's constrained
k-means): assignments come from an entropic optimal transport with uniform cluster sizes
(Sinkhorn), rounded to hard assignments that respect the cap. Balanced first levels spread
items evenly, which keeps the deeper levels from having to separate large crowds.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from genrec.io import atomic_write_bytes

# Sinkhorn settings for the balanced assignment: costs are standardised first, so the
# entropic regulariser is relative to their spread; smaller is closer to the hard problem.
SINKHORN_EPS = 0.05
SINKHORN_ITERS = 50


def sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared L2 distances (N, D), (K, D) -> (N, K), in float64 so argmins are stable."""
    x = x.astype(np.float64)
    c = centroids.astype(np.float64)
    d = (x * x).sum(1, keepdims=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def sinkhorn_potentials(cost: np.ndarray, iters: int = SINKHORN_ITERS, eps: float = SINKHORN_EPS) -> np.ndarray:
    """Column potentials g (K,) of the entropic transport from N items (mass 1/N each) to K equal columns.

    ``argmin_k cost[i, k] - g[k]`` is then a nearly balanced assignment. Scaling form
    (Cuturi 2013): one exponential, then matrix-vector products. Shifting each row by its
    minimum changes only the row scalings, so the kernel never overflows, and in float64 a
    cost 37 standard deviations above the row's best still does not underflow.
    """
    n, k = cost.shape
    c = cost.astype(np.float64)
    scale = max(float(c.std()), 1e-12)
    kernel = np.exp(-(c - c.min(1, keepdims=True)) / (scale * eps))  # (N, K)
    v = np.ones(k)
    for _ in range(iters):
        u = (1.0 / n) / np.maximum(kernel @ v, 1e-300)  # (N,)
        v = (1.0 / k) / np.maximum(kernel.T @ u, 1e-300)  # (K,)
    return scale * eps * np.log(v)


def capacity_assign(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Hard assignment (N,) with at most ``capacity`` items per column, greedy by rounds.

    Each round every unassigned item proposes to its cheapest open column; a column keeps
    its cheapest proposers up to its free capacity and closes when full. Ties break by
    item index, so the result is deterministic.
    """
    n, k = cost.shape
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} clusters cannot hold {n} items")
    labels = np.full(n, -1, dtype=np.int64)
    free = np.full(k, capacity, dtype=np.int64)
    todo = np.arange(n)
    while len(todo):
        open_cost = np.where(free[None, :] > 0, cost[todo], np.inf)  # (n_todo, K)
        choice = open_cost.argmin(1)
        chosen_cost = open_cost[np.arange(len(todo)), choice]
        order = np.lexsort((todo, chosen_cost, choice))  # by column, then cost, then item
        col = choice[order]
        # Rank of each proposer inside its column's queue.
        starts = np.searchsorted(col, col, side="left")
        rank = np.arange(len(order)) - starts
        accept = rank < free[col]
        labels[todo[order[accept]]] = col[accept]
        free -= np.bincount(col[accept], minlength=k)
        todo = np.sort(todo[order[~accept]])
    return labels


def balanced_assign(cost: np.ndarray) -> np.ndarray:
    """Assignment (N,) of N items to K clusters of at most ceil(N / K) items each, close to the cheapest."""
    n, k = cost.shape
    g = sinkhorn_potentials(cost)
    return capacity_assign(cost - g[None, :], math.ceil(n / k))


def kmeans_faiss(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Lloyd's k-means (faiss), centroids (K, D) float32."""
    import faiss

    km = faiss.Kmeans(
        x.shape[1], k, niter=iters, seed=seed, verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 20
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


def update_centroids(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cluster means; an empty cluster keeps its old centroid."""
    k, d = centroids.shape
    sums = np.zeros((k, d), dtype=np.float64)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k)
    out = centroids.astype(np.float64).copy()
    out[counts > 0] = sums[counts > 0] / counts[counts > 0, None]
    return out.astype(np.float32)


class ResidualKMeans:
    """Residual k-means over ``levels`` levels of ``codebook_size`` centroids (balanced or not)."""

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        iters: int = 25,
        seed: int = 0,
        balanced: bool = False,
        pca_dim: int = 0,
        balanced_iters: int = 5,
    ):
        self.levels = levels
        self.codebook_size = codebook_size
        self.iters = iters
        self.seed = seed
        self.balanced = balanced
        self.pca_dim = pca_dim
        self.balanced_iters = balanced_iters
        self.codebooks: np.ndarray | None = None  # (L, K, P) float32, P = pca_dim or D
        self.mean: np.ndarray | None = None  # (D,) with pca_dim
        self.components: np.ndarray | None = None  # (P, D) orthonormal rows, with pca_dim

    @property
    def name(self) -> str:
        return "rkmeans_balanced" if self.balanced else "rkmeans"

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size] * self.levels

    def _assign(self, residual: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        cost = sq_distances(residual, centroids)
        return balanced_assign(cost) if self.balanced else cost.argmin(1)

    def _fit_pca(self, x: np.ndarray) -> None:
        if self.pca_dim > min(x.shape):
            raise ValueError(
                f"sid.pca_dim={self.pca_dim} exceeds min(items, embedding dimension) = {min(x.shape)}: "
                "lower sid.pca_dim (0 disables the projection)"
            )
        x = x.astype(np.float64)
        self.mean = x.mean(0)
        xc = x - self.mean
        # Eigenvectors of the D x D covariance: the same components as an SVD of x, much cheaper for N >> D.
        eigval, eigvec = np.linalg.eigh(xc.T @ xc)
        vt = eigvec[:, np.argsort(-eigval, kind="stable")[: self.pca_dim]].T  # (P, D)
        # Eigenvector signs are arbitrary: make each component's largest entry positive, so codes do not depend on LAPACK.
        signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
        self.components = vt * signs[:, None]

    def project(self, x: np.ndarray) -> np.ndarray:
        """The space the codebooks live in: (N, D) -> (N, P); the identity without pca_dim."""
        if not self.pca_dim:
            return x.astype(np.float32)
        return ((x.astype(np.float64) - self.mean) @ self.components.T).astype(np.float32)

    def fit(self, x: np.ndarray) -> ResidualKMeans:
        if self.pca_dim:
            self._fit_pca(x)
        residual = self.project(x)
        codebooks = []
        for t in range(self.levels):
            # Different seed per level: each level's initial sample is its own draw.
            centroids = kmeans_faiss(residual, self.codebook_size, self.iters, self.seed + t)
            if self.balanced:
                # Lloyd iterations with the balanced assignment, started from the plain k-means solution
                # (a few suffice: on Beauty 5, 10 and 25 give the same collisions and error, docs/sid.md).
                for _ in range(self.balanced_iters):
                    centroids = update_centroids(residual, self._assign(residual, centroids), centroids)
            codebooks.append(centroids)
            residual = residual - centroids[self._assign(residual, centroids)]
        self.codebooks = np.stack(codebooks)
        return self

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes (N, L) int64; with ``balanced`` the cap applies within the batch ``x``."""
        residual = self.project(x)
        codes = np.empty((len(x), self.levels), dtype=np.int64)
        for t in range(self.levels):
            codes[:, t] = self._assign(residual, self.codebooks[t])
            residual = residual - self.codebooks[t][codes[:, t]]
        return codes

    def level_costs(self, x: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Squared distance of each item's residual after ``prefix`` (N, t) to every centroid of level t: (N, K)."""
        t = prefix.shape[1]
        residual = self.project(x) - self._sum_codewords(prefix)
        return sq_distances(residual, self.codebooks[t])

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        """Sum of the chosen centroids, mapped back to the embedding space: (N, D)."""
        z = self._sum_codewords(codes[:, : self.levels])
        if not self.pca_dim:
            return z
        return (z.astype(np.float64) @ self.components + self.mean).astype(np.float32)

    def _sum_codewords(self, codes: np.ndarray) -> np.ndarray:
        out = np.zeros((len(codes), self.codebooks.shape[2]), dtype=np.float32)
        for t in range(codes.shape[1]):
            out += self.codebooks[t][codes[:, t]]
        return out

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        pca = {"mean": self.mean, "components": self.components} if self.pca_dim else {}
        np.savez(
            buf,
            codebooks=self.codebooks,
            meta=np.array(
                [
                    self.levels,
                    self.codebook_size,
                    self.iters,
                    self.seed,
                    int(self.balanced),
                    self.pca_dim,
                    self.balanced_iters,
                ]
            ),
            **pca,
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> ResidualKMeans:
        with np.load(path) as data:
            levels, size, iters, seed, balanced, pca_dim, balanced_iters = (int(v) for v in data["meta"])
            q = cls(levels, size, iters, seed, bool(balanced), pca_dim, balanced_iters)
            q.codebooks = data["codebooks"].astype(np.float32)
            if pca_dim:
                q.mean, q.components = data["mean"], data["components"]
        return q
