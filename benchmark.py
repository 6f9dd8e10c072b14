"""Benchmark: ranking thousands of candidates and retrieving from millions of posts.

    uv run benchmark.py                  # full run, about 3½ minutes on two cores
    uv run benchmark.py --quick          # smoke run, about 1½ minutes
    uv run benchmark.py --only ranking   # one section: ranking, retrieval or training

Every time is a median over repeated calls (compilation and a warm-up call excluded); the
implementations compared in one row are timed in alternation, so that a change in machine load
affects them alike. Ratios are printed next to the times, and the README's goals are checked at
the end.

Ranking: the published mini configuration (D 128, 4 layers, 4 heads of 32, widening 2) with a
history of 128, float32, random parameters, one user. *eager*: the dense masked forward as the
published runner runs it (`hk.transform(...).apply`, not compiled, its attention in the
published layout); *jit*: the same compiled; *cached*: `RecsysInferenceRunner.rank`; *2nd
release*: the same for the second release's ranker with right-anchored positions, dwell times and
post ages; *bound*: the cached path's matrix FLOPs at the measured float32 matmul rate.
Retrieval: the top 100 of a unit-norm corpus [N, 128] for B users; *ours*:
`sharded_top_k_search` (by the method `top_k_search` picks), *xla*: `method="xla"`, *naive*:
compiled `lax.top_k(queries @ corpus.T)`, *read*: one pass over the corpus (a compiled sum).
Training: one ranker step of `train.py` on the default world against
the dense forward's matrix FLOPs, three times over for forward and backward.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import runners
import train
import world
from cli import ArgumentParser, ms, non_negative_int, print_table, reuse_freed_memory
from grok import ffn_size
from pipeline import MINI_TRANSFORMER
from published_pipeline import published_attention
from recsys_model import ACTIONS, PhoenixModelConfig
from search import auto_search_method, sharded_top_k_search, top_k_search, usable_cores

HISTORY_LEN = 128
RANK_COUNTS = (32, 256, 1024, 4096)
CORPUS_SIZES = (100_000, 1_000_000)
QUERY_COUNTS = (1, 16, 256)
TOP_K = 100
MATMUL_SIZE = 2048
# (name, row selector, ratio, goal, higher is better): the goals stated in the README.
GOALS = [
    ("rank 1,024: uncompiled dense / cached", "rank", "eager_ratio", 15.0, True),
    ("rank 1,024: compiled dense / cached", "rank", "jit_ratio", 8.0, True),
    ("rank 1,024: cached / FLOP bound", "rank", "bound_ratio", 3.0, False),
    ("top-100, 16 users, 1,000,000 posts: search / one read", "search", "read_ratio", 2.5, False),
    ("ranker training step / FLOP bound", "train", "bound_ratio", 3.0, False),
]
SECTIONS = ("ranking", "retrieval", "training")


def timed_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(fns: dict[str, Callable[[], object]], budget: float) -> dict[str, float]:
    """Median seconds per call of each function after a warm-up call: about `budget` seconds
    of repeats each (3 to 25), interleaved round by round."""
    repeats = {}
    for name, fn in fns.items():
        first = timed_call(fn)  # compiles, touches memory
        estimate = first if first > 4 * budget else timed_call(fn)
        repeats[name] = max(3, min(25, int(budget / max(estimate, 1e-9))))
    times = {name: [] for name in fns}
    for round_index in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_index < repeats[name]:
                times[name].append(timed_call(fn))
    return {name: float(np.median(t)) for name, t in times.items()}


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def matmul_rate(budget: float) -> float:
    """Float32 FLOP/s of a large compiled matrix product (2 flops per multiply-add)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((MATMUL_SIZE,) * 2, np.float32))
    dot = jax.jit(jnp.dot)
    return 2 * MATMUL_SIZE**3 / measure({"dot": lambda: dot(a, a)}, budget)["dot"]


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RankingRow:
    count: int  # candidates
    eager: float | None  # seconds per call; None when not measured
    jit: float
    cached: float
    flops: float  # matrix FLOPs of the cached path
    bound: float  # seconds those FLOPs take at the measured matmul rate
    second: float  # the cached path of the second release's ranker, anchored, all its inputs

    @property
    def eager_ratio(self) -> float | None:
        return None if self.eager is None else self.eager / self.cached

    @property
    def jit_ratio(self) -> float:
        return self.jit / self.cached

    @property
    def bound_ratio(self) -> float:
        return self.cached / self.bound


