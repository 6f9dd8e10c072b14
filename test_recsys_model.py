"""Properties of the ranking model (`recsys_model.py`), its transformer and its runner.

Every model here runs under random non-zero parameters (`runners.randomize_params`): the
published initialisation makes every logit 0, which would hide almost any mistake. Equalities
are checked in float32, bit for bit where the property is structural (a masked input contributes
an exact zero), to float32 precision where two different computations should agree.

Tiny configurations keep compilation, which dominates the run time, short; each test reuses one
compiled function per shape.
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

import grok
import recsys_model
import runners
from grok import TransformerConfig
from recsys_model import (
    HashConfig,
    PhoenixModelConfig,
    RecsysBatch,
    RecsysEmbeddings,
    RecsysModelOutput,
)
from runners import ACTIONS, ModelRunner, RankingOutput, RecsysInferenceRunner

# Hashes are drawn from [1, TABLE_SIZE); 0 is padding.
TABLE_SIZE = 50
# Two computations of the same float32 quantity (dense vs cached, jit vs vmap) agree to this.
RTOL = 1e-5
ATOL = 1e-6
# Each example of a test over configurations compiles the model afresh (one to four seconds).
# Derandomised, so that the suite draws the same configurations, and takes the same time, on
# every run (a random draw of large configurations once took the suite from 1.5 to 3.6 min).
FEW_EXAMPLES = settings(max_examples=8, deadline=None, derandomize=True)
SEEDS = st.integers(0, 2**31 - 1)


@dataclasses.dataclass(frozen=True)
class Setup:
    """A hashable ranking configuration; compiled functions and parameters are cached on it."""

    emb_size: int = 8
    num_layers: int = 1
    num_q_heads: int = 2
    num_kv_heads: int = 1
    key_size: int = 4
    num_actions: int = len(ACTIONS)
    hashes: tuple[int, int, int] = (1, 2, 1)  # user, item, author
    vocab_size: int = 4
    fprop_dtype: str = "float32"

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            emb_size=self.emb_size,
            key_size=self.key_size,
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            num_layers=self.num_layers,
            widening_factor=2.0,
            attn_output_multiplier=0.5,
        )

    def config(self, history_len: int = 4, num_candidates: int = 5) -> PhoenixModelConfig:
        return PhoenixModelConfig(
            model=self.transformer_config(),
            emb_size=self.emb_size,
            num_actions=self.num_actions,
            history_seq_len=history_len,
            candidate_seq_len=num_candidates,
            fprop_dtype=jnp.dtype(self.fprop_dtype),
            hash_config=HashConfig(*self.hashes),
            product_surface_vocab_size=self.vocab_size,
        )


@st.composite
def setups(draw) -> Setup:
    num_kv_heads = draw(st.sampled_from([1, 2]))
    return Setup(
        emb_size=draw(st.sampled_from([8, 16])),
        num_layers=draw(st.sampled_from([1, 2])),
        num_q_heads=num_kv_heads * draw(st.sampled_from([1, 2])),
        num_kv_heads=num_kv_heads,
        key_size=draw(st.sampled_from([2, 4])),
        num_actions=draw(st.sampled_from([2, 3])),
        hashes=tuple(draw(st.integers(1, 3)) for _ in range(3)),
        vocab_size=draw(st.sampled_from([2, 5])),
    )


def example(setup: Setup, batch_size: int, history_len: int, num_candidates: int, seed: int):
    """A random batch (random padded history tail, all candidates valid) as numpy arrays."""
    return runners.create_example_batch(
        batch_size,
        setup.emb_size,
        history_len,
        num_candidates,
        setup.num_actions,
        *setup.hashes,
        product_surface_vocab_size=setup.vocab_size,
        num_user_embeddings=TABLE_SIZE,
        num_post_embeddings=TABLE_SIZE,
        num_author_embeddings=TABLE_SIZE,
        seed=seed,
    )


@functools.cache
def ranking_forward(setup: Setup) -> hk.Transformed:
    """The dense forward of a ModelRunner of `setup` (what its `runner.forward` is)."""
    return ModelRunner(setup.config()).make_forward_fn()


@functools.cache
def ranking_params(setup: Setup) -> hk.Params:
    """Random non-zero parameters (shapes from an abstract init: nothing is compiled)."""
    batch, emb = example(setup, 1, 1, 1, seed=0)
    shapes = jax.eval_shape(ranking_forward(setup).init, jax.random.PRNGKey(0), batch, emb)
    return runners.randomize_params(shapes, seed=0)


@functools.cache
def jit_logits(setup: Setup):
    """(params, batch, embeddings) -> logits [B, C, A], compiled once per shape."""
    forward = ranking_forward(setup)
    return jax.jit(lambda params, batch, emb: forward.apply(params, None, batch, emb).logits)


def logits_of(setup: Setup, batch, emb, params: hk.Params | None = None) -> np.ndarray:
    params = ranking_params(setup) if params is None else params
    return np.asarray(jit_logits(setup)(params, batch, emb))


def ranking_runner(setup: Setup, **kwargs) -> RecsysInferenceRunner:
    inference = RecsysInferenceRunner(ModelRunner(setup.config()), "test", **kwargs)
    inference.initialize(params=ranking_params(setup))
    return inference


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def copy_inputs(batch: RecsysBatch, emb: RecsysEmbeddings):
    """Writable numpy copies of every field."""
    batch = RecsysBatch(*(np.array(x) for x in batch))
    emb = RecsysEmbeddings(*(np.array(x) for x in jax.tree.leaves(emb)))
    return batch, emb


def new_hashes(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(1, TABLE_SIZE, shape).astype(np.int32)


def new_embeddings(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Candidate isolation, causality and padding.
# ---------------------------------------------------------------------------------------------

KEEP, REPLACE, PAD = 0, 1, 2

SETUP = Setup()
B, S, C = 2, 4, 5


def fixed_example(seed: int = 0, padded_candidates=()):
    """A batch of SETUP's shapes whose listed candidates are padded."""
    batch, emb = copy_inputs(*example(SETUP, B, S, C, seed))
    batch.candidate_post_hashes[:, list(padded_candidates)] = 0
    return batch, emb


