"""The models against an independent NumPy transcription of the published numerics.

The `ref_*` functions below are written from the published formulas alone, in float64 NumPy
with no JAX. Every model is run under random non-zero parameters (a fresh model is all zeros and
would hide almost any mistake) and compared with them, so a wrong concatenation order, mask, norm
placement, head grouping, rotary phase or soft-cap shows up as a numerical mismatch.
"""

import dataclasses
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grok
import recsys_model
import recsys_retrieval_model

# float32 model against float64 reference; errors are relative to the output's scale. The models
# are run under jax.jit: one compilation is far cheaper than compiling every op eagerly.
RTOL = 2e-5
ATOL_FRACTION = 5e-6

RMS_EPS = 1e-5
ROPE_BASE = 10000.0
SOFT_CAP = 30.0
MASKED_LOGIT = -1e30
L2_EPS = 1e-12
RETRIEVAL_INF = 1e12
# hk.initializers.VarianceScaling draws from a normal truncated at two of its own standard
# deviations, rescaled by this factor so that the truncated draw has the requested variance.
TRUNCATED_NORMAL_STD_FACTOR = 0.87962566103423978


def assert_close(actual, expected, rtol=RTOL):
    """Compares a model output with the reference, with an absolute floor set by its scale."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=ATOL_FRACTION * scale)


# ---------------------------------------------------------------------------------------------
# NumPy reference of the published formulas.
# ---------------------------------------------------------------------------------------------


def ref_ffn_size(emb_size, widening_factor):
    width = int(widening_factor * emb_size) * 2 // 3
    return -(-width // 8) * 8


def ref_recsys_mask(seq_len, offset):
    """[T, T]: causal, except that among positions >= offset only the diagonal is kept."""
    mask = np.tril(np.ones((seq_len, seq_len)))
    mask[offset:, offset:] = np.eye(seq_len - offset)
    return mask


def ref_rms_norm(x, scale):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * scale


def ref_rotate_half(x):
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def ref_rope(x, t):
    """x [B, T, heads, dim], positions t [B or 1, T]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / ROPE_BASE ** (np.arange(0, dim, 2) / dim)
    phase = np.asarray(t, np.float64)[:, :, None] * inv_freq  # [B, T, dim/2]
    phase = np.concatenate([phase, phase], axis=-1)[:, :, None, :]
    return x * np.cos(phase) + ref_rotate_half(x) * np.sin(phase)


def ref_softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def ref_mha(
    x, w, mask, num_q_heads, num_kv_heads, key_size, multiplier, soft_cap=True, positions=None
):
    """Self-attention. x [B, T, D]; w: query/key/value/linear [in, out]; mask [B|1, 1, T, T];
    rotary positions [B|1, T] (default 0 .. T-1)."""
    b, t, _ = x.shape
    q = (x @ w["query"]).reshape(b, t, num_q_heads, key_size)
    k = (x @ w["key"]).reshape(b, t, num_kv_heads, key_size)
    v = (x @ w["value"]).reshape(b, t, num_kv_heads, key_size)
    positions = np.arange(t)[None, :] if positions is None else positions
    q, k = ref_rope(q, positions), ref_rope(k, positions)
    # Query head h reads kv head h // (H / K).
    group = num_q_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * multiplier
    if soft_cap:
        logits = SOFT_CAP * np.tanh(logits / SOFT_CAP)
    logits = np.where(np.asarray(mask) != 0, logits, MASKED_LOGIT)
    weights = ref_softmax(logits)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, num_q_heads * key_size)
    return out @ w["linear"]


def ref_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_silu(x):
    return x / (1.0 + np.exp(-x))


def leaf(params, module, name):
    return np.asarray(params[module][name], np.float64)


def ref_transformer(params, x, padding_mask, offset, cfg, positions=None):
    """x [B, T, D], padding_mask [B, T]; offset None means a plain causal mask."""
    t = x.shape[1]
    structure = ref_recsys_mask(t, offset) if offset is not None else np.tril(np.ones((t, t)))
    mask = padding_mask[:, None, None, :].astype(np.float64) * structure[None, None]
    h = np.asarray(x, np.float64)
    for i in range(cfg.L):
        layer = f"transformer/decoder_layer_{i}"
        attn_w = {
            name: leaf(params, f"{layer}/multi_head_attention/{name}", "w")
            for name in ("query", "key", "value", "linear")
        }

        def norm(y, name, layer=layer):
            return ref_rms_norm(y, leaf(params, f"{layer}/{name}", "scale"))

        attn = ref_mha(
            norm(h, "rms_norm"), attn_w, mask, cfg.H, cfg.K, cfg.d, cfg.mult, positions=positions
        )
        h = h + norm(attn, "rms_norm_1")
        y = norm(h, "rms_norm_2")
        gated = ref_gelu(y @ leaf(params, f"{layer}/linear", "w"))
        gated = gated * (y @ leaf(params, f"{layer}/linear_v", "w"))
        h = h + norm(gated @ leaf(params, f"{layer}/linear_1", "w"), "rms_norm_3")
    return h


