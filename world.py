"""A synthetic world where the answer is known: planted tastes, a true engagement model, examples.

One integer seed fixes everything. The world plants
- topics with names;
- authors, each with a home topic and a quality;
- posts, each with an author, a topic (mostly the author's home topic), a creation time, a quality
  and a media kind;
- users, each with sparse topic preferences, a few favourite authors and an activity level;
and an engagement model that gives, for any (user, post, impression time), the true probability
of each of the 19 `ACTIONS` and a continuous dwell time. From it the world serves requests of C
candidates to every user over a month, samples what each user did, and builds ranking and
retrieval examples with a per-user time split. Because the truth is known, every metric has an
oracle: the same metric computed from `true_probabilities` (ranking) or `oracle_scores` (retrieval).

The engagement model, for user u, post p shown at time t:
    taste      = topic_weight · pref[u, topic(p)] + favourite_author_weight · [author(p) ∈ fav(u)]
    freshness  = exp(−age / freshness_timescale), age = t − created(p), in [0, 1]
    logit_a    = logit(base_rate_a) + taste_slope_a · taste + quality_slope_a · quality(p)
                 + freshness_slope_a · freshness                      (every action but dwell)
    log dwell  = mu + dwell_spread · Logistic(0, 1), where the median dwell exp(mu) =
                 dwell_median · exp(dwell slopes · (taste, quality, freshness) + media offset),
                 capped at MAX_MEDIAN_DWELL_SECONDS (which only extreme configs reach)
Positive actions have positive slopes and negative feedback negative ones; `photo_expand_score`
is 0 except on photos and `vqv_score` is 0 except on videos. Dwell is log-logistic, so the two
dwell actions, "dwell above a threshold", have exact sigmoid probabilities. The other 17 actions
are sampled independently given their probabilities; the two dwell actions are read off the one
sampled dwell, so they are nested (dwell_time implies dwell_score).

Ids: users, posts and authors have ids 1..N (0 is padding); arrays indexed by entity are indexed
by id − 1. Every public method takes ids. Times are unix seconds (int64).
Shapes: N examples, S history length, C candidates, A = 19 actions, K ranking depth, P posts.
"""

from __future__ import annotations

import dataclasses
import datetime
import math

import numpy as np
from scipy.special import expit  # the logistic sigmoid; never overflows

from recsys_model import ACTIONS, is_integer, is_number

NUM_ACTIONS = len(ACTIONS)
ACTION_INDEX = {name: i for i, name in enumerate(ACTIONS)}
FAVORITE = ACTION_INDEX["favorite_score"]
NEGATIVE_ACTIONS = (
    "not_interested_score",
    "block_author_score",
    "mute_author_score",
    "report_score",
)
DWELL_SCORE_ACTION = "dwell_score"
DWELL_TIME_ACTION = "dwell_time"
# Engagements (what enters a history) are served posts with at least one of these. The dwell
# actions are left out because every impression has a dwell: counting them would fill
# histories with posts the user merely scrolled past.
POSITIVE_ACTIONS = tuple(
    name
    for name in ACTIONS
    if name not in NEGATIVE_ACTIONS and name not in (DWELL_SCORE_ACTION, DWELL_TIME_ACTION)
)
MEDIA_KINDS = ("text", "photo", "video")
# Actions that can only happen on one media kind (probability exactly 0 on the others).
MEDIA_ONLY_ACTIONS = {"photo_expand_score": "photo", "vqv_score": "video"}
TOPIC_NAMES = (
    "football", "basketball", "tennis", "formula1", "jazz", "hiphop", "classical", "cooking",
    "baking", "gardening", "travel", "photography", "gaming", "movies", "books", "science",
    "space", "politics", "fashion", "fitness", "crypto", "ai", "pets", "history",
)  # fmt: skip
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86_400
# History lookups sort engagements by one int64 key, user index · stride + shifted time; the
# stride (2^40 s, about 35,000 years) leaves room for any time and up to 2^22 users.
_KEY_STRIDE = 1 << 40
_KEY_TIME_SHIFT = 1 << 39
# The retrieval oracle scores this many users against the whole corpus at a time, which bounds
# its memory to [chunk, P] floats.
_ORACLE_CHUNK = 512


def plain_numbers(config) -> None:
    """Replaces, in a frozen dataclass being built, numpy scalars (alone or in sequences) by the
    Python numbers they hold, and lists and arrays by tuples: a config is written as JSON, which
    takes no numpy value, and read back with tuples."""

    def plain(value):
        if isinstance(value, np.generic | np.ndarray):
            return plain(value.tolist())
        return tuple(map(plain, value)) if isinstance(value, tuple | list) else value

    for field in dataclasses.fields(config):
        object.__setattr__(config, field.name, plain(getattr(config, field.name)))


@dataclasses.dataclass(frozen=True)
class ActionModel:
    """How one sampled action depends on the drivers: logit p = logit(base_rate) + slopes · drivers.

    `base_rate` is the probability at taste 0, quality 0 and freshness 0 (an old post of average
    quality from a topic and author the user has no taste for). Slopes are per unit of taste,
    of quality (standard normal over posts) and of freshness (1 at creation, → 0 with age).
    """

    base_rate: float
    taste_slope: float
    quality_slope: float
    freshness_slope: float

    def __post_init__(self) -> None:
        plain_numbers(self)


def default_action_models() -> dict[str, ActionModel]:
    """The 17 sampled actions (all but the two dwell actions, which come from the dwell model)."""
    m = ActionModel
    return {
        "favorite_score": m(0.02, 1.1, 0.6, 1.0),
        "reply_score": m(0.004, 0.9, 0.3, 1.4),
        "repost_score": m(0.006, 1.0, 0.6, 1.0),
        "photo_expand_score": m(0.10, 0.5, 0.4, 0.6),
        "click_score": m(0.05, 0.6, 0.3, 0.5),
        "profile_click_score": m(0.008, 0.9, 0.2, 0.4),
        "vqv_score": m(0.15, 0.6, 0.6, 0.6),
        "share_score": m(0.004, 0.9, 0.7, 1.0),
        "share_via_dm_score": m(0.003, 1.0, 0.5, 1.0),
        "share_via_copy_link_score": m(0.003, 0.8, 0.7, 0.8),
        "quote_score": m(0.003, 0.9, 0.4, 1.4),
        "quoted_click_score": m(0.006, 0.6, 0.3, 0.6),
        "follow_author_score": m(0.002, 1.1, 0.4, 0.3),
        "not_interested_score": m(0.05, -0.9, -0.5, 0.0),
        "block_author_score": m(0.006, -0.9, -0.8, 0.0),
        "mute_author_score": m(0.008, -0.9, -0.6, 0.0),
        "report_score": m(0.004, -0.6, -1.1, 0.0),
    }


