"""The Phoenix ranking model: a Grok transformer over [user, history, candidates].

Embeddings are looked up outside the model (by hash, from tables the caller owns) and passed in
as `RecsysEmbeddings`; the model reduces the hashes of each entity to one token, runs the
transformer with candidate isolation and maps each candidate's output to `num_actions` logits.

Shapes: B batch, S history length, C candidates, D `emb_size`, A `num_actions`,
Hu/Hi/Ha user/item/author hashes, V product-surface vocabulary, P = 1 + S context length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok import KVCache, TransformerConfig, layer_norm, shared_name

# Number of engagement actions the published model predicts (see `runners.ACTIONS`).
DEFAULT_NUM_ACTIONS = 19


@dataclasses.dataclass
class HashConfig:
    """How many hash functions map each entity id to embedding rows."""

    num_user_hashes: int = 2
    num_item_hashes: int = 2
    num_author_hashes: int = 2


class RecsysBatch(NamedTuple):
    """Hashes, actions and product surfaces of one batch. Hash 0 means padding."""

    user_hashes: jax.typing.ArrayLike  # [B, Hu]
    history_post_hashes: jax.typing.ArrayLike  # [B, S, Hi]
    history_author_hashes: jax.typing.ArrayLike  # [B, S, Ha]
    history_actions: jax.typing.ArrayLike  # [B, S, A] multi-hot
    history_product_surface: jax.typing.ArrayLike  # [B, S] int in [0, V)
    candidate_post_hashes: jax.typing.ArrayLike  # [B, C, Hi]
    candidate_author_hashes: jax.typing.ArrayLike  # [B, C, Ha]
    candidate_product_surface: jax.typing.ArrayLike  # [B, C] int in [0, V)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RecsysEmbeddings:
    """Embeddings looked up for the hashes of a `RecsysBatch`.

    A dataclass like the published one, but registered as a pytree so that it can be passed
    through `jax.jit`, `jax.vmap` and `jax.grad`.
    """

    user_embeddings: jax.typing.ArrayLike  # [B, Hu, D]
    history_post_embeddings: jax.typing.ArrayLike  # [B, S, Hi, D]
    candidate_post_embeddings: jax.typing.ArrayLike  # [B, C, Hi, D]
    history_author_embeddings: jax.typing.ArrayLike  # [B, S, Ha, D]
    candidate_author_embeddings: jax.typing.ArrayLike  # [B, C, Ha, D]


class RecsysModelOutput(NamedTuple):
    logits: jax.Array  # [B, C, A]


# Symbolic shape of every input field, checked by `validate_inputs`.
_BATCH_DIMS = {
    "user_hashes": ("B", "Hu"),
    "history_post_hashes": ("B", "S", "Hi"),
    "history_author_hashes": ("B", "S", "Ha"),
    "history_actions": ("B", "S", "A"),
    "history_product_surface": ("B", "S"),
    "candidate_post_hashes": ("B", "C", "Hi"),
    "candidate_author_hashes": ("B", "C", "Ha"),
    "candidate_product_surface": ("B", "C"),
}
_EMBEDDING_DIMS = {
    "user_embeddings": ("B", "Hu", "D"),
    "history_post_embeddings": ("B", "S", "Hi", "D"),
    "candidate_post_embeddings": ("B", "C", "Hi", "D"),
    "history_author_embeddings": ("B", "S", "Ha", "D"),
    "candidate_author_embeddings": ("B", "C", "Ha", "D"),
}
_INTEGER_FIELDS = tuple(name for name in _BATCH_DIMS if name != "history_actions")


def _concrete(x) -> np.ndarray | None:
    """The value of `x` if it is known now (not a tracer inside jit), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None  # partly held by other hosts: only its shape can be checked here
    return np.asarray(x)


