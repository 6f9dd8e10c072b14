"""Serve a user's feed end to end from an artifacts folder: hash, retrieve, rank, order.

    uv run run_pipeline.py --write-example ./example     # a small folder, weights from a seed
    uv run run_pipeline.py --artifacts_dir ./example      # the user's feed from it
    uv run run_pipeline.py --artifacts_dir ./artifacts --output-json feed.json

The folder is the published layout (retrieval/ and ranker/ with model_params.npz,
embedding_tables.npz and config.json; a corpus .npz; a user sequence .json), as the published
pipeline reads it; the flags before --output-json are the published pipeline's.
"""

from __future__ import annotations

import cli  # before the slow imports below, so that a Ctrl-C among them ends quietly

if __name__ == "__main__":
    cli.quiet_interrupts("run_pipeline.py")

import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp

from checkpoint import artifact_files, load_artifacts, write_json
from cli import (
    ArgumentParser,
    count,
    file_in_a_folder,
    path_arg,
    path_type,
    positive_int,
    run_main,
    seed_int,
)
from pipeline import (
    Pipeline,
    describe_feed,
    feed_to_json,
    write_example,
)

# Flags that serve a feed, which --write-example does not read, and the reverse.
SERVING_FLAGS = (
    "artifacts_dir", "sequence_file", "corpus_file", "top_k_retrieval", "top_k_display",
    "output_json", "dtype",
)  # fmt: skip
EXAMPLE_FLAGS = ("seed", "corpus_size", "vocab_size")


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifacts_dir",
        type=path_arg,
        default="./artifacts",
        help="the artifacts folder (./artifacts)",
    )
    parser.add_argument(
        "--sequence_file",
        type=path_arg,
        help="a user sequence .json (<artifacts_dir>/example_sequence.json)",
    )
    parser.add_argument(
        "--corpus_file", type=path_arg, help="a corpus .npz (<artifacts_dir>/sports_corpus.npz)"
    )
    parser.add_argument(
        "--top_k_retrieval", type=positive_int, default=200, help="posts retrieved and ranked (200)"
    )
    parser.add_argument(
        "--top_k_display", type=positive_int, default=30, help="posts shown, the best ranked (30)"
    )
    parser.add_argument(
        "--output-json", type=path_type, help="also write the ranked posts, every score"
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="compute dtype of both models (bfloat16, as the published pipeline)",
    )
    example = parser.add_argument_group("an example folder (written, then the script exits)")
    example.add_argument("--write-example", type=path_type, metavar="DIR", help="write it to DIR")
    example.add_argument("--seed", type=seed_int, default=0, help="of weights and data (0)")
    example.add_argument("--corpus-size", type=positive_int, default=10_000, help="posts (10,000)")
    example.add_argument(
        "--vocab-size", type=positive_int, default=10_000, help="rows per embedding table (10,000)"
    )
    args = parser.parse_args(argv)
    if args.write_example is not None:
        serving = [f for f in SERVING_FLAGS if getattr(args, f) != parser.get_default(f)]
        if serving:
            parser.error(
                f"--write-example writes a folder and exits; --{serving[0]} is for serving one"
            )
    else:
        example = [f for f in EXAMPLE_FLAGS if getattr(args, f) != parser.get_default(f)]
        if example:
            flag = "--" + example[0].replace("_", "-")
            parser.error(
                f"{flag} is for --write-example; serving reads the folder's weights and corpus"
            )
    if args.output_json is not None:
        if str(args.output_json) == "-":
            parser.error("--output-json -: stdout holds the table; name a file")
        if args.output_json.is_dir():
            parser.error(f"--output-json: {args.output_json} is a folder, not a file name")
        read = artifact_files(args.artifacts_dir, args.corpus_file, args.sequence_file)
        # realpath, not resolve: a symbolic link that loops is a path like any other here
        if os.path.realpath(args.output_json) in {os.path.realpath(path) for path in read}:
            parser.error(f"--output-json {args.output_json}: a file this run reads; name another")
    for flag, path in (
        ("--output-json", args.output_json),
        ("--write-example", args.write_example),
    ):
        if path is not None and (problem := file_in_a_folder(path)):
            parser.error(f"{flag} {path}: {problem}")
    if args.write_example is not None and args.vocab_size < 2:
        parser.error("--vocab-size must be at least 2 (row 0 is padding)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_example is not None:
        start = time.perf_counter()
        folder = write_example(
            args.write_example,
            args.seed,
            args.corpus_size,
            args.vocab_size,
            say=lambda line: print(line, flush=True),
        )
        seconds = time.perf_counter() - start
        print(
            f"Wrote an example artifacts folder to {folder} in {seconds:.1f} s: "
            f"the published mini model (D 128, 4 layers, 4 heads of 32) with RANDOM weights "
            f"(seed {args.seed}), tables of {args.vocab_size:,} rows, "
            f"{count(args.corpus_size, 'post')}."
        )
        print(f"Serve it: uv run run_pipeline.py --artifacts_dir {folder}")
        return 0

    if not Path(args.artifacts_dir).exists():
        raise FileNotFoundError(
            f"--artifacts_dir {args.artifacts_dir}: no such folder (`uv run run_pipeline.py "
            "--write-example DIR` writes one to try; a training run writes DIR/artifacts)"
        )
    start = time.perf_counter()
    artifacts = load_artifacts(
        args.artifacts_dir, args.sequence_file, args.corpus_file, jnp.dtype(args.dtype)
    )
    try:
        pipeline = Pipeline(artifacts)
    except ValueError as error:  # what the folder's files hold; they name themselves within it
        raise ValueError(f"{args.artifacts_dir}: {error}") from None
    loaded = time.perf_counter() - start
    ranker = artifacts.ranker.config
    positions = "right-anchored" if ranker.right_anchored_rope else "in chunks, as published"
    posts = count(len(artifacts.corpus.post_ids), "post")
    say(
        f"Loaded {args.artifacts_dir} in {loaded:.1f} s: {posts}; ranker release "
        f"{ranker.release}, {ranker.model.num_layers} layers, D {ranker.emb_size}, {args.dtype}; "
        f"candidates ranked {positions}."
    )
    feed = pipeline.feed(artifacts.sequence, args.top_k_retrieval, args.top_k_display)
    timings = ", ".join(f"{stage} {1e3 * s:.0f} ms" for stage, s in feed.seconds.items())
    if feed.not_served:
        servable = len(artifacts.corpus.post_ids) - feed.not_served
        why = "in the history"  # (a corpus without creation times has no later posts)
        if artifacts.corpus.creation_times is not None:
            why = "created after the request or in the history"
        note = (
            f" of the {count(servable, 'post')} it can be served ({feed.not_served:,} {why} "
            "are not)"
        )
    else:
        note = " (the whole corpus)" if feed.retrieved < args.top_k_retrieval else ""
    given = len(artifacts.sequence["history"])
    history = count(feed.history_length, "history item") + (
        f" (the first of the {given:,} given)" if given > feed.history_length else ""
    )
    say(
        f"User {feed.user_id}, {history}: retrieved "
        f"{feed.retrieved:,}{note}, ranked them, showing {len(feed.items)} ({timings}; "
        "the first call of a process compiles, or reads what it compiled from the cache)."
    )
    weights = " + ".join(f"{w} * {label} (output {i})" for label, (i, w) in feed.weights.items())
    say(f"Score = {weights}")
    print("\n".join(describe_feed(feed)), flush=True)
    if args.output_json is not None:
        write_json(feed_to_json(feed), args.output_json)
        say(f"Wrote every score of {count(len(feed.items), 'post')} to {args.output_json}")
    return 0


def say(line: str) -> None:
    """An account of the run, on stderr: as published, the table alone goes to stdout."""
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, "run_pipeline.py"))