def ref_post_age_bucket(impression, created, granularity):
    """One timestamp pair (unix seconds) to its bucket, in plain Python."""
    if impression == 0 or created == 0 or impression < created:
        return 0
    minutes = (impression - created) // 60
    return min(minutes // granularity + 1, 4800 // granularity + 1)


def ref_anchored_positions(padding, history_len):
    """Positions [B, T] for one prefix token: newest valid history item at S, older valid
    ones one step before the next valid one, candidates at 1 + S, padding at 0."""
    positions = np.zeros(padding.shape)
    for row, valid in enumerate(padding):
        position = history_len  # 1 + S - 1
        for j in range(history_len, 0, -1):
            if valid[j]:
                positions[row, j] = position
                position -= 1
        positions[row, 1 + history_len :] = 1 + history_len
        positions[row, 0] = 0
    return positions * padding


def ref_user_and_history(params, module, batch, emb, cfg):
    """The user token and history tokens, [B, 1 + S, D], and their padding mask [B, 1 + S]."""
    b, s = batch["history_post_hashes"].shape[:2]
    user = emb["user_embeddings"].reshape(b, 1, cfg.Hu * cfg.D) @ leaf(params, module, "proj_mat_1")
    if module == "phoenix_model" and cfg.Hip:  # IP embeddings: summed, added, unprojected
        user = user + np.sum(emb["user_ip_embeddings"], axis=1, keepdims=True)
    actions = np.asarray(batch["history_actions"], np.float64)
    action_emb = (2.0 * actions - 1.0) @ leaf(params, module, "action_projection")
    action_emb = action_emb * np.any(actions != 0, axis=-1, keepdims=True)
    table = leaf(params, module, "product_surface_embedding_table")
    surface = np.eye(cfg.V)[batch["history_product_surface"]] @ table
    pieces = [
        emb["history_post_embeddings"].reshape(b, s, cfg.Hi * cfg.D),
        emb["history_author_embeddings"].reshape(b, s, cfg.Ha * cfg.D),
        action_emb,
        surface,
    ]
    if module == "phoenix_model" and cfg.release == 2:
        continuous = batch.get("history_continuous_actions")
        dwell = np.zeros((b, s, 1)) if continuous is None else continuous[..., 1:2]
        dwell = np.clip(dwell, 0.0, 30.0) / 30.0
        hidden = ref_gelu(dwell @ leaf(params, module, "history_dwell_time_proj1"))
        pieces.append(hidden @ leaf(params, module, "history_dwell_time_proj2"))
    history = np.concatenate(pieces, axis=-1) @ leaf(params, module, "proj_mat_3")
    tokens = np.concatenate([user, history], axis=1)
    padding = np.concatenate(
        [batch["user_hashes"][:, :1] != 0, batch["history_post_hashes"][:, :, 0] != 0], axis=1
    )
    return tokens, padding


def ref_ranker_outputs(params, batch, emb, cfg):
    """Logits [B, C, A] and, second release, continuous predictions [B, C, Nc]."""
    module = "phoenix_model"
    b, c = batch["candidate_post_hashes"].shape[:2]
    tokens, padding = ref_user_and_history(params, module, batch, emb, cfg)
    table = leaf(params, module, "product_surface_embedding_table")
    pieces = [
        emb["candidate_post_embeddings"].reshape(b, c, cfg.Hi * cfg.D),
        emb["candidate_author_embeddings"].reshape(b, c, cfg.Ha * cfg.D),
        np.eye(cfg.V)[batch["candidate_product_surface"]] @ table,
    ]
    if cfg.release == 2:
        impressions = batch.get("candidate_impr_ts", np.zeros((b, c), int))
        created = batch.get("candidate_post_creation_ts", np.zeros((b, c), int))
        bucket = np.vectorize(lambda i, t: ref_post_age_bucket(int(i), int(t), cfg.granularity))
        buckets = bucket(impressions, created)
        pieces.append(leaf(params, module, "post_age_embedding_table")[buckets])
    candidates = np.concatenate(pieces, axis=-1) @ leaf(params, module, "proj_mat_2")
    offset = tokens.shape[1]
    tokens = np.concatenate([tokens, candidates], axis=1)
    padding = np.concatenate([padding, batch["candidate_post_hashes"][:, :, 0] != 0], axis=1)
    positions = ref_anchored_positions(padding, offset - 1) if cfg.anchored else None
    h = ref_transformer(params, tokens, padding, offset, cfg, positions)
    h = ref_rms_norm(h, leaf(params, "phoenix_model/rms_norm", "scale"))[:, offset:]
    logits = h @ leaf(params, module, "unembeddings")
    if cfg.release != 2:
        return logits, None
    continuous = 1.0 / (1.0 + np.exp(-(h @ leaf(params, module, "continuous_unembeddings"))))
    return logits, continuous


def ref_l2_normalize(x):
    norm = np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), L2_EPS))
    return x / norm, norm