@FEW_EXAMPLES
@given(
    setup=setups(),
    batch_size=st.integers(1, 2),
    history_len=st.integers(1, 5),
    data=st.data(),
    seed=SEEDS,
)
def test_candidate_logits_do_not_depend_on_other_candidates(
    setup, batch_size, history_len, data, seed
):
    """Replacing or padding other candidates leaves a candidate's logits bit-identical."""
    num_candidates = data.draw(st.integers(2, 5), label="num_candidates")
    fates = st.lists(st.sampled_from([KEEP, REPLACE, PAD]), min_size=num_candidates,
                     max_size=num_candidates)  # fmt: skip
    fate = np.array(data.draw(fates, label="fate"))
    kept = data.draw(st.integers(0, num_candidates - 1), label="kept")
    changed = (kept + 1) % num_candidates
    fate[kept] = KEEP
    fate[changed] = fate[changed] or REPLACE
    batch, emb = example(setup, batch_size, history_len, num_candidates, seed)
    new_batch, new_emb = copy_inputs(batch, emb)
    rng = np.random.default_rng(seed)
    touched = fate != KEEP
    for field in ("candidate_post_hashes", "candidate_author_hashes"):
        x = getattr(new_batch, field)
        x[:, touched] = new_hashes(rng, x[:, touched].shape)
    new_batch.candidate_product_surface[:, touched] = rng.integers(
        0, setup.vocab_size, (batch_size, touched.sum())
    )
    new_batch.candidate_post_hashes[:, fate == PAD, 0] = 0
    for x in (new_emb.candidate_post_embeddings, new_emb.candidate_author_embeddings):
        x[:, touched] = new_embeddings(rng, x[:, touched].shape)

    before = logits_of(setup, batch, emb)
    after = logits_of(setup, new_batch, new_emb)
    np.testing.assert_array_equal(after[:, fate == KEEP], before[:, fate == KEEP])
    replaced = after[:, fate == REPLACE] != before[:, fate == REPLACE]
    assert np.all(np.any(replaced, axis=-1)), "a replaced candidate kept its logits"