def validate_inputs(
    batch: RecsysBatch,
    embeddings: RecsysEmbeddings,
    config: Any,
    num_actions: int | None = None,
) -> dict[str, int]:
    """Checks every field's rank, dtype and shape, and id ranges when values are concrete.

    `config` (a ranking or retrieval config) gives D, the hash counts and the product-surface
    vocabulary; `num_actions`, when given, the width of `history_actions`. Raises ValueError
    naming the field, what it got and what was expected. Returns the sizes it bound (B, S, C...).
    """
    hash_config = config.hash_config
    product_surface_vocab_size = config.product_surface_vocab_size
    if not isinstance(batch, RecsysBatch):
        raise ValueError(f"batch must be a RecsysBatch, got {type(batch).__name__}")
    if not isinstance(embeddings, RecsysEmbeddings):
        raise ValueError(f"embeddings must be a RecsysEmbeddings, got {type(embeddings).__name__}")
    sizes = {
        "Hu": hash_config.num_user_hashes,
        "Hi": hash_config.num_item_hashes,
        "Ha": hash_config.num_author_hashes,
        "D": config.emb_size,
    }
    if num_actions is not None:
        sizes["A"] = num_actions
    bound_by = {}  # the field that fixed each size read from the inputs (B, S, C)
    fields = [(name, getattr(batch, name), dims) for name, dims in _BATCH_DIMS.items()]
    fields += [(name, getattr(embeddings, name), dims) for name, dims in _EMBEDDING_DIMS.items()]
    for name, value, dims in fields:
        shape = np.shape(value)
        expected = ", ".join(
            (f"{d}={sizes[d]}" + (f" as in {bound_by[d]}" if d in bound_by else ""))
            if d in sizes
            else d
            for d in dims
        )
        if len(shape) != len(dims):
            raise ValueError(
                f"{name} has shape {shape} (rank {len(shape)}), expected rank {len(dims)}: "
                f"[{expected}]"
            )
        for dim, size in zip(dims, shape, strict=True):
            if dim not in sizes:
                sizes[dim], bound_by[dim] = size, name
            elif sizes[dim] != size:
                raise ValueError(f"{name} has shape {shape}, expected [{expected}]")
    for name in _INTEGER_FIELDS:
        dtype = jnp.result_type(getattr(batch, name))
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"{name} must have an integer dtype, got {dtype}")
    for name in _EMBEDDING_DIMS:
        dtype = jnp.result_type(getattr(embeddings, name))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {dtype}")
    for name in _INTEGER_FIELDS:
        value = _concrete(getattr(batch, name))
        if value is None or value.size == 0:
            continue
        high = product_surface_vocab_size if name.endswith("product_surface") else None
        if value.min() < 0 or (high is not None and value.max() >= high):
            bound = f"[0, {high})" if high is not None else ">= 0"
            raise ValueError(
                f"{name} holds values in [{value.min()}, {value.max()}], expected {bound}"
            )
    return sizes


def _variance_scaling(scale: float, mode: str) -> hk.initializers.Initializer:
    return hk.initializers.VarianceScaling(scale, mode, "truncated_normal")


def _project(pieces: list[jax.Array], name: str, out_size: int, scale: float) -> jax.Array:
    """Concatenates `pieces` on the last axis and projects to `out_size` in float32."""
    x = jnp.concatenate(pieces, axis=-1)
    w = hk.get_parameter(
        name, [x.shape[-1], out_size], jnp.float32, init=_variance_scaling(scale, "fan_in")
    )
    return jnp.dot(x.astype(jnp.float32), w).astype(x.dtype)


def _flat_hashes(x: jax.Array) -> jax.Array:
    """[..., H, D] -> [..., H * D]."""
    return x.reshape((*x.shape[:-2], x.shape[-2] * x.shape[-1]))


