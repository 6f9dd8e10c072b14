"""Properties of the ranking model (`recsys_model.py`): candidate isolation, causality,
padding, slot dependence, pytrees and gradients, its input checks and its count of matrix FLOPs.

Equalities are checked in float32, bit for bit where the property is structural (a masked input
contributes an exact zero), to float32 precision where two different computations should agree.
"""

import dataclasses
import functools
import math
import sys
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend import core as jax_core

import checkpoint
import recsys_model
import runners
from conftest import (
    ATOL,
    FEW_EXAMPLES,
    RTOL,
    SEEDS,
    TABLE_SIZE,
    B,
    C,
    S,
    Setup,
    copy_inputs,
    dense_logits,
    example,
    fixed_example,
    grow,
    make_ranker,
    ranking_forward,
    ranking_params,
    setups,
)
from grok import TransformerConfig
from pipeline import MINI_TRANSFORMER
from recsys_model import (
    ACTIONS,
    HashConfig,
    PhoenixModelConfig,
    RecsysBatch,
    RecsysEmbeddings,
    RecsysModelOutput,
    validate_inputs,
)

SETUP = Setup()
KEEP, REPLACE, PAD = 0, 1, 2


def new_hashes(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(1, TABLE_SIZE, shape).astype(np.int32)


def new_embeddings(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Candidate isolation, causality, padding and slots.
# ---------------------------------------------------------------------------------------------


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

    before = dense_logits(setup, batch, emb)
    after = dense_logits(setup, new_batch, new_emb)
    np.testing.assert_array_equal(after[:, fate == KEEP], before[:, fate == KEEP])
    replaced = after[:, fate == REPLACE] != before[:, fate == REPLACE]
    assert np.all(np.any(replaced, axis=-1)), "a replaced candidate kept its logits"


def test_history_outputs_do_not_see_later_history():
    """Through the ranker's own inputs: the transformer output at history item p (and at the
    user token) does not change when any later history item changes."""
    setup = Setup(num_layers=2)
    batch_size, history_len, num_candidates = 2, 5, 3
    _, num_item_hashes, num_author_hashes = setup.hashes

    def transformer_outputs(batch, emb):
        model = setup.ranking_config().make()
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

    clean = dense_logits(setup, batch, emb)
    np.testing.assert_array_equal(dense_logits(setup, junk_batch, junk_emb), clean)
    # The same junk at a valid position does change the logits.
    valid = ~padded
    junk_emb.history_post_embeddings[valid] = new_embeddings(rng, (valid.sum(), hi, setup.emb_size))
    changed = dense_logits(setup, junk_batch, junk_emb) != clean
    assert np.all(np.any(changed[valid.any(axis=1)], axis=-1))


def test_a_candidates_logits_depend_on_its_slot():
    """The published positions: candidate i sits at position 1 + S + i, so moving the same
    candidates to other slots changes their logits (content isolation holds, slot isolation
    does not), by a visible fraction of the logits' spread."""
    setup = Setup(emb_size=16, num_layers=2, key_size=8)
    batch, emb = example(setup, B, S, C, seed=3)
    before = dense_logits(setup, batch, emb)
    order = np.roll(np.arange(C), 2)
    moved = recsys_model.map_candidates(batch, emb, lambda x: np.asarray(x)[:, order])
    after = dense_logits(setup, *moved)[:, np.argsort(order)]
    change = np.abs(after - before) / before.std()
    assert change.mean() > 0.01


# ---------------------------------------------------------------------------------------------
# Pytrees: jit, vmap, grad.
# ---------------------------------------------------------------------------------------------


def test_pytrees_pass_through_jit_vmap_and_grad_in_field_order(ranker):
    """Each container is a pytree with one leaf per field present, in field order (the published
    RecsysEmbeddings was a plain dataclass, which jit rejects), and keeps its type and values
    through jax.jit, jax.vmap and jax.grad."""
    batch, emb = fixed_example()
    trees = (
        batch,
        emb,
        RecsysModelOutput(dense_logits(SETUP, batch, emb)),
        ranker.rank(batch, emb),
    )

    def fields(tree):  # the values of the fields that are present, in field order
        names = [f.name for f in dataclasses.fields(tree)] if tree is emb else tree._fields
        return [getattr(tree, name) for name in names if getattr(tree, name) is not None]

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
        np.testing.assert_allclose(logits, dense_logits(SETUP, batch, emb), rtol=RTOL, atol=ATOL)


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
        return dense_logits(SETUP, *GRAD_EXAMPLE, params=shifted)[valid].sum(dtype=np.float64)

    eps = 1e-2
    assert abs(grad[index]) > 1e-2
    np.testing.assert_allclose(grad[index], (loss(eps) - loss(-eps)) / (2 * eps), rtol=1e-2)


def test_the_model_computes_in_its_fprop_dtype():
    """float32 config: float32 logits. bfloat16 config: bfloat16 logits, close to the float32
    ones (so the dtype changes the precision, not the model)."""
    batch, emb = fixed_example()
    params = ranking_params(SETUP)
    setup16 = dataclasses.replace(SETUP, fprop_dtype="bfloat16")
    logits16 = jax.jit(ranking_forward(setup16).apply)(params, None, batch, emb).logits
    logits32 = jax.jit(ranking_forward(SETUP).apply)(params, None, batch, emb).logits
    assert logits16.dtype == jnp.bfloat16 and logits32.dtype == jnp.float32
    logits32, logits16 = np.asarray(logits32), np.asarray(logits16, np.float32)
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * np.abs(logits32).max())
    assert np.any(logits16 != logits32)


# ---------------------------------------------------------------------------------------------
# Input checks: ValueError naming the field, before any work.
# ---------------------------------------------------------------------------------------------


def _set(value, dtype=None):
    def mutate(x):
        x = x.astype(dtype) if dtype else x.copy()
        x[(0,) * x.ndim] = value
        return x

    return mutate


BAD_INPUTS = [
    # (field, mutation, message); batch and embeddings disagree on one size, or a value is bad.
    ("user_embeddings", lambda x: grow(x, 0), r"user_embeddings has shape \(3, 1, 8\)"),
    ("candidate_post_hashes", lambda x: grow(x, 0), r"expected \[B=2 as in user_hashes"),
    ("history_post_embeddings", lambda x: grow(x, 1), "S=4 as in history_post_hashes"),
    ("history_product_surface", lambda x: grow(x, 1), "history_product_surface has shape"),
    ("candidate_post_embeddings", lambda x: grow(x, 1), "C=5 as in candidate_post_hashes"),
    ("candidate_author_hashes", lambda x: grow(x, 1), "candidate_author_hashes has shape"),
    ("candidate_post_hashes", lambda x: grow(x, 1), "C=6 as in candidate_post_hashes"),
    ("user_hashes", lambda x: grow(x, 1), r"\(2, 2\), expected \[B, Hu=1\]"),
    ("history_author_embeddings", lambda x: grow(x, 2), "Ha=1"),
    ("candidate_post_hashes", lambda x: grow(x, 2), "Hi=2"),
    ("candidate_author_embeddings", lambda x: grow(x, 3), "D=8"),
    ("history_actions", lambda x: x[..., :3], "A=19"),
    ("history_product_surface", lambda x: x[..., None], r"\(rank 3\), expected rank 2"),
    ("user_embeddings", lambda x: x[0], r"\(rank 2\), expected rank 3"),
    ("candidate_post_hashes", lambda x: x.astype(np.float32), "dtype of kind integer"),
    ("user_embeddings", lambda x: x.astype(np.int32), "dtype of kind floating"),
    ("candidate_product_surface", _set(SETUP.vocab_size), r"expected \[0, 4\)"),
    ("history_product_surface", _set(-1), r"expected \[0, 4\)"),
    # An int64 id that int32 would wrap to 0: a valid candidate would become padding.
    ("candidate_post_hashes", _set(2**32, np.int64), r"4294967296\], expected \[0, 2\*\*31\)"),
    ("history_post_hashes", _set(-3), r"\[-3, "),
    ("history_actions", _set(0.5), r"holds 0.5 at \[0, 0, 0\]; expected a multi-hot of 0 and 1"),
    ("history_actions", _set(2.0), "holds 2.0 at"),
    ("history_post_embeddings", _set(np.nan), r"holds nan at \[0, 0, 0, 0\]; expected finite"),
    ("candidate_author_embeddings", _set(np.inf), "holds inf"),
    # float64 beyond float32's range is finite here and infinite in the model.
    (
        "user_embeddings",
        _set(1e39, np.float64),
        r"holds 1e\+39 at \[0, 0, 0\]; expected finite float32",
    ),
    # Every entry so: the float32 sum meets inf - inf.
    (
        "user_embeddings",
        lambda x: x.astype(np.float64) * 1e300,
        r"holds -?[0-9.]+e\+[0-9]+ at \[0, 0, 0\]; expected finite float32",
    ),
    # Finite, but the norms' squares overflow: every probability came out 0.5.
    (
        "candidate_post_embeddings",
        _set(1e20),
        r"too large to compute with in float32 \(a sum of squares over D, which the model's "
        r"norms take, overflows; the largest magnitude is 1e\+20\)",
    ),
]


def with_field(batch, emb, field, mutate):
    if field in RecsysBatch._fields:
        return batch._replace(**{field: mutate(getattr(batch, field))}), emb
    return batch, dataclasses.replace(emb, **{field: mutate(getattr(emb, field))})


@pytest.mark.parametrize("field, mutate, message", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_field(field, mutate, message):
    batch, emb = with_field(*fixed_example(), field, mutate)
    with pytest.raises(ValueError, match=field) as error, warnings.catch_warnings():
        warnings.simplefilter("error")  # the one line is all that is said
        validate_inputs(batch, emb, SETUP.ranking_config(), SETUP.num_actions)
    assert error.match(message)


def test_a_required_field_that_is_none_or_not_an_array_is_named():
    batch, emb = fixed_example()
    config = SETUP.ranking_config()
    with pytest.raises(ValueError, match="history_product_surface is None; the model needs it"):
        validate_inputs(batch._replace(history_product_surface=None), emb, config)
    with pytest.raises(TypeError, match="user_hashes must be an array .*, got list"):
        validate_inputs(batch._replace(user_hashes=batch.user_hashes.tolist()), emb, config)


def test_a_context_of_other_users_is_refused():
    """Encoded for one user, a context was broadcast over three users' candidates: each scored
    against the first user's history."""
    config = SETUP.ranking_config()

    def mixed(context_inputs, candidate_inputs):
        model = config.make()
        return model.score_candidates(model.encode_context(*context_inputs), *candidate_inputs)

    one = jax.tree.map(lambda x: x[:1], fixed_example(seed=1))
    message = "context holds 1 layers of 1 users with 4 history items; this model has 1 layers "
    with pytest.raises(ValueError, match=message + "and the batch 2 users with 4"):
        hk.transform(mixed).apply(ranking_params(SETUP), None, one, fixed_example())

    # Of the same users, a context of a shorter history: its positions would not be the batch's.
    def shorter(inputs):
        batch, emb = inputs
        fields = {f: getattr(batch, f) for f in batch._fields if f.startswith("history")}
        cut = {f: v[:, :-1] for f, v in fields.items() if v is not None}
        return batch._replace(**cut), dataclasses.replace(
            emb,
            history_post_embeddings=emb.history_post_embeddings[:, :-1],
            history_author_embeddings=emb.history_author_embeddings[:, :-1],
        )

    with pytest.raises(ValueError, match="of 2 users with 3 history items; this model has 1 "):
        short = shorter(fixed_example())
        hk.transform(mixed).apply(ranking_params(SETUP), None, short, fixed_example())
    score = hk.transform(lambda *inputs: config.make().score_candidates(None, *inputs))
    with pytest.raises(TypeError, match=r"context must be a KVCache \(what encode_context"):
        score.apply(ranking_params(SETUP), None, *fixed_example())


@pytest.mark.parametrize("offset", [1.5, -1, True, jnp.float32(2.0), np.array([[0], [-2]])])
def test_a_candidate_offset_that_is_not_a_slot_is_refused(offset):
    """A fractional or negative offset gave logits of no slot at all."""
    config = SETUP.ranking_config()

    def score(inputs, offset):
        model = config.make()
        return model.score_candidates(model.encode_context(*inputs), *inputs, offset)

    params, inputs = ranking_params(SETUP), fixed_example()
    with pytest.raises(ValueError, match="candidate_offset must be an integer >= 0 .*, got "):
        hk.transform(score).apply(params, None, inputs, offset)
    # The same slots, given each way the runners and users give them.
    apply = hk.transform(score).apply
    at_3 = apply(params, None, inputs, 3).logits
    per_user = np.full((len(inputs[0].user_hashes), 1), 3)  # [B, 1]
    for offset in (np.int64(3), np.array(3), per_user):
        np.testing.assert_array_equal(apply(params, None, inputs, offset).logits, at_3)
    traced = jax.jit(apply)(params, None, inputs, jnp.int32(3)).logits
    np.testing.assert_allclose(traced, at_3, rtol=RTOL, atol=ATOL)


def test_an_empty_batch_of_users_is_refused():
    batch, emb = jax.tree.map(lambda x: x[:0], fixed_example())
    with pytest.raises(ValueError, match=r"no users \(B=0 in user_hashes\)"):
        validate_inputs(batch, emb, SETUP.ranking_config(), SETUP.num_actions)


def test_the_model_checks_its_inputs_outside_any_runner():
    """hk.transform(...).apply of the model itself refuses bad inputs with the same message."""
    batch, emb = with_field(*fixed_example(), "candidate_post_hashes", _set(-1))
    with pytest.raises(ValueError, match="candidate_post_hashes holds values in"):
        ranking_forward(SETUP).apply(ranking_params(SETUP), None, batch, emb)


def test_values_are_checked_only_where_they_are_known():
    """Inside jit the values are tracers: shapes are still checked, values are not (no error
    from a tracer), so that a model can be compiled and trained."""
    batch, emb = with_field(*fixed_example(), "history_actions", _set(0.5))
    config = SETUP.ranking_config()
    with pytest.raises(ValueError, match="history_actions"):
        jax.jit(lambda b, e: validate_inputs(b, e, config, 3)["C"])(batch, emb)
    assert jax.jit(lambda b, e: validate_inputs(b, e, config, 19)["C"])(batch, emb) == C
    with pytest.raises(ValueError, match="expected a multi-hot of 0 and 1"):
        validate_inputs(batch, emb, config, 19)


# ---------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------


def test_the_published_guides_configuration():
    """The published ranking guide: no key_size, emb_size or num_actions, the name
    PhoenixRankingModelConfig, imported from phoenix.recsys_model (the very module
    recsys_model). key_size defaults to emb_size // num_q_heads, and the built model's
    projections have the grouped-query widths that implies."""
    from phoenix.recsys_model import PhoenixRankingModelConfig, RecsysBatch, RecsysEmbeddings

    assert sys.modules["phoenix.recsys_model"] is recsys_model
    import phoenix

    assert phoenix.grok is sys.modules["grok"]  # an attribute of the package too
    assert recsys_model.__spec__.name == "recsys_model"  # its own, not the alias's
    assert (RecsysBatch, RecsysEmbeddings) == (
        recsys_model.RecsysBatch,
        recsys_model.RecsysEmbeddings,
    )
    model_config = TransformerConfig(
        emb_size=16,
        num_layers=1,
        num_q_heads=4,
        num_kv_heads=2,
        widening_factor=4,
        attn_output_multiplier=0.125,
    )
    assert model_config.key_size == 16 // 4
    assert PhoenixRankingModelConfig is PhoenixModelConfig
    config = PhoenixRankingModelConfig(model=model_config, history_seq_len=3, candidate_seq_len=2)
    assert (config.emb_size, config.num_actions) == (16, len(ACTIONS))
    batch = runners.create_dummy_batch_from_config(config.hash_config, 3, 2, config.num_actions)
    emb = runners.create_dummy_embeddings_from_config(config.hash_config, 16, 3, 2)
    forward = hk.transform(lambda b, e: config.make()(b, e))
    params = jax.eval_shape(forward.init, jax.random.PRNGKey(0), batch, emb)
    attention = "transformer/decoder_layer_0/multi_head_attention"
    assert params[f"{attention}/query"]["w"].shape == (16, 4 * 4)
    assert params[f"{attention}/key"]["w"].shape == (16, 2 * 4)
    assert params["phoenix_model"]["unembeddings"].shape == (16, len(ACTIONS))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: HashConfig(num_item_hashes=0), "HashConfig.num_item_hashes must be an integer"),
        (lambda: HashConfig(num_user_hashes=1.5), "num_user_hashes must be an integer >= 1"),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), num_actions=0),
         "num_actions must be an integer >= 1, got 0"),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), product_surface_vocab_size=0),
         "product_surface_vocab_size must be an integer >= 1, got 0"),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), fprop_dtype=jnp.int32),
         "fprop_dtype must be a floating dtype"),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), fprop_dtype="bf16"),
         "fprop_dtype must be a floating dtype, got 'bf16'"),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), fprop_dtype=None),
         "fprop_dtype must be a floating dtype, got None"),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), history_seq_len=-1),
         "history_seq_len must be an integer >= 0"),
    ],
)  # fmt: skip
def test_configs_refuse_sizes_no_model_has(build, message):
    with pytest.raises(ValueError, match=message):
        build()


