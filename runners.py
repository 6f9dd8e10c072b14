"""Runners: initialise the models, JIT-compile them, rank and retrieve; example data.

`RecsysInferenceRunner.rank` is one compiled function per input shape: it encodes each user's
history once and scores the candidates against it in blocks (see
`grok.Transformer.score_candidates`), so it takes any number of candidates.
`RecsysRetrievalInferenceRunner.retrieve` searches the corpus with `search.top_k_search` (in one
pass with the native kernel on the CPU, block by block in XLA elsewhere), and shard by shard
when the corpus is a `jax.Array` sharded along its rows over several devices.

Whatever enters a runner is checked before any work: inputs (`validate_inputs`), parameters
(against the tree the model would initialise: paths, shapes, dtypes, finite values) and sizes
whose memory would plainly not fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from checkpoint import (
    LOG_TEMPERATURE,
    check_params,
    load_embedding_table,
    load_model_params,
    param_shapes,
)
from grok import TrainingState, TransformerConfig, ffn_size
from recsys_model import (
    ACTIONS,
    PhoenixModelConfig,
    RecsysBatch,
    RecsysEmbeddings,
    RecsysModelOutput,
    create_dummy_batch_from_config,
    create_dummy_embeddings_from_config,
    dummy_inputs,
    is_integer,
    map_candidates,
    require_kind,
    validate_inputs,
)
from recsys_retrieval_model import PhoenixRetrievalModelConfig, RetrievalOutput
from search import check_top_k, first_repeated, sharded_top_k_search, validate_corpus

__all__ = [
    "ACTIONS",
    "CONTINUOUS_ACTIONS",
    "NEGATIVE_FEEDBACK_INDICES",
    "BaseInferenceRunner",
    "BaseModelRunner",
    "ModelRunner",
    "RankingOutput",
    "RecsysInferenceRunner",
    "RecsysRetrievalInferenceRunner",
    "RetrievalModelRunner",
    "RetrievalOutput",
    "check_params",
    "create_dummy_batch_from_config",
    "create_dummy_embeddings_from_config",
    "create_example_batch",
    "create_example_corpus",
    "load_embedding_table",
    "load_model_params",
    "map_candidates",
    "randomize_params",
]

# Candidates are ranked by the probability of this action.
RANKING_ACTION = ACTIONS.index("favorite_score")
# Candidates scored per step of the cached ranking path: bounds its memory.
DEFAULT_CANDIDATE_BLOCK = 1024

# The second release's continuous values, in the order of the continuous head's outputs.
CONTINUOUS_ACTIONS = [
    "reserved",
    "dwell_time",
    "video_watch_time",
    "scroll_depth",
    "reserved_3",
    "reserved_4",
    "reserved_5",
    "reserved_6",
]
# Indices in ACTIONS of the negative feedback.
NEGATIVE_FEEDBACK_INDICES = [
    ACTIONS.index(name)
    for name in ("not_interested_score", "block_author_score", "mute_author_score", "report_score")
]

RankingOutput = NamedTuple(
    "RankingOutput",
    [("scores", jax.Array), ("ranked_indices", jax.Array)]
    + [(f"p_{action}", jax.Array) for action in ACTIONS]
    + [("continuous_preds", jax.Array | None)],
)
RankingOutput.__new__.__defaults__ = (None,)
RankingOutput._field_defaults = {"continuous_preds": None}  # as a class body would record it
RankingOutput.__doc__ = """Probabilities scores [B, C, A] (sigmoid of the logits, float32),
ranked_indices [B, C] (descending favorite probability, padded candidates last), one field
p_<action> [B, C] per action of `ACTIONS`, and the second release's continuous predictions
[B, C, Nc] (float32; None for a first-release model)."""


# ---------------------------------------------------------------------------------------------
# Example inputs and parameters.
# ---------------------------------------------------------------------------------------------


# Impression time of example candidates (unix seconds, November 2023).
EXAMPLE_IMPRESSION_TIME = 1_700_000_000


def example_bytes(
    b: int, s: int, c: int, d: int, num_actions: int, user_hashes: int, item_author_hashes: int
) -> int:
    """Memory `create_example_batch` takes (twice what it returns: drawn, then masked):
    float32 embeddings of every hash and float64 action draws."""
    return 2 * (4 * b * (user_hashes + (s + c) * item_author_hashes) * d + 8 * b * s * num_actions)


# The least value of each size `create_example_batch` takes (1 where not named): hashes are
# drawn in [1, table size), the dwell time is continuous action 1.
EXAMPLE_SIZE_LOWS = {
    "batch_size": 0, "history_len": 0, "num_candidates": 0, "seed": 0,
    "num_user_embeddings": 2, "num_post_embeddings": 2, "num_author_embeddings": 2,
    "num_continuous_actions": 2,
}  # fmt: skip


def create_example_batch(
    batch_size: int,
    emb_size: int,
    history_len: int,
    num_candidates: int,
    num_actions: int,
    num_user_hashes: int = 2,
    num_item_hashes: int = 2,
    num_author_hashes: int = 2,
    product_surface_vocab_size: int = 16,
    num_user_embeddings: int = 1_000_000,
    num_post_embeddings: int = 1_000_000,
    num_author_embeddings: int = 1_000_000,
    include_continuous_actions: bool = False,
    include_timestamps: bool = False,
    num_continuous_actions: int = 8,
    seed: int | None = 0,
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """A random batch, drawn from `seed` (None: numpy's fresh entropy): hashes in [1, table
    size), a random tail of each history padded with 0, about 30 % of action bits set,
    standard-normal embeddings (zero where padded).

    Second-release inputs on request: continuous actions [B, S, Nc] (exponential, mean 10;
    column 1 is the dwell time in seconds; zero where padded), and candidate impression and
    creation times (unix seconds; post ages up to four days).
    """
    sizes = dict(
        batch_size=batch_size, emb_size=emb_size, history_len=history_len,
        num_candidates=num_candidates, num_actions=num_actions, num_user_hashes=num_user_hashes,
        num_item_hashes=num_item_hashes, num_author_hashes=num_author_hashes,
        product_surface_vocab_size=product_surface_vocab_size,
        num_user_embeddings=num_user_embeddings, num_post_embeddings=num_post_embeddings,
        num_author_embeddings=num_author_embeddings,
        num_continuous_actions=num_continuous_actions if include_continuous_actions else 2,
        seed=0 if seed is None else seed,  # (None is checked as 0)
    )  # fmt: skip
    for name, value in sizes.items():
        low = EXAMPLE_SIZE_LOWS.get(name, 1)
        high = 2**31 if name.endswith("_embeddings") else None  # hashes are int32
        if not is_integer(value) or value < low or (high and value > high):
            within = f"in [{low}, {high}]" if high else f">= {low}"
            raise ValueError(f"{name} must be an integer {within}, got {value!r}")
    b, s, c, d = batch_size, history_len, num_candidates, emb_size
    check_memory(
        example_bytes(
            b, s, c, d, num_actions, num_user_hashes, num_item_hashes + num_author_hashes
        ),
        f"example inputs of {b} users, history {s} and {c} candidates",
    )
    rng = np.random.default_rng(seed)

    def hashes(shape, table_size):
        return rng.integers(1, table_size, size=shape, dtype=np.int64).astype(np.int32)

    # Each history keeps a random number of leading items (at least one) and pads the rest.
    lengths = rng.integers(1, s + 1, size=(b, 1)) if s else np.zeros((b, 1), np.int64)
    valid = np.arange(s)[None, :] < lengths  # [B, S]
    history_post = hashes((b, s, num_item_hashes), num_post_embeddings) * valid[..., None]
    history_author = hashes((b, s, num_author_hashes), num_author_embeddings) * valid[..., None]
    actions = (rng.random((b, s, num_actions)) < 0.3) & valid[..., None]
    batch = RecsysBatch(
        user_hashes=hashes((b, num_user_hashes), num_user_embeddings),
        history_post_hashes=history_post,
        history_author_hashes=history_author,
        history_actions=actions.astype(np.float32),
        history_product_surface=(
            rng.integers(0, product_surface_vocab_size, (b, s)) * valid
        ).astype(np.int32),
        candidate_post_hashes=hashes((b, c, num_item_hashes), num_post_embeddings),
        candidate_author_hashes=hashes((b, c, num_author_hashes), num_author_embeddings),
        candidate_product_surface=rng.integers(0, product_surface_vocab_size, (b, c)).astype(
            np.int32
        ),
    )
    if include_continuous_actions:
        continuous = rng.exponential(10.0, (b, s, num_continuous_actions)) * valid[..., None]
        batch = batch._replace(history_continuous_actions=continuous.astype(np.float32))
    if include_timestamps:
        impressions = np.full((b, c), EXAMPLE_IMPRESSION_TIME, np.int64)
        ages = rng.integers(0, 4 * 24 * 3600, (b, c))
        batch = batch._replace(
            candidate_impr_ts=impressions, candidate_post_creation_ts=impressions - ages
        )

    def normal(shape, mask=None):
        x = rng.standard_normal(shape, dtype=np.float32)
        return x if mask is None else x * mask

    history_mask = valid[..., None, None].astype(np.float32)
    embeddings = RecsysEmbeddings(
        user_embeddings=normal((b, num_user_hashes, d)),
        history_post_embeddings=normal((b, s, num_item_hashes, d), history_mask),
        candidate_post_embeddings=normal((b, c, num_item_hashes, d)),
        history_author_embeddings=normal((b, s, num_author_hashes, d), history_mask),
        candidate_author_embeddings=normal((b, c, num_author_hashes, d)),
    )
    return batch, embeddings


def create_example_corpus(
    corpus_size: int, emb_size: int, seed: int = 123
) -> tuple[np.ndarray, np.ndarray]:
    """Random unit-norm corpus vectors [N, D] float32 and post ids arange(N)."""
    for name, value, low in (("corpus_size", corpus_size, 1), ("emb_size", emb_size, 1)):
        if not is_integer(value) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if seed is not None and (not is_integer(seed) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    # The vectors twice (at their normalisation, and the copy a runner searches) and the ids.
    check_memory(
        (2 * 4 * emb_size + 8) * corpus_size,
        f"a corpus of {corpus_size:,} posts of width {emb_size}",
    )
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((corpus_size, emb_size), dtype=np.float32)
    corpus /= np.maximum(np.linalg.norm(corpus, axis=1, keepdims=True), 1e-6)
    return corpus, np.arange(corpus_size)


def randomize_params(params: hk.Params, seed: int) -> hk.Params:
    """Random non-zero parameters of the same tree: norm scales 1 + N(0, 0.1^2), every other
    array normal with variance 1 / (its first dimension). For demos and tests of an untrained
    model, whose published initialisation (zero norm scales) makes every logit 0."""
    if not is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    leaves = jax.tree.leaves(params)  # (Haiku's immutable trees are mappings, not dicts)
    if not (isinstance(params, Mapping) and leaves and all(hasattr(x, "shape") for x in leaves)):
        raise TypeError(
            "params must be a parameter tree, modules of named arrays (as `param_shapes` or "
            f"`init` give), got {type(params).__name__}"
        )
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if getattr(path[-1], "key", None) == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), jnp.float32)
        fan_in = x.shape[0] if x.shape else 1  # a scalar (retrieval's log_temperature): N(0, 1)
        return jnp.asarray(rng.standard_normal(x.shape) / math.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


# ---------------------------------------------------------------------------------------------
# What enters a runner: parameters that fit the model, sizes that fit in memory.
# ---------------------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes the default device can still allocate (on the CPU: the host's available memory),
    or None if it cannot be told."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


# Requests needing less than this are not checked: they fit on any machine that runs the model,
# and a serving loop should not read /proc/meminfo for every user.
ALWAYS_FITS = 256 * 2**20


def check_memory(needed: float, what: str) -> None:
    """Raises ValueError, in one line, if `needed` bytes plainly exceed the available memory."""
    if needed < ALWAYS_FITS:
        return
    available = available_memory()
    if available is not None and needed > available:
        digits = 1 if f"{needed / 2**30:.1f}" != f"{available / 2**30:.1f}" else 2
        raise ValueError(
            f"{what} would need about {needed / 2**30:.{digits}f} GiB of memory; "
            f"{available / 2**30:.{digits}f} GiB is available"
        )


def attention_bytes(config: Any, batch_size: int, queries: int, keys: int) -> float:
    """A lower bound on the working memory of one attention layer over `queries` x `keys`
    pairs: float32 logits and weights for every query head, plus the feed-forward activations."""
    t = config.model
    logits = 2 * 4 * batch_size * t.num_q_heads * queries * keys
    activations = 4 * 4 * batch_size * queries * ffn_size(config.emb_size, t.widening_factor)
    return logits + activations


# ---------------------------------------------------------------------------------------------
# Model runners: configuration -> Haiku functions and initial parameters.
# ---------------------------------------------------------------------------------------------


class BaseModelRunner:
    """Holds a model configuration and builds its Haiku forward function."""

    def __init__(self, bs_per_device: float = 2.0, rng_seed: int = 42):
        self.bs_per_device = bs_per_device
        self.rng_seed = rng_seed
        self.batch_size: int | None = None
        self.forward: hk.Transformed | None = None

    def make_forward_fn(self) -> hk.Transformed:
        raise NotImplementedError

    def initialize(self) -> None:
        """Sets `batch_size` and builds `forward`.

        Unlike the published runner, this keeps the configured `fprop_dtype` (the published one
        silently forces bfloat16).
        """
        self.batch_size = max(1, int(self.bs_per_device * jax.local_device_count()))
        self.forward = self.make_forward_fn()

    def _require_initialized(self) -> None:
        if self.forward is None:
            raise ValueError(f"{type(self).__name__}.initialize() must be called first")


class ModelRunner(BaseModelRunner):
    """Runner of the ranking model (`PhoenixModelConfig`)."""

    def __init__(self, model: PhoenixModelConfig, bs_per_device: float = 2.0, rng_seed: int = 42):
        super().__init__(bs_per_device, rng_seed)
        require_kind(model, PhoenixModelConfig, "model")
        self.model = model

    def make_forward_fn(self) -> hk.Transformed:
        """The dense forward: (batch, embeddings) -> RecsysModelOutput."""
        return hk.transform(lambda batch, embeddings: self.model.make()(batch, embeddings))

    def make_cached_fns(self) -> tuple[hk.Transformed, hk.Transformed]:
        """The cached path, sharing `forward`'s parameters: encode(batch, embeddings) -> KVCache
        and score(context, batch, embeddings, candidate_offset, candidate_slots=None) ->
        RecsysModelOutput."""
        encode = hk.transform(lambda b, e: self.model.make().encode_context(b, e))
        score = hk.transform(
            lambda ctx, b, e, off, slots=None: self.model.make().score_candidates(
                ctx, b, e, off, candidate_slots=slots
            )
        )
        return encode, score

    def param_shapes(self) -> hk.Params:
        """The shapes and dtypes of the parameters `init` creates (nothing is computed)."""
        return param_shapes(self.model)

    def init(
        self, rng: jax.Array, data: RecsysBatch, embeddings: RecsysEmbeddings
    ) -> TrainingState:
        self._require_initialized()
        # Compiled: running the initialiser eagerly dispatches hundreds of small ops (~10 s).
        return TrainingState(jax.jit(self.forward.init)(rng, data, embeddings))

    def load_or_init(
        self,
        init_data: RecsysBatch,
        init_embeddings: RecsysEmbeddings,
        checkpoint_path: str | os.PathLike | None = None,
    ) -> TrainingState:
        """Parameters from `checkpoint_path` (an npz in the published layout), checked against
        this model's tree, or freshly initialised."""
        if checkpoint_path is None:
            return self.init(jax.random.PRNGKey(self.rng_seed), init_data, init_embeddings)
        params = load_model_params(checkpoint_path)
        try:
            check_params(params, self.param_shapes())
        except ValueError as error:
            raise ValueError(f"{checkpoint_path}: {error}") from None
        return TrainingState(params)


