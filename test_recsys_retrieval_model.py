"""Properties of the two-tower retrieval model (`recsys_retrieval_model.py`) and its runner.

The models run under random non-zero parameters (`runners.randomize_params`) in float32. Scores
are compared with brute force over the full score matrix; data is continuous and random, so
there are no ties and the top-k indices are unique.
"""

import dataclasses
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import runners
from grok import TransformerConfig
from recsys_model import HashConfig, RecsysBatch, RecsysEmbeddings
from recsys_retrieval_model import (
    INF,
    CandidateTower,
    PhoenixRetrievalModelConfig,
    top_k_search,
)
from runners import ACTIONS, RecsysRetrievalInferenceRunner, RetrievalModelRunner

D, B, S, C = 8, 2, 4, 3
HASHES = (1, 2, 1)  # user, item, author
NUM_ACTIONS = len(ACTIONS)  # what the runner initialises the action projection with
VOCAB_SIZE = 4
TABLE_SIZE = 50
N, K = 12, 5  # corpus size and top-k of the model tests
SEEDS = st.integers(0, 2**31 - 1)


def retrieval_config() -> PhoenixRetrievalModelConfig:
    return PhoenixRetrievalModelConfig(
        model=TransformerConfig(
            emb_size=D,
            key_size=4,
            num_q_heads=2,
            num_kv_heads=1,
            num_layers=1,
            widening_factor=2.0,
            attn_output_multiplier=0.5,
        ),
        emb_size=D,
        history_seq_len=S,
        candidate_seq_len=C,
        fprop_dtype=jnp.float32,
        hash_config=HashConfig(*HASHES),
        product_surface_vocab_size=VOCAB_SIZE,
    )


def example(seed: int = 0):
    """A random batch (random padded history tail) of shapes B, S, C as numpy arrays."""
    return runners.create_example_batch(
        B,
        D,
        S,
        C,
        NUM_ACTIONS,
        *HASHES,
        product_surface_vocab_size=VOCAB_SIZE,
        num_user_embeddings=TABLE_SIZE,
        num_post_embeddings=TABLE_SIZE,
        num_author_embeddings=TABLE_SIZE,
        seed=seed,
    )


def normal(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@functools.cache
def retriever() -> RecsysRetrievalInferenceRunner:
    """A retrieval runner with random non-zero parameters (shapes from an abstract init)."""
    runner = RetrievalModelRunner(retrieval_config())
    runner.initialize()
    init = functools.partial(runner.forward.init, top_k=1)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *example(), np.zeros((1, D), np.float32))
    inference = RecsysRetrievalInferenceRunner(runner, "test")
    inference.initialize(params=runners.randomize_params(shapes, seed=0))
    return inference


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


def copy_inputs(batch: RecsysBatch, emb: RecsysEmbeddings):
    batch = RecsysBatch(*(np.array(x) for x in batch))
    emb = RecsysEmbeddings(*(np.array(x) for x in jax.tree.leaves(emb)))
    return batch, emb


def brute_force_top_k(queries, corpus, k, mask=None):
    """Top-k of queries · corpusᵀ in float64 numpy: (scores, indices) [B, k]."""
    scores = np.asarray(queries, np.float64) @ np.asarray(corpus, np.float64).T
    if mask is not None:
        scores = np.where(mask[None, :], scores, -INF)
    indices = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, indices, axis=1), indices


# ---------------------------------------------------------------------------------------------
# Exact top-k search.
# ---------------------------------------------------------------------------------------------

search = jax.jit(top_k_search, static_argnames=("k", "block_size"))


@functools.partial(jax.jit, static_argnames="k")
def full_matrix_top_k(queries, corpus, mask, k):
    scores = jnp.where(mask[None, :], queries @ corpus.T, -INF)
    return jax.lax.top_k(scores, k)


