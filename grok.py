"""The Grok-1 transformer, adapted for recommendation.

The sequence is [user (1), history (S), candidates (C)]. User and history attend causally;
each candidate attends to the user, the history and itself, never to another candidate
(candidate isolation). Two ways to run it share one set of parameters and one loop over layers:

- `Transformer.__call__`: the dense masked forward over the whole sequence (the published path
  and the reference the fast path is tested against);
- `Transformer.encode_context` then `Transformer.score_candidates`: the user and history are
  encoded once, every layer's keys and values for those positions are kept, and any number of
  candidates is scored against them. Because of candidate isolation this gives the dense result
  at a cost of C * (1 + S) attention pairs instead of (1 + S + C) ** 2.

Modules are dataclasses, as in Grok-1: each field is declared once. Arguments of the published
signatures that nothing here reads are `InitVar`s: accepted, not stored.

Shapes: B batch, T sequence, D model width, H query heads, K key/value heads, G = H / K,
d key size, P context (user + history) length, C candidates, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# Attention logits are soft-capped to +-MAX_ATTN_LOGIT before the softmax.
MAX_ATTN_LOGIT = 30.0
# Value given to masked attention logits; exp() of it underflows to exactly zero.
MASKED_LOGIT = -1e30
ROPE_BASE = 10000
FLOAT32_MAX = float(np.finfo(np.float32).max)


class TrainingState(NamedTuple):
    """Parameters of a model, as the runners hold them."""

    params: hk.Params


class MHAOutput(NamedTuple):
    embeddings: jax.Array


class DecoderOutput(NamedTuple):
    embeddings: jax.Array


class TransformerOutput(NamedTuple):
    embeddings: jax.Array


class KVCache(NamedTuple):
    """Rotated keys and values of the context positions, one entry per layer.

    keys, values: [L, B, P, K, d]; mask: [B, P] bool, True where the context position is valid.
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Hidden width of the gated feed-forward block: 2/3 of the widened size, rounded up to 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (-size) % 8


def make_recsys_attn_mask(
    seq_len: int, candidate_start_offset: int, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """Attention mask [1, 1, T, T] (1 = may attend) with candidate isolation.

    Positions before `candidate_start_offset` attend causally; a candidate attends to every
    position before the offset and to itself.
    """
    idx = jnp.arange(seq_len)
    causal = idx[:, None] >= idx[None, :]
    is_candidate = idx >= candidate_start_offset
    other_candidate = is_candidate[:, None] & is_candidate[None, :] & (idx[:, None] != idx[None, :])
    return (causal & ~other_candidate).astype(dtype)[None, None]


def right_anchored_rope_positions(
    padding_mask: jax.Array,  # [B, T] bool, True = valid
    history_seq_len: int,
    num_user_prefix_tokens: int,
) -> jax.Array:  # [B, T] float32
    """Rotary positions that anchor the history to the candidates.

    The sequence is [prefix (P tokens), history (S), candidates]. Prefix tokens keep their
    index; the newest valid history item sits at P + S - 1 and each older valid one a step
    before the next valid one, whatever the history's length and wherever its padding is;
    every candidate sits at P + S; padded positions get 0. So a candidate's position, and
    its distance to each history item, depend neither on its slot nor on how much history the
    user has. (The published function counts the valid history anywhere in the slice and is
    right only for left-aligned history without holes.)
    """
    valid = padding_mask.astype(jnp.bool_)
    p, s = num_user_prefix_tokens, history_seq_len
    index = jnp.arange(valid.shape[1])
    history = valid & (index >= p) & (index < p + s)
    # Valid history items at or after each position, counted from the end.
    at_or_after = jnp.flip(jnp.cumsum(jnp.flip(history, axis=1), axis=1), axis=1)
    positions = jnp.where(index < p, index, p + s)
    positions = jnp.where(history, p + s - at_or_after, positions)
    return jnp.where(valid, positions, 0).astype(jnp.float32)


@dataclasses.dataclass
class TransformerConfig:
    """Hyper-parameters of the transformer.

    `key_size` may be omitted (the published ranking guide does): it then defaults to
    `emb_size // num_q_heads`.
    """

    emb_size: int
    key_size: int | None = None
    num_q_heads: int | None = None
    num_kv_heads: int | None = None
    num_layers: int | None = None
    widening_factor: float = 4.0
    attn_output_multiplier: float = 1.0
    name: str | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):  # a JAX or NumPy scalar as the number it holds
            value = getattr(self, field.name)
            scalar = isinstance(value, jax.Array | np.ndarray) and value.ndim == 0
            if scalar and not isinstance(value, jax.core.Tracer) and value.dtype.kind in "iuf":
                setattr(self, field.name, value.item())
        for field in ("emb_size", "num_q_heads", "num_kv_heads", "num_layers"):
            if getattr(self, field) is None:
                raise TypeError(f"TransformerConfig needs {field}")
            _check_positive_integer(field, getattr(self, field))
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.key_size is None:
            self.key_size = self.emb_size // self.num_q_heads
        _check_positive_integer("key_size", self.key_size)
        if self.key_size < 2 or self.key_size % 2:
            raise ValueError(
                f"key_size must be even and at least 2 (rotary embeddings rotate pairs), "
                f"got {self.key_size}"
            )
        for field in ("widening_factor", "attn_output_multiplier"):
            value = getattr(self, field)
            if not is_number(value) or not abs(value) <= FLOAT32_MAX:  # computed in float32
                raise ValueError(
                    f"TransformerConfig.{field} must be a finite number in float32's range, "
                    f"got {value!r}"
                )
        if not self.widening_factor > 0:
            raise ValueError(f"widening_factor must be positive, got {self.widening_factor!r}")

    def make(self) -> Transformer:
        heads = (self.num_q_heads, self.num_kv_heads, self.key_size)
        multiplier = self.attn_output_multiplier
        return Transformer(*heads, self.widening_factor, multiplier, self.num_layers, self.name)


