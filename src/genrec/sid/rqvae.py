"""RQ-VAE (Zeghidour et al. 2021; TIGER, Rajput et al. 2023) for item embeddings.

An MLP encoder maps an embedding x (D) to a latent z (d); L residual vector-quantisation
levels of K codewords each quantise z: r_0 = z, c_t = argmin_k ||r_t - e_{t,k}||,
r_{t+1} = r_t - e_{t,c_t}; an MLP decoder rebuilds x from z_q = sum_t e_{t,c_t}. Loss:

    ||x - dec(z + sg(z_q - z))||^2 + sum_t ||sg(r_t) - e_{t,c_t}||^2 + beta ||r_t - sg(e_{t,c_t})||^2

(straight-through gradient to the encoder; the codebook term moves codewords, the
commitment term keeps the encoder close to them). Each level's codebook starts as the
k-means centroids of that level's residuals under the initial encoder, and after every
epoch a codeword no item chose during the epoch is re-seeded at a random residual of its
level from the last batch, so no code stays dead.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genrec.io import atomic_write_bytes
from genrec.sid.kmeans import kmeans_faiss


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAEModel(nn.Module):
    def __init__(self, in_dim: int, hidden: list[int], latent: int, levels: int, codebook_size: int):
        super().__init__()
        self.encoder = mlp([in_dim, *hidden, latent])
        self.decoder = mlp([latent, *reversed(hidden), in_dim])
        self.codebooks = nn.Parameter(torch.zeros(levels, codebook_size, latent))  # (L, K, d)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, d) -> codes (B, L), z_q (B, d) and residuals (L, B, d) seen by each level."""
        residual = z
        codes, residuals = [], []
        z_q = torch.zeros_like(z)
        for t in range(self.codebooks.shape[0]):
            book = self.codebooks[t]  # (K, d)
            residuals.append(residual)
            code = torch.cdist(residual.detach(), book.detach()).argmin(1)  # (B,)
            chosen = book[code]  # (B, d)
            codes.append(code)
            z_q = z_q + chosen
            residual = residual - chosen
        return torch.stack(codes, 1), z_q, torch.stack(residuals)


