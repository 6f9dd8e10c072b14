"""Training on the tiny world: losses fall, the trained ranker beats the base rate, reports equal
hand-computed values, data parallelism and resumption change nothing, exports load, and bad
input stops with one line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import warnings
import zipfile
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metrics
import runners
import train as T
from checkpoint import load_artifacts, read_npz, write_npz
from conftest import BRIEF_RESULTS, finish, read_only, run_script, start_with_devices, train_briefly
from pipeline import Pipeline
from recsys_model import ACTIONS
from tables import TABLE_NAMES
from world import WorldConfig, build_world

QUICK = T.TrainConfig.quick()
FAVORITE = ACTIONS.index("favorite_score")
# Flags of a run that trains only the ranker and skips plots and artifacts.
RANKER_ONLY = ["--quick", "--model", "ranker", "--no-export"]


def losses(log: list[dict]) -> np.ndarray:
    return np.array([entry["loss"] for entry in log])


@pytest.fixture(scope="module")
def trained_ranker(tmp_path_factory):
    """The ranker after 60 steps on a world a little larger than the tiny one (on which a
    model this size only memorises)."""
    small = dataclasses.replace(
        T.world_lib.WorldConfig.tiny(), num_users=160, num_posts=300, mean_requests_per_user=24.0
    )
    world = T.world_lib.build_world(small)
    job = T.make_job("ranker", world, dataclasses.replace(QUICK, steps=60, decay_steps=60))
    state, log = T.fit(job, tmp_path_factory.mktemp("ranker"), quiet=True)
    return job, jax.device_get(state.params), log


def test_ranker_loss_falls_and_beats_the_base_rate_on_held_out_data(trained_ranker):
    job, params, log = trained_ranker
    loss = losses(log)
    assert loss[-10:].mean() < 0.7 * loss[:5].mean()
    report, predictions = T.evaluate_ranker(job, params)
    labels = predictions["ranking_labels"].reshape(-1, len(ACTIONS)).astype(float)
    model = predictions["ranking_model"].reshape(-1, len(ACTIONS))
    base = np.broadcast_to(labels.mean(axis=0), labels.shape)
    # Summed over the actions, held-out cross-entropy below the constant base-rate predictor's.
    model_ce = sum(metrics.cross_entropy(labels[:, a], model[:, a]) for a in range(len(ACTIONS)))
    base_ce = sum(metrics.cross_entropy(labels[:, a], base[:, a]) for a in range(len(ACTIONS)))
    assert model_ce < base_ce


def test_retrieval_loss_falls(world, tmp_path):
    # The quick run's schedule (decay over 30 steps, then the floor): its compiled step is reused.
    job = T.make_job("retrieval", world, dataclasses.replace(QUICK, steps=40))
    state, log = T.fit(job, str(tmp_path), quiet=True)  # a folder's name is a folder too
    loss = losses(log)
    assert loss[-10:].mean() < 0.5 * loss[:5].mean()
    assert abs(log[-1]["temperature"] - 0.05) > 1e-3  # learned, from its initial 0.05
    with pytest.raises(ValueError, match="already holds a saved retrieval: resume=True contin"):
        T.fit(job, tmp_path, quiet=True)  # would start again over the saved state
    with pytest.raises(TypeError, match="resume must be True or False, got 'no'"):
        T.fit(job, tmp_path, resume="no", quiet=True)  # (a string reads as true)
    params, read_log, training = T.load_trained(str(tmp_path), job)  # as a later session would
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))
    assert read_log == log and training["steps"] == 40
    with pytest.raises(FileNotFoundError, match=r"no retrieval saved in .*nowhere \(train.fit sa"):
        T.load_trained(tmp_path / "nowhere", job)
    reseeded = T.make_job("retrieval", world, dataclasses.replace(job.train, seed=1))
    with pytest.raises(ValueError, match=f"the state of another run .*; {T.TRAINED_ADVICE}$"):
        T.load_trained(tmp_path, reseeded)  # (its tables hashed with other parameters)


def test_what_is_built_once_per_config_is_built_outside_any_trace():
    """load_trained reads a state's shapes with eval_shape: the initialiser it builds first,
    cached for later runs, held a tracer, and a later fit failed with UnexpectedTracerError."""
    built = T._per_config(lambda config: jnp.ones(3) * config)
    jax.eval_shape(lambda: built(2.0))
    np.testing.assert_array_equal(built(2.0), [2.0, 2.0, 2.0])


def test_trainable_initialisation_lets_every_array_learn(world):
    """From the published initialisation (zero norm scales and linear weights) most arrays get
    no gradient; from the trainable one every array does."""
    job = T.make_job("ranker", world, QUICK)
    state = T.initial_state("ranker", job.config, job.hashing, QUICK)
    published = {
        "model": T.published_init("ranker", job.config, QUICK.seed),
        "tables": state.params["tables"],
    }
    batch = T.take(job.train_data, np.arange(QUICK.batch_size))
    gradient = jax.jit(jax.grad(lambda p: job.loss(p, batch)[0]))  # compiled once, for both

    def learning(params) -> list[bool]:
        return [bool(jnp.any(g != 0)) for g in jax.tree.leaves(gradient(params)["model"])]

    assert all(learning(state.params))
    from_published = learning(published)
    assert sum(from_published) < len(from_published) / 2
    # The tables too: each of the three (users, posts, authors) gets a gradient.
    tables = gradient(state.params)["tables"]
    assert sorted(tables) == sorted(TABLE_NAMES.values())
    assert all(bool(jnp.any(g != 0)) for g in tables.values())


def test_rowwise_adagrad_divides_each_row_by_its_accumulated_mean_square():
    """Row 0 sees [3, 4] (mean square 12.5), then nothing; row 1 nothing, then [1, 1]."""
    tx = T.scale_by_rowwise_adagrad()
    table = jnp.zeros((2, 2))
    state = tx.init(table)
    first, state = tx.update(jnp.array([[3.0, 4.0], [0.0, 0.0]]), state)
    # (row 1, never seen, accumulator 0: an update of 0, not 0 / 0)
    np.testing.assert_allclose(first, [[3 / 12.5**0.5, 4 / 12.5**0.5], [0, 0]], rtol=1e-6)
    second, state = tx.update(jnp.array([[0.0, 0.0], [1.0, 1.0]]), state)
    np.testing.assert_allclose(second, [[0, 0], [1, 1]], rtol=1e-6)
    np.testing.assert_allclose(state, [12.5, 1.0])


def test_clip_or_skip_equals_optax_clipping_and_skipping_with_its_state():
    """The same updates and state as `apply_if_finite(chain(clip_by_global_norm, inner))` for
    gradients above and below the clipping norm, NaN and infinite ones, and the update optax
    applies after too many skips in a row; finite gradients whose squared norm overflows are
    skipped too, where optax would clip them to zero."""
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    inner = optax.sgd(0.1, momentum=0.9)
    ours = T.clip_or_skip(inner, 1.0, 2)
    reference = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), inner), 2)
    state, ref_state = ours.init(params), reference.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    update, ref_update = jax.jit(ours.update), jax.jit(reference.update)
    nan = {"a": jnp.array([1.0, jnp.nan, 0.0]), "b": jnp.zeros((2, 2))}
    inf = {"a": jnp.zeros(3), "b": jnp.array([[0.0, -jnp.inf], [1.0, 0.0]])}
    counts = []

    def assert_same(x, y):
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
            np.testing.assert_array_equal(a, b)

    # Norms 7.9, 1.3 and 0.26, two skips, 5.3, then three skips in a row: the third applied.
    for grads in (3.0, 0.5, 0.1, nan, inf, 2.0, inf, nan, nan):
        if isinstance(grads, float):
            grads = jax.tree.map(lambda p, s=grads: s * p, params)
        before = state.inner_state
        updates, state = update(grads, state)
        want, ref_state = ref_update(grads, ref_state)
        got, expected = jax.tree.leaves((updates, state)), jax.tree.leaves((want, ref_state))
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        counts.append(int(state.notfinite_count))
        if 0 < counts[-1] <= 2:  # skipped: no update, the momentum as it was
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
            assert_same(state.inner_state, before)
    assert counts == [0, 0, 0, 1, 2, 0, 1, 2, 3] and int(state.total_notfinite) == 5
    assert np.isnan(np.asarray(updates["a"])).any()  # the third in a row was applied
    huge = {"a": jnp.full(3, 1e20), "b": jnp.zeros((2, 2))}
    start = ours.init(params)
    updates, skipped = ours.update(huge, start)
    assert int(skipped.notfinite_count) == 1 and int(skipped.total_notfinite) == 1
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    assert_same(skipped.inner_state, start.inner_state)


def test_updates_with_non_finite_gradients_are_skipped_counted_then_stop_the_run(world, tmp_path):
    job = T.make_job("ranker", world, dataclasses.replace(QUICK, steps=5, decay_steps=20))

    def poisoned(params, arrays):
        loss, stats = job.loss(params, arrays)
        return loss * jnp.nan, stats

    bad = dataclasses.replace(job, loss=poisoned)
    state, log = T.fit(bad, tmp_path / "five", quiet=True)
    assert [entry["skipped"] for entry in log] == [1, 2, 3, 4, 5]
    start = T.initial_state("ranker", job.config, job.hashing, job.train).params
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(got, want)
    bad = dataclasses.replace(bad, train=dataclasses.replace(job.train, steps=20))
    message = (
        r"ranker: 10 updates in a row had gradients whose norm is not finite \(the last at step "
        r"10\); "
        "stopping, before any state was saved"
    )
    with pytest.raises(ValueError, match=message):
        T.fit(bad, tmp_path / "twenty", quiet=True)
    bad = dataclasses.replace(bad, train=dataclasses.replace(bad.train, eval_every=4))
    with pytest.raises(ValueError, match="stopping, the state saved at step 8 is kept"):
        T.fit(bad, tmp_path / "saved", quiet=True)
    # Resumed from a state of 4 skips in a row, the run stops at the same step: the count goes
    # on with the state, so optax never gets to apply a non-finite update.
    four = dataclasses.replace(bad, train=dataclasses.replace(bad.train, steps=4))
    T.fit(four, tmp_path / "resumed", quiet=True)
    message = r"\(the last at step 10\); stopping, the state saved at step 8 is kept"
    with pytest.raises(ValueError, match=message):
        T.fit(bad, tmp_path / "resumed", resume=True, quiet=True)


def test_a_diverging_run_is_said_to_be_once(world, tmp_path):
    """A loss ten times the first step's: a warning naming both, once; a run that learns, none."""
    job = T.make_job("ranker", world, dataclasses.replace(QUICK, steps=8, learning_rate=1e3))
    with pytest.warns(RuntimeWarning) as said:
        _, log = T.fit(job, tmp_path / "diverging", quiet=True)
    assert len(said) == 1, [str(w.message) for w in said]
    first, blown = log[0]["loss"], next(e for e in log if e["loss"] > 10 * log[0]["loss"])
    assert str(said[0].message) == (
        f"ranker: the loss has grown from {first:.4g} at step 1 to {blown['loss']:.4g} at step "
        f"{blown['step']}: the training is diverging (a learning rate too high?)"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.fit(dataclasses.replace(job, train=QUICK), tmp_path / "learning", quiet=True)


def test_a_run_whose_steps_are_not_its_schedules_says_where_the_schedule_ends(
    world, tmp_path, capsys
):
    floor = f"{QUICK.final_learning_rate_fraction:.0%} of its peak"
    for steps, decay, said in (
        (2, 30, f"this run stops before it reaches its floor, {floor}"),
        (7, 6, f"after step 6 it stays at its floor, {floor}"),
    ):
        settings = dataclasses.replace(QUICK, steps=steps, decay_steps=decay, eval_every=100)
        T.fit(T.make_job("ranker", world, settings), tmp_path / str(steps))
        out = capsys.readouterr().out.splitlines()
        assert (
            out[1]
            == f"  (the learning rate's schedule is {decay} steps long, --decay-steps: {said})"
        )
    T.fit(
        T.make_job(
            "ranker", world, dataclasses.replace(QUICK, steps=2, decay_steps=2, warmup_steps=1)
        ),
        tmp_path / "same",
    )
    assert "schedule" not in capsys.readouterr().out


def test_batches_that_do_not_split_over_the_devices_are_refused(world, tmp_path):
    four = types.SimpleNamespace(size=4, devices=np.arange(4))  # a mesh of four devices
    job = T.make_job("ranker", world, dataclasses.replace(QUICK, batch_size=30))
    message = r"batch_size \(30\) does not split over the 4 devices; use a multiple of 4"
    with pytest.raises(ValueError, match=message):
        T.fit(job, tmp_path, mesh=four, quiet=True)
    assert not any(tmp_path.iterdir())


def test_a_world_without_held_out_examples_cannot_train():
    bare = build_world(dataclasses.replace(WorldConfig.tiny(), eval_requests_per_user=0))
    message = (
        r"the world holds no held-out requests \(eval_requests_per_user 0\); training the "
        "ranker evaluates on them"
    )
    with pytest.raises(ValueError, match=message):
        T.make_job("ranker", bare, QUICK)
    # Held-out requests, but not one favorite among them: nothing for retrieval to find.
    lonely = build_world(dataclasses.replace(WorldConfig.tiny(seed=3), num_users=1))
    assert len(lonely.ranking_eval) == 2 and not len(lonely.retrieval_eval)
    message = r"no held-out favorite to retrieve \(in its 2 held-out requests\); training the"
    with pytest.raises(ValueError, match=message):
        T.make_job("retrieval", lonely, QUICK)


def test_retrieval_loss_equals_a_numpy_sampled_softmax(world):
    """Log-Q corrected softmax over the batch's targets and the global negatives, with
    accidental hits (another column holding the query's own target) masked."""
    job = T.make_job("retrieval", world, dataclasses.replace(QUICK, negatives=8))
    params = T.initial_state("retrieval", job.config, job.hashing, job.train).params
    targets = world.retrieval_train.target_post_ids
    frequency = np.bincount(targets, minlength=world.num_posts + 1) / len(targets)
    log_q = np.log(QUICK.batch_size * frequency + 8 / world.num_posts)  # by post id

    arrays = job.batch(0)
    ids = np.concatenate([arrays["target_ids"], arrays["negative_ids"]])
    np.testing.assert_allclose(arrays["log_q"], log_q[ids], rtol=1e-6)
    arrays["target_ids"][1] = arrays["negative_ids"][0] = arrays["target_ids"][0]  # hits
    for field in ("post_hashes", "author_hashes"):
        arrays[f"negative_{field}"][0] = arrays[f"target_{field}"][1] = arrays[f"target_{field}"][0]
    ids = np.concatenate([arrays["target_ids"], arrays["negative_ids"]])
    arrays["log_q"] = log_q[ids].astype(np.float32)
    loss, _ = jax.jit(job.loss)(params, arrays)

    towers = T.retrieval_towers(job.config)
    posts = T.post_batch(
        np.concatenate([arrays["target_post_hashes"], arrays["negative_post_hashes"]]),
        np.concatenate([arrays["target_author_hashes"], arrays["negative_author_hashes"]]),
        job.config,
    )
    users, vectors, temperature = jax.jit(towers.apply)(
        params["model"], None, T.query_batch(arrays), posts, params["tables"]
    )
    logits = np.asarray(users, np.float64) @ np.asarray(vectors, np.float64).T / float(temperature)
    expected = []
    for i, target in enumerate(arrays["target_ids"]):
        row = logits[i] - log_q[ids]
        keep = (ids != target) | (np.arange(len(ids)) == i)
        expected.append(np.log(np.exp(row[keep]).sum()) - row[i])
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("mae", [0.0, 0.05, 0.4]),
        ("mse", [0.0, 0.0025, 0.16]),
        # Squared below the delta of 0.1 (0.05**2 / 2), absolute beyond it: 0.1 * (0.4 - 0.05).
        ("huber", [0.0, 0.00125, 0.035]),
        # Power 1.5 at mu 0.5: 2 y / sqrt(mu) + 2 sqrt(mu), lowest where mu equals y.
        (
            "tweedie",
            [
                2 * 0.5**0.5 + 2 * 0.5**0.5,
                1.1 / 0.5**0.5 + 2 * 0.5**0.5,
                1.8 / 0.5**0.5 + 2 * 0.5**0.5,
            ],
        ),
    ],
)
def test_continuous_losses_equal_hand_computed_values(loss_type, expected):
    config = T.ContinuousActionConfig(loss_weight=1.0, loss_type=loss_type)
    loss = T.continuous_loss(jnp.full(3, 0.5), jnp.array([0.5, 0.55, 0.9]), config)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)