# The fields of WorldConfig that are integers, each of at least its minimum (users without
# favourite authors, or a world with nothing held out, are worlds too).
WHOLE_FIELDS = {
    "seed": 0, "start_time": 0,
    "num_topics": 1, "num_authors": 1, "num_posts": 1, "num_users": 1, "history_len": 1,
    "num_candidates": 1, "min_liked_topics": 1, "max_liked_topics": 1,
    "favourite_authors_per_user": 0, "min_requests_per_user": 1, "max_requests_per_user": 1,
    "eval_requests_per_user": 0, "serving_pool_size": 1,
}  # fmt: skip
# The other numbers of WorldConfig, by the range each must lie in.
FRACTION_FIELDS = (
    "home_topic_probability", "author_quality_share", "favourite_in_taste_probability",
    "in_taste_fraction",
)  # fmt: skip
POSITIVE_FIELDS = (
    "span_days", "mean_requests_per_user", "serving_window_hours", "serving_temperature",
    "freshness_timescale_hours", "dwell_median_seconds", "dwell_score_threshold_seconds",
    "dwell_time_threshold_seconds",
)  # fmt: skip
NON_NEGATIVE_FIELDS = (
    "warmup_days", "topic_popularity_exponent", "author_output_sigma", "activity_sigma",
)  # fmt: skip
REAL_FIELDS = (
    "topic_weight", "favourite_author_weight", "dwell_taste_slope", "dwell_quality_slope",
    "dwell_freshness_slope",
)  # fmt: skip

# Beyond these sizes the world's numbers overflow (lognormal draws, exponentials of logits and
# dwell times) or mean nothing more (a logit slope of 100 already saturates every probability).
MAGNITUDE_LIMITS = {
    **dict.fromkeys(POSITIVE_FIELDS + ("warmup_days",), 1e6),
    **dict.fromkeys(("topic_popularity_exponent", "author_output_sigma", "activity_sigma"), 10.0),
    **dict.fromkeys(("topic_weight", "favourite_author_weight"), 100.0),
    **dict.fromkeys(("dwell_taste_slope", "dwell_quality_slope", "dwell_freshness_slope"), 3.0),
    "dwell_median_seconds": 1e5,
}
ACTION_SLOPE_LIMIT, DWELL_OFFSET_LIMIT = 100.0, 3.0
# The median dwell is at most this (about 115 days, far above every dwell threshold allowed): a
# world of extreme slopes would otherwise draw dwell times beyond float32.
MAX_MEDIAN_DWELL_SECONDS = 1e7
# Every time of the world comes before 2**31 s (January 2038): the models take times as int32
# unix seconds.
LAST_TIME = 2**31


def _integers(values) -> np.ndarray | None:
    """`values` as an array if they are integers (Python integers beyond numpy's, and no values
    at all, included; to be range-checked before any cast), else None."""
    values = np.asarray(values)
    if values.dtype.kind in "iu" or not values.size:
        return values
    if values.dtype == object and all(is_integer(v) for v in values.ravel()):
        return values
    return None


def _check_broadcast(named: dict[str, np.ndarray]) -> None:
    """Raises ValueError, naming each array's shape, unless the arrays broadcast together."""
    try:
        np.broadcast_shapes(*(x.shape for x in named.values()))
    except ValueError:
        shapes = ", ".join(f"{name} {list(x.shape)}" for name, x in named.items())
        raise ValueError(f"{shapes}: shapes that do not broadcast together") from None


def _times(times, name: str = "times") -> np.ndarray:
    """Times given to the world, as int64: integers of unix seconds in [0, 2**31), which the
    models take (a float would be truncated, and beyond int32 a time would wrap)."""
    checked = None if times is None else _integers(times)
    if checked is None:
        got = "None" if times is None else np.asarray(times).dtype
        raise TypeError(f"{name} must be integers (unix seconds), got {got}")
    times = checked
    if times.size and (times.min() < 0 or times.max() >= LAST_TIME):
        got = times.ravel()[0] if times.size == 1 else f"[{times.min()}, {times.max()}]"
        raise ValueError(f"{name} must be unix seconds in [0, 2**31), got {got}")
    return times.astype(np.int64)


def _time(time, name: str = "time") -> np.int64:
    """One time given to the world (`_times` of a scalar)."""
    if np.ndim(time):
        raise ValueError(f"{name} must be one time, got an array of shape {np.shape(time)}")
    return _times(time, name)[()]


def _real(value) -> bool:
    """A finite real number (not a bool)."""
    return is_number(value) and math.isfinite(value)


