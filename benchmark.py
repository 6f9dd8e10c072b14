"""Benchmark: ranking thousands of candidates and retrieving from millions of posts.

    uv run benchmark.py            # full run, about 3.5 minutes on two cores
    uv run benchmark.py --quick    # smoke run, about a minute

Every row is a median over repeated calls (compilation and a warm-up call excluded); the
implementations compared in one row are timed in alternation, so that a change in machine load
affects them alike. Ratios are printed next to the times, and each goal of the issue is checked
at the end.

Ranking uses the published mini configuration (D 128, 4 layers, 4 query and 4 key/value heads,
key size 32, widening 2, history 128) in float32 with random parameters, one user:
- dense eager: the dense masked forward as the published runner runs it, `hk.transform(...).apply`
  called without `jax.jit` (the published runner also forces bfloat16; we keep float32);
- dense jit: the same forward compiled with `jax.jit`;
- cached: `RecsysInferenceRunner.rank` (context encoded once, candidates scored in blocks);
- bound: the cached path's floating-point operations (counted below) at the machine's measured
  float32 matrix-multiply rate.
Retrieval: top-100 of a unit-norm float32 corpus [N, 128] (and one bfloat16 copy) for B users,
`sharded_top_k_search` (with the method `top_k_search` picks: the native CPU kernel for more
than one user) against
`top_k_search(method="xla")`, against `lax.top_k(queries @ corpus.T)` compiled, and against one
read of the corpus.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import runners
from grok import TransformerConfig, ffn_size
from recsys_model import HashConfig, PhoenixModelConfig
from recsys_retrieval_model import auto_search_method, sharded_top_k_search, top_k_search

# Published mini ranking model (SPEC section 7), history of 128 as in the issue.
MINI = dict(
    emb_size=128,
    key_size=32,
    num_q_heads=4,
    num_kv_heads=4,
    num_layers=4,
    widening_factor=2,
    attn_output_multiplier=1 / math.sqrt(32),
)
HISTORY_LEN = 128
NUM_ACTIONS = len(runners.ACTIONS)
HASHES = HashConfig()
RANK_COUNTS = (32, 256, 1024, 4096)
RANK_COUNTS_QUICK = (32, 256, 1024)

CORPUS_SIZES = (100_000, 1_000_000)
CORPUS_SIZES_QUICK = (100_000,)
QUERY_COUNTS = (1, 16, 256)
QUERY_COUNTS_QUICK = (1, 16)
TOP_K = 100
RETRIEVAL_DIM = 128

MATMUL_SIZE = 2048

# Goals of the issue.
GOAL_CANDIDATES = 1024
GOAL_SPEEDUP_EAGER = 15.0
GOAL_SPEEDUP_JIT = 8.0
GOAL_RANK_BOUND_RATIO = 3.0
GOAL_CORPUS = 1_000_000
GOAL_QUERIES = 16
GOAL_READ_RATIO = 2.5


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def timed_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(
    fns: dict[str, Callable[[], object]],
    budget: float,
    min_repeats: int = 3,
    max_repeats: int = 25,
) -> dict[str, float]:
    """Median seconds per call of each function, after a compile/warm-up call.

    Each function gets about `budget` seconds of repeats (at least `min_repeats`); the repeats
    of all functions are interleaved round by round.
    """
    repeats = {}
    for name, fn in fns.items():
        first = timed_call(fn)  # compiles, touches memory
        # A second warm-up call estimates the cost, unless the first shows it is expensive.
        estimate = first if first > 4 * budget else timed_call(fn)
        repeats[name] = max(min_repeats, min(max_repeats, int(budget / max(estimate, 1e-9))))
    times = {name: [] for name in fns}
    for round_index in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_index < repeats[name]:
                times[name].append(timed_call(fn))
    return {name: float(np.median(t)) for name, t in times.items()}


def describe_machine() -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"CPU: {model}; {os.cpu_count()} logical cores ({usable} usable)",
        f"Python {platform.python_version()}, jax {jax.__version__}, "
        f"devices {[str(d) for d in jax.devices()]}",
        f"load average (1, 5, 15 min) at start: {load}",
    ]


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print()


def ms(seconds: float | None) -> str:
    return "skipped" if seconds is None else f"{seconds * 1e3:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.1f}x"


# ---------------------------------------------------------------------------------------------
# Machine throughput
# ---------------------------------------------------------------------------------------------


def matmul_flops_per_second(budget: float) -> float:
    """Float32 multiply-add rate of a large compiled matrix product (2 flops per multiply-add)."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), np.float32))
    b = jnp.asarray(rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), np.float32))
    dot = jax.jit(jnp.dot)
    seconds = measure({"dot": lambda: dot(a, b)}, budget)["dot"]
    return 2 * MATMUL_SIZE**3 / seconds


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------


