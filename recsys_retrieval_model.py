"""The Phoenix two-tower retrieval model.

User tower: the ranking model's user and history tokens through a causal transformer, averaged
over valid positions and L2-normalised. Candidate tower: an MLP over a post's hash embeddings,
L2-normalised. Retrieval: dot product of users with a corpus of candidate vectors, top-K, by
`search.top_k_search` (re-exported here with `INF`, the score of masked corpus rows).

Shapes: B batch, S history length, C candidates, D `emb_size`, N corpus size, K top-K.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from grok import TransformerConfig, matmul_2d
from recsys_model import (
    HashConfig,
    ModelConfigDefaults,
    ModelModule,
    RecsysBatch,
    RecsysEmbeddings,
    build_context_inputs,
    validate_inputs,
)
from search import INF, top_k_search, validate_corpus

__all__ = [
    "EPS",
    "INF",
    "CandidateTower",
    "PhoenixRetrievalModel",
    "PhoenixRetrievalModelConfig",
    "RetrievalOutput",
    "top_k_search",
]

EPS = 1e-12  # floor of a squared norm before the square root


class RetrievalOutput(NamedTuple):
    user_representation: jax.Array  # [B, D]
    top_k_indices: jax.Array  # [B, K]
    top_k_scores: jax.Array  # [B, K]


def l2_normalize(x: jax.Array, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """x / sqrt(max(sum(x^2), EPS)) over the last axis, in `dtype`; also returns the norm.
    In a dtype where EPS rounds to 0 (float16) the floor is its smallest normal number, so that
    a zero vector (padding) stays zero instead of becoming 0 / 0."""
    x = x.astype(dtype)
    floor = max(EPS, float(jnp.finfo(x.dtype).tiny))  # EPS itself in float32 and bfloat16
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), floor))
    return x / norm, norm


class CandidateTower(hk.Module):
    """A post's hash embeddings [..., Hi + Ha, D] to a unit vector [..., D].

    With `enable_linear_proj` (the default, and the only tower of the first release) an MLP of
    the flattened embeddings; without it, the second release's parameter-free tower: the mean
    over the hash axis (padded hash rows included), normalised, both in the input dtype.
    """

    def __init__(self, emb_size: int, enable_linear_proj: bool = True, name: str | None = None):
        super().__init__(name=name)
        self.emb_size = emb_size
        self.enable_linear_proj = enable_linear_proj

    def __call__(self, post_author_embedding: jax.Array) -> jax.Array:
        x = post_author_embedding  # [B, C, Hi + Ha, D] or [B, Hi + Ha, D]
        if x.ndim not in (3, 4):
            raise ValueError(
                f"CandidateTower expects [B, C, H, D] or [B, H, D] embeddings, got shape {x.shape}"
            )
        if not self.enable_linear_proj:
            return l2_normalize(jnp.mean(x, axis=-2), x.dtype)[0]
        flat = x.reshape((*x.shape[:-2], x.shape[-2] * x.shape[-1])).astype(jnp.float32)
        init = hk.initializers.VarianceScaling(1.0, "fan_out", "truncated_normal")
        w1 = hk.get_parameter(
            "candidate_tower_projection_1",
            [flat.shape[-1], 2 * self.emb_size],
            jnp.float32,
            init=init,
        )
        w2 = hk.get_parameter(
            "candidate_tower_projection_2", [2 * self.emb_size, self.emb_size], jnp.float32, init
        )
        out = matmul_2d(jax.nn.silu(matmul_2d(flat, w1)), w2)
        return l2_normalize(out)[0].astype(x.dtype)


@dataclasses.dataclass
class PhoenixRetrievalModelConfig(ModelConfigDefaults):
    """Configuration of the two-tower retrieval model. `emb_size` defaults to the model width;
    `enable_linear_proj=False` gives the second release's parameter-free candidate tower."""

    model: TransformerConfig
    emb_size: int | None = None
    history_seq_len: int = 128
    candidate_seq_len: int = 32
    name: str | None = None
    fprop_dtype: Any = jnp.bfloat16
    hash_config: HashConfig | None = None
    product_surface_vocab_size: int = 16
    enable_linear_proj: bool = True  # the second release's option: False = mean tower

    def make(self) -> PhoenixRetrievalModel:
        return PhoenixRetrievalModel(
            model=self.model.make(), config=self, fprop_dtype=self.fprop_dtype
        )


class PhoenixRetrievalModel(ModelModule):
    """Two-tower retrieval: user tower (transformer), candidate tower (MLP), top-K search."""

    config: PhoenixRetrievalModelConfig

    def _validate(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> None:
        validate_inputs(batch, embeddings, self.config)

    def build_user_representation(
        self, batch: RecsysBatch, embeddings: RecsysEmbeddings
    ) -> tuple[jax.Array, jax.Array]:
        """Unit user vectors [B, D] in fprop dtype, and their norms before normalising [B, 1]."""
        self._validate(batch, embeddings)
        tokens, mask = build_context_inputs(batch, embeddings, self.config, self.fprop_dtype)
        h = self.model(tokens, mask).embeddings.astype(jnp.float32)  # causal, [B, 1 + S, D]
        weights = mask[..., None].astype(jnp.float32)
        mean = jnp.sum(h * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        user, norm = l2_normalize(mean)
        return user.astype(self.fprop_dtype), norm

    def build_candidate_representation(
        self, batch: RecsysBatch, embeddings: RecsysEmbeddings
    ) -> tuple[jax.Array, jax.Array]:
        """Unit candidate vectors [B, C, D] and the candidate mask [B, C]."""
        self._validate(batch, embeddings)
        post_author = jnp.concatenate(
            [embeddings.candidate_post_embeddings, embeddings.candidate_author_embeddings],
            axis=2,
        )
        tower = CandidateTower(self.config.emb_size, self.config.enable_linear_proj)
        candidates = tower(post_author)
        return candidates, batch.candidate_post_hashes[:, :, 0] != 0

    def __call__(
        self,
        batch: RecsysBatch,
        embeddings: RecsysEmbeddings,
        corpus_embeddings: jax.Array,  # [N, D]
        top_k: int,
        corpus_mask: jax.Array | None = None,  # [N] bool
    ) -> RetrievalOutput:
        user, _ = self.build_user_representation(batch, embeddings)
        validate_corpus(corpus_embeddings, self.config.emb_size, top_k, corpus_mask)
        scores, indices = top_k_search(user, corpus_embeddings, top_k, corpus_mask)
        return RetrievalOutput(user, indices, scores)