@settings(max_examples=6, deadline=None, derandomize=True)  # compiles per example
@given(
    setup=setups(),
    batch_size=st.integers(1, 2),
    seq_len=st.integers(2, 8),
    data=st.data(),
    seed=SEEDS,
)
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
    rng = np.random.default_rng(seed)
    x = new_embeddings(rng, (batch_size, seq_len, setup.emb_size))
    mask = np.ones((batch_size, seq_len), bool)
    params = runners.randomize_params(
        jax.eval_shape(forward.init, jax.random.PRNGKey(0), x, mask), seed
    )
    changed = x.copy()
    changed[:, j] = new_embeddings(rng, changed[:, j].shape)
    apply = jax.jit(forward.apply)
    before = np.asarray(apply(params, None, x, mask))
    after = np.asarray(apply(params, None, changed, mask))

    q = np.arange(seq_len)
    affected = q >= j if offset is None or j < offset else q == j
    np.testing.assert_array_equal(after[:, ~affected], before[:, ~affected])
    assert np.all(np.any(after[:, j] != before[:, j], axis=-1))


def test_history_outputs_do_not_see_later_history():
    """Through the ranker's own inputs: the transformer output at history item p (and at the
    user token) does not change when any later history item changes."""
    setup = Setup(num_layers=2)
    batch_size, history_len, num_candidates = 2, 5, 3
    _, num_item_hashes, num_author_hashes = setup.hashes

    def transformer_outputs(batch, emb):
        model = setup.config().make()
        tokens, mask, offset = model.build_inputs(batch, emb)
        return model.model(tokens, mask, candidate_start_offset=offset).embeddings

    apply = jax.jit(hk.transform(transformer_outputs).apply)
    params = ranking_params(setup)
    rng = np.random.default_rng(0)
    batch, emb = copy_inputs(*example(setup, batch_size, history_len, num_candidates, seed=1))
    batch.history_post_hashes[:] = new_hashes(rng, batch.history_post_hashes.shape)  # all valid
    before = np.asarray(apply(params, None, batch, emb))
    for p in range(history_len - 1):
        later = slice(p + 1, None)
        shape = (batch_size, history_len - p - 1)
        new_batch, new_emb = copy_inputs(batch, emb)
        new_batch.history_post_hashes[:, later] = new_hashes(rng, (*shape, num_item_hashes))
        new_batch.history_author_hashes[:, later] = new_hashes(rng, (*shape, num_author_hashes))
        new_batch.history_actions[:, later] = 1.0 - new_batch.history_actions[:, later]
        new_batch.history_product_surface[:, later] = (
            new_batch.history_product_surface[:, later] + 1
        ) % setup.vocab_size
        for x in (new_emb.history_post_embeddings, new_emb.history_author_embeddings):
            x[:, later] = new_embeddings(rng, x[:, later].shape)
        after = np.asarray(apply(params, None, new_batch, new_emb))
        token = 1 + p  # token 0 is the user
        np.testing.assert_array_equal(after[:, : token + 1], before[:, : token + 1])
        assert np.all(np.any(after[:, token + 1] != before[:, token + 1], axis=-1))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    padded=st.lists(st.lists(st.booleans(), min_size=S, max_size=S), min_size=B, max_size=B),
    pad_user=st.lists(st.booleans(), min_size=B, max_size=B),
    seed=SEEDS,
)
def test_padded_history_and_user_do_not_change_logits(padded, pad_user, seed):
    """Whatever sits at a padded history position (post hash 0) or in a padded user (user hash
    0) - embeddings, actions, author hashes, product surface - the logits are bit-identical.
    (Shapes fixed to SETUP's so that one compiled forward serves every example.)"""
    setup, batch_size, history_len = SETUP, B, S
    batch, emb = copy_inputs(*example(setup, batch_size, history_len, C, seed))
    hu, hi, ha = setup.hashes
    # Clean padding: every hash, action, surface and embedding zero.
    padded = np.array(padded) | (batch.history_post_hashes[:, :, 0] == 0)  # [B, S]
    pad_user = np.array(pad_user)  # [B]
    for x in (*batch[1:5], emb.history_post_embeddings, emb.history_author_embeddings):
        x[padded] = 0
    batch.user_hashes[pad_user] = 0
    emb.user_embeddings[pad_user] = 0
    # Junk padding: everything random except the one hash that marks the padding.
    rng = np.random.default_rng(seed)
    junk_batch, junk_emb = copy_inputs(batch, emb)
    n = padded.sum()
    junk_batch.history_post_hashes[padded] = new_hashes(rng, (n, hi))
    junk_batch.history_post_hashes[padded, 0] = 0
    junk_batch.history_author_hashes[padded] = new_hashes(rng, (n, ha))
    junk_batch.history_actions[padded] = rng.random((n, setup.num_actions)) < 0.5
    junk_batch.history_product_surface[padded] = rng.integers(0, setup.vocab_size, n)
    junk_emb.history_post_embeddings[padded] = new_embeddings(rng, (n, hi, setup.emb_size))
    junk_emb.history_author_embeddings[padded] = new_embeddings(rng, (n, ha, setup.emb_size))
    junk_batch.user_hashes[pad_user, 1:] = new_hashes(rng, (pad_user.sum(), hu - 1))
    junk_emb.user_embeddings[pad_user] = new_embeddings(rng, (pad_user.sum(), hu, setup.emb_size))

    clean = logits_of(setup, batch, emb)
    np.testing.assert_array_equal(logits_of(setup, junk_batch, junk_emb), clean)
    # The same junk at a valid position does change the logits.
    valid = ~padded
    junk_emb.history_post_embeddings[valid] = new_embeddings(rng, (valid.sum(), hi, setup.emb_size))
    changed = logits_of(setup, junk_batch, junk_emb) != clean
    assert np.all(np.any(changed[valid.any(axis=1)], axis=-1))


