"""Retrieve a synthetic user's posts from the recent corpus with a trained Phoenix two-tower model.

By default this loads the small trained checkpoint that ships with the project
(`demo_checkpoint.npz`, made by `uv run train.py --out runs/default`), rebuilds the world it was
trained on, encodes the posts of the three days before a request (the serving window) with the
candidate tower, prints a user's planted tastes and the posts the user tower retrieves for
them. `--random-weights` retrieves from a random corpus with random weights instead (the
published demo).

    uv run run_retrieval.py [--user ID] [--top-k 10] [--checkpoint FILE]
    uv run run_retrieval.py --random-weights [--seed 0] [--batch-size 2] [--corpus-size 1000]
"""

from __future__ import annotations

import cli  # before the slow imports below, so that a Ctrl-C among them ends quietly

if __name__ == "__main__":
    cli.quiet_interrupts("run_retrieval.py")

import sys

import jax
import jax.numpy as jnp
import numpy as np

import runners
import train
from pipeline import encode_corpus
from recsys_retrieval_model import PhoenixRetrievalModelConfig
from tables import lookup

USERS_SHOWN = 2
RESULTS_SHOWN = 10
ORACLE_DEPTH = 100


def parse_args(argv: list[str] | None = None):
    parser = cli.ArgumentParser(prog="run_retrieval.py", description=__doc__.splitlines()[0])
    cli.add_trained_demo_flags(parser, str(train.DEMO_CHECKPOINT), "corpus")
    # The trained demo retrieves from the world's corpus, for one user, with no candidates.
    random_only = (*cli.RANDOM_ONLY_FLAGS, "seed", "candidates", "corpus_size")
    group = cli.add_demo_flags(
        parser, runners.DEMO_HISTORY_LEN, runners.DEMO_NUM_CANDIDATES, random_only=random_only
    )
    group.add_argument("--corpus-size", type=cli.positive_int, default=1000, help="posts (1000)")
    parser.add_argument("--top-k", type=cli.positive_int, default=10, help="posts per user (10)")
    args = cli.parse_demo_args(parser, argv, random_only)
    if args.random_weights and args.top_k > args.corpus_size:
        parser.error(f"--top-k ({args.top_k}) must not exceed --corpus-size ({args.corpus_size})")
    return args


def trained_demo(args) -> int:
    """A trained two-tower model on the synthetic world: what it retrieves for a user."""
    world, model, user, when = train.open_demo(args.checkpoint, args.user, "retrieval")
    retriever = runners.RecsysRetrievalInferenceRunner(
        runners.RetrievalModelRunner(model.config), "retrieval"
    )
    retriever.initialize(model.params)
    posts = world.unseen_recent_posts(user, when)  # the serving window, less the history
    authors = world.post_authors[posts - 1] + 1
    retriever.set_corpus(encode_corpus(retriever, model, posts, authors), posts)

    k = min(args.top_k, len(posts))
    if k < 1:
        raise ValueError(f"user {user} has engaged with every post of the window: none to show")
    arrays = train.request_arrays(world, model.hashing, model.config, user, when, [])
    query = train.query_batch(arrays)
    output = retriever.retrieve(query, lookup(model.tables, query), top_k=k)
    found = posts[np.asarray(output.top_k_indices)[0]]
    scores = np.asarray(output.top_k_scores)[0]
    taste = world.in_taste(user, found)

    print(
        f"\nThe {cli.count(k, 'post')} closest to the user vector among the {len(posts):,} of the "
        f"{world.config.serving_window_hours:g} hours before the request that the user has not "
        "engaged with (encoded by the candidate tower; * = a liked topic or favourite author):"
    )
    print(f"  {'rank':>4}  {'score':>6}  post")
    for rank, (post, score) in enumerate(zip(found, scores, strict=True), start=1):
        if rank > RESULTS_SHOWN:
            print(f"  ... {k - RESULTS_SHOWN} more")
            break
        mark = "*" if taste[rank - 1] else " "
        print(f"  {rank:>4}  {score:+.3f}  {mark} {world.describe_post(int(post), when)}")
    everywhere = world.in_taste(user, posts).mean()
    truth = world.oracle_scores(user, posts, when)
    oracle = posts[np.argsort(-truth, kind="stable")[:ORACLE_DEPTH]]
    print(
        f"\nIn the user's tastes: {taste.sum()} of the top {k}; {everywhere:.0%} of all those "
        "posts are."
    )
    if k < len(posts):  # (of every post, any order would find as many)
        hits = np.isin(found, oracle).sum()
        print(
            f"Of the model's top {k}, {hits} {'is' if hits == 1 else 'are'} in the oracle's top "
            f"{ORACLE_DEPTH} (the world's own ranking of what the user favorites next)."
        )
    else:
        held = cli.count(len(posts), "post")
        print(f"(--top-k {args.top_k}: the window holds only {held}; all are ranked.)")
    return 0