def is_integer(value) -> bool:
    """Whether a value (read from JSON, or given in Python) is an integer: true and false are
    not, numpy's integers are."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether a value (read from JSON, or given in Python) is a real number: true and false are
    not, numpy's numbers are."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _check_positive_integer(field: str, value) -> None:
    """A count such as `num_layers`: an integer >= 1 (2.0 is refused: Haiku's shapes and range()
    take integers only)."""
    if not (is_integer(value) and value >= 1):
        raise ValueError(f"TransformerConfig.{field} must be a positive integer, got {value!r}")


def shared_name(module: hk.Module, child: str) -> str:
    """The name `module/child` whichever method of `module` creates the child.

    Haiku prefixes children created outside `__call__` with `~method`; forcing the name lets the
    dense and the cached paths read the same parameters.
    """
    return hk.experimental.force_name(f"{module.module_name}/{child}")


def matmul_2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] as one product of a matrix [N, in]: the same values as
    `jnp.dot(x, w)`, but its weight gradient is a single product over N, which XLA on the CPU
    computes from the gradient as it is, where a product over several leading axes first
    copies the gradient into a transposed layout, elementwise work fused into the copy (a
    ranker training step of the demo configuration spent a fifth of its time in those)."""
    flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    return dot(flat, w).reshape(*x.shape[:-1], w.shape[-1])


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.dot(x, w)`. On the CPU, inputs narrower than float32 (bfloat16) are asked for
    float32 sums rounded once at the end: the arithmetic `jnp.dot` does with them on every
    backend, said explicitly. XLA on the CPU has no bfloat16 product of its own and otherwise
    widens both inputs around a float32 product, converting every weight on every call; asked
    this way, its CPU library multiplies bfloat16 directly where the processor can (a bfloat16
    ranking pass took 5.7 ms instead of 7.2). The values differ only by the order of the
    float32 sums. Other backends multiply bfloat16 natively already, and are left as they are:
    asked there, the products of the backward pass would mix float32 and bfloat16."""
    dtype = jnp.result_type(x, w)
    narrow = jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32
    if narrow and jax.default_backend() == "cpu":
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype)
    return jnp.dot(x, w)


class Linear(hk.Linear):
    """Dense layer with zero-initialised float32 parameters, computed in the input's dtype."""

    def __init__(self, output_size: int, with_bias: bool = True, name: str | None = None):
        super().__init__(output_size=output_size, with_bias=with_bias, name=name)

    def __call__(self, inputs: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        fprop_dtype = inputs.dtype
        w = hk.get_parameter("w", [inputs.shape[-1], self.output_size], jnp.float32, init=jnp.zeros)
        out = matmul_2d(inputs, w.astype(fprop_dtype))
        if self.with_bias:
            b = hk.get_parameter("b", [self.output_size], jnp.float32, init=jnp.zeros)
            out = out + b.astype(fprop_dtype)
        return out


class RMSNorm(hk.RMSNorm):
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, in float32, cast back."""

    def __init__(self, axis, eps: float = 1e-5, name: str | None = None, create_scale: bool = True):
        super().__init__(axis, eps=eps, create_scale=create_scale, name=name)

    def __call__(self, inputs: jax.Array) -> jax.Array:  # [..., D]
        fprop_dtype = inputs.dtype
        x = inputs.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        if self.create_scale:
            scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32, init=jnp.zeros)
            normed = normed * scale
        return normed.astype(fprop_dtype)


def hk_rms_norm(x: jax.Array, fixed_scale: bool = False, name: str | None = None) -> jax.Array:
    """Applies a fresh `RMSNorm` (with a learnt scale unless `fixed_scale`)."""
    return RMSNorm(axis=-1, create_scale=not fixed_scale, name=name)(x)


def layer_norm(x: jax.Array, name: str | None = None) -> jax.Array:
    return hk_rms_norm(x, name=name)


def rotate_half(x: jax.Array) -> jax.Array:
    """concat(-x2, x1) where x1, x2 are the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate((-x2, x1), axis=-1)


@dataclasses.dataclass
class RotaryEmbedding(hk.Module):
    """Rotary position embedding (rotate-half convention). Has no parameters."""

    dim: int
    name: str | None = None
    base_exponent: int = ROPE_BASE

    def __call__(
        self,
        x: jax.Array,  # [B, T, H, d]
        seq_dim: int,
        offset: jax.Array | int,
        const_position: int | None = None,
        t: jax.Array | None = None,  # [B or 1, T] positions
    ) -> jax.Array:
        fprop_dtype = x.dtype
        inv_freq = 1.0 / (
            self.base_exponent ** (jnp.arange(0, self.dim, 2, dtype=jnp.float32) / self.dim)
        )
        seq_len = x.shape[seq_dim]
        if const_position:  # as in Grok-1, 0 (or None) means no constant position
            t = jnp.full((1, seq_len), const_position, dtype=jnp.float32)
        elif t is None:
            offset = jnp.reshape(jnp.asarray(offset, jnp.float32), (-1, 1))
            t = jnp.arange(seq_len, dtype=jnp.float32)[None, :] + offset
        phase = jnp.asarray(t, jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
        cos, sin = (jnp.tile(f, (1, 1, 2))[:, :, None, :] for f in _cos_sin(phase))
        x = x * cos + rotate_half(x) * sin  # cos, sin broadcast over heads
        return x.astype(fprop_dtype)


def _cos_sin(phase: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of `phase`, computed once where XLA would otherwise recompute them.

    XLA on the CPU fuses an elementwise cos into each of its consumers: the rotations of the
    queries and keys of every layer and, in training, their gradients, each a transposing copy
    in which the cos runs once per element of every head, unvectorised. A conditional is a
    fusion boundary, so on the CPU the two are computed once, inside one. Both of its branches
    compute the same (it is there for its boundary), so the values are those of `jnp.cos` and
    `jnp.sin` bit for bit. A ranker training step of the demo configuration took 6 to 14 % less
    time with it (medians of 50 to 80 steps each, in alternation, three side-by-side runs).
    """
    if not isinstance(phase, jax.core.Tracer):  # uncompiled: nothing to fuse, nothing to gain
        return _cos_sin_plain(phase)
    return jax.lax.platform_dependent(phase, cpu=_cos_sin_once, default=_cos_sin_plain)


def _cos_sin_plain(phase: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.cos(phase), jnp.sin(phase)


def _cos_sin_once(phase: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.lax.cond(jnp.isfinite(phase).all(), _cos_sin_plain, _cos_sin_plain, phase)


# The attention's two batched products, with their gradients written out. Autodiff takes the
# keys' and the values' gradients as products that sum over the first of the two matrix axes of
# both operands ([B, K, T, S] by [B, K, T, d], over T), which XLA on the CPU hands to a slow
# general kernel instead of its matrix library; here the operand summed over is first
# transposed into a copy of its own, so that every product of the gradient runs in the library's
# layout. The gradients sum the same terms: on the project's CPU both demo models' parameters
# after 20 training steps were the same bit for bit either way, and the steps 4 % (ranker) and
# 7 % (retrieval) shorter (medians of 48 and 24 steps, in alternation in one process).


@jax.custom_vjp
def query_key_products(q: jax.Array, k: jax.Array) -> jax.Array:
    """[..., T, d] by [..., S, d] -> [..., T, S]: each query's products with every key."""
    return jnp.einsum("...td,...sd->...ts", q, k)


@jax.custom_vjp
def weighted_values(w: jax.Array, v: jax.Array) -> jax.Array:
    """[..., T, S] by [..., S, d] -> [..., T, d]: the values summed with each query's weights."""
    return jnp.einsum("...ts,...sd->...td", w, v)


def _keeping_inputs(product):
    """The forward pass of a product for `jax.custom_vjp`: its value, and its inputs kept."""

    def forward(a: jax.Array, b: jax.Array):
        return product(a, b), (a, b)

    return forward


def _query_key_backward(saved, grad: jax.Array):
    q, k = saved
    return weighted_values(grad, k), weighted_values(_swapped_copy(grad), q)


def _weighted_values_backward(saved, grad: jax.Array):
    w, v = saved
    return query_key_products(grad, v), weighted_values(_swapped_copy(w), grad)


query_key_products.defvjp(_keeping_inputs(query_key_products), _query_key_backward)
weighted_values.defvjp(_keeping_inputs(weighted_values), _weighted_values_backward)


def _swapped_copy(x: jax.Array) -> jax.Array:
    """`x` with its last two axes swapped: on the CPU a copy that XLA may not fold back into the
    product that reads it; elsewhere a plain transpose, which the matrix libraries take as is."""
    return jax.lax.platform_dependent(x, cpu=_swapped_apart, default=_swapped)


def _swapped(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _swapped_apart(x: jax.Array) -> jax.Array:
    return jax.lax.optimization_barrier(_swapped(x))


def _attention_mask(
    mask: jax.Array,  # [B, T], True = valid (not padding)
    candidate_start_offset: int | None = None,
) -> jax.Array:  # [B, 1, T, T] bool
    """Which keys each query may attend to: valid ones, causally, with candidate isolation
    from `candidate_start_offset` on (None: no candidates, plain causal)."""
    seq_len = mask.shape[1]
    offset = seq_len if candidate_start_offset is None else candidate_start_offset
    return mask.astype(jnp.bool_)[:, None, None, :] & make_recsys_attn_mask(
        seq_len, offset, jnp.bool_
    )


def _default_positions(seq_len: int) -> jax.Array:
    return jnp.arange(seq_len, dtype=jnp.float32)[None, :]  # [1, T]


@dataclasses.dataclass
class MultiHeadAttention(hk.Module):
    """Grouped-query attention with rotary embeddings and soft-capped float32 logits."""

    num_q_heads: int
    num_kv_heads: int
    key_size: int
    _: dataclasses.KW_ONLY
    # The published projections are bias-free whatever `with_bias` says.
    with_bias: dataclasses.InitVar[bool] = True
    value_size: int | None = None
    model_size: int | None = None
    attn_output_multiplier: float = 1.0
    name: str | None = None

    def __post_init__(self, with_bias: bool):
        del with_bias
        super().__post_init__()
        self.value_size = self.value_size or self.key_size
        self.model_size = self.model_size or self.key_size * self.num_q_heads

    def _project(self, x: jax.Array, name: str, num_heads: int, size: int) -> jax.Array:
        y = Linear(num_heads * size, with_bias=False, name=shared_name(self, name))(x)
        return y.reshape((*x.shape[:-1], num_heads, size))  # [B, T, heads, size]

    def _rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return RotaryEmbedding(self.key_size)(x, seq_dim=1, offset=0, t=positions)

    def _capped_logits(self, products: jax.Array) -> jax.Array:
        logits = products.astype(jnp.float32) * self.attn_output_multiplier
        return MAX_ATTN_LOGIT * jnp.tanh(logits / MAX_ATTN_LOGIT)

    def _grouped_queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Rotated queries [B, T, K, G, d]: query head h uses key/value head h // G."""
        q = self._rotate(self._project(x, "query", self.num_q_heads, self.key_size), positions)
        b, t, h, d = q.shape
        return q.reshape((b, t, self.num_kv_heads, h // self.num_kv_heads, d))

    def _output(self, attn: jax.Array) -> jax.Array:  # [B, T, K, G, d] -> [B, T, model]
        attn = attn.reshape((*attn.shape[:2], -1))
        return Linear(self.model_size, with_bias=False, name=shared_name(self, "linear"))(attn)

    def keys_values(
        self,
        key: jax.Array,  # [B, T, D]
        value: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B or 1, T]
    ) -> tuple[jax.Array, jax.Array]:
        """Rotated keys and values, [B, T, K, d] each."""
        k = self._rotate(self._project(key, "key", self.num_kv_heads, self.key_size), positions)
        v = self._project(value, "value", self.num_kv_heads, self.value_size)
        return k, v

    def attend(
        self,
        query: jax.Array,  # [B, T, D]
        keys: jax.Array,  # [B, S, K, d] rotated
        values: jax.Array,  # [B, S, K, d]
        mask: jax.Array,  # [B or 1, 1, T or 1, S], nonzero = may attend
        positions: jax.Array,  # [B or 1, T]
    ) -> jax.Array:  # [B, T, model]
        q = self._grouped_queries(query, positions)  # [B, T, K, G, d]
        b, t, kv, g, d = q.shape
        # Head-major ([B, K, G * T, d] by [B, K, S, d]): the layout XLA's batched products take
        # as it is, so that each tensor is transposed once and not again in every product (nor in
        # every gradient).
        q = q.transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
        keys, values = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
        logits = self._capped_logits(query_key_products(q, keys)).reshape(b, kv, g, t, -1)
        logits = jnp.where(mask[:, :, None, :, :], logits, MASKED_LOGIT)
        weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)  # softmax in float32
        attn = weighted_values(weights.reshape(b, kv, g * t, -1), values)
        return self._output(attn.reshape(b, kv, g, t, -1).transpose(0, 3, 1, 2, 4))

    def attend_candidates(
        self,
        x: jax.Array,  # [B, C, D] candidate inputs
        keys: jax.Array,  # [B, C, K, d] the candidates' own rotated keys
        values: jax.Array,  # [B, C, K, d] and values
        mask: jax.Array,  # [B, C] bool, False for padded candidates
        positions: jax.Array,  # [B or 1, C]
        context: tuple[jax.Array, jax.Array, jax.Array],  # keys, values [B, P, K, d]; mask [B, P]
    ) -> jax.Array:  # [B, C, model]
        """Each candidate attends to the cached context and to itself only.

        The softmax over [context, self] is taken in two parts (no concatenation), and the
        context part runs head-major ([B, K, C * G, P]), the layout in which XLA's batched
        products need no transposes of the logits. Together the two took scoring 1,024
        candidates from 41 to 29.5 ms on the project's CPU (one side-by-side run; the
        [B, C, K, G, P] layout needed transposes, a concatenation and slices), with the same
        values to float32 rounding.
        """
        context_keys, context_values, context_mask = context
        b, c, _ = x.shape
        kv, d = self.num_kv_heads, self.key_size
        g = self.num_q_heads // kv
        q = self._grouped_queries(x, positions)  # [B, C, K, G, d]
        self_logits = self._capped_logits(jnp.einsum("bckgd,bckd->bckg", q, keys))
        self_logits = jnp.where(mask[:, :, None, None], self_logits, MASKED_LOGIT)
        self_logits = self_logits.transpose(0, 2, 1, 3).reshape(b, kv, c * g)  # [B, K, C * G]
        q = q.transpose(0, 2, 1, 3, 4).reshape(b, kv, c * g, d)  # [B, K, C * G, d]
        # Each query against the context: [B, K, C * G, P].
        ctx_logits = self._capped_logits(jnp.einsum("bkqd,bpkd->bkqp", q, context_keys))
        ctx_logits = jnp.where(context_mask[:, None, None, :], ctx_logits, MASKED_LOGIT)
        # softmax(concat(ctx, self)) as in jax.nn.softmax: exp(x - max) / sum, in float32.
        top = jnp.maximum(jnp.max(ctx_logits, axis=-1, initial=MASKED_LOGIT), self_logits)
        ctx_exp = jnp.exp(ctx_logits - top[..., None])
        self_exp = jnp.exp(self_logits - top)
        total = jnp.sum(ctx_exp, axis=-1) + self_exp
        ctx_weights = (ctx_exp / total[..., None]).astype(x.dtype)
        self_weights = (self_exp / total).astype(x.dtype)
        attn = jnp.einsum("bkqp,bpkd->bkqd", ctx_weights, context_values)  # [B, K, C * G, d]
        attn = attn.reshape(b, kv, c, g, -1).transpose(0, 2, 1, 3, 4)  # [B, C, K, G, d]
        self_weights = self_weights.reshape(b, kv, c, g).transpose(0, 2, 1, 3)
        return self._output(attn + self_weights[..., None] * values[:, :, :, None, :])

    def __call__(
        self,
        query: jax.Array,  # [B, T, D]
        key: jax.Array,  # [B, T, D]
        value: jax.Array,  # [B, T, D]
        mask: jax.Array,  # [B or 1, 1, T or 1, T], nonzero = may attend
        positions: jax.Array | None = None,  # [B or 1, T]; default 0 .. T-1
    ) -> MHAOutput:
        if mask.ndim != 4:
            raise ValueError(f"attention mask must be 4-D [B, 1, T, T], got shape {mask.shape}")
        if positions is None:
            positions = _default_positions(query.shape[1])
        keys, values = self.keys_values(key, value, positions)
        return MHAOutput(self.attend(query, keys, values, mask, positions))


@dataclasses.dataclass
class MHABlock(hk.Module):
    """Self-attention of the inputs with themselves; its parameters sit in the caller's scope."""

    num_q_heads: int
    num_kv_heads: int
    key_size: int
    attn_output_multiplier: float = 1.0
    name: str | None = None

    @hk.transparent
    def __call__(
        self,
        inputs: jax.Array,  # [B, T, D]
        mask: jax.Array,  # [B or 1, 1, T or 1, T]
        positions: jax.Array | None = None,  # [B or 1, T]
    ) -> MHAOutput:
        heads = (self.num_q_heads, self.num_kv_heads, self.key_size)
        multiplier = self.attn_output_multiplier
        attention = MultiHeadAttention(
            *heads, model_size=inputs.shape[-1], attn_output_multiplier=multiplier
        )
        return attention(inputs, inputs, inputs, mask, positions)


@dataclasses.dataclass
class DenseBlock(hk.Module):
    """Gated GELU feed-forward: linear_1(gelu(linear(x)) * linear_v(x)), no biases."""

    num_q_heads: dataclasses.InitVar[int]
    num_kv_heads: dataclasses.InitVar[int]
    key_size: dataclasses.InitVar[int]
    widening_factor: float = 4.0
    name: str | None = None

    def __post_init__(self, num_q_heads: int, num_kv_heads: int, key_size: int):
        del num_q_heads, num_kv_heads, key_size  # the published signature; the width is D's
        super().__post_init__()

    def __call__(self, inputs: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        model_size = inputs.shape[-1]
        hidden = ffn_size(model_size, self.widening_factor)
        h_v = Linear(hidden, with_bias=False, name="linear_v")(inputs)
        h_w1 = jax.nn.gelu(Linear(hidden, with_bias=False, name="linear")(inputs))
        return Linear(model_size, with_bias=False, name="linear_1")(h_w1 * h_v)


# What a decoder layer attends to besides its own tokens: the context's cached keys and
# values [B, P, K, d] and its mask [B, P], or None for self-attention under a mask.
LayerContext = tuple[jax.Array, jax.Array, jax.Array] | None


@dataclasses.dataclass
class DecoderLayer(hk.Module):
    """Attention then feed-forward, each normed on the way in and out of its residual branch.

    Its attention, feed-forward and norms are named under this layer (`decoder_layer_{i}/...`),
    as in the published checkpoints, from whichever method creates them.
    """

    num_q_heads: int
    num_kv_heads: int
    key_size: int
    num_layers: dataclasses.InitVar[int]
    layer_index: dataclasses.InitVar[int | None] = None
    widening_factor: float = 4.0
    name: str | None = None
    attn_output_multiplier: float = 1.0

    def __post_init__(self, num_layers: int, layer_index: int | None):
        del num_layers, layer_index  # the published signature; the name says which layer
        super().__post_init__()

    def _norm(self, x: jax.Array, index: int) -> jax.Array:
        """Norm 0: attention in, 1: attention out, 2: feed-forward in, 3: feed-forward out."""
        return layer_norm(x, name=shared_name(self, "rms_norm" + (f"_{index}" if index else "")))

    def run(
        self,
        h: jax.Array,  # [B, T, D]
        mask: jax.Array,  # self-attention: [B or 1, 1, T or 1, T]; with a context: [B, T] bool
        positions: jax.Array,  # [B or 1, T]
        context: LayerContext = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The layer's forward, and the rotated keys and values [B, T, K, d] of its tokens.

        Without a context the tokens attend to each other under `mask`. With one they are
        candidates: each attends to the context and to itself, and `mask` marks the valid ones.
        """
        heads = (self.num_q_heads, self.num_kv_heads, self.key_size)
        name, multiplier = shared_name(self, "multi_head_attention"), self.attn_output_multiplier
        attention = MultiHeadAttention(
            *heads, model_size=h.shape[-1], attn_output_multiplier=multiplier, name=name
        )
        x = self._norm(h, 0)
        keys, values = attention.keys_values(x, x, positions)
        if context is None:
            attended = attention.attend(x, keys, values, mask, positions)
        else:
            attended = attention.attend_candidates(x, keys, values, mask, positions, context)
        h = h + self._norm(attended, 1)
        dense = DenseBlock(
            *heads, self.widening_factor, hk.experimental.force_name(self.module_name)
        )
        return h + self._norm(dense(self._norm(h, 2)), 3), keys, values

    def __call__(
        self,
        inputs: jax.Array,  # [B, T, D]
        mask: jax.Array,  # [B or 1, 1, T or 1, T]
        padding_mask: jax.Array | None = None,  # [B, T] bool; padded keys are masked too
        positions: jax.Array | None = None,  # [B or 1, T]
    ) -> DecoderOutput:
        if padding_mask is not None:
            mask = jnp.logical_and(mask, padding_mask.astype(jnp.bool_)[:, None, None, :])
        if positions is None:
            positions = _default_positions(inputs.shape[1])
        return DecoderOutput(self.run(inputs, mask, positions)[0])


@dataclasses.dataclass
class Transformer(hk.Module):
    """A stack of `DecoderLayer`s named decoder_layer_0 ... decoder_layer_{L-1}."""

    num_q_heads: int
    num_kv_heads: int
    key_size: int
    widening_factor: float
    attn_output_multiplier: float
    num_layers: int
    name: str | None = None

    def _layers(
        self,
        h: jax.Array,  # [B, T, D]
        mask: jax.Array,  # as `DecoderLayer.run` takes it
        positions: jax.Array | None,  # [B or 1, T]; default 0 .. T-1
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
        """The one loop over layers: the output, and every layer's keys and values."""
        if positions is None:
            positions = _default_positions(h.shape[1])
        heads = (self.num_q_heads, self.num_kv_heads, self.key_size)
        multiplier = self.attn_output_multiplier
        keys, values = [], []
        for i in range(self.num_layers):
            name = shared_name(self, f"decoder_layer_{i}")
            layer = DecoderLayer(*heads, self.num_layers, i, self.widening_factor, name, multiplier)
            context = None if cache is None else (cache.keys[i], cache.values[i], cache.mask)
            h, k, v = layer.run(h, mask, positions, context)
            keys.append(k)
            values.append(v)
        return h, keys, values

    def __call__(
        self,
        embeddings: jax.Array,  # [B, T, D]
        mask: jax.Array,  # [B, T] bool, True = valid (not padding)
        candidate_start_offset: int | None = None,
        positions: jax.Array | None = None,  # [B or 1, T]; default 0 .. T-1
    ) -> TransformerOutput:
        attn_mask = _attention_mask(mask, candidate_start_offset)
        return TransformerOutput(self._layers(embeddings, attn_mask, positions)[0])

    def encode_context(
        self,
        embeddings: jax.Array,  # [B, P, D]
        mask: jax.Array,  # [B, P] bool
        positions: jax.Array | None = None,  # [B or 1, P]; default 0 .. P-1
    ) -> tuple[TransformerOutput, KVCache]:
        """Causal forward over the context, keeping every layer's keys and values."""
        h, keys, values = self._layers(embeddings, _attention_mask(mask), positions)
        return TransformerOutput(h), KVCache(jnp.stack(keys), jnp.stack(values), mask)

    def score_candidates(
        self,
        embeddings: jax.Array,  # [B, C, D]
        mask: jax.Array,  # [B, C] bool
        cache: KVCache,
        positions: jax.Array,  # [B or 1, C]
    ) -> TransformerOutput:
        """Runs candidates that attend to the cached context and to themselves only."""
        return TransformerOutput(self._layers(embeddings, mask, positions, cache)[0])
