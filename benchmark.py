"""Benchmark: ranking thousands of candidates, retrieving from millions of posts, training.

    uv run benchmark.py                  # full run, 2 to 3½ minutes on two cores
    uv run benchmark.py --quick          # smoke run, under 1½ minutes
    uv run benchmark.py --only ranking   # one section: ranking, retrieval or training

Each time is a median over calls timed in alternation with the others of its row
(`cli.measure`); the README's goals are checked at the end. A FLOP bound is matrix FLOPs
(`ranking_matrix_flops`; for a training step the dense forward's, three times over) at the rate
of a large float32 product measured in the same run. The README's Benchmark section says more.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import cli
import runners
import train
import world
from pipeline import MINI_TRANSFORMER
from published_pipeline import published_attention
from recsys_model import ACTIONS, PhoenixModelConfig, ranking_matrix_flops
from search import auto_search_method, sharded_top_k_search, top_k_search, usable_cores

# Each function timed waits for the arrays it returns.
measure = functools.partial(cli.measure, wait=jax.block_until_ready)

HISTORY_LEN = 128
RANK_COUNTS = (32, 256, 1024, 4096)
CORPUS_SIZES = (100_000, 1_000_000)
QUERY_COUNTS = (1, 16, 256)
TOP_K = 100
MATMUL_SIZE = 2048
SECTIONS = ("ranking", "retrieval", "training")

# The goals stated in the README: (what, which row, the ratio of two of its fields, goal,
# whether higher is better).
GOALS = [
    ("rank 1,024: uncompiled dense / cached", "rank", "eager/cached", 15.0, True),
    ("rank 1,024: compiled dense / cached", "rank", "jit/cached", 8.0, True),
    ("rank 1,024: cached / FLOP bound", "rank", "cached/bound", 3.0, False),
    ("top-100, 16 users, 1,000,000 posts: search / one read", "search", "ours/read", 2.5, False),
    ("ranker training step / FLOP bound", "train", "step/bound", 3.0, False),
]


def ratio(name: str, row) -> float | None:
    """The ratio `name`, "a/b", of a row's fields a and b; None if either was not measured."""
    a, b = (getattr(row, field) for field in name.split("/"))
    return None if a is None or b is None else a / b


def ratio_columns(*names: str) -> dict[str, Callable[[object], str]]:
    def column(name: str) -> Callable[[object], str]:
        return lambda row: "-" if (value := ratio(name, row)) is None else f"{value:.1f}x"

    return {name: column(name) for name in names}