# ---------------------------------------------------------------------------------------------
# Pytrees: jit, vmap, grad.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranker() -> RecsysInferenceRunner:
    return ranking_runner(SETUP)


def test_pytrees_pass_through_jit_vmap_and_grad_in_field_order(ranker):
    """Each container is a pytree with one leaf per field, in field order (the published
    RecsysEmbeddings was a plain dataclass, which jit rejects), and keeps its type and values
    through jax.jit, jax.vmap and jax.grad."""
    batch, emb = fixed_example()
    trees = (batch, emb, RecsysModelOutput(logits_of(SETUP, batch, emb)), ranker.rank(batch, emb))

    def fields(tree):
        names = [f.name for f in dataclasses.fields(tree)] if tree is emb else tree._fields
        return [getattr(tree, name) for name in names]

    stacked = jax.tree.map(lambda x: np.stack([x, x]), trees)
    for transformed in (
        jax.jit(lambda trees: trees)(trees),
        jax.tree.map(lambda x: np.asarray(x)[1], jax.vmap(lambda trees: trees)(stacked)),
    ):
        for tree, out in zip(trees, transformed, strict=True):
            assert type(out) is type(tree)
            for leaf, value in zip(jax.tree.leaves(out), fields(tree), strict=True):
                np.testing.assert_array_equal(leaf, value)

    def weighted_sum(trees):  # the sum of float leaf i, weighted by i + 1
        leaves = jax.tree.leaves(trees)
        return sum((i + 1) * jnp.sum(x) for i, x in enumerate(leaves) if x.dtype.kind == "f")

    grads = jax.jit(jax.grad(weighted_sum, allow_int=True))(trees)
    for tree, grad in zip(trees, grads, strict=True):
        assert type(grad) is type(tree)
    for i, (leaf, grad) in enumerate(
        zip(jax.tree.leaves(trees), jax.tree.leaves(grads), strict=True)
    ):
        if np.asarray(leaf).dtype.kind == "f":
            np.testing.assert_array_equal(grad, np.full(np.shape(leaf), i + 1.0))
        else:
            assert grad.dtype == jax.dtypes.float0


def test_vmap_over_stacked_batches_equals_a_loop(ranker):
    """vmap of the model over a leading axis of stacked (batch, embeddings) gives the
    per-batch RecsysModelOutput."""
    examples = [fixed_example(seed, padded_candidates=[seed]) for seed in range(3)]
    stacked_batch, stacked_emb = jax.tree.map(lambda *xs: np.stack(xs), *examples)
    apply = ranking_forward(SETUP).apply
    outputs = jax.jit(jax.vmap(lambda b, e: apply(ranker.params, None, b, e)))(
        stacked_batch, stacked_emb
    )
    assert isinstance(outputs, RecsysModelOutput)
    for logits, (batch, emb) in zip(np.asarray(outputs.logits), examples, strict=True):
        np.testing.assert_allclose(logits, logits_of(SETUP, batch, emb), rtol=RTOL, atol=ATOL)


