"""The Phoenix ranking model: a Grok transformer over [user, history, candidates].

Embeddings are looked up outside the model (by hash, from tables the caller owns) and passed in
as `RecsysEmbeddings`; the model reduces the hashes of each entity to one token, runs the
transformer with candidate isolation and maps each candidate's output to `num_actions` logits.

Both published releases are built here. A config made as the published guides show builds the
first release's model, unchanged. `PhoenixModelConfig(..., release=2)` builds the second's: a
history item also carries its dwell time, a candidate its post age (bucketed from two
timestamps), and a continuous head predicts `num_continuous_actions` values per candidate. In a
process run with `PHOENIX_RELEASE=2`, every config that leaves `release` out builds the second
release's model, as the second release itself does: code written for it runs unchanged.
Right-anchored rotary positions (`right_anchored_rope=True`), which make a candidate's score
independent of its slot, and IP hashes (`HashConfig.num_ip_hashes`) add no parameters and work
with either release.

Shapes: B batch, S history length, C candidates, D `emb_size`, A `num_actions`,
Hu/Hi/Ha/Hip user/item/author/IP hashes, V product-surface vocabulary, Nc continuous actions,
P = 1 + S context length.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok import (  # is_integer and is_number: also this module's, as the others import them
    KVCache,
    TransformerConfig,
    ffn_size,
    is_integer,
    is_number,
    layer_norm,
    matmul_2d,
    right_anchored_rope_positions,
    shared_name,
)

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


# The continuous actions' column that holds the dwell time (in seconds), in the history's
# inputs and the continuous head's outputs alike.
DWELL_TIME_COLUMN = 1
# Post ages are bucketed up to this many minutes; older posts share the last bucket.
POST_AGE_MAX_MINUTES = 4800


@dataclasses.dataclass
class HashConfig:
    """How many hash functions map each entity id to embedding rows (IP: none by default)."""

    num_user_hashes: int = 2
    num_item_hashes: int = 2
    num_author_hashes: int = 2
    num_ip_hashes: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            low = 0 if field.name == "num_ip_hashes" else 1
            _check_count(f"HashConfig.{field.name}", getattr(self, field.name), low=low)


@dataclasses.dataclass
class NormConfig:
    """How a continuous value is brought to [0, 1]: clamped to [0, norm_scale], then divided by
    norm_scale (or log1p of both with `use_log`)."""

    norm_scale: float = 30.0
    use_log: bool = False


# The continuous head's training losses, by `ContinuousActionConfig.loss_type`.
CONTINUOUS_LOSS_TYPES = ("mae", "mse", "huber", "tweedie")


@dataclasses.dataclass
class ContinuousActionConfig:
    """The continuous head's normalisation and, for training, its loss: "mae", "mse",
    "huber" or "tweedie" (with `tweedie_power`), weighted by `loss_weight`."""

    loss_weight: float = 0.0
    loss_type: str = "mae"
    tweedie_power: float = 1.5
    norm_config: NormConfig | None = None


def _norm_config(config: NormConfig | ContinuousActionConfig | None) -> NormConfig:
    """The normalisation a config asks for (None: the defaults), checked."""
    if isinstance(config, ContinuousActionConfig):
        config = config.norm_config
    config = NormConfig() if config is None else config
    if not isinstance(config, NormConfig):
        raise TypeError(
            f"config must be a NormConfig, a ContinuousActionConfig or None, got "
            f"{type(config).__name__}"
        )
    if not (is_number(config.norm_scale) and 0 < config.norm_scale < np.inf):
        raise ValueError(f"norm_scale must be a finite number > 0, got {config.norm_scale!r}")
    if not isinstance(config.use_log, bool | np.bool_):  # "no" would read as true
        raise TypeError(f"use_log must be True or False, got {config.use_log!r}")
    return config


def normalize_continuous_value(
    values: jax.typing.ArrayLike, config: NormConfig | ContinuousActionConfig | None = None
) -> jax.Array:
    """`values` clamped to [0, scale] and mapped to [0, 1] (linearly, or by log1p), in float32.

    `config` is a `NormConfig`, or a `ContinuousActionConfig` whose `norm_config` is used;
    None means the defaults (scale 30, linear).
    """
    config = _norm_config(config)
    x = jnp.clip(jnp.asarray(values, jnp.float32), 0.0, config.norm_scale)
    if config.use_log:
        return jnp.log1p(x) / jnp.log1p(jnp.float32(config.norm_scale))
    return x / config.norm_scale


def denormalize_continuous_value(
    normalized: jax.typing.ArrayLike, config: NormConfig | ContinuousActionConfig | None = None
) -> jax.Array:
    """The inverse of `normalize_continuous_value` on [0, scale]: a value in [0, 1] (such as a
    continuous head's output) back in the original unit, in float32."""
    config = _norm_config(config)
    y = jnp.asarray(normalized, jnp.float32)
    if config.use_log:
        return jnp.expm1(y * jnp.log1p(jnp.float32(config.norm_scale)))
    return y * config.norm_scale


def compute_post_age_bucket(
    impr_ts_sec: jax.typing.ArrayLike,
    post_creation_ts_sec: jax.typing.ArrayLike,
    granularity_mins: int = 60,
) -> jax.Array:
    """Post age buckets (int32, same shape as the timestamps, unix seconds).

    Bucket 1 + floor(age in minutes / granularity), at most POST_AGE_MAX_MINUTES // granularity
    + 1; bucket 0 when either timestamp is 0 (absent) or the post is younger than 0.
    """
    _check_count("granularity_mins", granularity_mins, low=1)
    impr = jnp.asarray(impr_ts_sec)
    created = jnp.asarray(post_creation_ts_sec)
    age = impr - created
    minutes = jnp.floor_divide(age, 60)
    bucket = jnp.minimum(
        minutes // granularity_mins + 1, POST_AGE_MAX_MINUTES // granularity_mins + 1
    )
    absent = (impr == 0) | (created == 0) | (age < 0)
    return jnp.where(absent, 0, bucket).astype(jnp.int32)


def _check_offset(offset: Any) -> None:
    """A first candidate's slot: integers >= 0, one or one per user ([B, 1]); traced, any
    integers."""
    if isinstance(offset, np.ndarray | jax.Array) and jnp.issubdtype(offset.dtype, jnp.integer):
        if isinstance(offset, jax.core.Tracer) or not offset.size or int(offset.min()) >= 0:
            return
    elif is_integer(offset) and offset >= 0:
        return
    raise ValueError(
        f"candidate_offset must be an integer >= 0 (the first candidate's slot), got {offset!r}"
    )


def require_kind(value: Any, kind: Any, name: str, hint: str = "") -> None:
    """TypeError naming `name` and what it got, unless `value` is a `kind` (a class or a union
    of classes; a `Mapping` is called a dict); `hint` follows the expected kind."""
    if not isinstance(value, kind):
        kinds = getattr(kind, "__args__", None) or (kind,)
        expected = " or ".join("dict" if k is Mapping else k.__name__ for k in kinds)
        article = "an" if expected[0] in "AEIOU" else "a"
        raise TypeError(f"{name} must be {article} {expected}{hint}, got {type(value).__name__}")


def _check_count(name: str, value: Any, low: int) -> None:
    if not is_integer(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class ModelConfigDefaults:
    """Defaults and checks both model configurations share (each declares its own fields, in
    the order of its published signature)."""

    def __post_init__(self):
        if not isinstance(self.model, TransformerConfig):
            raise TypeError(f"model must be a TransformerConfig, got {type(self.model).__name__}")
        for field in dataclasses.fields(self):  # switches: "no" would read as true
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool | np.bool_):
                raise TypeError(f"{field.name} must be True or False, got {value!r}")
        if self.hash_config is None:
            self.hash_config = HashConfig()
        if not isinstance(self.hash_config, HashConfig):
            raise TypeError(
                f"hash_config must be a HashConfig, got {type(self.hash_config).__name__}"
            )
        if self.emb_size is None:
            self.emb_size = self.model.emb_size
        _check_count("emb_size", self.emb_size, low=1)
        _check_count("history_seq_len", self.history_seq_len, low=0)
        _check_count("candidate_seq_len", self.candidate_seq_len, low=1)
        _check_count("product_surface_vocab_size", self.product_surface_vocab_size, low=1)
        try:  # None would read as float64
            floating = self.fprop_dtype is not None and jnp.issubdtype(
                jnp.dtype(self.fprop_dtype), jnp.floating
            )
        except TypeError:  # a name numpy does not know ("bf16")
            floating = False
        if not floating:
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
    # Second release; each may be None (absent).
    history_continuous_actions: jax.typing.ArrayLike | None = None  # [B, S, Nc], col. 1 dwell
    candidate_impr_ts: jax.typing.ArrayLike | None = None  # [B, C] unix seconds, 0 = absent
    candidate_post_creation_ts: jax.typing.ArrayLike | None = None  # [B, C] unix seconds
    user_ip_hashes: jax.typing.ArrayLike | None = None  # [B, Hip]


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
    user_ip_embeddings: jax.typing.ArrayLike | None = None  # [B, Hip, D], second release


class RecsysModelOutput(NamedTuple):
    logits: jax.Array  # [B, C, A]
    continuous_preds: jax.Array | None = None  # [B, C, Nc], second release


def map_candidates(
    batch: RecsysBatch, embeddings: RecsysEmbeddings, fn: Callable[[Any], Any]
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """Applies `fn` to every candidate field ([B, C, ...] arrays, those present); history
    fields are kept."""
    batch = batch._replace(
        **{
            name: fn(value)
            for name, value in batch._asdict().items()
            if name.startswith("candidate_") and value is not None
        }
    )
    embeddings = dataclasses.replace(
        embeddings,
        candidate_post_embeddings=fn(embeddings.candidate_post_embeddings),
        candidate_author_embeddings=fn(embeddings.candidate_author_embeddings),
    )
    return batch, embeddings


def create_dummy_batch_from_config(
    hash_config: HashConfig,
    history_len: int,
    num_candidates: int,
    num_actions: int,
    batch_size: int = 1,
) -> RecsysBatch:
    """An all-zero batch of the given shapes (used to initialise parameters)."""
    b, s, c = batch_size, history_len, num_candidates
    return RecsysBatch(
        user_hashes=np.zeros((b, hash_config.num_user_hashes), np.int32),
        history_post_hashes=np.zeros((b, s, hash_config.num_item_hashes), np.int32),
        history_author_hashes=np.zeros((b, s, hash_config.num_author_hashes), np.int32),
        history_actions=np.zeros((b, s, num_actions), np.float32),
        history_product_surface=np.zeros((b, s), np.int32),
        candidate_post_hashes=np.zeros((b, c, hash_config.num_item_hashes), np.int32),
        candidate_author_hashes=np.zeros((b, c, hash_config.num_author_hashes), np.int32),
        candidate_product_surface=np.zeros((b, c), np.int32),
    )


def create_dummy_embeddings_from_config(
    hash_config: HashConfig,
    emb_size: int,
    history_len: int,
    num_candidates: int,
    batch_size: int = 1,
) -> RecsysEmbeddings:
    """All-zero embeddings of the given shapes."""
    b, s, c, d = batch_size, history_len, num_candidates, emb_size
    return RecsysEmbeddings(
        user_embeddings=np.zeros((b, hash_config.num_user_hashes, d), np.float32),
        history_post_embeddings=np.zeros((b, s, hash_config.num_item_hashes, d), np.float32),
        candidate_post_embeddings=np.zeros((b, c, hash_config.num_item_hashes, d), np.float32),
        history_author_embeddings=np.zeros((b, s, hash_config.num_author_hashes, d), np.float32),
        candidate_author_embeddings=np.zeros((b, c, hash_config.num_author_hashes, d), np.float32),
    )


def dummy_inputs(config: Any, num_actions: int, batch_size: int = 1):
    """All-zero (batch, embeddings) of a config's shapes (history and candidates of length at
    least 1), enough to initialise a model or trace its parameter shapes."""
    s, c = max(1, config.history_seq_len), max(1, config.candidate_seq_len)
    batch = create_dummy_batch_from_config(config.hash_config, s, c, num_actions, batch_size)
    embeddings = create_dummy_embeddings_from_config(
        config.hash_config, config.emb_size, s, c, batch_size
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
    "history_continuous_actions": ("B", "S", "Nc"),
    "candidate_impr_ts": ("B", "C"),
    "candidate_post_creation_ts": ("B", "C"),
    "user_ip_hashes": ("B", "Hip"),
}
_EMBEDDING_DIMS = {
    "user_embeddings": ("B", "Hu", "D"),
    "history_post_embeddings": ("B", "S", "Hi", "D"),
    "candidate_post_embeddings": ("B", "C", "Hi", "D"),
    "history_author_embeddings": ("B", "S", "Ha", "D"),
    "candidate_author_embeddings": ("B", "C", "Ha", "D"),
    "user_ip_embeddings": ("B", "Hip", "D"),
}
_FLOAT_BATCH_FIELDS = ("history_actions", "history_continuous_actions")
_INTEGER_FIELDS = tuple(name for name in _BATCH_DIMS if name not in _FLOAT_BATCH_FIELDS)


def _value_kind(name: str) -> str:
    """ids (and timestamps): integers in range; actions: 0 or 1; the rest: finite floats."""
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
    whether actions are all 0 or 1, the largest float32 sum of squares over an embedding's D
    values (finite iff every entry is finite and no norm, which takes that sum, overflows)."""
    if kind == "ids":
        return xp.min(x), xp.max(x)
    if kind == "actions":
        return (xp.all((x == 0) | (x == 1)),)
    if xp is np:
        return (_largest_square_sum(x),)
    x = x.astype(jnp.float32)
    return (jnp.max(jnp.sum(x * x, axis=-1)),)


def _largest_square_sum(x: np.ndarray, rows: int = 65536) -> np.float32:
    """`_summary`'s embeddings figure in numpy, a block of rows at a time (bfloat16 or float64
    inputs are widened or narrowed to float32 one block at a time, not whole)."""
    x = x.reshape(-1, x.shape[-1])
    largest = np.float32(0)
    for start in range(0, len(x), rows):
        block = np.asarray(x[start : start + rows], np.float32)
        largest = np.maximum(largest, np.max(np.einsum("nd,nd->n", block, block)))
    return largest


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
    summaries = {}
    if on_device:  # one compiled call (not even an empty one for numpy inputs)
        kinds, values = tuple(f[1] for f in on_device), [f[2] for f in on_device]
        found = jax.device_get(_device_summaries(kinds, values))
        summaries = dict(zip([f[0] for f in on_device], found, strict=True))
    for name, kind, value, high in fields:
        # An overflowing sum (inf, or NaN from inf - inf) is what the check looks for.
        with np.errstate(over="ignore", invalid="ignore"):
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
            x = np.asarray(value)  # float64 beyond float32's range becomes infinite in the model
            with np.errstate(over="ignore"):
                _raise_at(name, x, ~np.isfinite(x.astype(np.float32)), "finite float32 values")
            raise ValueError(
                f"{name} holds values too large to compute with in float32 (a sum of squares "
                f"over D, which the model's norms take, overflows; the largest magnitude is "
                f"{np.max(np.abs(x)):.3g})"
            )


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
    vocabulary; `num_actions`, when given, the width of `history_actions`. Second-release fields
    may be None (absent); the two candidate timestamps come together. Values (outside jit): ids
    and timestamps in [0, 2**31), product surfaces in [0, V), actions 0 or 1, embeddings and
    continuous actions finite, at least one user. Raises ValueError naming the field, what it
    got and what was expected. Returns the sizes it bound (B, S, C...).
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
    if hash_config.num_ip_hashes:
        sizes["Hip"] = hash_config.num_ip_hashes
    if getattr(config, "release", 1) >= 2:
        sizes["Nc"] = config.num_continuous_actions
    if (batch.candidate_impr_ts is None) != (batch.candidate_post_creation_ts is None):
        given = (
            "candidate_impr_ts"
            if batch.candidate_post_creation_ts is None
            else "candidate_post_creation_ts"
        )
        raise ValueError(
            f"{given} is given without the other candidate timestamp; pass both or neither"
        )
    bound_by = {}  # the field that fixed each size read from the inputs (B, S, C)
    fields = [(name, getattr(batch, name), dims) for name, dims in _BATCH_DIMS.items()]
    fields += [(name, getattr(embeddings, name), dims) for name, dims in _EMBEDDING_DIMS.items()]
    optional = set(RecsysBatch._field_defaults) | {"user_ip_embeddings"}  # second release
    for name, value, _ in fields:
        if value is None and name not in optional:
            raise ValueError(f"{name} is None; the model needs it (only second-release inputs "
                             "may be absent)")  # fmt: skip
    fields = [(name, value, dims) for name, value, dims in fields if value is not None]
    for name, value, dims in fields:
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(f"{name} must be an array (numpy or jax), got {type(value).__name__}")
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
    return matmul_2d(x.astype(jnp.float32), w).astype(x.dtype)


def _flat_hashes(x: jax.Array) -> jax.Array:
    """[..., H, D] -> [..., H * D]."""
    return x.reshape((*x.shape[:-2], x.shape[-2] * x.shape[-1]))


def block_user_reduce(
    user_hashes: jax.Array,  # [B, Hu]
    user_embeddings: jax.Array,  # [B, Hu, D]
    num_user_hashes: int,
    emb_size: int,
    embed_init_scale: float = 1.0,
    *,
    user_ip_embeddings: jax.Array | None = None,  # [B, Hip, D]
    num_ip_hashes: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """One user token [B, 1, D] from the user's hash embeddings, and its mask [B, 1].

    With IP hashes, their embeddings are summed and added to the projected token, unprojected.
    """
    flat = user_embeddings.reshape((user_embeddings.shape[0], 1, num_user_hashes * emb_size))
    user = _project([flat], "proj_mat_1", emb_size, embed_init_scale)
    if num_ip_hashes > 0 and user_ip_embeddings is not None:
        user = user + jnp.sum(user_ip_embeddings, axis=1, keepdims=True).astype(user.dtype)
    return user, user_hashes[:, :1] != 0


def _reduce(items: list[jax.Array], extras: list, hashes: jax.Array, name: str, scale: float):
    """One token per item: the pieces, then the extras that are present, projected by `name`;
    and the mask (first hash not 0)."""
    pieces = [
        _flat_hashes(x) if x.ndim == 4 else x for x in items + [e for e in extras if e is not None]
    ]
    return _project(pieces, name, items[0].shape[-1], scale), hashes[:, :, 0] != 0


def block_history_reduce(
    history_post_hashes: jax.Array,  # [B, S, Hi]
    history_post_embeddings: jax.Array,  # [B, S, Hi, D]
    history_author_embeddings: jax.Array,  # [B, S, Ha, D]
    history_product_surface_embeddings: jax.Array,  # [B, S, D]
    history_actions_embeddings: jax.Array,  # [B, S, D]
    num_item_hashes: int,
    num_author_hashes: int,
    embed_init_scale: float = 1.0,
    *,
    history_continuous_embeddings: jax.Array | None = None,  # [B, S, D]
    history_post_age_embeddings: jax.Array | None = None,  # [B, S, D]
) -> tuple[jax.Array, jax.Array]:
    """One token per history item [B, S, D] (post, author, actions, surface, then the second
    release's dwell and post age when given), and the mask [B, S]."""
    del num_item_hashes, num_author_hashes  # implied by the embeddings' shapes
    items = [
        history_post_embeddings,
        history_author_embeddings,
        history_actions_embeddings,
        history_product_surface_embeddings,
    ]
    extras = [history_continuous_embeddings, history_post_age_embeddings]
    return _reduce(items, extras, history_post_hashes, "proj_mat_3", embed_init_scale)


def block_candidate_reduce(
    candidate_post_hashes: jax.Array,  # [B, C, Hi]
    candidate_post_embeddings: jax.Array,  # [B, C, Hi, D]
    candidate_author_embeddings: jax.Array,  # [B, C, Ha, D]
    candidate_product_surface_embeddings: jax.Array,  # [B, C, D]
    num_item_hashes: int,
    num_author_hashes: int,
    embed_init_scale: float = 1.0,
    *,
    candidate_post_age_embeddings: jax.Array | None = None,  # [B, C, D]
) -> tuple[jax.Array, jax.Array]:
    """One token per candidate [B, C, D] (post, author, surface, then the second release's post
    age when given), and the mask [B, C]."""
    del num_item_hashes, num_author_hashes  # implied by the embeddings' shapes
    items = [
        candidate_post_embeddings,
        candidate_author_embeddings,
        candidate_product_surface_embeddings,
    ]
    extras = [candidate_post_age_embeddings]
    return _reduce(items, extras, candidate_post_hashes, "proj_mat_2", embed_init_scale)


def _table(name: str, shape: list[int]) -> jax.Array:
    """A float32 parameter drawn with variance 1 / shape[-1]."""
    return hk.get_parameter(name, shape, jnp.float32, init=_variance_scaling(1.0, "fan_out"))


def _dense(name: str, shape: list[int]) -> jax.Array:
    """A float32 parameter drawn with variance 1 / shape[0] (the second release's projections)."""
    return hk.get_parameter(name, shape, jnp.float32, init=_variance_scaling(1.0, "fan_in"))


def action_embeddings(
    actions: jax.Array, emb_size: int, fprop_dtype: Any
) -> jax.Array:  # [B, S, A] -> [B, S, D]
    """Signed multi-hot projection: +1 for actions taken, -1 for the others.

    Positions with no action at all (padding) get a zero vector.
    """
    w = _table("action_projection", [actions.shape[-1], emb_size])
    signed = 2.0 * actions.astype(jnp.float32) - 1.0
    emb = matmul_2d(signed, w)
    emb = jnp.where(jnp.any(actions != 0, axis=-1, keepdims=True), emb, 0.0)
    return emb.astype(fprop_dtype)


def product_surface_embeddings(
    surface: jax.Array, vocab_size: int, emb_size: int
) -> jax.Array:  # [B, N] -> [B, N, D]
    """One-hot lookup in the table shared by history and candidates."""
    table = _table("product_surface_embedding_table", [vocab_size, emb_size])
    return matmul_2d(jax.nn.one_hot(surface, vocab_size, dtype=jnp.float32), table)


def dwell_time_embeddings(
    continuous_actions: jax.Array | None,  # [B, S, Nc] or None (absent: zeros)
    shape: tuple[int, int],  # (B, S)
    config: PhoenixModelConfig,
    fprop_dtype: Any,
) -> jax.Array:  # [B, S, D]
    """The second release's dwell-time token piece: the continuous actions' dwell column,
    normalised, through a tanh-GELU layer; exactly zero where the dwell time is 0 or absent."""
    proj1 = _dense("history_dwell_time_proj1", [1, config.continuous_action_hidden_dim])
    proj2 = _dense(
        "history_dwell_time_proj2", [config.continuous_action_hidden_dim, config.emb_size]
    )
    if continuous_actions is None:
        dwell = jnp.zeros((*shape, 1), jnp.float32)
    else:
        action_config = config.continuous_action_config
        column = continuous_actions[..., DWELL_TIME_COLUMN, None]
        dwell = normalize_continuous_value(column, action_config.norm_config)
    return matmul_2d(jax.nn.gelu(matmul_2d(dwell, proj1)), proj2).astype(fprop_dtype)


def post_age_embeddings(batch: RecsysBatch, config: PhoenixModelConfig) -> jax.Array:  # [B, C, D]
    """The second release's post-age token piece: the row of `post_age_embedding_table` for each
    candidate's age bucket (bucket 0, a learned row like the others, when timestamps are absent)."""
    table = _table("post_age_embedding_table", [config.post_age_vocab_size, config.emb_size])
    if batch.candidate_impr_ts is None:
        bucket = jnp.zeros(np.shape(batch.candidate_product_surface), jnp.int32)
    else:
        bucket = compute_post_age_bucket(
            batch.candidate_impr_ts,
            batch.candidate_post_creation_ts,
            config.post_age_granularity_mins,
        )
    return jnp.take(table, bucket, axis=0)


def build_context_inputs(
    batch: RecsysBatch,
    embeddings: RecsysEmbeddings,
    config: Any,
    fprop_dtype: Any,
    with_dwell_time: bool = False,
    with_ip: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """User and history tokens [B, 1 + S, D] in `fprop_dtype`, and their mask [B, 1 + S].

    Shared by the ranking and the retrieval model, so both create the same parameters in the
    calling module's scope, in the published order: `product_surface_embedding_table`,
    `action_projection`, (the second release's dwell-time projections), `proj_mat_1`,
    `proj_mat_3`. The ranker adds dwell time (second release) and IP embeddings (with IP
    hashes); the retrieval model uses neither, as published.
    """
    hashes = config.hash_config
    surfaces = product_surface_embeddings(
        batch.history_product_surface, config.product_surface_vocab_size, config.emb_size
    )
    actions = action_embeddings(batch.history_actions, config.emb_size, fprop_dtype)
    dwell = None
    if with_dwell_time:
        shape = np.shape(batch.history_product_surface)
        dwell = dwell_time_embeddings(batch.history_continuous_actions, shape, config, fprop_dtype)
    user, user_mask = block_user_reduce(
        batch.user_hashes,
        embeddings.user_embeddings,
        hashes.num_user_hashes,
        config.emb_size,
        user_ip_embeddings=embeddings.user_ip_embeddings,
        num_ip_hashes=hashes.num_ip_hashes if with_ip else 0,
    )
    history, history_mask = block_history_reduce(
        batch.history_post_hashes,
        embeddings.history_post_embeddings,
        embeddings.history_author_embeddings,
        surfaces,
        actions,
        hashes.num_item_hashes,
        hashes.num_author_hashes,
        history_continuous_embeddings=dwell,
    )
    tokens = jnp.concatenate([user.astype(fprop_dtype), history.astype(fprop_dtype)], axis=1)
    return tokens, jnp.concatenate([user_mask, history_mask], axis=1)


RELEASES = (1, 2)
# The release of a config that does not name one: 1 unless this environment variable says 2.
RELEASE_VARIABLE = "PHOENIX_RELEASE"


def default_release() -> int:
    """The release a config built without `release` takes: `PHOENIX_RELEASE` (1 or 2), read when
    the config is built, or 1 when it is unset or empty. Any other value is a ValueError."""
    value = os.environ.get(RELEASE_VARIABLE, "").strip()
    if not value:
        return 1
    if value not in {str(r) for r in RELEASES}:
        raise ValueError(
            f"{RELEASE_VARIABLE}={value!r}: expected one of {', '.join(map(str, RELEASES))} "
            "(the published release a config without `release` builds)"
        )
    return int(value)


@dataclasses.dataclass
class PhoenixModelConfig(ModelConfigDefaults):
    """Configuration of the ranking model.

    `emb_size` defaults to the transformer's width and `num_actions` to the 19 published
    actions (the published ranking guide leaves both out). The fields after
    `product_surface_vocab_size` are the second release's; `release` chooses which published
    ranker to build: 1, the model the published guides describe, or 2, which adds the dwell-time
    and post-age inputs and the continuous head, with their parameters. Left out (None), it is
    `default_release()`: 1, or 2 in a process run with `PHOENIX_RELEASE=2` (so that code written
    for the second release, which always builds its ranker, runs unchanged). `use_ip_address` and
    `mask_neg_feedback_on_negatives` are accepted as published and read by nothing here; the
    loss fields of `continuous_action_config` are read by training, not by the model.
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
    post_age_granularity_mins: int = 60
    num_continuous_actions: int = 8
    continuous_action_hidden_dim: int = 64
    continuous_action_config: ContinuousActionConfig | None = None
    use_ip_address: bool = False
    right_anchored_rope: bool = False
    mask_neg_feedback_on_negatives: bool = True
    release: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.release is None:
            self.release = default_release()
        if self.num_actions is None:
            self.num_actions = len(ACTIONS)
        if self.continuous_action_config is None:
            self.continuous_action_config = ContinuousActionConfig()
        if not isinstance(self.continuous_action_config, ContinuousActionConfig):
            raise TypeError(
                "continuous_action_config must be a ContinuousActionConfig, got "
                f"{type(self.continuous_action_config).__name__}"
            )
        _check_count("num_actions", self.num_actions, low=1)
        _check_count("post_age_granularity_mins", self.post_age_granularity_mins, low=1)
        # Column 1 of the continuous actions is the dwell time.
        _check_count("num_continuous_actions", self.num_continuous_actions, low=2)
        _check_count("continuous_action_hidden_dim", self.continuous_action_hidden_dim, low=1)
        if isinstance(self.release, bool | np.bool_) or self.release not in RELEASES:
            raise ValueError(f"release must be one of {RELEASES}, got {self.release!r}")

    @property
    def post_age_vocab_size(self) -> int:
        """Rows of the post-age table: bucket 0 (absent) and one per age step up to the cap."""
        return POST_AGE_MAX_MINUTES // self.post_age_granularity_mins + 2

    def make(self) -> PhoenixModel:
        return PhoenixModel(model=self.model.make(), config=self, fprop_dtype=self.fprop_dtype)


# The published ranking guide uses this name.
PhoenixRankingModelConfig = PhoenixModelConfig


def ranking_matrix_flops(config: PhoenixModelConfig, num_candidates: int, cached: bool) -> float:
    """Matrix FLOPs (2 per multiply-add) of ranking `num_candidates` for one user: the input
    projections, the attention projections, logits and weighted values, the feed-forward and the
    unembedding. The dense forward (`cached=False`) computes the whole attention square; the
    cached path attends causally within the context and from each candidate to the context and
    itself. Element-wise work (norms, rotary, soft-cap, softmax, GELU) and the small products
    of the product surface (one-hot), of the dwell-time input and of the continuous head are
    left out, so a time computed from this is a lower bound."""
    t, d, h = config.model, config.emb_size, config.hash_config
    s, c, heads = config.history_seq_len, num_candidates, t.num_q_heads
    hidden = ffn_size(d, t.widening_factor)
    per_token = 4 * d * (heads + t.num_kv_heads) * t.key_size + 6 * d * hidden
    per_pair = 4 * heads * t.key_size  # one logit and one weighted value in every head
    # Embeddings of width D that each projection reads: the hashes, then the action and
    # product surface of a history item or the surface of a candidate, then in the second
    # release a dwell time (history) or a post age (candidate).
    item, second = h.num_item_hashes + h.num_author_hashes, int(config.release >= 2)
    inputs = 2 * d * d * (h.num_user_hashes + s * (item + 2 + second) + c * (item + 1 + second))
    context, tokens = 1 + s, 1 + s + c
    pairs = context * (context + 1) / 2 + c * (context + 1) if cached else tokens**2
    actions = 2 * d * config.num_actions * (s + c)  # the history's actions in, the logits out
    return inputs + actions + t.num_layers * (tokens * per_token + per_pair * pairs)


class ModelModule(hk.Module):
    """What the ranking and retrieval models hold: the transformer, their config and the dtype
    of the forward. Unnamed, a model takes its class's name in snake case (`phoenix_model`)."""

    def __init__(
        self,
        model: Any,
        config: Any,
        fprop_dtype: Any = jnp.bfloat16,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.model = model
        self.config = config
        self.fprop_dtype = fprop_dtype


class PhoenixModel(ModelModule):
    """Ranking model: logits [B, C, A] (and, second release, continuous predictions [B, C, Nc])
    for every candidate.

    Two ways to run it, with the same parameters:
    - `__call__(batch, embeddings)`: the dense forward over [user, history, candidates];
    - `encode_context(batch, embeddings)` once per user, then
      `score_candidates(context, batch, embeddings)` for any number of candidates, which reads
      only the candidate fields of the batch and embeddings.
    """

    config: PhoenixModelConfig

    def _validate(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> None:
        validate_inputs(batch, embeddings, self.config, self.config.num_actions)

    @property
    def _second_release(self) -> bool:
        return self.config.release >= 2

    # The published model's helpers, kept because the published package's guide has notebooks
    # call them; the model itself calls the module-level functions.
    def _get_action_embeddings(self, actions: jax.Array) -> jax.Array:
        return action_embeddings(actions, self.config.emb_size, self.fprop_dtype)

    def _single_hot_to_embeddings(
        self, input: jax.Array, vocab_size: int, emb_size: int, name: str
    ) -> jax.Array:
        del name  # the one table is always `product_surface_embedding_table`
        return product_surface_embeddings(input, vocab_size, emb_size)

    def _context_inputs(self, batch: RecsysBatch, embeddings: RecsysEmbeddings):
        return build_context_inputs(
            batch, embeddings, self.config, self.fprop_dtype, self._second_release, with_ip=True
        )

    def _candidate_inputs(
        self, batch: RecsysBatch, embeddings: RecsysEmbeddings
    ) -> tuple[jax.Array, jax.Array]:
        config = self.config
        surfaces = product_surface_embeddings(
            batch.candidate_product_surface, config.product_surface_vocab_size, config.emb_size
        )
        age = post_age_embeddings(batch, config) if self._second_release else None
        candidates, mask = block_candidate_reduce(
            batch.candidate_post_hashes,
            embeddings.candidate_post_embeddings,
            embeddings.candidate_author_embeddings,
            surfaces,
            config.hash_config.num_item_hashes,
            config.hash_config.num_author_hashes,
            candidate_post_age_embeddings=age,
        )
        return candidates.astype(self.fprop_dtype), mask

    def build_inputs(
        self, batch: RecsysBatch, embeddings: RecsysEmbeddings
    ) -> tuple[jax.Array, jax.Array, int]:
        """Tokens [B, 1 + S + C, D] in fprop dtype, padding mask [B, T], candidate offset 1 + S."""
        self._validate(batch, embeddings)
        context, context_mask = self._context_inputs(batch, embeddings)
        candidates, candidate_mask = self._candidate_inputs(batch, embeddings)
        tokens = jnp.concatenate([context, candidates], axis=1)
        mask = jnp.concatenate([context_mask, candidate_mask], axis=1)
        return tokens, mask, context.shape[1]

    def _outputs(self, h: jax.Array) -> RecsysModelOutput:  # [B, C, D]
        h = layer_norm(h, name=shared_name(self, "rms_norm")).astype(jnp.float32)
        unembeddings = _table("unembeddings", [self.config.emb_size, self.config.num_actions])
        logits = matmul_2d(h, unembeddings).astype(self.fprop_dtype)
        if not self._second_release:
            return RecsysModelOutput(logits)
        shape = [self.config.emb_size, self.config.num_continuous_actions]
        continuous = jax.nn.sigmoid(matmul_2d(h, _dense("continuous_unembeddings", shape)))
        return RecsysModelOutput(logits, continuous.astype(self.fprop_dtype))

    def _anchored(self, mask: jax.Array, history_len: int) -> jax.Array | None:
        """Right-anchored positions [B, T] when the config asks for them, else None (0 .. T-1)."""
        if not self.config.right_anchored_rope:
            return None
        return right_anchored_rope_positions(mask, history_len, 1)

    def __call__(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> RecsysModelOutput:
        tokens, mask, offset = self.build_inputs(batch, embeddings)
        positions = self._anchored(mask, offset - 1)
        h = self.model(tokens, mask, candidate_start_offset=offset, positions=positions)
        return self._outputs(h.embeddings[:, offset:])

    def encode_context(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> KVCache:
        """Runs user and history once; returns every layer's keys and values [L, B, 1+S, K, d]."""
        self._validate(batch, embeddings)
        context, mask = self._context_inputs(batch, embeddings)
        positions = self._anchored(mask, context.shape[1] - 1)
        return self.model.encode_context(context, mask, positions)[1]

    def score_candidates(
        self,
        context: KVCache,
        batch: RecsysBatch,
        embeddings: RecsysEmbeddings,
        candidate_offset: int | jax.Array = 0,
        *,
        candidate_slots: jax.Array | None = None,  # [C] or [B, C]
    ) -> RecsysModelOutput:
        """Outputs for the batch's candidates against an encoded context, equal to the dense
        forward's.

        With right-anchored positions every candidate sits at 1 + S. Otherwise candidate c sits
        at 1 + S + slot, where the slot is `candidate_offset + c` (as if this were a slice of a
        longer candidate list) unless `candidate_slots` gives each candidate's own.
        """
        require_kind(context, KVCache, "context", " (what encode_context returns)")
        self._validate(batch, embeddings)
        _check_offset(candidate_offset)
        layers, users = self.config.model.num_layers, batch.candidate_post_hashes.shape[0]
        tokens = 1 + batch.history_post_hashes.shape[1]  # the user's and the history's
        if context.keys.shape[:3] != (layers, users, tokens):
            held = context.keys.shape
            raise ValueError(
                f"context holds {held[0]} layers of {held[1]} users with {held[2] - 1} history "
                f"items; this model has {layers} layers and the batch {users} users with "
                f"{tokens - 1} (encode_context of the same batch)"
            )
        candidates, mask = self._candidate_inputs(batch, embeddings)
        num_context, num_candidates = context.keys.shape[2], candidates.shape[1]
        if self.config.right_anchored_rope:
            slots = jnp.zeros((1, num_candidates), jnp.float32)
        elif candidate_slots is None:
            slots = jnp.arange(num_candidates, dtype=jnp.float32)[None, :] + candidate_offset
        else:
            slots = jnp.asarray(candidate_slots, jnp.float32).reshape(-1, num_candidates)
        positions = num_context + slots
        h = self.model.score_candidates(candidates, mask, context, positions).embeddings
        return self._outputs(h)