def test_reports_equal_hand_computed_values():
    """Four impressions, favorite labels 1 0 1 0, oracle probabilities .9 .2 .6 .6: AUROC 3.5/4
    (the tie counts half); PR-AUC 1/2 · 1 + 1/2 · 2/3 (the tied pair enters together);
    cross-entropy against the base rate .5 by hand."""
    labels = np.zeros((1, 4, len(ACTIONS)), np.uint8)
    labels[0, [0, 2], FAVORITE] = 1
    oracle = np.full((1, 4, len(ACTIONS)), 0.5, np.float32)
    oracle[0, :, FAVORITE] = [0.9, 0.2, 0.6, 0.6]
    model = oracle.copy()
    model[0, :, FAVORITE] = [0.2, 0.9, 0.6, 0.6]  # positives .2 and .6 below or tied: 0.5 / 4
    report = T.ranking_report(labels, model, oracle)["favorite_score"]
    ce = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.4)) / 4
    assert report["auc_oracle"] == 0.875 and report["auc"] == 0.125
    # The model: .9 (negative), the tie .6 .6, .2: recall 1/2 at precision 1/3, then 1 at 1/2.
    assert report["pr_auc_oracle"] == round(5 / 6, 6) and report["pr_auc"] == round(5 / 12, 6)
    assert report["rce_oracle"] == pytest.approx(100 * (math.log(2) - ce) / math.log(2), abs=1e-5)
    assert report["positives"] == 2
    model_ce = -(math.log(0.2) + math.log(0.1) + math.log(0.6) + math.log(0.4)) / 4
    assert report["ce_oracle"] == pytest.approx(ce, abs=1e-6)
    assert report["ce"] == pytest.approx(model_ce, abs=1e-6)
    assert report["rce_ratio"] == pytest.approx(report["rce"] / report["rce_oracle"], abs=1e-6)
    # Two bins by rank of the oracle's .2 .6 .6 | .9 (the tied pair's middle rank, 1.5, is in
    # the first): observed 1 of 3, then 1 of 1.
    two = T.ranking_report(labels, model, oracle, bins=2)["favorite_score"]["calibration"]
    assert two["oracle"] == {
        "mean_predicted": [pytest.approx(1.4 / 3, abs=1e-6), 0.9],
        "observed_rate": [pytest.approx(1 / 3, abs=1e-6), 1.0],
        "count": [3, 1],
    }
    empty = T.ranking_report(labels, oracle, oracle)["report_score"]  # no positives at all
    assert empty["auc"] is None and empty["pr_auc"] is None and empty["positives"] == 0
    # Without a held-out favorite the goals are unmet, and say why, rather than fail.
    none = T.goal_checks({"ranking": {"actions": T.ranking_report(0 * labels, model, oracle)}})
    assert none == [
        ("favorite: AUROC and RCE not defined on held-out labels of one kind (0 positives)", False)
    ]

    targets = np.array([3, 7])
    rest = np.arange(100, 198)  # ids that are no target
    rankings = {"oracle": np.array([[3, 1, *rest], [2, 7, *rest]])}
    retrieval = T.retrieval_report(targets, rankings)
    assert retrieval["recall@10"]["oracle"] == 1.0
    assert retrieval["ndcg@10"]["oracle"] == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=1e-6)