def block_user_reduce(
    user_hashes: jax.Array,  # [B, Hu]
    user_embeddings: jax.Array,  # [B, Hu, D]
    num_user_hashes: int,
    emb_size: int,
    embed_init_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One user token [B, 1, D] from the user's hash embeddings, and its mask [B, 1]."""
    flat = user_embeddings.reshape((user_embeddings.shape[0], 1, num_user_hashes * emb_size))
    user = _project([flat], "proj_mat_1", emb_size, embed_init_scale)
    return user, user_hashes[:, :1] != 0


def block_history_reduce(
    history_post_hashes: jax.Array,  # [B, S, Hi]
    history_post_embeddings: jax.Array,  # [B, S, Hi, D]
    history_author_embeddings: jax.Array,  # [B, S, Ha, D]
    history_product_surface_embeddings: jax.Array,  # [B, S, D]
    history_actions_embeddings: jax.Array,  # [B, S, D]
    num_item_hashes: int,
    num_author_hashes: int,
    embed_init_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One token per history item [B, S, D] (post, author, actions, surface), and mask [B, S]."""
    del num_item_hashes, num_author_hashes  # implied by the embeddings' shapes
    pieces = [
        _flat_hashes(history_post_embeddings),
        _flat_hashes(history_author_embeddings),
        history_actions_embeddings,
        history_product_surface_embeddings,
    ]
    emb_size = history_post_embeddings.shape[-1]
    history = _project(pieces, "proj_mat_3", emb_size, embed_init_scale)
    return history, history_post_hashes[:, :, 0] != 0


def block_candidate_reduce(
    candidate_post_hashes: jax.Array,  # [B, C, Hi]
    candidate_post_embeddings: jax.Array,  # [B, C, Hi, D]
    candidate_author_embeddings: jax.Array,  # [B, C, Ha, D]
    candidate_product_surface_embeddings: jax.Array,  # [B, C, D]
    num_item_hashes: int,
    num_author_hashes: int,
    embed_init_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One token per candidate [B, C, D] (post, author, surface), and mask [B, C]."""
    del num_item_hashes, num_author_hashes  # implied by the embeddings' shapes
    pieces = [
        _flat_hashes(candidate_post_embeddings),
        _flat_hashes(candidate_author_embeddings),
        candidate_product_surface_embeddings,
    ]
    emb_size = candidate_post_embeddings.shape[-1]
    candidates = _project(pieces, "proj_mat_2", emb_size, embed_init_scale)
    return candidates, candidate_post_hashes[:, :, 0] != 0


def _table(name: str, shape: list[int]) -> jax.Array:
    """A float32 parameter drawn with variance 1 / shape[-1]."""
    return hk.get_parameter(name, shape, jnp.float32, init=_variance_scaling(1.0, "fan_out"))


def action_embeddings(
    actions: jax.Array, emb_size: int, fprop_dtype: Any
) -> jax.Array:  # [B, S, A] -> [B, S, D]
    """Signed multi-hot projection: +1 for actions taken, -1 for the others.

    Positions with no action at all (padding) get a zero vector.
    """
    w = _table("action_projection", [actions.shape[-1], emb_size])
    signed = 2.0 * actions.astype(jnp.float32) - 1.0
    emb = jnp.dot(signed, w)
    emb = jnp.where(jnp.any(actions != 0, axis=-1, keepdims=True), emb, 0.0)
    return emb.astype(fprop_dtype)


def product_surface_embeddings(
    surface: jax.Array, vocab_size: int, emb_size: int
) -> jax.Array:  # [B, N] -> [B, N, D]
    """One-hot lookup in the table shared by history and candidates."""
    table = _table("product_surface_embedding_table", [vocab_size, emb_size])
    return jnp.dot(jax.nn.one_hot(surface, vocab_size, dtype=jnp.float32), table)


def build_context_inputs(
    batch: RecsysBatch, embeddings: RecsysEmbeddings, config: Any, fprop_dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """User and history tokens [B, 1 + S, D] in `fprop_dtype`, and their mask [B, 1 + S].

    Shared by the ranking and the retrieval model, so both create the same parameters
    (`proj_mat_1`, `proj_mat_3`, `action_projection`, `product_surface_embedding_table`) in the
    calling module's scope.
    """
    hashes = config.hash_config
    user, user_mask = block_user_reduce(
        batch.user_hashes, embeddings.user_embeddings, hashes.num_user_hashes, config.emb_size
    )
    history, history_mask = block_history_reduce(
        batch.history_post_hashes,
        embeddings.history_post_embeddings,
        embeddings.history_author_embeddings,
        product_surface_embeddings(
            batch.history_product_surface, config.product_surface_vocab_size, config.emb_size
        ),
        action_embeddings(batch.history_actions, config.emb_size, fprop_dtype),
        hashes.num_item_hashes,
        hashes.num_author_hashes,
    )
    tokens = jnp.concatenate([user.astype(fprop_dtype), history.astype(fprop_dtype)], axis=1)
    return tokens, jnp.concatenate([user_mask, history_mask], axis=1)


@dataclasses.dataclass
class PhoenixModelConfig:
    """Configuration of the ranking model.

    `emb_size` defaults to the transformer's width and `num_actions` to the 19 published
    actions (the fourth seed's guide leaves both out).
    """

    model: TransformerConfig
    emb_size: int | None = None
    num_actions: int | None = None
    history_seq_len: int = 128
    candidate_seq_len: int = 32
    name: str | None = None
    fprop_dtype: Any = jnp.bfloat16
    hash_config: HashConfig | None = None
    product_surface_vocab_size: int = 16

    def __post_init__(self):
        if self.hash_config is None:
            self.hash_config = HashConfig()
        if self.emb_size is None:
            self.emb_size = self.model.emb_size
        if self.num_actions is None:
            self.num_actions = DEFAULT_NUM_ACTIONS

    def initialize(self) -> PhoenixModelConfig:
        return self

    def make(self) -> PhoenixModel:
        return PhoenixModel(model=self.model.make(), config=self, fprop_dtype=self.fprop_dtype)


# The fourth seed's guide uses this name.
PhoenixRankingModelConfig = PhoenixModelConfig


class PhoenixModel(hk.Module):
    """Ranking model: logits [B, C, A] for every candidate and action.

    Two ways to run it, with the same parameters:
    - `__call__(batch, embeddings)`: the dense forward over [user, history, candidates];
    - `encode_context(batch, embeddings)` once per user, then
      `score_candidates(context, batch, embeddings)` for any number of candidates, which reads
      only the candidate fields of the batch and embeddings.
    """

    def __init__(
        self,
        model: Any,
        config: PhoenixModelConfig,
        fprop_dtype: Any = jnp.bfloat16,
        name: str | None = None,
    ):
        super().__init__(name=name or "phoenix_model")
        self.model = model
        self.config = config
        self.fprop_dtype = fprop_dtype

    def _validate(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> None:
        validate_inputs(batch, embeddings, self.config, self.config.num_actions)

    # The published model's helpers, kept for notebooks that call them (the user's guide shows
    # them); the model itself calls the module-level functions.
    def _get_action_embeddings(self, actions: jax.Array) -> jax.Array:
        return action_embeddings(actions, self.config.emb_size, self.fprop_dtype)

    def _single_hot_to_embeddings(
        self, input: jax.Array, vocab_size: int, emb_size: int, name: str
    ) -> jax.Array:
        del name  # the one table is always `product_surface_embedding_table`
        return product_surface_embeddings(input, vocab_size, emb_size)

    def _candidate_inputs(
        self, batch: RecsysBatch, embeddings: RecsysEmbeddings
    ) -> tuple[jax.Array, jax.Array]:
        candidates, mask = block_candidate_reduce(
            batch.candidate_post_hashes,
            embeddings.candidate_post_embeddings,
            embeddings.candidate_author_embeddings,
            product_surface_embeddings(
                batch.candidate_product_surface,
                self.config.product_surface_vocab_size,
                self.config.emb_size,
            ),
            self.config.hash_config.num_item_hashes,
            self.config.hash_config.num_author_hashes,
        )
        return candidates.astype(self.fprop_dtype), mask

    def build_inputs(
        self, batch: RecsysBatch, embeddings: RecsysEmbeddings
    ) -> tuple[jax.Array, jax.Array, int]:
        """Tokens [B, 1 + S + C, D] in fprop dtype, padding mask [B, T], candidate offset 1 + S."""
        self._validate(batch, embeddings)
        context, context_mask = build_context_inputs(
            batch, embeddings, self.config, self.fprop_dtype
        )
        candidates, candidate_mask = self._candidate_inputs(batch, embeddings)
        tokens = jnp.concatenate([context, candidates], axis=1)
        mask = jnp.concatenate([context_mask, candidate_mask], axis=1)
        return tokens, mask, context.shape[1]

    def _logits(self, h: jax.Array) -> jax.Array:  # [B, C, D] -> [B, C, A]
        h = layer_norm(h, name=shared_name(self, "rms_norm"))
        unembeddings = _table("unembeddings", [self.config.emb_size, self.config.num_actions])
        return jnp.dot(h.astype(jnp.float32), unembeddings).astype(self.fprop_dtype)

    def __call__(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> RecsysModelOutput:
        tokens, mask, offset = self.build_inputs(batch, embeddings)
        h = self.model(tokens, mask, candidate_start_offset=offset).embeddings
        return RecsysModelOutput(self._logits(h[:, offset:]))

    def encode_context(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> KVCache:
        """Runs user and history once; returns every layer's keys and values [L, B, 1+S, K, d]."""
        self._validate(batch, embeddings)
        context, mask = build_context_inputs(batch, embeddings, self.config, self.fprop_dtype)
        return self.model.encode_context(context, mask)[1]

    def score_candidates(
        self,
        context: KVCache,
        batch: RecsysBatch,
        embeddings: RecsysEmbeddings,
        candidate_offset: int | jax.Array = 0,
    ) -> RecsysModelOutput:
        """Logits [B, C, A] of the batch's candidates against an encoded context.

        Equal to the dense forward's logits: candidate c sits at position
        1 + S + candidate_offset + c, as if this were a slice of a longer candidate list.
        """
        self._validate(batch, embeddings)
        candidates, mask = self._candidate_inputs(batch, embeddings)
        num_context = context.keys.shape[2]
        positions = (
            jnp.arange(candidates.shape[1], dtype=jnp.float32) + num_context + candidate_offset
        )[None, :]
        h = self.model.score_candidates(candidates, mask, context, positions).embeddings
        return RecsysModelOutput(self._logits(h))
