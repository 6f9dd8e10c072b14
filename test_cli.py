"""The command-line scripts and what they share (`cli.py`): output a person can check, and bad
input ending in one line `prog: error: ...` with exit status 2, before any work."""

import ast
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

import cli
import run_ranker
import run_retrieval
from conftest import finish, run_script, start_with_devices


def test_long_flags_take_either_spelling(capsys):
    """The published flags (`--artifacts_dir`) and ours (`--output-json`) each answer to `_` and
    `-`, with a value after a space or `=`; values and unknown flags are left alone."""
    parser = cli.ArgumentParser(prog="demo")
    parser.add_argument("--artifacts_dir")
    parser.add_argument("--output-json")
    args = parser.parse_args(["--artifacts-dir", "a_b-c", "--output_json=--x_y"])
    assert (args.artifacts_dir, args.output_json) == ("a_b-c", "--x_y")
    args = parser.parse_args(["--artifacts_dir=d", "--output-json", "e"])
    assert (args.artifacts_dir, args.output_json) == ("d", "e")
    with pytest.raises(SystemExit):
        parser.parse_args(["--output_jsons", "f"])
    assert "unrecognized arguments: --output_jsons f" in capsys.readouterr().err


def test_errors_are_one_line_with_status_2(capsys):
    """Bad flags (argparse) and what a main refuses, or cannot fit in memory, end in one line,
    not a traceback; a main that succeeds returns its status."""
    parser = cli.ArgumentParser(prog="demo")
    cli.add_demo_flags(parser, history_len=32, candidates=8)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--seed", "-1"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err
        == "demo: error: argument --seed: expected an integer >= 0, got -1\n"
    )

    def raises(error):
        def main() -> int:
            raise error

        return main

    for error, text in [
        (MemoryError("Unable to allocate 745. GiB"), "not enough memory for the sizes asked for"),
        (ValueError("top_k must be in [1, N=3]"), "top_k must be in [1, N=3]"),
        (FileNotFoundError("no such file: x.npz"), "no such file: x.npz"),
    ]:
        assert cli.run_main(raises(error), "demo.py") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"demo.py: error: {text}") and err.count("\n") == 1
    assert cli.run_main(lambda: 0, "demo.py") == 0