NORM = recsys_model.NormConfig


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: PhoenixModelConfig(None), TypeError, "model must be a TransformerConfig, got "),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), right_anchored_rope="no"),
         TypeError, "right_anchored_rope must be True or False, got 'no'"),
        (lambda: dataclasses.replace(SETUP.retrieval_config(), enable_linear_proj=0),
         TypeError, "enable_linear_proj must be True or False, got 0"),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), hash_config={"num_user_hashes": 2}),
         TypeError, "hash_config must be a HashConfig, got dict"),
        (lambda: PhoenixModelConfig(SETUP.transformer_config(), continuous_action_config=NORM()),
         TypeError, "continuous_action_config must be a ContinuousActionConfig, got NormConfig"),
        (lambda: recsys_model.normalize_continuous_value(1.0, "log"),
         TypeError, "config must be a NormConfig, a ContinuousActionConfig or None, got str"),
        (lambda: recsys_model.normalize_continuous_value(1.0, NORM(norm_scale=0)),
         ValueError, "norm_scale must be a finite number > 0, got 0"),
        (lambda: recsys_model.denormalize_continuous_value(0.5, NORM(norm_scale=math.nan)),
         ValueError, "norm_scale must be a finite number > 0, got nan"),
        (lambda: recsys_model.compute_post_age_bucket(NOW, NOW - 60, 0),
         ValueError, "granularity_mins must be an integer >= 1, got 0"),
    ],
)  # fmt: skip
def test_settings_of_the_wrong_kind_are_refused_by_name(build, error, message):
    """Each of these gave an AttributeError, a ZeroDivisionError or NaN, or (a switch given as
    "no") the second release's positions."""
    with pytest.raises(error, match=message):
        build()