def ref_user_representation(params, batch, emb, cfg):
    tokens, padding = ref_user_and_history(params, "phoenix_retrieval_model", batch, emb, cfg)
    h = ref_transformer(params, tokens, padding, None, cfg)
    valid = padding[:, :, None].astype(np.float64)
    mean = np.sum(h * valid, axis=1) / np.maximum(np.sum(valid, axis=1), 1.0)
    return ref_l2_normalize(mean)


def ref_candidate_tower(params, module, post_author):
    """post_author [..., Hi + Ha, D] -> unit vectors [..., D]."""
    x = np.asarray(post_author, np.float64)
    x = x.reshape(*x.shape[:-2], -1)
    hidden = ref_silu(x @ leaf(params, module, "candidate_tower_projection_1"))
    return ref_l2_normalize(hidden @ leaf(params, module, "candidate_tower_projection_2"))[0]


def ref_top_k(user, corpus, corpus_mask, top_k):
    scores = user @ np.asarray(corpus, np.float64).T
    if corpus_mask is not None:
        scores = np.where(corpus_mask[None, :], scores, -RETRIEVAL_INF)
    # lax.top_k puts the lower index first among equal scores, as a stable sort does.
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(scores, order, axis=-1), scores


# ---------------------------------------------------------------------------------------------
# Configurations, inputs and random parameters.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """A tiny configuration: D width, d key size, H/K query/key-value heads, L layers, Hu/Hi/Ha
    hashes, A actions, S history, C candidates, V product surfaces, B batch."""

    # The transformer (H * d != D on purpose).
    D: int = 16
    d: int = 6
    H: int = 4
    K: int = 2
    L: int = 2
    widening: float = 2.0
    mult: float = 0.5

    # Hashes, actions and product surfaces.
    Hu: int = 1
    Hi: int = 2
    Ha: int = 3
    A: int = 5
    V: int = 7

    # Inputs.
    S: int = 6
    C: int = 3
    B: int = 2

    # The second release.
    release: int = 1
    anchored: bool = False
    Hip: int = 0
    Nc: int = 3
    hidden: int = 4
    granularity: int = 60


CASES = [
    Case(),
    Case(D=8, d=4, H=2, K=1, L=1, widening=4.0, mult=1.5, Hu=2, Hi=1, Ha=2, A=3, S=5, C=4, V=4),
    Case(D=12, d=8, H=3, K=3, L=3, widening=1.5, mult=0.125, Hu=3, Hi=2, Ha=1, A=4, S=4, C=2),
]


def transformer_config(case):
    return grok.TransformerConfig(case.D, case.d, case.H, case.K, case.L, case.widening, case.mult)


def hash_config(case):
    return recsys_model.HashConfig(case.Hu, case.Hi, case.Ha, case.Hip)


def config_arguments(case):
    return dict(
        model=transformer_config(case),
        emb_size=case.D,
        history_seq_len=case.S,
        candidate_seq_len=case.C,
        fprop_dtype=jnp.float32,
        hash_config=hash_config(case),
        product_surface_vocab_size=case.V,
    )


def ranker_config(case):
    return recsys_model.PhoenixModelConfig(
        num_actions=case.A,
        post_age_granularity_mins=case.granularity,
        num_continuous_actions=case.Nc,
        continuous_action_hidden_dim=case.hidden,
        right_anchored_rope=case.anchored,
        release=case.release,
        **config_arguments(case),
    )


def retrieval_config(case):
    return recsys_retrieval_model.PhoenixRetrievalModelConfig(**config_arguments(case))


def make_inputs(case, seed=0):
    """NumPy batch and embeddings with padded history slots and one padded candidate.

    Padded slots still carry non-zero embeddings, so only the masks keep them out.
    """
    rng = np.random.default_rng(seed)
    b, s, c = case.B, case.S, case.C
    batch = {
        "user_hashes": rng.integers(1, 1000, (b, case.Hu)),
        "history_post_hashes": rng.integers(1, 1000, (b, s, case.Hi)),
        "history_author_hashes": rng.integers(1, 1000, (b, s, case.Ha)),
        "history_actions": (rng.random((b, s, case.A)) < 0.4).astype(np.float32),
        "history_product_surface": rng.integers(0, case.V, (b, s)),
        "candidate_post_hashes": rng.integers(1, 1000, (b, c, case.Hi)),
        "candidate_author_hashes": rng.integers(1, 1000, (b, c, case.Ha)),
        "candidate_product_surface": rng.integers(0, case.V, (b, c)),
    }
    batch["history_post_hashes"][0, -2:] = 0  # padded tail
    batch["history_post_hashes"][1, 1] = 0  # padded slot in the middle
    batch["history_post_hashes"][1, 0, 1:] = 0  # only hash 0 decides padding
    batch["history_actions"][0, 0] = 0.0  # a valid slot with no action at all
    batch["history_actions"][1, 2] = 1.0
    batch["candidate_post_hashes"][1, -1] = 0  # padded candidate
    batch = {
        k: v.astype(np.float32 if k == "history_actions" else np.int32) for k, v in batch.items()
    }

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    emb = {
        "user_embeddings": normal(b, case.Hu, case.D),
        "history_post_embeddings": normal(b, s, case.Hi, case.D),
        "candidate_post_embeddings": normal(b, c, case.Hi, case.D),
        "history_author_embeddings": normal(b, s, case.Ha, case.D),
        "candidate_author_embeddings": normal(b, c, case.Ha, case.D),
    }
    if case.release == 2:
        # Dwell times around the norm scale (some clipped), ages up to past the cap, one
        # impression without timestamps and one post "created" after it (bucket 0).
        batch["history_continuous_actions"] = (40 * rng.random((b, s, case.Nc))).astype(np.float32)
        impressions = np.full((b, c), 1_700_000_000, np.int32)
        ages = rng.integers(0, 6000 * 60, (b, c))
        ages[0, 0] = -100
        created = (impressions - ages).astype(np.int32)
        impressions[1, 0] = 0
        batch["candidate_impr_ts"], batch["candidate_post_creation_ts"] = impressions, created
    if case.Hip:
        batch["user_ip_hashes"] = rng.integers(1, 1000, (b, case.Hip)).astype(np.int32)
        emb["user_ip_embeddings"] = normal(b, case.Hip, case.D)
    return batch, emb


def to_model_inputs(batch, emb):
    return (
        recsys_model.RecsysBatch(**{k: jnp.asarray(v) for k, v in batch.items()}),
        recsys_model.RecsysEmbeddings(**{k: jnp.asarray(v) for k, v in emb.items()}),
    )


def random_params(init, *args, seed=1):
    """Parameters with the tree `init` would make, every leaf drawn at random.

    Weights ~ N(0, 1 / fan_in), norm scales ~ 1 + 0.1 N(0, 1). Only shapes are traced, which
    is much faster than running the initialisers eagerly.
    """
    return randomize(jax.eval_shape(init, jax.random.PRNGKey(0), *args), seed)


def randomize(params, seed=1):
    rng = np.random.default_rng(seed)

    def draw(x):
        if len(x.shape) == 1:
            value = 1.0 + 0.1 * rng.standard_normal(x.shape)
        else:
            value = rng.standard_normal(x.shape) / np.sqrt(x.shape[0])
        return jnp.asarray(value, jnp.float32)

    return jax.tree.map(draw, params)


def flat_tree(params):
    return {
        f"{module}/{name}": (tuple(value.shape), np.dtype(value.dtype))
        for module, leaves in params.items()
        for name, value in leaves.items()
    }


# ---------------------------------------------------------------------------------------------
# grok.py pieces.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("emb_size", "widening", "expected"),
    [
        (128, 2.0, 176),  # int(256 * 2 / 3) = 170, rounded up to 176
        (128, 4.0, 344),
        (64, 4.0, 176),
        (48, 4.0, 128),
        (48, 1.0, 32),  # already a multiple of 8
        (8, 4.0, 24),  # 21 -> 24
        (7, 2.5, 16),
    ],
)
def test_ffn_size_hand_values(emb_size, widening, expected):
    assert grok.ffn_size(emb_size, widening) == expected


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(1, 512), st.sampled_from([0.5, 1.0, 1.5, 2.0, 2.5, 4.0, 8.0 / 3.0]))
def test_ffn_size_is_two_thirds_of_widened_size_rounded_up_to_eight(emb_size, widening):
    assert grok.ffn_size(emb_size, widening) == ref_ffn_size(emb_size, widening)


def test_rotate_half():
    x = jnp.arange(8.0)
    np.testing.assert_array_equal(grok.rotate_half(x), [-4, -5, -6, -7, 0, 1, 2, 3])
    y = np.random.default_rng(0).standard_normal((2, 3, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(grok.rotate_half(jnp.asarray(y)), ref_rotate_half(y))


def test_linear_is_x_at_w_plus_b():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    f = hk.transform(lambda x: grok.Linear(5)(x))
    params = f.init(jax.random.PRNGKey(0), x)
    assert flat_tree(params) == {
        "linear/w": ((4, 5), np.dtype(np.float32)),
        "linear/b": ((5,), np.dtype(np.float32)),
    }
    assert all(not np.any(v) for v in jax.tree.leaves(params))
    params = randomize(params)
    expected = x @ leaf(params, "linear", "w") + leaf(params, "linear", "b")
    assert_close(f.apply(params, None, x), expected)


def test_rms_norm_in_float32_cast_back():
    d = 10
    x = 3.0 * np.random.default_rng(0).standard_normal((2, 3, d)).astype(np.float32)
    f = hk.transform(lambda x: grok.RMSNorm(axis=-1)(x))
    params = f.init(jax.random.PRNGKey(0), x)
    assert flat_tree(params) == {"rms_norm/scale": ((d,), np.dtype(np.float32))}
    assert not np.any(params["rms_norm"]["scale"])
    params = randomize(params)
    expected = ref_rms_norm(x, leaf(params, "rms_norm", "scale"))
    out = f.apply(params, None, x)
    assert out.dtype == jnp.float32
    assert_close(out, expected)
    # bfloat16 in, bfloat16 out; computed in float32, so only the final rounding differs.
    out = f.apply(params, None, jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    x_bf16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    ref_bf16 = ref_rms_norm(x_bf16, leaf(params, "rms_norm", "scale"))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_bf16, rtol=2**-8, atol=1e-6)


def test_rotary_embedding_default_and_explicit_positions():
    b, t, heads, dim, offset = 2, 7, 3, 8, 3
    x = np.random.default_rng(0).standard_normal((b, t, heads, dim)).astype(np.float32)
    positions = np.random.default_rng(1).uniform(0, 50, (b, t)).astype(np.float32)
    f = hk.transform(lambda x, t=None: grok.RotaryEmbedding(dim)(x, seq_dim=1, offset=offset, t=t))
    assert f.init(jax.random.PRNGKey(0), x) == {}
    apply = jax.jit(f.apply)
    out = apply({}, None, jnp.asarray(x))
    assert out.dtype == jnp.float32
    assert_close(out, ref_rope(x, (np.arange(t) + offset)[None, :]))
    assert_close(apply({}, None, jnp.asarray(x), jnp.asarray(positions)), ref_rope(x, positions))


@pytest.mark.parametrize("const_position, expected", [(5, [5] * 7), (0, range(3, 10))])
def test_rotary_embedding_constant_position(const_position, expected):
    """Every position at the constant; as in Grok-1, a constant of 0 means none (positions from
    the offset)."""
    x = np.random.default_rng(0).standard_normal((2, 7, 3, 8)).astype(np.float32)
    f = hk.transform(
        lambda x: grok.RotaryEmbedding(8)(x, seq_dim=1, offset=3, const_position=const_position)
    )
    assert_close(f.apply({}, None, jnp.asarray(x)), ref_rope(x, np.asarray([expected])))


def test_grouped_query_attention_matches_reference():
    b, t, d_model, heads, kv_heads, key_size, multiplier = 2, 6, 12, 4, 2, 6, 0.7
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, t, d_model)).astype(np.float32)
    mask = (rng.random((b, 1, t, t)) < 0.6).astype(np.float32)
    mask[1, 0, 2] = 0.0  # a query that sees nothing: uniform weights over -1e30 logits

    def forward(x, mask):
        attention = grok.MultiHeadAttention(
            num_q_heads=heads,
            num_kv_heads=kv_heads,
            key_size=key_size,
            model_size=d_model,
            attn_output_multiplier=multiplier,
        )
        return attention(x, x, x, mask).embeddings

    f = hk.transform(forward)
    params = jax.eval_shape(f.init, jax.random.PRNGKey(0), x, mask)
    f32 = np.dtype(np.float32)
    assert flat_tree(params) == {
        "multi_head_attention/query/w": ((d_model, heads * key_size), f32),
        "multi_head_attention/key/w": ((d_model, kv_heads * key_size), f32),
        "multi_head_attention/value/w": ((d_model, kv_heads * key_size), f32),
        "multi_head_attention/linear/w": ((heads * key_size, d_model), f32),
    }
    # Unit-variance weights push logits past the soft cap, so the cap is exercised.
    params = jax.tree.map(lambda w: w * np.sqrt(w.shape[0]), randomize(params))
    w = {k.split("/")[-1]: np.asarray(v["w"], np.float64) for k, v in params.items()}
    out = jax.jit(f.apply)(params, None, jnp.asarray(x), jnp.asarray(mask))
    assert out.dtype == jnp.float32
    expected = ref_mha(x, w, mask, heads, kv_heads, key_size, multiplier)
    assert_close(out, expected)

    # The data can tell apart the mistakes this test is meant to catch.
    uncapped = ref_mha(x, w, mask, heads, kv_heads, key_size, multiplier, soft_cap=False)
    assert np.max(np.abs(uncapped - expected)) > 1e-2 * np.max(np.abs(expected))
    interleaved = dict(w)  # head h reading kv head h % K instead of h // (H / K)
    perm = np.arange(heads).reshape(-1, kv_heads).T.reshape(-1)
    interleaved["query"] = (
        w["query"].reshape(d_model, heads, key_size)[:, perm].reshape(d_model, -1)
    )
    interleaved["linear"] = w["linear"].reshape(heads, key_size, d_model)[perm].reshape(-1, d_model)
    wrong = ref_mha(x, interleaved, mask, heads, kv_heads, key_size, multiplier)
    assert np.max(np.abs(wrong - expected)) > 1e-2 * np.max(np.abs(expected))


@pytest.mark.parametrize(("case", "offset"), [(CASES[0], None), (CASES[1], 4)])
def test_transformer_matches_reference(case, offset):
    t = 1 + case.S + case.C
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.B, t, case.D)).astype(np.float32)
    padding = rng.random((case.B, t)) < 0.75
    padding[:, 0] = True
    f = hk.transform(
        lambda x, m: transformer_config(case).make()(x, m, candidate_start_offset=offset)
    )
    params = random_params(f.init, x, padding)
    out = jax.jit(f.apply)(params, None, jnp.asarray(x), jnp.asarray(padding)).embeddings
    assert out.dtype == jnp.float32
    assert_close(out, ref_transformer(params, x, padding, offset, case))


# ---------------------------------------------------------------------------------------------
# Parameter trees (the published checkpoints' names) and initial values.
# ---------------------------------------------------------------------------------------------


def expected_transformer_tree(case):
    f32 = np.dtype(np.float32)
    ffn = ref_ffn_size(case.D, case.widening)
    tree = {}
    for i in range(case.L):
        layer = f"transformer/decoder_layer_{i}"
        for norm in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            tree[f"{layer}/{norm}/scale"] = ((case.D,), f32)
        attention = f"{layer}/multi_head_attention"
        tree[f"{attention}/query/w"] = ((case.D, case.H * case.d), f32)
        tree[f"{attention}/key/w"] = ((case.D, case.K * case.d), f32)
        tree[f"{attention}/value/w"] = ((case.D, case.K * case.d), f32)
        tree[f"{attention}/linear/w"] = ((case.H * case.d, case.D), f32)
        tree[f"{layer}/linear_v/w"] = ((case.D, ffn), f32)
        tree[f"{layer}/linear/w"] = ((case.D, ffn), f32)
        tree[f"{layer}/linear_1/w"] = ((ffn, case.D), f32)
    return tree


def expected_ranker_tree(case):
    """{path: (shape, dtype)}, the model's own parameters in the order they are created."""
    f32 = np.dtype(np.float32)
    d, hashes = case.D, case.Hi + case.Ha
    model = "phoenix_model"
    if case.release == 1:
        return {
            f"{model}/product_surface_embedding_table": ((case.V, d), f32),
            f"{model}/action_projection": ((case.A, d), f32),
            f"{model}/proj_mat_1": ((case.Hu * d, d), f32),
            f"{model}/proj_mat_3": (((hashes + 2) * d, d), f32),
            f"{model}/proj_mat_2": (((hashes + 1) * d, d), f32),
            f"{model}/unembeddings": ((d, case.A), f32),
            f"{model}/rms_norm/scale": ((d,), f32),
            **expected_transformer_tree(case),
        }
    return {
        f"{model}/product_surface_embedding_table": ((case.V, d), f32),
        f"{model}/action_projection": ((case.A, d), f32),
        f"{model}/history_dwell_time_proj1": ((1, case.hidden), f32),
        f"{model}/history_dwell_time_proj2": ((case.hidden, d), f32),
        f"{model}/proj_mat_1": ((case.Hu * d, d), f32),
        f"{model}/proj_mat_3": (((hashes + 3) * d, d), f32),
        f"{model}/post_age_embedding_table": ((4800 // case.granularity + 2, d), f32),
        f"{model}/proj_mat_2": (((hashes + 2) * d, d), f32),
        f"{model}/unembeddings": ((d, case.A), f32),
        f"{model}/continuous_unembeddings": ((d, case.Nc), f32),
        f"{model}/rms_norm/scale": ((d,), f32),
        **expected_transformer_tree(case),
    }


def expected_retrieval_tree(case):
    f32 = np.dtype(np.float32)
    d, hashes = case.D, case.Hi + case.Ha
    tower = "phoenix_retrieval_model/~build_candidate_representation/candidate_tower"
    return {
        "phoenix_retrieval_model/product_surface_embedding_table": ((case.V, d), f32),
        "phoenix_retrieval_model/action_projection": ((case.A, d), f32),
        "phoenix_retrieval_model/proj_mat_1": ((case.Hu * d, d), f32),
        "phoenix_retrieval_model/proj_mat_3": (((hashes + 2) * d, d), f32),
        f"{tower}/candidate_tower_projection_1": ((hashes * d, 2 * d), f32),
        f"{tower}/candidate_tower_projection_2": ((2 * d, d), f32),
        **expected_transformer_tree(case),
    }


def ranker_forward(case):
    return hk.transform(lambda batch, emb: ranker_config(case).make()(batch, emb))


def retrieval_forward(case, top_k):
    """Runs everything the retrieval model exposes, so that init sees every parameter."""

    def forward(batch, emb, corpus, corpus_masks):
        model = retrieval_config(case).make()
        user = model.build_user_representation(batch, emb)
        candidates = model.build_candidate_representation(batch, emb)
        outputs = [model(batch, emb, corpus, top_k, corpus_mask=m) for m in corpus_masks]
        outputs.append(model(batch, emb, corpus, top_k))
        return user, candidates, outputs

    return hk.transform(forward)


def make_corpus(case, size=40, seed=2):
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((size, case.D))
    corpus = (corpus / np.linalg.norm(corpus, axis=-1, keepdims=True)).astype(np.float32)
    corpus_mask = rng.random(size) < 0.75
    return corpus, corpus_mask


TREE_CASES = [
    Case(L=1),
    Case(L=3),
    Case(D=8, d=8, H=2, K=2, L=1, Hu=3, Hi=1, Ha=2, A=19, V=16, widening=4.0),
    Case(release=2, L=1, Hip=2),
    Case(
        release=2, D=8, d=8, H=2, K=2, L=1, Hu=3, Hi=1, Ha=2, A=19, Nc=8, hidden=64, granularity=30
    ),
]


@pytest.mark.parametrize("case", TREE_CASES)
def test_ranker_parameter_tree(case):
    batch, emb = to_model_inputs(*make_inputs(case))
    params = jax.eval_shape(ranker_forward(case).init, jax.random.PRNGKey(0), batch, emb)
    assert flat_tree(params) == expected_ranker_tree(case)


@pytest.mark.parametrize("case", [TREE_CASES[0], TREE_CASES[3]])
def test_ranker_parameters_are_created_in_the_published_order(case):
    """The order decides which random key draws which parameter, so the initial values a seed
    gives. (Recorded as the parameters are created: jit and eval_shape sort a dict's keys.)"""
    batch, emb = to_model_inputs(*make_inputs(case))
    created = []

    def record(next_creator, shape, dtype, init, context):
        created.append(context.full_name)
        return next_creator(shape, dtype, init)

    def forward(batch, emb):
        with hk.custom_creator(record):
            return ranker_config(case).make()(batch, emb)

    jax.eval_shape(hk.transform(forward).init, jax.random.PRNGKey(0), batch, emb)
    created = [
        name for name in created if name.count("/") == 1 and name.startswith("phoenix_model/")
    ]
    want = expected_ranker_tree(case)
    assert created == [p for p in want if p.count("/") == 1 and p.startswith("phoenix_model/")]


@pytest.mark.parametrize("case", TREE_CASES)
def test_retrieval_parameter_tree(case):
    batch, emb = to_model_inputs(*make_inputs(case))
    corpus, corpus_mask = make_corpus(case)
    init = retrieval_forward(case, top_k=3).init
    params = jax.eval_shape(init, jax.random.PRNGKey(0), batch, emb, corpus, [corpus_mask])
    assert flat_tree(params) == expected_retrieval_tree(case)


def test_initial_values():
    """Linear weights and norm scales start at zero; tables are truncated normal, var 1/width."""
    case = Case(D=64, d=32, H=2, K=2, L=1, Hu=2, Hi=2, Ha=2, A=19, V=16)
    batch, emb = to_model_inputs(*make_inputs(case))

    def both(batch, emb):
        ranker = ranker_config(case).make()(batch, emb)
        retrieval = retrieval_config(case).make().build_candidate_representation(batch, emb)
        return ranker, retrieval

    # One jitted init: compiling the initialisers is most of this test's time.
    params = flat_params(jax.jit(hk.transform(both).init)(jax.random.PRNGKey(0), batch, emb))

    d, hashes = case.D, case.Hi + case.Ha
    tower = "phoenix_retrieval_model/~build_candidate_representation/candidate_tower"
    variances = {
        "phoenix_model/product_surface_embedding_table": 1 / d,
        "phoenix_model/action_projection": 1 / d,
        "phoenix_model/proj_mat_1": 1 / (case.Hu * d),
        "phoenix_model/proj_mat_3": 1 / ((hashes + 2) * d),
        "phoenix_model/proj_mat_2": 1 / ((hashes + 1) * d),
        "phoenix_model/unembeddings": 1 / case.A,
        f"{tower}/candidate_tower_projection_1": 1 / (2 * d),
        f"{tower}/candidate_tower_projection_2": 1 / d,
    }
    for path, value in params.items():
        if path.endswith(("/w", "/scale")):
            assert not np.any(value), path
    for path, variance in variances.items():
        value = params[path]
        std = math.sqrt(variance)
        assert abs(np.var(value) / variance - 1) < 0.15, path
        assert abs(np.mean(value)) < 5 * std / math.sqrt(value.size), path
        assert np.max(np.abs(value)) <= 2 * std / TRUNCATED_NORMAL_STD_FACTOR * (1 + 1e-5), path


def flat_params(params):
    return {f"{m}/{n}": np.asarray(v) for m, leaves in params.items() for n, v in leaves.items()}


# ---------------------------------------------------------------------------------------------
# The ranking model.
# ---------------------------------------------------------------------------------------------


# The second release's inputs and options: dwell time, post age, the continuous head, IP
# embeddings, right-anchored positions (the history of row 1 has a hole, not left-aligned).
SECOND_RELEASE_CASES = [
    Case(release=2),
    Case(release=2, anchored=True, Hip=2, granularity=30, D=8, d=4, H=2, K=1, L=1, A=3),
    Case(release=1, anchored=True, Hip=1, L=1),
]


@pytest.mark.parametrize("case", CASES + SECOND_RELEASE_CASES)
def test_ranker_logits_match_reference(case):
    np_batch, np_emb = make_inputs(case)
    batch, emb = to_model_inputs(np_batch, np_emb)
    f = ranker_forward(case)
    params = random_params(f.init, batch, emb)
    out = jax.jit(f.apply)(params, None, batch, emb)
    assert out.logits.dtype == jnp.float32
    logits, continuous = ref_ranker_outputs(params, np_batch, np_emb, case)
    assert_close(out.logits, logits)
    if case.release == 2:
        assert out.continuous_preds.shape == (case.B, case.C, case.Nc)
        assert_close(out.continuous_preds, continuous)
    else:
        assert out.continuous_preds is None


# ---------------------------------------------------------------------------------------------
# The retrieval model.
# ---------------------------------------------------------------------------------------------


def test_candidate_tower_matches_reference():
    d, hashes = 6, 3
    rng = np.random.default_rng(0)
    x4 = rng.standard_normal((2, 4, hashes, d)).astype(np.float32)
    x3 = rng.standard_normal((2, hashes, d)).astype(np.float32)
    f = hk.transform(lambda x: recsys_retrieval_model.CandidateTower(emb_size=d)(x))
    params = random_params(f.init, x4)
    for x in (x4, x3):
        out = f.apply(params, None, jnp.asarray(x))
        assert out.dtype == jnp.float32
        assert_close(out, ref_candidate_tower(params, "candidate_tower", x))


@pytest.mark.parametrize("case", CASES[:2])
def test_retrieval_matches_reference(case):
    np_batch, np_emb = make_inputs(case)
    # Row 1 has no valid token at all: the mean's count is floored at 1 and the norm at EPS.
    np_batch["user_hashes"][1] = 0
    np_batch["history_post_hashes"][1] = 0
    batch, emb = to_model_inputs(np_batch, np_emb)
    corpus, corpus_mask = make_corpus(case)
    sparse_mask = np.zeros(len(corpus), bool)
    sparse_mask[[5, 17, 30]] = True  # fewer valid entries than top_k
    top_k = 7
    f = retrieval_forward(case, top_k)
    params = random_params(f.init, batch, emb, corpus, [corpus_mask, sparse_mask])
    (user, norms), (candidates, candidate_mask), outputs = jax.jit(f.apply)(
        params, None, batch, emb, jnp.asarray(corpus), [corpus_mask, sparse_mask]
    )

    expected_user, expected_norms = ref_user_representation(params, np_batch, np_emb, case)
    assert np.all(expected_user[1] == 0)
    for representation in (user, *(out.user_representation for out in outputs)):
        assert representation.dtype == jnp.float32
        assert_close(representation, expected_user)
    assert_close(norms, expected_norms)

    tower = "phoenix_retrieval_model/~build_candidate_representation/candidate_tower"
    post_author = np.concatenate(
        [np_emb["candidate_post_embeddings"], np_emb["candidate_author_embeddings"]], axis=2
    )
    assert_close(candidates, ref_candidate_tower(params, tower, post_author))
    np.testing.assert_array_equal(candidate_mask, np_batch["candidate_post_hashes"][:, :, 0] != 0)

    for out, mask in zip(outputs, (corpus_mask, sparse_mask, None), strict=True):
        indices, scores, all_scores = ref_top_k(expected_user, corpus, mask, top_k)
        valid = np.flatnonzero(np.ones(len(corpus), bool) if mask is None else mask)
        num_valid = min(top_k, len(valid))
        assert out.top_k_indices.shape == out.top_k_scores.shape == (case.B, top_k)
        assert_close(out.top_k_scores, scores)
        # Row 0's order is well defined: its best valid scores are well separated.
        best = np.sort(all_scores[0, valid])[::-1][: top_k + 1]
        assert np.min(-np.diff(best)) > 1e-4
        np.testing.assert_array_equal(out.top_k_indices[0], indices[0])
        # Row 1's user is the zero vector: its valid scores all tie at 0, so only their set is
        # fixed; masked entries (-INF, all tied) follow, lowest index first.
        got = np.asarray(out.top_k_indices[1])
        assert set(got[:num_valid].tolist()) <= set(valid.tolist())
        np.testing.assert_array_equal(got[num_valid:], indices[1, num_valid:])
    assert np.all(np.asarray(outputs[1].top_k_scores)[:, 3:] == np.float32(-RETRIEVAL_INF))