class RetrievalModelRunner(BaseModelRunner):
    """Runner of the retrieval model (`PhoenixRetrievalModelConfig`)."""

    def __init__(
        self, model: PhoenixRetrievalModelConfig, bs_per_device: float = 2.0, rng_seed: int = 42
    ):
        super().__init__(bs_per_device, rng_seed)
        require_kind(model, PhoenixRetrievalModelConfig, "model")
        self.model = model

    def make_forward_fn(self) -> hk.Transformed:
        """(batch, embeddings, corpus_embeddings, top_k, corpus_mask=None) -> RetrievalOutput.

        At `init` it also builds the candidate tower, so that every parameter is created.
        """

        def forward(batch, embeddings, corpus_embeddings, top_k, corpus_mask=None):
            model = self.model.make()
            if hk.running_init():
                model.build_candidate_representation(batch, embeddings)
            return model(batch, embeddings, corpus_embeddings, top_k, corpus_mask)

        return hk.transform(forward)

    def param_shapes(self, num_actions: int = len(ACTIONS)) -> hk.Params:
        """The shapes and dtypes of the parameters `init` creates for histories of
        `num_actions` actions (the retrieval config does not fix it)."""
        return param_shapes(self.model, num_actions)

    def init(
        self,
        rng: jax.Array,
        data: RecsysBatch,
        embeddings: RecsysEmbeddings,
        corpus_embeddings: jax.Array,
        top_k: int,
    ) -> TrainingState:
        self._require_initialized()
        init = jax.jit(self.forward.init, static_argnums=4)
        return TrainingState(init(rng, data, embeddings, corpus_embeddings, top_k))

    def load_or_init(
        self,
        init_data: RecsysBatch,
        init_embeddings: RecsysEmbeddings,
        corpus_embeddings: jax.Array,
        top_k: int,
    ) -> TrainingState:
        rng = jax.random.PRNGKey(self.rng_seed)
        return self.init(rng, init_data, init_embeddings, corpus_embeddings, top_k)