# ---------------------------------------------------------------------------------------------
# The second release: post age, continuous values, IP, slot invariance.
# ---------------------------------------------------------------------------------------------

NOW = 1_700_000_000


@pytest.mark.parametrize(
    "age_seconds, granularity, bucket",
    [
        (0, 60, 1),  # brand new: minute 0, bucket 1
        (59 * 60 + 59, 60, 1),  # 59.98 minutes: still the first hour
        (60 * 60, 60, 2),
        (4799 * 60, 60, 80),  # 4799 minutes // 60 + 1
        (4800 * 60, 60, 81),  # the cap: 4800 // 60 + 1
        (10**7, 60, 81),  # older: clipped to the cap
        (45 * 60, 30, 2),  # 45 // 30 + 1
        (4800 * 60, 30, 161),
        (-1, 60, 0),  # created after the impression
    ],
)
def test_post_age_bucket_hand_values(age_seconds, granularity, bucket):
    got = recsys_model.compute_post_age_bucket(NOW, NOW - age_seconds, granularity)
    assert got.dtype == jnp.int32 and int(got) == bucket


def test_post_age_bucket_is_zero_when_a_timestamp_is_absent_and_the_table_fits_every_bucket():
    buckets = recsys_model.compute_post_age_bucket(
        np.array([0, NOW, NOW]), np.array([NOW - 600, 0, NOW - 600])
    )
    np.testing.assert_array_equal(buckets, [0, 0, 1])
    for granularity in (1, 7, 60, 4800):
        config = PhoenixModelConfig(
            SETUP.transformer_config(), post_age_granularity_mins=granularity
        )
        top = int(recsys_model.compute_post_age_bucket(NOW, NOW - 10**9, granularity))
        assert config.post_age_vocab_size == 4800 // granularity + 2 == top + 1