def mini_config() -> PhoenixModelConfig:
    return PhoenixModelConfig(
        model=TransformerConfig(**MINI),
        emb_size=MINI["emb_size"],
        num_actions=NUM_ACTIONS,
        history_seq_len=HISTORY_LEN,
        candidate_seq_len=64,
        fprop_dtype=jnp.float32,
        hash_config=HASHES,
    )


def cached_ranking_flops(config: PhoenixModelConfig, num_candidates: int) -> float:
    """Floating-point operations of the cached path for one user: the context (user + history,
    causal attention) once, then each candidate against the context and itself.

    Counts the matrix products (2 per multiply-add): input projections, the four attention
    projections, attention logits and weighted values, the gated feed-forward and the
    unembedding. Element-wise work (norms, rotary, soft-cap, softmax, GELU) is not counted,
    so the bound is optimistic.
    """
    t = config.model
    d, h, kv, ks = config.emb_size, t.num_q_heads, t.num_kv_heads, t.key_size
    hidden = ffn_size(d, t.widening_factor)
    context = 1 + config.history_seq_len
    hu, hi, ha = HASHES.num_user_hashes, HASHES.num_item_hashes, HASHES.num_author_hashes

    per_token_layer = 2 * (d * h * ks + 2 * d * kv * ks + h * ks * d) + 2 * 3 * d * hidden
    attention_pair = 2 * 2 * h * ks  # one query-key logit and one weighted value, all heads

    context_flops = (
        2 * hu * d * d  # proj_mat_1
        + 2 * (hi + ha + 2) * d * d * config.history_seq_len  # proj_mat_3
        + 2 * config.num_actions * d * config.history_seq_len  # action projection
        + t.num_layers * (context * per_token_layer + attention_pair * context * (context + 1) / 2)
    )
    per_candidate = (
        2 * (hi + ha + 1) * d * d  # proj_mat_2
        + t.num_layers * (per_token_layer + attention_pair * (context + 1))
        + 2 * d * config.num_actions  # unembeddings
    )
    return context_flops + num_candidates * per_candidate


def bench_ranking(counts, budget: float, eager_limit: int, flops_per_second: float) -> list[dict]:
    config = mini_config()
    runner = runners.ModelRunner(config)
    runner.initialize()
    dummy_batch = runners.create_dummy_batch_from_config(HASHES, HISTORY_LEN, 1, NUM_ACTIONS)
    dummy_embeddings = runners.create_dummy_embeddings_from_config(
        HASHES, config.emb_size, HISTORY_LEN, 1
    )
    # Only the parameter shapes are needed: every value is drawn by randomize_params.
    shapes = jax.eval_shape(
        runner.forward.init, jax.random.PRNGKey(0), dummy_batch, dummy_embeddings
    )
    params = runners.randomize_params(shapes, seed=0)
    ranker = runners.RecsysInferenceRunner(runner, "benchmark")
    ranker.initialize(params)
    dense_jit = jax.jit(runner.forward.apply)
    encode, score = runner.make_cached_fns()
    encode, score = jax.jit(encode.apply), jax.jit(score.apply)

    results = []
    for count in counts:
        batch, embeddings = runners.create_example_batch(
            1, config.emb_size, HISTORY_LEN, count, NUM_ACTIONS, seed=count
        )
        fns = {
            "cached": lambda b=batch, e=embeddings: ranker.rank(b, e).scores,
            "dense_jit": lambda b=batch, e=embeddings: dense_jit(params, None, b, e).logits,
        }
        if count <= eager_limit:
            fns["dense_eager"] = lambda b=batch, e=embeddings: (
                runner.forward.apply(params, None, b, e).logits
            )
        times = measure(fns, budget)
        context = encode(params, None, batch, embeddings)
        if count <= ranker.candidate_block_size:
            parts = measure(
                {
                    "encode": lambda b=batch, e=embeddings: encode(params, None, b, e),
                    "score": lambda c=context, b=batch, e=embeddings: score(
                        params, None, c, b, e, 0
                    ),
                },
                budget / 2,
            )
        else:
            parts = {"encode": None, "score": None}
        flops = cached_ranking_flops(config, count)
        results.append(
            dict(
                count=count,
                eager=times.get("dense_eager"),
                jit=times["dense_jit"],
                cached=times["cached"],
                encode=parts["encode"],
                score=parts["score"],
                flops=flops,
                bound=flops / flops_per_second,
            )
        )
        print(f"  ranked {count} candidates", flush=True)
    return results


