"""Properties of the transformer (`grok.py`): its masks, causality and candidate isolation, the
cached path against the dense forward, and the published constructor signatures."""

import inspect
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grok
from conftest import ATOL, RTOL, SEEDS, Setup, normal, random_params, setups
from grok import TransformerConfig


def test_make_recsys_attn_mask_values():
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # positions 0-2: user and history, causal
            [1, 1, 1, 1, 0],  # candidate 3: context and itself
            [1, 1, 1, 0, 1],  # candidate 4: context and itself, not candidate 3
        ],
        np.float32,
    )
    make = grok.make_recsys_attn_mask
    mask, no_candidates, all_candidates, mask16 = jax.jit(
        lambda: (make(5, 3), make(4, 4), make(3, 0), make(5, 3, jnp.bfloat16))
    )()
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == jnp.float32
    np.testing.assert_array_equal(mask[0, 0], expected)
    np.testing.assert_array_equal(no_candidates[0, 0], np.tril(np.ones((4, 4))))
    np.testing.assert_array_equal(all_candidates[0, 0], np.eye(3))
    assert mask16.dtype == jnp.bfloat16


@settings(max_examples=6, deadline=None, derandomize=True)  # compiles per example
@given(setups(), st.integers(1, 2), st.integers(2, 8), st.data(), SEEDS)
def test_transformer_output_sees_only_earlier_positions_and_itself(
    setup, batch_size, seq_len, data, seed
):
    """Changing position j changes no output before j (causality); a candidate (j >= offset)
    changes no output but its own (isolation). Without an offset the whole sequence is causal."""
    offset = data.draw(st.none() | st.integers(1, seq_len), label="candidate_start_offset")
    j = data.draw(st.integers(0, seq_len - 1), label="changed position")
    forward = hk.transform(
        lambda x, mask: setup.transformer_config().make()(x, mask, offset).embeddings
    )
    x = normal(seed, (batch_size, seq_len, setup.emb_size))
    mask = np.ones((batch_size, seq_len), bool)
    params = random_params(forward.init, x, mask, seed=seed)
    changed = x.copy()
    changed[:, j] = normal(seed + 1, changed[:, j].shape)
    apply = jax.jit(forward.apply)
    before = np.asarray(apply(params, None, x, mask))
    after = np.asarray(apply(params, None, changed, mask))

    q = np.arange(seq_len)
    affected = q >= j if offset is None or j < offset else q == j
    np.testing.assert_array_equal(after[:, ~affected], before[:, ~affected])
    assert np.all(np.any(after[:, j] != before[:, j], axis=-1))


@settings(max_examples=6, deadline=None, derandomize=True)  # compiles per example
@given(
    setup=setups(),
    context_len=st.integers(1, 5),
    num_candidates=st.integers(1, 4),
    seed=SEEDS,
)
def test_cached_candidates_equal_the_dense_forward(setup, context_len, num_candidates, seed):
    """encode_context + score_candidates give the dense forward's outputs: the context rows
    from the encoding, each candidate row from scoring it against the cache at its own position,
    with padded context positions and padded candidates in the sequence."""
    batch_size, total = 2, context_len + num_candidates
    x = normal(seed, (batch_size, total, setup.emb_size))
    rng = np.random.default_rng(seed)
    mask = rng.random((batch_size, total)) < 0.75
    mask[:, 0] = True  # at least one valid context position per row

    def both(x, mask):
        transformer = setup.transformer_config().make()
        dense = transformer(x, mask, candidate_start_offset=context_len).embeddings
        encoded, cache = transformer.encode_context(x[:, :context_len], mask[:, :context_len])
        positions = jnp.arange(context_len, total, dtype=jnp.float32)[None, :]
        scored = transformer.score_candidates(
            x[:, context_len:], mask[:, context_len:], cache, positions
        )
        return dense, encoded.embeddings, scored.embeddings

    forward = hk.transform(both)
    params = random_params(forward.init, x, mask, seed=seed)
    dense, encoded, scored = map(np.asarray, jax.jit(forward.apply)(params, None, x, mask))
    np.testing.assert_allclose(encoded, dense[:, :context_len], rtol=RTOL, atol=ATOL)
    valid = mask[:, context_len:]
    np.testing.assert_allclose(scored[valid], dense[:, context_len:][valid], rtol=RTOL, atol=ATOL)