def _token_flops(config: PhoenixModelConfig) -> tuple[float, float]:
    """Matrix FLOPs (2 per multiply-add) of one token in one layer: (attention and feed-forward
    projections, one logit and one weighted value against one key in all heads)."""
    t, d = config.model, config.emb_size
    hidden = ffn_size(d, t.widening_factor)
    per_token = 2 * (2 * d * t.num_q_heads + 2 * d * t.num_kv_heads) * t.key_size + 6 * d * hidden
    return per_token, 4 * t.num_q_heads * t.key_size


def _input_widths(config: PhoenixModelConfig) -> tuple[int, int, int]:
    """How many embeddings of width D the input projections of the user, a history item and a
    candidate read: hashes, then the action and product surface (history) or the surface
    (candidate), and in the second release the dwell time (history) and post age (candidate)."""
    h, second = config.hash_config, int(config.release >= 2)
    items = h.num_item_hashes + h.num_author_hashes
    return h.num_user_hashes, items + 2 + second, items + 1 + second


def cached_ranking_flops(config: PhoenixModelConfig, num_candidates: int) -> float:
    """Matrix FLOPs of the cached path for one user: input projections, attention projections,
    logits and weighted values, feed-forward, unembedding. Element-wise work (norms, rotary,
    soft-cap, softmax, GELU) is not counted: the bound is optimistic."""
    t, d = config.model, config.emb_size
    context, s = 1 + config.history_seq_len, config.history_seq_len
    per_token, pair = _token_flops(config)
    user, item, candidate = _input_widths(config)
    context_flops = (
        2 * user * d * d
        + 2 * s * (item * d * d + config.num_actions * d)
        + t.num_layers * (context * per_token + pair * context * (context + 1) / 2)
    )
    per_candidate = (
        2 * candidate * d * d
        + t.num_layers * (per_token + pair * (context + 1))
        + 2 * d * config.num_actions
    )
    return context_flops + num_candidates * per_candidate


def dense_ranking_flops(config: PhoenixModelConfig, num_candidates: int) -> float:
    """Matrix FLOPs of the dense forward for one user, the whole masked attention square
    included (as it is computed); the same omissions as `cached_ranking_flops`."""
    t, d = config.model, config.emb_size
    s, length = config.history_seq_len, 1 + config.history_seq_len + num_candidates
    per_token, pair = _token_flops(config)
    user, item, candidate = _input_widths(config)
    return (
        2 * user * d * d
        + 2 * s * (item * d * d + config.num_actions * d)
        + 2 * num_candidates * (candidate * d * d + d * config.num_actions)
        + t.num_layers * (length * per_token + pair * length**2)
    )


def published(fn: Callable, *args):
    """`fn(*args)` with attention in the published layout, as the dense baselines run it
    (`dense_jit` is only ever called here, so it is traced, and compiled, in that layout)."""
    with published_attention():
        return fn(*args)


def bench_ranking(counts, budget: float, eager_limit: int, rate: float) -> list[RankingRow]:
    config = PhoenixModelConfig(
        MINI_TRANSFORMER,
        history_seq_len=HISTORY_LEN,
        candidate_seq_len=64,
        fprop_dtype=jnp.float32,
        release=1,
    )
    runner = runners.ModelRunner(config)
    runner.initialize()
    params = runners.randomize_params(runner.param_shapes(), seed=0)
    ranker = runners.RecsysInferenceRunner(runner, "benchmark")
    ranker.initialize(params)
    config2 = dataclasses.replace(config, release=2, right_anchored_rope=True)
    ranker2 = runners.RecsysInferenceRunner(runners.ModelRunner(config2), "second release")
    ranker2.initialize(runners.randomize_params(checkpoint.param_shapes(config2), seed=0))
    dense_jit = jax.jit(runner.forward.apply)
    rows = []
    for count in counts:
        inputs = runners.create_example_batch(1, 128, HISTORY_LEN, count, len(ACTIONS), seed=count)
        inputs2 = runners.create_example_batch(
            1, 128, HISTORY_LEN, count, len(ACTIONS), seed=count,
            include_continuous_actions=True, include_timestamps=True,
        )  # fmt: skip
        fns = {
            "cached": lambda x=inputs: ranker.rank(*x).scores,
            "jit": lambda x=inputs: published(dense_jit, params, None, *x).logits,
            "second": lambda x=inputs2: ranker2.rank(*x).scores,
        }
        if count <= eager_limit:
            fns["eager"] = lambda x=inputs: published(runner.forward.apply, params, None, *x).logits
        times = measure(fns, budget)
        flops = cached_ranking_flops(config, count)
        row = RankingRow(
            count, times.get("eager"), times["jit"], times["cached"], flops, flops / rate,
            times["second"],
        )  # fmt: skip
        rows.append(row)
        print(f"  ranked {count} candidates", flush=True)
    return rows