# ---------------------------------------------------------------------------------------------
# Inference runners.
# ---------------------------------------------------------------------------------------------


class BaseInferenceRunner:
    """A named inference runner around a model runner.

    `params` may be assigned directly; whatever is assigned is checked against the model's
    parameter tree first.
    """

    def __init__(self, name: str):
        self.name = name
        self._params: hk.Params | None = None

    @property
    def params(self) -> hk.Params | None:
        return self._params

    @params.setter
    def params(self, params: hk.Params | None) -> None:
        if params is not None:
            check_params(params, self._param_shapes(params), self._optional_params)
        self._params = params

    # Parameters a tree may hold beyond the model's own: {"module/name": shape}.
    _optional_params: dict[str, tuple] = {}

    def _param_shapes(self, params: hk.Params) -> hk.Params:
        raise NotImplementedError

    def _require_initialized(self) -> None:
        if self._params is None:
            raise ValueError(f"{type(self).__name__}.initialize() must be called first")


def _ranking_output(output: RecsysModelOutput, candidate_mask: jax.Array) -> RankingOutput:
    """Probabilities and the ranking of a model's outputs ([B, C, A] logits); padded
    candidates rank last."""
    scores = jax.nn.sigmoid(output.logits.astype(jnp.float32))
    key = jnp.where(candidate_mask, scores[:, :, RANKING_ACTION], -jnp.inf)
    ranked = jnp.argsort(-key, axis=-1, stable=True)
    probabilities = [scores[:, :, i] for i in range(len(ACTIONS))]
    continuous = output.continuous_preds
    continuous = None if continuous is None else continuous.astype(jnp.float32)
    return RankingOutput(scores, ranked, *probabilities, continuous)