def test_normalize_continuous_value_hand_values():
    values = np.array([-5.0, 0.0, 15.0, 30.0, 60.0])
    linear = recsys_model.normalize_continuous_value(values, recsys_model.NormConfig())
    np.testing.assert_allclose(linear, [0.0, 0.0, 0.5, 1.0, 1.0])
    log = recsys_model.normalize_continuous_value(values, recsys_model.NormConfig(10.0, True))
    np.testing.assert_allclose(log, [0.0, 0.0, 1.0, 1.0, 1.0])
    middle = recsys_model.normalize_continuous_value(4.0, recsys_model.NormConfig(10.0, True))
    np.testing.assert_allclose(middle, np.log1p(4.0) / np.log1p(10.0), rtol=1e-6)
    action_config = recsys_model.ContinuousActionConfig(norm_config=recsys_model.NormConfig(60))
    np.testing.assert_allclose(recsys_model.normalize_continuous_value(30.0, action_config), 0.5)


@pytest.mark.parametrize("use_log", [False, True])
def test_denormalize_continuous_value_inverts_the_normalisation_within_the_scale(use_log):
    norm = recsys_model.NormConfig(60.0, use_log)
    seconds = np.array([0.0, 0.5, 4.5, 20.0, 60.0], np.float32)
    normalized = recsys_model.normalize_continuous_value(seconds, norm)
    back = recsys_model.denormalize_continuous_value(normalized, norm)
    np.testing.assert_allclose(back, seconds, rtol=1e-5, atol=1e-5)
    action_config = recsys_model.ContinuousActionConfig(norm_config=norm)
    np.testing.assert_allclose(
        recsys_model.denormalize_continuous_value(normalized, action_config), back
    )