def test_decoder_layer_padding_mask_masks_keys():
    """DecoderLayer's `padding_mask` masks padded keys, as folding it into `mask` does."""
    x = normal(0, (2, 5, Setup().emb_size))
    padding = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]], bool)
    causal = np.tril(np.ones((5, 5), bool))[None, None]
    forward = hk.transform(
        lambda x, mask, padding: grok.DecoderLayer(2, 1, 4, num_layers=1)(x, mask, padding)
    )
    params = random_params(forward.init, x, causal, None)
    apply = jax.jit(lambda *args: forward.apply(params, None, x, *args).embeddings)
    folded = np.asarray(apply(causal & padding[:, None, None, :], None))
    np.testing.assert_array_equal(np.asarray(apply(causal, padding)), folded)
    assert np.any(np.asarray(apply(causal, None)) != folded)


# The published constructor signatures: (name, default or REQUIRED), in order, '*' where the
# keyword-only arguments start.
REQUIRED = inspect.Parameter.empty
PUBLISHED_SIGNATURES = {
    grok.MultiHeadAttention: [
        ("num_q_heads", REQUIRED),
        ("num_kv_heads", REQUIRED),
        ("key_size", REQUIRED),
        "*",
        ("with_bias", True),
        ("value_size", None),
        ("model_size", None),
        ("attn_output_multiplier", 1.0),
        ("name", None),
    ],
    grok.MHABlock: [
        ("num_q_heads", REQUIRED),
        ("num_kv_heads", REQUIRED),
        ("key_size", REQUIRED),
        ("attn_output_multiplier", 1.0),
    ],
    grok.DenseBlock: [
        ("num_q_heads", REQUIRED),
        ("num_kv_heads", REQUIRED),
        ("key_size", REQUIRED),
        ("widening_factor", 4.0),
    ],
    grok.DecoderLayer: [
        ("num_q_heads", REQUIRED),
        ("num_kv_heads", REQUIRED),
        ("key_size", REQUIRED),
        ("num_layers", REQUIRED),
        ("layer_index", None),
        ("widening_factor", 4.0),
        ("name", None),
        ("attn_output_multiplier", 1.0),
    ],
    grok.Transformer: [
        ("num_q_heads", REQUIRED),
        ("num_kv_heads", REQUIRED),
        ("key_size", REQUIRED),
        ("widening_factor", REQUIRED),
        ("attn_output_multiplier", REQUIRED),
        ("num_layers", REQUIRED),
        ("name", None),
    ],
    grok.RotaryEmbedding: [("dim", REQUIRED), ("name", None), ("base_exponent", 10000)],
}


@pytest.mark.parametrize("module", PUBLISHED_SIGNATURES, ids=lambda m: m.__name__)
def test_constructors_take_the_published_arguments(module):
    """Same names, order, defaults and keyword-only split as the published modules (extra
    trailing arguments with defaults are allowed)."""
    parameters = list(inspect.signature(module).parameters.values())
    got, keyword_only = [], False
    for p in parameters:
        if p.kind == p.KEYWORD_ONLY and not keyword_only:
            got.append("*")
            keyword_only = True
        got.append((p.name, p.default))
    want = PUBLISHED_SIGNATURES[module]
    assert got[: len(want)] == want
    assert all(p.default is not REQUIRED for p in parameters[len(want) :])


def test_unused_published_arguments_are_not_stored():
    """Arguments no computation reads are accepted but not kept on the module."""

    def stored():
        modules = {
            "num_layers layer_index": grok.DecoderLayer(2, 1, 4, num_layers=3, layer_index=1),
            "num_q_heads num_kv_heads key_size": grok.DenseBlock(2, 1, 4),
            "with_bias": grok.MultiHeadAttention(2, 1, 4, with_bias=False),
        }
        return [a for names, m in modules.items() for a in names.split() if a in vars(m)]

    assert hk.transform(stored).apply({}, None) == []


def test_transformer_config_takes_jax_and_numpy_scalars_as_their_numbers():
    config = TransformerConfig(
        emb_size=np.int64(12),
        num_q_heads=jnp.int32(2),
        num_kv_heads=np.array(1),
        num_layers=1,
        widening_factor=jnp.float32(2),
    )
    assert (config.emb_size, config.num_q_heads, config.num_kv_heads) == (12, 2, 1)
    assert type(config.num_q_heads) is int and type(config.widening_factor) is float


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(num_q_heads=3, num_kv_heads=2),
            r"num_q_heads \(3\) must be a multiple of num_kv_heads \(2\) for grouped-query",
        ),
        (dict(num_layers=0), "num_layers must be a positive integer, got 0"),
        (dict(widening_factor=0), "widening_factor must be positive"),
        (dict(key_size=3), "key_size must be even"),
        (dict(num_q_heads=None), "TransformerConfig needs num_q_heads"),
        (dict(num_layers=2.0), r"num_layers must be a positive integer, got 2\.0"),
        (dict(num_q_heads="2"), "num_q_heads must be a positive integer, got '2'"),
        (dict(num_layers=float("inf")), "num_layers must be a positive integer, got inf"),
        (dict(key_size=4.0), r"key_size must be a positive integer, got 4\.0"),
        (dict(num_kv_heads=True), "num_kv_heads must be a positive integer, got True"),
        (
            dict(attn_output_multiplier=float("nan")),
            "attn_output_multiplier must be a finite number in float32's range, got nan",
        ),
        (dict(attn_output_multiplier="x"), "attn_output_multiplier must be a finite number"),
        (dict(widening_factor=float("inf")), "widening_factor must be a finite number .*, got inf"),
        (dict(attn_output_multiplier=1e39), r"attn_output_multiplier must be .*, got 1e\+39"),
    ],
)
def test_transformer_config_refuses_what_cannot_be_built(kwargs, message):
    arguments = dict(emb_size=12, num_q_heads=2, num_kv_heads=1, num_layers=1) | kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        TransformerConfig(**arguments)