@settings(max_examples=15, deadline=None, derandomize=True)  # compiles per example
@given(
    num_queries=st.integers(1, 3),
    corpus_size=st.integers(1, 40),
    dim=st.sampled_from([2, 5, 8]),
    data=st.data(),
    seed=SEEDS,
)
def test_top_k_search_equals_lax_top_k_over_the_full_score_matrix(
    num_queries, corpus_size, dim, data, seed
):
    """The search (blockwise with a block size, the last block shifted back; without one, by
    the method `auto` picks) returns the full matrix's top-k: same scores, same indices,
    masked rows scored -INF and retrieved only once every unmasked row is."""
    k = data.draw(st.integers(1, corpus_size), label="k")
    block_size = data.draw(st.none() | st.integers(1, corpus_size + 3), label="block_size")
    mask = data.draw(
        st.none() | st.lists(st.booleans(), min_size=corpus_size, max_size=corpus_size),
        label="corpus_mask",
    )
    mask = None if mask is None else np.array(mask)
    queries, corpus = normal(seed, (num_queries, dim)), normal(seed + 1, (corpus_size, dim))

    scores, indices = search(queries, corpus, k, mask, block_size=block_size)
    full_mask = np.ones(corpus_size, bool) if mask is None else mask
    want_scores, want_indices = map(np.asarray, full_matrix_top_k(queries, corpus, full_mask, k))
    scores, indices = np.asarray(scores), np.asarray(indices)

    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    unmasked = want_scores > -INF / 2
    np.testing.assert_array_equal(indices[unmasked], want_indices[unmasked])
    assert np.all(scores[~unmasked] == -INF)
    assert not full_mask[indices[~unmasked]].any()
    for row in indices:
        assert len(set(row)) == k  # no corpus row counted twice


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None, derandomize=True)
@given(mask=st.lists(st.booleans(), min_size=N, max_size=N), seed=SEEDS)
def test_model_output_is_the_top_k_of_unit_users_against_the_corpus(mask, seed):
    """user_representation rows have unit norm; top_k_scores are user · corpus[top_k_indices]
    (-INF for a masked row) and the brute-force top-k; masked rows are retrieved only when
    fewer than k rows are unmasked."""
    mask = np.array(mask)
    batch, emb = example(seed)
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
    want_scores, want_indices = brute_force_top_k(user, corpus, K, mask)
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
    batch, emb = copy_inputs(*example(seed))
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


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_candidate_tower_returns_unit_vectors_in_the_input_dtype(dtype, tolerance):
    """[B, C, H, D] and [B, H, D] inputs give unit vectors in the input's dtype, and a
    candidate's vector does not depend on the layout it came in."""
    x = normal(0, (B, C, HASHES[1] + HASHES[2], D)).astype(dtype)
    params = runners.randomize_params(jax.eval_shape(tower.init, jax.random.PRNGKey(0), x), 0)
    out4, out3 = tower_apply(params, None, x), tower_apply(params, None, x[:, 1])
    assert out4.dtype == dtype and out3.dtype == dtype
    out4, out3 = np.asarray(out4, np.float32), np.asarray(out3, np.float32)
    np.testing.assert_allclose(np.linalg.norm(out4, axis=-1), 1.0, atol=tolerance)
    np.testing.assert_allclose(out3, out4[:, 1], atol=tolerance)
    # Every candidate gets its own vector (not, say, a constant).
    assert np.unique(out4.round(2).reshape(B * C, D), axis=0).shape[0] == B * C


# ---------------------------------------------------------------------------------------------
# The runner.
# ---------------------------------------------------------------------------------------------


def test_encode_user_equals_the_model_output():
    batch, emb = example(1)
    inference = retriever()
    corpus = normal(1, (N, D))
    out = model_forward()(inference.params, batch, emb, corpus, np.ones(N, bool), K)
    np.testing.assert_allclose(
        inference.encode_user(batch, emb), out.user_representation, rtol=1e-6, atol=1e-7
    )


