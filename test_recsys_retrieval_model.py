"""Properties of the two-tower retrieval model (`recsys_retrieval_model.py`).

The model runs under random non-zero parameters in float32. Scores are compared with brute
force over the full score matrix; data is continuous and random, so there are no ties and the
top-k indices are unique.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (
    SEEDS,
    TABLE_SIZE,
    Setup,
    copy_inputs,
    example,
    full_top_k,
    make_retriever,
    normal,
    random_params,
)
from recsys_retrieval_model import INF, CandidateTower

SETUP = Setup()
D, B, S, C = SETUP.emb_size, 2, 4, 3
HASHES = SETUP.hashes
NUM_ACTIONS = SETUP.num_actions
VOCAB_SIZE = SETUP.vocab_size
N, K = 12, 5  # corpus size and top-k


@functools.cache
def retriever():
    return make_retriever(SETUP)


@functools.cache
def model_forward():
    """(params, batch, embeddings, corpus, corpus_mask, top_k) -> RetrievalOutput, jitted."""
    apply = retriever().runner.forward.apply
    return jax.jit(
        lambda params, batch, emb, corpus, mask, top_k: apply(
            params, None, batch, emb, corpus, top_k, mask
        ),
        static_argnums=5,
    )


@settings(max_examples=10, deadline=None, derandomize=True)
@given(mask=st.lists(st.booleans(), min_size=N, max_size=N), seed=SEEDS)
def test_model_output_is_the_top_k_of_unit_users_against_the_corpus(mask, seed):
    """user_representation rows have unit norm; top_k_scores are user · corpus[top_k_indices]
    (-INF for a masked row) and the brute-force top-k; masked rows are retrieved only when
    fewer than k rows are unmasked."""
    mask = np.array(mask)
    batch, emb = example(SETUP, B, S, C, seed)
    corpus = normal(seed, (N, D))
    out = model_forward()(retriever().params, batch, emb, corpus, mask, K)
    user, indices, scores = map(np.asarray, out)

    np.testing.assert_allclose(np.linalg.norm(user, axis=1), 1.0, rtol=1e-6)
    retrieved = mask[indices]  # [B, K], False where a masked row was retrieved
    dots = np.einsum("bd,bkd->bk", user, corpus[indices])
    np.testing.assert_allclose(scores[retrieved], dots[retrieved], rtol=1e-5, atol=1e-6)
    assert np.all(scores[~retrieved] == -INF)
    num_unmasked = min(mask.sum(), K)
    assert retrieved[:, :num_unmasked].all() and not retrieved[:, num_unmasked:].any()
    want_scores, want_indices = full_top_k(user, corpus, K, mask)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(indices[:, :num_unmasked], want_indices[:, :num_unmasked])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    padded=st.lists(st.lists(st.booleans(), min_size=S, max_size=S), min_size=B, max_size=B),
    seed=SEEDS,
)
def test_user_representation_ignores_padded_history(padded, seed):
    """Whatever sits at a padded history position (post hash 0), the user vector is
    bit-identical; the same junk at a valid position changes it."""
    batch, emb = copy_inputs(*example(SETUP, B, S, C, seed))
    padded = np.array(padded) | (batch.history_post_hashes[:, :, 0] == 0)
    for x in (*batch[1:5], emb.history_post_embeddings, emb.history_author_embeddings):
        x[padded] = 0
    rng = np.random.default_rng(seed)
    junk_batch, junk_emb = copy_inputs(batch, emb)
    n = padded.sum()
    junk_batch.history_post_hashes[padded, 1:] = rng.integers(1, TABLE_SIZE, (n, HASHES[1] - 1))
    junk_batch.history_author_hashes[padded] = rng.integers(1, TABLE_SIZE, (n, HASHES[2]))
    junk_batch.history_actions[padded] = rng.random((n, NUM_ACTIONS)) < 0.5
    junk_batch.history_product_surface[padded] = rng.integers(0, VOCAB_SIZE, n)
    junk_emb.history_post_embeddings[padded] = rng.standard_normal((n, HASHES[1], D))
    junk_emb.history_author_embeddings[padded] = rng.standard_normal((n, HASHES[2], D))

    encode = retriever().encode_user
    clean = np.asarray(encode(batch, emb))
    np.testing.assert_array_equal(np.asarray(encode(junk_batch, junk_emb)), clean)
    valid = ~padded
    junk_emb.history_post_embeddings[valid] = rng.standard_normal((valid.sum(), HASHES[1], D))
    changed = np.asarray(encode(junk_batch, junk_emb)) != clean
    assert np.all(np.any(changed[valid.any(axis=1)], axis=-1))


tower = hk.transform(lambda x: CandidateTower(D)(x))
tower_apply = jax.jit(tower.apply)
mean_tower = hk.transform(lambda x: CandidateTower(D, enable_linear_proj=False)(x))


def test_the_tower_without_projection_is_the_normalised_mean_of_the_hash_rows():
    """By hand: rows (9, 0), (0, 0) padding, (0, 12) average to (3, 4), of norm 5; all-zero
    rows stay zero (the norm is floored); no parameters; in bfloat16 mean and norm are taken
    in bfloat16."""
    x = np.zeros((1, 2, 3, 2), np.float32)
    x[0, 0] = [[9, 0], [0, 0], [0, 12]]
    assert mean_tower.init(None, x) == {}
    out = mean_tower.apply({}, None, x)
    np.testing.assert_allclose(out, [[[0.6, 0.8], [0.0, 0.0]]], rtol=1e-6)
    y = jnp.asarray(normal(1, (B, C, HASHES[1] + HASHES[2], D)), jnp.bfloat16)
    mean = jnp.mean(y, axis=-2)
    want = mean / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(mean), -1, keepdims=True), 1e-12))
    got = mean_tower.apply({}, None, y)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # In float16, where the floor 1e-12 rounds to 0, padding stayed 0 / 0 = NaN.
    half = mean_tower.apply({}, None, x.astype(np.float16))
    np.testing.assert_allclose(np.asarray(half, np.float32), out, atol=1e-3)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_candidate_tower_returns_unit_vectors_in_the_input_dtype(dtype, tolerance):
    """[B, C, H, D] and [B, H, D] inputs give unit vectors in the input's dtype, and a
    candidate's vector does not depend on the layout it came in."""
    x = normal(0, (B, C, HASHES[1] + HASHES[2], D)).astype(dtype)
    params = random_params(tower.init, x)
    out4, out3 = tower_apply(params, None, x), tower_apply(params, None, x[:, 1])
    assert out4.dtype == dtype and out3.dtype == dtype
    out4, out3 = np.asarray(out4, np.float32), np.asarray(out3, np.float32)
    np.testing.assert_allclose(np.linalg.norm(out4, axis=-1), 1.0, atol=tolerance)
    np.testing.assert_allclose(out3, out4[:, 1], atol=tolerance)
    # Every candidate gets its own vector (not, say, a constant).
    assert np.unique(out4.round(2).reshape(B * C, D), axis=0).shape[0] == B * C