def test_rank_corpus_orders_by_score_skips_the_history_and_serves_the_window_first():
    """One query along x; posts 1..4 at cosines 0, 1, -1, 0.6 (in that id order)."""
    users = np.array([[1.0, 0.0]])
    posts = np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    assert T.rank_corpus(users, posts, np.array([[0]]), 4).tolist() == [[2, 4, 1, 3]]
    assert T.rank_corpus(users, posts, np.array([[2]]), 3).tolist() == [[4, 1, 3]]
    servable = np.array([[False, False, True, True]])  # each group by score, not by id
    assert T.rank_corpus(users, posts, np.array([[0]]), 4, servable).tolist() == [[4, 3, 2, 1]]


FOUR_DEVICES = """
import sys
from pathlib import Path
import jax
from checkpoint import write_npz
from conftest import train_briefly
assert len(jax.devices()) == 4, jax.devices()
for name, arrays in train_briefly(sys.argv[1]).items():
    write_npz(arrays, Path(sys.argv[1]) / f"{name}.npz")
"""


@pytest.fixture(scope="module", autouse=True)
def four_device_run(tmp_path_factory):
    """Starts the four-device training with the module, so that it runs in a process of its
    own while the other tests do; the data-parallel test collects it."""
    folder = tmp_path_factory.mktemp("four_devices")
    process = start_with_devices(FOUR_DEVICES, 4, str(folder))
    yield process, folder
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_data_parallel_over_four_devices_equals_one_device(four_device_run, tmp_path):
    process, folder = four_device_run
    status, _, report = finish(process)
    assert status == 0, report
    four = {name: read_npz(folder / f"{name}.npz") for name in BRIEF_RESULTS}
    one = train_briefly(tmp_path)
    start, gradient, trained = (one[name] for name in BRIEF_RESULTS)
    assert all(four[name].keys() == one[name].keys() for name in BRIEF_RESULTS)
    assert len(start) > 20
    for key in start:
        np.testing.assert_array_equal(four["start"][key], start[key], err_msg=key)
        # The first batch's gradient, each device summing its quarter of the batch and the
        # four sums added: the one-device gradient to float32 rounding (on the project's CPU
        # within 9e-7 of the largest component; leaving out a quarter of the batch moves each
        # of the ranker's by 6 % of its largest component or more).
        scale = np.abs(gradient[key]).max()
        assert scale > 0, key
        np.testing.assert_allclose(
            four["gradient"][key], gradient[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key
        )
        # Three steps on: Adam divides each update by the gradient's own scale, so that a
        # component whose gradient is zero but for rounding moves by a good part of the learning
        # rate either way, and single elements differ by up to 1 % of the largest step a
        # parameter took. Each parameter as a whole moved the same to within 1e-3 of its
        # movement (1.1e-4 at most, seen on the project's CPU); in a run one step longer the
        # first parameter checked ended 0.76 of its movement away.
        moved = np.linalg.norm(trained[key] - start[key])
        assert moved > 0, key
        assert np.linalg.norm(four["trained"][key] - trained[key]) <= 1e-3 * moved, key


def test_resume_is_bit_exact_even_after_a_save_cut_short(tmp_path, capsys, monkeypatch):
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert run_script(T.main, [*RANKER_ONLY, "--out", str(once), "--steps", "8"], capsys)[0] == 0
    assert run_script(T.main, [*RANKER_ONLY, "--out", str(twice), "--steps", "4"], capsys)[0] == 0

    def cut_short(*args):
        raise RuntimeError("stopped after the log, before the state")

    with monkeypatch.context() as patch:
        patch.setattr(T, "save_state", cut_short)
        with pytest.raises(RuntimeError, match="before the state"):
            run_script(
                T.main, [*RANKER_ONLY, "--out", str(twice), "--steps", "6", "--resume"], capsys
            )
    assert len(json.loads((twice / "state" / "ranker_log.json").read_text())) == 6
    status, out, _ = run_script(
        T.main, [*RANKER_ONLY, "--out", str(twice), "--steps", "8", "--resume"], capsys
    )
    assert status == 0 and "steps 4 to 8" in out
    a, b = (read_npz(folder / "state" / "ranker.npz") for folder in (once, twice))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_resumed_run_starts_a_model_it_had_not_saved_from_step_0(tmp_path, capsys):
    """As after an interruption between the ranker's end and retrieval's first evaluation."""
    out = str(tmp_path / "run")
    assert run_script(T.main, [*RANKER_ONLY, "--out", out, "--steps", "2"], capsys)[0] == 0
    argv = ["--quick", "--no-export", "--out", out, "--resume", "--steps", "3"]
    status, printed, err = run_script(T.main, argv, capsys)
    assert status == 0, err
    assert "ranker: steps 2 to 3" in printed and "retrieval: steps 0 to 3" in printed
    state = tmp_path / "run" / "state"
    assert f"retrieval: no state saved in {state} yet; it trains from step 0" in printed
    assert "ranker: no state saved" not in printed
    status, printed, err = run_script(T.main, argv, capsys)  # again: nothing left to train
    assert status == 0, err
    assert "ranker: already at step 3, where --steps stops it; nothing to train" in printed
    # Every saved state is read before any model trains: a damaged second one stops the run
    # before the first has moved.
    ranker = (state / "ranker.npz").read_bytes()
    damaged = state / "retrieval.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    argv[-1] = "4"
    status, printed, err = run_script(T.main, argv, capsys)
    assert status == 2 and "retrieval.npz: not a readable .npz file" in err
    assert "ranker: steps" not in printed and (state / "ranker.npz").read_bytes() == ranker


def test_outputs_stopped_while_written_leave_no_eval_json(tmp_path, capsys, monkeypatch):
    """eval.json, written last, marks a set of outputs of one run: a run stopped while writing
    them (here by a full disk) left the earlier run's eval.json beside its own predictions."""
    out = tmp_path / "run"
    argv = [*RANKER_ONLY, "--out", str(out), "--steps", "2"]
    assert run_script(T.main, argv, capsys)[0] == 0 and (out / "eval.json").is_file()

    write_json = T.write_json

    def full(data, path):  # the disk fills up as the last output is written
        if os.path.basename(path) == "eval.json":
            raise OSError(28, "No space left on device")
        write_json(data, path)

    monkeypatch.setattr(T, "write_json", full)
    status, _, err = run_script(T.main, [*argv, "--resume"], capsys)
    assert status == 2 and "No space left on device" in err
    assert not (out / "eval.json").exists()
    monkeypatch.undo()
    assert run_script(T.main, [*argv, "--resume"], capsys)[0] == 0  # writes them again
    assert json.loads((out / "eval.json").read_text())["steps"] == {"ranker": 2}


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two runs into one folder each wrote over the other's state and outputs, and both ended
    'wrote ...'."""
    out = tmp_path / "run"
    out.mkdir()
    with T.run_folder_lock(out):  # as the first run holds it
        status, _, err = run_script(T.main, [*RANKER_ONLY, "--out", str(out)], capsys)
    assert status == 2 and "another run is training into this folder" in err, err
    assert not any(out.iterdir())
    argv = [*RANKER_ONLY, "--out", str(out), "--steps", "1"]
    assert run_script(T.main, argv, capsys)[0] == 0  # free again
    with T.run_folder_lock(out):  # named as such, not as a folder that needs --resume
        status, _, err = run_script(T.main, argv, capsys)
    assert status == 2 and "another run is training into this folder" in err, err


def test_what_a_killed_run_left_half_written_is_removed_by_the_next(tmp_path, capsys):
    """Temporaries of files and artifacts that a run killed while writing left behind (no
    finished write leaves them): the next run into the folder removes them and says so, where
    it refused the folder as holding foreign files."""
    out = tmp_path / "run"
    argv = [*RANKER_ONLY, "--out", str(out), "--steps", "1"]
    assert run_script(T.main, argv, capsys)[0] == 0
    left = [out / ".eval.json.k3j2.partial", out / "state" / ".ranker.npz.x8f1.partial"]
    for path in left:
        path.write_text("half")
    (out / "..artifacts.new.q9z").mkdir()
    (out / "..artifacts.new.q9z" / "ranker").mkdir()
    (out / ".artifacts.old").mkdir()
    (out / ".probe.x1").mkdir()  # (a folder tried for writing)
    (out / "notes.txt").write_text("mine")  # a file of the user's is not the run's to remove
    status, _, err = run_script(T.main, [*argv[:-1], "2", "--resume"], capsys)
    assert status == 2 and "holds files that are not a training run's (notes.txt)" in err, err
    (out / "notes.txt").unlink()
    status, said, err = run_script(T.main, [*argv[:-1], "2", "--resume"], capsys)
    assert status == 0, err
    assert said.startswith(
        f"removed what a run stopped while writing left in {out}: ..artifacts.new.q9z, "
        ".artifacts.old, .eval.json.k3j2.partial, .probe.x1, state/.ranker.npz.x8f1.partial\n"
    ), said
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert not any(p.name.startswith(".") for p in (out / "state").iterdir())


def test_curves_of_a_run_shorter_than_its_evaluation_interval(tmp_path):
    log = [{"step": s, "loss": 1.0 / s, "skipped": 0.0} for s in range(1, 9)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend with nothing in it
        T.plot_curves({"ranker": log}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_quick_run_writes_what_it_promises(tmp_path, capsys):
    status, out, err = run_script(T.main, ["--quick", "--out", str(tmp_path)], capsys)
    assert status == 0, err
    for name in ("eval.json", "eval_predictions.npz", "training_curves.png", "auroc.png"):
        assert (tmp_path / name).is_file(), name
    assert "examples/s" in out and "s left" in out and "favorite_score" in out
    assert "recent popularity puts the serving window first" in out
    wrote = next(line for line in out.splitlines() if line.startswith("wrote"))
    assert "state/" in wrote and (tmp_path / "state" / "ranker.npz").is_file()

    report = json.loads((tmp_path / "eval.json").read_text())
    predictions = read_npz(tmp_path / "eval_predictions.npz")
    # Every figure can be recomputed from the predictions file.
    for i, action in enumerate(ACTIONS):
        figures = report["ranking"]["actions"][action]
        labels = predictions["ranking_labels"][..., i].ravel()
        model = predictions["ranking_model"][..., i].ravel()
        if figures["auc"] is not None:
            assert figures["auc"] == pytest.approx(metrics.auroc(labels, model), abs=1e-6)
            average_precision = metrics.average_precision(labels, model)
            assert figures["pr_auc"] == pytest.approx(average_precision, abs=1e-6)
        assert figures["positives"] == labels.sum()
        assert figures["ce"] == pytest.approx(metrics.cross_entropy(labels, model), abs=1e-6)
        bins = metrics.calibration(labels, model)
        assert figures["calibration"]["model"]["count"] == bins.count.tolist()
        np.testing.assert_allclose(
            figures["calibration"]["model"]["observed_rate"], bins.observed_rate, atol=1e-6
        )
    dwell, model = predictions["ranking_dwell"], predictions["ranking_dwell_model"]
    mae, rmse = report["ranking"]["dwell_seconds_mae"], report["ranking"]["dwell_seconds_rmse"]
    assert mae["model"] == pytest.approx(np.abs(model - dwell).mean(), rel=1e-5)
    median = predictions["ranking_dwell_oracle_median"]
    assert mae["oracle"] == pytest.approx(np.abs(median - dwell).mean(), rel=1e-5)
    mean = predictions["ranking_dwell_oracle"]
    assert rmse["oracle"] == pytest.approx(np.sqrt(np.square(mean - dwell).mean()), rel=1e-5)
    for name in ("model", "oracle", "popularity"):
        ranked = predictions[f"retrieval_{name}_top100"]
        recall = metrics.recall_at_k(ranked, predictions["retrieval_targets"], 100)
        assert report["retrieval"]["recall@100"][name] == pytest.approx(recall, abs=1e-6)
    assert set(report["examples"]) == {"train", "eval"}
    assert report["training"]["ranker"] == dataclasses.asdict(T.TrainConfig.quick())

    # The artifacts serve a feed through the pipeline; the demo checkpoint holds the same models.
    artifacts = load_artifacts(tmp_path / "artifacts", fprop_dtype=jnp.float32)
    feed = Pipeline(artifacts).feed(artifacts.sequence, top_k_retrieval=20, top_k_display=5)
    assert len(feed.items) == 5 and feed.items[0].topic in artifacts.corpus.topics
    world_config, models = T.load_demo_checkpoint(tmp_path / "demo_checkpoint.npz")
    assert world_config == T.world_lib.WorldConfig.tiny()
    # Both serve the ranker with the dwell scale it was trained with.
    trained = T.model_configs(world_config, QUICK)[1].continuous_action_config
    assert trained.norm_config.norm_scale != 30.0  # not the default, which loading falls back on
    for ranker in (artifacts.ranker, models["ranker"]):
        assert ranker.config.continuous_action_config == trained
    for kind in T.MODELS:
        model = getattr(artifacts, kind)
        saved = hk.data_structures.to_mutable_dict(model.params)
        for module, leaves in saved.items():
            for name, value in leaves.items():
                np.testing.assert_allclose(
                    models[kind].params[module][name], value, rtol=1e-3, atol=1e-3
                )
        # Table rows that the world's ids reach are kept; the rest, never read, are zeros.
        for entity, n in T.id_counts(world_config).items():
            table = models[kind].tables[TABLE_NAMES[entity]]
            trained = np.asarray(model.tables[TABLE_NAMES[entity]])
            used = getattr(model.hashing, entity).rows_of_ids(n)
            np.testing.assert_allclose(table[used], trained[used], rtol=1e-3, atol=1e-3)
            assert not np.delete(table, used, axis=0).any()
    with zipfile.ZipFile(tmp_path / "demo_checkpoint.npz") as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    # A parameter beyond float16's range is kept as it is, not stored as infinity.
    params = hk.data_structures.to_mutable_dict(models["ranker"].params)
    params["phoenix_model"]["unembeddings"] = params["phoenix_model"]["unembeddings"] + 1e5
    big = {**models, "ranker": dataclasses.replace(models["ranker"], params=params)}
    T.save_demo_checkpoint(tmp_path / "big.npz", world_config, big)
    _, again = T.load_demo_checkpoint(tmp_path / "big.npz")
    # A world of other histories than its models', or a model config that is not one: refused.
    # A world its models were not trained on (histories or posts of another number): saving
    # refuses it, and so does loading a file whose world config was edited.
    good = read_npz(tmp_path / "big.npz")

    def with_world(**changes):
        meta = json.loads(str(good["meta"]))
        meta["world"].update(changes)
        write_npz({**good, "meta": np.array(json.dumps(meta))}, tmp_path / "big.npz")
        return dataclasses.replace(world_config, **changes)

    for changes, message in (
        ({"history_len": 9}, r"its ranker's history_seq_len \(8\) does not fit"),
        ({"num_posts": 410}, "its world config does not fit its models: a world of 410 posts "
         "trains item_embeddings of 3,281 rows; the ranker's has 3,201"),
    ):  # fmt: skip
        edited = with_world(**changes)
        with pytest.raises(ValueError, match="big.npz: " + message):
            T.load_demo_checkpoint(tmp_path / "big.npz")
        with pytest.raises(ValueError, match="^" + message.removeprefix("its ")):
            T.save_demo_checkpoint(tmp_path / "other.npz", edited, models)
    assert not (tmp_path / "other.npz").exists()
    T.save_demo_checkpoint(tmp_path / "big.npz", world_config, models)
    arrays = read_npz(tmp_path / "big.npz")
    cut = {**arrays, "ranker/tables/user_embeddings": arrays["ranker/tables/user_embeddings"][1:]}
    write_npz(cut, tmp_path / "big.npz")
    cut_message = r"its ranker's user_embeddings is \[160, 128\], its hashing asks for \[161, 128\]"
    with pytest.raises(ValueError, match=cut_message):
        T.load_demo_checkpoint(tmp_path / "big.npz")
    for edited, message in (  # a KeyError from inside; integers cast to floats without a word
        ({k: v for k, v in cut.items() if k != "ranker/tables/item_embeddings"},
         "the ranker's tables lack item_embeddings"),
        ({**cut, "retrieval/tables/topic_embeddings": np.ones((2, 2), np.float32)},
         "the retrieval's tables hold topic_embeddings, which no model reads"),
        ({**cut, "ranker/tables/user_embeddings": np.ones((2, 2), np.int32)},
         "ranker/tables/user_embeddings is int32, expected floats"),
    ):  # fmt: skip
        write_npz(edited, tmp_path / "big.npz")
        with pytest.raises(ValueError, match="big.npz: " + message):
            T.load_demo_checkpoint(tmp_path / "big.npz")
    arrays = read_npz(tmp_path / "big.npz")
    meta = json.loads(str(arrays["meta"]))
    meta["configs"]["ranker"] = {}
    write_npz({**arrays, "meta": np.array(json.dumps(meta))}, tmp_path / "big.npz")
    with pytest.raises(ValueError, match=r"big.npz: its ranker config: lacks emb_size, "):
        T.load_demo_checkpoint(tmp_path / "big.npz")
    (tmp_path / "big.npz").unlink()  # not a run's output: the run below would refuse the folder
    np.testing.assert_array_equal(
        again["ranker"].params["phoenix_model"]["unembeddings"],
        params["phoenix_model"]["unembeddings"],
    )

    # A later run that does not rewrite them says which outputs are older than its models.
    argv = [*RANKER_ONLY, "--out", str(tmp_path), "--resume", "--steps", "31"]
    status, out, err = run_script(T.main, argv, capsys)
    assert status == 0, err
    assert out.splitlines()[-1] == (
        "left as an earlier run wrote them, not rewritten by this one: artifacts, auroc.png, "
        "calibration.png, demo_checkpoint.npz, training_curves.png"
    )


def test_a_resume_that_differs_by_quick_alone_says_so(tmp_path, capsys, monkeypatch):
    quick, full = WorldConfig.tiny(), WorldConfig()
    tiny, default = (json.loads(json.dumps(c.to_json())) for c in (quick, full))  # as saved
    assert T._quick_hint(tiny, full.to_json()) == "it was started with --quick; "
    assert T._quick_hint(default, quick.to_json()) == "it was started without --quick; "
    assert T._quick_hint(tiny, WorldConfig.tiny(seed=1).to_json()) == ""
    fifty = dataclasses.replace(quick, num_users=50).to_json()  # --quick --users 50
    assert T._quick_hint(fifty, quick.to_json()) == T._quick_hint(fifty, full.to_json()) == ""

    make = T.Path.mkdir

    def cannot(path, *args, **kwargs):  # below tmp_path (the suite's compilation cache is not)
        if tmp_path in path.parents:
            raise PermissionError(13, "Permission denied")
        return make(path, *args, **kwargs)

    monkeypatch.setattr(T.Path, "mkdir", cannot)
    status, _, err = run_script(T.main, ["--quick", "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "cannot make the folder (Permission denied)" in err, err


def test_the_other_model_of_a_folder_is_checked_before_training_and_reported_as_trained(
    tmp_path, capsys
):
    run = tmp_path / "run"
    first = ["--quick", "--model", "retrieval", "--steps", "2", "--eval-every", "2"]
    first += ["--no-export", "--out", str(run)]
    assert run_script(T.main, first, capsys)[0] == 0
    # Another world: refused before the ranker trains, without the --resume it does not use.
    other_world = [*RANKER_ONLY, "--users", "50", "--out", str(run)]
    status, out, err = run_script(T.main, other_world, capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert "retrieval.npz: the state of another run (its world.num_users is 40" in err
    assert err.endswith("train with the world it was trained on, or choose another --out\n")
    assert "ranker: steps" not in out and not (run / "state" / "ranker.npz").exists()
    # Other training settings for the ranker: the retrieval model is read as it was trained.
    ranker = [*RANKER_ONLY, "--steps", "3", "--learning-rate", "0.01", "--out", str(run)]
    assert run_script(T.main, ranker, capsys)[0] == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["steps"] == {"ranker": 3, "retrieval": 2}
    assert report["training"]["retrieval"]["steps"] == 2
    assert report["training"]["retrieval"]["eval_every"] == 2
    assert report["training"]["retrieval"]["learning_rate"] == QUICK.learning_rate
    assert report["training"]["ranker"]["learning_rate"] == 0.01
    # A state without the log saved beside it is refused.
    (run / "state" / "retrieval_log.json").unlink()
    status, _, err = run_script(T.main, [*ranker, "--resume", "--steps", "4"], capsys)
    assert status == 2 and "retrieval_log.json: no such file (the training log saved" in err


def test_training_that_would_not_fit_in_memory_is_refused_before_it_starts(world, monkeypatch):
    # The tiny world: 40 users, 400 posts, 24 authors, 27 held-out queries; tables of 4, 8 and
    # 4 rows per entity and a padding row each, D 128 (ranker) or 64 (retrieval), six float32
    # copies.
    assert (world.num_users, world.num_posts, world.num_authors) == (40, 400, 24)
    assert len(world.retrieval_eval) == 27
    rows = 161 + 3201 + 97
    for kind, d, more in (("ranker", 128, 0), ("retrieval", 64, 5 * 27 * 400)):
        job = T.make_job(kind, world, QUICK)
        assert T.training_bytes(kind, job.hashing, job.config, world) == 12 * 4 * d * rows + more
    monkeypatch.setattr(runners, "ALWAYS_FITS", 0)
    monkeypatch.setattr(runners, "available_memory", lambda: 2**20)
    with pytest.raises(ValueError, match=r"training the ranker on this world would need about"):
        T.make_job("ranker", world, QUICK)


def test_a_model_only_read_back_is_not_held_to_this_runs_training_settings(world):
    wide = dataclasses.replace(QUICK, batch_size=300)  # more than the retrieval examples
    with pytest.raises(ValueError, match=r"batch_size \(300\) exceeds the"):
        T.make_job("retrieval", world, wide)
    assert T.make_job("retrieval", world, wide, to_train=False).kind == "retrieval"


def test_recall_goals_are_not_met_by_zeros():
    report = {"retrieval": {"recall@100": {"model": 0.0, "oracle": 0.0, "popularity": 0.0}}}
    assert [met for _, met in T.goal_checks(report)] == [False, False, False]


def test_optimiser_flags_reach_both_models_training_configs():
    flags = ["--out", "x", "--learning-rate", "1e-3", "--table-learning-rate", "0.5"]
    _, trains = T.run_configs(T.parse_args([*flags, "--table-optimizer", "rowwise_adagrad"]))
    for train in trains.values():
        assert (train.learning_rate, train.table_learning_rate) == (1e-3, 0.5)
        assert train.table_optimizer == "rowwise_adagrad"
    _, defaults = T.run_configs(T.parse_args(["--out", "x"]))
    assert defaults["ranker"] == T.TrainConfig.for_model("ranker")


def test_a_state_is_held_to_the_settings_its_model_reads_alone(world):
    def meta(kind, **changes):
        return T.make_job(kind, world, dataclasses.replace(QUICK, **changes)).meta

    assert meta("ranker", negatives=7) == meta("ranker")
    assert meta("retrieval", dwell_loss="mae") == meta("retrieval")
    assert meta("retrieval", negatives=7)["train"]["negatives"] == 7
    assert meta("ranker", dwell_loss="mae")["train"]["dwell_loss"] == "mae"
    flags = ["--out", "x", "--negatives", "7"]  # retrieval's alone, the ranker's left as it is
    trains = T.run_configs(T.parse_args(flags))[1]
    assert trains["retrieval"].negatives == 7
    assert trains["ranker"].negatives == T.TrainConfig().negatives


def test_bad_input_stops_with_one_line(world, tmp_path, capsys, monkeypatch):
    def refused(argv) -> str:
        status, _, err = run_script(T.main, argv, capsys)
        assert status == 2 and err.count("\n") == 1, err
        return err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        refused([*RANKER_ONLY, "--out", str(empty), "--resume"])
        .rstrip()
        .endswith("state: no saved ranker: nothing to resume (run without --resume)")
    )
    empty.rmdir()  # the folder's own listing is asserted below
    assert (
        refused([*RANKER_ONLY, "--out", str(tmp_path / "none"), "--resume"])
        .rstrip()
        .endswith("none: no such folder: nothing to resume (run without --resume)")
    )
    run = tmp_path / "run"
    assert run_script(T.main, [*RANKER_ONLY, "--out", str(run), "--steps", "2"], capsys)[0] == 0
    assert "already holds a trained ranker" in refused([*RANKER_ONLY, "--out", str(run)])
    foreign = refused([*RANKER_ONLY, "--out", str(run), "--resume", "--seed", "1"])
    assert "the state of another run (its world.seed is 0, this run's is 1)" in foreign
    past = refused([*RANKER_ONLY, "--out", str(run), "--resume", "--steps", "1"])
    assert "ranker: the saved run is at step 2, past --steps 1" in past
    with monkeypatch.context() as patch:  # tables of another size: other hashes
        patch.setitem(T.TABLE_ROWS_PER_ENTITY, "item", 3)
        rehashed = refused([*RANKER_ONLY, "--out", str(run), "--resume", "--steps", "3"])
        assert "the state of another run (its hashing." in rehashed
    (run / "state" / "ranker_log.json").write_text("{")
    assert "ranker_log.json: not a readable training log" in refused(
        [*RANKER_ONLY, "--out", str(run), "--resume", "--steps", "3"]
    )
    (run / "state" / "ranker_log.json").write_text("[1, 2]")
    assert "ranker_log.json: entry 0 is not step 1's figures (an object of numbers" in refused(
        [*RANKER_ONLY, "--out", str(run), "--resume", "--steps", "3"]
    )
    with pytest.raises(ValueError, match=r"ranker\.npz: not a demo checkpoint \(its meta has no"):
        T.load_demo_checkpoint(run / "state" / "ranker.npz")
    state = read_npz(run / "state" / "ranker.npz")
    for meta in ("[1, 2]", "{"):  # damaged: not an object, not JSON
        write_npz({**state, "meta": np.array(meta)}, run / "state" / "ranker.npz")
        message = refused([*RANKER_ONLY, "--out", str(run), "--resume", "--steps", "3"])
        assert "ranker.npz: not a training state of this project (its meta is not a JSON" in message
    write_npz({**state, ".step": np.array(-5, np.int32)}, run / "state" / "ranker.npz")
    assert "ranker.npz: step is -5; a saved state's step is >= 0" in refused(
        [*RANKER_ONLY, "--out", str(run), "--resume", "--steps", "3"]
    )
    (run / "state" / "ranker.npz").write_bytes(b"not a zip file")
    assert "ranker.npz: not a readable .npz file (File is not a zip file); remove it" in refused(
        [*RANKER_ONLY, "--out", str(run), "--resume"]
    )
    assert "--steps: expected an integer >= 1" in refused(
        [*RANKER_ONLY, "--out", "x", "--steps", "0"]
    )
    assert "--out: expected a file or folder name, got an empty one" in refused(
        [*RANKER_ONLY, "--out", ""]
    )
    assert "--learning-rate: expected a finite number > 0, got nan" in refused(
        [*RANKER_ONLY, "--out", "x", "--learning-rate", "nan"]
    )
    assert "--negatives: expected an integer >= 0, got -1" in refused(
        [*RANKER_ONLY, "--out", "x", "--negatives", "-1"]
    )
    assert "--negatives is retrieval's setting; --model ranker trains the ranker alone" in refused(
        [*RANKER_ONLY, "--out", "x", "--negatives", "32"]
    )
    assert "--table-optimizer: invalid choice: 'sgd'" in refused(
        [*RANKER_ONLY, "--out", "x", "--table-optimizer", "sgd"]
    )
    assert "--seed: expected an integer <= 1073741824" in refused(
        [*RANKER_ONLY, "--out", "x", "--seed", str(2**63)]
    )
    (tmp_path / "notes.txt").write_text("mine")
    assert "holds files that are not a training run's (notes.txt, run)" in refused(
        [*RANKER_ONLY, "--out", str(tmp_path)]
    )
    (run / "artifacts").mkdir()  # export would refuse it only after the training, at the end
    (run / "artifacts" / "notes.txt").write_text("mine")
    assert "run: artifacts/ holds what an artifacts folder does not (notes.txt)" in refused(
        [*RANKER_ONLY, "--out", str(run), "--resume", "--steps", "3"]
    )
    notes = str(tmp_path / "notes.txt")
    with monkeypatch.context() as patch:  # a read-only place (root may write anywhere else)
        read_only(patch, tmp_path)
        assert "cannot write in" in refused([*RANKER_ONLY, "--out", str(tmp_path / "new")])
        assert "cannot write there" in refused([*RANKER_ONLY, "--out", str(run), "--resume"])
    assert "is a file, not a folder" in refused([*RANKER_ONLY, "--out", notes])
    assert "notes.txt is a file, not a folder" in refused([*RANKER_ONLY, "--out", notes + "/run"])
    # Both models are checked against the world before the first one trains.
    small = tmp_path / "small"
    assert "the world has 104 posts; retrieval is measured by recall@100 among the posts " + (
        "outside a query's history of 8, and needs at least 108"
    ) in refused(["--quick", "--posts", "104", "--out", str(small)])
    assert not small.exists()
    assert "cannot build the world --posts 20: a request would have fewer than 12 posts" in (
        refused(["--quick", "--posts", "20", "--out", str(small)])
    )
    huge = "cannot build the world --users 1000000000: a world of 1,000,000,000 users would need"
    assert huge in refused(["--quick", "--users", "1000000000", "--out", str(small)])
    assert "decay_steps (5) must exceed warmup_steps (5): the schedule warms up" in refused(
        ["--quick", "--decay-steps", "5", "--out", str(small)]
    )
    with monkeypatch.context() as patch:  # three devices, before either model trains
        three = types.SimpleNamespace(size=3, devices=np.arange(3))
        patch.setattr(T, "data_mesh", lambda: three)
        assert "batch_size (32) does not split over the 3 devices; use a multiple of 3" in (
            refused(["--quick", "--out", str(small)])
        )
    assert not small.exists()

    poisoned = dataclasses.replace(world)
    poisoned.ranking_train = dataclasses.replace(
        world.ranking_train,
        history=dataclasses.replace(
            world.ranking_train.history, dwell=world.ranking_train.history.dwell.copy()
        ),
    )
    poisoned.ranking_train.history.dwell[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"history_continuous_actions holds nan at \[3, 2, 1\]"):
        T.make_job("ranker", poisoned, QUICK)
    _, ranker_config = T.model_configs(world.config, QUICK)
    short = dataclasses.replace(ranker_config, history_seq_len=4)
    with pytest.raises(ValueError, match=r"history_seq_len \(4\) does not fit the world's"):
        T.make_job("ranker", world, QUICK, config=short)
    with pytest.raises(ValueError, match=r"batch_size \(100000\) exceeds the"):
        T.make_job("ranker", world, dataclasses.replace(QUICK, batch_size=100_000))
    with pytest.raises(ValueError, match="table_optimizer must be one of"):
        T.make_job("ranker", world, dataclasses.replace(QUICK, table_optimizer="sgd"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("weight_decay", math.nan, "weight_decay must be a finite number in float32's range, got"),
        (
            "table_scale",
            1e300,
            r"table_scale must be a finite number in float32's range, got 1e\+300",
        ),
        ("weight_decay", -1.0, "weight_decay must be >= 0, got -1.0"),
        ("final_learning_rate_fraction", 5.0, r"final_learning_rate_fraction must be in \[0, 1\]"),
        ("dwell_norm_seconds", 0.0, "dwell_norm_seconds must be > 0, got 0.0"),
        ("dwell_loss_weight", "1", "dwell_loss_weight must be a finite number .*, got '1'"),
        ("dwell_loss", "foo", r"dwell_loss must be one of \('mae', 'mse'"),
        ("negatives", 10.5, "negatives must be an integer >= 0, got 10.5"),
        ("batch_size", True, "batch_size must be an integer >= 1, got True"),
        ("warmup_steps", -1, "warmup_steps must be an integer >= 0, got -1"),
    ],
)
def test_training_settings_are_refused_by_name_before_any_work(world, field, value, message):
    """Each of these trained once without complaint: NaN parameters after the first update (a
    NaN weight decay), every dwell target clipped to one value (a negative scale), or an error
    from deep inside the step."""
    with pytest.raises(ValueError, match=message):
        T.make_job("ranker", world, dataclasses.replace(QUICK, **{field: value}))


def test_fit_checks_a_job_made_not_to_train(world, tmp_path):
    """A job only read back (to_train=False) is not checked when made; training it ended in a
    KeyError (an unknown table optimiser) or an error from optax (warmup beyond decay)."""
    for field, value, message in (
        ("table_optimizer", "bogus", "table_optimizer must be one of"),
        ("warmup_steps", 100, r"decay_steps \(30\) must exceed warmup_steps \(100\)"),
    ):
        train = dataclasses.replace(QUICK, **{field: value})
        job = T.make_job("ranker", world, train, to_train=False)
        with pytest.raises(ValueError, match=message):
            T.fit(job, tmp_path / "state", quiet=True)
    job = T.make_job("ranker", world, QUICK)
    with pytest.raises(TypeError, match="quiet must be True or False, got 'no'"):
        T.fit(job, tmp_path / "state", quiet="no")
    with pytest.raises(TypeError, match="to_train must be True or False, got 'no'"):
        T.make_job("ranker", world, QUICK, to_train="no")
    assert not (tmp_path / "state").exists()


def test_numpy_numbers_in_configs_are_kept_as_python_numbers():
    """Configs are written as JSON (with a run's state and in eval.json), which takes no numpy
    value: a batch size of np.int64(8) failed at the first save, after training, and so did
    media probabilities given as an array."""
    train = dataclasses.replace(QUICK, batch_size=np.int64(8), learning_rate=np.float32(0.5))
    assert type(train.batch_size) is int and train.learning_rate == 0.5
    world = dataclasses.replace(
        WorldConfig.tiny(), num_users=np.int64(50), media_probabilities=(np.float64(0.5), 0.3, 0.2)
    )
    assert type(world.num_users) is int and type(world.media_probabilities[0]) is float
    json.dumps([dataclasses.asdict(train), world.to_json()])
    # An array or a list where a tuple is declared: a tuple of Python numbers, as from_json gives.
    for probabilities in (np.array([0.5, 0.3, 0.2]), [0.5, 0.3, 0.2]):
        world = dataclasses.replace(WorldConfig.tiny(), media_probabilities=probabilities)
        assert world == WorldConfig.from_json(json.loads(json.dumps(world.to_json())))
        assert type(world.media_probabilities[0]) is float


def test_evaluation_refuses_what_it_cannot_evaluate(world):
    job = T.make_job("retrieval", world, QUICK)
    params = T.initial_state("retrieval", job.config, job.hashing, QUICK).params
    with pytest.raises(ValueError, match=r"k must be an integer in \[100, 392\]"):
        T.evaluate_retrieval(job, params, k=10)  # recall@100 is reported
    with pytest.raises(TypeError, match="job must be a ranker Job .*, got a retrieval Job"):
        T.evaluate_ranker(job, params)
    state = T.initial_state("retrieval", job.config, job.hashing, QUICK)
    with pytest.raises(TypeError, match=r"params must be .*\(TrainState\.params\), got TrainState"):
        T.evaluate_retrieval(job, state)
    with pytest.raises(
        TypeError, match=r"got a dict of \['phoenix_retrieval_model.*'\] and \d+ more$"
    ):
        T.evaluate_retrieval(job, params["model"])  # (the model's tree: its names are many)
    with pytest.raises(TypeError, match="world must be a World .*, got WorldConfig"):
        T.make_job("ranker", WorldConfig.tiny(), QUICK)
    # Parameters of the other model, or tables of another hashing (another world's sizes): the
    # retrieval evaluation returned a report from them, reading NaN rows beyond the tables.
    ranker = T.make_job("ranker", world, QUICK)
    other = T.initial_state("ranker", ranker.config, ranker.hashing, QUICK).params
    with pytest.raises(
        ValueError, match=r"is missing \(they are parameters of phoenix_model, another model\)"
    ):
        T.evaluate_retrieval(job, {"model": other["model"], "tables": params["tables"]})
    smaller = {k: v[:-1] if k == "item_embeddings" else v for k, v in params["tables"].items()}
    rows, d = job.hashing.item.vocab_size, job.config.emb_size
    with pytest.raises(
        ValueError,
        match=rf"tables/item_embeddings is \[{rows - 1}, {d}\], its hashing asks for \[{rows}, ",
    ):
        T.evaluate_retrieval(job, {"model": params["model"], "tables": smaller})
    with pytest.raises(ValueError, match="tables/item_embeddings is"):
        T.model_artifacts(job, {"model": params["model"], "tables": smaller})
    as_lists = {k: np.asarray(v).tolist() for k, v in params["tables"].items()}
    with pytest.raises(TypeError, match=r"params\['tables'\]\['user_embeddings'\] must be a flo"):
        T.evaluate_retrieval(job, {"model": params["model"], "tables": as_lists})


def test_outputs_gone_to_infinity_are_called_a_divergence(world):
    """Parameters finite but far too large (a learning rate of 1e30): the evaluation failed in
    the metrics, on scores that must be finite."""
    job = T.make_job("ranker", world, QUICK)
    params = T.initial_state("ranker", job.config, job.hashing, QUICK).params
    huge = jax.tree.map(lambda x: x * 1e30, params)
    with pytest.raises(ValueError, match="the ranker's outputs are not finite .* have diverged"):
        T.evaluate_ranker(job, huge)
    job = T.make_job("retrieval", world, QUICK)
    params = T.initial_state("retrieval", job.config, job.hashing, QUICK).params
    huge = jax.tree.map(lambda x: x * 1e30, params)
    with pytest.raises(
        ValueError, match="the retrieval model's outputs are not finite .* diverged"
    ):
        T.evaluate_retrieval(job, huge)


def test_a_run_that_diverges_stops_at_its_evaluation_saying_so(world, tmp_path):
    """A learning rate of 1e30: the run stopped in the metrics, on scores that must be finite."""
    train = dataclasses.replace(QUICK, learning_rate=1e30, steps=8, decay_steps=8, eval_every=2)
    job = T.make_job("ranker", world, train)
    with pytest.raises(T.Diverged) as error:
        T.fit(job, tmp_path, quiet=True)
    found = re.fullmatch(
        r"at step (\d+), the ranker's outputs are not finite \(NaN or infinite\): its parameters "
        r"have diverged; a lower learning rate may help; stopping, (.*)",
        str(error.value),
    )
    assert found, error.value
    step, saved = int(found[1]), found[2]
    if step == 2:
        assert saved == "before any state was saved"
    else:
        assert saved == f"the state saved at step {step - 2} is kept"
        _, log = T.load_progress(
            tmp_path, job, T.initial_state("ranker", job.config, job.hashing, train)
        )
        assert log[-1]["step"] == step - 2


@pytest.mark.parametrize("seed", [-1, 2**70, 1.5])
def test_a_training_seed_out_of_range_is_refused_by_name(world, seed):
    """Each failed deep inside numpy or JAX, at make_job or at the first step."""
    with pytest.raises(
        ValueError, match=rf"seed must be an integer in \[0, 1073741824\], got {seed}$"
    ):
        T.make_job("ranker", world, dataclasses.replace(QUICK, seed=seed))


def test_fit_refuses_what_is_not_a_job_or_a_folder_before_training(world, tmp_path):
    with pytest.raises(TypeError, match="job must be a Job .make_job., got TrainConfig"):
        T.fit(QUICK, tmp_path)
    job = T.make_job("ranker", world, QUICK)
    (tmp_path / "a_file").write_text("")
    for where, problem in ((tmp_path / "a_file", "a file, not a folder"),
                           (tmp_path / "a_file" / "sub", "is a file, not a folder")):  # fmt: skip
        with pytest.raises(ValueError, match=f"state_dir {where}: .*{problem}"):
            T.fit(job, where, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_load_demo_refuses_an_unknown_user_before_building_the_world(monkeypatch):
    def build_world(config):
        raise AssertionError("the world was built")

    monkeypatch.setattr(T.world_lib, "build_world", build_world)
    with pytest.raises(ValueError, match=r"user 1501 is not in the world \(users 1..1500\)"):
        T.load_demo(T.DEMO_CHECKPOINT, 1501)
    for user in ("3", 2.0, True):  # a string failed deep inside; 2.0 and True showed users 2, 1
        with pytest.raises(TypeError, match=f"user id must be an integer, got {user!r}"):
            T.load_demo(T.DEMO_CHECKPOINT, user)
    with pytest.raises(ValueError, match=r"kind must be one of \('ranker', 'retrieval'\), got 'x'"):
        T.open_demo(T.DEMO_CHECKPOINT, None, "x")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_users": -3}, r"its world config: num_users must be an integer >= 1, got -3$"),
        ({"actions": [1]}, r"its world config: actions must be an object by action name, got"),
        ({"num_users": 10**9}, "its world config does not fit its models: a world of "
         "1,000,000,000 users trains user_embeddings of 4,000,000,001 rows; the ranker's has"),
        ({"num_candidates": 10**6, "serving_pool_size": 10**6},
         r"rebuilding its world would need about \d+\.\d GiB of memory"),
    ],
)  # fmt: skip
def test_load_demo_refuses_a_world_config_it_cannot_build(tmp_path, monkeypatch, changes, message):
    def build_world(config):
        raise AssertionError("the world was built")

    arrays = read_npz(T.DEMO_CHECKPOINT)
    meta = json.loads(str(arrays["meta"]))
    meta["world"].update(changes)
    write_npz({**arrays, "meta": np.array(json.dumps(meta))}, tmp_path / "demo.npz")
    monkeypatch.setattr(T.world_lib, "build_world", build_world)
    with pytest.raises(ValueError, match=r"demo\.npz: " + message):
        T.load_demo(tmp_path / "demo.npz")


def test_a_missing_demo_checkpoint_is_named_with_how_to_make_one(tmp_path):
    """The library's message; the scripts add their own way out (`--random-weights`)."""
    with pytest.raises(FileNotFoundError) as raised:
        T.load_demo(tmp_path / "none.npz")
    assert str(raised.value) == (
        f"{tmp_path / 'none.npz'}: no such file; make one with `uv run train.py --out "
        "runs/default` (it writes runs/default/demo_checkpoint.npz)"
    )


def test_demo_request_picks_a_held_out_request_or_names_the_user(world):
    user, when = T.demo_request(world)
    rows = world.ranking_eval.user_ids == user
    assert when == world.ranking_eval.request_times[rows].min()
    assert T.demo_request(world, user) == (user, when)
    users = rf"\(users 1..{world.num_users}\)"
    with pytest.raises(ValueError, match=rf"user 0 is not in the world {users}"):
        T.demo_request(world, 0)


def test_the_printed_table_holds_each_figure_in_its_column():
    action = {"positives": 12, "auc": 0.75, "auc_oracle": 0.8, "pr_auc": None}
    action |= {"pr_auc_oracle": 0.5, "rce": 10.0, "rce_oracle": 20.0}  # (no PR-AUC: "-")
    ranking = {
        "actions": {"favorite_score": action},
        "dwell_seconds_mae": {"model": 5.0, "oracle": 4.5},
        "dwell_seconds_rmse": {"model": 11.0, "oracle": 10.0},
    }
    recall = {"model": 0.6, "oracle": 0.8, "popularity": 0.03, "recent_popularity": 0.5}
    lines = T.report_lines({"ranking": ranking, "retrieval": {"recall@100": recall}})

    def cells(line: str) -> str:  # the line's cells, one space apart
        return " ".join(line.split())

    assert cells(lines[0]) == "action positives AUROC oracle PR-AUC oracle RCE oracle ratio"
    assert cells(lines[2]) == "favorite_score 12 0.750 0.800 - 0.500 10.0 20.0 0.50"
    worse = {**action, "rce": -126.2, "rce_oracle": -16.1}  # (a tiny world's): no "7.84"
    negative = T.report_lines({"ranking": {**ranking, "actions": {"favorite_score": worse}}})
    assert cells(negative[2]).endswith(" -126.2 -16.1 -")
    assert lines[3].startswith("dwell time: mean absolute error 5.00 s (oracle: the true median,")
    assert cells(lines[-1]) == "recall@100 0.600 0.800 0.030 0.500"
    assert T.report_lines({"retrieval": {"recall@100": recall}})[-1] == lines[-1]
    for report, got in (([], "list"), ({"ranking": "x"}, r"a dict of \['ranking'\]")):
        with pytest.raises(TypeError, match=rf"report must be eval.json's object, .*got {got}$"):
            T.report_lines(report)
    for report, hint in (
        (ranking, " \\(evaluate_ranker's report goes under 'ranking'\\)"),
        ({"recall@100": recall}, " \\(evaluate_retrieval's report goes under 'retrieval'\\)"),
        ({"ranker": ranking}, ""),
    ):
        with pytest.raises(
            ValueError, match=f"report holds neither 'ranking' nor 'retrieval'{hint}$"
        ):
            T.report_lines(report)
    with pytest.raises(ValueError, match="report: 'ranking' holds no 'actions'"):
        T.goal_checks({"ranking": {}})


def test_export_takes_a_new_folder_or_an_artifacts_folder_and_models_of_its_world(
    world, tmp_path, monkeypatch
):
    """Export replaces its folder whole: given a file, or a folder of other things (a home
    folder, say), it replaced it; given a world the models were not trained on, it wrote a
    folder whose corpus they could not serve."""
    models = {}
    for kind in T.MODELS:
        job = T.make_job(kind, world, QUICK)
        models[kind] = T.model_artifacts(
            job, T.initial_state(kind, job.config, job.hashing, QUICK).params
        )
    out = str(tmp_path / "artifacts")  # a string will do
    T.export_artifacts(out, world, models["retrieval"], models["ranker"])
    T.export_artifacts(out, world, models["retrieval"], models["ranker"])  # replaced whole
    assert load_artifacts(out).corpus.post_ids.shape == (world.num_posts,)
    (tmp_path / "notes.txt").write_text("mine")
    for path, problem in (
        (tmp_path, r"holds what an artifacts folder does not \(artifacts, notes"),
        (tmp_path / "notes.txt", "a file, not a folder"),
    ):
        with pytest.raises(ValueError, match=rf"{problem}.*; export to a new folder"):
            T.export_artifacts(path, world, models["retrieval"], models["ranker"])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(
        TypeError,
        match="the retrieval must be a retrieval model's ModelArtifacts, got the ranker's",
    ):
        T.export_artifacts(out, world, models["ranker"], models["retrieval"])
    with pytest.raises(TypeError, match="world must be a World"):
        T.export_artifacts(out, world.config, models["retrieval"], models["ranker"])
    bigger = build_world(dataclasses.replace(world.config, num_users=world.num_users + 1))
    with pytest.raises(
        ValueError,
        match="the world config does not fit its models: a world of "
        "41 users trains user_embeddings of 165 rows; the retrieval's has 161",
    ):
        T.export_artifacts(out, bigger, models["retrieval"], models["ranker"])
    with pytest.raises(TypeError, match="world_config must be a WorldConfig, got World"):
        T.save_demo_checkpoint(tmp_path / "demo.npz", world, models)
    with pytest.raises(TypeError, match=r"models must be .*, got a dict of \['ranker'\]"):
        T.save_demo_checkpoint(tmp_path / "demo.npz", world.config, {"ranker": models["ranker"]})
    # A full disk: named by the folder asked for, not by the one written first; the old kept.
    with monkeypatch.context() as patch:
        patch.setattr(
            np.lib.format, "write_array", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "Full"))
        )
        with pytest.raises(OSError) as caught:
            T.export_artifacts(out, world, models["retrieval"], models["ranker"])
    assert str(caught.value) == (
        f"[Errno 28] {out} not written: Full: '{Path(out) / 'retrieval' / 'model_params.npz'}'"
    )
    assert load_artifacts(out).corpus.post_ids.shape == (world.num_posts,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "notes.txt"]