GRAD_EXAMPLE = fixed_example(padded_candidates=[1])


def valid_logit_sum(params, batch, emb):
    """The loss the gradient tests differentiate: sum of the valid candidates' logits."""
    logits = ranking_forward(SETUP).apply(params, None, batch, emb).logits
    valid = batch.candidate_post_hashes[:, :, 0] != 0
    return jnp.sum(jnp.where(valid[..., None], logits, 0.0))


@functools.cache
def gradients():
    """d(valid_logit_sum)/d(params, batch, embeddings) at GRAD_EXAMPLE, compiled once."""
    grad = jax.jit(jax.grad(valid_logit_sum, argnums=(0, 1, 2), allow_int=True))
    return grad(ranking_params(SETUP), *GRAD_EXAMPLE)


def test_grad_wrt_inputs_is_finite_nonzero_and_zero_where_padded():
    """The gradient wrt the inputs is a RecsysEmbeddings (and a RecsysBatch, integer fields
    float0) that is finite, non-zero at every valid item, and exactly zero at padded history
    items and padded candidates."""
    batch, _ = GRAD_EXAMPLE
    _, grad_batch, grad_emb = gradients()
    assert isinstance(grad_batch, RecsysBatch)
    assert isinstance(grad_emb, RecsysEmbeddings)
    assert grad_batch.user_hashes.dtype == jax.dtypes.float0
    valid_history = batch.history_post_hashes[:, :, 0] != 0
    valid_candidates = batch.candidate_post_hashes[:, :, 0] != 0
    assert not valid_history.all(), "the example should pad some history"
    # Each gradient and the items [B, N] it has one entry per, True where the item is valid.
    grads = [
        (grad_emb.user_embeddings, np.ones((B, 1), bool)),
        (grad_emb.history_post_embeddings, valid_history),
        (grad_emb.history_author_embeddings, valid_history),
        (grad_batch.history_actions, valid_history),
        (grad_emb.candidate_post_embeddings, valid_candidates),
        (grad_emb.candidate_author_embeddings, valid_candidates),
    ]
    for grad, valid in grads:
        grad = np.asarray(grad).reshape(*valid.shape, -1)
        assert np.all(np.isfinite(grad))
        assert np.all(grad[~valid] == 0)
        assert np.all(np.any(grad[valid] != 0, axis=-1))


