"""What every script of the project shares: flags, one-line errors, timing.

Standard library only, so that any script can use it whatever it imports.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

DTYPE_NAMES = ("bfloat16", "float32")


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: `prog: error: message`, and whose long
    flags may be spelled with `_` or `-` alike (the published flags use `_`, ours `-`)."""

    def __init__(self, *args, **kwargs):
        # A prefix of a flag is not taken for the flag (`--rand` for `--random-weights`): a
        # misspelt flag is refused by name rather than read as another.
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._spelled(a) for a in args], namespace)

    def _spelled(self, arg: str) -> str:
        """`arg` with its flag as this parser spells it, if it names one in the other spelling."""
        if not arg.startswith("--") or arg == "--":
            return arg
        flag, sep, value = arg.partition("=")
        if flag in self._option_string_actions:
            return arg
        for other in (flag[:2] + flag[2:].replace("-", "_"), flag[:2] + flag[2:].replace("_", "-")):
            if other in self._option_string_actions:
                return other + sep + value
        return arg


def count(n: int, noun: str) -> str:
    """`n noun`, the noun plural unless n is 1: count(1, "user") is "1 user"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def not_a_regular_file(path: os.PathLike) -> str | None:
    """Why a file written at `path` would replace something that is not one: `path` (or what
    its links point to) is a device, a pipe or a socket, or its links loop. None for a file, a
    folder or nothing."""
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops where links loop
        return f"{path} is a symbolic link that loops, not a file: choose another name"
    if target.exists() and not (target.is_file() or target.is_dir()):
        return f"{path} is a device, pipe or socket, not a file: choose another name"
    return None


# The empty folder `file_in_a_folder` makes, and removes at once, to try a folder for writing.
PROBE_PREFIX = ".probe."


def file_in_a_folder(path: os.PathLike) -> str | None:
    """Why a file or folder could not be written at `path`: it is a device, pipe or socket, the
    first of its parents that exists is not a folder, or (unless `path` is a folder already) it
    cannot be written in; None when it could (as far as that goes)."""
    if problem := not_a_regular_file(path):
        return problem
    path = Path(os.path.realpath(path))  # a link is written through: where it points counts
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if path.is_dir():
                return None
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot write in {parent} (no permission, or read-only)"
            probe = None
            try:  # what the permissions do not tell (a virtual or network file system, say)
                probe = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=parent)
            except OSError as error:
                reason = error.strerror or error
                return f"cannot write in {parent} (a trial write there failed: {reason})"
            finally:  # (gone even if the script is stopped here)
                if probe is not None:
                    with contextlib.suppress(OSError):
                        os.rmdir(probe)
            return None
    return None


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected an integer <= {high}, got {value}")
        return value

    return parse


def path_arg(text: str) -> str:
    """argparse type of a file or folder name: any text but the empty one, which every file
    function would read as the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file or folder name, got an empty one")
    return text


def path_type(text: str) -> Path:
    """`path_arg`, as a Path."""
    return Path(path_arg(text))


positive_int = _int_at_least(1)  # argparse type: an integer >= 1
non_negative_int = _int_at_least(0)  # argparse type: an integer >= 0
# The demos' timed runs: enough for a median, not a run that never ends.
MAX_REPEATS = 10_000
# argparse type of seeds: small enough for NumPy and JAX's 32-bit keys, offsets included.
seed_int = _int_at_least(0, 2**30)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


# Flags that only the random-weights demos read.
RANDOM_ONLY_FLAGS = ("batch_size", "history_len", "dtype", "repeats")


