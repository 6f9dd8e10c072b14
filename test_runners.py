"""The runners (`runners.py`): ranking and retrieval against the models they run, at every
scale, on one and many devices, and everything a runner refuses before doing any work.

Properties tested, each against the plain computation it replaces:
- `RecsysInferenceRunner.rank` (context encoded once, candidates scored in blocks, one compiled
  function) gives the probabilities and the order of the dense masked forward for candidate
  counts below, at and above the block size, and for 10,000 candidates;
- `RecsysRetrievalInferenceRunner` encodes users and candidates as the model does and retrieves
  the brute-force top-K, from a float32 or bfloat16 corpus;
- with four (simulated) devices, a corpus sharded along N and a ranking batch sharded along B
  give the one-device results, and the ranking stays sharded along B (data-parallel);
- inputs, parameter trees and sizes that do not fit are refused with one clear line.
"""

import dataclasses
import functools
import re
import sys
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoint
import recsys_model
import runners
from conftest import (
    ATOL,
    SCALE_SETUP,
    SEEDS,
    B,
    C,
    S,
    Setup,
    assert_same_top_k,
    copy_inputs,
    dense_logits,
    example,
    finish,
    fixed_example,
    full_top_k,
    grow,
    make_ranker,
    make_retriever,
    normal,
    ranking_params,
    retrieval_params,
    sigmoid,
    start_with_devices,
    unit_rows,
)
from recsys_model import ACTIONS, RecsysBatch
from recsys_retrieval_model import CandidateTower
from runners import RankingOutput
from search import sharded_top_k_search

SETUP = Setup()
# Float32 agreement of two computations of the same probabilities (values in (0, 1)).
PROB_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Ranking: the cached path against the dense forward.
# ---------------------------------------------------------------------------------------------

SCALE_HISTORY = 8
SMALL_BLOCK = 4
SMALL_COUNTS = (1, SMALL_BLOCK - 1, SMALL_BLOCK, SMALL_BLOCK + 1, 3 * SMALL_BLOCK + 2)
LARGE_COUNT = 10_000


def scale_example(batch_size: int, num_candidates: int, padded=(), seed: int = 0):
    """SCALE_SETUP inputs (histories of random length); candidates (b, c) in `padded` get
    hash 0."""
    batch, emb = copy_inputs(*example(SCALE_SETUP, batch_size, SCALE_HISTORY, num_candidates, seed))
    for b, c in padded:
        batch.candidate_post_hashes[b, c] = 0
    return batch, emb


def select_candidates(batch, embeddings, index: np.ndarray):
    """The inputs restricted to the candidates `index` (in that order), history unchanged."""
    return runners.map_candidates(batch, embeddings, lambda x: np.asarray(x)[:, index])


def dense_probabilities(setup: Setup, batch, embeddings) -> np.ndarray:
    return sigmoid(dense_logits(setup, batch, embeddings))


def reference_order(probabilities: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Descending favorite probability, padded candidates last, ties by index."""
    key = np.where(valid, probabilities[:, :, runners.RANKING_ACTION], -np.inf)
    return np.argsort(-key, axis=-1, kind="stable")


@functools.cache
def dense_forward_at_slots() -> Callable[..., np.ndarray]:
    """(batch, embeddings, slots) -> probabilities [B, C, A] of SCALE_SETUP's dense forward for
    candidates that sit at slots `slots` [C] of a longer candidate list.

    `PhoenixModel.__call__` unchanged, except that its transformer receives explicit rotary
    positions (user and history 0 .. S, candidate i at 1 + S + slots[i]): the dense masked
    forward of a 10,000-candidate list costs (1 + S + C)^2 attention pairs, far too many for a
    unit test, while by candidate isolation each candidate's output depends only on the context,
    its own content and its position.
    """
    config = SCALE_SETUP.ranking_config()

    def forward(batch, embeddings, slots):
        model = config.make()
        transformer = model.model
        context_len = 1 + batch.history_post_hashes.shape[1]
        explicit = jnp.concatenate(
            [jnp.arange(context_len, dtype=jnp.float32), context_len + slots.astype(jnp.float32)]
        )[None, :]

        def with_positions(tokens, mask, candidate_start_offset, positions=None):
            del positions  # these candidates' own, below
            return transformer(tokens, mask, candidate_start_offset, positions=explicit)

        model.model = with_positions
        return jax.nn.sigmoid(model(batch, embeddings).logits.astype(jnp.float32))

    apply = jax.jit(hk.transform(forward).apply)
    params = ranking_params(SCALE_SETUP)
    return lambda *inputs: np.asarray(apply(params, None, *inputs))


@pytest.fixture
def traces(monkeypatch) -> dict[str, int]:
    """Counts the times the cached ranking path's model methods are traced (run in Python)."""
    counts = {"encode_context": 0, "score_candidates": 0}
    for method in counts:
        original = getattr(recsys_model.PhoenixModel, method)

        def counting(self, *args, method=method, original=original, **kwargs):
            counts[method] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(recsys_model.PhoenixModel, method, counting)
    return counts


@functools.cache
def small_reference():
    """Inputs with the largest small count of candidates (two padded) and their dense forward."""
    count = max(SMALL_COUNTS)
    batch, embeddings = scale_example(2, count, padded=((0, 2), (1, count - 2)), seed=1)
    return batch, embeddings, dense_probabilities(SCALE_SETUP, batch, embeddings)


@pytest.mark.parametrize("num_candidates", SMALL_COUNTS)
def test_cached_rank_equals_dense_forward(num_candidates, traces):
    """Probabilities and order of `rank` equal the dense forward's for C around the block size,
    with the history encoded once and the block scorer traced once (the block's offset is an
    argument, not a constant).

    The dense reference is computed once for the longest list: by candidate isolation the dense
    forward of its first C candidates is the first C rows of it (positions match; checked by
    the next test).
    """
    batch, embeddings, dense = small_reference()
    index = np.arange(num_candidates)
    batch, embeddings = select_candidates(batch, embeddings, index)
    dense = dense[:, index]
    valid = np.asarray(batch.candidate_post_hashes)[:, :, 0] != 0

    out = make_ranker(SCALE_SETUP, candidate_block_size=SMALL_BLOCK).rank(batch, embeddings)

    assert traces == {"encode_context": 1, "score_candidates": 1}
    assert out.scores.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.scores), dense, rtol=0, atol=PROB_ATOL)
    np.testing.assert_array_equal(np.asarray(out.ranked_indices), reference_order(dense, valid))


