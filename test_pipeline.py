"""The end-to-end pipeline (`pipeline.py`, `run_pipeline.py`): the same feed as the published
procedure re-enacted step by step, histories read as published, bad sequences refused, and the
command line from writing an example folder to serving it."""

import dataclasses
import errno
import json
import os
import shutil
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli
import pipeline
import run_pipeline
from checkpoint import load_artifacts, read_sequence
from conftest import (
    SCALE_SETUP,
    Setup,
    example,
    ranking_forward,
    ranking_params,
    read_only,
    run_script,
)
from grok import MultiHeadAttention
from pipeline import (
    Pipeline,
    describe_feed,
    encode_corpus,
    feed_to_json,
    history_post_ids,
    output_names,
    read_history,
    read_request_time,
    score_weights,
    write_example,
)
from published_pipeline import PublishedPipeline, published_attention
from recsys_model import ACTIONS, NormConfig

SETUP = Setup(num_layers=2, hashes=(2, 2, 2))
HISTORY, CANDIDATES = 6, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Tiny models, a corpus of 400 posts and a user of 8 history items (more than S)."""
    configs = (
        SETUP.retrieval_config(HISTORY, CANDIDATES),
        dataclasses.replace(SETUP, release=2).ranking_config(HISTORY, CANDIDATES),
    )
    path = tmp_path_factory.mktemp("pipeline") / "artifacts"
    return write_example(path, 5, corpus_size=400, vocab_size=60, history_length=8, configs=configs)


def published_copy(folder, tmp_path):
    """The folder as a published export has it: no `action_names` in the ranker's config."""
    copy = tmp_path / "published"
    shutil.copytree(folder, copy)
    path = copy / "ranker" / "config.json"
    config = json.loads(path.read_text())
    del config["action_names"]
    path.write_text(json.dumps(config))
    return copy


def test_the_feed_equals_the_published_procedure(folder, tmp_path):
    """In float32 the two serve the same feed: the same posts in the same order, the same
    scores. (Retrieval by one-pass search against numpy's full scores, one cached pass at the
    published chunk positions against one dense forward per chunk, split tables against the
    unified one, vectorised hashes against the double loop.)"""
    copy = published_copy(folder, tmp_path)
    artifacts = load_artifacts(copy, fprop_dtype=jnp.float32)
    published = PublishedPipeline(copy, dtype=jnp.float32)
    for top_k in (9, 40):  # 9: a partial last chunk; 40: ten chunks
        feed = Pipeline(artifacts).feed(artifacts.sequence, top_k, top_k_display=top_k)
        want, _ = published.feed(artifacts.sequence, top_k, top_k)
        assert [item.post_id for item in feed.items] == [post for post, _ in want]
        np.testing.assert_allclose([i.score for i in feed.items], [s for _, s in want], atol=1e-5)
    assert feed.weights == {
        "favorite": (1, 1.0),
        "reply": (4, 0.5),
        "repost": (6, 0.3),
        "dwell": (11, 0.2),
    }
    # Outputs named as the published enum names them, the others by index.
    names = ["output_0", "favorite", "output_2", "output_3", "reply", "quote", "repost"]
    assert list(feed.items[0].probabilities)[:7] == names
    for item in feed.items:
        weighted = sum(w * item.probabilities[label] for label, (_, w) in feed.weights.items())
        assert item.score == pytest.approx(weighted, abs=1e-6)


def test_the_published_attention_layout_gives_the_same_values_and_is_undone_after():
    """The layout the re-enactment and the benchmark's dense baselines time (Grok-1's einsums)
    and the library's head-major one agree to float32 rounding: a model's logits (grouped
    queries) and an attention whose values are wider than its keys."""
    forward, params = ranking_forward(SCALE_SETUP), ranking_params(SCALE_SETUP)
    batch, emb = example(SCALE_SETUP, 2, 6, 5, seed=3)
    attention = hk.without_apply_rng(
        hk.transform(lambda x, mask: MultiHeadAttention(4, 2, 6, value_size=10)(x, x, x, mask))
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 16)), jnp.float32)
    mask = jnp.tril(jnp.ones((7, 7), bool))[None, None]
    weights = attention.init(jax.random.PRNGKey(0), x, mask)

    def both():
        logits = forward.apply(params, None, batch, emb).logits
        return logits, attention.apply(weights, x, mask).embeddings

    ours = MultiHeadAttention.attend
    program = str(jax.make_jaxpr(lambda: both())())  # a fresh function: traced afresh
    values = both()
    with published_attention():
        assert str(jax.make_jaxpr(lambda: both())()) != program  # the published products ran
        published = both()
    for got, want in zip(published, values, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError), published_attention():
        raise KeyError("a failure inside")
    assert MultiHeadAttention.attend is ours