def print_ranking(results: list[dict]) -> None:
    headers = [
        "C",
        "eager ms",
        "jit ms",
        "cached ms",
        "encode ms",
        "score ms",
        "GFLOP",
        "bound ms",
        "eager/cached",
        "jit/cached",
        "cached/bound",
    ]
    rows = [
        [
            str(r["count"]),
            ms(r["eager"]),
            ms(r["jit"]),
            ms(r["cached"]),
            "-" if r["encode"] is None else ms(r["encode"]),
            "-" if r["score"] is None else ms(r["score"]),
            f"{r['flops'] / 1e9:.3f}",
            ms(r["bound"]),
            ratio(r["eager"], r["cached"]),
            ratio(r["jit"], r["cached"]),
            ratio(r["cached"], r["bound"]),
        ]
        for r in results
    ]
    print_table(headers, rows)


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


@jax.jit
def corpus_sum(corpus):
    return jnp.sum(corpus, dtype=jnp.float32)


@jax.jit
def corpus_max(corpus):
    return jnp.max(corpus)


@jax.jit
def naive_scores(queries, corpus):
    """All [B, N] scores in float32, whatever the corpus dtype (as `top_k_search` computes)."""
    return jnp.dot(queries.astype(jnp.float32), corpus.astype(jnp.float32).T)


naive_top_k = jax.jit(lambda queries, corpus: jax.lax.top_k(naive_scores(queries, corpus), TOP_K))
scores_top_k = jax.jit(lambda scores: jax.lax.top_k(scores, TOP_K))


def search(queries, corpus):
    return sharded_top_k_search(queries, corpus, TOP_K)


xla_search = jax.jit(lambda queries, corpus: top_k_search(queries, corpus, TOP_K, method="xla"))


def read_time(corpus: jax.Array, budget: float) -> float:
    """One read of the corpus: the faster of a compiled sum and a compiled max over it."""
    times = measure(
        {"sum": lambda: corpus_sum(corpus), "max": lambda: corpus_max(corpus)}, budget / 2
    )
    return min(times.values())


def retrieval_row(corpus: jax.Array, num_queries: int, budget: float, read: float) -> dict:
    """Our search (its default method, and the XLA method) against the naive one for
    `num_queries` users, with the naive one's parts."""
    queries = jnp.asarray(runners.create_example_corpus(num_queries, RETRIEVAL_DIM, seed=7)[0])
    times = measure(
        {
            "ours": lambda: search(queries, corpus),
            "xla": lambda: xla_search(queries, corpus),
            "naive": lambda: naive_top_k(queries, corpus),
        },
        budget,
    )
    scores = naive_scores(queries, corpus)
    parts = measure(
        {"matmul": lambda: naive_scores(queries, corpus), "top_k": lambda: scores_top_k(scores)},
        budget / 2,
    )
    dtype = jnp.dtype(corpus.dtype).name
    method = auto_search_method(queries, corpus)
    return dict(
        n=corpus.shape[0], b=num_queries, dtype=dtype, method=method, read=read, **times, **parts
    )


