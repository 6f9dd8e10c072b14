"""Train the ranking and the retrieval model on the synthetic world, evaluate both against the
world's oracle, and export them in the published artifacts layout.

    uv run train.py --out runs/default            # both models, the default world (5 to 10 min)
    uv run train.py --out runs/smoke --quick       # a smoke run of about a minute (a tiny world)
    uv run train.py --out runs/r --model ranker --steps 1000 --resume  # on to step 1000

The ranker learns multi-label sigmoid cross-entropy over the 19 actions plus a regression of
the dwell time (the second release's continuous head, loss as `ContinuousActionConfig` says);
the retrieval model learns a softmax over in-batch and sampled global negatives with log-Q
correction and a learned temperature, the positive being the post the user favorited next.
Embedding tables are parameters, looked up with the published hash functions. Optax AdamW with
warmup, cosine decay and clipping; updates whose gradient norm is not finite are skipped and
counted (ten in a row stop the run);
one jitted step, data-parallel over the devices of a mesh. The state (parameters, optimiser,
step) is saved as npz beside the run, so that `--resume` continues exactly where it stopped.

In DIR: `artifacts/` (published layout: `uv run run_pipeline.py --artifacts_dir DIR/artifacts`
serves it), `eval.json` and `eval_predictions.npz` (what the metrics were computed from),
`training_curves.png`, `auroc.png`, `calibration.png`, `demo_checkpoint.npz` (what the demos
load) and `state/`.
"""

from __future__ import annotations

import cli  # before the slow imports below, so that a Ctrl-C among them ends quietly

if __name__ == "__main__":
    cli.quiet_interrupts("train.py")

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import metrics
import world as world_lib
from checkpoint import (
    DEFAULT_CORPUS_FILE,
    DEFAULT_SEQUENCE_FILE,
    LOG_TEMPERATURE,
    PARTIAL,
    Corpus,
    ModelArtifacts,
    as_path,
    atomic_path,
    check_config_json,
    check_params,
    config_to_json,
    configs_from_json,
    flatten_params,
    named_by,
    param_shapes,
    read_npz,
    require_file,
    unflatten_params,
    write_artifacts,
    write_json,
    write_npz,
)
from cli import (
    ArgumentParser,
    file_in_a_folder,
    non_negative_int,
    positive_float,
    positive_int,
    reuse_freed_memory,
    run_main,
    seed_int,
)
from grok import FLOAT32_MAX, TransformerConfig
from recsys_model import (
    ACTIONS,
    CONTINUOUS_LOSS_TYPES,
    DWELL_TIME_COLUMN,
    ContinuousActionConfig,
    HashConfig,
    NormConfig,
    PhoenixModelConfig,
    RecsysBatch,
    denormalize_continuous_value,
    dummy_inputs,
    is_integer,
    is_number,
    normalize_continuous_value,
)
from recsys_retrieval_model import PhoenixRetrievalModelConfig
from runners import check_memory
from tables import TABLE_NAMES, Hashing, init_tables, lookup

MODELS = ("ranker", "retrieval")
MODEL_CONFIGS = {"ranker": PhoenixModelConfig, "retrieval": PhoenixRetrievalModelConfig}
FAVORITE = ACTIONS.index("favorite_score")
# A temperature of 0.05 for unit vectors, as HSTU and the forks use; learned from there, kept
# within [0.01, 1].
INITIAL_LOG_TEMPERATURE = math.log(0.05)
LOG_TEMPERATURE_RANGE = (math.log(0.01), 0.0)
# Retrieval is measured on the best 100 posts of each query (and keeps that many).
RETRIEVAL_K = 100


# ---------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------


