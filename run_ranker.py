"""Rank a synthetic user's feed with a Phoenix ranking model trained on the synthetic world.

By default this loads the small trained checkpoint that ships with the project
(`demo_checkpoint.npz`, made by `uv run train.py --out runs/default`), rebuilds the world it was
trained on, prints a user's planted tastes and ranks the posts of the last three days for them.
`--random-weights` ranks random inputs with random weights instead (the published demo).

    uv run run_ranker.py [--user ID] [--candidates N [--seed 0]] [--checkpoint FILE]
    uv run run_ranker.py --random-weights [--seed 0] [--batch-size 2] [--history-len 32]
"""

from __future__ import annotations

import cli  # before the slow imports below, so that a Ctrl-C among them ends quietly

if __name__ == "__main__":
    cli.quiet_interrupts("run_ranker.py")

import sys

import jax
import jax.numpy as jnp
import numpy as np

import runners
import train
from recsys_model import ACTIONS, PhoenixModelConfig
from tables import lookup

TOP_ACTIONS_SHOWN = 3
USERS_SHOWN = 2
RANKS_SHOWN = 10


def parse_args(argv: list[str] | None = None):
    parser = cli.ArgumentParser(prog="run_ranker.py", description=__doc__.splitlines()[0])
    cli.add_trained_demo_flags(parser, str(train.DEMO_CHECKPOINT), "inputs")
    cli.add_demo_flags(
        parser,
        runners.DEMO_HISTORY_LEN,
        runners.DEMO_NUM_CANDIDATES,
        f"posts to rank (every post of the window; {runners.DEMO_NUM_CANDIDATES} per user with "
        "--random-weights)",
    )
    # Unset, the trained demo ranks every post of the serving window; --seed draws --candidates
    # of them.
    parser.set_defaults(candidates=None, seed=None)
    args = cli.parse_demo_args(parser, argv)
    if not args.random_weights and args.seed is not None and args.candidates is None:
        parser.error("--seed: only with --candidates or --random-weights (it draws the candidates)")
    args.seed = args.seed or 0
    if args.random_weights and args.candidates is None:
        args.candidates = runners.DEMO_NUM_CANDIDATES
    return args


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score vectors (no ties expected among float scores)."""
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def trained_demo(args) -> int:
    """A trained ranker on the synthetic world: what it ranks first for a user, beside the truth."""
    world, model, user, when = train.open_demo(args.checkpoint, args.user, "ranker")
    pool = world.unseen_recent_posts(user, when)
    posts = pool
    if args.candidates is not None and args.candidates < len(pool):
        posts = np.sort(np.random.default_rng(args.seed).choice(pool, args.candidates, False))
    arrays = train.request_arrays(world, model.hashing, model.config, user, when, posts)
    batch = train.ranking_batch(arrays)
    ranker = runners.RecsysInferenceRunner(runners.ModelRunner(model.config), name="ranker")
    ranker.initialize(model.params)
    output = ranker.rank(batch, lookup(model.tables, batch))
    p_model = np.asarray(output.scores)[0, :, train.FAVORITE]
    p_true = world.true_probabilities(user, posts, when)[:, train.FAVORITE]
    order = np.argsort(-p_model, kind="stable")
    taste = world.in_taste(user, posts)

    fewer = args.candidates is not None and args.candidates > len(pool)
    drawn = len(posts) < len(pool)
    print(
        f"\nRanking {cli.count(len(posts), 'post')}"
        + (f", drawn at random (--seed {args.seed}) from the {len(pool)}" if drawn else "")
        + f" of the last {world.config.serving_window_hours:.0f} hours they have not seen"
        + (f" (all there are, fewer than --candidates {args.candidates})" if fewer else "")
        + ", by the model's p(favorite) (* = a liked topic or favourite author):"
    )
    print(f"  {'rank':>4}  {'p(fav)':>6}  {'true':>6}  post")
    for rank, i in enumerate(order[:RANKS_SHOWN], start=1):
        mark = "*" if taste[i] else " "
        print(
            f"  {rank:>4}  {p_model[i]:6.3f}  {p_true[i]:6.3f}  {mark} "
            f"{world.describe_post(int(posts[i]), when)}"
        )
    k = min(RANKS_SHOWN, len(posts))
    print(
        f"\nIn the user's tastes: {taste[order[:k]].sum()} of the model's top {k}, "
        f"{taste.mean() * k:.1f} of {k} on average for random picks from the same posts."
    )
    if len(posts) > 1:  # (a correlation needs two)
        print(
            f"Model against the true p(favorite) over all {len(posts)} posts: rank correlation "
            f"{spearman(p_model, p_true):.2f}."
        )
    return 0


def random_weights_demo(args) -> int:
    """The published demo: random weights, random inputs, what the model computes."""
    config = PhoenixModelConfig(
        model=runners.demo_transformer_config(),
        emb_size=runners.DEMO_EMB_SIZE,
        num_actions=len(ACTIONS),
        history_seq_len=args.history_len,
        candidate_seq_len=args.candidates,
        fprop_dtype=jnp.dtype(args.dtype),
    )
    ranker = runners.RecsysInferenceRunner(runners.ModelRunner(config), name="ranker")
    batch, embeddings = runners.demo_inputs(
        ranker, args.seed, args.batch_size, args.history_len, args.candidates
    )

    print(
        f"Phoenix ranking: D={config.emb_size}, {config.model.num_layers} layers, "
        f"{config.model.num_q_heads} heads of {config.model.key_size}, history "
        f"{args.history_len}, {cli.count(args.candidates, 'candidate')}, "
        f"{cli.count(args.batch_size, 'user')}, {args.dtype}"
    )
    print(
        f"Weights: RANDOM (seed {args.seed}), not a trained model; the probabilities show the "
        "model's behaviour, not real preferences."
    )
    output, first, median = cli.timed(
        lambda: jax.block_until_ready(ranker.rank(batch, embeddings)), args.repeats
    )
    print(
        f"First call (compile + run): {first:.2f} s; ranking: median {median * 1e3:.2f} ms "
        f"over {cli.count(args.repeats, 'run')}"
    )

    scores = np.asarray(output.scores)
    ranked = np.asarray(output.ranked_indices)
    history_lengths = (np.asarray(batch.history_post_hashes)[:, :, 0] != 0).sum(axis=1)
    for user in range(min(args.batch_size, USERS_SHOWN)):
        print(f"\nUser {user} ({cli.count(int(history_lengths[user]), 'history item')})")
        print(f"  {'rank':>4}  {'cand':>4}  {'p(fav)':>6}  top actions")
        for position, candidate in enumerate(ranked[user][:RANKS_SHOWN], start=1):
            probabilities = scores[user, candidate]
            top = np.argsort(-probabilities)[:TOP_ACTIONS_SHOWN]
            actions = ", ".join(f"{ACTIONS[a]} {probabilities[a]:.3f}" for a in top)
            print(f"  {position:>4}  {candidate:>4}  {probabilities[0]:6.3f}  {actions}")
        if args.candidates > RANKS_SHOWN:
            print(f"  ... {args.candidates - RANKS_SHOWN} more")
    if args.batch_size > USERS_SHOWN:
        print(f"\n({cli.count(args.batch_size - USERS_SHOWN, 'more user')} ranked, not shown)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return random_weights_demo(args) if args.random_weights else trained_demo(args)


if __name__ == "__main__":
    sys.exit(cli.run_main(main, "run_ranker.py"))