RANDOM = "--random-weights"


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (run_ranker.main, [RANDOM, "--history-len", "100000"], "would need about 29"),
        (
            run_retrieval.main,
            [RANDOM, "--history-len", "100000"],
            "2 users, history 100000 and 8 candidates",
        ),
        (run_ranker.main, [RANDOM, "--candidates", "10000000000"], "and 10000000000 candidates"),
        (
            run_retrieval.main,
            [RANDOM, "--corpus-size", "100000000000"],
            "a corpus of 100,000,000,000 posts of width 128 would need about",
        ),
        (run_retrieval.main, [RANDOM, "--top-k", "2000"], r"--top-k \(2000\) must not exceed"),
        (run_ranker.main, ["--dtype", "float16"], "argument --dtype: invalid choice"),
        (run_ranker.main, ["--batch-size", "0"], "expected an integer >= 1, got 0"),
        (run_ranker.main, [RANDOM, "--repeats", "1000000000"], "expected an integer <= 10000"),
        (
            run_ranker.main,
            ["--checkpoint", "missing.npz"],
            r"missing.npz: no such file; make one .*\), or pass --random-weights",
        ),
        (run_retrieval.main, ["--checkpoint", "."], r"\.: a folder, not a file; make one"),
        (run_retrieval.main, ["--user", "0"], "argument --user: expected an integer >= 1"),
        (run_ranker.main, ["--user", "10000000"], r"user 10000000 is not in the world"),
        (run_ranker.main, ["--history-len", "5"], "--history-len: only with --random-weights"),
        (run_ranker.main, ["--dtype", "float32"], "--dtype: only with --random-weights"),
        (run_ranker.main, ["--seed", "3"], "--seed: only with --candidates or --random-weights"),
        (
            run_retrieval.main,
            [RANDOM, "--user", "2", "--checkpoint", "x.npz"],
            "--checkpoint, --user: only without --random-weights",
        ),
        (
            run_retrieval.main,
            ["--seed", "1", "--candidates", "3"],
            "--seed, --candidates: only with --random-weights",
        ),
        (run_ranker.main, ["--rand"], "unrecognized arguments: --rand$"),  # not a prefix
        (run_ranker.main, ["--checkpoint", ""], "--checkpoint: expected a file or folder name"),
    ],
)
def test_scripts_refuse_bad_flags_in_one_line(main, argv, message, capsys):
    status, out, err = run_script(main, argv, capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and re.search(message, err), err


def test_run_ranker_lists_each_users_candidates_by_descending_favorite(capsys):
    status, out, err = run_script(
        run_ranker.main, [RANDOM, "--repeats", "1", "--batch-size", "3"], capsys
    )
    assert status == 0, err
    users = out.split("\nUser ")[1:]
    assert len(users) == 2 and "(1 more user ranked, not shown)" in out
    for user in users:
        rows = [line.split() for line in user.splitlines() if re.match(r"\s+\d+\s+\d+\s+0\.", line)]
        assert [int(r[0]) for r in rows] == list(range(1, 9))
        assert sorted(int(r[1]) for r in rows) == list(range(8))
        favorites = [float(r[2]) for r in rows]
        assert favorites == sorted(favorites, reverse=True)


def test_run_ranker_shows_the_shipped_trained_model_favouring_the_users_tastes(capsys):
    status, out, err = run_script(run_ranker.main, [], capsys)
    assert status == 0, err
    assert out.startswith("Trained model: demo_checkpoint.npz")
    assert re.search(r"^user \d+ likes \w+ \(0\.\d\d\)", out, re.M)
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+0\.\d+\s+0\.", line)]
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    favorites = [float(r[1]) for r in rows]
    assert favorites == sorted(favorites, reverse=True)
    found = re.search(r"tastes: (\d+) of the model's top 10, ([\d.]+) of 10 on average", out)
    assert int(found[1]) > float(found[2]) + 2, "the trained ranker should favour the tastes"
    status, out, err = run_script(run_ranker.main, ["--candidates", "100000"], capsys)
    assert status == 0 and "(all there are, fewer than --candidates 100000)" in out, err
    status, out, err = run_script(run_ranker.main, ["--candidates", "5", "--seed", "2"], capsys)
    assert status == 0 and "\nRanking 5 posts, drawn at random (--seed 2) from the " in out, err


def test_run_retrieval_shows_the_shipped_trained_model_retrieving_the_users_tastes(capsys):
    status, out, err = run_script(run_retrieval.main, [], capsys)
    assert status == 0, err
    assert out.startswith("Trained model: demo_checkpoint.npz") and "likes " in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+[+-]\d\.\d+\s", line)]
    scores = [float(r[1]) for r in rows]
    assert len(rows) == 10 and scores == sorted(scores, reverse=True)
    found = re.search(r"tastes: (\d+) of the top 10; (\d+)% of all those posts are", out)
    assert int(found[1]) / 10 > int(found[2]) / 100 + 0.2, "retrieval should favour the tastes"


# Page faults per call of a program with 96 MB of intermediate values (one block, more than
# glibc serves from its heap by default) and a 48 MB result, in a fresh process that keeps freed
# memory for reuse (argument "reuse") or does not.
PAGE_FAULTS = """
import resource, sys
import jax, jax.numpy as jnp
from cli import reuse_freed_memory
if sys.argv[1] == "reuse" and not reuse_freed_memory():
    sys.exit(print("unavailable"))
x = jnp.arange(12 * 2**20, dtype=jnp.float32).reshape(4, -1) / 2**22
program = lambda x: jax.nn.softmax(jnp.sin(x), axis=-1) + jnp.cumsum(x, axis=0)
run = jax.jit(program).lower(x).compile()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(run(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_compiled_calls_reuse_freed_host_memory():
    """Without `reuse_freed_memory` (which train.py, benchmark.py and this suite apply) every call
    touches fresh pages, about 37,000 per call here; with it, only the first calls do, while the
    heap grows to hold the block and results (their number varies, 3 to 7 calls here)."""
    processes = {how: start_with_devices(PAGE_FAULTS, 1, how) for how in ("reuse", "default")}
    faults = {}
    for how, process in processes.items():
        status, out, report = finish(process)
        assert status == 0, report
        if out.strip() == "unavailable":
            pytest.skip("the C library is not glibc")
        faults[how] = [int(n) for n in out.split()]
    assert min(faults["default"]) > 10_000, faults  # every call needs fresh pages
    assert min(faults["reuse"]) < 1000, faults  # once the heap has grown, none


# In a fresh process with neither the suite's cache folder nor its threshold in the
# environment: what `keep_compiled_programs` does before JAX is imported, when JAX's cache is
# turned off, when there is no home folder, when no folder can be made (argv[2] is a file), and
# by default (under argv[1]).
KEEP_COMPILED = """
import json, os, sys
from pathlib import Path
for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    os.environ.pop(name, None)
import cli
seen = {"no jax": cli.keep_compiled_programs()}
import jax
jax.config.update("jax_enable_compilation_cache", False)
seen["turned off"] = cli.keep_compiled_programs()
jax.config.update("jax_enable_compilation_cache", True)
os.environ.pop("XDG_CACHE_HOME", None)
def no_home():
    raise RuntimeError("Could not determine home directory.")
Path.home = staticmethod(no_home)
seen["no home"] = cli.keep_compiled_programs()
os.environ["XDG_CACHE_HOME"] = sys.argv[2]
import warnings
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    seen["no folder"] = cli.keep_compiled_programs()
seen["no folder: said"] = [str(w.message).replace(sys.argv[2], "FILE") for w in said]
seen["no folder: on"] = jax.config.jax_enable_compilation_cache
jax.config.update("jax_enable_compilation_cache", True)
os.environ["XDG_CACHE_HOME"] = sys.argv[1]
seen["default"] = str(cli.keep_compiled_programs())
seen["jax's folder"] = jax.config.jax_compilation_cache_dir
seen["threshold"] = jax.config.jax_persistent_cache_min_compile_time_secs
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(2.0))  # now kept however fast it compiled
print(json.dumps(seen))
"""


def test_scripts_keep_compiled_programs_in_the_user_cache(tmp_path):
    not_a_folder = tmp_path / "a file"
    not_a_folder.write_text("")
    process = start_with_devices(KEEP_COMPILED, 1, str(tmp_path / "cache"), str(not_a_folder))
    status, out, report = finish(process)
    assert status == 0, report
    seen = json.loads(out)
    folder = Path(seen["default"])
    assert folder.parent == tmp_path / "cache" / "phoenix-jax" and folder.name.startswith("xla-")
    assert seen == {
        "no jax": None,
        "turned off": None,
        "no home": None,
        "no folder": None,  # and the cache turned off, saying why, once
        "no folder: said": [
            f"compilation cache off: FILE/phoenix-jax/{folder.name} cannot be made (Not a "
            "directory)"
        ],
        "no folder: on": False,
        "default": str(folder),
        "jax's folder": str(folder),
        "threshold": cli.CACHE_MIN_COMPILE_SECONDS,
    }
    assert any(folder.iterdir()), "the compiled program was not written to the folder"


@pytest.mark.parametrize(
    "switch, value",
    [
        ("JAX_ENABLE_COMPILATION_CACHE", "nope"),
        ("JAX_ENABLE_COMPILATION_CACHE", "true "),  # JAX strips no spaces
        ("PHOENIX_NATIVE_SEARCH", "nope"),
    ],
)
def test_a_switch_that_is_neither_on_nor_off_ends_a_script_in_one_line_as_it_starts(switch, value):
    """JAX's would fail its import with a traceback; the search's would stop a run at its first
    search, after the loading."""
    code = (
        f"import os\nos.environ[{switch!r}] = {value!r}\n"
        "import cli\ncli.quiet_interrupts('demo.py')\nimport jax"
    )
    status, out, report = finish(start_with_devices(code, 1))
    assert status == 2 and report.endswith(
        f"stderr:\ndemo.py: error: {switch}={value!r}: expected true or false (or 1 or 0, yes or "
        "no, on or off)\n"
    ), report


# Output still buffered for a reader that has gone (its pipe closed), as with `| head` and Ctrl-C.
READER_GONE = """
import os, sys
read, write = os.pipe()
os.close(read)
sys.stdout = open(write, "w")
print("never read")
"""


@pytest.mark.parametrize("before", ["", READER_GONE], ids=["plain", "reader gone"])
def test_an_interrupted_script_ends_at_once_with_status_130(before):
    code = "import cli\ndef main():\n    raise KeyboardInterrupt\ncli.run_main(main, 'demo.py')"
    status, out, report = finish(start_with_devices(before + code, 1))
    assert status == 130 and report.endswith("\ndemo.py: interrupted\n"), report


# A script's first lines, its slow imports standing for the sleep.
STARTING = """
import cli, signal, time
cli.quiet_interrupts("demo.py")
print("importing", flush=True)
if {reach_main}:
    def main():
        assert signal.getsignal(signal.SIGINT) is cli._stop
        raise KeyboardInterrupt
    cli.run_main(main, "demo.py")