def test_encode_candidates_is_the_tower_of_post_then_author_embeddings():
    """The runner's candidate vectors are the CandidateTower (with the parameters the forward
    initialised) of each candidate's post embeddings followed by its author embeddings."""
    inference = retriever()
    batch, emb = example(6)
    got = np.asarray(inference.encode_candidates(batch, emb))
    scope = "phoenix_retrieval_model/~build_candidate_representation/candidate_tower"
    params = {"candidate_tower": inference.params[scope]}
    x = np.concatenate([emb.candidate_post_embeddings, emb.candidate_author_embeddings], axis=2)
    np.testing.assert_allclose(got, tower_apply(params, None, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-6)


def test_retrieve_equals_brute_force_over_the_corpus():
    """Over a stored corpus, and over a corpus passed to retrieve (which takes precedence)."""
    inference = retriever()
    batch, emb = example(2)
    user = np.asarray(inference.encode_user(batch, emb))
    stored, passed = normal(2, (40, D)), normal(3, (40, D))
    inference.set_corpus(stored, corpus_post_ids=np.arange(100, 140))
    for corpus, kwargs in [(stored, {}), (passed, {"corpus_embeddings": passed})]:
        out = inference.retrieve(batch, emb, top_k=7, **kwargs)
        want_scores, want_indices = brute_force_top_k(user, corpus, 7)
        np.testing.assert_array_equal(out.top_k_indices, want_indices)
        np.testing.assert_allclose(out.top_k_scores, want_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.user_representation, user, rtol=1e-6, atol=1e-7)


def test_retrieve_over_a_bfloat16_corpus_returns_the_top_k_of_bfloat16_scores():
    """A bfloat16 corpus is kept in bfloat16 and searched exactly: its rows are scored in float32
    (a bfloat16 product would be off by about 1e-3, far outside the tolerance below)."""
    inference = retriever()
    batch, emb = example(3)
    user = np.asarray(inference.encode_user(batch, emb))
    corpus = normal(4, (40, D)).astype(jnp.bfloat16)
    inference.set_corpus(corpus)
    assert inference.corpus_embeddings.dtype == jnp.bfloat16  # kept, not upcast
    out = inference.retrieve(batch, emb, top_k=7)
    want_scores, want_indices = brute_force_top_k(user, corpus.astype(np.float32), 7)
    np.testing.assert_array_equal(out.top_k_indices, want_indices)
    np.testing.assert_allclose(out.top_k_scores, want_scores, rtol=1e-5, atol=1e-6)


def _grow(x, axis):
    """x with one more entry along `axis`."""
    return np.concatenate([x, np.take(x, [0], axis=axis)], axis=axis)


@pytest.fixture
def guarded(monkeypatch) -> RecsysRetrievalInferenceRunner:
    """The runner, over a corpus of N rows, failing the test if it runs the user tower."""
    inference = retriever()
    inference.set_corpus(normal(5, (N, D)))

    def traced(*args):
        raise AssertionError("the model ran before the inputs were validated")

    monkeypatch.setattr(inference, "_encode_user", traced)
    return inference


BAD_SHAPES = [
    # (field, axis grown by one): batch and embeddings disagree on B, S, C, a hash count or D.
    ("user_embeddings", 0),
    ("history_post_embeddings", 1),
    ("candidate_author_embeddings", 1),
    ("history_author_hashes", 2),
    ("candidate_post_embeddings", 3),
    # history_actions wider than the action projection the parameters were initialised with.
    ("history_actions", 2),
]


@pytest.mark.parametrize("field, axis", BAD_SHAPES)
def test_mismatched_batch_and_embeddings_raise_value_error_naming_the_field(guarded, field, axis):
    batch, emb = example()
    if field in RecsysBatch._fields:
        batch = batch._replace(**{field: _grow(getattr(batch, field), axis)})
    else:
        emb = dataclasses.replace(emb, **{field: _grow(getattr(emb, field), axis)})
    with pytest.raises(ValueError, match=field):
        guarded.encode_user(batch, emb)
    with pytest.raises(ValueError, match=field):
        guarded.retrieve(batch, emb, top_k=K)


@pytest.mark.parametrize(
    "field, call",
    [
        ("top_k", lambda r: r.retrieve(*example(), top_k=0)),
        ("top_k", lambda r: r.retrieve(*example(), top_k=N + 1)),
        ("corpus_embeddings", lambda r: r.set_corpus(np.zeros((N, D + 1), np.float32))),
        (
            "corpus_embeddings",
            lambda r: r.retrieve(*example(), corpus_embeddings=np.zeros((N, D - 1), np.float32)),
        ),
        ("corpus_post_ids", lambda r: r.set_corpus(np.zeros((N, D), np.float32), np.arange(N - 1))),
    ],
)
def test_bad_corpus_or_top_k_raises_value_error_naming_it(guarded, field, call):
    with pytest.raises(ValueError, match=field):
        call(guarded)


def test_retrieve_before_initialize_or_without_a_corpus_raises():
    uninitialized = RecsysRetrievalInferenceRunner(RetrievalModelRunner(retrieval_config()), "u")
    with pytest.raises(ValueError, match="initialize"):
        uninitialized.retrieve(*example(), top_k=1)
    no_corpus = RecsysRetrievalInferenceRunner(RetrievalModelRunner(retrieval_config()), "n")
    no_corpus.initialize(params=retriever().params)
    with pytest.raises(ValueError, match="corpus"):
        no_corpus.retrieve(*example(), top_k=1)