# ---------------------------------------------------------------------------------------------
# Right-anchored rotary positions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask, history_len, expected",
    [
        # Left-aligned history of 2 in 4 (as the published function handles it too).
        ([1, 1, 1, 0, 0, 1, 1], 4, [0, 3, 4, 0, 0, 5, 5]),
        # A hole: the published function gives [0, 3, 0, 0, 6, 5, 5], a history item beyond
        # the candidates; the newest valid item belongs at 1 + S - 1 = 4.
        ([1, 1, 0, 0, 1, 1, 1], 4, [0, 3, 0, 0, 4, 5, 5]),
        ([1, 1, 1, 1, 1, 1], 4, [0, 1, 2, 3, 4, 5]),  # full history, one candidate
        ([0, 1, 1, 0, 1, 0], 3, [0, 2, 3, 0, 4, 0]),  # padded user; a padded candidate
        ([1, 0, 0, 0, 1, 1], 3, [0, 0, 0, 0, 4, 4]),  # no history at all
    ],
)
def test_right_anchored_positions_hand_values(mask, history_len, expected):
    positions = grok.right_anchored_rope_positions(np.array([mask], bool), history_len, 1)
    assert positions.dtype == jnp.float32
    np.testing.assert_array_equal(positions[0], expected)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 6), st.integers(1, 4), st.integers(0, 3), st.data())
def test_right_anchored_positions_anchor_the_history_to_the_candidates(s, c, p, data):
    """Valid history items take consecutive positions ending at P + S - 1, in order, whatever
    the padding; valid candidates sit at P + S; prefix tokens keep their index."""
    valid = np.array(data.draw(st.lists(st.booleans(), min_size=p + s + c, max_size=p + s + c)))
    positions = np.asarray(grok.right_anchored_rope_positions(valid[None], s, p))[0]
    history = np.flatnonzero(valid[p : p + s]) + p
    np.testing.assert_array_equal(
        positions[history], p + s - len(history) + np.arange(len(history))
    )
    candidates = np.flatnonzero(valid[p + s :]) + p + s
    assert np.all(positions[candidates] == p + s)
    prefix = np.flatnonzero(valid[:p])
    np.testing.assert_array_equal(positions[prefix], prefix)
    assert np.all(positions[~valid] == 0)


def test_rotary_cos_sin_equal_jnp_bit_for_bit_non_finite_included():
    phase = jnp.array(
        [[[0.0, 1.0, -2.5, 1e4], [jnp.nan, jnp.inf, -jnp.inf, 3.0e7]]], jnp.float32
    )  # [1, 2, 4]
    cos, sin = jax.jit(grok._cos_sin)(phase)
    np.testing.assert_array_equal(cos, jax.jit(jnp.cos)(phase))
    np.testing.assert_array_equal(sin, jax.jit(jnp.sin)(phase))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 5, 64)])
def test_narrow_products_are_float32_sums_rounded_once(shape, dtype):
    """Integers small enough that every float32 sum is exact, in any order, but too large for
    the narrow type (sums of a few thousand, more than bfloat16's 8 or float16's 11 significant
    bits hold): the product is the exact sum rounded once, not sums rounded along the way, and
    on the CPU the traced program asks for float32 sums (which lets XLA there multiply
    bfloat16 directly rather than widen both inputs); float32 inputs give jnp.dot's values bit
    for bit."""
    rng = np.random.default_rng(len(shape))
    x = rng.integers(0, 13, shape).astype(np.float32)
    w = rng.integers(0, 13, (64, 24)).astype(np.float32)
    exact = x.reshape(-1, 64) @ w
    rounded = np.asarray(jnp.asarray(exact).astype(dtype), np.float32)
    assert not np.array_equal(exact, rounded)
    narrow = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    got = jax.jit(grok.matmul_2d)(*narrow)
    assert got.dtype == dtype and got.shape == (*shape[:-1], 24)
    np.testing.assert_array_equal(np.asarray(got, np.float32).reshape(-1, 24), rounded)
    if jax.default_backend() == "cpu":
        assert "preferred_element_type=float32" in str(jax.make_jaxpr(grok.matmul_2d)(*narrow))
    x32, w32 = normal(1, shape), normal(2, (64, 24))
    np.testing.assert_array_equal(jax.jit(grok.matmul_2d)(x32, w32), jax.jit(jnp.dot)(x32, w32))