time.sleep(60)
"""


@pytest.mark.parametrize("reach_main", [False, True], ids=["importing", "in main"])
def test_a_ctrl_c_while_a_script_imports_ends_it_quietly(reach_main):
    """Before `run_main`, a Ctrl-C (here while the script sleeps) ends it as `run_main` does,
    not with a traceback from inside an import; `run_main` takes Ctrl-C over from then on."""
    process = start_with_devices(STARTING.format(reach_main=reach_main), 1)
    assert process.stdout.readline() == "importing\n"
    if not reach_main:
        process.send_signal(signal.SIGINT)
    status, _, report = finish(process, timeout=60)
    assert status == 130 and report.endswith("stderr:\n\ndemo.py: interrupted\n"), report


@pytest.mark.parametrize(
    "script", ["run_ranker.py", "run_retrieval.py", "run_pipeline.py", "train.py"]
)
def test_each_script_hands_ctrl_c_to_cli_before_its_slow_imports(script):
    """Its first statements: the docstring, `from __future__`, `import cli`, then, run as a
    script, `cli.quiet_interrupts` with its own name; every other import after them."""
    body = ast.parse((Path(__file__).parent / script).read_text()).body
    first = [ast.unparse(node) for node in body[:4]]
    assert isinstance(body[0], ast.Expr) and first[1:3] == [
        "from __future__ import annotations",
        "import cli",
    ]
    assert first[3] == f"if __name__ == '__main__':\n    cli.quiet_interrupts('{script}')"


# A script stopped while it writes a file, the sleep standing for the writing.
WRITING = """
import sys, time
from pathlib import Path
import cli
cli.quiet_interrupts("demo.py")
import checkpoint
def main():
    with checkpoint.atomic_path(Path(sys.argv[1]) / "out.json") as scratch:
        scratch.write_text("half")
        print("writing", flush=True)
        time.sleep(60)
    return 0