def recall_at_k(corpus: jax.Array, approx_corpus: jax.Array, num_queries: int) -> float:
    """Mean fraction of each user's exact top-k (float32 corpus) found with `approx_corpus`."""
    queries = jnp.asarray(runners.create_example_corpus(num_queries, RETRIEVAL_DIM, seed=7)[0])
    exact = np.asarray(search(queries, corpus)[1])
    approx = np.asarray(search(queries, approx_corpus)[1])
    hits = [len(np.intersect1d(e, a)) for e, a in zip(exact, approx, strict=True)]
    return float(np.mean(hits)) / TOP_K


def bench_retrieval(sizes, query_counts, budget: float, with_bf16: bool) -> tuple[list, float]:
    rows, recall = [], None
    for n in sizes:
        corpus = jnp.asarray(runners.create_example_corpus(n, RETRIEVAL_DIM)[0])
        read = read_time(corpus, budget)
        for b in query_counts:
            rows.append(retrieval_row(corpus, b, budget, read))
            print(f"  searched {n} posts for {b} users", flush=True)
        if with_bf16 and n == GOAL_CORPUS:
            corpus_bf16 = corpus.astype(jnp.bfloat16)
            rows.append(
                retrieval_row(corpus_bf16, GOAL_QUERIES, budget, read_time(corpus_bf16, budget))
            )
            recall = recall_at_k(corpus, corpus_bf16, GOAL_QUERIES)
            print(f"  searched {n} bfloat16 posts for {GOAL_QUERIES} users", flush=True)
            del corpus_bf16
        del corpus
    return rows, recall


def print_retrieval(rows: list[dict]) -> None:
    headers = [
        "N",
        "B",
        "corpus",
        "read ms",
        "ours ms",
        "method",
        "xla ms",
        "naive ms",
        "matmul ms",
        "top_k ms",
        "naive/ours",
        "xla/ours",
        "ours/read",
    ]
    table = [
        [
            f"{r['n']:,}",
            str(r["b"]),
            r["dtype"],
            ms(r["read"]),
            ms(r["ours"]),
            r["method"],
            ms(r["xla"]),
            ms(r["naive"]),
            ms(r["matmul"]),
            ms(r["top_k"]),
            ratio(r["naive"], r["ours"]),
            ratio(r["xla"], r["ours"]),
            ratio(r["ours"], r["read"]),
        ]
        for r in rows
    ]
    print_table(headers, table)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def print_slot_effect(num_users: int = 16, shift: int = 3) -> None:
    """How much a candidate's logits depend on its slot (rotary position), not a timing.

    Demo configuration, `randomize_params(seed 0)`: the candidates are rotated by `shift`
    slots and each candidate's logits compared with its logits in the original order.
    """
    config = PhoenixModelConfig(
        runners.demo_transformer_config(),
        runners.DEMO_EMB_SIZE,
        len(runners.ACTIONS),
        history_seq_len=runners.DEMO_HISTORY_LEN,
        candidate_seq_len=runners.DEMO_NUM_CANDIDATES,
        fprop_dtype=jnp.float32,
    )
    model = runners.ModelRunner(config)
    model.initialize()
    batch, embeddings = runners.create_example_batch(
        num_users,
        runners.DEMO_EMB_SIZE,
        runners.DEMO_HISTORY_LEN,
        runners.DEMO_NUM_CANDIDATES,
        len(runners.ACTIONS),
        seed=1,
    )
    params = runners.randomize_params(model.load_or_init(batch, embeddings).params, seed=0)
    forward = jax.jit(model.forward.apply)
    before = np.asarray(forward(params, None, batch, embeddings).logits)
    order = np.roll(np.arange(runners.DEMO_NUM_CANDIDATES), shift)
    moved = runners.map_candidates(batch, embeddings, lambda x: np.asarray(x)[:, order])
    after = np.asarray(forward(params, None, *moved).logits)[:, np.argsort(order)]
    change = np.abs(after - before) / before.std()
    reordered = (np.argsort(-before[..., 0], 1) != np.argsort(-after[..., 0], 1)).any(1).sum()
    print(
        f"Slot effect (demo configuration, random weights seed 0, {num_users} users): moving the "
        f"{runners.DEMO_NUM_CANDIDATES} candidates {shift} slots changes their logits by "
        f"{change.mean():.2f} logit standard deviations on average (at most {change.max():.2f}); "
        f"the favorite order changed for {reordered} of {num_users} users.\n"
    )