def test_a_plot_stopped_while_written_leaves_no_file(tmp_path, monkeypatch):
    """matplotlib removes a half-written picture on an error, not on a Ctrl-C or SIGTERM."""
    import matplotlib.figure

    def stopped(fig, path, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", stopped)
    with pytest.raises(KeyboardInterrupt):
        T.plot_curves({"ranker": [{"step": 1, "loss": 0.5}]}, tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []


def test_training_helpers_refuse_arguments_of_the_wrong_kind(world, tmp_path):
    retrieval_config = T.model_configs(world.config, QUICK)[0]
    with pytest.raises(
        TypeError,
        match="config must be a PhoenixModelConfig for the ranker, got PhoenixRetrievalModelConfig",
    ):
        T.make_job("ranker", world, QUICK, config=retrieval_config)
    with pytest.raises(ValueError, match="kind: 'bogus'; expected one of ranker, retrieval"):
        T.TrainConfig.for_model("bogus")
    job = T.make_job("ranker", world, QUICK)
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh \(data_mesh\), got str"):
        T.fit(job, tmp_path / "state", mesh="cpu")
    with pytest.raises(TypeError, match="start must be .state, log. as load_progress gives"):
        T.fit(job, tmp_path / "state", start=(None, None))
    with pytest.raises(TypeError, match=r"state_dir must be a str or PathLike \(a file or"):
        T.fit(job, None)
    with pytest.raises(TypeError, match="path must be a str or PathLike .*, got NoneType"):
        T.load_demo_checkpoint(None)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        T.batch_indices(10, 0, 0, 0)
    with pytest.raises(ValueError, match=r"batch_size \(11\) exceeds the 10 examples"):
        T.batch_indices(10, 11, 0, 0)
    log = [{"step": 1, "loss": 0.5}]
    with pytest.raises(ValueError, match="a picture's file name, with its format's suffix"):
        T.plot_curves({"ranker": log}, tmp_path)  # a folder: matplotlib wrote the folder + ".png"
    with pytest.raises(TypeError, match="path must be a str or PathLike .*, got int"):
        T.plot_curves({"ranker": log}, 3)
    with pytest.raises(TypeError, match="logs must be training logs by model"):
        T.plot_curves({"ranker": [{"step": 1}]}, tmp_path / "curves.png")
    with pytest.raises(TypeError, match="actions must be eval.json's ranking actions, got"):
        T.plot_auroc({"favorite_score": {}}, tmp_path / "auroc.png")
    with pytest.raises(TypeError, match=r"predictions must be evaluate_ranker's predictions"):
        T.plot_calibration({}, tmp_path / "calibration.png")
    T.plot_curves({"ranker": log}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