def _blocked_outputs(score, batch, embeddings, slots, block: int) -> RecsysModelOutput:
    """The outputs [B, C, ...] of every candidate, `block` candidates per step of a `lax.map`
    (the last block padded with hash 0), each at its own position in the list."""
    num_candidates = batch.candidate_post_hashes.shape[1]
    if num_candidates <= block:
        return score(batch, embeddings, 0, slots)
    num_blocks = -(-num_candidates // block)
    extra = num_blocks * block - num_candidates

    def pad(x):  # [B, C, ...] -> [B, num_blocks * block, ...]
        return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))

    padded = map_candidates(batch, embeddings, pad)
    padded_slots = None if slots is None else jnp.pad(slots, (0, extra))

    def score_block(start):
        part = map_candidates(*padded, lambda x: jax.lax.dynamic_slice_in_dim(x, start, block, 1))
        if slots is None:
            return score(*part, start, None)
        return score(*part, start, jax.lax.dynamic_slice_in_dim(padded_slots, start, block))

    outputs = jax.lax.map(score_block, jnp.arange(num_blocks) * block)  # [blocks, B, block, ...]

    def merge(x):
        return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :num_candidates]

    return jax.tree.map(merge, outputs)


class RecsysInferenceRunner(BaseInferenceRunner):
    """Ranks candidates with a `ModelRunner`: `initialize()`, then `rank(batch, embeddings)`.

    `rank` takes any number of candidates. One compiled function per input shape encodes each
    user's history once and scores the candidates against it `candidate_block_size` at a time,
    with the same logits as the dense forward (`runner.forward`).
    """

    def __init__(
        self,
        runner: ModelRunner,
        name: str,
        candidate_block_size: int = DEFAULT_CANDIDATE_BLOCK,
    ):
        super().__init__(name)
        if not (is_integer(candidate_block_size) and candidate_block_size >= 1):
            raise ValueError(
                f"candidate_block_size must be an integer >= 1, got {candidate_block_size!r}"
            )
        require_kind(runner, ModelRunner, "runner")
        self.runner = runner
        self.candidate_block_size = int(candidate_block_size)  # a static shape

    def _param_shapes(self, params: hk.Params) -> hk.Params:
        return self.runner.param_shapes()

    def initialize(self, params: hk.Params | None = None) -> None:
        """Initialises parameters (or checks and takes `params`); compiles on first use."""
        runner = self.runner
        config = runner.model
        if config.num_actions < len(ACTIONS):
            raise ValueError(
                f"num_actions is {config.num_actions}, but RankingOutput has a field for each of "
                f"the {len(ACTIONS)} ACTIONS; rank needs num_actions >= {len(ACTIONS)}"
            )
        runner.initialize()
        if params is None:
            inputs = dummy_inputs(config, config.num_actions, runner.batch_size)
            self._params = runner.load_or_init(*inputs).params
        else:
            self.params = params
        encode, score = runner.make_cached_fns()

        def rank(params, batch, embeddings, slots, block):
            context = encode.apply(params, None, batch, embeddings)

            def score_block(batch, embeddings, start, slots):
                return score.apply(params, None, context, batch, embeddings, start, slots)

            outputs = _blocked_outputs(score_block, batch, embeddings, slots, block)
            return _ranking_output(outputs, batch.candidate_post_hashes[:, :, 0] != 0)

        self._rank = jax.jit(rank, static_argnames="block")

    def rank(
        self,
        batch: RecsysBatch,
        embeddings: RecsysEmbeddings,
        *,
        candidate_slots: Any | None = None,
    ) -> RankingOutput:
        """Probabilities and order of every candidate, for any number of candidates (none
        gives empty arrays).

        `candidate_slots` [C] (ints) places candidate c at slot `candidate_slots[c]` of the
        dense sequence instead of slot c: the published pipeline ranks in chunks of
        `candidate_seq_len`, which puts candidate c at slot c mod candidate_seq_len. A model
        with right-anchored positions puts every candidate at the same position anyway.
        """
        self._require_initialized()
        config = self.runner.model
        sizes = validate_inputs(batch, embeddings, config, config.num_actions)
        b, c = sizes["B"], sizes["C"]
        if isinstance(candidate_slots, jax.core.Tracer):
            raise TypeError(
                "candidate_slots must be concrete values (numpy, or a jax array), not traced "
                "inside jax.jit: rank checks them before it runs"
            )
        if candidate_slots is not None:
            candidate_slots = np.asarray(candidate_slots)
            if candidate_slots.shape != (c,) or candidate_slots.dtype.kind not in "iu":
                raise ValueError(
                    f"candidate_slots must be [C={c}] integers, got {candidate_slots.shape} "
                    f"{candidate_slots.dtype}"
                )
            if c and candidate_slots.min() < 0:  # slot -1 would be the last history position
                first = int(np.argmax(candidate_slots < 0))
                raise ValueError(
                    f"candidate_slots must be >= 0 (0 is the first candidate position), got "
                    f"{candidate_slots[first]} at [{first}]"
                )
            # Positions are float32 (as published), whole numbers exactly up to 2**24.
            highest = 2**24 - 1 - sizes["S"]
            if c and candidate_slots.max() > highest:
                first = int(np.argmax(candidate_slots > highest))
                raise ValueError(
                    f"candidate_slots must be at most {highest} (positions 1 + S + slot are "
                    f"float32, exact to 2**24), got {candidate_slots[first]} at [{first}]"
                )
        if c == 0:
            logits = jnp.zeros((b, 0, config.num_actions), jnp.float32)
            empty = None
            if config.release >= 2:
                empty = jnp.zeros((b, 0, config.num_continuous_actions), jnp.float32)
            return _ranking_output(RecsysModelOutput(logits, empty), jnp.zeros((b, 0), bool))
        self.check_fits(b, sizes["S"], c)
        block = min(c, self.candidate_block_size)
        return self._rank(self.params, batch, embeddings, candidate_slots, block=block)

    def memory_needed(self, batch_size: int, history_len: int, num_candidates: int) -> float:
        """A lower bound on the bytes ranking inputs of these sizes take."""
        config, b, s = self.runner.model, batch_size, history_len
        block = min(num_candidates, self.candidate_block_size)
        return attention_bytes(config, b, 1 + s, 1 + s) + attention_bytes(config, b, block, 2 + s)

    def check_fits(self, batch_size: int, history_len: int, num_candidates: int) -> None:
        """Raises ValueError if ranking inputs of these sizes would plainly not fit in memory."""
        check_memory(
            self.memory_needed(batch_size, history_len, num_candidates),
            f"ranking {batch_size} users with history {history_len} and {num_candidates} "
            "candidates",
        )