def test_our_folders_weight_the_actions_by_name(folder, monkeypatch):
    artifacts = load_artifacts(folder, fprop_dtype=jnp.float32)
    feed = Pipeline(artifacts).feed(artifacts.sequence, 20, 5)
    assert {label: i for label, (i, _) in feed.weights.items()} == {
        name: ACTIONS.index(name)
        for name in ("favorite_score", "reply_score", "repost_score", "dwell_score")
    }
    for item in feed.items:
        assert set(item.probabilities) == set(ACTIONS)
        assert len(item.continuous) == artifacts.ranker.config.num_continuous_actions
        norm = artifacts.ranker.config.continuous_action_config.norm_config or NormConfig()
        assert item.dwell_seconds == pytest.approx(item.continuous["dwell_time"] * norm.norm_scale)
        weighted = sum(w * item.probabilities[ACTIONS[i]] for i, w in feed.weights.values())
        assert item.score == pytest.approx(weighted, abs=1e-6)
    assert [i.score for i in feed.items] == sorted((i.score for i in feed.items), reverse=True)
    names = artifacts.ranker.json["action_names"]
    artifacts.ranker.json = dict(artifacts.ranker.json, action_names=names[1:] + ["renamed"])
    monkeypatch.setattr(pipeline, "TwoPassIndex", lambda *a: pytest.fail("indexed first"))
    with pytest.raises(ValueError, match="action_names without favorite_score, which the feed"):
        Pipeline(artifacts)  # before any work


