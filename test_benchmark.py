"""The benchmark's FLOP bounds against the matrix products of the traced programs they bound."""

import math

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jax_core

import benchmark
import checkpoint
import runners
from pipeline import MINI_TRANSFORMER
from recsys_model import ACTIONS, PhoenixModelConfig


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
def test_flop_bounds_are_the_traced_products_less_what_they_leave_out(release, num_candidates):
    """Both bounds count the products of the projections, attention and unembedding; they
    leave out the one-hot products of the product surface (a table of 16 rows) and the second
    release's small inputs and dwell head, and the cached path's bound counts the context's
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
        (dense, benchmark.dense_ranking_flops(config, num_candidates)),
        (cached, benchmark.cached_ranking_flops(config, num_candidates)),
    ]:
        traced = traced_matrix_flops(jax.make_jaxpr(fn)(params, batch, embeddings).jaxpr)
        assert 0.97 * traced <= bound <= traced, (fn.__name__, bound, traced)