sys.exit(cli.run_main(main, "demo.py"))
"""


@pytest.mark.parametrize("stop, status, word", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "terminated"),  # what `kill` and `timeout` send
])  # fmt: skip
def test_a_script_stopped_while_writing_leaves_no_temporary_file(stop, status, word, tmp_path):
    """SIGTERM ended the process where it was, leaving the temporary file beside the one it
    was writing (and a training run's folder then refused as holding foreign files)."""
    process = start_with_devices(WRITING, 1, str(tmp_path))
    assert process.stdout.readline() == "writing\n"
    process.send_signal(stop)
    got, _, report = finish(process, timeout=60)
    assert got == status and report.endswith(f"demo.py: {word}\n"), report
    assert list(tmp_path.iterdir()) == []


# A script that swallows the first SIGTERM, as where it lands in a garbage-collection callback.
SWALLOWED = """
import sys, time
import cli
cli.quiet_interrupts("demo.py")
def main():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except cli.Terminated:
        print("swallowed", flush=True)
    time.sleep({then})
    return 0
sys.exit(cli.run_main(main, "demo.py"))
"""


# A script stopped inside a __del__ (as inside JAX's garbage-collection callback), where an
# exception can only be reported.
IN_A_DEL = """
import sys, time
import cli
cli.quiet_interrupts("demo.py")
class Slow:
    def __del__(self):
        print("in __del__", flush=True)
        time.sleep(60)
def main():
    Slow()  # collected at once: the signal lands in its __del__
    time.sleep(60)
    return 0
sys.exit(cli.run_main(main, "demo.py"))
"""


@pytest.mark.parametrize("stop, status, word", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "terminated"),
])  # fmt: skip
def test_a_stop_that_lands_where_it_can_only_be_reported_is_raised_again(stop, status, word):
    """It was reported as 'Exception ignored in ...' with a traceback, and the script went on
    (a training run to its end, status 0)."""
    process = start_with_devices(IN_A_DEL, 1)
    assert process.stdout.readline() == "in __del__\n"
    process.send_signal(stop)
    got, _, report = finish(process, timeout=30)
    assert got == status and report.endswith(f"demo.py: {word}\n"), report
    assert "Exception ignored" not in report and "Traceback" not in report, report