def _small_attention(batch: int) -> tuple[hk.Transformed, np.ndarray, hk.Params]:
    """Self-attention of 2 heads of 8 over 5 positions, an input [batch, 5, 16], parameters."""
    mask = jnp.ones((1, 1, 5, 5))
    attention = hk.transform(lambda x: grok.MHABlock(2, 2, 8)(x, mask).embeddings)
    x = normal(0, (batch, 5, 16))
    return attention, x, attention.init(jax.random.PRNGKey(0), x)


def _compiled_attention_gradient() -> str:
    """The compiled program of a small attention's parameter gradient, as text."""
    attention, x, params = _small_attention(batch=3)

    def loss(params):
        return jnp.sum(jnp.square(attention.apply(params, None, x)))

    return jax.jit(jax.grad(loss)).lower(params).compile().as_text()


def test_attention_gradient_computes_cos_once_per_rotation_on_the_cpu():
    """XLA would fuse the rotation's cos into every consumer: the queries' and keys' rotations
    and their gradients, each recomputing it per element of every head."""
    if jax.default_backend() != "cpu":
        pytest.skip("the fusion boundary is placed on the CPU only")
    hlo = _compiled_attention_gradient()
    # Once for the queries' positions and once for the keys': not again in each consumer.
    assert hlo.count(" cosine(") <= 2
    assert hlo.count(" sine(") <= 2


def _plain_products(q, k, w, v):
    return jnp.einsum("...td,...sd->...ts", q, k), jnp.einsum("...ts,...sd->...td", w, v)


@settings(max_examples=8, deadline=None, derandomize=True)  # compiles per example
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    t=st.integers(1, 7),
    s=st.integers(1, 7),
    d=st.integers(1, 9),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=SEEDS,
)
def test_attention_products_and_their_gradients_equal_autodiff(batch, t, s, d, dtype, seed):
    """The written-out gradients of the attention's two products sum the same terms as
    autodiff's (in an order the matrix kernel picks): values and gradients equal to rounding,
    compiled, in float32 and bfloat16."""
    q, k, w, v, up_logits, up_values = (
        normal(seed + i, (*batch, *shape)).astype(dtype)
        for i, shape in enumerate([(t, d), (s, d), (t, s), (s, d), (t, s), (t, d)])
    )

    def products(q, k, w, v):
        return grok.query_key_products(q, k), grok.weighted_values(w, v)

    def pulled_back(fn):
        outputs, pull = jax.vjp(fn, q, k, w, v)
        return outputs, pull((up_logits, up_values))

    got, want = (
        jax.jit(pulled_back, static_argnums=0)(products),
        jax.jit(pulled_back, static_argnums=0)(_plain_products),
    )
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(e, np.float32), tolerance, tolerance
        )


def test_attention_gradient_products_sum_over_the_last_axis_of_their_first_operand_on_the_cpu():
    """Autodiff's gradients of the attention products sum over the first matrix axis of both
    operands, which XLA on the CPU leaves to a slow general kernel; written out, every batched
    product of the compiled gradient sums over its first operand's last axis."""
    if jax.default_backend() != "cpu":
        pytest.skip("the transposed copies are made on the CPU only")
    hlo = _compiled_attention_gradient()
    batched = re.findall(
        r"= f32\[([\d,]*)\]\S* dot\(.*lhs_batch_dims=\{[\d,]*\}, "
        r"lhs_contracting_dims=\{(\d+)\}",
        hlo,
    )
    assert len(batched) >= 6  # forward and gradient of both products
    for shape, contracted in batched:
        assert int(contracted) == shape.count(",")  # the last of rank-many axes


def test_uncompiled_attention_compiles_nothing_once_warm():
    """The rotary's cos and sin: an uncompiled call must not trace and compile them anew."""
    compiles = []

    def listen(name, seconds, **_):
        compiles.append(name)

    attention, x, params = _small_attention(batch=1)
    attention.apply(params, None, x)  # warm: each operation compiled once
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        attention.apply(params, None, x)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not [name for name in compiles if "compile" in name]