def test_dense_forward_of_first_candidates_is_a_prefix():
    """The dense forward of the first candidates alone gives the same probabilities as within
    the full list (candidate isolation, positions unchanged)."""
    batch, embeddings, dense = small_reference()
    index = np.arange(SMALL_BLOCK + 1)
    prefix = dense_probabilities(SCALE_SETUP, *select_candidates(batch, embeddings, index))
    np.testing.assert_allclose(prefix, dense[:, index], rtol=0, atol=PROB_ATOL)


def test_explicit_slots_reproduce_the_dense_forward():
    """`dense_forward_at_slots` with the candidates' own slots is the published dense forward,
    and with shifted slots it is not: the reference of the next test does depend on position."""
    batch, embeddings, dense = small_reference()
    slots = np.arange(dense.shape[1])
    at_slots = dense_forward_at_slots()
    np.testing.assert_allclose(at_slots(batch, embeddings, slots), dense, rtol=0, atol=PROB_ATOL)
    shifted = at_slots(batch, embeddings, slots + LARGE_COUNT // 2)
    assert np.max(np.abs(shifted - dense)) > 100 * PROB_ATOL


def test_rank_at_given_slots_equals_the_dense_forward_at_them():
    """`candidate_slots` (how the published pipeline's chunks place candidates): each candidate
    scored as the dense forward scores it at that slot, repeated slots and gaps allowed."""
    batch, embeddings, dense = small_reference()
    slots = np.random.default_rng(3).integers(0, 40, dense.shape[1])
    out = make_ranker(SCALE_SETUP).rank(batch, embeddings, candidate_slots=slots)
    want = dense_forward_at_slots()(batch, embeddings, slots)
    np.testing.assert_allclose(np.asarray(out.scores), want, rtol=0, atol=PROB_ATOL)
    assert np.max(np.abs(want - dense)) > 100 * PROB_ATOL  # (the slots do move the scores)


def test_cached_rank_equals_dense_forward_for_10000_candidates():
    """10,000 candidates with the default block size (several blocks, the last one partial),
    against the dense forward of the first 64 candidates, of the candidates on either side of
    every block boundary and of random ones, each at its own position."""
    padded = ((0, 5000), (1, LARGE_COUNT - 1))
    batch, embeddings = scale_example(2, LARGE_COUNT, padded=padded, seed=2)
    valid = np.asarray(batch.candidate_post_hashes)[:, :, 0] != 0
    ranker = make_ranker(SCALE_SETUP)  # default candidate_block_size
    block = ranker.candidate_block_size
    assert 2 * block < LARGE_COUNT and LARGE_COUNT % block

    out = ranker.rank(batch, embeddings)

    boundaries = [c for start in range(block, LARGE_COUNT, block) for c in (start - 1, start)]
    rng = np.random.default_rng(0)
    slots = np.unique(
        np.concatenate(
            [
                np.arange(64),
                boundaries,
                rng.choice(LARGE_COUNT, 64, replace=False),
                [c for _, c in padded],
                [LARGE_COUNT - 1],
            ]
        )
    )
    dense = dense_forward_at_slots()(*select_candidates(batch, embeddings, slots), slots)
    scores = np.asarray(out.scores)
    np.testing.assert_allclose(scores[:, slots], dense, rtol=0, atol=PROB_ATOL)
    # The order: descending favorite up to float32 noise (near-ties among thousands), padded last.
    ranked = np.asarray(out.ranked_indices)
    for row, p, ok in zip(ranked, scores[:, :, runners.RANKING_ACTION], valid, strict=True):
        np.testing.assert_array_equal(np.sort(row), np.arange(LARGE_COUNT))
        assert not np.any(np.diff(ok[row].astype(int)) > 0), "a padded candidate ranks above"
        assert np.all(np.diff(p[row][ok[row]]) <= PROB_ATOL), "ranked order is not descending"


def test_rank_does_not_trace_again_for_the_same_shapes(ranker, traces):
    ranker.rank(*fixed_example(seed=0))  # compiled here unless an earlier test did
    before = dict(traces)
    first = ranker.rank(*fixed_example(seed=1))
    second = ranker.rank(*fixed_example(seed=2, padded_candidates=[1]))
    assert traces == before
    assert np.any(np.asarray(first.scores) != np.asarray(second.scores))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(padded=st.lists(st.booleans(), min_size=C, max_size=C), seed=SEEDS)
def test_ranked_indices_put_padded_candidates_last_and_sort_by_favorite(ranker, padded, seed):
    batch, emb = fixed_example(seed, padded_candidates=np.flatnonzero(padded))
    ranking = ranker.rank(batch, emb)
    favorite = np.asarray(ranking.p_favorite_score)
    for b, ranked in enumerate(np.asarray(ranking.ranked_indices)):
        valid = np.flatnonzero(batch.candidate_post_hashes[b, :, 0] != 0)
        assert sorted(ranked) == list(range(C))
        assert set(ranked[: len(valid)]) == set(valid)
        np.testing.assert_array_equal(ranked[: len(valid)], valid[np.argsort(-favorite[b, valid])])


def test_ranking_output_fields_are_the_score_columns_of_actions(ranker):
    ranking = ranker.rank(*fixed_example())
    fields = ("scores", "ranked_indices", *(f"p_{a}" for a in ACTIONS), "continuous_preds")
    assert RankingOutput._fields == fields
    assert RankingOutput._field_defaults == {"continuous_preds": None}
    assert ranking.continuous_preds is None  # a first-release model
    second = Setup(release=2, fprop_dtype="bfloat16")
    continuous = make_ranker(second).rank(*example(second, B, S, C)).continuous_preds
    assert continuous.shape == (B, C, second.num_continuous) and continuous.dtype == jnp.float32
    negative = [ACTIONS[i] for i in runners.NEGATIVE_FEEDBACK_INDICES]
    assert negative == ["not_interested_score", "block_author_score", "mute_author_score",
                        "report_score"]  # fmt: skip
    assert runners.CONTINUOUS_ACTIONS[1] == "dwell_time" and len(runners.CONTINUOUS_ACTIONS) == 8
    scores = np.asarray(ranking.scores)
    for i, action in enumerate(ACTIONS):
        np.testing.assert_array_equal(getattr(ranking, f"p_{action}"), scores[:, :, i])
    np.testing.assert_allclose(scores, sigmoid(dense_logits(SETUP, *fixed_example())), atol=ATOL)
    assert len(np.unique(scores)) > C  # not the published all-0.5


def test_no_candidates_rank_to_empty_arrays(ranker):
    batch, emb = select_candidates(*fixed_example(), np.arange(0))
    out = ranker.rank(batch, emb)
    assert out.scores.shape == (B, 0, len(ACTIONS)) and out.ranked_indices.shape == (B, 0)
    assert out.p_favorite_score.shape == (B, 0)


# ---------------------------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------------------------

N, K = 12, 5  # corpus size and top-k


@pytest.fixture(scope="module")
def retriever() -> runners.RecsysRetrievalInferenceRunner:
    return make_retriever(SETUP)


def retrieval_example(seed: int = 0):
    return example(SETUP, B, S, 3, seed)


def test_encode_user_equals_the_model_output(retriever):
    batch, emb = retrieval_example(1)
    corpus = normal(1, (N, D := SETUP.emb_size))
    out = jax.jit(retriever.runner.forward.apply, static_argnums=5)(
        retriever.params, None, batch, emb, corpus, K
    )
    np.testing.assert_allclose(
        retriever.encode_user(batch, emb), out.user_representation, rtol=1e-6, atol=1e-7
    )
    assert out.user_representation.shape[1] == D


def test_encode_candidates_is_the_tower_of_post_then_author_embeddings(retriever):
    """The runner's candidate vectors are the CandidateTower (with the parameters the forward
    initialised) of each candidate's post embeddings followed by its author embeddings."""
    batch, emb = retrieval_example(6)
    got = np.asarray(retriever.encode_candidates(batch, emb))
    scope = "phoenix_retrieval_model/~build_candidate_representation/candidate_tower"
    params = {"candidate_tower": retriever.params[scope]}
    x = np.concatenate([emb.candidate_post_embeddings, emb.candidate_author_embeddings], axis=2)
    tower = hk.transform(lambda x: CandidateTower(SETUP.emb_size)(x))
    np.testing.assert_allclose(got, tower.apply(params, None, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_retrieve_equals_brute_force_over_the_corpus(retriever, dtype):
    """Over a stored corpus, and over a corpus passed to retrieve (which takes precedence). A
    bfloat16 corpus is kept in bfloat16 and its rows scored in float32 (a bfloat16 product
    would be off by about 1e-3, far outside the tolerance)."""
    batch, emb = retrieval_example(2)
    user = np.asarray(retriever.encode_user(batch, emb))
    stored, passed = (normal(seed, (40, SETUP.emb_size)).astype(dtype) for seed in (2, 3))
    retriever.set_corpus(stored, corpus_post_ids=np.arange(100, 140))
    assert retriever.corpus_embeddings.dtype == dtype  # kept, not upcast
    for corpus, kwargs in [(stored, {}), (passed, {"corpus_embeddings": passed})]:
        out = retriever.retrieve(batch, emb, top_k=7, **kwargs)
        assert_same_top_k((out.top_k_scores, out.top_k_indices), full_top_k(user, corpus, 7))
        np.testing.assert_allclose(out.user_representation, user, rtol=1e-6, atol=1e-7)


def test_the_corpus_kept_is_the_runner_s_own_copy(retriever):
    """On the CPU, JAX may share an aligned numpy buffer with its caller: the caller writing
    NaN into its array afterwards made a row checked once every user's top match."""
    raw = np.empty(40 * SETUP.emb_size * 4 + 64, np.uint8)
    start = -raw.ctypes.data % 64
    corpus = raw[start : start + 40 * SETUP.emb_size * 4].view(np.float32).reshape(40, -1)
    corpus[...] = normal(2, (40, SETUP.emb_size))
    retriever.set_corpus(corpus)
    batch, emb = retrieval_example(2)
    before = retriever.retrieve(batch, emb, top_k=5)
    corpus[17] = np.nan
    after = retriever.retrieve(batch, emb, top_k=5)
    np.testing.assert_array_equal(after.top_k_indices, before.top_k_indices)
    assert np.isfinite(np.asarray(retriever.corpus_embeddings)).all()
    ids = np.arange(100, 140)  # and its post ids: written to later, they held duplicates
    retriever.set_corpus(normal(3, (40, SETUP.emb_size)), ids)
    ids[:] = 7
    assert retriever.corpus_post_ids.tolist() == list(range(100, 140))


# ---------------------------------------------------------------------------------------------
# What runners refuse, before any work.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def guarded(monkeypatch, ranker, retriever):
    """The two runners, failing the test if they run a model before refusing the input."""

    def traced(*args, **kwargs):
        raise AssertionError("the model ran before the inputs were validated")

    retriever.set_corpus(normal(5, (N, SETUP.emb_size)))
    for runner, name in ((ranker, "_rank"), (retriever, "_encode_user")):
        monkeypatch.setattr(runner, name, traced)
    return ranker, retriever


def _set(field, value, dtype=None):
    def mutate(batch, emb):
        source = batch if field in RecsysBatch._fields else emb
        x = np.array(getattr(source, field), dtype=dtype)
        x[(0,) * x.ndim] = value
        if field in RecsysBatch._fields:
            return batch._replace(**{field: x}), emb
        return batch, dataclasses.replace(emb, **{field: x})

    return mutate


REFUSED_INPUTS = [
    # (mutation of (batch, embeddings), message): one of each kind; every kind is tested
    # against validate_inputs in test_recsys_model.
    (lambda b, e: (b, dataclasses.replace(e, user_embeddings=grow(e.user_embeddings, 0))),
     "user_embeddings has shape"),
    (_set("candidate_post_hashes", 2**32, np.int64), "candidate_post_hashes holds values"),
    (_set("history_actions", 0.5), "history_actions holds 0.5 at"),
    (_set("history_post_embeddings", np.nan), "history_post_embeddings holds nan"),
    (lambda b, e: jax.tree.map(lambda x: x[:0], (b, e)), "no users"),
]  # fmt: skip


@pytest.mark.parametrize("mutate, message", REFUSED_INPUTS)
def test_runners_refuse_bad_input_before_running_the_model(guarded, mutate, message):
    ranker, retriever = guarded
    batch, emb = mutate(*fixed_example())
    with pytest.raises(ValueError, match=message):
        ranker.rank(batch, emb)
    batch, emb = mutate(*retrieval_example())
    for call in (retriever.encode_user, lambda b, e: retriever.retrieve(b, e, top_k=K)):
        with pytest.raises(ValueError, match=message):
            call(batch, emb)


def make_example(*sizes, **keywords):
    return lambda: runners.create_example_batch(*sizes, **keywords)


@pytest.mark.parametrize(
    "call, message",
    [
        (make_example(2, 8, -1, 3, 19), "history_len must be an integer >= 0, got -1"),
        (make_example(2, 8, 4, 3.0, 19), "num_candidates must be an integer >= 0, got 3.0"),
        (make_example(2, 8, 4, 3, 19, num_post_embeddings=2**40),
         r"num_post_embeddings must be an integer in \[2, 2147483648\], got 1099511627776"),
        (make_example(2, 128, 10**9, 8, 19),
         "example inputs of 2 users, history 1000000000 and 8 candidates would need about"),
        (make_example(2, 8, 4, 3, 19, seed=-1), "seed must be an integer >= 0, got -1"),
        (lambda: runners.randomize_params({}, seed=-1), "seed must be an integer >= 0, got -1"),
        (lambda: runners.create_example_corpus(-1, 8), "corpus_size must be an integer >= 1"),
        (lambda: runners.create_example_corpus(5, 0), "emb_size must be an integer >= 1, got 0"),
    ],
)  # fmt: skip
def test_example_inputs_that_cannot_be_made_are_refused_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("params", [None, {}, {"linear": {"w": [1.0, 2.0]}}])
def test_randomize_params_refuses_what_is_not_a_parameter_tree(params):
    """None came back as None, and a list leaf ended in an AttributeError."""
    with pytest.raises(TypeError, match="params must be a parameter tree, modules of named"):
        runners.randomize_params(params, seed=0)


def test_a_corpus_that_is_not_an_array_is_refused_naming_its_type(retriever):
    with pytest.raises(TypeError, match="corpus_embeddings must be an array .* got a list$"):
        retriever.set_corpus(np.zeros((3, SETUP.emb_size)).tolist())
    corpus = np.ones((3, SETUP.emb_size), np.float32)
    with pytest.raises(ValueError, match=r"corpus_post_ids has shape \(2,\), expected \[N=3\]"):
        retriever.set_corpus(corpus, [1, 2])
    with pytest.raises(ValueError, match="corpus_post_ids must be integers, got <U1"):
        retriever.set_corpus(corpus, ["a", "b", "c"])  # (and NaN ids: float64)
    with pytest.raises(ValueError, match="corpus_post_ids holds 7 more than once"):
        retriever.set_corpus(corpus, [7, 3, 7])


@pytest.mark.parametrize(
    "slots, message",
    [
        (np.zeros(C + 1, int), rf"candidate_slots must be \[C={C}\] integers, got \({C + 1},\)"),
        (np.zeros(C), r"candidate_slots must be \[C=.*\] integers, got .* float64"),
        (
            np.array([0, 1, -1, 2] + [0] * (C - 4)),
            r"candidate_slots must be >= 0 .* got -1 at \[2\]",
        ),
        (
            np.array([0, 1, 2, 10**12] + [0] * (C - 4)),
            rf"candidate_slots must be at most {2**24 - 1 - S} \(positions 1 \+ S \+ slot are "
            r"float32, exact to 2\*\*24\), got 1000000000000 at \[3\]",
        ),
    ],
)
def test_candidate_slots_that_are_not_slots_are_refused(guarded, slots, message):
    with pytest.raises(ValueError, match=message):
        guarded[0].rank(*fixed_example(), candidate_slots=slots)


def test_traced_candidate_slots_are_refused(guarded):
    batch, emb = fixed_example()
    rank = jax.jit(lambda slots: guarded[0].rank(batch, emb, candidate_slots=slots).scores)
    with pytest.raises(TypeError, match="candidate_slots must be concrete values"):
        rank(np.arange(C))  # numpy's TracerArrayConversionError before


@pytest.mark.parametrize(
    "message, call",
    [
        (r"top_k must be in \[1, N=12\] \(an integer\), got 0$",
         lambda r: r.retrieve(*retrieval_example(), top_k=0)),
        (r"top_k must be in \[1, N=12\] \(an integer\), got 13$",
         lambda r: r.retrieve(*retrieval_example(), top_k=N + 1)),
        (r"corpus_embeddings has shape \(12, 9\), expected \[N, D=8\]$",
         lambda r: r.set_corpus(np.zeros((N, SETUP.emb_size + 1)))),
        (r"corpus_embeddings row 0 holds \[nan nan nan nan\]...; expected finite values",
         lambda r: r.set_corpus(np.full((N, SETUP.emb_size), np.nan))),
        (r"corpus_embeddings has shape \(12, 7\), expected \[N, D=8\]$",
         lambda r: r.retrieve(
             *retrieval_example(), corpus_embeddings=np.zeros((N, SETUP.emb_size - 1)))),
        (r"corpus_post_ids has shape \(3,\), expected \[N=12\]$",
         lambda r: r.set_corpus(np.zeros((N, SETUP.emb_size)), np.arange(3))),
    ],
)  # fmt: skip
def test_bad_corpus_or_top_k_raises_value_error_naming_it(guarded, message, call):
    with pytest.raises(ValueError, match=message):
        call(guarded[1])


def test_a_nan_corpus_row_is_refused_by_row():
    corpus = unit_rows((N, SETUP.emb_size), seed=1)
    corpus[7, 3] = np.nan
    with pytest.raises(ValueError, match="corpus_embeddings row 7 holds"):
        make_retriever(SETUP).set_corpus(corpus)
    wide = unit_rows((N, SETUP.emb_size), seed=1).astype(np.float64)
    wide[5, 0] = 1e39  # finite in float64, infinite as the model holds it
    with pytest.raises(ValueError, match="corpus_embeddings row 5 holds"):
        make_retriever(SETUP).set_corpus(wide)


def test_random_parameters_of_a_retrieval_tree_with_its_temperature():
    """Retrieval checkpoints hold a scalar `~/log_temperature`, which has no fan-in."""
    params = checkpoint.with_log_temperature(make_retriever(SETUP).params)
    drawn = runners.randomize_params(params, seed=0)
    assert drawn["~"]["log_temperature"].shape == () and drawn["~"]["log_temperature"] != 0


def test_rank_and_retrieve_before_initialize_or_without_a_corpus_raise():
    ranker = runners.RecsysInferenceRunner(runners.ModelRunner(SETUP.ranking_config()), "u")
    with pytest.raises(ValueError, match=r"RecsysInferenceRunner.initialize\(\) must be called"):
        ranker.rank(*fixed_example())
    config = SETUP.retrieval_config()
    uninitialized = runners.RecsysRetrievalInferenceRunner(runners.RetrievalModelRunner(config), "")
    with pytest.raises(
        ValueError, match=r"^RecsysRetrievalInferenceRunner.initialize\(\) must be "
    ):
        uninitialized.retrieve(*retrieval_example(), top_k=1)
    with pytest.raises(ValueError, match="no corpus: call set_corpus"):
        make_retriever(SETUP).retrieve(*retrieval_example(), top_k=1)


def test_a_ranking_runner_refuses_a_model_with_fewer_actions_than_ranking_output_fields():
    """RankingOutput has one p_<action> field per ACTIONS entry; a 3-action model cannot fill
    them and must say so when its runner is initialised (rather than repeat its last column in
    the other 16 at every rank)."""
    setup = dataclasses.replace(SETUP, num_actions=3)
    with pytest.raises(ValueError, match="rank needs num_actions >= 19"):
        make_ranker(setup)


def test_candidate_block_size_must_be_a_positive_integer():
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="candidate_block_size must be an integer >= 1"):
            runners.RecsysInferenceRunner(runners.ModelRunner(SETUP.ranking_config()), "", bad)
    runner = runners.RecsysInferenceRunner(  # numpy's integers, as everywhere else
        runners.ModelRunner(SETUP.ranking_config()), "", np.int64(2)
    )
    assert type(runner.candidate_block_size) is int and runner.candidate_block_size == 2


def _deeper(setup: Setup) -> Setup:
    return dataclasses.replace(setup, num_layers=setup.num_layers + 2)


def _with(params, path: str, value):
    module, name = path.rsplit("/", 1)
    params = {m: dict(leaves) for m, leaves in params.items()}
    params[module][name] = value
    return params


PROJ_MAT_3 = "phoenix_model/proj_mat_3"
PARAMS_THAT_DO_NOT_FIT = [
    # (runner, parameters, message naming the first mismatch)
    ("ranker", lambda: ranking_params(_deeper(SETUP)),
     r"transformer/decoder_layer_1/.* is not a parameter of it \(the parameters have 3 layers, "
     r"the model 1\)"),
    # (with a trained retriever's temperature, which Haiku files under "~")
    ("ranker", lambda: {**retrieval_params(SETUP), "~": {"log_temperature": np.float32(-3)}},
     r"phoenix_model/\S+ \[.*\] is missing \(they are parameters of phoenix_retrieval_model, "
     r"another model\)"),
    ("retriever", lambda: ranking_params(SETUP),
     r"is missing \(they are parameters of phoenix_model, another model\)"),
    ("ranker", lambda: _with(ranking_params(SETUP), PROJ_MAT_3, np.zeros((8, 8), np.float32)),
     r"phoenix_model/proj_mat_3 is \[8, 8\] float32, the model expects \[40, 8\] float32"),
    ("ranker", lambda: _with(ranking_params(SETUP), PROJ_MAT_3, np.zeros((40, 8))),
     "proj_mat_3 is \\[40, 8\\] float64, the model expects \\[40, 8\\] float32"),
    ("ranker", lambda: _with(ranking_params(SETUP), PROJ_MAT_3, np.full((40, 8), np.nan, "f4")),
     "params hold NaN or infinite values in phoenix_model/proj_mat_3"),
    ("ranker", lambda: [1, 2], "params must be a Haiku parameter tree"),
]  # fmt: skip


@pytest.mark.parametrize("which, params, message", PARAMS_THAT_DO_NOT_FIT)
def test_parameters_that_do_not_fit_are_refused_naming_the_first_mismatch(which, params, message):
    """On `initialize(params)` and on assigning `runner.params`; the runner keeps what it had."""
    runner = make_ranker(SETUP) if which == "ranker" else make_retriever(SETUP)
    before = runner.params
    with pytest.raises((ValueError, TypeError), match=message):
        runner.params = params()
    assert runner.params is before
    with pytest.raises((ValueError, TypeError), match=message):
        runner.initialize(params())


def test_sizes_that_cannot_fit_in_memory_are_refused_in_one_line(ranker, retriever):
    """A history of 100,000 would need hundreds of GiB of attention logits: refused with the
    estimate before any array is made."""
    for runner in (ranker, retriever):
        with pytest.raises(ValueError, match=r"would need about \d+\.\d GiB of memory; ") as caught:
            runner.check_fits(2, 100_000, 8)
        assert "\n" not in str(caught.value)
    with pytest.raises(
        ValueError, match="2 users, history 32 and 10000000000 candidates"
    ) as caught:
        runners.demo_inputs(ranker, 0, 2, 32, 10**10)
    assert "\n" not in str(caught.value)
    ranker.check_fits(2, 32, 8)  # the demo's sizes fit


def test_demo_inputs_are_refused_when_the_inputs_and_the_work_together_do_not_fit(
    ranker, monkeypatch
):
    work = ranker.memory_needed(20_000, 32, 8)
    monkeypatch.setattr(runners, "available_memory", lambda: work + 1)
    ranker.check_fits(20_000, 32, 8)  # the work alone fits
    with pytest.raises(ValueError, match=r"20000 users, history 32 and 8 candidates \(example"):
        runners.demo_inputs(ranker, 0, 20_000, 32, 8)


# ---------------------------------------------------------------------------------------------
# Many devices: four simulated CPU devices, in a subprocess (the device count is fixed when JAX
# starts). The subprocess imports this file and runs `multi_device_checks`.
# ---------------------------------------------------------------------------------------------

MULTI_DEVICE_PARTS = ("sharded_corpus", "sharded_batch", "params_on_several_devices")
NUM_DEVICES = 4


def check_sharded_corpus(mesh) -> None:
    """A corpus sharded along N is searched shard by shard with the one-device result (the
    exact `lax.top_k` of the full scores, which the one-device search equals)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = NamedSharding(mesh, P("x", None))
    retriever = make_retriever(SCALE_SETUP)
    batch, embeddings = scale_example(3, 1, seed=3)
    corpus = jnp.asarray(unit_rows((4096, SCALE_SETUP.emb_size), seed=6))
    sharded = jax.device_put(corpus, rows)
    assert len(sharded.sharding.device_set) == NUM_DEVICES
    out = retriever.retrieve(batch, embeddings, top_k=50, corpus_embeddings=sharded)
    expected = full_top_k(retriever.encode_user(batch, embeddings), corpus, 50)
    assert_same_top_k((out.top_k_scores, out.top_k_indices), expected)

    # bfloat16, with a mask, and with k larger than a shard (each shard returns all its rows).
    queries = unit_rows((4, SCALE_SETUP.emb_size), seed=7)
    corpus = jnp.asarray(unit_rows((64, SCALE_SETUP.emb_size), seed=8), jnp.bfloat16)
    mask = jnp.asarray(np.random.default_rng(9).random(64) < 0.7)
    result = sharded_top_k_search(
        queries,
        jax.device_put(corpus, rows),
        k=20,
        corpus_mask=jax.device_put(mask, NamedSharding(mesh, P("x"))),
    )
    assert_same_top_k(result, full_top_k(queries, corpus, 20, mask))
    # k and the mask are checked against all 64 rows, not a shard's 16 (a raw lax.top_k or
    # shard_map error before).
    for k, mask, message in ((65, None, r"k must be in \[1, N=64\]"),
                             (3, np.ones(63, bool), r"corpus_mask has shape \(63,\)")):  # fmt: skip
        try:
            sharded_top_k_search(queries, jax.device_put(corpus, rows), k, mask)
        except ValueError as error:
            assert re.search(message, str(error)), error
        else:
            raise AssertionError(f"k {k} and that mask were searched")


def check_sharded_batch(mesh) -> None:
    """A ranking batch sharded along B ranks data-parallel, with the one-device result."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    by_user = NamedSharding(mesh, P("x"))
    ranker = make_ranker(SCALE_SETUP, candidate_block_size=SMALL_BLOCK)
    for num_candidates in (SMALL_BLOCK - 1, 2 * SMALL_BLOCK + 1):  # one block, several blocks
        batch, embeddings = scale_example(2 * NUM_DEVICES, num_candidates, seed=4)
        one = ranker.rank(batch, embeddings)
        many = ranker.rank(*jax.device_put((batch, embeddings), by_user))
        np.testing.assert_allclose(
            np.asarray(many.scores), np.asarray(one.scores), rtol=0, atol=PROB_ATOL
        )
        np.testing.assert_array_equal(np.asarray(many.ranked_indices), one.ranked_indices)
        for name in ("scores", "ranked_indices"):
            sharding = getattr(many, name).sharding
            assert sharding.is_equivalent_to(by_user, getattr(many, name).ndim), (name, sharding)


def check_params_on_several_devices(mesh) -> None:
    """A parameter tree whose arrays sit on different devices is checked (and refused for a
    NaN) like one on a single device."""
    ranker = make_ranker(SCALE_SETUP)
    devices = mesh.devices.ravel()
    leaves, tree = jax.tree.flatten(ranker.params)
    spread = [jax.device_put(x, devices[i % len(devices)]) for i, x in enumerate(leaves)]
    ranker.params = jax.tree.unflatten(tree, spread)
    spread[1] = spread[1].at[(0,) * spread[1].ndim].set(jnp.nan)
    try:
        ranker.params = jax.tree.unflatten(tree, spread)
    except ValueError as error:
        assert "params hold NaN or infinite values in" in str(error), error
    else:
        raise AssertionError("a NaN on the second device was not found")


def multi_device_checks() -> int:
    """Runs every multi-device check; prints `PASS <part>` or the failure. Exit status."""
    import traceback

    from jax.sharding import Mesh

    devices = jax.devices()
    if len(devices) != NUM_DEVICES:
        print(f"expected {NUM_DEVICES} devices, got {devices}", file=sys.stderr)
        return 2
    mesh = Mesh(np.array(devices), ("x",))
    status = 0
    for part in MULTI_DEVICE_PARTS:
        try:
            globals()[f"check_{part}"](mesh)
            print(f"PASS {part}", flush=True)
        except Exception:
            print(f"FAIL {part}", flush=True)
            traceback.print_exc()
            status = 1
    return status


@pytest.fixture(scope="module", autouse=True)
def multi_device_process():
    """Starts the four-device checks with the module, so that they run in a process of their
    own while the one-device tests do; `multi_device_run` collects them."""
    code = "import sys, test_runners; sys.exit(test_runners.multi_device_checks())"
    process = start_with_devices(code, NUM_DEVICES)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def multi_device_run(multi_device_process):
    """(exit status, stdout, report) of the four-device checks."""
    return finish(multi_device_process)


@pytest.mark.parametrize("part", MULTI_DEVICE_PARTS)
def test_multi_device_equals_one_device(multi_device_run, part):
    status, stdout, report = multi_device_run
    assert f"PASS {part}" in stdout.splitlines(), report
    assert status == 0, report


def test_runners_refuse_a_config_or_runner_of_the_other_model():
    """A ranker's runner built on a retrieval runner ended in an AttributeError at its first
    call, and a ModelRunner took a retrieval config without complaint."""
    ranking, retrieval = SETUP.ranking_config(), SETUP.retrieval_config()
    with pytest.raises(TypeError, match="model must be a PhoenixModelConfig, got PhoenixRetr"):
        runners.ModelRunner(retrieval)
    with pytest.raises(TypeError, match="model must be a PhoenixRetrievalModelConfig, got Phoe"):
        runners.RetrievalModelRunner(ranking)
    with pytest.raises(TypeError, match="runner must be a ModelRunner, got RetrievalModelRunner"):
        runners.RecsysInferenceRunner(runners.RetrievalModelRunner(retrieval), "ranker")
    with pytest.raises(TypeError, match="runner must be a RetrievalModelRunner, got NoneType"):
        runners.RecsysRetrievalInferenceRunner(None, "retrieval")


def test_randomize_params_takes_haikus_immutable_trees():
    """Haiku's FlatMap is a mapping but not a dict; a check for dict refused it."""
    tree = hk.data_structures.to_immutable_dict({"m": {"w": np.ones((2, 3)), "scale": np.ones(3)}})
    drawn = runners.randomize_params(tree, seed=0)
    assert drawn["m"]["w"].shape == (2, 3) and not np.allclose(drawn["m"]["scale"], 1.0)
