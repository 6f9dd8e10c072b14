"""Properties of the synthetic world: determinism, causal histories, the time split, the engagement
model's directions, calibrated sampling, and the retrieval oracle's exclusions."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tracemalloc
import warnings

import numpy as np
import pytest

import world as W
from recsys_model import ACTIONS

FAVORITE = ACTIONS.index("favorite_score")
NEGATIVE = [ACTIONS.index(name) for name in W.NEGATIVE_ACTIONS]
POSITIVE = [ACTIONS.index(name) for name in W.POSITIVE_ACTIONS]


def _arrays(obj, prefix=""):
    """Every numpy array of a world or of examples, by a dotted name."""
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, np.ndarray):
            out[prefix + field.name] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, W.WorldConfig):
            out.update(_arrays(value, prefix + field.name + "."))
    return out


def _concat(first, second):
    """Two example dataclasses of the same kind, one after the other."""
    values = {}
    for field in dataclasses.fields(first):
        x, y = getattr(first, field.name), getattr(second, field.name)
        values[field.name] = (
            _concat(x, y) if dataclasses.is_dataclass(x) else np.concatenate([x, y])
        )
    return type(first)(**values)


def _all_ranking(world) -> W.RankingExamples:
    """Training and held-out requests together."""
    return _concat(world.ranking_train, world.ranking_eval)


def test_same_seed_gives_identical_arrays_and_another_seed_different_ones(world):
    again = _arrays(W.build_world(W.WorldConfig.tiny()))
    arrays = _arrays(world)
    assert arrays.keys() == again.keys()
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, again[name], err_msg=name)
    other = W.build_world(W.WorldConfig.tiny(seed=1))
    assert not np.array_equal(world.user_topic_prefs, other.user_topic_prefs)
    assert not np.array_equal(world.post_quality, other.post_quality)
    assert not np.array_equal(
        world.ranking_train.candidate_post_ids[:10], other.ranking_train.candidate_post_ids[:10]
    )


def test_histories_are_the_last_engagements_strictly_before_the_request(world):
    # Rebuild every history by brute force from the served requests themselves.
    examples = _all_ranking(world)
    S = world.config.history_len
    engaged = examples.labels[..., POSITIVE].any(axis=-1)  # [N, C]
    for n in range(len(examples)):
        user, t = examples.user_ids[n], examples.request_times[n]
        earlier = np.flatnonzero((examples.user_ids == user) & (examples.request_times < t))
        earlier = earlier[np.argsort(examples.request_times[earlier])]
        rows, slots = np.nonzero(engaged[earlier])
        rows = earlier[rows][-S:]
        slots = slots[-S:]
        h = W.take_rows(examples.history, n)
        length = len(rows)
        np.testing.assert_array_equal(h.post_ids[:length], examples.candidate_post_ids[rows, slots])
        np.testing.assert_array_equal(h.actions[:length], examples.labels[rows, slots])
        np.testing.assert_array_equal(h.dwell[:length], examples.dwell[rows, slots])
        np.testing.assert_array_equal(h.times[:length], examples.request_times[rows])
        # Left-aligned: padding only after the last engagement, zero in every field.
        for field in _arrays(h).values():
            assert not field[length:].any()


def test_retrieval_histories_are_causal_and_never_hold_the_target(world):
    for examples in (world.retrieval_train, world.retrieval_eval):
        h = examples.history
        valid = h.post_ids > 0
        assert np.all(valid[:, 1:] <= valid[:, :-1])  # left-aligned
        assert np.all(np.where(valid, h.times < examples.query_times[:, None], True))
        assert not (h.post_ids == examples.target_post_ids[:, None]).any()


def test_held_out_requests_come_after_every_training_request_of_the_user(world):
    train, held_out = world.ranking_train, world.ranking_eval
    for user in np.unique(train.user_ids):
        held = held_out.request_times[held_out.user_ids == user]
        assert len(held) == world.config.eval_requests_per_user
        assert held.min() > train.request_times[train.user_ids == user].max()
    # The held-out retrieval query is each user's first favorite among the held-out requests
    # of a post not already in the history.
    in_history = (
        held_out.candidate_post_ids[:, :, None] == held_out.history.post_ids[:, None, :]
    ).any(axis=-1)
    fresh = (held_out.labels[..., FAVORITE] == 1) & ~in_history
    for user, t in zip(
        world.retrieval_eval.user_ids, world.retrieval_eval.query_times, strict=True
    ):
        fav_times = held_out.request_times[(held_out.user_ids == user) & fresh.any(axis=1)]
        assert t == fav_times.min()


def test_media_actions_have_probability_zero_exactly_on_the_wrong_media(world):
    users = np.arange(1, world.num_users + 1)[:, None]
    posts = np.arange(1, world.num_posts + 1)[None, :]
    probs = world.true_probabilities(users, posts, world.post_created[None, :] + 3600)
    for name, kind in W.MEDIA_ONLY_ACTIONS.items():
        right = world.post_media == W.MEDIA_KINDS.index(kind)
        p = probs[..., ACTIONS.index(name)]
        assert np.all(p[:, ~right] == 0.0) and np.all(p[:, right] > 0.0), name
        examples = _all_ranking(world)
        wrong = world.post_media[examples.candidate_post_ids - 1] != W.MEDIA_KINDS.index(kind)
        assert not examples.labels[..., ACTIONS.index(name)][wrong].any(), name


def test_negative_feedback_falls_and_favorite_rises_with_affinity(world):
    # Pairs of users for the same post and impression time: only the taste differs.
    posts = np.arange(1, world.num_posts + 1, 37)
    users = np.arange(1, world.num_users + 1)
    t = world.post_created[posts - 1] + 5 * 3600
    probs = world.true_probabilities(users[:, None], posts[None, :], t[None, :])  # [U, P, A]
    affinity = world.affinity(users[:, None], posts[None, :])
    dwell = world.expected_dwell(users[:, None], posts[None, :], t[None, :])
    higher = affinity[:, None, :] > affinity[None, :, :]  # [U, U, P]: user i above user j
    assert higher.sum() > 1000
    diff = probs[:, None] - probs[None, :]  # [U, U, P, A]
    assert np.all(diff[..., FAVORITE][higher] > 0)
    assert np.all(diff[..., NEGATIVE][higher] < 0)
    assert np.all((dwell[:, None] - dwell[None, :])[higher] > 0)
    # Pairs of posts for one user at the same age with no taste for either: only quality differs.
    u = 1
    untasted = np.flatnonzero(
        (world.user_topic_prefs[u - 1, world.post_topics] == 0)
        & ~world.user_favourite_authors[u - 1, world.post_authors]
    )
    probs = world.true_probabilities(u, untasted + 1, world.post_created[untasted] + 3600)
    by_quality = np.argsort(world.post_quality[untasted])
    assert np.all(np.diff(probs[by_quality, FAVORITE]) > 0)
    assert np.all(np.diff(probs[by_quality][:, NEGATIVE], axis=0) < 0)


def test_positive_actions_decay_with_post_age_and_negative_feedback_does_not(world):
    ages_hours = np.array([0, 1, 6, 24, 48, 80])
    probs = world.true_probabilities(3, 10, world.post_created[9] + ages_hours * 3600)
    positive = [a for a in range(len(ACTIONS)) if a not in NEGATIVE and probs[0, a] > 0]
    assert FAVORITE in positive and len(positive) >= len(ACTIONS) - len(NEGATIVE) - 2
    assert np.all(np.diff(probs[:, positive], axis=0) < 0)  # (the dwell actions too)
    np.testing.assert_array_equal(np.diff(probs[:, NEGATIVE], axis=0), 0.0)


def test_sampled_action_rates_match_the_true_probabilities(world):
    rng = np.random.default_rng(0)
    n = 200_000
    users = rng.integers(1, world.num_users + 1, size=n)
    posts = rng.integers(1, world.num_posts + 1, size=n)
    times = world.post_created[posts - 1] + rng.integers(0, 80 * 3600, size=n)
    probs = world.true_probabilities(users, posts, times)
    labels, dwell = world.sample_engagement(users, posts, times, rng)
    with pytest.raises(TypeError, match="rng must be a numpy Generator"):
        world.sample_engagement(users, posts, times, 0)  # a seed is not a Generator
    # The dwell actions are thresholds on the very dwell that was sampled.
    c = world.config
    np.testing.assert_array_equal(
        labels[:, ACTIONS.index("dwell_time")], dwell > c.dwell_time_threshold_seconds
    )
    np.testing.assert_array_equal(
        labels[:, ACTIONS.index("dwell_score")], dwell > c.dwell_score_threshold_seconds
    )
    served = _all_ranking(world)  # the world's own requests, against what it stored
    for sample_labels, sample_probs in (
        (labels, probs),
        (
            served.labels.reshape(-1, len(ACTIONS)),
            served.probabilities.reshape(-1, len(ACTIONS)).astype(np.float64),
        ),
    ):
        m = len(sample_labels)
        stderr = np.sqrt((sample_probs * (1 - sample_probs)).sum(axis=0)) / m
        gap = np.abs(sample_labels.mean(axis=0) - sample_probs.mean(axis=0))
        assert np.all(gap <= 5 * stderr + 1e-12), dict(
            zip(ACTIONS, gap / (stderr + 1e-12), strict=True)
        )


def test_sampled_dwell_has_the_stated_median_and_mean(world):
    # One impression many times: half the draws fall below the median; their mean is the mean.
    n = 200_000
    user, post = np.full(n, 3), np.full(n, 5)
    time = np.full(n, world.post_created[4] + 2 * 3600)
    _, dwell = world.sample_engagement(user, post, time, np.random.default_rng(1))
    median, mean = world.median_dwell(3, 5, time[0]), world.expected_dwell(3, 5, time[0])
    assert median < mean  # a log-logistic dwell is skewed to the right
    assert abs(np.mean(dwell < median) - 0.5) < 5 * 0.5 / np.sqrt(n)
    assert abs(dwell.mean() - mean) < 5 * dwell.std() / np.sqrt(n)


def test_stored_probabilities_are_the_true_probabilities_of_what_was_served(world):
    examples = world.ranking_eval
    probs = world.true_probabilities(
        examples.user_ids[:, None], examples.candidate_post_ids, examples.request_times[:, None]
    )
    np.testing.assert_allclose(examples.probabilities, probs, rtol=1e-6, atol=1e-7)
    dwell = world.expected_dwell(
        examples.user_ids[:, None], examples.candidate_post_ids, examples.request_times[:, None]
    )
    np.testing.assert_allclose(examples.expected_dwell, dwell, rtol=1e-6)
    median = world.median_dwell(
        examples.user_ids[:, None], examples.candidate_post_ids, examples.request_times[:, None]
    )
    np.testing.assert_allclose(examples.median_dwell, median, rtol=1e-6)


def test_oracle_and_popularity_rankings_exclude_the_history(world):
    examples = world.retrieval_eval
    assert len(examples) > 10
    k = 50
    oracle = world.oracle_ranking(examples, k)
    popularity = world.popularity_ranking(examples, k)
    for ranking in (oracle, popularity):
        assert ranking.shape == (len(examples), k) and ranking.min() >= 1
        assert not (ranking[:, :, None] == examples.history.post_ids[:, None, :]).any()
        assert all(len(set(row)) == k for row in ranking)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got -1"):
        world.oracle_ranking(examples, -1)  # numpy's "negative dimensions" before
    with pytest.raises(TypeError, match="user_id: ids must be integers, got float64"):
        world.describe_user(1.5)  # was user 1
    with pytest.raises(ValueError, match=r"user_id must be one id, got an array of shape \(2,\)"):
        world.describe_user([1, 2])  # numpy's "only 0-dimensional arrays" before
    with pytest.raises(ValueError, match=r"ids must be in \[1, 40\], got 18446744073709551615$"):
        world.describe_user(np.uint64(2**64 - 1))  # was named as -1
    with pytest.raises(ValueError, match=r"ids must be in \[1, 40\], got 1180591620717411303424$"):
        world.describe_user(2**70)  # was "ids must be integers, got object"
    with pytest.raises(
        ValueError, match=r"post_ids: ids must be in \[1, 400\], got ids from 0 to 3"
    ):
        world.in_taste(1, [3, 0])
    for one_user in (world.user_sequence, world.describe_history, world.unseen_recent_posts):
        with pytest.raises(ValueError, match=r"^user_id must be one id, got an array of shape"):
            one_user([1, 2], int(examples.query_times[0]))  # named the times before
    assert world.in_taste(1, []).shape == (0,)  # was refused as float64 ids
    assert world.history([], []).post_ids.shape == (0, world.config.history_len)
    with pytest.raises(ValueError, match=r"user_ids and times must be \[N\] each, got \[3\] and"):
        world.history([1, 2, 3], examples.query_times[:2])
    # Each of these ended in numpy's words about broadcasting or int().
    time = int(examples.query_times[0])
    with pytest.raises(ValueError, match=r"must be \[N\] each, got \[1, 2\] and \[1, 2\]"):
        world.history([[1, 2]], [[time, time]])
    with pytest.raises(ValueError, match=r"post_ids \[2\], times \[3\]: shapes that do not"):
        world.servable([1, 2], [time] * 3)
    for method in (world.true_probabilities, world.expected_dwell, world.median_dwell):
        with pytest.raises(TypeError, match=r"^times must be integers \(unix seconds\), got None"):
            method(1, 1, None)
    with pytest.raises(TypeError, match=r"^query_times must be integers .*, got None"):
        world.oracle_scores(1, 1, None)
    with pytest.raises(TypeError, match="recent must be True or False, got 'no'"):
        world.popularity_ranking(examples, 5, recent="no")
    # The oracle is the brute-force best k of the corpus among posts not in history: the posts
    # servable at the query time first, each group by the true favorite probability then.
    every_post = np.arange(1, world.num_posts + 1)
    window = world.config.serving_window_hours * 3600
    for n in range(len(examples)):
        time = examples.query_times[n]
        p = world.true_probabilities(examples.user_ids[n], every_post, time)[:, FAVORITE]
        age = time - world.post_created
        p[(age > 0) & (age <= window)] += 10.0
        p[examples.history.post_ids[n][examples.history.post_ids[n] > 0] - 1] = -np.inf
        np.testing.assert_array_equal(oracle[n], np.argsort(-p, kind="stable")[:k] + 1)
    # Popularity counts favorites in the training requests only.
    train = world.ranking_train
    favorited = train.candidate_post_ids[train.labels[..., FAVORITE] == 1]
    np.testing.assert_array_equal(
        world.favorite_counts, np.bincount(favorited - 1, minlength=world.num_posts)
    )
    assert np.all(np.diff(world.favorite_counts[popularity[0] - 1]) <= 0)


def test_ids_are_positive_and_zero_only_as_padding(world):
    examples = _all_ranking(world)
    for ids, size in (
        (examples.user_ids, world.num_users),
        (examples.candidate_post_ids, world.num_posts),
        (examples.candidate_author_ids, world.num_authors),
        (world.retrieval_train.target_post_ids, world.num_posts),
    ):
        assert ids.min() >= 1 and ids.max() <= size
    np.testing.assert_array_equal(
        examples.candidate_author_ids, world.post_authors[examples.candidate_post_ids - 1] + 1
    )
    h = examples.history
    valid = h.times > 0
    np.testing.assert_array_equal(h.post_ids > 0, valid)
    np.testing.assert_array_equal(h.author_ids > 0, valid)
    np.testing.assert_array_equal(
        h.author_ids[valid], world.post_authors[h.post_ids[valid] - 1] + 1
    )
    assert valid.any() and not valid.all()
    with pytest.raises(ValueError, match=r"^post_ids: ids must be in \[1, 400\], got 0$"):
        world.true_probabilities(1, 0, world.config.start_time)


def test_user_sequence_round_trips_through_json_and_matches_the_history(world):
    examples = world.ranking_eval
    n = int(np.argmax((examples.history.post_ids > 0).sum(axis=1)))
    sequence = world.user_sequence(int(examples.user_ids[n]), int(examples.request_times[n]))
    assert json.loads(json.dumps(sequence)) == sequence
    items = sequence["history"]
    length = int((examples.history.post_ids[n] > 0).sum())
    assert len(items) == length > 0
    assert [item["post_id"] for item in items] == examples.history.post_ids[n, :length].tolist()
    assert [item["author_id"] for item in items] == examples.history.author_ids[n, :length].tolist()
    for item, actions in zip(items, examples.history.actions[n, :length], strict=True):
        assert item["actions"] == {str(a): 1.0 for a in np.flatnonzero(actions)}
    dwell = [item["dwell_time"] for item in items]
    np.testing.assert_allclose(dwell, examples.history.dwell[n, :length], atol=5e-4)
    assert sequence["request_time"] == int(examples.request_times[n])


def test_descriptions_name_the_planted_taste(world):
    u = int(np.argmax(world.user_topic_prefs.max(axis=1)))
    top = world.topic_names[int(np.argmax(world.user_topic_prefs[u]))]
    assert top in world.describe_user(u + 1).split(";")[0]
    text = world.describe_post(1, int(world.post_created[0]) + 2 * 3600)
    assert world.topic_names[world.post_topics[0]] in text and "2.0 h old" in text
    created = int(world.post_created[0])
    assert world.describe_post(1, created + 3 * 86_400).endswith(", 3.0 days old")
    assert world.describe_post(1, created - 7_200).endswith(", created 2.0 h after that time")
    corpus = world.corpus()
    np.testing.assert_array_equal(corpus["topics"], world.post_topics)
    assert corpus["post_ids"][0] == 1


def test_config_round_trips_through_json():
    config = W.WorldConfig.tiny(seed=3)
    data = json.loads(json.dumps(config.to_json()))
    assert W.WorldConfig.from_json(data) == config
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        W.WorldConfig.from_json({**data, "colour": 1})
    actions = {"favorite_score": {"rate": 1}}
    with pytest.raises(ValueError, match=r"actions: favorite_score must be an object of \["):
        W.WorldConfig.from_json({**data, "actions": actions})


@pytest.mark.parametrize(
    "field, value, least",
    [
        ("num_users", -3, 1),
        ("num_posts", 0, 1),
        ("history_len", 2.5, 1),
        ("num_topics", True, 1),
        ("favourite_authors_per_user", -1, 0),
        ("start_time", 1.7e9, 0),  # (unix seconds are integers)
    ],
)
def test_a_count_below_its_minimum_or_not_an_integer_is_refused(field, value, least):
    with pytest.raises(ValueError, match=rf"^{field} must be an integer >= {least}, got "):
        dataclasses.replace(W.WorldConfig.tiny(), **{field: value})


@pytest.mark.parametrize(
    "change, message",
    [
        # Each of these built a world (or failed deep inside it with "math domain error").
        (dict(author_quality_share=2), r"author_quality_share must be a number in \[0, 1\], got 2"),
        (dict(in_taste_fraction=-1.0), r"in_taste_fraction must be a number in \[0, 1\]"),
        (dict(serving_window_hours=0.0), "serving_window_hours must be a finite number > 0"),
        (dict(freshness_timescale_hours=math.nan), "freshness_timescale_hours must be a finite"),
        (dict(activity_sigma=-1.0), "activity_sigma must be a finite number >= 0, got -1.0"),
        (dict(warmup_days=20.0), r"warmup_days \(20.0\) must be below span_days \(10.0\)"),
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
        (dict(media_probabilities=(0.5, 0.5, 0.5)), "media_probabilities must be 3 numbers >= 0"),
        (dict(topic_weight="3"), "topic_weight must be a finite number, got '3'"),
        (
            dict(actions={**W.default_action_models(), "reply_score": W.ActionModel(0, 1, 1, 1)}),
            r"actions: reply_score's base_rate must be in \(0, 1\), got 0",
        ),
        # These built a world of infinite dwell times, or overflowed in building it.
        (dict(activity_sigma=1e300), r"activity_sigma must be <= 10, got 1e\+300"),
        (dict(topic_weight=-1e308), r"topic_weight must be in \[-100, 100\], got -1e\+308"),
        (dict(dwell_median_seconds=1e308), "dwell_median_seconds must be <= 100,000, got 1e\\+308"),
        (dict(dwell_media_offsets=(0, 0, 4.0)), r"dwell_media_offsets must be 3 numbers in \[-3"),
        (
            dict(
                actions={**W.default_action_models(), "reply_score": W.ActionModel(0.1, 1e3, 0, 0)}
            ),
            r"actions: reply_score's slopes must be numbers in \[-100, 100\], got \(1000.0",
        ),
        (dict(start_time=2**70), r"start_time \(1180591620717411303424\) \+ span_days \(10.0\)"),
        (dict(start_time=10**400), r"start_time \(1000000000"),
        (dict(start_time=2**31 - 10 * 86_400), r"start_time \(2146619648\) \+ .* before 2\*\*31"),
        # A user's requests, a second apart, ran past 2**31.
        (dict(start_time=2**31 - 10 * 86_400 - 100),
         r"start_time \(2146619548\) \+ span_days \(10.0\) \+ max_requests_per_user \(160\) "
         "seconds must end before 2"),
        (dict(dwell_time_threshold_seconds=5.0),
         r"dwell_time_threshold_seconds \(5.0\) must be >= dwell_score_threshold_seconds \(8.0\)"),
        # These failed with a raw TypeError, or asked numpy for terabytes.
        (dict(actions=None), "actions must be a dict of ActionModel by action name, got None"),
        (dict(favourite_authors_per_user=10**12),
         r"favourite_authors_per_user \(1000000000000\) must not exceed num_authors \(24\)"),
        # The rankings ended in numpy's "negative dimensions are not allowed".
        (dict(history_len=400), r"history_len \(400\) must be below num_posts \(400\)"),
    ],
)  # fmt: skip
def test_a_number_outside_its_range_is_refused_by_name(change, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        dataclasses.replace(W.WorldConfig.tiny(), **change)


@pytest.mark.parametrize(
    "time, error, message",
    [
        # Each was truncated (a float, true), met numpy's NaN or overflow errors, or wrapped.
        (1_700_000_000.7, TypeError, "must be integers .unix seconds., got float64"),
        (True, TypeError, "must be integers .unix seconds., got bool"),
        (np.nan, TypeError, "must be integers .unix seconds., got float64"),
        (2**63 - 1, ValueError, r"must be unix seconds in \[0, 2\*\*31\), got 9223372036854775807"),
        (np.uint64(2**64 - 1), ValueError, r"must be unix seconds in \[0, 2\*\*31\), got 1844"),
        (-1, ValueError, r"must be unix seconds in \[0, 2\*\*31\), got -1$"),
        (2**64, ValueError, r"must be unix seconds in \[0, 2\*\*31\), got 18446744073709551616$"),
    ],
)  # fmt: skip
def test_a_time_that_is_not_unix_seconds_is_refused_by_every_method(world, time, error, message):
    calls = {
        "times": [
            lambda: world.true_probabilities(1, 1, time),
            lambda: world.expected_dwell(1, 1, time),
            lambda: world.median_dwell(1, 1, time),
            lambda: world.sample_engagement(1, 1, time, np.random.default_rng(0)),
            lambda: world.servable(1, time),
            lambda: world.history([1], [time]),
        ],
        "query_times": [lambda: world.oracle_scores(1, 1, time)],
        "time": [
            lambda: world.describe_post(1, time),
            lambda: world.recent_posts(time),
            lambda: world.user_sequence(1, time),
            lambda: world.describe_history(1, time),
            lambda: world.unseen_recent_posts(1, time),
        ],
    }
    for name, fns in calls.items():
        for call in fns:
            with pytest.raises(error, match=f"^{name} {message}"):
                call()
    with pytest.raises(ValueError, match=r"time must be one time, got an array of shape \(2,\)"):
        world.recent_posts([1, 2])


def test_ids_and_times_that_do_not_broadcast_are_refused_naming_each_shape(world):
    """numpy's own error named arguments 0 and 1, not which of the three was off."""
    rng = np.random.default_rng(0)
    for call in (world.true_probabilities, world.expected_dwell, world.median_dwell):
        with pytest.raises(ValueError, match=r"^user_ids \[3\], post_ids \[4\], times \[\]: sha"):
            call([1, 2, 3], [1, 2, 3, 4], 100)
    with pytest.raises(ValueError, match=r"post_ids \[2\], times \[3\]: shapes that do not"):
        world.sample_engagement([1, 2], [1, 2], [5, 6, 7], rng)
    with pytest.raises(ValueError, match=r"post_ids \[3\], query_times \[4\]: shapes that"):
        world.oracle_scores([1, 2, 3], [1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"^user_ids \[2\], post_ids \[3\]: shapes that"):
        world.affinity([1, 2], [1, 2, 3])
    assert world.true_probabilities([[1], [2]], [1, 2, 3], 100).shape == (2, 3, len(W.ACTIONS))


@pytest.mark.parametrize("config", [W.WorldConfig.tiny, {"seed": 1}, "tiny"])
def test_build_world_and_from_json_name_what_is_not_a_config(config):
    with pytest.raises(TypeError, match="config must be a WorldConfig .or None., got "):
        W.build_world(config)
    if not isinstance(config, dict):
        with pytest.raises(ValueError, match="world config: expected an object of settings, got"):
            W.WorldConfig.from_json(config)


def test_a_world_at_the_limits_of_its_numbers_is_finite():
    """Every weight and slope of the engagement and dwell models, the spreads of authors' output
    and users' activity and the median dwell, at their limits at once: no overflow, every figure
    finite, and the median dwell at most its cap."""
    tiny = W.WorldConfig.tiny()
    steep = W.ActionModel(0.1, taste_slope=100.0, quality_slope=-100.0, freshness_slope=100.0)
    limits = {name: limit for name, limit in W.MAGNITUDE_LIMITS.items() if name in {
        "author_output_sigma", "activity_sigma", "topic_weight", "favourite_author_weight",
        "dwell_taste_slope", "dwell_quality_slope", "dwell_freshness_slope",
        "dwell_median_seconds",
    }}  # fmt: skip
    config = dataclasses.replace(
        tiny, **limits, dwell_media_offsets=(3.0, 3.0, 3.0),
        actions=dict.fromkeys(tiny.actions, steep),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warns
        world = W.build_world(config)
        examples = world.ranking_train
        for name, value in dataclasses.asdict(examples).items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert np.isfinite(value).all(), name
        users, posts = examples.user_ids[:, None], examples.candidate_post_ids
        median = world.median_dwell(users, posts, examples.request_times[:, None])
    assert np.isfinite(median).all() and median.max() == pytest.approx(W.MAX_MEDIAN_DWELL_SECONDS)


def test_users_without_favourite_authors_make_a_world():
    world = W.build_world(dataclasses.replace(W.WorldConfig.tiny(), favourite_authors_per_user=0))
    assert len(world.ranking_train) > 0 and not world.user_favourite_authors.any()
    assert "favourite authors: none;" in world.describe_user(1)


def _array_bytes(value, seen) -> int:
    """Bytes of every NumPy array reachable from `value`, each counted once."""
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return value.nbytes
    if dataclasses.is_dataclass(value):
        value = vars(value)
    if isinstance(value, dict):
        return sum(_array_bytes(v, seen) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_array_bytes(v, seen) for v in value)
    return 0


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"mean_requests_per_user": 200.0, "max_requests_per_user": 10},
        {"num_candidates": 12, "history_len": 64},
        # Many authors or topics per user, or many posts: the planted entities count too.
        {"num_authors": 20_000},
        {"num_topics": 2000, "num_authors": 4000},
        {"num_posts": 100_000},
    ],
)
def test_memory_bytes_is_about_the_peak_of_building_the_world(changes):
    """Not far below the peak (a world that cannot fit is refused before it is built, not
    killed by the system halfway) nor far above it (what fits is not refused)."""
    config = dataclasses.replace(W.WorldConfig.tiny(), **changes)
    tracemalloc.start()  # numpy reports its arrays to it
    try:
        built = W.build_world(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.8 * peak < config.memory_bytes() < 1.25 * peak
    assert config.memory_bytes() > _array_bytes(built, set())  # the building takes more


def test_taste_history_and_recent_posts_in_words(world):
    examples = world.ranking_eval
    user, time = int(examples.user_ids[0]), int(examples.request_times[0])
    posts = world.recent_posts(time)
    created = world.post_created[posts - 1]
    assert len(posts) and (created < time).all()
    assert (created >= time - world.config.serving_window_hours * 3600).all()
    taste = world.in_taste(user, posts)
    u = user - 1
    expected = (world.user_topic_prefs[u, world.post_topics[posts - 1]] > 0) | (
        world.user_favourite_authors[u, world.post_authors[posts - 1]]
    )
    np.testing.assert_array_equal(taste, expected)
    history = examples.history.post_ids[0]
    words = world.describe_history(user, time)
    assert words.startswith(f"their last {(history > 0).sum()} engagements: ")
    top = np.bincount(world.post_topics[history[history > 0] - 1]).argmax()
    assert world.topic_names[top] in words.split(": ")[1].split(",")[0]


def test_servable_means_created_within_the_window_before(world):
    """Age in (0, window]: a post created at the query time is not servable yet, one created
    exactly a window earlier still is."""
    post = 5
    created = int(world.post_created[post - 1])
    window = int(world.config.serving_window_hours * 3600)
    times = np.array([created, created + 1, created + window, created + window + 1])
    assert world.servable(post, times).tolist() == [False, True, True, False]
    recent = [post in world.recent_posts(t) for t in times]
    assert recent == [False, True, True, False]
    every = world.recent_posts(created + 1, hours=10**30)  # (it overflowed int64)
    assert every.tolist() == list(range(1, 1 + (world.post_created <= created).sum()))
    with pytest.raises(ValueError, match=r"post_ids: ids must be in \[1, "):
        world.servable(0, created)


def test_what_was_served_is_servable_where_the_window_is_widened():
    """Where fewer posts than the serving pool were created in the window (a thin world), the
    world serves older posts to fill it; `servable`, the oracle and `recent_posts` widen the
    window the same way, so that every served post and every target counts as servable."""
    thin = dataclasses.replace(
        W.WorldConfig.tiny(), num_posts=100, warmup_days=2.0, serving_window_hours=24.0
    )
    world = W.build_world(thin)
    served, times = world.ranking_train.candidate_post_ids, world.ranking_train.request_times
    start, end = world.serving_window(times)
    in_hours = np.searchsorted(world.post_created, times - 24 * 3600)
    assert (start < in_hours).mean() > 0.5  # most windows widened...
    assert (end - start == np.maximum(end - in_hours, thin.serving_pool_size)).all()  # ...to K
    assert world.servable(served, times[:, None]).all()
    targets = world.retrieval_eval
    assert world.servable(targets.target_post_ids, targets.query_times).all()
    oracle = world.oracle_ranking(targets, 10)
    assert np.mean(oracle[:, :1] == targets.target_post_ids[:, None]) > 0.1
    assert set(served[0]) <= set(world.recent_posts(times[0]))


def test_rankings_refuse_what_they_cannot_rank(world):
    """k = -1 gave 9 columns and k = 0 none, silently; the rest ended in AttributeError,
    IndexError or OverflowError."""
    scores, history = np.zeros((2, 10)), np.array([[1, 0], [3, 4]])
    for k in (-1, 0, 11, 2.0):
        with pytest.raises(ValueError, match=rf"k must be an integer in \[1, 10\], got {k}"):
            W.top_k_unseen(scores.copy(), history, k)
    with pytest.raises(
        ValueError, match=r"scores must be a float array \[Q, P\], got \[2, 10\] int"
    ):
        W.top_k_unseen(scores.astype(int), history, 3)
    with pytest.raises(
        ValueError, match=r"history_ids must be integers \[Q=2, S\], got \[\] object"
    ):
        W.top_k_unseen(scores, None, 3)
    with pytest.raises(ValueError, match=r"history_ids must be post ids in \[0, 10\] \(0: padding"):
        W.top_k_unseen(scores, history + 10, 3)
    top = W.top_k_unseen(scores.copy(), history, 1)  # k = 1 is the least: the history left out
    assert top[0, 0] != 1 and top[1, 0] not in (3, 4)
    for rank in (world.oracle_ranking, world.popularity_ranking):
        with pytest.raises(TypeError, match="examples must be RetrievalExamples, got NoneType"):
            rank(None)
    with pytest.raises(ValueError, match="media_probabilities must be 3 numbers, got None"):
        W.WorldConfig(media_probabilities=None)


def test_take_rows_refuses_an_index_that_is_not_rows(world):
    """A float or string index ended in numpy's IndexError, one out of range too, and None
    added an axis to every field."""
    history = world.ranking_eval.history
    n = len(history.post_ids)
    assert W.take_rows(history, [0, -1]).post_ids.shape[0] == 2
    assert W.take_rows(history, []).post_ids.shape[0] == 0  # (an empty list is float64)
    for index in (None, 1.5, "a", np.ones(3, bool)):
        with pytest.raises(
            ValueError, match=rf"index must be integers, a slice or a boolean mask \[{n}\]"
        ):
            W.take_rows(history, index)
    with pytest.raises(ValueError, match=rf"index must be rows in \[-{n}, {n}\), got \[0, {n}\]"):
        W.take_rows(history, [0, n])
    with pytest.raises(TypeError, match="examples must be a History or examples, got dict"):
        W.take_rows({}, 0)


def test_a_world_that_runs_out_of_memory_says_what_it_would_need(monkeypatch):
    """numpy's MemoryError names an array shape; this names the world and its estimate."""

    def out_of_memory(*args):
        raise MemoryError("Unable to allocate 22.4 GiB for an array with shape (1000000000, 24)")

    monkeypatch.setattr(W, "_plant", out_of_memory)
    config = dataclasses.replace(W.WorldConfig.tiny(), num_users=10**9)
    with pytest.raises(MemoryError) as raised:
        W.build_world(config)
    assert re.match(
        r"building a world of 1,000,000,000 users, 400 posts and 24 authors ran out of memory; "
        r"it would need about \d+\.\d GiB \(WorldConfig.memory_bytes\)$",
        str(raised.value),
    ), raised.value