def add_demo_flags(
    parser: ArgumentParser,
    history_len: int,
    candidates: int,
    candidates_help: str | None = None,
    random_only: tuple[str, ...] = RANDOM_ONLY_FLAGS,
) -> argparse._ArgumentGroup:
    """The flags both demo scripts take, with their defaults; those in `random_only` (read by
    the random-weights demo alone) in a group of their own, which is returned for more."""
    group = parser.add_argument_group("with --random-weights only")
    where = lambda name: group if name in random_only else parser  # noqa: E731
    seed_use = "" if "seed" in random_only else "; in the trained demo, with --candidates"
    where("seed").add_argument(
        "--seed", type=seed_int, default=0, help=f"seed of weights and data (0{seed_use})"
    )
    where("candidates").add_argument(
        "--candidates",
        type=positive_int,
        default=candidates,
        help=candidates_help or f"per user ({candidates})",
    )
    where("batch_size").add_argument("--batch-size", type=positive_int, default=2, help="users (2)")
    where("history_len").add_argument(
        "--history-len",
        type=positive_int,
        default=history_len,
        help=f"history length ({history_len})",
    )
    where("dtype").add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="(float32)")
    where("repeats").add_argument(
        "--repeats",
        type=_int_at_least(1, MAX_REPEATS),
        default=10,
        help=f"timed runs (10; at most {MAX_REPEATS})",
    )
    return group


def add_trained_demo_flags(parser: ArgumentParser, checkpoint: str, what: str) -> None:
    """The flags of the demos that show a trained model, `--random-weights` to show the
    published demo instead."""
    parser.add_argument(
        "--random-weights", action="store_true", help=f"random weights and {what} (no training)"
    )
    parser.add_argument("--checkpoint", type=path_arg, default=checkpoint, help="the trained model")
    parser.add_argument(
        "--user",
        type=positive_int,
        help="the world's user to show, 1 to its number of users (the first with two clear tastes "
        "and a full history)",
    )


# Flags that only the trained demos read.
TRAINED_ONLY_FLAGS = ("checkpoint", "user")


