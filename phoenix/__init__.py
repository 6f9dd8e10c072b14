"""The library under the package name the published ranking guide imports it by.

The guide writes `from phoenix.recsys_model import PhoenixRankingModelConfig` beside
`from grok import TransformerConfig`. Here `phoenix.<module>` is the top-level module itself,
the same object (so that classes and checks are shared), imported when first asked for
(`import phoenix.grok`, `from phoenix import grok`, or `phoenix.grok` after `import phoenix`);
the library keeps its flat layout and its own imports.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MODULES = (
    "cli", "grok", "native_search", "search", "recsys_model", "recsys_retrieval_model",
    "tables", "world", "metrics", "checkpoint", "runners", "pipeline", "train",
)  # fmt: skip


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `phoenix.<module>` for the modules above and loads it as the flat module."""

    phoenix_alias = True  # (how a reloaded package knows the finder it installed before)
    _specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in MODULES:
            return None
        origin = importlib.util.find_spec(name).origin  # the flat module's file, not imported
        return importlib.util.spec_from_loader(fullname, self, origin=origin)

    def create_module(self, spec):
        module = importlib.import_module(spec.name.partition(".")[2])
        self._specs[spec.name] = module.__spec__  # which the import system is about to replace
        return module

    def exec_module(self, module) -> None:  # the flat module ran when it was imported
        module.__spec__ = self._specs.pop(module.__spec__.name)

    def get_code(self, fullname):  # `python -m phoenix.train` runs train.py
        name = fullname.partition(".")[2]
        return importlib.util.find_spec(name).loader.get_code(name)


def __getattr__(name: str):
    if name in MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not any(getattr(finder, "phoenix_alias", False) for finder in sys.meta_path):
    sys.meta_path.append(_Alias())