@pytest.mark.parametrize("then", [60, 0], ids=["working on", "returning"])
def test_a_sigterm_swallowed_where_it_landed_still_ends_the_script(then):
    """Raised again 2 s later while the script works on; if it returns first, it ends as
    terminated all the same (its files are whole either way)."""
    process = start_with_devices(SWALLOWED.format(then=then), 1)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    status, _, report = finish(process, timeout=30)
    assert status == 143 and report.endswith("demo.py: terminated\n"), report
    assert "swallowed" in report


# A script whose work is done, its shutdown standing for the sleep.
FINISHED = """
import cli, time
cli.quiet_interrupts("demo.py")
cli.run_main(lambda: 0, "demo.py")
print("done", flush=True)
time.sleep(60)
"""


def test_a_ctrl_c_after_the_work_is_done_ends_the_script_quietly_with_its_status():
    """Pressed while Python shut down, it printed a traceback from JAX's exit handler."""
    process = start_with_devices(FINISHED, 1)
    assert process.stdout.readline() == "done\n"
    process.send_signal(signal.SIGINT)
    status, _, report = finish(process, timeout=60)
    assert status == 0 and "Traceback" not in report and "interrupted" not in report, report


WORK_AFTER_THE_READER_HAS_GONE = """
import sys, warnings
from pathlib import Path
import cli
def main():
    for i in range(50_000):
        print("line", i)
    sys.stdout.writelines(f"line {i}\\n" for i in range(50_000))
    warnings.warn_explicit("a warning of ours", RuntimeWarning, cli.__file__, 1)
    warnings.warn_explicit("a library's warning", RuntimeWarning, warnings.__file__, 1)
    Path(sys.argv[1]).write_text("finished")
    return 0
sys.exit(cli.run_main(main, "demo.py"))
"""


def test_output_whose_reader_has_gone_is_dropped_while_the_work_goes_on(tmp_path):
    """As with `script | head`: the script still finishes its work and its files, and ends
    with status 0 and nothing on stderr but its warnings: one line for a warning raised in the
    project's modules, Python's lines for a library's."""
    done = tmp_path / "done"
    code = READER_GONE + WORK_AFTER_THE_READER_HAS_GONE
    status, _, report = finish(start_with_devices(code, 1, str(done)))
    assert status == 0 and done.read_text() == "finished", report
    stderr = report.split("stderr:\n", 1)[1]
    assert stderr.startswith("demo.py: warning: a warning of ours\n"), report
    assert "warnings.py:1: RuntimeWarning: a library's warning\n" in stderr, report
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, report


STDOUT = {
    "closed": "sys.stdout = None\n",  # as `script >&-` starts
    "full": "sys.stdout = open('/dev/full', 'w')\n",  # a disk with no room left
}
PRINTS_THEN_WRITES = """
import cli
def main():
    print("a line")
    Path(sys.argv[1]).write_text("finished")
    return 0
sys.exit(cli.run_main(main, "demo.py"))
"""


@pytest.mark.parametrize(("stdout", "status", "stderr"), [
    ("closed", 0, ""),
    ("full", 2, "demo.py: error: [Errno 28] No space left on device\n"),
])  # fmt: skip
def test_output_that_cannot_be_written_is_one_line_or_nothing(stdout, status, stderr, tmp_path):
    done = tmp_path / "done"
    code = "import sys\nfrom pathlib import Path\n" + STDOUT[stdout] + PRINTS_THEN_WRITES
    got, _, report = finish(start_with_devices(code, 1, str(done)))
    assert got == status and done.read_text() == "finished", report
    assert report.split("stderr:\n", 1)[1] == stderr, report


@pytest.mark.parametrize(
    "main, flags",
    [
        (run_ranker.main, {"--batch-size", "--history-len", "--dtype", "--repeats"}),
        (
            run_retrieval.main,
            {"--seed", "--candidates", "--batch-size", "--history-len", "--dtype", "--repeats",
             "--corpus-size"},
        ),
    ],
)  # fmt: skip
def test_help_groups_the_flags_the_trained_demo_refuses(main, flags, capsys):
    status, out, _ = run_script(main, ["--help"], capsys)
    assert status == 0
    group = out.split("with --random-weights only:")[1]
    assert set(re.findall(r"^  (--[a-z-]+)", group, re.MULTILINE)) == flags
    for flag in flags:
        value = "float32" if flag == "--dtype" else "3"
        status, _, err = run_script(main, [flag, value], capsys)
        assert status == 2 and f"{flag}: only with --random-weights" in err, err