def test_ip_embeddings_are_summed_and_added_to_the_user_token_unprojected():
    rng = np.random.default_rng(0)
    hashes = np.ones((2, 2), np.int32)
    user, ip = rng.standard_normal((2, 2, 8)), rng.standard_normal((2, 3, 8))

    def reduce(ip_embeddings, num_ip_hashes):
        return recsys_model.block_user_reduce(
            hashes, user, 2, 8, user_ip_embeddings=ip_embeddings, num_ip_hashes=num_ip_hashes
        )[0]

    forward = hk.transform(reduce)
    params = forward.init(jax.random.PRNGKey(0), ip, 3)
    with_ip = np.asarray(forward.apply(params, None, ip, 3))
    without = np.asarray(forward.apply(params, None, None, 0))
    np.testing.assert_allclose(with_ip - without, ip.sum(axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(forward.apply(params, None, ip, 0), without)  # IP off: ignored


SECOND = Setup(release=2, num_layers=2)


def test_absent_second_release_inputs_are_zero_dwell_and_bucket_zero():
    """No continuous actions give exactly the logits of zero dwell times; no timestamps give
    exactly those of bucket 0 (a learned row, not zero: the logits differ from a model that has
    no post-age input); present ones change the logits."""
    batch, emb = copy_inputs(*example(SECOND, B, S, C, seed=1))
    full = dense_logits(SECOND, batch, emb)
    zero_dwell = batch._replace(
        history_continuous_actions=np.zeros_like(batch.history_continuous_actions)
    )
    no_dwell = batch._replace(history_continuous_actions=None)
    np.testing.assert_array_equal(
        dense_logits(SECOND, no_dwell, emb), dense_logits(SECOND, zero_dwell, emb)
    )
    assert np.all(np.any(dense_logits(SECOND, no_dwell, emb) != full, axis=-1))
    absent = np.zeros_like(batch.candidate_impr_ts)
    zero_ts = batch._replace(candidate_impr_ts=absent)
    no_ts = batch._replace(candidate_impr_ts=None, candidate_post_creation_ts=None)
    np.testing.assert_array_equal(
        dense_logits(SECOND, no_ts, emb), dense_logits(SECOND, zero_ts, emb)
    )
    assert np.all(np.any(dense_logits(SECOND, no_ts, emb) != full, axis=-1))


def test_a_first_release_model_ignores_second_release_inputs():
    batch, emb = copy_inputs(*example(SECOND, B, S, C, seed=2))
    first = Setup(num_layers=2)
    bare = batch._replace(
        history_continuous_actions=None, candidate_impr_ts=None, candidate_post_creation_ts=None
    )
    np.testing.assert_array_equal(dense_logits(first, batch, emb), dense_logits(first, bare, emb))


@settings(max_examples=6, deadline=None, derandomize=True)  # compiles per example
@given(
    setup=setups(),
    release=st.sampled_from([1, 2]),
    history_len=st.integers(1, 5),
    num_candidates=st.integers(2, 6),
    seed=SEEDS,
)
def test_right_anchored_logits_do_not_depend_on_slot(
    setup, release, history_len, num_candidates, seed
):
    """With right-anchored positions, permuting the candidates permutes their logits and
    nothing more (to float32 rounding), on the dense forward and on the cached path, with
    histories of random length (padded at random places, not only at the end)."""
    setup = dataclasses.replace(setup, release=release, anchored=True, num_actions=len(ACTIONS))
    batch, emb = copy_inputs(*example(setup, 2, history_len, num_candidates, seed))
    rng = np.random.default_rng(seed)
    holes = rng.random(batch.history_post_hashes.shape[:2]) < 0.3
    batch.history_post_hashes[holes] = 0
    order = rng.permutation(num_candidates)
    while num_candidates > 1 and np.all(order == np.arange(num_candidates)):
        order = rng.permutation(num_candidates)
    moved = recsys_model.map_candidates(batch, emb, lambda x: np.asarray(x)[:, order])
    back = np.argsort(order)
    dense_before = dense_logits(setup, batch, emb)
    dense_after = dense_logits(setup, *moved)[:, back]
    np.testing.assert_allclose(dense_after, dense_before, rtol=RTOL, atol=ATOL)
    ranker = make_ranker(setup)
    cached_before = np.asarray(ranker.rank(batch, emb).scores)
    cached_after = np.asarray(ranker.rank(*moved).scores)[:, back]
    np.testing.assert_allclose(cached_after, cached_before, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(cached_before, 1 / (1 + np.exp(-dense_before)), atol=1e-5)


def test_a_process_run_for_the_second_release_builds_it_from_configs_that_leave_release_out(
    monkeypatch,
):
    """With PHOENIX_RELEASE=2, a config built as the published guides show builds the second
    release's ranker (its parameters, its continuous head); a config that names its release
    keeps it, and so does a copy made by dataclasses.replace once the variable is gone."""
    transformer = SETUP.transformer_config()
    monkeypatch.delenv(recsys_model.RELEASE_VARIABLE, raising=False)
    names = set(checkpoint.param_shapes(PhoenixModelConfig(transformer))["phoenix_model"])
    for value in ("", " "):
        monkeypatch.setenv(recsys_model.RELEASE_VARIABLE, value)
        assert PhoenixModelConfig(transformer).release == 1
    monkeypatch.setenv(recsys_model.RELEASE_VARIABLE, "2")
    config = PhoenixModelConfig(transformer, emb_size=SETUP.emb_size)
    assert (config.release, PhoenixModelConfig(transformer, release=1).release) == (2, 1)
    second = set(checkpoint.param_shapes(config)["phoenix_model"])
    assert second - names == {
        "history_dwell_time_proj1", "history_dwell_time_proj2", "post_age_embedding_table",
        "continuous_unembeddings",
    }  # fmt: skip
    monkeypatch.delenv(recsys_model.RELEASE_VARIABLE)
    assert dataclasses.replace(config, history_seq_len=4).release == 2
    assert PhoenixModelConfig(transformer).release == 1
    monkeypatch.setenv(recsys_model.RELEASE_VARIABLE, "second")
    with pytest.raises(ValueError, match=r"PHOENIX_RELEASE='second': expected one of 1, 2 \("):
        PhoenixModelConfig(transformer)


def test_release_and_continuous_sizes_are_checked():
    with pytest.raises(ValueError, match=r"release must be one of \(1, 2\), got 3"):
        PhoenixModelConfig(SETUP.transformer_config(), release=3)
    with pytest.raises(ValueError, match=r"release must be one of \(1, 2\), got True"):
        PhoenixModelConfig(SETUP.transformer_config(), release=True)
    with pytest.raises(ValueError, match=r"release must be one of \(1, 2\), got np.True_"):
        PhoenixModelConfig(SETUP.transformer_config(), release=np.True_)
    with pytest.raises(ValueError, match="num_continuous_actions must be an integer >= 2"):
        PhoenixModelConfig(SETUP.transformer_config(), num_continuous_actions=1)
    batch, emb = fixed_example()
    lone = batch._replace(candidate_impr_ts=np.full((B, C), NOW))
    with pytest.raises(ValueError, match="candidate_impr_ts is given without the other"):
        validate_inputs(lone, emb, SETUP.ranking_config(), SETUP.num_actions)
    second = Setup(release=2)  # continuous actions 3 wide; both timestamps
    batch, emb = copy_inputs(*example(second, B, S, C))
    config = second.ranking_config()
    narrow = batch._replace(history_continuous_actions=batch.history_continuous_actions[..., :2])
    with pytest.raises(ValueError, match=r"has shape \(2, 4, 2\), expected \[B=2 .*, Nc=3\]$"):
        validate_inputs(narrow, emb, config, second.num_actions)
    # (float32 cannot hold a unix time to the minute)
    for name in ("candidate_impr_ts", "candidate_post_creation_ts"):
        floats = batch._replace(**{name: getattr(batch, name).astype(np.float32)})
        with pytest.raises(ValueError, match=f"^{name} must have a dtype of kind integer, got f"):
            validate_inputs(floats, emb, config, second.num_actions)


def traced_matrix_flops(jaxpr) -> int:
    """2 per multiply-add of every `dot_general` in a traced program, the functions it calls
    and its loops included (a loop's body once per trip; a conditional's costliest branch)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += (
                2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracted)
            )
        inner = [
            x.jaxpr if isinstance(x, jax_core.ClosedJaxpr) else x
            for value in eqn.params.values()
            for x in (value if isinstance(value, tuple | list) else (value,))
            if isinstance(x, jax_core.ClosedJaxpr | jax_core.Jaxpr)
        ]
        if inner:
            counts = [traced_matrix_flops(x) for x in inner]
            trips = eqn.params.get("length", 1)  # a scan's; other loops are not expected here
            total += max(counts) if eqn.primitive.name == "cond" else trips * sum(counts)
    return total


def test_traced_matrix_flops_counts_products_in_called_functions_and_loops():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))

    def program(a, b):
        inner = jax.jit(lambda a, b: a @ b)(a, b)  # 2 * 3 * 4 * 5
        looped = jax.lax.map(lambda row: row @ b, a)  # three trips of 2 * 4 * 5
        return inner, looped, jnp.einsum("ij,jk->ik", a, b)

    assert traced_matrix_flops(jax.make_jaxpr(program)(a, b).jaxpr) == 120 + 3 * 40 + 120


@pytest.mark.parametrize("release", [1, 2])
@pytest.mark.parametrize("num_candidates", [8, 40])
def test_matrix_flops_are_the_traced_products_less_what_they_leave_out(release, num_candidates):
    """Both counts take in the products of the projections, attention and unembedding; they
    leave out the one-hot products of the product surface (a table of 16 rows) and the second
    release's small inputs and dwell head, and the cached path's count takes the context's
    attention as causal where the program computes the whole square. So each is at most the
    traced count, and within a few percent of it."""
    config = PhoenixModelConfig(
        MINI_TRANSFORMER,
        history_seq_len=16,
        candidate_seq_len=8,
        fprop_dtype=jnp.float32,
        release=release,
        right_anchored_rope=release == 2,
    )
    runner = runners.ModelRunner(config)
    runner.initialize()
    params = checkpoint.param_shapes(config)
    batch, embeddings = runners.create_example_batch(
        1, 128, 16, num_candidates, len(ACTIONS), seed=0,
        include_continuous_actions=release == 2, include_timestamps=release == 2,
    )  # fmt: skip
    encode, score = runner.make_cached_fns()

    def cached(params, batch, embeddings):
        context = encode.apply(params, None, batch, embeddings)
        return score.apply(params, None, context, batch, embeddings, 0, None)

    def dense(params, batch, embeddings):
        return runner.forward.apply(params, None, batch, embeddings)

    for fn, bound in [
        (dense, recsys_model.ranking_matrix_flops(config, num_candidates, cached=False)),
        (cached, recsys_model.ranking_matrix_flops(config, num_candidates, cached=True)),
    ]:
        traced = traced_matrix_flops(jax.make_jaxpr(fn)(params, batch, embeddings).jaxpr)
        assert 0.97 * traced <= bound <= traced, (fn.__name__, bound, traced)