# Settings of TrainConfig that only the other model reads: a saved state is not held to them.
OTHER_MODELS_SETTINGS = {
    "ranker": ("negatives",),
    "retrieval": ("dwell_loss_weight", "dwell_loss", "dwell_norm_seconds"),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How one model is trained (`for_model` gives each model's defaults)."""

    steps: int = 2200  # where this run stops (a resumed run may go further)
    decay_steps: int = 2200  # the learning rate's schedule, independent of where a run stops
    batch_size: int = 64  # requests (ranker) or queries (retrieval) per step
    learning_rate: float = 5e-3  # of the model's parameters (AdamW)
    table_learning_rate: float = 3e-2  # of the embedding tables
    table_optimizer: str = "adam"  # or "adagrad", "rowwise_adagrad"
    warmup_steps: int = 50
    final_learning_rate_fraction: float = 0.05
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    # Embedding tables start normal with this standard deviation.
    table_scale: float = 0.05
    # Retrieval: global negatives per batch, drawn uniformly from the corpus. Few: the held-out
    # targets are recent posts, told apart from other recent posts, and negatives drawn from
    # the whole month teach mostly that old posts are unlikely (recall@100 on the default world,
    # measured side by side with an earlier version: 0.629 with 64, 0.610 with 128, 0.582 with
    # 512, 0.545 with 2,048; 0.626 with none; 0.627 with 64 in this version's default run).
    negatives: int = 64
    # Ranker: the dwell regression's weight and loss (see ContinuousActionConfig).
    dwell_loss_weight: float = 1.0
    dwell_loss: str = "mse"
    dwell_norm_seconds: float = 60.0
    eval_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        world_lib.plain_numbers(self)

    @classmethod
    def for_model(cls, kind: str, quick: bool = False) -> TrainConfig:
        """The defaults of `kind` on the default world, or (quick) on the tiny one."""
        if kind not in MODELS:
            raise ValueError(f"kind: {kind!r}; expected one of {', '.join(MODELS)}")
        if quick:
            return cls(steps=30, decay_steps=30, batch_size=32, warmup_steps=5, eval_every=15)
        if kind == "retrieval":
            return cls(
                steps=500, decay_steps=500, batch_size=256, table_learning_rate=5e-2,
                eval_every=125,
            )  # fmt: skip
        return cls()

    @classmethod
    def quick(cls) -> TrainConfig:
        return cls.for_model("ranker", quick=True)


def transformer_config(kind: str) -> TransformerConfig:
    """The demo configuration of `kind`: 2 layers of 2 heads, widening 2; D 128 (heads of 64)
    for the ranker, D 64 (heads of 32) for retrieval, whose recall on the default world is the
    same within its sampling error at half the width (recall@100 0.582 against 0.597 with D 128
    and 0.578 with D 96, all with 512 negatives) and whose steps take half as long. The output
    multiplier stays 0.125 for both: the published pipeline does not read it from
    `config.json`."""
    if kind not in MODELS:
        raise ValueError(f"kind: {kind!r}; expected one of {', '.join(MODELS)}")
    d, key = (128, 64) if kind == "ranker" else (64, 32)
    return TransformerConfig(d, key, 2, 2, 2, widening_factor=2.0, attn_output_multiplier=0.125)


def model_configs(
    world_config: world_lib.WorldConfig, train: TrainConfig
) -> tuple[PhoenixRetrievalModelConfig, PhoenixModelConfig]:
    """Both models for a world: its history length and candidates per request, float32, the
    second release's ranker (dwell time, post age) with right-anchored positions."""
    common = dict(
        history_seq_len=world_config.history_len,
        candidate_seq_len=world_config.num_candidates,
        fprop_dtype=jnp.float32,
        hash_config=HashConfig(),
    )
    continuous = ContinuousActionConfig(
        loss_weight=train.dwell_loss_weight,
        loss_type=train.dwell_loss,
        norm_config=NormConfig(train.dwell_norm_seconds),
    )
    ranker = PhoenixModelConfig(
        transformer_config("ranker"),
        release=2,
        right_anchored_rope=True,
        continuous_action_config=continuous,
        **common,
    )
    return PhoenixRetrievalModelConfig(transformer_config("retrieval"), **common), ranker


# Rows per entity of each table: with two hashes per entity, a table of as many rows as
# entities shares every row between about two of them; more rows, fewer collisions. Posts get
# the most: the newest, seen least in training, are what held-out requests show, and a row
# they share with an older post carries what was learned of that one.
TABLE_ROWS_PER_ENTITY = {"user": 4, "item": 8, "author": 4}
ENTITY_NOUNS = {"user": "users", "item": "posts", "author": "authors"}


def hashing_for(world: world_lib.World, hash_config: HashConfig, seed: int) -> Hashing:
    """Hash functions into tables sized by `TABLE_ROWS_PER_ENTITY` (row 0 is padding), each
    spreading the world's ids at least as well as random hashes would."""
    return Hashing.random(
        hash_config, table_rows(world.config), seed, num_ids=id_counts(world.config)
    )


def table_rows(world_config: world_lib.WorldConfig) -> dict[str, int]:
    """Rows of each entity's table for a world (row 0 is padding), keyed as the tables are."""
    return {k: n * TABLE_ROWS_PER_ENTITY[k] + 1 for k, n in id_counts(world_config).items()}


def id_counts(world_config: world_lib.WorldConfig) -> dict[str, int]:
    """Ids per entity of a world (each entity's ids are 1..n), keyed as the tables are."""
    c = world_config
    return {"user": c.num_users, "item": c.num_posts, "author": c.num_authors}


# ---------------------------------------------------------------------------------------------
# Data: the world's examples as hashed arrays, batches drawn by step.
# ---------------------------------------------------------------------------------------------


def history_fields(history: world_lib.History, hashing: Hashing, config) -> dict:
    """A history's batch fields for `config`; the dwell column only for the ranker, which
    reads it."""
    fields = dict(
        history_post_hashes=hashing.item(history.post_ids),
        history_author_hashes=hashing.author(history.author_ids),
        history_actions=history.actions,  # uint8, made float32 per batch
        history_product_surface=np.zeros(history.post_ids.shape, np.int32),
    )
    if isinstance(config, PhoenixModelConfig):
        continuous = np.zeros((*history.dwell.shape, config.num_continuous_actions), np.float32)
        continuous[..., DWELL_TIME_COLUMN] = history.dwell
        fields["history_continuous_actions"] = continuous
    return fields


def ranking_arrays(examples: world_lib.RankingExamples, hashing: Hashing, config) -> dict:
    """Every field a ranking batch needs, [N, ...] numpy, plus labels [N, C, A] and dwell
    [N, C] seconds."""
    c = examples.candidate_post_ids.shape[1]
    return dict(
        user_hashes=hashing.user(examples.user_ids),
        **history_fields(examples.history, hashing, config),
        candidate_post_hashes=hashing.item(examples.candidate_post_ids),
        candidate_author_hashes=hashing.author(examples.candidate_author_ids),
        candidate_product_surface=np.zeros(examples.candidate_post_ids.shape, np.int32),
        candidate_impr_ts=np.repeat(examples.request_times[:, None], c, axis=1),
        candidate_post_creation_ts=examples.candidate_creation_times,
        labels=examples.labels,
        dwell=examples.dwell,
    )


def request_arrays(
    world: world_lib.World, hashing: Hashing, config, user_id: int, time: int, post_ids
) -> dict:
    """The ranking fields [1, ...] of one request: the user's history before `time` and the
    posts `post_ids` [C] as candidates shown at `time`."""
    post_ids = np.asarray(post_ids, np.int64)
    history = world.history([user_id], [time])
    fields = history_fields(history, hashing, config)
    fields["history_actions"] = fields["history_actions"].astype(np.float32)
    return dict(
        user_hashes=hashing.user([user_id]),
        **fields,
        candidate_post_hashes=hashing.item(post_ids[None]),
        candidate_author_hashes=hashing.author(world.post_authors[post_ids - 1][None] + 1),
        candidate_product_surface=np.zeros((1, len(post_ids)), np.int32),
        candidate_impr_ts=np.full((1, len(post_ids)), time, np.int64),
        candidate_post_creation_ts=world.post_created[post_ids - 1][None],
    )


def retrieval_arrays(examples: world_lib.RetrievalExamples, hashing: Hashing) -> dict:
    """Queries (user and history hashes [N, ...]) and their targets (post ids, and hashes)."""
    return dict(
        user_hashes=hashing.user(examples.user_ids),
        **history_fields(examples.history, hashing, None),
        target_ids=examples.target_post_ids,
        target_post_hashes=hashing.item(examples.target_post_ids),
        target_author_hashes=hashing.author(examples.target_author_ids),
    )


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of step `step`: epochs of a fresh permutation each, from the seed alone,
    so that a resumed run draws exactly the batches an uninterrupted one would."""
    for name, value, least in (("n", n, 1), ("batch_size", batch_size, 1), ("step", step, 0)):
        if not is_integer(value) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) exceeds the {n} examples")
    per_epoch = max(1, n // batch_size)
    epoch, position = divmod(step, per_epoch)
    return _epoch_order(n, seed, epoch)[position * batch_size : (position + 1) * batch_size]


@functools.lru_cache(maxsize=1)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The examples of an epoch in the order its steps take them (drawn once per epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def take(arrays: dict, index: np.ndarray) -> dict:
    out = {k: v[index] for k, v in arrays.items()}
    if "history_actions" in out:
        out["history_actions"] = out["history_actions"].astype(np.float32)
    if "labels" in out:
        out["labels"] = out["labels"].astype(np.float32)
    return out


def check_data(arrays: dict, what: str) -> None:
    """Refuses data holding NaN or infinity, in one line naming the field and the first place."""
    for name, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            where = np.argwhere(~np.isfinite(value))[0].tolist()
            raise ValueError(
                f"{what} data: {name} holds {value[tuple(where)]} at {where}; "
                "expected finite values"
            )


def _per_config(build: Callable) -> Callable:
    """Memoises `build(config, *args)` by the config's value (configs are not hashable): what
    it builds (a jitted function, a world) is built once per config in a process, so that every
    later run reuses what was compiled or sampled. Built eagerly even when first asked for
    inside a trace (`jax.eval_shape`), so that no tracer is kept for later calls."""
    cache: dict = {}

    @functools.wraps(build)
    def cached(config, *args):
        key = (repr(config), *map(repr, args))
        if key not in cache:
            with jax.ensure_compile_time_eval():
                cache[key] = build(config, *args)
        return cache[key]

    return cached


# ---------------------------------------------------------------------------------------------
# Models and losses.
# ---------------------------------------------------------------------------------------------


def ranking_batch(arrays: dict) -> RecsysBatch:
    return RecsysBatch(**{f: arrays[f] for f in RecsysBatch._fields if f in arrays})


# The Huber loss's switch from squared to absolute error, on the normalised [0, 1] scale (6 s of
# dwell at the 60 s scale `train.py` trains with); `ContinuousActionConfig` has no field for it.
HUBER_DELTA = 0.1


def continuous_loss(prediction: jax.Array, target: jax.Array, config: ContinuousActionConfig):
    """Per-element loss of the continuous head (predictions and targets in [0, 1]; "huber"
    switches from squared to absolute error at `HUBER_DELTA`)."""
    error = prediction - target
    if config.loss_type == "mae":
        return jnp.abs(error)
    if config.loss_type == "mse":
        return jnp.square(error)
    if config.loss_type == "huber":
        return optax.huber_loss(prediction, target, delta=HUBER_DELTA)
    if config.loss_type == "tweedie":
        p, mu = config.tweedie_power, jnp.maximum(prediction, 1e-6)
        return -target * mu ** (1 - p) / (1 - p) + mu ** (2 - p) / (2 - p)
    raise ValueError(f"loss_type must be one of {CONTINUOUS_LOSS_TYPES}, got {config.loss_type!r}")


@_per_config
def make_ranker_loss(config: PhoenixModelConfig) -> Callable:
    forward = hk.transform(lambda batch, emb: config.make()(batch, emb))
    action_config = config.continuous_action_config

    def loss(params, arrays):
        batch = ranking_batch(arrays)
        out = forward.apply(params["model"], None, batch, lookup(params["tables"], batch))
        valid = (batch.candidate_post_hashes[:, :, 0] != 0).astype(jnp.float32)
        ce = optax.sigmoid_binary_cross_entropy(out.logits.astype(jnp.float32), arrays["labels"])
        ce = jnp.sum(ce.mean(axis=-1) * valid) / jnp.maximum(valid.sum(), 1.0)
        target = normalize_continuous_value(arrays["dwell"], action_config.norm_config)
        dwell = continuous_loss(out.continuous_preds[..., DWELL_TIME_COLUMN], target, action_config)
        dwell = jnp.sum(dwell * valid) / jnp.maximum(valid.sum(), 1.0)
        total = ce + action_config.loss_weight * dwell
        return total, {"loss": total, "cross_entropy": ce, "dwell": dwell}

    return loss


def query_batch(arrays: dict) -> RecsysBatch:
    """A batch of queries (user and history), with one padded candidate slot."""
    b = arrays["user_hashes"].shape[0]
    zeros = jnp.zeros((b, 1), jnp.int32)
    hashes = jnp.zeros((b, 1, arrays["history_post_hashes"].shape[-1]), jnp.int32)
    return RecsysBatch(
        user_hashes=arrays["user_hashes"],
        history_post_hashes=arrays["history_post_hashes"],
        history_author_hashes=arrays["history_author_hashes"],
        history_actions=arrays["history_actions"],
        history_product_surface=arrays["history_product_surface"],
        candidate_post_hashes=hashes,
        candidate_author_hashes=jnp.zeros_like(hashes),
        candidate_product_surface=zeros,
    )


def post_batch(post_hashes: jax.Array, author_hashes: jax.Array, config) -> RecsysBatch:
    """Posts [M, H] as the candidates of one empty query, for the candidate tower."""
    s, h = config.history_seq_len, config.hash_config
    return RecsysBatch(
        user_hashes=jnp.zeros((1, h.num_user_hashes), jnp.int32),
        history_post_hashes=jnp.zeros((1, s, h.num_item_hashes), jnp.int32),
        history_author_hashes=jnp.zeros((1, s, h.num_author_hashes), jnp.int32),
        history_actions=jnp.zeros((1, s, len(ACTIONS)), jnp.float32),
        history_product_surface=jnp.zeros((1, s), jnp.int32),
        candidate_post_hashes=post_hashes[None],
        candidate_author_hashes=author_hashes[None],
        candidate_product_surface=jnp.zeros((1, post_hashes.shape[0]), jnp.int32),
    )


def retrieval_towers(config: PhoenixRetrievalModelConfig) -> hk.Transformed:
    """(queries, posts) -> (unit user vectors [B, D], unit post vectors [M, D], temperature),
    creating the retrieval model's parameters and the top-level `log_temperature`."""

    def towers(query: RecsysBatch, posts: RecsysBatch, tables: dict):
        model = config.make()
        users, _ = model.build_user_representation(query, lookup(tables, query))
        vectors, _ = model.build_candidate_representation(posts, lookup(tables, posts))
        log_temperature = hk.get_parameter(
            LOG_TEMPERATURE[1],
            [],
            jnp.float32,
            init=hk.initializers.Constant(INITIAL_LOG_TEMPERATURE),
        )
        temperature = jnp.exp(jnp.clip(log_temperature, *LOG_TEMPERATURE_RANGE))
        return users, vectors[0], temperature

    return hk.transform(towers)


@_per_config
def make_retrieval_loss(config: PhoenixRetrievalModelConfig) -> Callable:
    """Sampled softmax: each query's target against the batch's other targets and the global
    negatives, logits corrected by log Q (`log_q` [B + M] of the batch: the log of how often
    each column's post is drawn as a candidate), accidental hits of the target's own post
    masked."""
    towers = retrieval_towers(config)

    def loss(params, arrays):
        query = query_batch(arrays)
        post_hashes = jnp.concatenate(
            [arrays["target_post_hashes"], arrays["negative_post_hashes"]]
        )
        author_hashes = jnp.concatenate(
            [arrays["target_author_hashes"], arrays["negative_author_hashes"]]
        )
        ids = jnp.concatenate([arrays["target_ids"], arrays["negative_ids"]])
        users, posts, temperature = towers.apply(
            params["model"],
            None,
            query,
            post_batch(post_hashes, author_hashes, config),
            params["tables"],
        )
        logits = users.astype(jnp.float32) @ posts.astype(jnp.float32).T / temperature  # [B, B + M]
        logits = logits - arrays["log_q"][None, :]
        b = users.shape[0]
        positive = jnp.arange(b)
        hit = (ids[None, :] == arrays["target_ids"][:, None]) & (
            jnp.arange(ids.shape[0]) != positive[:, None]
        )
        logits = jnp.where(hit, -1e9, logits)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, positive).mean()
        return ce, {"loss": ce, "temperature": temperature}

    return loss


# ---------------------------------------------------------------------------------------------
# Parameters, optimiser, the step.
# ---------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    params: dict  # {"model": Haiku tree, "tables": {user,item,author}_embeddings}
    opt_state: Any
    step: jax.Array  # int32 scalar


def trainable_init(params: hk.Params, seed: int) -> hk.Params:
    """The published initialisation with what blocks gradients replaced: norm scales 1 instead
    of 0, and `Linear` weights (zero as published) truncated normal with variance 1 / fan-in.
    Everything else (projections, tables, heads) keeps its published initial values."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params))))

    def init(path, x):
        key, name = next(keys), path[-1].key
        if name == "scale":
            return jnp.ones_like(x)
        if name == "w":
            std = 1.0 / math.sqrt(x.shape[0]) / 0.87962566103423978  # truncated at two std
            return std * jax.random.truncated_normal(key, -2.0, 2.0, x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(init, params)


def scale_by_rowwise_adagrad(eps: float = 1e-10) -> optax.GradientTransformation:
    """Row-wise AdaGrad's scaling for tables [V, D]: one accumulator per row, the sum over steps
    of the row gradient's mean square; a row's gradient is divided by the square root of its
    accumulator, so that it keeps its direction (element-wise AdaGrad and Adam move a row seen
    once by the learning rate in every coordinate, whatever its gradient's shape)."""

    def init(params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape[:1], jnp.float32), params)

    def update(grads, accumulators, params=None):
        del params
        accumulators = jax.tree.map(
            lambda a, g: a + jnp.mean(jnp.square(g), axis=-1), accumulators, grads
        )
        updates = jax.tree.map(
            lambda a, g: g * jax.lax.rsqrt(a + eps)[:, None], accumulators, grads
        )
        return updates, accumulators

    return optax.GradientTransformation(init, update)


# The embedding tables' optimisers, by `TrainConfig.table_optimizer`.
TABLE_OPTIMIZERS = {
    "adam": lambda lr: optax.adam(lr),
    "adagrad": lambda lr: optax.adagrad(lr, initial_accumulator_value=1e-6),
    "rowwise_adagrad": lambda lr: optax.chain(
        scale_by_rowwise_adagrad(), optax.scale_by_learning_rate(lr)
    ),
}
# Updates skipped in a row (their gradient norm not finite) before a run stops (`clip_or_skip`,
# as optax, would apply the next one).
MAX_SKIPPED_IN_A_ROW = 10
# A loss this many times the run's first is taken for a diverging run, and said once.
DIVERGING_LOSS_FACTOR = 10.0


def optimiser(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay for the model's parameters; the embedding
    tables, whose rows see a gradient only when their ids are in the batch, by `table_optimizer`
    at their own rate on the same schedule's shape; global-norm clipping over everything; an
    update whose gradients are not finite is skipped (and counted in the state); `fit` stops a
    run before optax would give up skipping."""

    def schedule(peak):
        return optax.warmup_cosine_decay_schedule(
            0.0,
            peak,
            train.warmup_steps,
            train.decay_steps,
            peak * train.final_learning_rate_fraction,
        )

    decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    dense = optax.adamw(schedule(train.learning_rate), weight_decay=train.weight_decay, mask=decay)
    tables = TABLE_OPTIMIZERS[train.table_optimizer](schedule(train.table_learning_rate))

    def labels(params):
        return {part: jax.tree.map(lambda _, part=part: part, v) for part, v in params.items()}

    both = optax.multi_transform({"model": dense, "tables": tables}, labels)
    return clip_or_skip(both, train.clip_norm, MAX_SKIPPED_IN_A_ROW)


def clip_or_skip(
    inner: optax.GradientTransformation, max_norm: float, max_skipped: int
) -> optax.GradientTransformation:
    """`optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(max_norm), inner))`, with
    its state, from one global norm of the gradients: the update is skipped when that norm is
    not finite, instead of checking every gradient apart, and the norm is the one the step
    reports (the same expression, which XLA computes once), not a second pass inside the update.
    The one difference: finite gradients whose squared norm overflows are skipped too, where
    optax would clip them to zero and still run `inner` (Adam's moments and count, AdamW's weight
    decay and the schedule would move on)."""
    # The state is optax's, so that states saved before load and resume.
    init = optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(max_norm), inner), max_skipped
    ).init

    def update(grads, state, params=None):
        norm = optax.tree.norm(grads)
        finite = jnp.isfinite(norm)
        in_a_row = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))
        clip, inner_state = state.inner_state

        def clipped(g):  # as optax.clip_by_global_norm
            return jnp.where(norm < max_norm, g, g / norm.astype(g.dtype) * max_norm)

        def apply(_):
            updates, new_state = inner.update(jax.tree.map(clipped, grads), inner_state, params)
            return updates, (clip, new_state)

        def skip(_):
            return optax.tree.zeros_like(grads), state.inner_state

        updates, new_inner = jax.lax.cond(finite | (in_a_row > max_skipped), apply, skip, None)
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=in_a_row,
            last_finite=finite,
            total_notfinite=jnp.where(
                finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)
            ),
            inner_state=new_inner,
        )

    return optax.GradientTransformation(init, update)


def initial_state(kind: str, config, hashing: Hashing, train: TrainConfig) -> TrainState:
    """Parameters (the trainable initialisation), tables and optimiser state at step 0."""
    params = {
        "model": trainable_init(published_init(kind, config, train.seed), train.seed + 1),
        "tables": jax.tree.map(
            jnp.asarray, init_tables(hashing, config.emb_size, train.seed + 2, train.table_scale)
        ),
    }
    return TrainState(params, optimiser(train).init(params), jnp.zeros((), jnp.int32))


def published_init(kind: str, config, seed: int) -> hk.Params:
    """The published initial values of a model's parameters (and, for retrieval, the
    temperature) from a seed."""
    return _initializer(config, kind)(jax.random.PRNGKey(seed))


@_per_config
def _initializer(config, kind: str) -> Callable:
    """key -> the published initial parameters, compiled once per config."""
    batch, emb = jax.tree.map(jnp.asarray, dummy_inputs(config, len(ACTIONS)))
    if kind == "ranker":
        init = jax.jit(hk.transform(lambda b, e: config.make()(b, e)).init)
        return lambda key: init(key, batch, emb)
    tables = {TABLE_NAMES[e]: jnp.zeros((2, config.emb_size)) for e in ("user", "item", "author")}
    posts = post_batch(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), config)
    query = query_batch(batch._asdict())
    init = jax.jit(retrieval_towers(config).init)
    return lambda key: init(key, query, posts, tables)


def make_step(loss_fn: Callable, train: TrainConfig) -> Callable:
    """One jitted update: (state, batch arrays) -> (state, metrics)."""
    return _step(dataclasses.replace(train, steps=1, eval_every=1), loss_fn)


@_per_config
def _step(train: TrainConfig, loss_fn: Callable) -> Callable:
    tx = optimiser(train)

    @functools.partial(jax.jit, donate_argnums=0, compiler_options=step_compiler_options())
    def step(state: TrainState, arrays: dict) -> tuple[TrainState, dict]:
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, arrays)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = dict(stats, grad_norm=optax.tree.norm(grads), skipped=opt_state.total_notfinite)
        return TrainState(params, opt_state, state.step + 1), stats

    return step


# On the CPU, XLA hands YNNPACK its matrix products together with the work fused around them,
# and its reductions; a training step runs faster with YNNPACK given the products alone and the
# rest left to XLA's own loops (the same values to float32 rounding). Inference is faster as it
# is, so only the step asks for it. The option is experimental in the pinned jaxlib: a release
# that renames it would refuse to compile the step, and this is the line to change.
CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def step_compiler_options() -> dict | None:
    """XLA options for a training step on this machine's default backend."""
    return CPU_STEP_OPTIONS if jax.default_backend() == "cpu" else None


def data_mesh() -> Mesh:
    """Every device along one axis: batches are split over it, parameters replicated."""
    return Mesh(np.array(jax.devices()), ("data",))


def place(tree, mesh: Mesh, split: bool):
    """On the mesh: split along the first axis (a batch), or replicated (the state)."""
    sharding = NamedSharding(mesh, P("data") if split else P())
    return jax.device_put(tree, sharding)


# Retrieval's global negatives, and the log Q of every column, serve every query of a batch:
# each device holds them all while the queries are split.
SHARED_FIELDS = frozenset(
    {"negative_ids", "negative_post_hashes", "negative_author_hashes", "log_q"}
)


def place_batch(arrays: dict, mesh: Mesh) -> dict:
    """A batch on the mesh: its requests or queries split over the devices, the rest shared."""
    return {name: place(x, mesh, split=name not in SHARED_FIELDS) for name, x in arrays.items()}


def check_batch_split(train: TrainConfig, mesh: Mesh) -> None:
    """Refuses a batch that does not split evenly over the mesh's devices."""
    if train.batch_size % mesh.size:
        raise ValueError(
            f"batch_size ({train.batch_size}) does not split over the {mesh.size} devices; "
            f"use a multiple of {mesh.size}"
        )


# ---------------------------------------------------------------------------------------------
# Resumable state: npz of every leaf by its path, and what it was trained for.
# ---------------------------------------------------------------------------------------------


def _leaves_by_path(tree) -> dict[str, Any]:
    return {
        jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def save_state(path: Path, state: TrainState, meta: dict) -> None:
    """Writes the state atomically, with `meta` (what it belongs to) as a JSON string."""
    arrays = {k: np.asarray(v) for k, v in _leaves_by_path(state).items()}
    write_npz({**arrays, "meta": np.array(json.dumps(meta, sort_keys=True))}, path)


def _first_difference(saved: Any, wanted: Any, where: str = "") -> str | None:
    """Where two JSON values first differ, in words, or None."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in wanted:
            inner = f"{where}.{key}" if where else key
            if key not in saved:
                return f"it has no {inner}"
            difference = _first_difference(saved[key], wanted[key], inner)
            if difference:
                return difference
        return None
    if saved != wanted:
        return f"its {where} is {saved!r}, this run's is {wanted!r}"
    return None


def _quick_hint(saved_world: Any, world: Any) -> str:
    """Advice when a saved run and this one differ by --quick alone (as far as the world goes):
    one world is the tiny one and the other the default, of the same seed."""

    def is_world(config, make) -> bool:  # compared as JSON: tuples and lists alike
        seed = config.get("seed", 0) if isinstance(config, dict) else 0
        made = make(seed=seed).to_json()
        return json.dumps(config, sort_keys=True) == json.dumps(made, sort_keys=True)

    tiny, default = world_lib.WorldConfig.tiny, world_lib.WorldConfig
    if is_world(saved_world, tiny) and is_world(world, default):
        return "it was started with --quick; "
    if is_world(saved_world, default) and is_world(world, tiny):
        return "it was started without --quick; "
    return ""


# What to do when a saved state differs from this run: resuming it, or reading the other model
# of a folder beside the one this run trains.
RESUME_ADVICE = "resume with the settings it was started with, or choose another --out"
BESIDE_ADVICE = "train with the world it was trained on, or choose another --out"
TRAINED_ADVICE = "make the job with the world and training seed it was trained with"


def load_state(
    path: Path, template: TrainState, meta: dict, advice: str = RESUME_ADVICE
) -> tuple[TrainState, dict]:
    """(the state saved at `path`, the meta saved with it), checked against what this run
    expects (`meta`: the keys it holds) and against the template's tree (its leaves: a
    template with `opt_state` and `step` None reads the parameters alone); refused in one line
    otherwise, ending with `advice`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file: nothing to resume (run without --resume)")
    try:
        arrays = read_npz(path)
    except ValueError as error:  # damaged: what it held is lost, and the way on is to start over
        raise ValueError(f"{error}; remove it to train that model from step 0") from None
    if "meta" not in arrays:
        raise ValueError(f"{path}: not a training state of this project (no meta entry)")
    try:
        saved = json.loads(str(arrays.pop("meta")))
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(
            f"{path}: not a training state of this project (its meta is not a JSON object)"
        )
    difference = _first_difference(saved, meta)
    if difference:
        raise ValueError(
            f"{path}: the state of another run ({difference}); "
            + _quick_hint(saved.get("world"), meta.get("world"))
            + advice
        )
    leaves = []
    for key, leaf in _leaves_by_path(template).items():
        if key not in arrays or arrays[key].shape != np.shape(leaf):
            raise ValueError(
                f"{path}: {key} is missing or of another shape; not this model's state"
            )
        leaves.append(jnp.asarray(arrays[key], dtype=jnp.result_type(leaf)))
    state = jax.tree.unflatten(jax.tree.structure(template), leaves)
    if state.step is not None and int(state.step) < 0:
        raise ValueError(f"{path}: step is {int(state.step)}; a saved state's step is >= 0")
    return state, saved


# ---------------------------------------------------------------------------------------------
# Evaluation against the oracle.
# ---------------------------------------------------------------------------------------------


def in_batches(fn: Callable, arrays: dict, batch_size: int) -> list:
    """fn over consecutive batches of `arrays` (the last one padded by repeating row 0, so that
    every call has the same shape and compiles once); outputs trimmed and concatenated."""
    n = len(next(iter(arrays.values())))
    outputs = []
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size)
        index[index >= n] = 0
        out = fn(take(arrays, index))
        size = min(batch_size, n - start)
        outputs.append(jax.tree.map(lambda x, size=size: np.asarray(x)[:size], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


def ranking_predictions(params, config: PhoenixModelConfig, arrays: dict) -> tuple:
    """Probabilities [N, C, A] and predicted dwell seconds [N, C] of every candidate."""
    predict = _predictor(config)
    probabilities, dwell = in_batches(lambda a: predict(params, a), arrays, 256)
    _check_diverged("ranker", probabilities, dwell)
    return probabilities, dwell


class Diverged(ValueError):
    """A model's outputs are not finite: its parameters have gone to infinity."""


def _check_diverged(kind: str, *outputs: np.ndarray) -> None:
    if not all(np.isfinite(x).all() for x in outputs):
        raise Diverged(
            f"the {kind}'s outputs are not finite (NaN or infinite): its parameters have "
            "diverged; a lower learning rate may help"
        )


@_per_config
def _predictor(config: PhoenixModelConfig) -> Callable:
    forward = hk.transform(lambda batch, emb: config.make()(batch, emb))
    norm = config.continuous_action_config.norm_config

    @jax.jit
    def predict(params, arrays):
        batch = ranking_batch(arrays)
        out = forward.apply(params["model"], None, batch, lookup(params["tables"], batch))
        dwell = denormalize_continuous_value(out.continuous_preds[..., DWELL_TIME_COLUMN], norm)
        return jax.nn.sigmoid(out.logits), dwell

    return predict


def _number(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def rce_ratio(rce: float | None, rce_oracle: float | None) -> float | None:
    """The model's RCE as a share of the oracle's; None where either is undefined or the
    oracle is no better than the base rate (a ratio to it would read as a gain)."""
    if rce is None or rce_oracle is None or rce_oracle <= 0:
        return None
    return _number(rce / rce_oracle)


def ranking_report(
    labels: np.ndarray, model: np.ndarray, oracle: np.ndarray, bins: int = 10
) -> dict:
    """Per action, of the model and of the oracle (the world's true probabilities) on the same
    held-out impressions: AUROC, PR-AUC (`metrics.average_precision`), RCE, cross-entropy and
    calibration (`metrics.calibration` in `bins` quantile bins); the model's RCE as a fraction
    of the oracle's; the number of positives. A figure that is not defined (AUROC without
    positives) is None."""
    report = {}
    for i, action in enumerate(ACTIONS):
        y, m, o = labels[..., i].ravel(), model[..., i].ravel(), oracle[..., i].ravel()
        rce, rce_oracle = _number(metrics.rce(y, m)), _number(metrics.rce(y, o))
        report[action] = {
            "auc": _number(metrics.auroc(y, m)),
            "auc_oracle": _number(metrics.auroc(y, o)),
            "pr_auc": _number(metrics.average_precision(y, m)),
            "pr_auc_oracle": _number(metrics.average_precision(y, o)),
            "rce": rce,
            "rce_oracle": rce_oracle,
            "positives": int(y.sum()),
            "rce_ratio": rce_ratio(rce, rce_oracle),
            "ce": _number(metrics.cross_entropy(y, m)),
            "ce_oracle": _number(metrics.cross_entropy(y, o)),
            "calibration": {"model": _bins(y, m, bins), "oracle": _bins(y, o, bins)},
        }
    return report


def _bins(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> dict:
    """`metrics.calibration` as lists, for JSON."""
    calibration = metrics.calibration(labels, probabilities, bins)
    return {
        "mean_predicted": [_number(x) for x in calibration.mean_predicted],
        "observed_rate": [_number(x) for x in calibration.observed_rate],
        "count": calibration.count.tolist(),
    }


def retrieval_vectors(
    params, config: PhoenixRetrievalModelConfig, queries: dict | None, posts: dict
):
    """Unit user vectors [Q, D] of the queries (None without queries) and unit post vectors
    [P, D] of the posts ({"post_hashes", "author_hashes"} [P, H])."""
    encode = _encoder(config)
    s, h = config.history_seq_len, config.hash_config
    no_query = {
        "user_hashes": np.zeros((1, h.num_user_hashes), np.int32),
        "history_post_hashes": np.zeros((1, s, h.num_item_hashes), np.int32),
        "history_author_hashes": np.zeros((1, s, h.num_author_hashes), np.int32),
        "history_actions": np.zeros((1, s, len(ACTIONS)), np.float32),
        "history_product_surface": np.zeros((1, s), np.int32),
    }
    no_post = {k: v[:1] for k, v in posts.items()}
    post_vectors = in_batches(lambda a: encode(params, no_query, a)[1], posts, 1024)
    _check_diverged("retrieval model", post_vectors)
    if queries is None:
        return None, post_vectors
    fields = {k: v for k, v in queries.items() if k in no_query}
    user_vectors = in_batches(lambda a: encode(params, a, no_post)[0], fields, 256)
    _check_diverged("retrieval model", user_vectors)
    return user_vectors, post_vectors


@_per_config
def _encoder(config: PhoenixRetrievalModelConfig) -> Callable:
    towers = retrieval_towers(config)

    @jax.jit
    def encode(params, queries, posts):
        query = query_batch(queries)
        candidates = post_batch(posts["post_hashes"], posts["author_hashes"], config)
        return towers.apply(params["model"], None, query, candidates, params["tables"])[:2]

    return encode


def rank_corpus(
    users: np.ndarray,
    posts: np.ndarray,
    history_ids: np.ndarray,
    k: int,
    servable: np.ndarray | None = None,
) -> np.ndarray:
    """Post ids [Q, k] (ids are row + 1) by score, each query's history excluded; with
    `servable` [Q, P] (bool), the posts it marks first, each group by score."""
    scores = users.astype(np.float32) @ posts.astype(np.float32).T  # [Q, P]
    if servable is not None:
        # Unit vectors: scores lie in [-1, 1], so +3 puts every servable post first.
        scores += 3.0 * servable
    return world_lib.top_k_unseen(scores, history_ids, k)


def retrieval_report(targets: np.ndarray, rankings: dict[str, np.ndarray]) -> dict:
    """recall@10, recall@100 and NDCG@10 of the target post, for each ranking."""
    report = {}
    for metric, fn, k in (
        ("recall@10", metrics.recall_at_k, 10),
        ("recall@100", metrics.recall_at_k, RETRIEVAL_K),
        ("ndcg@10", metrics.ndcg_at_k, 10),
    ):
        report[metric] = {
            name: _number(fn(ranked, targets, k)) for name, ranked in rankings.items()
        }
    return report


# ---------------------------------------------------------------------------------------------
# Training one model.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One model to train on a world: its config, hash functions, data and loss."""

    kind: str  # "ranker" or "retrieval"
    config: Any
    hashing: Hashing
    train_data: dict
    eval_data: dict
    loss: Callable
    world: world_lib.World
    train: TrainConfig
    # Retrieval: log Q [P + 1] by post id, how often each post is a column of the softmax.
    log_q: np.ndarray | None = None

    @property
    def meta(self) -> dict:
        """What a saved state belongs to: a resumed run must match it."""
        train = dataclasses.asdict(self.train)
        for name in ("steps", "eval_every", *OTHER_MODELS_SETTINGS[self.kind]):
            train.pop(name)
        meta = {
            "kind": self.kind,
            "world": self.world.config.to_json(),
            "train": train,
            "hashing": self.hashing.to_json(),  # hash parameters and table sizes
        }
        return json.loads(json.dumps(meta))  # as a saved state holds it (tuples as lists)

    def batch(self, step: int) -> dict:
        """The batch of `step`, drawn from the seed and the step alone."""
        n = len(self.train_data["user_hashes"])
        arrays = take(
            self.train_data, batch_indices(n, self.train.batch_size, self.train.seed, step)
        )
        if self.kind == "retrieval":
            rng = np.random.default_rng([self.train.seed, step, 1])
            ids = rng.integers(1, self.world.num_posts + 1, self.train.negatives)
            arrays.update(
                negative_ids=ids,
                negative_post_hashes=self.hashing.item(ids),
                negative_author_hashes=self.hashing.author(ids),
                log_q=self.log_q[np.concatenate([arrays["target_ids"], ids])].astype(np.float32),
            )
        return arrays


# Seeds as the command line takes them: the hashing and the initialisation add small offsets.
MAX_SEED = 2**30


def make_job(
    kind: str, world: world_lib.World, train: TrainConfig, config=None, to_train: bool = True
) -> Job:
    """The `kind` model of `model_configs` (or `config`) on the world's examples, checked
    (`to_train` False: a model only read back, whose training settings are not checked)."""
    if kind not in MODELS:
        raise ValueError(f"kind must be one of {MODELS}, got {kind!r}")
    if not isinstance(to_train, bool | np.bool_):
        raise TypeError(f"to_train must be True or False, got {to_train!r}")
    if not isinstance(world, world_lib.World):
        raise TypeError(f"world must be a World (world.build_world), got {_kind_of(world)}")
    if not isinstance(train, TrainConfig):
        raise TypeError(f"train must be a TrainConfig, got {_kind_of(train)}")
    if not (is_integer(train.seed) and 0 <= train.seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {train.seed!r}")
    if config is None:
        retrieval, ranker = model_configs(world.config, train)
        config = ranker if kind == "ranker" else retrieval
    elif not isinstance(config, MODEL_CONFIGS[kind]):
        raise TypeError(
            f"config must be a {MODEL_CONFIGS[kind].__name__} for the {kind}, got "
            f"{type(config).__name__}"
        )
    if config.history_seq_len != world.config.history_len:
        raise ValueError(
            f"the model's history_seq_len ({config.history_seq_len}) does not fit the world's "
            f"histories of {world.config.history_len}"
        )
    if to_train:
        check_train_config(train, world, kind)
    if kind == "ranker":
        log_q = None
        hashing = hashing_for(world, config.hash_config, train.seed + 10)
        train_data = ranking_arrays(world.ranking_train, hashing, config)
        eval_data = ranking_arrays(world.ranking_eval, hashing, config)
        loss = make_ranker_loss(config)
    else:
        hashing = hashing_for(world, config.hash_config, train.seed + 20)
        train_data = retrieval_arrays(world.retrieval_train, hashing)
        eval_data = retrieval_arrays(world.retrieval_eval, hashing)
        # How often a post is a candidate column: in the batch as a target (as often as it is
        # a target in the training set), and as a uniformly drawn global negative.
        targets = world.retrieval_train.target_post_ids
        frequency = np.bincount(targets, minlength=world.num_posts + 1) / max(1, len(targets))
        with np.errstate(divide="ignore"):  # Q 0 (log -inf): never a column, never read
            log_q = np.log(train.batch_size * frequency + train.negatives / world.num_posts)
        loss = make_retrieval_loss(config)
    check_data(train_data, f"{kind} training")
    check_data(eval_data, f"{kind} held-out")
    if not len(eval_data["user_hashes"]):
        if len(world.ranking_eval):  # held-out requests, but retrieval's need a favorite
            what = f"favorite to retrieve (in its {len(world.ranking_eval)} held-out requests)"
        else:
            what = f"requests (eval_requests_per_user {world.config.eval_requests_per_user})"
        raise ValueError(
            f"the world holds no held-out {what}; training the {kind} evaluates on them"
        )
    job = Job(kind, config, hashing, train_data, eval_data, loss, world, train, log_q)
    if to_train:
        check_batch(job)
        needed = training_bytes(kind, hashing, config, world)
        check_memory(needed, f"training the {kind} on this world")
    return job


def check_batch(job: Job) -> None:
    """Refuses a job whose batch is larger than its training set."""
    examples = len(job.train_data["user_hashes"])
    if job.train.batch_size > examples:
        raise ValueError(
            f"batch_size ({job.train.batch_size}) exceeds the {examples} {job.kind} training "
            "examples of the world"
        )


def training_bytes(kind: str, hashing: Hashing, config, world: world_lib.World) -> float:
    """A training run's memory, roughly: the tables twelve times over and, for retrieval, the
    held-out queries' scores and servable flags over the whole corpus. A step holds six copies
    of the tables (parameters, gradients, two optimiser moments, updates, the new parameters);
    measured, the peak resident memory of `--quick` ranker runs with 50,000 to 200,000 posts
    (tables of 0.2 to 0.8 GiB) exceeded that of the same run on 400 posts by 7 to 13 copies
    (XLA's temporaries, the evaluations and saves between steps)."""
    rows = sum(getattr(hashing, entity).vocab_size for entity in TABLE_NAMES)
    needed = 12 * 4 * rows * config.emb_size
    if kind == "retrieval":
        needed += 5 * len(world.retrieval_eval) * world.num_posts
    return needed


def check_train_config(train: TrainConfig, world: world_lib.World, kind: str) -> None:
    """Refuses, naming the field, a training config that cannot run on this world."""
    positive = (
        "learning_rate", "table_learning_rate", "clip_norm", "table_scale", "dwell_norm_seconds"
    )  # fmt: skip
    for name in (*positive, "weight_decay", "dwell_loss_weight", "final_learning_rate_fraction"):
        value = getattr(train, name)
        if not is_number(value) or not abs(value) <= FLOAT32_MAX:  # NaN, inf, or inf in float32
            raise ValueError(f"{name} must be a finite number in float32's range, got {value!r}")
        if (value <= 0) if name in positive else (value < 0):
            raise ValueError(f"{name} must be {'> 0' if name in positive else '>= 0'}, got {value}")
    if train.final_learning_rate_fraction > 1:
        raise ValueError(
            "final_learning_rate_fraction must be in [0, 1] (of the peak learning rate), got "
            f"{train.final_learning_rate_fraction}"
        )
    for name in ("steps", "decay_steps", "batch_size", "eval_every", "warmup_steps", "negatives"):
        value, least = getattr(train, name), 0 if name in ("warmup_steps", "negatives") else 1
        if not (is_integer(value) and value >= least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if train.dwell_loss not in CONTINUOUS_LOSS_TYPES:
        raise ValueError(
            f"dwell_loss must be one of {CONTINUOUS_LOSS_TYPES}, got {train.dwell_loss!r}"
        )
    if train.warmup_steps >= train.decay_steps:
        raise ValueError(
            f"decay_steps ({train.decay_steps}) must exceed warmup_steps ({train.warmup_steps}): "
            "the schedule warms up, then decays"
        )
    if train.table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(
            f"table_optimizer must be one of {tuple(TABLE_OPTIMIZERS)}, got "
            f"{train.table_optimizer!r}"
        )
    needed = RETRIEVAL_K + world.config.history_len  # a query's history is never retrieved
    if kind == "retrieval" and world.num_posts < needed:
        raise ValueError(
            f"the world has {world.num_posts} posts; retrieval is measured by recall@100 among "
            f"the posts outside a query's history of {world.config.history_len}, and needs at "
            f"least {needed}"
        )
    if kind == "retrieval" and not 0 <= train.negatives <= world.num_posts:
        raise ValueError(
            f"negatives ({train.negatives}) must be in [0, {world.num_posts}] (the posts)"
        )


def fit(
    job: Job,
    state_dir: str | os.PathLike,
    resume: bool = False,
    mesh: Mesh | None = None,
    quiet: bool = False,
    start: tuple[TrainState, list[dict]] | None = None,
) -> tuple:
    """Trains `job` to `job.train.steps` over `mesh` (by default every device, `data_mesh`),
    from step 0, or (`resume`) from the state saved in `state_dir`, or from `start` (that saved
    state and log, already read by `load_progress`); prints progress unless `quiet`; saves the
    state in `state_dir` at every evaluation and at the end. Returns (state, log)."""
    if not isinstance(job, Job):
        raise TypeError(f"job must be a Job (make_job), got {_kind_of(job)}")
    train, state_dir = job.train, as_path(state_dir, "state_dir")
    problem = file_in_a_folder(state_dir)
    if problem is None and state_dir.exists() and not state_dir.is_dir():
        problem = "a file, not a folder"
    if problem:
        raise ValueError(f"state_dir {state_dir}: {problem}")
    mesh = data_mesh() if mesh is None else mesh
    if not (hasattr(mesh, "size") and hasattr(mesh, "devices")):  # a Mesh, or one like it
        raise TypeError(f"mesh must be a jax.sharding.Mesh (data_mesh), got {_kind_of(mesh)}")
    if start is not None and not (
        isinstance(start, tuple) and len(start) == 2 and isinstance(start[0], TrainState)
    ):
        raise TypeError(f"start must be (state, log) as load_progress gives, got {_kind_of(start)}")
    for name, value in (("resume", resume), ("quiet", quiet)):  # "no" would read as true
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    # Its settings again (a job made with to_train=False was not checked); not the memory,
    # which make_job measured before any model trained, and another may hold now.
    check_train_config(train, job.world, job.kind)
    check_batch(job)
    check_batch_split(train, mesh)
    resume = resume or start is not None
    if not resume and (state_dir / f"{job.kind}.npz").exists():
        raise ValueError(
            f"{state_dir} already holds a saved {job.kind}: resume=True continues it; to train "
            "another from step 0, use another folder"
        )
    if start is not None:
        state, log = start
    else:
        state, log = initial_state(job.kind, job.config, job.hashing, train), []
        if resume:
            state, log = load_progress(state_dir, job, state)
    state = place(state, mesh, split=False)
    step_fn = make_step(job.loss, train)
    first, times, diverging = int(state.step), [], False
    # (a resumed run's log holds the steps before it)
    first_finite = next((e for e in log if math.isfinite(e["loss"])), None)
    saved_at = first if resume else None  # the step of the state on disk
    say = (lambda *a: None) if quiet else print
    if first == train.steps:
        say(
            f"{job.kind}: already at step {train.steps}, where --steps stops it; nothing to train "
            "(a larger --steps trains it further)"
        )
    else:
        say(
            f"{job.kind}: steps {first} to {train.steps}, batches of {train.batch_size}, "
            f"{len(job.train_data['user_hashes']):,} training examples"
        )
        if train.steps != train.decay_steps:  # the schedule does not follow --steps
            floor = f"{train.final_learning_rate_fraction:.0%} of its peak"
            say(
                f"  (the learning rate's schedule is {train.decay_steps} steps long, "
                "--decay-steps: "
                + (
                    f"after step {train.decay_steps} it stays at its floor, {floor})"
                    if train.steps > train.decay_steps
                    else f"this run stops before it reaches its floor, {floor})"
                )
            )
    for step in range(first, train.steps):
        arrays = job.batch(step)
        t0 = time.perf_counter()
        state, stats = step_fn(state, place_batch(arrays, mesh))
        stats = {k: float(v) for k, v in stats.items()}  # waits for the step
        times.append(time.perf_counter() - t0)
        # The count of skips in a row kept in the optimiser state, saved with it: a resumed run
        # goes on with it, and stops before `clip_or_skip` would apply an update, however the run
        # was split.
        in_a_row = int(state.opt_state.notfinite_count)
        if in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise ValueError(
                f"{job.kind}: {in_a_row} updates in a row had gradients whose norm is not "
                f"finite (the last at step {step + 1}); {_stopping(saved_at)}"
            )
        log.append({"step": step + 1, **stats})
        done = step + 1
        # Against the run's first finite loss; a non-finite one is skipped and counted instead.
        loss = stats["loss"]
        if first_finite is None and math.isfinite(loss):
            first_finite = log[-1]
        if (
            not diverging
            and math.isfinite(loss)
            and loss > DIVERGING_LOSS_FACTOR * first_finite["loss"]
        ):
            diverging = True  # said once; the run goes on (its evaluation will show the damage)
            warnings.warn(
                f"{job.kind}: the loss has grown from {first_finite['loss']:.4g} at step "
                f"{first_finite['step']} to {loss:.4g} at step {done}: the training is "
                "diverging (a learning rate too high?)",
                RuntimeWarning,
                stacklevel=2,
            )
        if done % max(1, train.eval_every // 4) == 0 or done == train.steps:
            per_step = float(np.median(times[1:] or times))  # the first step compiles
            skipped = int(stats["skipped"])
            speed = (
                f"{train.batch_size / per_step:,.0f} examples/s  "
                f"{(train.steps - done) * per_step:.0f} s left"
                if len(times) > 1
                else f"(this run's first step: {times[0]:.1f} s, compiling included)"
            )
            say(
                f"  {job.kind} step {done}/{train.steps}  loss {stats['loss']:.4f}  {speed}"
                + (f"  ({skipped} updates skipped)" if skipped else "")
            )
        if done % train.eval_every == 0:
            try:
                log[-1].update(quick_eval(job, state))
            except Diverged as error:
                raise Diverged(f"at step {done}, {error}; {_stopping(saved_at)}") from None
            figures = {k: v for k, v in log[-1].items() if k.startswith("eval ")}
            say(
                f"  held out (up to the first {QUICK_EVAL_SIZE:,}): "
                + "  ".join(f"{k.removeprefix('eval ')} {v:.4f}" for k, v in figures.items())
            )
            save_progress(state_dir, job, state, log)
            saved_at = done
    if not log or log[-1]["step"] % train.eval_every:  # not saved at the last step already
        save_progress(state_dir, job, state, log)
    return state, log


def _stopping(saved_at: int | None) -> str:
    """How a run that stops leaves its state folder."""
    if saved_at is None:
        return "stopping, before any state was saved"
    return f"stopping, the state saved at step {saved_at} is kept"


def load_progress(state_dir: Path, job: Job, template: TrainState) -> tuple:
    """(state, log) that `save_progress` wrote, checked against the job (and its steps)."""
    state, _ = load_state(state_dir / f"{job.kind}.npz", template, job.meta)
    if int(state.step) > job.train.steps:
        raise ValueError(
            f"{job.kind}: the saved run is at step {int(state.step)}, past --steps "
            f"{job.train.steps}"
        )
    return state, _read_log(state_dir, job.kind, int(state.step))


def _read_log(state_dir: Path, kind: str, steps: int) -> list[dict]:
    """The training log saved beside a state of `steps` steps, up to them."""
    log_path = state_dir / f"{kind}_log.json"
    try:
        log = json.loads(log_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{log_path}: no such file (the training log saved with {kind}.npz)"
        ) from None
    except ValueError as error:
        raise ValueError(f"{log_path}: not a readable training log ({error})") from None
    if not isinstance(log, list) or len(log) < steps:
        raise ValueError(f"{log_path}: not the training log of {kind}.npz ({steps} steps)")
    for i, entry in enumerate(log[:steps]):
        if not (
            isinstance(entry, dict)
            and entry.get("step") == i + 1
            and all(is_number(v) for v in entry.values())
        ):
            raise ValueError(
                f"{log_path}: entry {i} is not step {i + 1}'s figures (an object of numbers "
                f'with "step": {i + 1}), got {str(entry)[:60]}'
            )
    return log[:steps]


def load_trained(
    state_dir: str | os.PathLike, job: Job, advice: str = TRAINED_ADVICE
) -> tuple[hk.Params, list[dict], dict]:
    """(parameters, log, training config) of the model of `job`'s kind that `fit` saved in
    `state_dir` (a later session's way back to it, and how a run reads the model it does not
    train): it must be of the job's world and tables (a state that is not ends its refusal
    with `advice`); how it was trained (optimiser, steps) is its own, and the config returned
    is the one it saved."""
    if not isinstance(job, Job):
        raise TypeError(f"job must be a Job (make_job), got {_kind_of(job)}")
    state_dir = as_path(state_dir, "state_dir")
    if not (state_dir / f"{job.kind}.npz").is_file():
        raise FileNotFoundError(
            f"{state_dir / f'{job.kind}.npz'}: no such file: no {job.kind} saved in {state_dir} "
            "(train.fit saves one there)"
        )
    params = jax.eval_shape(
        lambda: initial_state(job.kind, job.config, job.hashing, job.train).params
    )
    template = TrainState(params, None, jax.ShapeDtypeStruct((), jnp.int32))
    meta = {key: job.meta[key] for key in ("kind", "world", "hashing")}
    state, saved = load_state(state_dir / f"{job.kind}.npz", template, meta, advice)
    steps = int(state.step)
    train = {**dataclasses.asdict(job.train), **saved.get("train", {}), "steps": steps}
    train["eval_every"] = saved.get("eval_every", train["eval_every"])
    return state.params, _read_log(state_dir, job.kind, steps), train


def save_progress(state_dir: Path, job: Job, state: TrainState, log: list[dict]) -> None:
    """The resumable state and the log so far, each written whole or not at all; the log
    first, so that an interruption between the two leaves a log at least as long as the
    state's steps (it is cut back to them when read). The meta saved with the state holds
    the evaluation interval too, which a resumed run may change."""
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json(log, state_dir / f"{job.kind}_log.json")
    meta = {**job.meta, "eval_every": job.train.eval_every}
    save_state(state_dir / f"{job.kind}.npz", state, meta)


QUICK_EVAL_SIZE = 1000  # held-out examples evaluated while training


def quick_eval(job: Job, state: TrainState, size: int = QUICK_EVAL_SIZE) -> dict:
    """A few held-out figures to watch while training (the full evaluation comes at the end)."""
    params = jax.device_get(state.params)
    if job.kind == "ranker":
        data = {k: v[:size] for k, v in job.eval_data.items()}
        probabilities, _ = ranking_predictions(params, job.config, data)
        labels = data["labels"][..., FAVORITE].ravel()
        oracle = job.world.ranking_eval.probabilities[:size, :, FAVORITE].ravel()
        model = probabilities[..., FAVORITE].ravel()
        return {
            "eval favorite auc": metrics.auroc(labels, model),
            "eval favorite auc oracle": metrics.auroc(labels, oracle),
            "eval favorite rce": metrics.rce(labels, model),
        }
    data = {k: v[:size] for k, v in job.eval_data.items()}
    examples = job.world.retrieval_eval
    users, posts = retrieval_vectors(params, job.config, data, corpus_hashes(job))
    ranked = rank_corpus(
        users,
        posts,
        examples.history.post_ids[:size],
        RETRIEVAL_K,
        servable_now(job, examples, size),
    )
    return {"eval recall@100": metrics.recall_at_k(ranked, data["target_ids"], RETRIEVAL_K)}


def servable_now(job: Job, examples: world_lib.RetrievalExamples, size: int | None = None):
    """[Q, P] which posts the world could serve at each query's time."""
    every_post = np.arange(1, job.world.num_posts + 1)
    return job.world.servable(every_post[None, :], examples.query_times[:size, None])


def corpus_hashes(job: Job) -> dict:
    ids = np.arange(1, job.world.num_posts + 1)
    authors = job.world.post_authors + 1
    return {"post_hashes": job.hashing.item(ids), "author_hashes": job.hashing.author(authors)}


# ---------------------------------------------------------------------------------------------
# The full evaluation, on every held-out example.
# ---------------------------------------------------------------------------------------------


def _check_evaluated(job: Job, params, kind: str) -> None:
    """Refuses a job of the other model, or parameters that are not a trained state's of this
    job's model and tables (the first that does not fit named)."""
    if not isinstance(job, Job) or job.kind != kind:
        raise TypeError(f"job must be a {kind} Job (make_job), got {_kind_of(job)}")
    check_job_params(job, params)


def check_job_params(job: Job, params) -> None:
    """Refuses parameters that are not `{'model': ..., 'tables': ...}` of the job's model and of
    tables of its hashing's sizes, naming the first that does not fit."""
    if not (isinstance(params, dict) and set(params) == {"model", "tables"}):
        raise TypeError(
            "params must be a trained state's parameters, {'model': ..., 'tables': ...} "
            f"(TrainState.params), got {_kind_of(params)}"
        )
    model = jax.eval_shape(_initializer(job.config, job.kind), jax.random.PRNGKey(0))
    check_params(params["model"], model)
    tables = params["tables"]
    expected = {
        name: (getattr(job.hashing, entity).vocab_size, job.config.emb_size)
        for entity, name in TABLE_NAMES.items()
    }
    if not isinstance(tables, dict) or set(tables) != set(expected):
        raise ValueError(f"params['tables'] must hold {sorted(expected)}, got {_kind_of(tables)}")
    for name, shape in expected.items():
        dtype = getattr(tables[name], "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"params['tables'][{name!r}] must be a float array, got {_kind_of(tables[name])}"
            )
        if np.shape(tables[name]) != shape:
            raise ValueError(
                f"params do not fit the job: tables/{name} is {list(np.shape(tables[name]))}, "
                f"its hashing asks for {list(shape)} (tables of another world or seed?)"
            )


def _kind_of(value) -> str:
    if isinstance(value, Job):
        return f"a {value.kind} Job"
    if isinstance(value, dict):
        keys = sorted(map(str, value))
        more = f" and {len(keys) - 4} more" if len(keys) > 5 else ""
        return f"a dict of {keys[:4] if more else keys}{more}"
    return type(value).__name__


def evaluate_ranker(job: Job, params) -> tuple[dict, dict]:
    """(report, predictions): per-action metrics of the model and the oracle on every held-out
    impression, and the arrays they were computed from."""
    _check_evaluated(job, params, "ranker")
    examples = job.world.ranking_eval
    probabilities, dwell = ranking_predictions(params, job.config, job.eval_data)
    report = {"actions": ranking_report(examples.labels, probabilities, examples.probabilities)}
    # Each error beside the best prediction the world allows for it: the true median under
    # absolute error, the true mean under squared error (the default MSE loss, on dwell capped
    # at the normalisation's 60 s, aims at the capped mean: close to it, not equal).
    report["dwell_seconds_mae"] = {
        "model": _number(np.abs(dwell - examples.dwell).mean()),
        "oracle": _number(np.abs(examples.median_dwell - examples.dwell).mean()),
    }
    report["dwell_seconds_rmse"] = {
        "model": _number(np.sqrt(np.square(dwell - examples.dwell).mean())),
        "oracle": _number(np.sqrt(np.square(examples.expected_dwell - examples.dwell).mean())),
    }
    predictions = {
        "ranking_labels": examples.labels,
        "ranking_model": probabilities.astype(np.float32),
        "ranking_oracle": examples.probabilities,
        "ranking_dwell": examples.dwell,
        "ranking_dwell_model": dwell.astype(np.float32),
        "ranking_dwell_oracle": examples.expected_dwell,
        "ranking_dwell_oracle_median": examples.median_dwell,
    }
    return report, predictions


def evaluate_retrieval(job: Job, params, k: int = RETRIEVAL_K) -> tuple[dict, dict]:
    """(report, predictions): recall and NDCG of each held-out query's target against the whole
    corpus (history excluded) for the model, the oracle and popularity, and the top k of each.
    The model, like the oracle and recent popularity, puts the posts servable at the query
    time first: what a deployed retrieval searches."""
    _check_evaluated(job, params, "retrieval")
    most = job.world.num_posts - job.world.config.history_len
    if not (is_integer(k) and RETRIEVAL_K <= k <= most):
        raise ValueError(
            f"k must be an integer in [{RETRIEVAL_K}, {most}] (recall@{RETRIEVAL_K} is reported, "
            f"and a query's history of {job.world.config.history_len} is never retrieved), "
            f"got {k!r}"
        )
    world, examples = job.world, job.world.retrieval_eval
    users, posts = retrieval_vectors(params, job.config, job.eval_data, corpus_hashes(job))
    servable = servable_now(job, examples)
    rankings = {
        "model": rank_corpus(users, posts, examples.history.post_ids, k, servable),
        "oracle": world.oracle_ranking(examples, k),
        "popularity": world.popularity_ranking(examples, k),
        "recent_popularity": world.popularity_ranking(examples, k, recent=True),
    }
    predictions = {"retrieval_targets": examples.target_post_ids}
    predictions.update({f"retrieval_{name}_top{k}": ids for name, ids in rankings.items()})
    return retrieval_report(examples.target_post_ids, rankings), predictions


# The project's quality goals on the default world.
FAVORITE_AUC_GAP = 0.02  # favorite's AUROC at most this far below the oracle's
FAVORITE_RCE_SHARE = 0.8  # favorite's RCE at least this share of the oracle's
ORACLE_AUC_RANGE = (0.75, 0.92)  # favorite's oracle AUROC: the world neither trivial nor noise
COUNTED_POSITIVES = 200  # every action with this many held-out positives or more...
ACTION_RCE_SHARE = 0.6  # ...reaches this share of its oracle's RCE
RECALL_SHARE = 0.7  # recall@100 against the oracle's
RECALL_OVER_POPULARITY = 2  # recall@100 against popularity's
ORACLE_RECALL_OVER_POPULARITY = 3


def _check_report(report) -> None:
    """Refuses what is not eval.json's object (either part may be left out)."""
    parts = ("ranking", "retrieval")
    if not (isinstance(report, dict) and all(isinstance(report.get(p, {}), dict) for p in parts)):
        raise TypeError(
            "report must be eval.json's object, {'ranking': {...}, 'retrieval': {...}}, got "
            + _kind_of(report)
        )
    if not any(part in report for part in parts):
        hint = ""
        if "actions" in report:
            hint = " (evaluate_ranker's report goes under 'ranking')"
        elif any(str(key).startswith("recall@") for key in report):
            hint = " (evaluate_retrieval's report goes under 'retrieval')"
        raise ValueError(f"report holds neither 'ranking' nor 'retrieval'{hint}")
    if "ranking" in report and not isinstance(report["ranking"].get("actions"), dict):
        raise ValueError("report: 'ranking' holds no 'actions' (evaluate_ranker's report does)")


def goal_checks(report: dict) -> list[tuple[str, bool]]:
    """The project's quality goals on the default world, each with whether this run met it."""
    _check_report(report)
    checks = []
    actions = report.get("ranking", {}).get("actions")
    fav = (actions or {}).get("favorite_score", {})
    if actions and None in (fav["auc"], fav["auc_oracle"], fav["rce"], fav["rce_oracle"]):
        checks.append(
            (
                f"favorite: AUROC and RCE not defined on held-out labels of one kind "
                f"({fav['positives']} positives)",
                False,
            )
        )
    elif actions:
        checks += [
            (
                f"favorite AUROC {fav['auc']:.3f} within {FAVORITE_AUC_GAP} of the oracle's "
                f"{fav['auc_oracle']:.3f}",
                fav["auc"] >= fav["auc_oracle"] - FAVORITE_AUC_GAP,
            ),
            (
                f"favorite RCE {fav['rce']:.1f} at least {FAVORITE_RCE_SHARE:.0%} of the "
                f"oracle's {fav['rce_oracle']:.1f}",
                fav["rce"] >= FAVORITE_RCE_SHARE * fav["rce_oracle"],
            ),
            (
                f"favorite oracle AUROC {fav['auc_oracle']:.3f} in "
                f"[{ORACLE_AUC_RANGE[0]}, {ORACLE_AUC_RANGE[1]}]",
                ORACLE_AUC_RANGE[0] <= fav["auc_oracle"] <= ORACLE_AUC_RANGE[1],
            ),
        ]
        short = [
            name
            for name, a in actions.items()
            if a["positives"] >= COUNTED_POSITIVES
            and (
                None in (a["rce"], a["rce_oracle"]) or a["rce"] < ACTION_RCE_SHARE * a["rce_oracle"]
            )
        ]
        counted = sum(a["positives"] >= COUNTED_POSITIVES for a in actions.values())
        if counted:  # (a tiny world may have none)
            checks.append(
                (
                    f"{counted - len(short)} of {counted} actions with >= {COUNTED_POSITIVES} "
                    f"positives reach {ACTION_RCE_SHARE:.0%} of the oracle's RCE"
                    + (f" (short: {', '.join(short)})" if short else ""),
                    not short,
                )
            )
    recall = report.get("retrieval", {}).get("recall@100")
    if recall:
        m, o, p = recall["model"], recall["oracle"], recall["popularity"]
        checks += [
            (
                f"recall@100 {m:.3f} at least {RECALL_SHARE:.0%} of the oracle's {o:.3f}",
                0 < RECALL_SHARE * o <= m,
            ),
            (
                f"recall@100 {m:.3f} at least {RECALL_OVER_POPULARITY} times popularity's {p:.3f}",
                m > 0 and m >= RECALL_OVER_POPULARITY * p,
            ),
            (
                f"the oracle's recall@100 at least {ORACLE_RECALL_OVER_POPULARITY} times "
                "popularity's",
                o > 0 and o >= ORACLE_RECALL_OVER_POPULARITY * p,
            ),
        ]
    return checks


def print_goals(report: dict, default_world: bool) -> bool:
    """Prints `goal_checks` (with recent popularity beside them); whether all were met."""
    checks = goal_checks(report)
    if checks:
        print("\ngoals" + (":" if default_world else " (set for the default world, not this one):"))
        for text, met in checks:
            print(f"  [{'x' if met else ' '}] {text}")
        recall = report.get("retrieval", {}).get("recall@100")
        if recall and recall["recent_popularity"]:
            m, o, r = recall["model"], recall["oracle"], recall["recent_popularity"]
            print(
                "  (popularity ranks the whole corpus; recent popularity puts the serving window "
                f"first,\n   as the model and the oracle do: {r:.3f}, the model {m / r:.2f}x that, "
                f"the oracle {o / r:.2f}x)"
            )
    return all(met for _, met in checks)


# The ranking table's columns beside each action's positives: (title, eval.json key, format),
# in groups of the model's figure and the oracle's.
TABLE_GROUPS = (
    (("AUROC", "auc", ".3f"), ("oracle", "auc_oracle", ".3f")),
    (("PR-AUC", "pr_auc", ".3f"), ("oracle", "pr_auc_oracle", ".3f")),
    (("RCE", "rce", ".1f"), ("oracle", "rce_oracle", ".1f"), ("ratio", "ratio", ".2f")),
)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else f"{value:{fmt}}"


def report_lines(report: dict) -> list[str]:
    """eval.json as a table (either part, "ranking" or "retrieval", may be left out)."""
    _check_report(report)
    lines = []
    actions = report.get("ranking", {}).get("actions")
    if actions:
        header = f"{'action':<26} {'positives':>9}" + "".join(
            "  " + " ".join(f"{title:>6}" for title, _, _ in group) for group in TABLE_GROUPS
        )
        lines += [header, "-" * len(header)]
        for name, a in actions.items():
            figures = {**a, "ratio": rce_ratio(a["rce"], a["rce_oracle"])}
            cells = (
                " ".join(f"{_cell(figures.get(key), fmt):>6}" for _, key, fmt in group)
                for group in TABLE_GROUPS
            )
            lines.append(f"{name:<26} {a['positives']:>9}  " + "  ".join(cells))
        mae, rmse = (report["ranking"][f"dwell_seconds_{e}"] for e in ("mae", "rmse"))
        lines.append(
            f"dwell time: mean absolute error {mae['model']:.2f} s (oracle: the true median, "
            f"{mae['oracle']:.2f} s); root mean square error {rmse['model']:.2f} s (oracle: the "
            f"true mean, {rmse['oracle']:.2f} s)"
        )
    retrieval = report.get("retrieval")
    if retrieval:
        lines += [
            "",
            f"{'retrieval':<12} {'model':>7} {'oracle':>7} {'popularity':>10} {'recent':>7}",
        ]
        for metric, v in retrieval.items():
            lines.append(
                f"{metric:<12} {v['model']:7.3f} {v['oracle']:7.3f} {v['popularity']:10.3f} "
                f"{v['recent_popularity']:7.3f}"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _check_plot(path: str | os.PathLike, what: str, value, ok: bool, expected: str) -> Path:
    """Refuses a figure's input (`ok` False: `what` is not `expected`) or a path that cannot be
    a picture (an existing folder, or no suffix to name its format); returns the path."""
    if not ok:
        raise TypeError(f"{what} must be {expected}, got {_kind_of(value)}")
    path = as_path(path)
    if path.is_dir() or not path.suffix:
        raise ValueError(f"{path}: a picture's file name, with its format's suffix (.png)")
    return path


def _save_figure(fig, path: Path) -> None:
    """Writes the figure whole or not at all (to a temporary renamed at the end, as the run's
    other files are), and closes it."""
    try:
        with atomic_path(path) as scratch:
            fig.savefig(scratch, dpi=110, format=path.suffix[1:].lower())
    finally:
        _pyplot().close(fig)


def plot_curves(logs: dict[str, list[dict]], path: str | os.PathLike) -> None:
    """Training loss (a running median, raw behind it) and the held-out figures watched while
    training, per model."""
    ok = (
        isinstance(logs, dict)
        and logs
        and all(
            isinstance(log, list) and log and all({"step", "loss"} <= set(e) for e in log)
            for log in logs.values()
        )
    )
    path = _check_plot(path, "logs", logs, ok, "training logs by model, {kind: fit's log}")
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(logs), figsize=(5.5 * len(logs), 6.5), squeeze=False)
    for column, (kind, log) in enumerate(logs.items()):
        steps = np.array([entry["step"] for entry in log])
        loss = np.array([entry["loss"] for entry in log])
        window = max(1, len(loss) // 30)
        smooth = np.array([np.median(loss[max(0, i - window) : i + 1]) for i in range(len(loss))])
        ax = axes[0, column]
        ax.plot(steps, loss, color="0.8", linewidth=0.6, label="per step")
        ax.plot(steps, smooth, color="C0", label="running median")
        ax.set(title=f"{kind}: training loss", xlabel="step", ylabel="loss")
        ax.set_ylim(top=1.05 * smooth[len(smooth) // 50 :].max())  # past the first drop
        ax.legend()
        ax = axes[1, column]
        keys = {k for entry in log for k in entry if k.startswith("eval")}
        for key in sorted(k for k in keys if "auc" in k or "recall" in k):
            points = [(entry["step"], entry[key]) for entry in log if key in entry]
            style = "--" if "oracle" in key else "-"
            ax.plot(*zip(*points, strict=True), style, marker="o", label=key[len("eval ") :])
        ax.set(title=f"{kind}: held out (up to the first {QUICK_EVAL_SIZE:,})", xlabel="step")
        if keys:
            ax.legend()
        else:  # a run shorter than the evaluation interval
            ax.text(0.5, 0.5, "no evaluation while training", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_auroc(actions: dict, path: str | os.PathLike) -> None:
    """Per-action AUROC of the model beside the oracle's."""
    ok = (
        isinstance(actions, dict)
        and actions
        and all(isinstance(a, dict) and {"auc", "auc_oracle"} <= set(a) for a in actions.values())
    )
    path = _check_plot(path, "actions", actions, ok, "eval.json's ranking actions")
    plt = _pyplot()
    names = [name.removesuffix("_score") for name in actions]
    x = np.arange(len(names))
    # Bars from the chance level: below it for an AUROC under 0.5; none where it is undefined
    # (held-out labels of one kind), marked so.
    model, oracle = ([a[key] for a in actions.values()] for key in ("auc", "auc_oracle"))
    known = [v for v in model + oracle if v is not None]
    low = min([0.5, *known]) - 0.02
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for values, shift, label in ((model, -0.2, "model"), (oracle, 0.2, "oracle")):
        heights = [0.0 if v is None else v - 0.5 for v in values]
        ax.bar(x + shift, heights, 0.4, bottom=0.5, label=label)
    for i in np.flatnonzero([v is None for v in model]):
        ax.text(x[i], 0.5 + 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(0.5, color="0.5", linewidth=0.8)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set(ylim=(low, 1.0), ylabel="AUROC", title="Held-out AUROC per action: model and oracle")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


CALIBRATION_ACTIONS = ("favorite_score", "reply_score", "vqv_score", "not_interested_score")


def plot_calibration(predictions: dict, path: str | os.PathLike, bins: int = 10) -> None:
    """Observed rate against mean predicted probability in quantile bins, model and oracle."""
    fields = ("ranking_labels", "ranking_model", "ranking_oracle")
    ok = isinstance(predictions, dict) and all(
        np.shape(predictions.get(f))[-1:] == (len(ACTIONS),) for f in fields
    )
    expected = f"evaluate_ranker's predictions ({', '.join(fields)}: [..., {len(ACTIONS)}])"
    path = _check_plot(path, "predictions", predictions, ok, expected)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CALIBRATION_ACTIONS), figsize=(4 * len(CALIBRATION_ACTIONS), 4))
    for ax, action in zip(axes, CALIBRATION_ACTIONS, strict=True):
        i = ACTIONS.index(action)
        labels = predictions["ranking_labels"][..., i].ravel()
        top = 0.0
        for name in ("model", "oracle"):
            calibration = metrics.calibration(
                labels, predictions[f"ranking_{name}"][..., i].ravel(), bins
            )
            ax.plot(calibration.mean_predicted, calibration.observed_rate, marker="o", label=name)
            top = max(top, calibration.mean_predicted.max(), calibration.observed_rate.max())
        ax.plot([0, top], [0, top], color="0.6", linestyle=":", label="perfect")
        ax.set(title=action, xlabel="predicted", ylabel="observed")
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Export: the published artifacts layout, and the compact checkpoint the demos load.
# ---------------------------------------------------------------------------------------------

DEMO_CHECKPOINT = Path(__file__).with_name("demo_checkpoint.npz")
DEMO_COMMAND = "uv run train.py --out runs/default"


def model_artifacts(job: Job, params) -> ModelArtifacts:
    check_job_params(job, params)
    params = jax.device_get(params)
    tables = {k: np.asarray(v, np.float32) for k, v in params["tables"].items()}
    return ModelArtifacts(job.config, params["model"], tables, job.hashing)


def check_user(user_id: int, num_users: int) -> None:
    if not is_integer(user_id):
        raise TypeError(f"user id must be an integer, got {user_id!r}")
    if not 1 <= user_id <= num_users:
        raise ValueError(f"user {user_id} is not in the world (users 1..{num_users})")


def demo_request(world: world_lib.World, user_id: int | None = None) -> tuple[int, int]:
    """(user id, time) of the request the demos and the exported sequence show: the first
    held-out request of `user_id`, or of the first user with at least two topics of weight
    0.25 or more and a full history."""
    examples = world.ranking_eval
    if user_id is not None:
        check_user(user_id, world.num_users)
        rows = np.flatnonzero(examples.user_ids == user_id)
        if not rows.size:
            raise ValueError(f"user {user_id} has no held-out request to show")
        return int(user_id), int(examples.request_times[rows[0]])
    liked = (world.user_topic_prefs[examples.user_ids - 1] >= 0.25).sum(axis=1)
    good = (liked >= 2) & (examples.history.post_ids > 0).all(axis=1)
    n = int(np.flatnonzero(good)[0]) if good.any() else 0
    return int(examples.user_ids[n]), int(examples.request_times[n])


# What an artifacts folder holds, as `write_artifacts` writes it.
ARTIFACT_NAMES = frozenset({*MODELS, DEFAULT_CORPUS_FILE, DEFAULT_SEQUENCE_FILE})


def check_models_fit(world_config: world_lib.WorldConfig, models: dict, where: str = "") -> None:
    """Refuses models that are not of their kind or could not have been trained on a world of
    this config's sizes: histories of another length, tables other than their hashing's,
    hashings sized for another world's ids (`table_rows`). Models do not record their world, so
    one of the same sizes and another seed passes: which world they learned is the caller's to
    keep (a run's state and a demo checkpoint record it). `where` begins each message."""
    counts, rows = id_counts(world_config), table_rows(world_config)
    for kind, model in models.items():
        config = getattr(model, "config", model)
        if not (isinstance(model, ModelArtifacts) and isinstance(config, MODEL_CONFIGS[kind])):
            other = [k for k, c in MODEL_CONFIGS.items() if isinstance(config, c)]
            got = f"the {other[0]}'s" if other else type(config).__name__
            raise TypeError(f"{where}{kind} must be a {kind} model's ModelArtifacts, got {got}")
        if model.config.history_seq_len != world_config.history_len:
            raise ValueError(
                f"{where}{kind}'s history_seq_len ({model.config.history_seq_len}) does not "
                f"fit its world's histories of {world_config.history_len}"
            )
        for entity, name in TABLE_NAMES.items():
            vocab, table = getattr(model.hashing, entity).vocab_size, model.tables[name]
            if np.shape(table) != (vocab, model.config.emb_size):
                raise ValueError(
                    f"{where}{kind}'s {name} is {list(np.shape(table))}, its hashing asks for "
                    f"{[vocab, model.config.emb_size]}"
                )
            if vocab != rows[entity]:
                raise ValueError(
                    f"{where}world config does not fit its models: a world of "
                    f"{counts[entity]:,} {ENTITY_NOUNS[entity]} trains {name} of "
                    f"{rows[entity]:,} rows; the {kind}'s has {vocab:,} (models of another world?)"
                )


def export_problem(directory: Path) -> str | None:
    """Why `export_artifacts` would not replace `directory`, or None: it may be new, empty or
    an artifacts folder, nothing else."""
    problem = file_in_a_folder(directory)
    if problem is None and directory.exists():
        if not directory.is_dir():
            problem = "a file, not a folder"
        elif others := sorted({p.name for p in directory.iterdir()} - ARTIFACT_NAMES):
            problem = f"holds what an artifacts folder does not ({', '.join(others[:5])})"
    return problem


def export_artifacts(
    directory: str | os.PathLike,
    world: world_lib.World,
    retrieval: ModelArtifacts,
    ranker: ModelArtifacts,
) -> Path:
    """The published artifacts layout: both models, the world's corpus encoded by the trained
    candidate tower (with topic names and creation times), and the demo user's sequence at
    their held-out request. Replaces `directory` whole, never leaving half of one: it may be
    new, empty or an artifacts folder, nothing else."""
    directory = as_path(directory, "directory")
    if not isinstance(world, world_lib.World):
        raise TypeError(f"world must be a World (world.build_world), got {_kind_of(world)}")
    check_models_fit(world.config, {"retrieval": retrieval, "ranker": ranker}, "the ")
    if problem := export_problem(directory):
        raise ValueError(f"{directory}: {problem}; export to a new folder")
    corpus = world.corpus()
    ids = {"post_hashes": retrieval.hashing.item(corpus["post_ids"])}
    ids["author_hashes"] = retrieval.hashing.author(corpus["author_ids"])
    params = {"model": retrieval.params, "tables": retrieval.tables}
    _, vectors = retrieval_vectors(params, retrieval.config, None, ids)
    sequence = world.user_sequence(*demo_request(world))
    fresh, _ = _swap_folders(directory)
    shutil.rmtree(fresh, ignore_errors=True)
    posts = Corpus(
        post_ids=corpus["post_ids"],
        candidate_representations=vectors.astype(np.float32),
        author_ids=corpus["author_ids"],
        topics=np.array(world.topic_names)[corpus["topics"]],
        creation_times=corpus["creation_times"],
    )
    try:
        write_artifacts(fresh, retrieval, ranker, posts, sequence)
    except OSError as error:  # (a full disk) named by the folder asked for, not by `fresh`
        raise named_by(error, fresh, directory) from None
    _replace_folder(fresh, directory)
    return directory


def _swap_folders(directory: Path) -> tuple[Path, Path]:
    """The hidden siblings an export of `directory` writes the new folder to and moves the old
    one to (`write_artifacts` itself writes the new one under `.{fresh.name}.<random>`)."""
    return tuple(directory.with_name(f".{directory.name}.{end}") for end in ("new", "old"))


def _replace_folder(fresh: Path, directory: Path) -> None:
    _, old = _swap_folders(directory)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(fresh, directory)
    shutil.rmtree(old, ignore_errors=True)


def save_demo_checkpoint(
    path: Path, world_config: world_lib.WorldConfig, models: dict[str, ModelArtifacts]
) -> None:
    """Both models in float16 (a few MB; an array with a value beyond float16's range in
    float32) with their configs, hash functions and the world they were trained on: what
    `run_ranker.py` and `run_retrieval.py` load. Table rows that no id of the world hashes to,
    which no lookup in that world reaches (row 0, padding, is read and masked), are stored as
    zeros, and the file compressed."""
    if not isinstance(world_config, world_lib.WorldConfig):
        raise TypeError(f"world_config must be a WorldConfig, got {_kind_of(world_config)}")
    if not (isinstance(models, dict) and set(models) == set(MODELS)):
        raise TypeError(
            f"models must be {{kind: ModelArtifacts}} of {MODELS}, got {_kind_of(models)}"
        )
    check_models_fit(world_config, models)
    counts = id_counts(world_config)
    arrays, configs = {}, {}
    for kind, model in models.items():
        for key, value in flatten_params(model.params).items():
            arrays[f"{kind}/params/{key}"] = _half(value)
        for entity, name in TABLE_NAMES.items():
            table = _half(model.tables[name])
            used = np.zeros(len(table), bool)
            used[getattr(model.hashing, entity).rows_of_ids(counts[entity])] = True
            arrays[f"{kind}/tables/{name}"] = np.where(used[:, None], table, np.float16(0))
        configs[kind] = config_to_json(model.config, model.hashing)
    meta = {"world": world_config.to_json(), "configs": configs, "command": DEMO_COMMAND}
    write_npz({**arrays, "meta": np.array(json.dumps(meta))}, path, compressed=True)


def _half(value) -> np.ndarray:
    """float16, or float32 as it is where a value lies beyond float16's range (65,504), which
    float16 would store as infinity."""
    value = np.asarray(value, np.float32)
    fits = np.abs(value).max(initial=0.0) <= np.finfo(np.float16).max
    return value.astype(np.float16) if fits else value


def _table_names_problem(tables: dict) -> str | None:
    """What is missing from or foreign to a model's tables, in words, or None."""
    names = list(TABLE_NAMES.values())
    if missing := [name for name in names if name not in tables]:
        return f"lack {', '.join(missing)}"
    if foreign := sorted(set(tables) - set(names)):
        return f"hold {', '.join(foreign)}, which no model reads (expected {', '.join(names)})"
    return None


def load_demo_checkpoint(
    path: str | os.PathLike = DEMO_CHECKPOINT,
) -> tuple[world_lib.WorldConfig, dict[str, ModelArtifacts]]:
    """The world config and both models (float32, checked against their configs) of a demo
    checkpoint."""
    path = as_path(path)
    arrays = read_npz(path)
    if "meta" not in arrays:
        raise ValueError(f"{path}: not a demo checkpoint (no meta entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
        meta["world"], meta["configs"]["retrieval"], meta["configs"]["ranker"]  # noqa: B018
        keys = [key.split("/", 2) for key in arrays]
        if any(len(k) != 3 or k[0] not in MODELS or k[1] not in ("params", "tables") for k in keys):
            raise ValueError("an entry that is not a model's parameter or table")
    except KeyError as error:
        raise ValueError(f"{path}: not a demo checkpoint (its meta has no {error})") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a demo checkpoint ({error})") from None
    for kind in MODELS:
        check_config_json(meta["configs"][kind], f"{path}: its {kind} config", kind)
    models = {}
    parts: dict[str, dict] = {kind: {"params": {}, "tables": {}} for kind in MODELS}
    for (kind, part, name), value in zip(keys, arrays.values(), strict=True):
        if value.dtype.kind != "f":
            raise ValueError(f"{path}: {kind}/{part}/{name} is {value.dtype}, expected floats")
        parts[kind][part][name] = np.asarray(value, np.float32)
    for kind in MODELS:
        tables = parts[kind]["tables"]
        if problem := _table_names_problem(tables):
            raise ValueError(f"{path}: the {kind}'s tables {problem}")
    ranker_params = unflatten_params(parts["ranker"]["params"])
    configs = dict(
        zip(
            MODELS[::-1],
            configs_from_json(
                meta["configs"]["retrieval"], meta["configs"]["ranker"], ranker_params, jnp.float32
            ),
            strict=True,
        )
    )
    for kind in MODELS:
        params = unflatten_params(parts[kind]["params"])
        optional = {"/".join(LOG_TEMPERATURE): ()} if kind == "retrieval" else {}
        try:
            check_params(params, param_shapes(configs[kind]), optional)
        except ValueError as error:
            raise ValueError(f"{path}: {kind}: {error}") from None
        hashing = Hashing.from_json(meta["configs"][kind])
        models[kind] = ModelArtifacts(configs[kind], params, parts[kind]["tables"], hashing)
    try:
        world_config = world_lib.WorldConfig.from_json(meta["world"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: its world config: {error}") from None
    check_models_fit(world_config, models, f"{path}: its ")
    return world_config, models


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="train.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", type=cli.path_arg, required=True, help="the run's folder")
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both", help="(both)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        help="train each model to this step (ranker 2200, retrieval 500)",
    )
    parser.add_argument(
        "--decay-steps",
        type=positive_int,
        help="length of the learning-rate schedule, whatever --steps is (as --steps' defaults)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--seed", type=seed_int, default=0, help="world and training (0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny world and few steps (both models: 30 steps, batches of 32, table learning "
        "rate 3e-2, evaluated every 15; the defaults in parentheses are the default world's)",
    )
    default = world_lib.WorldConfig()
    parser.add_argument(
        "--users", type=positive_int, help=f"users of the world ({default.num_users:,})"
    )
    parser.add_argument(
        "--posts", type=positive_int, help=f"posts of the world ({default.num_posts:,})"
    )
    parser.add_argument("--batch-size", type=positive_int, help="(ranker 64, retrieval 256)")
    parser.add_argument("--eval-every", type=positive_int, help="(ranker 250, retrieval 125)")
    parser.add_argument("--learning-rate", type=positive_float, help="of the model (5e-3)")
    parser.add_argument(
        "--table-learning-rate",
        type=positive_float,
        help="of the tables (ranker 3e-2, retrieval 5e-2)",
    )
    parser.add_argument(
        "--table-optimizer", choices=tuple(TABLE_OPTIMIZERS), help="of the tables (adam)"
    )
    parser.add_argument(
        "--negatives",
        type=non_negative_int,
        help="retrieval's global negatives per batch, drawn uniformly from the corpus (64)",
    )
    parser.add_argument("--no-export", action="store_true", help="skip artifacts and plots")
    args = parser.parse_args(argv)
    if args.model == "ranker" and args.negatives is not None:  # rather than recorded, unread
        parser.error("--negatives is retrieval's setting; --model ranker trains the ranker alone")
    return args


def run_configs(args) -> tuple[world_lib.WorldConfig, dict[str, TrainConfig]]:
    world_config = (world_lib.WorldConfig.tiny if args.quick else world_lib.WorldConfig)(
        seed=args.seed
    )
    sizes = {"num_users": args.users, "num_posts": args.posts}
    world_config = dataclasses.replace(
        world_config, **{k: v for k, v in sizes.items() if v is not None}
    )
    flags = {
        "steps": args.steps,
        "decay_steps": args.decay_steps,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "learning_rate": args.learning_rate,
        "table_learning_rate": args.table_learning_rate,
        "table_optimizer": args.table_optimizer,
        "negatives": args.negatives,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    trains = {  # a model's config holds the other model's defaults, not its flags
        kind: dataclasses.replace(
            TrainConfig.for_model(kind, args.quick),
            seed=args.seed,
            **{k: v for k, v in flags.items() if k not in OTHER_MODELS_SETTINGS[kind]},
        )
        for kind in MODELS
    }
    return world_config, trains


# What a run writes in its folder: the only entries a folder given to --out may already hold.
RUN_OUTPUTS = frozenset(
    {
        "artifacts", "state", "eval.json", "eval_predictions.npz", "training_curves.png",
        "auroc.png", "calibration.png", "demo_checkpoint.npz",
    }
)  # fmt: skip


def interrupted_writes(out: Path) -> list[Path]:
    """What a run killed while it wrote (SIGKILL, a power cut) left in its folder: the
    temporaries its files and artifacts are written under before they get their names, which
    no finished write leaves."""
    if not out.is_dir():
        return []

    def temporary(name: str, outputs) -> bool:  # what `atomic_path` writes them under
        return any(name.startswith(f".{o}.") and name.endswith(PARTIAL) for o in outputs)

    swap = [p.name for p in _swap_folders(out / "artifacts")]
    found = [
        p
        for p in out.iterdir()
        if temporary(p.name, RUN_OUTPUTS)
        or p.name in swap
        or p.name.startswith((f".{swap[0]}.", cli.PROBE_PREFIX))
    ]
    if (out / "state").is_dir():
        saved = {f"{kind}{suffix}" for kind in MODELS for suffix in (".npz", "_log.json")}
        found += [p for p in (out / "state").iterdir() if temporary(p.name, saved)]
    return sorted(found)


def check_run_folder(out: Path, kinds: tuple[str, ...], resume: bool) -> None:
    """Before any work: the folder is new or a run's own; a new run must not overwrite a
    trained model, a resumed one needs at least one (one not saved yet starts afresh)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    if problem := file_in_a_folder(out):
        raise ValueError(f"--out {out}: {problem}")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write there (no permission, or read-only)")
    leftovers = {p.name for p in interrupted_writes(out)}
    foreign = (
        sorted(p.name for p in out.iterdir() if p.name not in RUN_OUTPUTS | leftovers)
        if out.is_dir()
        else []
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"--out {out}: holds files that are not a training run's ({shown}); choose a new "
            "or empty folder"
        )
    if problem := export_problem(out / "artifacts"):  # found now, not after the training
        raise ValueError(f"--out {out}: artifacts/ {problem}")
    saved = [kind for kind in kinds if (out / "state" / f"{kind}.npz").exists()]
    if resume and not saved:
        raise FileNotFoundError(
            (
                f"{out / 'state'}: no saved {' or '.join(kinds)}"
                if out.is_dir()
                else f"--out {out}: no such folder"
            )
            + ": nothing to resume (run without --resume)"
        )
    if not resume and saved:
        raise ValueError(
            f"{out} already holds a trained {saved[0]}; pass --resume to continue it or choose "
            "another --out"
        )


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # before the first computation; a step's 174 MB block is then reused
    args = parse_args(argv)
    out = Path(args.out)
    kinds = MODELS if args.model == "both" else (args.model,)
    made = not out.is_dir()
    if made:  # (a folder that is there is checked once it is held, below)
        check_run_folder(out, kinds, args.resume)
    try:  # now, not when the first state is saved
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot make the folder ({error.strerror})") from None
    try:
        with run_folder_lock(out):  # held first: a run training into it is named as such
            check_run_folder(out, kinds, args.resume)
            leftovers = interrupted_writes(out)
            for path in leftovers:  # no run is writing them: this one holds the folder
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if leftovers:
                names = ", ".join(str(p.relative_to(out)) for p in leftovers)
                print(f"removed what a run stopped while writing left in {out}: {names}")
            return train_and_report(args, out, kinds)
    except BaseException:
        if made and not any(out.iterdir()):  # a run that failed before writing leaves nothing
            out.rmdir()
        raise


@contextlib.contextmanager
def run_folder_lock(out: Path):
    """Holds the run folder for one run at a time: a second run into it, which would mix the
    two runs' states and outputs, is refused (ValueError). Where there is no `fcntl`
    (Windows), nothing is held."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"--out {out}: another run is training into this folder; wait for it to end, "
                "or choose another folder"
            ) from None
        yield
    finally:
        os.close(folder)  # (which releases the lock)


def train_and_report(args: argparse.Namespace, out: Path, kinds: tuple[str, ...]) -> int:
    """What `main` does once the run's folder is there."""
    world_config, trains = run_configs(args)
    started = time.perf_counter()

    try:
        check_memory(world_config.memory_bytes(), f"a world of {world_config.num_users:,} users")
        world = world_lib.build_world(world_config)
    except ValueError as error:
        sizes = [f" --{k} {v}" for k, v in (("users", args.users), ("posts", args.posts)) if v]
        raise ValueError(f"cannot build the world{''.join(sizes)}: {error}") from None
    print(
        f"world (seed {world_config.seed}): {world.num_users:,} users, {world.num_posts:,} posts, "
        f"{world.num_authors:,} authors, {len(world.topic_names)} topics; ranking "
        f"{len(world.ranking_train):,} train / {len(world.ranking_eval):,} held-out requests, "
        f"retrieval {len(world.retrieval_train):,} / {len(world.retrieval_eval):,} queries "
        f"({time.perf_counter() - started:.1f} s)"
    )
    mesh = data_mesh()
    print(f"devices: {len(mesh.devices.ravel())} x {jax.devices()[0].platform}")
    params, logs = {}, {}
    state_dir = out / "state"
    # Every model this run trains or reads back (one trained earlier into the same folder),
    # checked against the world before any of them trains.
    jobs = {
        kind: make_job(kind, world, trains[kind], to_train=kind in kinds)
        for kind in MODELS
        if kind in kinds or (state_dir / f"{kind}.npz").is_file()
    }
    for kind in kinds:
        check_batch_split(jobs[kind].train, mesh)
    training = {kind: dataclasses.asdict(job.train) for kind, job in jobs.items()}
    for kind in jobs.keys() - kinds:  # read, and checked, before anything trains
        params[kind], logs[kind], training[kind] = load_trained(
            state_dir, jobs[kind], BESIDE_ADVICE
        )
    # A resumed run reads (and checks) every saved state before anything trains, and starts a
    # model it had not saved yet from step 0.
    starts = {
        kind: load_progress(state_dir, job, initial_state(kind, job.config, job.hashing, job.train))
        for kind, job in jobs.items()
        if kind in kinds and args.resume and (state_dir / f"{kind}.npz").is_file()
    }
    for kind in kinds:
        if args.resume and kind not in starts:
            print(f"{kind}: no state saved in {state_dir} yet; it trains from step 0")
        state, logs[kind] = fit(jobs[kind], state_dir, mesh=mesh, start=starts.pop(kind, None))
        params[kind] = jax.device_get(state.params)

    print("evaluating on the held-out split ...")
    report, predictions = {}, {}
    if "ranker" in jobs:
        report["ranking"], arrays = evaluate_ranker(jobs["ranker"], params["ranker"])
        predictions.update(arrays)
    if "retrieval" in jobs:
        report["retrieval"], arrays = evaluate_retrieval(jobs["retrieval"], params["retrieval"])
        predictions.update(arrays)
    report["examples"] = {
        "train": {"ranking": len(world.ranking_train), "retrieval": len(world.retrieval_train)},
        "eval": {"ranking": len(world.ranking_eval), "retrieval": len(world.retrieval_eval)},
    }
    report["training"] = training
    report["steps"] = {kind: logs[kind][-1]["step"] if logs[kind] else 0 for kind in jobs}
    report["skipped_updates"] = {
        kind: int(logs[kind][-1]["skipped"]) if logs[kind] else 0 for kind in jobs
    }
    for line in report_lines(report):
        print(line)
    default_world = world_config == world_lib.WorldConfig(seed=world_config.seed)
    report["goals_met"] = print_goals(report, default_world)
    # eval.json, written last, marks a set of outputs of one run: none while they are written.
    (out / "eval.json").unlink(missing_ok=True)
    write_npz({**predictions, "actions": np.array(ACTIONS)}, out / "eval_predictions.npz")
    written = ["eval.json", "eval_predictions.npz", "state/"]
    if not args.no_export:
        plot_curves(logs, out / "training_curves.png")
        written.append("training_curves.png")
        if "ranking" in report:
            plot_auroc(report["ranking"]["actions"], out / "auroc.png")
            plot_calibration(predictions, out / "calibration.png")
            written += ["auroc.png", "calibration.png"]
        if len(jobs) == 2:
            models = {kind: model_artifacts(jobs[kind], params[kind]) for kind in MODELS}
            export_artifacts(out / "artifacts", world, models["retrieval"], models["ranker"])
            save_demo_checkpoint(out / "demo_checkpoint.npz", world_config, models)
            written += ["artifacts/", "demo_checkpoint.npz"]
        else:
            missing = next(kind for kind in MODELS if kind not in jobs)
            print(
                f"(artifacts/ and demo_checkpoint.npz need both models: train the {missing} "
                f"with --model {missing})"
            )
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(report, out / "eval.json")
    print(f"\nwrote {', '.join(written)} in {out} ({report['seconds']:.0f} s in all)")
    kept = sorted(RUN_OUTPUTS - {"state", *(name.rstrip("/") for name in written)})
    kept = [name for name in kept if (out / name).exists()]
    if kept:
        print(f"left as an earlier run wrote them, not rewritten by this one: {', '.join(kept)}")
    return 0


@_per_config
def _demo_world(world_config: world_lib.WorldConfig) -> world_lib.World:
    """The demo's world, built once per process for each config (both demos may ask)."""
    return world_lib.build_world(world_config)


def load_demo(
    path: str | os.PathLike = DEMO_CHECKPOINT, user_id: int | None = None
) -> tuple[world_lib.World, dict[str, ModelArtifacts], str]:
    """(world, models, a line saying what was loaded) for the demo scripts: the checkpoint's
    models and the world they were trained on, rebuilt from its config (a `user_id` the world
    does not have is refused before it is built)."""
    path = require_file(
        path, f"; make one with `{DEMO_COMMAND}` (it writes runs/default/demo_checkpoint.npz)"
    )
    world_config, models = load_demo_checkpoint(path)
    if user_id is not None:
        check_user(user_id, world_config.num_users)
    check_memory(world_config.memory_bytes(), f"{path}: rebuilding its world")
    world = _demo_world(world_config)
    shipped = path.resolve() == DEMO_CHECKPOINT.resolve()
    made = f"{path.name} (made by `{DEMO_COMMAND}`)" if shipped else str(path)
    note = (
        f"Trained model: {made}, on the synthetic world of seed "
        f"{world_config.seed}: {world.num_users:,} users, {world.num_posts:,} posts, "
        f"{len(world.topic_names)} topics, rebuilt from the checkpoint's world config"
    )
    return world, models, note


def open_demo(
    path: str | os.PathLike, user_id: int | None, kind: str
) -> tuple[world_lib.World, ModelArtifacts, int, int]:
    """How both demo scripts open: `kind`'s model and its world (`load_demo`), and the user and
    time of the request shown (`demo_request`), once it has printed what it loaded, in how long,
    and who the user is. Returns (world, model, user id, time)."""
    if kind not in MODELS:
        raise ValueError(f"kind must be one of {MODELS}, got {kind!r}")
    start = time.perf_counter()
    try:
        world, models, note = load_demo(path, user_id)
    except FileNotFoundError as error:  # the demos' other way, which the library does not have
        raise FileNotFoundError(f"{error}, or pass --random-weights") from None
    user, when = demo_request(world, user_id)
    print(note + f" ({time.perf_counter() - start:.1f} s)")
    print(f"\n{world.describe_user(user)}")
    print(f"  {world.describe_history(user, when)}")
    return world, models[kind], user, when


if __name__ == "__main__":
    sys.exit(
        run_main(
            main,
            "train.py",
            "interrupted; --resume continues from the last state saved (at each evaluation "
            "and at the end of each model), if there is one, and writes the outputs again "
            "(eval.json is written last: without it they are not of one run)",
        )
    )