@pytest.mark.parametrize(
    "module, name",
    [
        ("phoenix_model", "proj_mat_2"),
        ("transformer/decoder_layer_0/multi_head_attention/query", "w"),
        ("transformer/decoder_layer_0/rms_norm_3", "scale"),
    ],
)
def test_grad_wrt_params_matches_finite_difference(module, name):
    """On the parameter entry with the largest gradient, a central difference agrees."""
    params = ranking_params(SETUP)
    grad = np.asarray(gradients()[0][module][name])
    index = np.unravel_index(np.argmax(np.abs(grad)), grad.shape)
    valid = GRAD_EXAMPLE[0].candidate_post_hashes[:, :, 0] != 0

    def loss(delta):
        shifted = {m: dict(v) for m, v in params.items()}
        value = np.array(shifted[module][name])
        value[index] += delta
        shifted[module][name] = value
        return logits_of(SETUP, *GRAD_EXAMPLE, params=shifted)[valid].sum(dtype=np.float64)

    eps = 1e-2
    assert abs(grad[index]) > 1e-2
    np.testing.assert_allclose(grad[index], (loss(eps) - loss(-eps)) / (2 * eps), rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Runners.
# ---------------------------------------------------------------------------------------------


def test_rank_equals_sigmoid_of_dense_forward(ranker):
    batch, emb = fixed_example(padded_candidates=[0, 4])
    scores = ranker.rank(batch, emb).scores
    assert scores.dtype == jnp.float32
    np.testing.assert_allclose(scores, sigmoid(logits_of(SETUP, batch, emb)), rtol=RTOL, atol=ATOL)


@pytest.fixture
def traces(monkeypatch) -> dict[str, int]:
    """Counts the times the cached ranking path's model methods are traced (run in Python)."""
    counts = {"encode_context": 0, "score_candidates": 0}
    for method in counts:
        original = getattr(recsys_model.PhoenixModel, method)

        def counting(self, *args, method=method, original=original):
            counts[method] += 1
            return original(self, *args)

        monkeypatch.setattr(recsys_model.PhoenixModel, method, counting)
    return counts


def test_rank_in_candidate_blocks_equals_dense_forward(ranker, traces):
    """More candidates than candidate_block_size (5 in blocks of 2, the last one padded): the
    blocked path scores every candidate as the dense forward does, encodes the history once
    and traces the block scorer once (the block's offset is an argument, not a constant)."""
    blocked = ranking_runner(SETUP, candidate_block_size=2)
    batch, emb = fixed_example(padded_candidates=[2])
    ranking = blocked.rank(batch, emb)
    assert traces == {"encode_context": 1, "score_candidates": 1}
    np.testing.assert_allclose(
        ranking.scores, sigmoid(logits_of(SETUP, batch, emb)), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_array_equal(ranking.ranked_indices, ranker.rank(batch, emb).ranked_indices)


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
    assert RankingOutput._fields == ("scores", "ranked_indices", *(f"p_{a}" for a in ACTIONS))
    scores = np.asarray(ranking.scores)
    for i, action in enumerate(ACTIONS):
        np.testing.assert_array_equal(getattr(ranking, f"p_{action}"), scores[:, :, i])
    assert np.all((scores > 0) & (scores < 1))
    assert len(np.unique(scores)) > C  # not the published all-0.5


def test_runner_respects_fprop_dtype(ranker):
    """float32 config: float32 logits. bfloat16 config: bfloat16 logits, close to the float32
    ones (so the dtype changes the precision, not the model)."""
    batch, emb = fixed_example()
    runner16 = ModelRunner(dataclasses.replace(SETUP, fprop_dtype="bfloat16").config())
    runner16.initialize()
    logits16 = jax.jit(runner16.forward.apply)(ranker.params, None, batch, emb).logits
    assert logits16.dtype == jnp.bfloat16
    logits32 = jit_logits(SETUP)(ranker.params, batch, emb)
    assert logits32.dtype == jnp.float32
    logits32, logits16 = np.asarray(logits32), np.asarray(logits16, np.float32)
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * np.abs(logits32).max())
    assert np.any(logits16 != logits32)


# ---------------------------------------------------------------------------------------------
# Input validation: ValueError naming the field, raised before anything is traced.
# ---------------------------------------------------------------------------------------------


def _grow(x, axis):
    """x with one more entry along `axis`."""
    return np.concatenate([x, np.take(x, [0], axis=axis)], axis=axis)


def _set(value):
    def mutate(x):
        x = x.copy()
        x[0, 0] = value
        return x

    return mutate


BAD_INPUTS = [
    # (field, mutation); batch and embeddings disagree on one size, or a value is out of range.
    ("user_embeddings", lambda x: _grow(x, 0)),  # B
    ("candidate_post_hashes", lambda x: _grow(x, 0)),  # B
    ("history_post_embeddings", lambda x: _grow(x, 1)),  # S
    ("history_product_surface", lambda x: _grow(x, 1)),  # S
    ("candidate_post_embeddings", lambda x: _grow(x, 1)),  # C
    ("candidate_author_hashes", lambda x: _grow(x, 1)),  # C
    ("candidate_post_hashes", lambda x: _grow(x, 1)),  # C, in the field that fixes C
    ("user_hashes", lambda x: _grow(x, 1)),  # Hu
    ("history_author_embeddings", lambda x: _grow(x, 2)),  # Ha
    ("candidate_post_hashes", lambda x: _grow(x, 2)),  # Hi
    ("candidate_author_embeddings", lambda x: _grow(x, 3)),  # D
    ("history_actions", lambda x: x[..., :3]),  # A
    ("history_product_surface", lambda x: x[..., None]),  # rank
    ("user_embeddings", lambda x: x[0]),  # rank
    ("candidate_post_hashes", lambda x: x.astype(np.float32)),  # dtype
    ("candidate_product_surface", _set(SETUP.vocab_size)),  # >= vocabulary
    ("history_product_surface", _set(-1)),  # negative
]


@pytest.mark.parametrize("field, mutate", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_field(ranker, monkeypatch, field, mutate):
    batch, emb = fixed_example()
    if field in RecsysBatch._fields:
        batch = batch._replace(**{field: mutate(getattr(batch, field))})
    else:
        emb = dataclasses.replace(emb, **{field: mutate(getattr(emb, field))})

    def traced(*args):
        raise AssertionError("rank traced the model before validating its inputs")

    monkeypatch.setattr(ranker, "_rank_block", traced)
    with pytest.raises(ValueError, match=field):
        ranker.rank(batch, emb)
    with pytest.raises(ValueError, match=field):  # the model itself, outside any runner
        ranking_forward(SETUP).apply(ranker.params, None, batch, emb)


def test_demo_errors_are_one_line_with_status_2(capsys):
    """Bad flags (argparse) and what the demo's main refuses, or cannot fit in memory, end in
    one line `prog: error: ...` and exit status 2, not a traceback."""
    parser = runners.demo_argument_parser("demo")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--seed", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("--seed: expected an integer >= 0, got -1")

    def too_big() -> int:
        raise MemoryError("Unable to allocate 745. GiB")

    def refused() -> int:
        raise ValueError("top_k must be in [1, N=3]")

    for main, text in [(too_big, "not enough memory"), (refused, "top_k must be")]:
        assert runners.run_demo(main, "demo.py") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"demo.py: error: {text}") and err.count("\n") == 1
    assert runners.run_demo(lambda: 0, "demo.py") == 0


def test_rank_rejects_a_model_with_fewer_actions_than_ranking_output_fields():
    """RankingOutput has one p_<action> field per ACTIONS entry; a 3-action model cannot fill
    them and must say so (rather than repeat its last column in the other 16)."""
    setup = dataclasses.replace(SETUP, num_actions=3)
    with pytest.raises(ValueError, match="num_actions"):
        ranking_runner(setup).rank(*example(setup, B, S, C, seed=0))


def test_rank_before_initialize_raises():
    runner = RecsysInferenceRunner(ModelRunner(SETUP.config(S, C)), "uninitialized")
    with pytest.raises(ValueError, match="initialize"):
        runner.rank(*fixed_example())


# ---------------------------------------------------------------------------------------------
# Configuration, mask and sizes.
# ---------------------------------------------------------------------------------------------


def test_fourth_seed_configuration():
    """The fourth seed's guide: no key_size, emb_size or num_actions, and the name
    PhoenixRankingModelConfig. key_size defaults to emb_size // num_q_heads, and the built
    model's projections have the grouped-query widths that implies."""
    model_config = TransformerConfig(
        emb_size=16,
        num_layers=1,
        num_q_heads=4,
        num_kv_heads=2,
        widening_factor=4,
        attn_output_multiplier=0.125,
    )
    assert model_config.key_size == 16 // 4
    assert recsys_model.PhoenixRankingModelConfig is PhoenixModelConfig
    config = recsys_model.PhoenixRankingModelConfig(
        model=model_config, history_seq_len=3, candidate_seq_len=2
    )
    assert (config.emb_size, config.num_actions) == (16, len(ACTIONS))
    batch = runners.create_dummy_batch_from_config(config.hash_config, 3, 2, config.num_actions)
    emb = runners.create_dummy_embeddings_from_config(config.hash_config, 16, 3, 2)
    forward = hk.transform(lambda b, e: config.make()(b, e))
    params = jax.eval_shape(forward.init, jax.random.PRNGKey(0), batch, emb)
    attention = "transformer/decoder_layer_0/multi_head_attention"
    assert params[f"{attention}/query"]["w"].shape == (16, 4 * 4)
    assert params[f"{attention}/key"]["w"].shape == (16, 2 * 4)
    assert params["phoenix_model"]["unembeddings"].shape == (16, len(ACTIONS))


def test_transformer_config_rejects_q_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        TransformerConfig(emb_size=12, num_q_heads=3, num_kv_heads=2, num_layers=1)


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