class RecsysRetrievalInferenceRunner(BaseInferenceRunner):
    """Encodes users and candidates and retrieves top-K posts from a corpus.

    Its parameters may hold the top-level `log_temperature` of trained and published
    retrieval checkpoints (it does not change retrieval).
    """

    _optional_params = {"/".join(LOG_TEMPERATURE): ()}

    def __init__(self, runner: RetrievalModelRunner, name: str):
        super().__init__(name)
        require_kind(runner, RetrievalModelRunner, "runner")
        self.runner = runner
        self.corpus_embeddings: jax.Array | None = None
        self.corpus_post_ids: np.ndarray | None = None

    def _param_shapes(self, params: hk.Params) -> hk.Params:
        # The action projection's rows are the number of actions the model was built for.
        projection = params.get("phoenix_retrieval_model", {}).get("action_projection")
        num_actions = len(ACTIONS) if projection is None else np.shape(projection)[0]
        return self.runner.param_shapes(num_actions)

    def initialize(self, params: hk.Params | None = None) -> None:
        """Initialises parameters (or checks and takes `params`); compiles on first use."""
        runner = self.runner
        runner.initialize()
        config = runner.model
        if params is None:
            # The retrieval config has no num_actions; the published demo uses 19.
            inputs = dummy_inputs(config, len(ACTIONS), runner.batch_size)
            corpus = np.zeros((1, config.emb_size), np.float32)
            self._params = runner.load_or_init(*inputs, corpus, 1).params
        else:
            self.params = params

        def model_method(method):
            return hk.transform(lambda *args: getattr(config.make(), method)(*args)).apply

        user = model_method("build_user_representation")
        candidates = model_method("build_candidate_representation")
        self._encode_user = jax.jit(lambda p, b, e: user(p, None, b, e)[0])
        self._encode_candidates = jax.jit(lambda p, b, e: candidates(p, None, b, e)[0])

    def _validate(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> None:
        self._require_initialized()
        config = self.runner.model
        num_actions = self.params["phoenix_retrieval_model"]["action_projection"].shape[0]
        sizes = validate_inputs(batch, embeddings, config, num_actions)
        self.check_fits(sizes["B"], sizes["S"])

    def memory_needed(self, batch_size: int, history_len: int, num_candidates: int = 0) -> float:
        """A lower bound on the bytes encoding users of these sizes takes."""
        context = 1 + history_len
        return attention_bytes(self.runner.model, batch_size, context, context)

    def check_fits(self, batch_size: int, history_len: int, num_candidates: int = 0) -> None:
        """Raises ValueError if encoding users of these sizes would plainly not fit in memory."""
        check_memory(
            self.memory_needed(batch_size, history_len),
            f"encoding {batch_size} users with history {history_len}",
        )

    def encode_user(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> jax.Array:
        """Unit user vectors [B, D]."""
        self._validate(batch, embeddings)
        return self._encode_user(self.params, batch, embeddings)

    def encode_candidates(self, batch: RecsysBatch, embeddings: RecsysEmbeddings) -> jax.Array:
        """Unit candidate vectors [B, C, D]."""
        self._validate(batch, embeddings)
        return self._encode_candidates(self.params, batch, embeddings)

    def set_corpus(self, corpus_embeddings: Any, corpus_post_ids: Any | None = None) -> None:
        """Keeps a corpus [N, D] (float32 or bfloat16; a `jax.Array` may be sharded along N)
        and its post ids [N] (default arange(N)). Its values are checked here, once."""
        validate_corpus(corpus_embeddings, self.runner.model.emb_size, 1)
        n = jnp.shape(corpus_embeddings)[0]
        # A copy, as of the corpus: what the caller writes later cannot undo the checks.
        ids = np.arange(n) if corpus_post_ids is None else np.array(corpus_post_ids)
        if ids.shape != (n,):
            raise ValueError(f"corpus_post_ids has shape {ids.shape}, expected [N={n}]")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"corpus_post_ids must be integers, got {ids.dtype}")
        if (repeated := first_repeated(ids)) is not None:
            raise ValueError(f"corpus_post_ids holds {repeated} more than once")
        if not isinstance(corpus_embeddings, jax.Array):
            corpus_embeddings = _private_device_copy(np.asarray(corpus_embeddings))
        self.corpus_embeddings = corpus_embeddings
        self.corpus_post_ids = ids

    def retrieve(
        self,
        batch: RecsysBatch,
        embeddings: RecsysEmbeddings,
        top_k: int = 100,
        corpus_embeddings: Any | None = None,
    ) -> RetrievalOutput:
        """Top-K corpus rows for each user: indices into the corpus and their scores [B, K].

        Map indices to post ids with `corpus_post_ids[top_k_indices]`. A corpus passed here
        (instead of kept with `set_corpus`) is checked on every call.
        """
        self._validate(batch, embeddings)
        if corpus_embeddings is None:
            corpus = self.corpus_embeddings
            if corpus is None:
                raise ValueError("no corpus: call set_corpus() or pass corpus_embeddings")
            check_top_k(corpus.shape[0], top_k)
        else:
            corpus = corpus_embeddings
            validate_corpus(corpus, self.runner.model.emb_size, top_k)
        user = self._encode_user(self.params, batch, embeddings)
        scores, indices = sharded_top_k_search(user, corpus, int(top_k))
        return RetrievalOutput(user, indices, scores)


def _private_device_copy(x: np.ndarray, alignment: int = 64) -> jax.Array:
    """`x` on the default device, in the dtype JAX keeps (float64 becomes float32 unless x64 is
    on), in a buffer of its own. On the CPU, `jax.device_put` shares a numpy buffer aligned as
    XLA wants it (so a caller writing to the array would change a corpus checked once) and
    copies any other at its first use, with a second, passing copy; a fresh aligned buffer
    costs one copy and is taken as it is. Other devices copy whatever they are given."""
    if jax.default_backend() != "cpu":
        return jax.device_put(x)
    dtype = jax.dtypes.canonicalize_dtype(x.dtype)
    nbytes = x.size * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    private = raw[start : start + nbytes].view(dtype).reshape(x.shape)
    np.copyto(private, x, casting="same_kind")
    return jax.device_put(private)


# ---------------------------------------------------------------------------------------------
# The demo configuration of run_ranker.py and run_retrieval.py.
# ---------------------------------------------------------------------------------------------

DEMO_EMB_SIZE = 128
DEMO_HISTORY_LEN = 32
DEMO_NUM_CANDIDATES = 8


def demo_transformer_config() -> TransformerConfig:
    return TransformerConfig(
        emb_size=DEMO_EMB_SIZE,
        key_size=64,
        num_q_heads=2,
        num_kv_heads=2,
        num_layers=2,
        widening_factor=2,
        attn_output_multiplier=0.125,
    )


def demo_inputs(
    inference_runner: RecsysInferenceRunner | RecsysRetrievalInferenceRunner,
    seed: int,
    batch_size: int,
    history_len: int,
    num_candidates: int,
) -> tuple[RecsysBatch, RecsysEmbeddings]:
    """Initialises a demo runner with random weights (`seed`) and returns an example
    (batch, embeddings) of the sizes asked for, refusing sizes that would not fit in memory."""
    config = inference_runner.runner.model
    hashes = config.hash_config
    inputs = example_bytes(
        batch_size, history_len, num_candidates, config.emb_size, len(ACTIONS),
        hashes.num_user_hashes, hashes.num_item_hashes + hashes.num_author_hashes,
    )  # fmt: skip
    check_memory(  # the inputs and the model's work on them, together
        inputs + inference_runner.memory_needed(batch_size, history_len, num_candidates),
        f"{batch_size} users, history {history_len} and {num_candidates} candidates (example "
        "inputs and the model's work on them)",
    )
    inference_runner.initialize()
    inference_runner.params = randomize_params(inference_runner.params, seed=seed)
    return create_example_batch(
        batch_size, config.emb_size, history_len, num_candidates, len(ACTIONS), seed=seed
    )
