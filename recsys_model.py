"""The Phoenix ranking model: a Grok transformer over [user, history, candidates].

Embeddings are looked up outside the model (by hash, from tables the caller owns) and passed in
as `RecsysEmbeddings`; the model reduces the hashes of each entity to one token, runs the
transformer with candidate isolation and maps each candidate's output to `num_actions` logits.

Shapes: B batch, S history length, C candidates, D `emb_size`, A `num_actions`,
Hu/Hi/Ha user/item/author hashes, V product-surface vocabulary, P = 1 + S context length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok import KVCache, TransformerConfig, layer_norm, shared_name

# The engagement actions the published model predicts, in the order of its outputs.
ACTIONS = [
    "favorite_score",
    "reply_score",
    "repost_score",
    "photo_expand_score",
    "click_score",
    "profile_click_score",
    "vqv_score",
    "share_score",
    "share_via_dm_score",
    "share_via_copy_link_score",
    "dwell_score",
    "quote_score",
    "quoted_click_score",
    "follow_author_score",
    "not_interested_score",
    "block_author_score",
    "mute_author_score",
    "report_score",
    "dwell_time",
]


@dataclasses.dataclass
class HashConfig:
    """How many hash functions map each entity id to embedding rows."""

    num_user_hashes: int = 2
    num_item_hashes: int = 2
    num_author_hashes: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check_count(f"HashConfig.{field.name}", getattr(self, field.name), low=1)


def _check_count(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class ModelConfigDefaults:
    """Defaults and checks both model configurations share (each declares its own fields, in
    the order of its published signature)."""

    def __post_init__(self):
        if self.hash_config is None:
            self.hash_config = HashConfig()
        if self.emb_size is None:
            self.emb_size = self.model.emb_size
        _check_count("emb_size", self.emb_size, low=1)
        _check_count("history_seq_len", self.history_seq_len, low=0)
        _check_count("candidate_seq_len", self.candidate_seq_len, low=1)
        _check_count("product_surface_vocab_size", self.product_surface_vocab_size, low=1)
        if not jnp.issubdtype(jnp.dtype(self.fprop_dtype), jnp.floating):
            raise ValueError(f"fprop_dtype must be a floating dtype, got {self.fprop_dtype!r}")

    def initialize(self):
        return self


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


def map_candidates(
    batch: RecsysBatch, embeddings: RecsysEmbeddings, fn: Callable[[Any], Any]
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """Applies `fn` to every candidate field ([B, C, ...] arrays); history fields are kept."""
    batch = batch._replace(
        candidate_post_hashes=fn(batch.candidate_post_hashes),
        candidate_author_hashes=fn(batch.candidate_author_hashes),
        candidate_product_surface=fn(batch.candidate_product_surface),
    )
    embeddings = dataclasses.replace(
        embeddings,
        candidate_post_embeddings=fn(embeddings.candidate_post_embeddings),
        candidate_author_embeddings=fn(embeddings.candidate_author_embeddings),
    )
    return batch, embeddings


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


def _value_kind(name: str) -> str:
    if name == "history_actions":
        return "actions"
    return "ids" if name in _INTEGER_FIELDS else "embeddings"


# The largest id JAX holds exactly: without jax_enable_x64 it computes in int32, and a larger
# int64 hash would wrap (2**32 becomes 0, padding).
MAX_ID = 2**31 - 1


def _at_hand(x) -> bool:
    """Whether the values of `x` can be read now: not a tracer inside jit, not an array partly
    held by other hosts, not empty."""
    if isinstance(x, jax.core.Tracer) or np.size(x) == 0:
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def _summary(kind: str, x, xp) -> tuple:
    """What the value checks need of a field, in numpy or jax.numpy (`xp`): the range of ids,
    whether actions are all 0 or 1, the sum of embeddings (finite iff every entry is, unless it
    overflows, which `_check_values` double-checks)."""
    if kind == "ids":
        return xp.min(x), xp.max(x)
    if kind == "actions":
        return (xp.all((x == 0) | (x == 1)),)
    return (xp.sum(x, dtype=xp.float32),)


@functools.partial(jax.jit, static_argnums=0)
def _device_summaries(kinds: tuple[str, ...], values: list) -> list:
    return [_summary(kind, x, jnp) for kind, x in zip(kinds, values, strict=True)]


def _check_values(fields: list[tuple[str, str, Any, int | None]]) -> None:
    """Raises ValueError for the first field (name, kind, value, id bound) holding values it
    must not: ids outside [0, bound) or beyond int32, actions other than 0 and 1, non-finite
    embeddings. Fields whose values are not at hand are skipped; the others are summarised in
    one compiled call (jax arrays) or with numpy."""
    fields = [f for f in fields if _at_hand(f[2])]
    on_device = [f for f in fields if isinstance(f[2], jax.Array)]
    summaries = dict(
        zip(
            [f[0] for f in on_device],
            jax.device_get(
                _device_summaries(tuple(f[1] for f in on_device), [f[2] for f in on_device])
            ),
            strict=True,
        )
    )
    for name, kind, value, high in fields:
        summary = summaries.get(name) or _summary(kind, np.asarray(value), np)
        if kind == "ids":
            low, top = summary
            limit = MAX_ID + 1 if high is None else high
            if low < 0 or top >= limit:
                expected = f"[0, {high})" if high is not None else f"[0, 2**31) (int32: {MAX_ID})"
                raise ValueError(f"{name} holds values in [{low}, {top}], expected {expected}")
        elif kind == "actions" and not summary[0]:
            x = np.asarray(value)
            _raise_at(name, x, (x != 0) & (x != 1), "a multi-hot of 0 and 1 (actions taken)")
        elif kind == "embeddings" and not np.isfinite(summary[0]):
            x = np.asarray(value)
            _raise_at(name, x, ~np.isfinite(x), "finite values")


def _raise_at(name: str, x: np.ndarray, bad: np.ndarray, expected: str) -> None:
    """Raises ValueError naming the first entry of `x` where `bad` holds, if any does."""
    if bad.any():
        where = [int(i) for i in np.unravel_index(np.argmax(bad), bad.shape)]
        raise ValueError(f"{name} holds {x[tuple(where)]} at {where}; expected {expected}")


def validate_inputs(
    batch: RecsysBatch,
    embeddings: RecsysEmbeddings,
    config: Any,
    num_actions: int | None = None,
) -> dict[str, int]:
    """Checks every field's rank, dtype and shape, and its values when they are at hand.

    `config` (a ranking or retrieval config) gives D, the hash counts and the product-surface
    vocabulary; `num_actions`, when given, the width of `history_actions`. Values (outside jit):
    ids in [0, 2**31), product surfaces in [0, V), actions 0 or 1, embeddings finite, at least
    one user. Raises ValueError naming the field, what it got and what was expected. Returns
    the sizes it bound (B, S, C...).
    """
    hash_config = config.hash_config
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
        # history_actions may be bool, integer or floating, as long as it holds 0 and 1.
        kind = jnp.integer if name in _INTEGER_FIELDS else jnp.floating
        dtype = jnp.result_type(value)
        if name != "history_actions" and not jnp.issubdtype(dtype, kind):
            raise ValueError(f"{name} must have a dtype of kind {kind.__name__}, got {dtype}")
    if sizes["B"] == 0:
        raise ValueError("the batch has no users (B=0 in user_hashes); pass at least one")
    vocab = config.product_surface_vocab_size
    _check_values(
        [
            (name, _value_kind(name), value, vocab if name.endswith("product_surface") else None)
            for name, value, _ in fields
        ]
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
class PhoenixModelConfig(ModelConfigDefaults):
    """Configuration of the ranking model.

    `emb_size` defaults to the transformer's width and `num_actions` to the 19 published
    actions (the published ranking guide leaves both out).
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
        super().__post_init__()
        if self.num_actions is None:
            self.num_actions = len(ACTIONS)
        _check_count("num_actions", self.num_actions, low=1)

    def make(self) -> PhoenixModel:
        return PhoenixModel(model=self.model.make(), config=self, fprop_dtype=self.fprop_dtype)


# The published ranking guide uses this name.
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