def random_weights_demo(args) -> int:
    """The published demo: random weights, a random corpus, what the model computes."""
    config = PhoenixRetrievalModelConfig(
        model=runners.demo_transformer_config(),
        emb_size=runners.DEMO_EMB_SIZE,
        history_seq_len=args.history_len,
        candidate_seq_len=args.candidates,
        fprop_dtype=jnp.dtype(args.dtype),
    )
    corpus, post_ids = runners.create_example_corpus(
        args.corpus_size, runners.DEMO_EMB_SIZE, seed=args.seed
    )
    retriever = runners.RecsysRetrievalInferenceRunner(
        runners.RetrievalModelRunner(config), name="retrieval"
    )
    batch, embeddings = runners.demo_inputs(
        retriever, args.seed, args.batch_size, args.history_len, args.candidates
    )
    retriever.set_corpus(corpus, post_ids)

    print(
        f"Phoenix retrieval: D={config.emb_size}, {config.model.num_layers} layers, history "
        f"{args.history_len}, {cli.count(args.batch_size, 'user')}, corpus of "
        f"{cli.count(args.corpus_size, 'post')}, "
        f"top {args.top_k}, {args.dtype}"
    )
    print(
        f"Weights and corpus: RANDOM (seed {args.seed}), not a trained model; scores show the "
        "model's behaviour, not real relevance."
    )
    output, first, median = cli.timed(
        lambda: jax.block_until_ready(retriever.retrieve(batch, embeddings, top_k=args.top_k)),
        args.repeats,
    )
    candidates = np.asarray(retriever.encode_candidates(batch, embeddings))
    print(
        f"First call (compile + run): {first:.2f} s; retrieval: median {median * 1e3:.2f} ms "
        f"over {cli.count(args.repeats, 'run')}"
    )
    user = np.asarray(output.user_representation, np.float32)
    indices = np.asarray(output.top_k_indices)
    scores = np.asarray(output.top_k_scores)
    all_scores = user @ corpus.T
    if args.batch_size > USERS_SHOWN:
        print(f"(showing {USERS_SHOWN} of the {args.batch_size} users retrieved for)")
    for b in range(min(args.batch_size, USERS_SHOWN)):
        print(
            f"\nUser {b}: |user vector| = {np.linalg.norm(user[b]):.4f}; corpus scores range "
            f"{all_scores[b].min():+.3f} .. {all_scores[b].max():+.3f}, "
            f"median {np.median(all_scores[b]):+.3f}"
        )
        print(f"  {'rank':>4}  {'post id':>8}  score")
        for rank in range(min(args.top_k, RESULTS_SHOWN)):
            print(f"  {rank + 1:>4}  {post_ids[indices[b, rank]]:>8}  {scores[b, rank]:+.4f}")
        if args.top_k > RESULTS_SHOWN:
            print(f"  ... {args.top_k - RESULTS_SHOWN} more")
        own = candidates[b] @ user[b]
        own_scores = " ".join(f"{x:+.3f}" for x in own[:RESULTS_SHOWN])
        print(f"  the user's own candidates, through the candidate tower, score: {own_scores}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return random_weights_demo(args) if args.random_weights else trained_demo(args)


if __name__ == "__main__":
    sys.exit(cli.run_main(main, "run_retrieval.py"))