def test_a_pipe_or_a_link_into_a_read_only_folder_is_no_place_to_write(tmp_path, monkeypatch):
    """A file written at a device or pipe would replace it; one written at a link replaces what
    it points to, so the folder that counts is the target's."""
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to(tmp_path / "pipe")
    for name in ("pipe", "link"):
        assert cli.not_a_regular_file(tmp_path / name) == (
            f"{tmp_path / name} is a device, pipe or socket, not a file: choose another name"
        )
        assert cli.file_in_a_folder(tmp_path / name) == cli.not_a_regular_file(tmp_path / name)
    assert cli.not_a_regular_file(tmp_path) is None  # a folder: for the caller to judge
    assert cli.not_a_regular_file(tmp_path / "new.json") is None
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "feed.json").symlink_to(locked / "feed.json")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)  # read-only
    assert cli.file_in_a_folder(tmp_path / "feed.json").startswith(f"cannot write in {locked}")


def test_the_writing_probe_leaves_the_folder_as_it_was(tmp_path):
    (tmp_path / "kept").write_text("")
    assert cli.file_in_a_folder(tmp_path / "new" / "deeper") is None
    assert cli.file_in_a_folder(tmp_path / "kept.json") is None
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert (
        cli.file_in_a_folder(tmp_path / "kept" / "x")
        == f"{tmp_path / 'kept'} is a file, not a folder"
    )


def test_measure_alternates_the_functions_and_takes_medians(monkeypatch):
    """On a clock that only the timed calls move: each function is called once to warm up, once
    to estimate, then in rounds that alternate them, `budget` seconds' worth (3 to 25 calls);
    what each returns is waited for, and the result is the median of the timed calls."""
    clock, calls, waited = [0.0], [], []
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])

    def takes(name: str, durations: list[float]):
        def fn():
            clock[0] += durations[calls.count(name)]
            calls.append(name)
            return name

        return fn

    slow = [1.5, 1.0, 9.0, 1.0, 2.0]  # warm-up, estimate, then three timed calls
    times = cli.measure(
        {"slow": takes("slow", slow), "fast": takes("fast", [0.01] * 27)}, 0.5, waited.append
    )
    assert times == pytest.approx({"slow": 2.0, "fast": 0.01})
    assert calls[:4] == ["slow", "slow", "fast", "fast"]  # warm-up and estimate, in turn
    assert calls[4:10] == ["slow", "fast"] * 3  # slow: 3 calls at the least
    assert calls[10:] == ["fast"] * 22  # fast: 0.5 / 0.01 capped at 25
    assert waited == calls


def test_load_average_prints_the_three_figures_to_two_places(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 1.234, 12.0))
    assert cli.load_average() == "0.50, 1.23, 12.00"


def test_an_install_holds_every_project_module_the_library_and_scripts_import():
    """`pip install .` installs the modules named in pyproject.toml, one by one and anchored at
    the top folder: each project module that one of them or a script imports is among them."""
    import tomllib

    root = Path(__file__).parent
    wheel = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    include = wheel["targets"]["wheel"]["include"]
    # Anchored at the top folder: a pattern without the leading "/" matches in any subfolder.
    assert all(f.startswith("/") for f in include), include
    installed = {Path(f).stem for f in include if f.endswith(".py") and f.count("/") == 1}
    project = {p.stem for p in root.glob("*.py")}

    def imported(module: str) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse((root / f"{module}.py").read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
        return names & project

    scripts = {"run_ranker", "run_retrieval", "run_pipeline", "published_pipeline"}
    scripts |= {"benchmark", "benchmark_pipeline"}
    needed = set().union(*(imported(m) for m in installed | scripts)) - scripts
    assert needed <= installed, f"imported but not installed: {sorted(needed - installed)}"
    assert installed <= project, f"named but not in the repository: {installed - project}"
    assert {"/native_search.cc", "/phoenix/__init__.py"} <= set(include)
    import phoenix  # whose aliases are the installed modules, every one of them

    assert set(phoenix.MODULES) == installed