def matmul_rate(budget: float) -> float:
    """Float32 FLOP/s of a large compiled matrix product (2 flops per multiply-add)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((MATMUL_SIZE,) * 2, np.float32))
    dot = jax.jit(jnp.dot)
    return 2 * MATMUL_SIZE**3 / measure({"dot": lambda: dot(a, a)}, budget)["dot"]


@dataclasses.dataclass
class RankingRow:
    count: int  # candidates
    eager: float | None  # seconds per call; None when not measured
    jit: float
    cached: float
    second: float  # the cached path of the second release's ranker, anchored, all its inputs
    flops: float  # matrix FLOPs of the cached path
    bound: float  # seconds those FLOPs take at the measured matmul rate


def random_ranker(config: PhoenixModelConfig, name: str) -> runners.RecsysInferenceRunner:
    ranker = runners.RecsysInferenceRunner(runners.ModelRunner(config), name)
    ranker.initialize(runners.randomize_params(checkpoint.param_shapes(config), seed=0))
    return ranker


def bench_ranking(counts, budget: float, eager_limit: int, rate: float) -> list[RankingRow]:
    config = PhoenixModelConfig(
        MINI_TRANSFORMER, history_seq_len=HISTORY_LEN, candidate_seq_len=64,
        fprop_dtype=jnp.float32, release=1,
    )  # fmt: skip
    ranker = random_ranker(config, "benchmark")
    ranker2 = random_ranker(
        dataclasses.replace(config, release=2, right_anchored_rope=True), "second release"
    )
    # The dense baselines run attention in the published layout, whose context manager serves
    # as a decorator here (`dense_jit` is only ever called so: traced and compiled that way).
    params, eager = ranker.params, published_attention()(ranker.runner.forward.apply)
    dense_jit = published_attention()(jax.jit(ranker.runner.forward.apply))
    rows = []
    for count in counts:
        example = functools.partial(
            runners.create_example_batch, 1, 128, HISTORY_LEN, count, len(ACTIONS), seed=count
        )
        inputs = example()
        inputs2 = example(include_continuous_actions=True, include_timestamps=True)
        fns = {
            "cached": lambda x=inputs: ranker.rank(*x).scores,
            "jit": lambda x=inputs: dense_jit(params, None, *x).logits,
            "second": lambda x=inputs2: ranker2.rank(*x).scores,
        }
        if count <= eager_limit:  # the dense forward uncompiled, as the published runner runs it
            fns["eager"] = lambda x=inputs: eager(params, None, *x).logits
        times = measure(fns, budget)
        flops = ranking_matrix_flops(config, count, cached=True)
        measured = [times.get(name) for name in ("eager", "jit", "cached", "second")]
        rows.append(RankingRow(count, *measured, flops, flops / rate))
        print(f"  ranked {count} candidates", flush=True)
    return rows


RANKING_COLUMNS = {
    "C": lambda r: str(r.count),
    "eager ms": lambda r: cli.ms(r.eager),
    "jit ms": lambda r: cli.ms(r.jit),
    "cached ms": lambda r: cli.ms(r.cached),
    "2nd release ms": lambda r: cli.ms(r.second),
    "GFLOP": lambda r: f"{r.flops / 1e9:.3f}",
    "bound ms": lambda r: cli.ms(r.bound),
    **ratio_columns("eager/cached", "jit/cached", "cached/bound"),
}


@dataclasses.dataclass
class TrainingRow:
    batch: int  # requests per step
    candidates: int  # per request
    step: float  # seconds per training step
    flops: float  # forward and backward matrix FLOPs of a step
    bound: float  # seconds those FLOPs take at the measured matmul rate


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
    flops = 3 * b * ranking_matrix_flops(job.config, c, cached=False)
    return TrainingRow(b, c, seconds, flops, flops / rate)


TRAINING_COLUMNS = {
    "requests": lambda r: str(r.batch),
    "candidates": lambda r: str(r.candidates),
    "step ms": lambda r: cli.ms(r.step),
    "requests/s": lambda r: f"{r.batch / r.step:,.0f}",
    "GFLOP": lambda r: f"{r.flops / 1e9:.3f}",
    "bound ms": lambda r: cli.ms(r.bound),
    **ratio_columns("step/bound"),
}


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
    "read ms": lambda r: cli.ms(r.read),
    "ours ms": lambda r: cli.ms(r.ours),
    "method": lambda r: r.method,
    "xla ms": lambda r: cli.ms(r.xla),
    "naive ms": lambda r: cli.ms(r.naive),
    **ratio_columns("naive/ours", "xla/ours", "ours/read"),
}


def print_goals(ranking: list[RankingRow], retrieval: list[RetrievalRow], training) -> None:
    search = (1_000_000, 16, "float32")
    rows = {
        "train": training,
        "rank": next((r for r in ranking if r.count == 1024), None),
        "search": next((r for r in retrieval if (r.n, r.b, r.dtype) == search), None),
    }
    print("Goals:")
    for what, row, ratio_name, goal, higher in GOALS:
        value = None if rows[row] is None else ratio(ratio_name, rows[row])
        if value is None:
            print(f"  [n/a ] {what}: not measured in this run")
            continue
        met = value >= goal if higher else value <= goal
        print(f"  [{'met ' if met else 'MISS'}] {what}: {value:.2f}x (goal {goal}x)")


def main(argv: list[str] | None = None) -> None:
    cli.reuse_freed_memory()
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer sizes, repeats")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="sections to run (all)")
    parser.add_argument(
        "--eager-limit",
        type=cli.non_negative_int,
        default=4096,
        help="largest candidate count for the uncompiled dense forward (4096; 0: none)",
    )
    args = parser.parse_args(argv)
    sections = args.only or SECTIONS
    budget = 0.3 if args.quick else 2.0
    start = time.perf_counter()
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {usable_cores()} usable cores, Python {platform.python_version()}")
    print(f"jax {jax.__version__}, devices {jax.devices()}; load average {cli.load_average()}")
    ranking, retrieval, training = [], [], None
    if "ranking" in sections or "training" in sections:
        rate = matmul_rate(budget)
        print(f"float32 matmul {MATMUL_SIZE}^3, jit: {rate / 1e9:.1f} GFLOP/s\n")
    if "ranking" in sections:
        print("Ranking, published mini configuration, float32, 1 user, history 128:")
        counts = RANK_COUNTS[:3] if args.quick else RANK_COUNTS
        ranking = bench_ranking(counts, budget, args.eager_limit, rate)
        print()
        cli.print_table(ranking, RANKING_COLUMNS)
    if "retrieval" in sections:
        print(f"Retrieval of the top {TOP_K}, D 128, unit-norm corpus:")
        sizes = CORPUS_SIZES[:1] if args.quick else CORPUS_SIZES
        counts = QUERY_COUNTS[:2] if args.quick else QUERY_COUNTS
        retrieval, recall = bench_retrieval(sizes, counts, budget, with_bf16=not args.quick)
        print()
        cli.print_table(retrieval, RETRIEVAL_COLUMNS)
        if recall is not None:
            print(f"bfloat16 corpus, 1,000,000 rows, 16 users: recall@{TOP_K} = {recall:.4f}\n")
    if "training" in sections:
        print("Training: one ranker step of train.py, demo configuration, default world, float32:")
        training = bench_training(budget, rate)
        cli.print_table([training], TRAINING_COLUMNS)
    print_goals(ranking, retrieval, training)
    print(f"\nload average at end {cli.load_average()}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