def _range_problem(config: WorldConfig) -> str | None:
    """The first number of `config` outside its range, in words, or None."""
    for names, ok, wanted in (
        (FRACTION_FIELDS, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        (POSITIVE_FIELDS, lambda v: v > 0, "a finite number > 0"),
        (NON_NEGATIVE_FIELDS, lambda v: v >= 0, "a finite number >= 0"),
        (REAL_FIELDS, lambda v: True, "a finite number"),
    ):
        for name in names:
            value = getattr(config, name)
            if not (_real(value) and ok(value)):
                return f"{name} must be {wanted}, got {value!r}"
    for name, limit in MAGNITUDE_LIMITS.items():
        value = getattr(config, name)
        if abs(value) > limit:
            wanted = f"in [-{limit:,g}, {limit:,g}]" if name in REAL_FIELDS else f"<= {limit:,g}"
            return f"{name} must be {wanted}, got {value!r}"
    # A user's requests are spread a second apart past the span's end at most (`_schedule`).
    end = config.span_days * SECONDS_PER_DAY + config.max_requests_per_user
    if config.start_time >= LAST_TIME or config.start_time + end > LAST_TIME:
        return (
            f"start_time ({config.start_time}) + span_days ({config.span_days}) + "
            f"max_requests_per_user ({config.max_requests_per_user}) seconds must end before "
            f"2**31 (January 2038: the models take times as int32 unix seconds)"
        )
    media, offsets = config.media_probabilities, config.dwell_media_offsets
    for name, value in (("media_probabilities", media), ("dwell_media_offsets", offsets)):
        if not isinstance(value, tuple | list):
            return f"{name} must be 3 numbers, got {value!r}"
    if not (len(media) == 3 and all(_real(p) and p >= 0 for p in media)) or not math.isclose(
        sum(media), 1.0, abs_tol=1e-9
    ):
        return f"media_probabilities must be 3 numbers >= 0 that sum to 1, got {media!r}"
    if not (len(offsets) == 3 and all(_real(x) and abs(x) <= DWELL_OFFSET_LIMIT for x in offsets)):
        limit = f"[-{DWELL_OFFSET_LIMIT:g}, {DWELL_OFFSET_LIMIT:g}]"
        return f"dwell_media_offsets must be 3 numbers in {limit}, got {offsets!r}"
    if config.warmup_days >= config.span_days:
        return f"warmup_days ({config.warmup_days}) must be below span_days ({config.span_days})"
    for name, model in config.actions.items():
        if not isinstance(model, ActionModel):
            return f"actions: {name} must be an ActionModel, got {model!r}"
        if not (_real(model.base_rate) and 0 < model.base_rate < 1):
            return f"actions: {name}'s base_rate must be in (0, 1), got {model.base_rate!r}"
        slopes = (model.taste_slope, model.quality_slope, model.freshness_slope)
        if not all(_real(x) and abs(x) <= ACTION_SLOPE_LIMIT for x in slopes):
            limit = f"[-{ACTION_SLOPE_LIMIT:g}, {ACTION_SLOPE_LIMIT:g}]"
            return f"actions: {name}'s slopes must be numbers in {limit}, got {slopes!r}"
    return None


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Every size and constant of the world. Times in seconds unless a name says otherwise."""

    seed: int = 0
    # Sizes.
    num_topics: int = 20
    num_authors: int = 400
    num_posts: int = 3000
    num_users: int = 1500
    history_len: int = 32  # S: engagements in a history
    num_candidates: int = 32  # C: posts served per request
    # Time: posts are created uniformly over [start_time, start_time + span_days); requests come
    # after warmup_days, so that every request has a full window of recent posts to draw from.
    start_time: int = 1_700_000_000
    span_days: float = 30.0
    warmup_days: float = 3.0
    # Topics: popularity ∝ 1 / (rank + 1)^exponent, for user tastes and author home topics.
    topic_popularity_exponent: float = 0.8
    # Authors: share of posts ~ lognormal(σ); quality ~ N(0, 1).
    author_output_sigma: float = 0.8
    # Posts.
    home_topic_probability: float = 0.85  # else a uniformly random topic
    author_quality_share: float = 0.6  # of the post quality's variance (post quality ~ N(0, 1))
    media_probabilities: tuple[float, float, float] = (0.5, 0.3, 0.2)  # text, photo, video
    # Users: 1..max liked topics with Dirichlet(1) weights summing to 1; favourite authors are
    # home to a liked topic (picked by weight) with probability favourite_in_taste_probability.
    min_liked_topics: int = 1
    max_liked_topics: int = 4
    favourite_authors_per_user: int = 3
    favourite_in_taste_probability: float = 0.8
    # Requests per user = clip(round(mean · activity), min, max); activity ~ lognormal, mean 1.
    mean_requests_per_user: float = 48.0
    min_requests_per_user: int = 4
    max_requests_per_user: int = 160
    activity_sigma: float = 0.5
    eval_requests_per_user: int = 2  # each user's last requests, held out
    # Serving: a pool of recent posts (created in the last serving_window_hours, or the last
    # serving_pool_size posts if fewer were, drawn spread over that window); in_taste_fraction
    # of the C slots go to the pool's posts with the highest affinity / serving_temperature +
    # Gumbel noise, the rest to random pool posts.
    serving_window_hours: float = 72.0
    serving_pool_size: int = 64
    in_taste_fraction: float = 0.5
    serving_temperature: float = 0.5
    # Engagement model (see the module docstring).
    topic_weight: float = 3.0
    favourite_author_weight: float = 1.5
    freshness_timescale_hours: float = 24.0
    actions: dict[str, ActionModel] = dataclasses.field(default_factory=default_action_models)
    # Dwell: log-logistic; spread is the scale of log dwell (< 1 for a finite mean, < 0.5 for a
    # finite variance, which regression losses on dwell want). The median is at taste, quality
    # and freshness 0 on a photo (media offset 0).
    dwell_median_seconds: float = 4.5
    dwell_taste_slope: float = 0.4
    dwell_quality_slope: float = 0.2
    dwell_freshness_slope: float = 0.2
    dwell_spread: float = 0.4
    dwell_media_offsets: tuple[float, float, float] = (-0.2, 0.0, 0.4)  # text, photo, video
    dwell_score_threshold_seconds: float = 8.0
    dwell_time_threshold_seconds: float = 20.0

    def __post_init__(self) -> None:
        plain_numbers(self)
        for name, least in WHOLE_FIELDS.items():
            value = getattr(self, name)
            if not is_integer(value) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        expected = set(ACTIONS) - {DWELL_SCORE_ACTION, DWELL_TIME_ACTION}
        if not isinstance(self.actions, dict):
            raise ValueError(
                f"actions must be a dict of ActionModel by action name, got {self.actions!r}"
            )
        if set(self.actions) != expected:
            raise ValueError(
                f"actions: got models for {sorted(set(self.actions) ^ expected)} wrongly; "
                f"expected exactly {sorted(expected)}"
            )
        if not 1 <= self.min_liked_topics <= self.max_liked_topics <= self.num_topics:
            raise ValueError("min_liked_topics <= max_liked_topics <= num_topics must hold")
        if self.num_authors < self.num_topics:
            raise ValueError("num_authors must be >= num_topics (every topic has an author)")
        if self.favourite_authors_per_user > self.num_authors:
            raise ValueError(
                f"favourite_authors_per_user ({self.favourite_authors_per_user}) must not exceed "
                f"num_authors ({self.num_authors})"
            )
        if self.min_requests_per_user > self.max_requests_per_user:
            raise ValueError("min_requests_per_user must not exceed max_requests_per_user")
        if self.min_requests_per_user <= self.eval_requests_per_user:
            raise ValueError("min_requests_per_user must exceed eval_requests_per_user")
        if not self.num_candidates <= self.serving_pool_size:
            raise ValueError("serving_pool_size must be >= num_candidates")
        if self.history_len >= self.num_posts:  # the rankings leave a query's history out
            raise ValueError(
                f"history_len ({self.history_len}) must be below num_posts ({self.num_posts}): "
                "a query's ranking holds the posts outside its history"
            )
        if not (_real(self.dwell_spread) and 0.0 < self.dwell_spread < 1.0):
            raise ValueError(f"dwell_spread must be in (0, 1), got {self.dwell_spread!r}")
        problem = _range_problem(self)
        if problem:
            raise ValueError(problem)
        if self.dwell_time_threshold_seconds < self.dwell_score_threshold_seconds:
            raise ValueError(
                f"dwell_time_threshold_seconds ({self.dwell_time_threshold_seconds}) must be >= "
                f"dwell_score_threshold_seconds ({self.dwell_score_threshold_seconds}): the two "
                "dwell actions are nested"
            )

    def memory_bytes(self) -> float:
        """About the most memory building the world takes, at the mean number of requests per
        user (fitted to peaks measured on the default world with 16 to 64 candidates and
        histories of 8 to 128: within 10 % there, and within 30 % for the tiny world's and the
        extreme pairs' peaks). Per request: for each impression and action, its probabilities
        in float64 and float32, its sampled label and their copies into the split (24 bytes);
        for each history item, its fields, twice (122); and for each impression and history
        item, the histories of the retrieval examples that its favorites make (6.5)."""
        mean = np.clip(
            self.mean_requests_per_user, self.min_requests_per_user, self.max_requests_per_user
        )
        c, s = self.num_candidates, self.history_len
        per_request = 24 * len(ACTIONS) * c + 122 * s + 6.5 * c * s
        # The planted entities: for each user and topic, the preferences and what draws them
        # (float64, three arrays at once), for each user and author, a favourite or not
        # (bool), and for each author and post, its fields.
        planted = self.num_users * (24 * self.num_topics + self.num_authors)
        planted += 48 * (self.num_authors + self.num_posts)
        return float(self.num_users * mean * per_request + planted)

    def to_json(self) -> dict:
        """Every field as JSON values (the action models as dicts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> WorldConfig:
        """The config `to_json` wrote; unknown keys are refused by name."""
        if not isinstance(data, dict):
            raise ValueError(f"world config: expected an object of settings, got {data!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"world config: unknown keys {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "actions" in values:
            actions = values["actions"]
            if not isinstance(actions, dict):
                raise ValueError(f"actions must be an object by action name, got {actions!r}")
            fields = [f.name for f in dataclasses.fields(ActionModel)]
            for name, model in actions.items():
                if not isinstance(model, dict) or set(model) != set(fields):
                    raise ValueError(
                        f"actions: {name} must be an object of {fields}, got {model!r}"
                    )
            values["actions"] = {k: ActionModel(**v) for k, v in actions.items()}
        return cls(**values)

    @classmethod
    def tiny(cls, seed: int = 0) -> WorldConfig:
        """A world for tests: a few hundred posts and a few dozen users, built in milliseconds."""
        return cls(
            seed=seed,
            num_topics=6,
            num_authors=24,
            num_posts=400,
            num_users=40,
            history_len=8,
            num_candidates=4,
            span_days=10.0,
            mean_requests_per_user=12.0,
            serving_pool_size=12,
        )


@dataclasses.dataclass
class History:
    """The last S engagements before each request, left-aligned, oldest first, 0-padded.

    post_ids, author_ids [N, S] int64; actions [N, S, A] uint8 (0/1); dwell [N, S] float32 seconds;
    times [N, S] int64 unix seconds of the impression. Padding is 0 in every field.
    """

    post_ids: np.ndarray
    author_ids: np.ndarray
    actions: np.ndarray
    dwell: np.ndarray
    times: np.ndarray


@dataclasses.dataclass
class RankingExamples:
    """One row per served request.

    user_ids [N] int64; request_times [N] int64 unix seconds; history: `History` at the request;
    candidate_post_ids, candidate_author_ids [N, C] int64; candidate_creation_times [N, C] int64;
    labels [N, C, A] uint8 sampled actions; dwell [N, C] float32 sampled seconds;
    probabilities [N, C, A] float32 true probabilities (the oracle);
    expected_dwell [N, C] float32 true mean dwell in seconds (the best prediction under
    squared error); median_dwell [N, C] float32 its true median (the best under absolute error).
    """

    user_ids: np.ndarray
    request_times: np.ndarray
    history: History
    candidate_post_ids: np.ndarray
    candidate_author_ids: np.ndarray
    candidate_creation_times: np.ndarray
    labels: np.ndarray
    dwell: np.ndarray
    probabilities: np.ndarray
    expected_dwell: np.ndarray
    median_dwell: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclasses.dataclass
class RetrievalExamples:
    """One row per favorite: the user's history before it and the favorited post.

    user_ids [N] int64; query_times [N] int64 unix seconds (the favorite's impression time);
    history: `History` before that time (never contains the target);
    target_post_ids, target_author_ids [N] int64.
    """

    user_ids: np.ndarray
    query_times: np.ndarray
    history: History
    target_post_ids: np.ndarray
    target_author_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)


def take_rows(examples, index):
    """Rows `index` (an int array, slice or boolean mask) of examples, a `History` or any of the
    example dataclasses above; nested fields are taken too."""
    if not dataclasses.is_dataclass(examples):
        raise TypeError(f"examples must be a History or examples, got {type(examples).__name__}")
    if not isinstance(index, slice):
        index = np.asarray(index)
        if index.size == 0 and index.dtype.kind == "f":  # [] is no rows
            index = index.astype(np.int64)
        n = len(getattr(examples, dataclasses.fields(examples)[0].name))
        if index.dtype.kind not in "iub" or (index.dtype.kind == "b" and index.shape != (n,)):
            raise ValueError(
                f"index must be integers, a slice or a boolean mask [{n}], got {_described(index)}"
            )
        if index.dtype.kind in "iu" and index.size and not -n <= index.min() <= index.max() < n:
            raise ValueError(
                f"index must be rows in [-{n}, {n}), got [{index.min()}, {index.max()}]"
            )
    values = {}
    for field in dataclasses.fields(examples):
        value = getattr(examples, field.name)
        values[field.name] = (
            take_rows(value, index) if dataclasses.is_dataclass(value) else value[index]
        )
    return type(examples)(**values)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclasses.dataclass
class World:
    """The world's entities, engagement model, served requests and examples. Build with
    `build_world(config)`.

    Entity arrays (indexed by id − 1): author_topics [Na]; author_quality [Na];
    post_authors [P] (author index); post_topics [P]; post_created [P] int64 (sorted ascending);
    post_quality [P]; post_media [P] (index into MEDIA_KINDS); user_topic_prefs [Nu, T] (sparse,
    rows sum to 1); user_favourite_authors [Nu, Na] bool; user_activity [Nu].
    Examples: ranking_train, ranking_eval, retrieval_train, retrieval_eval; favorite_counts [P],
    the favorites each post got in the training requests (the popularity baseline).
    """

    config: WorldConfig
    topic_names: tuple[str, ...]
    author_topics: np.ndarray
    author_quality: np.ndarray
    post_authors: np.ndarray
    post_topics: np.ndarray
    post_created: np.ndarray
    post_quality: np.ndarray
    post_media: np.ndarray
    user_topic_prefs: np.ndarray
    user_favourite_authors: np.ndarray
    user_activity: np.ndarray
    # Engagements sorted by (user, time, candidate slot), then one all-zero row that history
    # padding reads: post and author ids [E + 1], time [E + 1], actions [E + 1, A], dwell
    # [E + 1]; _engagement_keys [E] is their sort key (user index and time).
    _engagement_post_ids: np.ndarray = dataclasses.field(repr=False, default=None)
    _engagement_author_ids: np.ndarray = dataclasses.field(repr=False, default=None)
    _engagement_times: np.ndarray = dataclasses.field(repr=False, default=None)
    _engagement_actions: np.ndarray = dataclasses.field(repr=False, default=None)
    _engagement_dwell: np.ndarray = dataclasses.field(repr=False, default=None)
    _engagement_keys: np.ndarray = dataclasses.field(repr=False, default=None)
    ranking_train: RankingExamples = dataclasses.field(repr=False, default=None)
    ranking_eval: RankingExamples = dataclasses.field(repr=False, default=None)
    retrieval_train: RetrievalExamples = dataclasses.field(repr=False, default=None)
    retrieval_eval: RetrievalExamples = dataclasses.field(repr=False, default=None)
    favorite_counts: np.ndarray = dataclasses.field(repr=False, default=None)

    @property
    def num_users(self) -> int:
        return len(self.user_activity)

    @property
    def num_posts(self) -> int:
        return len(self.post_authors)

    @property
    def num_authors(self) -> int:
        return len(self.author_topics)

    # ---- ids ---------------------------------------------------------------------------------

    def _index(self, ids, size: int, name: str) -> np.ndarray:
        """0-based indices of ids in [1, size] (an empty list is no ids, whatever its dtype)."""
        checked = _integers(ids)
        if checked is None:  # a float id would be truncated
            raise TypeError(f"{name}: ids must be integers, got {np.asarray(ids).dtype}")
        ids = checked
        if ids.size and (ids.min() < 1 or ids.max() > size):  # before a cast could wrap them
            got = ids.ravel()[0] if ids.size == 1 else f"ids from {ids.min()} to {ids.max()}"
            raise ValueError(f"{name}: ids must be in [1, {size}], got {got}")
        return ids.astype(np.int64) - 1

    def _one(self, id_, size: int, name: str) -> int:
        """The 0-based index of one id in [1, size]."""
        if np.ndim(id_):
            raise ValueError(f"{name} must be one id, got an array of shape {np.shape(id_)}")
        return int(self._index(id_, size, name))

    def _requests(self, user_ids, post_ids, times=None, time_name: str = "times") -> tuple:
        """0-based user and post indices and int64 times (`time_name` None: none asked for),
        checked, and checked to broadcast together."""
        u = self._index(user_ids, self.num_users, "user_ids")
        p = self._index(post_ids, self.num_posts, "post_ids")
        named = {"user_ids": u, "post_ids": p}
        if time_name is not None:
            times = named[time_name] = _times(times, time_name)
        _check_broadcast(named)
        return u, p, times

    def author_name(self, author_id: int) -> str:
        """A handle that names the author's home topic, e.g. '@jazz_17'."""
        a = self._one(author_id, self.num_authors, "author_id")
        return f"@{self.topic_names[self.author_topics[a]]}_{a + 1}"

    # ---- the engagement model ------------------------------------------------------------------

    def _taste(self, u: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Taste of user indices u for post indices p (broadcast): topic preference and
        favourite author, in logit units before the per-action slopes."""
        c = self.config
        return c.topic_weight * self.user_topic_prefs[u, self.post_topics[p]] + (
            c.favourite_author_weight * self.user_favourite_authors[u, self.post_authors[p]]
        )

    def _affinity(self, u: np.ndarray, p: np.ndarray) -> np.ndarray:
        """The favorite logit without freshness (and without the constant base rate)."""
        fav = self.config.actions["favorite_score"]
        return fav.taste_slope * self._taste(u, p) + fav.quality_slope * self.post_quality[p]

    def _model(self, u, p, times) -> tuple[np.ndarray, np.ndarray]:
        """True probabilities [..., A] and the location of log dwell [...] (broadcast inputs)."""
        c = self.config
        u, p, times = np.broadcast_arrays(u, p, np.asarray(times, dtype=np.int64))
        taste = self._taste(u, p)
        quality = self.post_quality[p]
        # A post created after the impression time is treated as brand new.
        age = np.maximum(times - self.post_created[p], 0)
        freshness = np.exp(-age / (c.freshness_timescale_hours * SECONDS_PER_HOUR))
        drivers = np.stack([np.ones_like(taste), taste, quality, freshness], axis=-1)
        logits = drivers @ self._coefficients  # [..., A]
        probs = expit(logits) * self._media_gate[self.post_media[p]]
        dwell_mu = np.minimum(
            math.log(c.dwell_median_seconds)
            + c.dwell_taste_slope * taste
            + c.dwell_quality_slope * quality
            + c.dwell_freshness_slope * freshness
            + np.asarray(c.dwell_media_offsets)[self.post_media[p]],
            math.log(MAX_MEDIAN_DWELL_SECONDS),
        )
        # log dwell = mu + spread · Logistic(0, 1), so P(dwell > h) = sigmoid((mu − log h) / spread)
        # exactly: the dwell actions are thresholds on the same dwell that is sampled.
        for name, threshold in (
            (DWELL_SCORE_ACTION, c.dwell_score_threshold_seconds),
            (DWELL_TIME_ACTION, c.dwell_time_threshold_seconds),
        ):
            probs[..., ACTION_INDEX[name]] = expit(
                (dwell_mu - math.log(threshold)) / c.dwell_spread
            )
        return probs, dwell_mu

    def _expected_dwell(self, dwell_mu: np.ndarray) -> np.ndarray:
        s = self.config.dwell_spread
        return np.exp(dwell_mu) * (math.pi * s / math.sin(math.pi * s))  # log-logistic mean

    def _sample(self, rng, u, p, times) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sampled labels [..., A] uint8 and dwell [...] seconds, with the true probabilities
        [..., A] and the log dwell's location mu [...] they were drawn from."""
        c = self.config
        probs, dwell_mu = self._model(u, p, times)
        labels = (rng.random(probs.shape) < probs).astype(np.uint8)
        dwell = np.exp(dwell_mu + c.dwell_spread * rng.logistic(size=dwell_mu.shape))
        labels[..., ACTION_INDEX[DWELL_SCORE_ACTION]] = dwell > c.dwell_score_threshold_seconds
        labels[..., ACTION_INDEX[DWELL_TIME_ACTION]] = dwell > c.dwell_time_threshold_seconds
        return labels, dwell, probs, dwell_mu

    def true_probabilities(self, user_ids, post_ids, times) -> np.ndarray:
        """The true probability of every action, [..., A] float64, for user ids, post ids and
        impression times (unix seconds) of any broadcastable shapes [...]. A time before a
        post's creation counts as the moment of its creation (age 0): the world never serves a
        post before it exists, and its oracle never asks."""
        return self._model(*self._requests(user_ids, post_ids, times))[0]

    def expected_dwell(self, user_ids, post_ids, times) -> np.ndarray:
        """The true mean dwell in seconds, [...] float64 (shapes as in `true_probabilities`)."""
        return self._expected_dwell(self._dwell_mu(user_ids, post_ids, times))

    def median_dwell(self, user_ids, post_ids, times) -> np.ndarray:
        """The true median dwell in seconds, exp(mu) (at most MAX_MEDIAN_DWELL_SECONDS), [...]
        float64 (shapes as in `true_probabilities`)."""
        return np.exp(self._dwell_mu(user_ids, post_ids, times))

    def _dwell_mu(self, user_ids, post_ids, times) -> np.ndarray:
        return self._model(*self._requests(user_ids, post_ids, times))[1]

    def sample_engagement(self, user_ids, post_ids, times, rng) -> tuple[np.ndarray, np.ndarray]:
        """Sample actions [..., A] uint8 and dwell [...] seconds, as the world does when it serves,
        with a numpy Generator `rng` (shapes as in `true_probabilities`)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator (np.random.default_rng), got {rng!r}")
        labels, dwell, _, _ = self._sample(rng, *self._requests(user_ids, post_ids, times))
        return labels, dwell

    def affinity(self, user_ids, post_ids) -> np.ndarray:
        """A user's planted taste for posts [...]: the favorite logit without freshness and
        without the base rate (monotone in the true favorite probability at any fixed age)."""
        u, p, _ = self._requests(user_ids, post_ids, time_name=None)
        return self._affinity(u, p)

    @property
    def _coefficients(self) -> np.ndarray:
        """[4, A]: the (bias, taste, quality, freshness) coefficients of every action's logit;
        the dwell actions' columns are overwritten from the dwell model."""
        coefficients = np.zeros((4, NUM_ACTIONS))
        for name, model in self.config.actions.items():
            coefficients[:, ACTION_INDEX[name]] = (
                _logit(model.base_rate),
                model.taste_slope,
                model.quality_slope,
                model.freshness_slope,
            )
        return coefficients

    @property
    def _media_gate(self) -> np.ndarray:
        """[len(MEDIA_KINDS), A]: 1 where the action can happen on the media kind, else 0."""
        gate = np.ones((len(MEDIA_KINDS), NUM_ACTIONS))
        for name, kind in MEDIA_ONLY_ACTIONS.items():
            gate[:, ACTION_INDEX[name]] = [k == kind for k in MEDIA_KINDS]
        return gate

    # ---- histories -----------------------------------------------------------------------------

    def _keys(self, u: np.ndarray, times: np.ndarray) -> np.ndarray:
        shifted = np.clip(times - self.config.start_time + _KEY_TIME_SHIFT, 0, _KEY_STRIDE - 1)
        return u.astype(np.int64) * _KEY_STRIDE + shifted

    def _history(self, u: np.ndarray, times: np.ndarray) -> History:
        """The last S engagements of user indices u [N] strictly before times [N]."""
        S = self.config.history_len
        num_engagements = len(self._engagement_keys)
        end = np.searchsorted(self._engagement_keys, self._keys(u, times), side="left")
        first_of_user = np.searchsorted(self._engagement_keys, u.astype(np.int64) * _KEY_STRIDE)
        length = np.minimum(end - first_of_user, S)
        valid = np.arange(S) < length[:, None]  # [N, S]
        # Padding slots read the all-zero row kept after the last engagement.
        rows = np.where(valid, (end - length)[:, None] + np.arange(S), num_engagements)
        return History(
            post_ids=self._engagement_post_ids[rows],
            author_ids=self._engagement_author_ids[rows],
            actions=self._engagement_actions[rows],
            dwell=self._engagement_dwell[rows],
            times=self._engagement_times[rows],
        )

    def history(self, user_ids, times) -> History:
        """The last S engagements of each user strictly before each time; user_ids, times [N]."""
        u = self._index(np.atleast_1d(user_ids), self.num_users, "user_ids")
        times = _times(np.atleast_1d(times))
        if u.ndim != 1 or times.shape != u.shape:
            raise ValueError(
                f"user_ids and times must be [N] each, got {list(u.shape)} and {list(times.shape)}"
            )
        return self._history(u, times)

    def _user_history(self, user_id: int, time: int) -> History:
        """`history` of one user at one time, each checked as one."""
        u = self._one(user_id, self.num_users, "user_id")
        return self._history(np.array([u]), np.array([_time(time)]))

    def user_sequence(self, user_id: int, time: int) -> dict:
        """The user's history before `time` in the pipeline's JSON format (oldest first), with
        the request time and each engagement's dwell (the second release's ranker reads both):
        {"user_id", "request_time", "history": [{"post_id", "author_id", "actions": {"<index>":
        1.0}, "dwell_time"}]}."""
        h = self._user_history(user_id, time)
        items = []
        for s in np.flatnonzero(h.post_ids[0]):
            actions = {str(int(a)): 1.0 for a in np.flatnonzero(h.actions[0, s])}
            items.append(
                {
                    "post_id": int(h.post_ids[0, s]),
                    "author_id": int(h.author_ids[0, s]),
                    "actions": actions,
                    "dwell_time": round(float(h.dwell[0, s]), 3),
                }
            )
        return {"user_id": int(user_id), "request_time": int(time), "history": items}

    # ---- retrieval oracle and baseline ---------------------------------------------------------

    def serving_window(self, times) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) [...]: the indices of the posts served at each time, post_created
        [start:end]. They are the posts created in the serving window before it, widened back
        to the serving pool's size where fewer than that were created in the window (a thin
        stretch of time, early in a small world)."""
        return self._serving_window(_times(times, "times"))

    def _serving_window(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start, end = self._window(times, self.config.serving_window_hours)
        return np.clip(end - self.config.serving_pool_size, 0, start), end

    def _window(self, times: np.ndarray, hours: float) -> tuple[np.ndarray, np.ndarray]:
        """(start, end): the indices of the posts created in the `hours` before each time."""
        end = np.searchsorted(self.post_created, times, side="left")  # created strictly before
        start = np.searchsorted(self.post_created, times - float(hours) * SECONDS_PER_HOUR)
        return start, end

    def servable(self, post_ids, times) -> np.ndarray:
        """Whether posts could be served at the times (broadcast): in the serving window
        before them, as `recent_posts` lists them."""
        p, times = self._index(post_ids, self.num_posts, "post_ids"), _times(times)
        _check_broadcast({"post_ids": p, "times": times})
        return self._servable(p, times)

    def _servable(self, p: np.ndarray, times: np.ndarray) -> np.ndarray:
        start, end = self._serving_window(times)
        return (start <= p) & (p < end)

    def oracle_scores(self, user_ids, post_ids, query_times) -> np.ndarray:
        """The retrieval oracle's score [...] of each post for a user at a query time: what
        the world knows about the next favorite. Posts the world could serve then (in the
        serving window before the query, `serving_window`) come first, by their true favorite
        probability at that time; every other post after them, by the same probability."""
        u, p, times = self._requests(user_ids, post_ids, query_times, "query_times")
        probability = self._model(u, p, times)[0][..., FAVORITE]
        return probability + self._servable(p, times)  # probabilities < 1: servable first

    def _rank(self, examples: RetrievalExamples, k: int, scores) -> np.ndarray:
        """Post ids [N, k] by `scores(user_ids [n, 1], post_ids [1, P], times [n, 1])`, best
        first, each query's history excluded; k capped at P − S."""
        if not isinstance(examples, RetrievalExamples):
            raise TypeError(f"examples must be RetrievalExamples, got {type(examples).__name__}")
        if not is_integer(k) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        k = min(k, self.num_posts - examples.history.post_ids.shape[1])
        out = np.zeros((len(examples), k), np.int64)
        every_post = np.arange(1, self.num_posts + 1)
        for lo in range(0, len(examples), _ORACLE_CHUNK):
            hi = lo + _ORACLE_CHUNK
            users, times = examples.user_ids[lo:hi, None], examples.query_times[lo:hi, None]
            chunk = scores(users, every_post[None, :], times)
            chunk = np.broadcast_to(chunk, (len(users), self.num_posts)).astype(np.float64)
            out[lo:hi] = top_k_unseen(chunk, examples.history.post_ids[lo:hi], k)
        return out

    def oracle_ranking(self, examples: RetrievalExamples, k: int = 100) -> np.ndarray:
        """Post ids [N, k] of the whole corpus by `oracle_scores` for each query, best first,
        with the query's history excluded (what a model that knew the world would return).
        k is capped at P − S, so that every row has k posts outside the history."""
        return self._rank(examples, k, self.oracle_scores)

    def popularity_ranking(
        self, examples: RetrievalExamples, k: int = 100, recent: bool = False
    ) -> np.ndarray:
        """Post ids [N, k] by favorite count in the training requests (ties: lower id first),
        with each query's history excluded (the popularity baseline); with `recent`, the posts
        servable at the query time first (a trending baseline). k is capped at P − S."""
        if not isinstance(recent, bool | np.bool_):  # "no" would read as true
            raise TypeError(f"recent must be True or False, got {recent!r}")
        counts = self.favorite_counts / (self.favorite_counts.max() + 1.0)  # < 1

        def scores(users, posts, times):
            servable = self.servable(posts, times) if recent else 0.0
            # Ties by lower id: a tiny decreasing offset keeps a stable order.
            return counts[posts - 1] + servable - posts * 1e-12

        return self._rank(examples, k, scores)

    # ---- words ---------------------------------------------------------------------------------

    def describe_user(self, user_id: int) -> str:
        """The user's planted taste in words."""
        u = self._one(user_id, self.num_users, "user_id")
        prefs = self.user_topic_prefs[u]
        liked = sorted(np.flatnonzero(prefs), key=lambda t: -prefs[t])
        topics = ", ".join(f"{self.topic_names[t]} ({prefs[t]:.2f})" for t in liked)
        authors = ", ".join(
            self.author_name(a + 1) for a in np.flatnonzero(self.user_favourite_authors[u])
        )
        authors = authors or "none"
        return (
            f"user {u + 1} likes {topics}; favourite authors: {authors}; "
            f"activity {self.user_activity[u]:.2f}"
        )

    def describe_post(self, post_id: int, time: int | None = None) -> str:
        """The post's topic, author, media, quality and age at `time` (unix seconds), or its
        creation date when no time is given."""
        p = self._one(post_id, self.num_posts, "post_id")
        created = int(self.post_created[p])
        if time is None:
            when = datetime.datetime.fromtimestamp(created, datetime.UTC).strftime(
                "created %Y-%m-%d %H:%M UTC"
            )
        else:
            hours = (int(_time(time)) - created) / SECONDS_PER_HOUR
            span = f"{abs(hours):.1f} h" if abs(hours) < 48 else f"{abs(hours) / 24:.1f} days"
            when = f"{span} old" if hours >= 0 else f"created {span} after that time"
        return (
            f"post {p + 1}: {self.topic_names[self.post_topics[p]]} by "
            f"{self.author_name(self.post_authors[p] + 1)}, {MEDIA_KINDS[self.post_media[p]]}, "
            f"quality {self.post_quality[p]:+.2f}, {when}"
        )

    def in_taste(self, user_id: int, post_ids) -> np.ndarray:
        """[...] bool: whether each post is on a topic the user likes or by a favourite author."""
        u = self._one(user_id, self.num_users, "user_id")
        p = self._index(post_ids, self.num_posts, "post_ids")
        return (self.user_topic_prefs[u, self.post_topics[p]] > 0) | (
            self.user_favourite_authors[u, self.post_authors[p]]
        )

    def describe_history(self, user_id: int, time: int) -> str:
        """The topics of the user's history before `time`, most frequent first."""
        ids = self._user_history(user_id, time).post_ids[0]
        ids = ids[ids > 0]
        counts = np.bincount(self.post_topics[ids - 1], minlength=len(self.topic_names))
        order = [t for t in np.argsort(-counts, kind="stable") if counts[t]]
        topics = ", ".join(f"{self.topic_names[t]} {counts[t]}" for t in order)
        return f"their last {len(ids)} engagements: {topics or 'none'}"

    def recent_posts(self, time: int, hours: float | None = None) -> np.ndarray:
        """Ids of the posts created in the `hours` before `time`, oldest first; by default
        those of the serving window (`serving_window`): what a request at `time` is served
        from."""
        time = _time(time)
        if hours is None:
            start, end = self._serving_window(time)
        elif _real(hours) and hours >= 0:
            start, end = self._window(time, hours)
        else:
            raise ValueError(f"hours must be a finite number >= 0, got {hours!r}")
        return np.arange(start, end, dtype=np.int64) + 1

    def unseen_recent_posts(self, user_id: int, time: int) -> np.ndarray:
        """`recent_posts(time)` without the posts in the user's history at `time`."""
        history = self._user_history(user_id, time)
        posts = self.recent_posts(time)
        return posts[~np.isin(posts, history.post_ids[0])]

    def corpus(self) -> dict[str, np.ndarray]:
        """Every post, by id: post_ids, author_ids, topics (index into topic_names),
        creation_times, media (index into MEDIA_KINDS); each [P] int64."""
        return {
            "post_ids": np.arange(1, self.num_posts + 1, dtype=np.int64),
            "author_ids": self.post_authors.astype(np.int64) + 1,
            "topics": self.post_topics.astype(np.int64),
            "creation_times": self.post_created.astype(np.int64),
            "media": self.post_media.astype(np.int64),
        }


# ---- building ------------------------------------------------------------------------------------


def _zipf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def _plant(config: WorldConfig, rng: np.random.Generator) -> World:
    """Topics, authors, posts and users, with their planted tastes."""
    c = config
    T, Na, P, Nu = c.num_topics, c.num_authors, c.num_posts, c.num_users
    names = tuple(TOPIC_NAMES[:T]) + tuple(f"topic{t}" for t in range(len(TOPIC_NAMES), T))
    popularity = _zipf(T, c.topic_popularity_exponent)

    # Every topic gets one author; the rest follow the topics' popularity.
    author_topics = np.concatenate([np.arange(T), rng.choice(T, size=Na - T, p=popularity)])
    author_quality = rng.standard_normal(Na)
    output = rng.lognormal(0.0, c.author_output_sigma, size=Na)

    post_authors = rng.choice(Na, size=P, p=output / output.sum())
    off_topic = rng.random(P) >= c.home_topic_probability
    post_topics = np.where(off_topic, rng.integers(0, T, size=P), author_topics[post_authors])
    span = c.span_days * SECONDS_PER_DAY
    post_created = np.sort(c.start_time + (rng.random(P) * span).astype(np.int64))
    r = c.author_quality_share
    post_quality = math.sqrt(r) * author_quality[post_authors] + math.sqrt(1 - r) * (
        rng.standard_normal(P)
    )
    post_media = rng.choice(len(MEDIA_KINDS), size=P, p=np.asarray(c.media_probabilities))

    # Liked topics: distinct, by popularity (Gumbel top-k), 1..max of them, Dirichlet weights.
    num_liked = rng.integers(c.min_liked_topics, c.max_liked_topics + 1, size=Nu)
    keys = np.log(popularity) + rng.gumbel(size=(Nu, T))
    liked = np.argsort(-keys, axis=1)[:, : c.max_liked_topics]  # [Nu, L]
    weights = rng.exponential(size=liked.shape) * (
        np.arange(c.max_liked_topics) < num_liked[:, None]
    )
    weights /= weights.sum(axis=1, keepdims=True)
    prefs = np.zeros((Nu, T))
    np.put_along_axis(prefs, liked, weights, axis=1)

    # Favourite authors: mostly a random author of a liked topic (picked by weight), else any.
    F = c.favourite_authors_per_user
    by_topic = np.argsort(author_topics, kind="stable")  # author indices grouped by topic
    topic_start = np.searchsorted(author_topics[by_topic], np.arange(T))
    topic_count = np.bincount(author_topics, minlength=T)
    cumulative = np.cumsum(prefs, axis=1)
    topic = (rng.random((Nu, F, 1)) > cumulative[:, None, :]).sum(axis=-1).clip(max=T - 1)
    in_topic = by_topic[topic_start[topic] + (rng.random((Nu, F)) * topic_count[topic]).astype(int)]
    in_taste = rng.random((Nu, F)) < c.favourite_in_taste_probability
    favourites = np.where(in_taste, in_topic, rng.integers(0, Na, size=(Nu, F)))
    favourite_mask = np.zeros((Nu, Na), bool)
    favourite_mask[np.arange(Nu)[:, None], favourites] = True

    activity = rng.lognormal(-0.5 * c.activity_sigma**2, c.activity_sigma, size=Nu)
    return World(
        config=c,
        topic_names=names,
        author_topics=author_topics,
        author_quality=author_quality,
        post_authors=post_authors,
        post_topics=post_topics,
        post_created=post_created,
        post_quality=post_quality,
        post_media=post_media,
        user_topic_prefs=prefs,
        user_favourite_authors=favourite_mask,
        user_activity=activity,
    )


def top_k_unseen(scores: np.ndarray, history_ids: np.ndarray, k: int) -> np.ndarray:
    """Post ids [Q, k] (post id = column + 1) of the k best `scores` [Q, P] of each query, best
    first (ties: the stable order of `argpartition`'s picks), the query's history ids [Q, S]
    (0 = padding) excluded. Writes -inf into `scores` at the history."""
    if not isinstance(scores, np.ndarray):  # it is written into
        raise TypeError(f"scores must be a numpy array [Q, P], got {type(scores).__name__}")
    if scores.ndim != 2 or scores.dtype.kind != "f":
        raise ValueError(f"scores must be a float array [Q, P], got {_described(scores)}")
    history_ids = np.asarray(history_ids)
    if (
        history_ids.ndim != 2
        or len(history_ids) != len(scores)
        or history_ids.dtype.kind not in "iu"
    ):
        raise ValueError(
            f"history_ids must be integers [Q={len(scores)}, S], got {_described(history_ids)}"
        )
    if history_ids.size and (history_ids.min() < 0 or history_ids.max() > scores.shape[1]):
        raise ValueError(f"history_ids must be post ids in [0, {scores.shape[1]}] (0: padding)")
    if not (is_integer(k) and 1 <= k <= scores.shape[1]):
        raise ValueError(f"k must be an integer in [1, {scores.shape[1]}], got {k!r}")
    rows = np.broadcast_to(np.arange(len(scores))[:, None], history_ids.shape)
    seen = history_ids > 0
    scores[rows[seen], history_ids[seen] - 1] = -np.inf
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1) + 1


def _described(value) -> str:
    """An argument's kind, and its shape and dtype if it is an array."""
    if isinstance(value, np.ndarray):
        return f"{list(value.shape)} {value.dtype}"
    return type(value).__name__


def _schedule(world: World, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Requests sorted by (user, time): user indices [R], times [R] (strictly increasing per
    user), and whether each is held out [R]."""
    c = world.config
    counts = np.clip(
        np.rint(c.mean_requests_per_user * world.user_activity),
        c.min_requests_per_user,
        c.max_requests_per_user,
    ).astype(np.int64)
    users = np.repeat(np.arange(world.num_users), counts)
    lo = c.start_time + c.warmup_days * SECONDS_PER_DAY
    hi = c.start_time + c.span_days * SECONDS_PER_DAY
    times = (lo + rng.random(len(users)) * (hi - lo)).astype(np.int64)
    order = np.lexsort((times, users))
    users, times = users[order], times[order]
    # Adding the rank within the user makes equal times distinct and keeps the order.
    rank = np.arange(len(users)) - np.repeat(np.cumsum(counts) - counts, counts)
    times = times + rank
    is_eval = rank >= np.repeat(counts - c.eval_requests_per_user, counts)
    return users, times, is_eval


def _serve(world: World, rng: np.random.Generator, users: np.ndarray, times: np.ndarray):
    """Candidate post indices [R, C] for each request: part in-taste, part random, shuffled."""
    c = world.config
    R, K, C = len(users), c.serving_pool_size, c.num_candidates
    start, end = world._serving_window(times)
    if R and (end - start).min() < K:
        raise ValueError(
            f"a request would have fewer than {K} posts (serving_pool_size) created before "
            "it; the world needs more posts (num_posts) or a longer warmup (warmup_days)"
        )
    # One post from each of K equal strata of the window: distinct posts, spread over its ages.
    n = (end - start)[:, None]
    k = np.arange(K)
    stratum_lo = start[:, None] + k * n // K
    stratum_hi = start[:, None] + (k + 1) * n // K
    pool = stratum_lo + (rng.random((R, K)) * (stratum_hi - stratum_lo)).astype(np.int64)

    num_taste = int(round(c.in_taste_fraction * C))
    score = world._affinity(users[:, None], pool) / c.serving_temperature + rng.gumbel(size=(R, K))
    taste_slots = np.argsort(-score, axis=1)[:, :num_taste]
    rest = rng.random((R, K))
    np.put_along_axis(rest, taste_slots, 2.0, axis=1)  # already taken: sort last
    random_slots = np.argsort(rest, axis=1)[:, : C - num_taste]
    slots = np.concatenate([taste_slots, random_slots], axis=1)
    # Shuffle so that a candidate's position says nothing about why it was served.
    slots = np.take_along_axis(slots, np.argsort(rng.random((R, C)), axis=1), axis=1)
    return np.take_along_axis(pool, slots, axis=1)


def build_world(config: WorldConfig | None = None) -> World:
    """Plant the world, serve every request, sample the actions and build the examples.

    Histories hold everything engaged before the request, so a user's later held-out request
    sees the engagements of the earlier one, as it would when served.
    """
    c = WorldConfig() if config is None else config
    if not isinstance(c, WorldConfig):
        raise TypeError(f"config must be a WorldConfig (or None), got {type(c).__name__}")
    try:
        return _build(c)
    except MemoryError:  # (train.py checks memory_bytes against the memory available first)
        raise MemoryError(
            f"building a world of {c.num_users:,} users, {c.num_posts:,} posts and "
            f"{c.num_authors:,} authors ran out of memory; it would need about "
            f"{c.memory_bytes() / 2**30:.1f} GiB (WorldConfig.memory_bytes)"
        ) from None


def _build(c: WorldConfig) -> World:
    plant_rng, schedule_rng, serve_rng, action_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(c.seed).spawn(4)
    )
    world = _plant(c, plant_rng)
    users, times, is_eval = _schedule(world, schedule_rng)
    candidates = _serve(world, serve_rng, users, times)  # [R, C] post indices
    labels, dwell, probs, dwell_mu = world._sample(
        action_rng, users[:, None], candidates, times[:, None]
    )

    # Engagements in (user, time, slot) order: nonzero walks requests, already in that order.
    positive = [ACTION_INDEX[name] for name in POSITIVE_ACTIONS]
    request, slot = np.nonzero(labels[..., positive].any(axis=-1))
    posts = candidates[request, slot]

    def padded(values: np.ndarray, dtype) -> np.ndarray:
        return np.concatenate([values, np.zeros((1, *values.shape[1:]))]).astype(dtype)

    world._engagement_post_ids = padded(posts + 1, np.int64)
    world._engagement_author_ids = padded(world.post_authors[posts] + 1, np.int64)
    world._engagement_times = padded(times[request], np.int64)
    world._engagement_actions = padded(labels[request, slot], np.uint8)
    world._engagement_dwell = padded(dwell[request, slot], np.float32)
    world._engagement_keys = world._keys(users[request], times[request])

    history = world._history(users, times)
    ranking = RankingExamples(
        user_ids=users + 1,
        request_times=times,
        history=history,
        candidate_post_ids=candidates + 1,
        candidate_author_ids=world.post_authors[candidates] + 1,
        candidate_creation_times=world.post_created[candidates],
        labels=labels,
        dwell=dwell.astype(np.float32),
        probabilities=probs.astype(np.float32),
        expected_dwell=world._expected_dwell(dwell_mu).astype(np.float32),
        median_dwell=np.exp(dwell_mu).astype(np.float32),
    )
    world.ranking_train = take_rows(ranking, ~is_eval)
    world.ranking_eval = take_rows(ranking, is_eval)

    favorite = labels[..., FAVORITE] == 1
    world.favorite_counts = np.bincount(
        candidates[~is_eval][favorite[~is_eval]], minlength=world.num_posts
    )
    # One retrieval example per favorite, dropping those whose post is already in the history:
    # the world serves a request without regard to past engagements, so a post may come again
    # (17.8 % of the default world's training favorites).
    request, slot = np.nonzero(favorite)
    target = candidates[request, slot] + 1
    fav_history = take_rows(history, request)
    fresh = ~(fav_history.post_ids == target[:, None]).any(axis=1)
    retrieval = RetrievalExamples(
        user_ids=users[request] + 1,
        query_times=times[request],
        history=fav_history,
        target_post_ids=target,
        target_author_ids=world.post_authors[target - 1] + 1,
    )
    world.retrieval_train = take_rows(retrieval, fresh & ~is_eval[request])
    held_out = np.flatnonzero(fresh & is_eval[request])
    # Rows are in (user, time, slot) order, so the first row of each user is its first favorite.
    _, first = np.unique(users[request[held_out]], return_index=True)
    world.retrieval_eval = take_rows(retrieval, held_out[first])
    return world