RANKING_COLUMNS = {
    "C": lambda r: str(r.count),
    "eager ms": lambda r: ms(r.eager),
    "jit ms": lambda r: ms(r.jit),
    "cached ms": lambda r: ms(r.cached),
    "2nd release ms": lambda r: ms(r.second),
    "GFLOP": lambda r: f"{r.flops / 1e9:.3f}",
    "bound ms": lambda r: ms(r.bound),
    "eager/cached": lambda r: ratio(r.eager_ratio),
    "jit/cached": lambda r: ratio(r.jit_ratio),
    "cached/bound": lambda r: ratio(r.bound_ratio),
}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingRow:
    batch: int  # requests per step
    candidates: int  # per request
    step: float  # seconds per training step
    flops: float  # forward and backward matrix FLOPs of a step
    bound: float  # seconds those FLOPs take at the measured matmul rate

    @property
    def bound_ratio(self) -> float:
        return self.step / self.bound


def bench_training(budget: float, rate: float) -> TrainingRow:
    """One ranker training step of `train.py` (the demo configuration, a batch of the default
    world, AdamW and the table optimiser included) against its FLOP bound: the dense forward's
    matrix FLOPs, three times over for forward and backward."""
    job = train.make_job("ranker", world.build_world(), train.TrainConfig())
    mesh = train.data_mesh()
    state = [
        train.place(train.initial_state("ranker", job.config, job.hashing, job.train), mesh, False)
    ]
    arrays = train.place_batch(job.batch(0), mesh)
    step = train.make_step(job.loss, job.train)

    def one_step():
        state[0], stats = step(state[0], arrays)
        return stats["loss"]

    seconds = measure({"step": one_step}, budget)["step"]
    b, c = arrays["candidate_post_hashes"].shape[:2]
    flops = 3 * b * dense_ranking_flops(job.config, c)
    return TrainingRow(b, c, seconds, flops, flops / rate)


TRAINING_COLUMNS = {
    "requests": lambda r: str(r.batch),
    "candidates": lambda r: str(r.candidates),
    "step ms": lambda r: ms(r.step),
    "requests/s": lambda r: f"{r.batch / r.step:,.0f}",
    "GFLOP": lambda r: f"{r.flops / 1e9:.3f}",
    "bound ms": lambda r: ms(r.bound),
    "step/bound": lambda r: ratio(r.bound_ratio),
}


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RetrievalRow:
    n: int  # corpus rows
    b: int  # queries
    dtype: str  # of the corpus
    method: str  # what top_k_search picks
    read: float  # seconds for one pass over the corpus
    ours: float
    xla: float
    naive: float

    @property
    def read_ratio(self) -> float:
        return self.ours / self.read


naive_top_k = jax.jit(lambda q, c: jax.lax.top_k(jnp.dot(q, c.astype(jnp.float32).T), TOP_K))
xla_search = jax.jit(lambda q, c: top_k_search(q, c, TOP_K, method="xla"))
search = functools.partial(sharded_top_k_search, k=TOP_K)
corpus_sum = jax.jit(lambda c: jnp.sum(c, dtype=jnp.float32))  # one read of the corpus