def goal_line(name: str, value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return f"  [n/a ] {name}: not measured in this run"
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"  [{'met ' if met else 'MISS'}] {name}: {value:.2f}x (goal {sign} {target}x)"


def main(argv: list[str] | None = None) -> None:
    parser = runners.DemoArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer sizes and repeats: a smoke run of about a minute",
    )
    parser.add_argument(
        "--eager-limit",
        type=runners.non_negative_int,
        default=4096,
        help="largest candidate count for the uncompiled dense forward (default 4096; 0: none)",
    )
    args = parser.parse_args(argv)
    budget = 0.3 if args.quick else 2.0

    print("\n".join(describe_machine()))
    print()
    start = time.perf_counter()
    flops_per_second = matmul_flops_per_second(budget)
    print(
        f"float32 matmul {MATMUL_SIZE}x{MATMUL_SIZE} @ {MATMUL_SIZE}x{MATMUL_SIZE}, jit: "
        f"{flops_per_second / 1e9:.1f} GFLOP/s\n"
    )

    print(
        "Ranking, published mini configuration in float32 (the published runner forces bfloat16),"
        " 1 user, history 128.\n"
        "eager: dense forward, hk.transform apply not compiled (as the published runner runs "
        "it); jit: the same, jax.jit-compiled;\ncached: RecsysInferenceRunner.rank, blocks of "
        f"{runners.DEFAULT_CANDIDATE_BLOCK} (encode / score: its two parts, one block); bound: "
        "counted matrix FLOPs at the "
        "measured matmul rate."
    )
    counts = RANK_COUNTS_QUICK if args.quick else RANK_COUNTS
    ranking = bench_ranking(counts, budget, args.eager_limit, flops_per_second)
    print()
    print_ranking(ranking)

    print(
        f"Retrieval of the top {TOP_K}, D {RETRIEVAL_DIM}, unit-norm corpus.\n"
        "read: one pass over the corpus (faster of jitted sum and max); ours: "
        "sharded_top_k_search on one device, by the method top_k_search picks\n(native: the "
        "fused CPU kernel of native_search; xla: blocked XLA scoring); xla: top_k_search with "
        'method="xla";\nnaive: jitted lax.top_k(queries @ corpus.T) in float32, and its two '
        "parts (matmul, top_k)."
    )
    sizes = CORPUS_SIZES_QUICK if args.quick else CORPUS_SIZES
    query_counts = QUERY_COUNTS_QUICK if args.quick else QUERY_COUNTS
    retrieval, recall = bench_retrieval(sizes, query_counts, budget, with_bf16=not args.quick)
    print()
    print_retrieval(retrieval)
    if recall is not None:
        print(
            f"bfloat16 corpus, N {GOAL_CORPUS:,}, B {GOAL_QUERIES}: recall@{TOP_K} against the "
            f"float32 exact top-{TOP_K} = {recall:.4f}\n"
        )

    print_slot_effect()

    print("Goals:")
    at_goal = next((r for r in ranking if r["count"] == GOAL_CANDIDATES), None)
    speedup_eager = speedup_jit = bound_ratio = None
    if at_goal is not None:
        if at_goal["eager"] is not None:
            speedup_eager = at_goal["eager"] / at_goal["cached"]
        speedup_jit = at_goal["jit"] / at_goal["cached"]
        bound_ratio = at_goal["cached"] / at_goal["bound"]
    print(
        goal_line("rank 1,024: uncompiled dense / cached", speedup_eager, GOAL_SPEEDUP_EAGER, True)
    )
    print(goal_line("rank 1,024: compiled dense / cached", speedup_jit, GOAL_SPEEDUP_JIT, True))
    print(goal_line("rank 1,024: cached / FLOP bound", bound_ratio, GOAL_RANK_BOUND_RATIO, False))
    row = next(
        (
            r
            for r in retrieval
            if r["n"] == GOAL_CORPUS and r["b"] == GOAL_QUERIES and r["dtype"] == "float32"
        ),
        None,
    )
    read_ratio = None if row is None else row["ours"] / row["read"]
    print(
        goal_line(
            "top-100, 16 users, 1,000,000 posts: search / one read",
            read_ratio,
            GOAL_READ_RATIO,
            False,
        )
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at end: {load}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