def test_a_request_with_a_time_is_not_served_later_posts_or_its_history(folder, tmp_path):
    """The best posts by retrieval score among those created by the request time and not in
    its history (every item, beyond the S the models read too), and only those; with no post
    left, one line."""
    artifacts = load_artifacts(folder, fprop_dtype=jnp.float32)
    pipeline, corpus = Pipeline(artifacts), artifacts.corpus
    n = len(corpus.post_ids)
    everything = pipeline.feed(artifacts.sequence, n, top_k_display=n)
    assert everything.retrieved == n and everything.not_served == 0  # as published
    retrieval_score = {item.post_id: item.retrieval_score for item in everything.items}
    when = int(np.median(corpus.creation_times))
    seen = {item["post_id"] for item in artifacts.sequence["history"]}
    assert len(seen - {i["post_id"] for i in artifacts.sequence["history"][:HISTORY]}) == 2
    servable = [
        int(post)
        for post, created in zip(corpus.post_ids, corpus.creation_times, strict=True)
        if created <= when and post not in seen
    ]
    assert len(servable) < n // 2 + 1  # some are left out for either reason
    best = sorted(servable, key=lambda post: -retrieval_score[post])[:20]
    feed = pipeline.feed(dict(artifacts.sequence, request_time=when), 20, top_k_display=20)
    assert {item.post_id for item in feed.items} == set(best)
    assert feed.retrieved == 20 and feed.not_served == n - len(servable)
    asked_all = pipeline.feed(dict(artifacts.sequence, request_time=when), n, top_k_display=n)
    assert sorted(item.post_id for item in asked_all.items) == sorted(servable)
    first = int(np.min(corpus.creation_times))
    with pytest.raises(ValueError, match=f"served at request_time {first - 1}: all {n} were"):
        pipeline.feed(dict(artifacts.sequence, request_time=first - 1), 20)
    # Misspelt, the time is not read: a sequence built in Python is told so, as a file's is.
    with pytest.warns(UserWarning, match="^sequence: ignored keys it does not know: request_tme$"):
        assert pipeline.feed(dict(artifacts.sequence, request_tme=when), 20).not_served == 0
    file = tmp_path / "sequence.json"
    file.write_text(json.dumps(dict(artifacts.sequence, note="mine")))
    with pytest.warns(UserWarning, match="sequence.json: ignored keys it does not know: note$"):
        sequence = read_sequence(file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named once, when its file was read
        pipeline.feed(sequence, 20)


def test_the_summary_says_why_posts_were_not_served(folder, tmp_path, capsys):
    """With creation times, later posts and the history's; without them, the history's alone
    (the summary said "created after the request" of posts that were all the history's)."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    sequence = json.loads((copy / "example_sequence.json").read_text())
    corpus = dict(np.load(copy / "sports_corpus.npz"))
    sequence["request_time"] = int(np.median(corpus["creation_times"]))
    (copy / "example_sequence.json").write_text(json.dumps(sequence))
    status, _, err = run(["--artifacts_dir", str(copy)], capsys)
    assert status == 0 and "created after the request or in the history are not)" in err, err
    del corpus["creation_times"]
    np.savez(copy / "sports_corpus.npz", **corpus)
    with pytest.warns(UserWarning, match="its request_time leaves out the posts created after"):
        status, _, err = run(["--artifacts_dir", str(copy)], capsys)
    assert status == 0 and "(8 in the history are not)" in err, err


def test_history_is_the_first_items_left_aligned():
    sequence = {
        "user_id": 7,
        "history": [
            {
                "post_id": 10 + i,
                "author_id": 100 + i,
                "actions": {"0": 1.0, "3": 1},
                "dwell_time": i,
            }
            for i in range(5)
        ],
    }
    user, posts, authors, actions, dwell = read_history(sequence, 3, 19)
    assert user == 7
    np.testing.assert_array_equal(posts, [10, 11, 12])
    np.testing.assert_array_equal(authors, [100, 101, 102])
    assert actions.shape == (3, 19) and actions[:, [0, 3]].all() and actions.sum() == 6
    np.testing.assert_array_equal(dwell, [0, 1, 2])
    user, posts, _, actions, dwell = read_history({"user_id": 7, "history": []}, 3, 19)
    assert not posts.any() and not actions.any() and dwell is None
    numpy_numbers = {"post_id": np.int64(5), "author_id": 6, "dwell_time": np.float32(2.5)}
    numpy_numbers["actions"] = {"0": np.True_, "1": True, "2": np.float32(1), "3": np.False_}
    _, posts, _, actions, dwell = read_history({"user_id": 7, "history": [numpy_numbers]}, 1, 19)
    assert posts.tolist() == [5] and dwell.tolist() == [2.5]
    assert np.flatnonzero(actions[0]).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "sequence, message",
    [
        ({"user_id": 0, "history": []}, "user_id must be a positive integer id below .*, got 0"),
        ({"user_id": "12", "history": []},
         "user_id must be a positive integer id below 2\\*\\*63, got '12'"),
        ({"user_id": 2**64, "history": []}, f"user_id must be .* got {2**64}"),
        ({"user_id": 1, "history": [{"post_id": 2**63, "author_id": 2}]},
         f"history item 0: post_id must be a positive integer id below 2\\*\\*63, got {2**63}"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "actions": [1]}]},
         "history item 0: actions must be an object of action index to 0 or 1, got \\[1\\]"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "dwell_time": "long"}]},
         "history item 0: dwell_time must be a finite number of seconds >= 0, got 'long'"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "dwell_time": -1.0}]},
         "dwell_time must be a finite number of seconds >= 0, got -1.0"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "dwell_time": float("nan")}]},
         "dwell_time must be a finite number of seconds >= 0, got nan"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "dwell_time": 1e300}]},
         "dwell_time must be a finite number of seconds >= 0, got 1e\\+300"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "actions": {"\u00b2": 1}}]},
         "history item 0: action index '\u00b2' is not one of the ranker's 19 actions"),
        ({"user_id": 1, "history": {}}, '"history" must be a list'),
        ({"user_id": 1, "history": [{"post_id": 1.5, "author_id": 2}]},
         "history item 0: post_id must be a positive integer id below 2\\*\\*63, got 1.5"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "actions": {"19": 1}}]},
         "history item 0: action index '19' is not one of the ranker's 19 actions"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "actions": {"-1": 1}}]},
         "history item 0: action index '-1' is not one of the ranker's 19 actions"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "actions": {"2": 0.5}}]},
         "history item 0: action 2 is 0.5, expected 0 or 1"),
        # numpy's "setting an array element with a sequence", Python's limit on int().
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "actions": {"2": [1]}}]},
         r"history item 0: action 2 is \[1\], expected 0 or 1"),
        ({"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "actions": {"9" * 5000: 1}}]},
         r"history item 0: action index '9{20}'\.\.\. \(5000 digits\) is not one of the ranker's"),
    ],
)  # fmt: skip
def test_bad_sequences_are_refused_in_one_line(sequence, message):
    with pytest.raises(ValueError, match=message):
        read_history(sequence, 4, 19)


@pytest.mark.parametrize("value", [2**70, 2**31, 1_700_000_000_000, -1, "now", 1.7e9, True])
def test_a_request_time_that_is_not_unix_seconds_is_refused(value):
    """Unix seconds the models can take (int32): milliseconds are refused by name."""
    with pytest.raises(
        ValueError,
        match=r"request_time must be an integer of unix seconds in \[0, 2\*\*31\) \(the models "
        rf"take times as int32; milliseconds\?\), got {value!r}$",
    ):
        read_request_time({"request_time": value})
    assert read_request_time({"request_time": 2**31 - 1}) == 2**31 - 1
    assert read_request_time({}) is None


def run(argv, capsys):
    return run_script(run_pipeline.main, argv, capsys, "run_pipeline.py")


def test_the_command_line_writes_an_example_and_serves_it(tmp_path, capsys):
    example = tmp_path / "example"
    status, out, err = run(
        ["--write-example", str(example), "--corpus-size", "150", "--vocab-size", "50"], capsys
    )
    assert status == 0, err
    assert "RANDOM weights (seed 0)" in out and (example / "ranker" / "model_params.npz").exists()
    feed_json = tmp_path / "feeds" / "feed.json"  # its folder is made
    argv = [
        "--artifacts_dir",
        str(example),
        "--top_k_display",
        "5",
        "--output-json",
        str(feed_json),
    ]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    assert "retrieved 150 (the whole corpus), ranked them" in err  # fewer than --top_k_retrieval
    header, rule, *table = out.splitlines()  # as published, the table alone goes to stdout
    assert header.split()[:2] == ["rank", "post"] and set(rule) == {"-"}
    assert [int(line.split()[0]) for line in table] == [1, 2, 3, 4, 5]
    feed = json.loads(feed_json.read_text())
    assert [item["rank"] for item in feed["items"]] == [1, 2, 3, 4, 5]
    assert set(feed["items"][0]["probabilities"]) == set(ACTIONS)
    assert [str(item["post_id"]) in out for item in feed["items"]] == [True] * 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--artifacts_dir", "/nonexistent/folder"], "/nonexistent/folder: no such folder"),
        (["--top_k_display", "0"], "expected an integer >= 1, got 0"),
        (["--output-json", ""], "--output-json: expected a file or folder name, got an empty"),
        (["--artifacts_dir="], "--artifacts_dir: expected a file or folder name"),
        (["--write-example", "EXISTING"], "already exists; choose a new folder"),
        (["--output-json", "EXISTING"], "is a folder, not a file name"),
        (["--output-json", "A_FILE/feed.json"], "something is a file, not a folder"),
        (["--write-example", "A_FILE/example"], "something is a file, not a folder"),
        (["--write-example", "NEW", "--top_k_display", "3"],
         "--write-example writes a folder and exits; --top_k_display is for serving one"),
        (["--corpus-size", "5"],
         "--corpus-size is for --write-example; serving reads the folder's weights and corpus"),
        (["--write-example", "NEW", "--corpus-size", str(10**11)],
         "an example folder with tables of 10,000 rows and 100,000,000,000 posts would need"),
        (["--artifacts_dir", "A_FILE"], "something is a file, not a folder"),
        (["--output-json", "A_PIPE"], "pipe is a device, pipe or socket, not a file"),
        (["--output-json", "-"], "--output-json -: stdout holds the table; name a file"),
        (["--output-json", "A_LOOP"], "loop is a symbolic link that loops, not a file"),
        (["--artifacts_dir", "EXISTING", "--output-json", "ITS_SEQUENCE"],
         "example_sequence.json: a file this run reads; name another"),
        (["--corpus_file", "A_FILE", "--output-json", "A_FILE"],
         "something: a file this run reads; name another"),
    ],
)  # fmt: skip
def test_the_command_line_refuses_bad_flags_in_one_line(argv, message, capsys, tmp_path):
    paths = {"EXISTING": tmp_path, "NEW": tmp_path / "new", "A_PIPE": tmp_path / "pipe"}
    paths["ITS_SEQUENCE"] = tmp_path / "example_sequence.json"  # not there yet: read all the same
    paths["A_LOOP"] = tmp_path / "loop"
    os.symlink("loop", tmp_path / "loop")
    argv = [str(paths.get(a, a)).replace("A_FILE", str(tmp_path / "something")) for a in argv]
    (tmp_path / "something").write_text("")
    os.mkfifo(tmp_path / "pipe")
    status, out, err = run(argv, capsys)
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_a_feed_that_could_not_be_written_is_refused_before_serving(tmp_path, capsys, monkeypatch):
    read_only(monkeypatch, tmp_path)
    status, _, err = run(["--output-json", str(tmp_path / "feed.json")], capsys)
    assert status == 2 and f"cannot write in {tmp_path} (no permission" in err, err


def test_a_folder_on_a_file_system_that_takes_no_writes_is_refused_before_the_work(
    tmp_path, capsys, monkeypatch
):
    """Permissions pass, the file system refuses (a virtual one, say): found by trying."""

    def refuse(**kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(cli.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(run_pipeline, "write_example", lambda *a, **k: pytest.fail("it worked"))
    status, _, err = run(["--write-example", str(tmp_path / "example")], capsys)
    assert status == 2 and err.endswith(
        f"--write-example {tmp_path / 'example'}: cannot write in {tmp_path} "
        "(a trial write there failed: Operation not permitted)\n"
    ), err


def test_what_a_sequence_file_holds_is_refused_naming_the_file(folder, tmp_path, capsys):
    sequence = json.loads((folder / "example_sequence.json").read_text())
    sequence["history"][1]["actions"] = {"3": 2}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(sequence))
    status, _, err = run(["--artifacts_dir", str(folder), "--sequence_file", str(bad)], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"{bad}: history item 1: action 3 is 2, expected 0 or 1" in err


def test_a_ranker_whose_actions_lack_the_weighted_ones_is_refused_naming_the_folder(
    folder, tmp_path, capsys
):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    settings = json.loads((copy / "ranker" / "config.json").read_text())
    settings["action_names"] = settings["action_names"][1:] + ["renamed"]
    (copy / "ranker" / "config.json").write_text(json.dumps(settings))
    status, out, err = run(["--artifacts_dir", str(copy)], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.endswith(
        f"{copy}: ranker/config.json lists action_names without favorite_score, which the "
        "feed's score weights\n"
    ), err


def test_what_a_pipeline_cannot_serve_is_refused_by_name(folder, tmp_path):
    artifacts = load_artifacts(folder, fprop_dtype=jnp.float32)
    pipeline = Pipeline(artifacts)
    with pytest.raises(ValueError, match=r"top_k_retrieval must be an integer >= 1, got 0"):
        pipeline.feed(artifacts.sequence, 0)
    assert pipeline.feed(artifacts.sequence, 10**6).retrieved == 400  # the whole corpus
    with pytest.raises(ValueError, match=r"top_k_retrieval must be .*, got '5'"):
        pipeline.feed(artifacts.sequence, "5")
    with pytest.raises(ValueError, match="top_k_display must be an integer >= 1, got 2.5"):
        pipeline.feed(artifacts.sequence, 5, 2.5)
    with pytest.raises(TypeError, match="sequence must be an object .*, got NoneType"):
        pipeline.feed(None)
    with pytest.raises(TypeError, match=r"artifacts must be an Artifacts \(checkpoint.load_"):
        Pipeline(artifacts.ranker)  # one model's, not the folder's
    for fn in (feed_to_json, describe_feed):
        with pytest.raises(TypeError, match="feed must be a Feed, got dict"):
            fn({"items": []})
    for fn in (read_request_time, history_post_ids, lambda s: read_history(s, 4, 19)):
        with pytest.raises(TypeError, match='sequence must be an object with "user_id" and "hi'):
            fn(None)
    for fn in (score_weights, output_names):
        with pytest.raises(TypeError, match="ranker must be a ModelArtifacts, got PhoenixModelC"):
            fn(artifacts.ranker.config)
    swapped = (artifacts.ranker.config, artifacts.retrieval.config)  # a KeyError from inside
    with pytest.raises(TypeError, match="configs.0. must be a PhoenixRetrievalModelConfig, got Ph"):
        write_example(tmp_path / "example", configs=swapped)
    with pytest.raises(TypeError, match="directory must be a str or PathLike .*, got NoneType"):
        write_example(None)
    for arguments, message in (  # numpy's words, or refused only once all was drawn (0 posts)
        ({"corpus_size": -1}, "corpus_size must be an integer >= 1, got -1"),
        ({"corpus_size": 0}, "corpus_size must be an integer >= 1, got 0"),
        ({"corpus_size": 1.5}, "corpus_size must be an integer >= 1, got 1.5"),
        ({"history_length": -1}, "history_length must be an integer >= 0, got -1"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"vocab_size": 1}, "vocab_size must be an integer >= 2, got 1"),
    ):
        with pytest.raises(ValueError, match=message):
            write_example(tmp_path / "example", **arguments)
    assert not (tmp_path / "example").exists()
    posts = artifacts.corpus.post_ids[:3]
    for ids, message in (
        (
            (posts, posts[:2]),
            r"author_ids \[2\] must be one per post, as post_ids \[3\]",
        ),
        ((posts.astype(float), posts), r"post_ids must be integers \[N\], got \[3\] float64"),
        ((posts * 0, posts), r"post_ids must be ids >= 1 \(0 is padding\), got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            encode_corpus(pipeline.retriever, artifacts.retrieval, *ids)