class RQVAE:
    """Trainable residual quantiser with the common quantiser interface (fit/encode/level_costs/reconstruct/save)."""

    name = "rqvae"

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        hidden: list[int] | None = None,
        latent: int = 32,
        epochs: int = 200,
        lr: float = 1e-3,
        beta: float = 0.25,
        batch_size: int = 1024,
        kmeans_iters: int = 25,
        seed: int = 0,
        device: str = "",
    ):
        self.levels = levels
        self.codebook_size = codebook_size
        self.hidden = list(hidden or [512, 256, 128])
        self.latent = latent
        self.epochs = epochs
        self.lr = lr
        self.beta = beta
        self.batch_size = batch_size
        self.kmeans_iters = kmeans_iters
        self.seed = seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model: RQVAEModel | None = None
        self.in_dim = 0
        self.history: list[dict] = []

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size] * self.levels

    def _settings(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "levels",
                "codebook_size",
                "hidden",
                "latent",
                "epochs",
                "lr",
                "beta",
                "batch_size",
                "kmeans_iters",
                "seed",
            )
        }

    @torch.no_grad()
    def _init_codebooks(self, x: torch.Tensor) -> None:
        residual = self.model.encoder(x).cpu().numpy()
        for t in range(self.levels):
            centroids = kmeans_faiss(residual, self.codebook_size, self.kmeans_iters, self.seed + t)
            self.model.codebooks[t] = torch.from_numpy(centroids)
            code = torch.cdist(torch.from_numpy(residual), torch.from_numpy(centroids)).argmin(1).numpy()
            residual = residual - centroids[code]

    def fit(self, x: np.ndarray) -> RQVAE:
        gen = torch.Generator().manual_seed(self.seed)
        self.in_dim = x.shape[1]
        # The Linear layers draw from the global generator: seed it here without disturbing the caller's stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = RQVAEModel(self.in_dim, self.hidden, self.latent, self.levels, self.codebook_size)
        data = torch.from_numpy(np.asarray(x, dtype=np.float32))
        self._init_codebooks(data)
        self.model.to(self.device)
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        n = len(data)
        for epoch in range(self.epochs):
            used = torch.zeros(self.levels, self.codebook_size, dtype=torch.bool, device=self.device)
            totals = {"loss": 0.0, "recon": 0.0, "commit": 0.0}
            for idx in torch.randperm(n, generator=gen).split(self.batch_size):
                xb = data[idx].to(self.device)
                z = self.model.encoder(xb)
                codes, z_q, residuals = self.model.quantize(z)
                recon = self.model.decoder(z + (z_q - z).detach())  # straight-through
                chosen = self.model.codebooks[
                    torch.arange(self.levels, device=self.device)[:, None], codes.T
                ]  # (L, B, d)
                codebook_loss = ((residuals.detach() - chosen) ** 2).sum(-1).mean()
                commit_loss = ((residuals - chosen.detach()) ** 2).sum(-1).mean()
                recon_loss = ((recon - xb) ** 2).sum(-1).mean()
                loss = recon_loss + codebook_loss + self.beta * commit_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                used[torch.arange(self.levels, device=self.device)[:, None], codes.T] = True
                for key, value in (("loss", loss), ("recon", recon_loss), ("commit", commit_loss)):
                    totals[key] += float(value.detach()) * len(idx) / n
            dead = int((~used).sum())
            if dead and epoch < self.epochs - 1:
                self._reseed(~used, residuals.detach(), gen)
            if epoch % 10 == 0 or epoch == self.epochs - 1:
                self.history.append({"epoch": epoch, **{k: round(v, 6) for k, v in totals.items()}, "dead": dead})
        self.model.eval()
        return self

    @torch.no_grad()
    def _reseed(self, dead: torch.Tensor, residuals: torch.Tensor, gen: torch.Generator) -> None:
        """Move dead codewords (L, K) bool onto random residuals (L, B, d) of their level."""
        for t in range(self.levels):
            slots = dead[t].nonzero().flatten()
            if len(slots):
                pick = torch.randint(0, residuals.shape[1], (len(slots),), generator=gen).to(self.device)
                self.model.codebooks[t, slots] = residuals[t, pick]

    @torch.no_grad()
    def _latent(self, x: np.ndarray) -> torch.Tensor:
        return self.model.encoder(torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self.device))

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> np.ndarray:
        codes, _, _ = self.model.quantize(self._latent(x))
        return codes.cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def level_costs(self, x: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Squared distance of each item's latent residual after ``prefix`` (N, t) to every codeword of level t: (N, K)."""
        t = prefix.shape[1]
        residual = self._latent(x) - self._sum_codewords(prefix)
        return (torch.cdist(residual, self.model.codebooks[t]) ** 2).cpu().double().numpy()

    @torch.no_grad()
    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        return self.model.decoder(self._sum_codewords(codes[:, : self.levels])).cpu().numpy()

    def _sum_codewords(self, codes: np.ndarray) -> torch.Tensor:
        c = torch.from_numpy(np.asarray(codes, dtype=np.int64)).to(self.device)
        out = torch.zeros(len(c), self.latent, device=self.device)
        for t in range(c.shape[1]):
            out = out + self.model.codebooks[t][c[:, t]]
        return out

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        state = {k: v.cpu() for k, v in self.model.state_dict().items()}
        torch.save({"settings": self._settings(), "in_dim": self.in_dim, "state": state, "history": self.history}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, device: str = "") -> RQVAE:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        q = cls(**blob["settings"], device=device)
        q.in_dim = blob["in_dim"]
        q.history = blob["history"]
        q.model = RQVAEModel(q.in_dim, q.hidden, q.latent, q.levels, q.codebook_size)
        q.model.load_state_dict(blob["state"])
        q.model.to(q.device).eval()
        return q