def bench_retrieval(sizes, query_counts, budget: float, with_bf16: bool):
    """Rows for every size and query count (plus one bfloat16 corpus of 1,000,000 rows for 16
    users), and the bfloat16 search's recall@100 against the float32 top 100."""
    rows, recall = [], None
    for n in sizes:
        corpus = jnp.asarray(runners.create_example_corpus(n, 128)[0])
        variants = [(corpus, query_counts)]
        if with_bf16 and n == 1_000_000:
            variants.append((corpus.astype(jnp.bfloat16), (16,)))
        for data, counts in variants:
            reads = measure({"sum": functools.partial(corpus_sum, data)}, 1)
            for b in counts:
                queries = jnp.asarray(runners.create_example_corpus(b, 128, seed=7)[0])
                searches = {"ours": search, "xla": xla_search, "naive": naive_top_k}
                times = measure(
                    {name: functools.partial(f, queries, data) for name, f in searches.items()},
                    budget,
                )
                dtype, method = jnp.dtype(data.dtype).name, auto_search_method(queries, data)
                rows.append(RetrievalRow(n, b, dtype, method, reads["sum"], **times))
                print(f"  searched {n} {dtype} posts for {b} users", flush=True)
                if dtype == "bfloat16":
                    exact = np.asarray(search(queries, corpus)[1])
                    approx = np.asarray(search(queries, data)[1])
                    hits = [len(np.intersect1d(e, a)) for e, a in zip(exact, approx, strict=True)]
                    recall = float(np.mean(hits)) / TOP_K
    return rows, recall


RETRIEVAL_COLUMNS = {
    "N": lambda r: f"{r.n:,}",
    "B": lambda r: str(r.b),
    "corpus": lambda r: r.dtype,
    "read ms": lambda r: ms(r.read),
    "ours ms": lambda r: ms(r.ours),
    "method": lambda r: r.method,
    "xla ms": lambda r: ms(r.xla),
    "naive ms": lambda r: ms(r.naive),
    "naive/ours": lambda r: ratio(r.naive / r.ours),
    "xla/ours": lambda r: ratio(r.xla / r.ours),
    "ours/read": lambda r: ratio(r.read_ratio),
}


def print_goals(ranking: list[RankingRow], retrieval: list[RetrievalRow], training) -> None:
    rows = {
        "train": training,
        "rank": next((r for r in ranking if r.count == 1024), None),
        "search": next(
            (r for r in retrieval if (r.n, r.b, r.dtype) == (1_000_000, 16, "float32")), None
        ),
    }
    print("Goals:")
    for name, which, attribute, goal, higher in GOALS:
        value = None if rows[which] is None else getattr(rows[which], attribute)
        if value is None:
            print(f"  [n/a ] {name}: not measured in this run")
            continue
        met = value >= goal if higher else value <= goal
        print(f"  [{'met ' if met else 'MISS'}] {name}: {value:.2f}x (goal {goal}x)")


def main(argv: list[str] | None = None) -> None:
    reuse_freed_memory()
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer sizes, repeats")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="sections to run (all)")
    parser.add_argument(
        "--eager-limit",
        type=non_negative_int,
        default=4096,
        help="largest candidate count for the uncompiled dense forward (4096; 0: none)",
    )
    args = parser.parse_args(argv)
    sections = args.only or SECTIONS
    budget = 0.3 if args.quick else 2.0
    start = time.perf_counter()
    usable = usable_cores()
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {usable} usable cores, Python {platform.python_version()}")
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ranking, retrieval, training = [], [], None
    if "ranking" in sections or "training" in sections:
        rate = matmul_rate(budget)
        print(f"float32 matmul {MATMUL_SIZE}^3, jit: {rate / 1e9:.1f} GFLOP/s\n")
    if "ranking" in sections:
        print("Ranking, published mini configuration, float32, 1 user, history 128:")
        counts = RANK_COUNTS[:3] if args.quick else RANK_COUNTS
        ranking = bench_ranking(counts, budget, args.eager_limit, rate)
        print()
        print_table(ranking, RANKING_COLUMNS)
    if "retrieval" in sections:
        print(f"Retrieval of the top {TOP_K}, D 128, unit-norm corpus:")
        sizes = CORPUS_SIZES[:1] if args.quick else CORPUS_SIZES
        counts = QUERY_COUNTS[:2] if args.quick else QUERY_COUNTS
        retrieval, recall = bench_retrieval(sizes, counts, budget, with_bf16=not args.quick)
        print()
        print_table(retrieval, RETRIEVAL_COLUMNS)
        if recall is not None:
            print(f"bfloat16 corpus, 1,000,000 rows, 16 users: recall@{TOP_K} = {recall:.4f}\n")
    if "training" in sections:
        print("Training: one ranker step of train.py, demo configuration, default world, float32:")
        training = bench_training(budget, rate)
        print_table([training], TRAINING_COLUMNS)
    print_goals(ranking, retrieval, training)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at end: {load}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