def parse_demo_args(parser: ArgumentParser, argv: list[str] | None, random_only=RANDOM_ONLY_FLAGS):
    """Parses a demo's flags. Those in `random_only` are read by the random-weights demo
    alone, `TRAINED_ONLY_FLAGS` by the trained demo alone: typed for the other demo they are
    refused by name rather than silently dropped; not typed, they take their defaults."""
    names = (*random_only, *TRAINED_ONLY_FLAGS)
    defaults = {name: parser.get_default(name) for name in names}
    parser.set_defaults(**dict.fromkeys(names))
    args = parser.parse_args(argv)
    wrong = TRAINED_ONLY_FLAGS if args.random_weights else random_only
    given = [name for name in wrong if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        them = "them" if len(given) > 1 else "it"
        demo = ("random-weights", "without") if args.random_weights else ("trained", "with")
        parser.error(
            f"{flags}: only {demo[1]} --random-weights (the {demo[0]} demo does not read {them})"
        )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# glibc's mallopt parameters.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> bool:
    """Lets the host's memory freed by one compiled call serve the next instead of returning
    it to the system; True if applied (glibc), False elsewhere (nothing changes).

    XLA's CPU runtime allocates a call's intermediate values as one block: 174 MB for a
    training step of the demo ranker. glibc gives a block that large a fresh `mmap` and unmaps
    it when freed, so every call touches it anew, one page fault per 4 KB (42,000 per training
    step, which spent a quarter of its time in the kernel). With one arena, no `mmap` and no
    trimming, the block comes from the heap and stays there for the next call. Call it before
    JAX's first computation: each thread picks its arena on its first allocation.

    The cost is memory: what is freed is kept for the life of the process, so its peak stays
    resident. Training and benchmarks use it; the pipeline does not (serving 1,000,000 posts it
    ran no faster with it, and its resident peak rose from 0.75 to 0.86 GB).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(option, value) == 1 for option, value in settings)


# The variable that turns JAX's persistent compilation cache on or off, and the values JAX
# takes for a switch (any other fails its import).
CACHE_SWITCH = "JAX_ENABLE_COMPILATION_CACHE"
JAX_TRUTH_VALUES = ("y", "yes", "t", "true", "on", "1", "n", "no", "f", "false", "off", "0")

# Programs that compile faster than this are compiled again rather than read from the disk.
CACHE_MIN_COMPILE_SECONDS = 0.5


def keep_compiled_programs() -> Path | None:
    """Turns on JAX's persistent compilation cache for a script that has imported JAX, so
    that a second run reads what the first compiled instead of compiling it again (a second
    `train.py --quick` spends most of its first run's minute compiling). The folder is
    `$JAX_COMPILATION_CACHE_DIR` if set, else `phoenix-jax/xla-<CPU>` under `$XDG_CACHE_HOME`
    (default `~/.cache`), one per instruction set since XLA compiles for the host's (JAX's keys
    hold the program, the JAX version and the flags, not the CPU: a home folder shared between
    machines would otherwise serve one machine's code to another);
    `JAX_ENABLE_COMPILATION_CACHE=false` keeps it off. Returns the folder, or None when the
    cache stays off (JAX not imported, turned off, or no folder can be made). The folder can
    be removed at any time.

    Called by `run_main`: the scripts keep their programs, a library import changes nothing.
    """
    jax = sys.modules.get("jax")
    if jax is None or not jax.config.jax_enable_compilation_cache:
        return None
    folder = jax.config.jax_compilation_cache_dir
    if not folder:
        try:
            base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        except (RuntimeError, KeyError):  # no home folder to be found
            return None
        folder = Path(base) / "phoenix-jax" / f"xla-{_instruction_set_key()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        problem = None if os.access(folder, os.W_OK) else "is not writable"
    except FileExistsError:  # (a file, or a link to nothing)
        problem = "is there and is not a folder"
    except OSError as error:
        problem = f"cannot be made ({error.strerror or type(error).__name__})"
    if problem is not None:  # off, said once, rather than failing on every program it keeps
        jax.config.update("jax_enable_compilation_cache", False)
        warnings.warn(f"compilation cache off: {folder} {problem}", RuntimeWarning, stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    return Path(folder)


def _instruction_set_key() -> str:
    """12 hex digits naming this CPU's instruction set (its flags line in /proc/cpuinfo)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


_PYTHON_FORMAT_WARNING = warnings.formatwarning
_PROJECT = Path(__file__).resolve().parent


def _format_warning(prog: str, message, category, filename, *where) -> str:
    """Warnings raised by our code (UserWarning, or any warning at a line of the project's own
    modules) as one line naming the script; others, from libraries, as Python has them."""
    path = Path(filename)
    ours = category is UserWarning or (path.is_absolute() and path.parent == _PROJECT)
    if not ours:
        return _PYTHON_FORMAT_WARNING(message, category, filename, *where)
    return f"{prog}: warning: {' '.join(str(message).split())}\n"


class _OutputOrNothing:
    """A script's stdout or stderr that, once its reader has gone (a pipe closed by `head` or
    by quitting `less`), sends the rest to /dev/null: the work, and the files it writes, go on
    to the end as if the output were read. Output that cannot be written for another reason (a
    full disk) raises its error once, the rest going to /dev/null too."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        with self._guarded():
            return self._stream.write(text)
        return len(text)  # the reader has gone

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._guarded():
            self._stream.flush()

    @contextlib.contextmanager
    def _guarded(self):
        try:
            yield
        except OSError as error:
            _to_devnull(self._stream.fileno())  # so that the exit's flush does not fail again
            if not isinstance(error, BrokenPipeError):
                raise

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _flush(*streams) -> None:
    for stream in streams:
        if stream is not None:  # a closed standard stream is None
            stream.flush()


def _to_devnull(fd: int) -> None:
    """Points `fd` at /dev/null, so that what is still buffered for it (and the flush at exit)
    goes there instead of failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


# The Ctrl-C handler `quiet_interrupts` installs, which `run_main` replaces by Python's own.
_while_starting: Callable | None = None


def quiet_interrupts(prog: str) -> None:
    """For a script's first lines, before its slow imports (JAX's take a second or two): a
    Ctrl-C among them ends the process at once with status 130, saying `interrupted`, as it does
    within `run_main`, instead of a traceback from inside an import. `run_main` hands Ctrl-C
    back to Python as it starts."""
    global _while_starting

    def interrupted(signum, frame) -> None:
        with contextlib.suppress(OSError):
            sys.stderr.write(f"\n{prog}: interrupted\n")
            sys.stderr.flush()
        os._exit(130)

    _while_starting = interrupted
    signal.signal(signal.SIGINT, interrupted)
    # Switches read later, checked now: JAX reads its own when it is imported (as it is, but
    # for case) and fails with a traceback from inside it; the native search reads its own (as
    # JAX would, but for spaces, or empty for on) at the first search, after the loading.
    for name, empty, strip in ((CACHE_SWITCH, (), False), ("PHOENIX_NATIVE_SEARCH", ("",), True)):
        value = os.environ.get(name)
        if value is None:
            continue
        if (value.strip() if strip else value).lower() not in JAX_TRUTH_VALUES + empty:
            sys.stderr.write(
                f"{prog}: error: {name}={value!r}: expected true or false (or 1 or 0, yes or "
                "no, on or off)\n"
            )
            sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill` and `timeout` send), raised where the script is, so that what it
    was writing is cleaned up as at a Ctrl-C."""


# The signal that asked a script to stop (SIGINT or SIGTERM), once one came: `main` is then
# not taken as done, even if it returns.
_stop_signal: int | None = None


def _stop(signum: int, frame) -> None:
    """A script's handler of Ctrl-C and SIGTERM. Raised where Python happens to be, the
    exception can land where exceptions are only reported (JAX's garbage-collection callback,
    a __del__) and be lost: it is then raised again at once (`_lost`), and in any case every
    2 s until one ends the script (which, cleaning up in milliseconds, exits long before)."""
    global _stop_signal
    _stop_signal = signum
    _raise_again_in(2.0)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _raise_again_in(seconds: float) -> None:
    if hasattr(signal, "setitimer"):  # (not on Windows)
        signal.signal(signal.SIGALRM, lambda signum, frame: _stop(_stop_signal, frame))
        signal.setitimer(signal.ITIMER_REAL, seconds, 2.0)


def _lost(unraisable) -> None:
    """`sys.unraisablehook` of a script: a stop that landed where it could only be reported
    is raised again, quietly; anything else is reported as Python does."""
    if _stop_signal is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
        _raise_again_in(0.01)
        return
    sys.__unraisablehook__(unraisable)


def run_main(main: Callable[[], int], prog: str, interrupted: str = "interrupted") -> int:
    """Runs a script's `main` with its compiled programs kept between runs
    (`keep_compiled_programs`); input it refuses (ValueError, TypeError), a file it cannot read
    or write (OSError) and sizes that do not fit in memory end in one line on stderr and exit
    status 2, as argparse's errors do; warnings print as one line; Ctrl-C ends the process at
    once with status 130, saying `interrupted` (in a script SIGTERM too, with 143, saying
    `terminated`, what it was writing cleaned up alike; once it has returned, a script's
    process ends at a Ctrl-C or SIGTERM with main's status, quietly). Output piped into a
    reader that stops early (`| head`) is dropped from then on while the work goes on to its
    end."""
    if _while_starting is not None:  # a script: Ctrl-C and `kill` end it, cleaning up
        if signal.getsignal(signal.SIGINT) is _while_starting:
            signal.signal(signal.SIGINT, _stop)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # (one ignored stays so)
            signal.signal(signal.SIGTERM, _stop)
        sys.unraisablehook = _lost
    warnings.formatwarning = functools.partial(_format_warning, prog)
    keep_compiled_programs()
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (None if s is None else _OutputOrNothing(s) for s in streams)
    try:
        status = _run(main, prog, interrupted)
    finally:
        sys.stdout, sys.stderr = streams
    if _while_starting is not None:
        # A script's work is done: a Ctrl-C while Python shuts down (JAX's exit handlers take a
        # moment) ends the process with the work's status, not with a traceback from them.
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, lambda signum, frame: os._exit(status))
    return status


def _run(main: Callable[[], int], prog: str, interrupted: str) -> int:
    """`run_main` with its streams in place."""
    try:
        status = main()
        if _stop_signal is not None:  # lost where it landed, and `main` went on to its end
            raise Terminated if _stop_signal == signal.SIGTERM else KeyboardInterrupt
        _flush(sys.stdout, sys.stderr)  # here, where errors are handled, not at exit
        return status
    except KeyboardInterrupt as stop:
        if _stop_signal is not None and hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)  # it landed: not raised again in here
        status = 143 if isinstance(stop, Terminated) else 130  # 128 + the signal, as shells do
        said = interrupted
        if isinstance(stop, Terminated):  # (what follows the word, a hint, holds alike)
            said = "terminated" + interrupted.removeprefix("interrupted")
        print(f"\n{prog}: {said}", file=sys.stderr)
        # Ends the process here: Python's own shutdown could crash (3 times in 7 interrupts of
        # train.py while it compiled) with XLA's compiler threads still at work. Every file is
        # written whole or not at all, so nothing is left half-written.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a pipe's reader may have gone with the Ctrl-C
                _flush(stream)
        os._exit(status)
    except BrokenPipeError:
        # A reader gone under a write the streams above do not see (to `sys.stdout.buffer`,
        # say): the work that wrote it stops here, quietly, as Python advises.
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                _to_devnull(fd)
        return 0
    except (ValueError, TypeError, OSError) as error:
        message = str(error)
    except MemoryError as error:
        message = f"not enough memory for the sizes asked for ({error})"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _call(fn: Callable[[], Any], wait: Callable[[Any], Any] = lambda x: x) -> tuple[Any, float]:
    """(what `fn` returns, the seconds it took, `wait`ing for it)."""
    start = time.perf_counter()
    result = fn()
    wait(result)
    return result, time.perf_counter() - start


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """Runs fn once (compiling it), then `repeats` times: (result, first seconds, median s).

    `fn` must wait for its own result (e.g. `jax.block_until_ready`)."""
    result, first = _call(fn)
    return result, first, statistics.median(_call(fn)[1] for _ in range(repeats))


def measure(
    fns: dict[str, Callable[[], Any]], budget: float, wait: Callable[[Any], Any] = lambda x: x
) -> dict[str, float]:
    """Median seconds per call of each function, `wait`ing for what it returns, after a warm-up
    call: about `budget` seconds of repeats each (3 to 25), interleaved round by round so that a
    change in the machine's load affects them all alike."""

    def seconds(fn: Callable[[], Any]) -> float:
        return _call(fn, wait)[1]

    repeats = {}
    for name, fn in fns.items():
        first = seconds(fn)  # compiles, touches memory
        estimate = first if first > 4 * budget else seconds(fn)
        repeats[name] = max(3, min(25, int(budget / max(estimate, 1e-9))))
    times = {name: [] for name in fns}
    for round_index in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_index < repeats[name]:
                times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(rows: list, columns: dict[str, Callable[[object], str]]) -> None:
    """Rows (records) as a right-aligned table, one column per (header, formatter)."""
    cells = [[fmt(row) for fmt in columns.values()] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(columns)]
    line = "  ".join(h.rjust(w) for h, w in zip(columns, widths, strict=True))
    print(line + "\n" + "-" * len(line))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths, strict=True)))
    print()


def load_average() -> str:
    """The machine's load average over 1, 5 and 15 minutes: a benchmark prints it at its start
    and end, since on a shared machine its times mean little without it."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"
