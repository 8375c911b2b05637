"""One registry pattern for everything a config names: tasks, samplers, trainers, losses.

A :class:`Registry` maps a name (what ``dataset.name``, ``sampler.name``, ``trainer.name``
or ``method.loss`` holds) to what that name stands for, and answers an unknown name with
one error line that names the field and lists the known names. Backends that a config
group selects are :class:`Backend` entries: their schema (the dataclass Hydra's
ConfigStore holds under ``schema/<group>``) and their builder, written ``"module:attr"``.

A backend declares its name, schema and builder in its own module, inside the package its
registry watches (``irpo.sampling`` for samplers)::

    # irpo/sampling/hf.py
    @SAMPLERS.backend("hf", builder="irpo.sampling.hf:HFSampler")
    @dataclass
    class HFSamplerConfig(SamplerConfig): ...

    SAMPLERS.load("hf")     # the class HFSampler
    SAMPLERS.schemas()      # {"hf": HFSamplerConfig, ...}: the ConfigStore entries

There is no list of backends to keep: the first lookup (``get``, ``names``, ``schemas``,
``load``, ``in``, iteration) imports every module of the package whose top level calls
``<registry>.backend(...)`` or ``<registry>.register(...)`` (:func:`declaring_modules`,
read from the source, so the package's other modules are not imported). Adding a backend
is its module and its YAML option.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_RAISE = object()  # Registry.get's default: an unknown name is an error


@dataclass(frozen=True)
class Backend:
    """A backend a config group selects: its schema and where its builder lives."""

    schema: type
    builder: str  # "module:attr", imported on first use
    # Name of the schema in the ConfigStore's ``schema/<group>``; None: the backend's name.
    # Several backends may share one schema (every hub task uses ``schema/dataset/hub``).
    schema_name: str | None = None


def _declares(tree: ast.Module) -> bool:
    """Whether a module's top level calls ``X.backend(...)`` (a class decorator, too) or
    ``X.register(...)``: the two ways a backend is declared."""
    calls = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            calls += node.decorator_list
        elif isinstance(node, ast.Expr):
            calls.append(node.value)
    return any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
               and c.func.attr in ("backend", "register") for c in calls)


def declaring_modules(package: str) -> list[str]:
    """The modules of ``package`` (not its subpackages, not ``_private`` ones, not
    ``__main__``) whose top level declares a backend, by name, in file-name order."""
    found = []
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__),
                       key=lambda i: i.name):
        if info.ispkg or info.name.startswith("_"):
            continue
        name = f"{package}.{info.name}"
        origin = getattr(importlib.util.find_spec(name), "origin", None)
        if origin and origin.endswith(".py") and _declares(ast.parse(Path(origin).read_text(), origin)):
            found.append(name)
    return found


class Registry(MutableMapping[str, T], Generic[T]):
    """Name -> entry, for one kind of thing a config names in the field ``field``.

    With ``package``, the modules of that package that declare entries are imported at the
    first lookup (:func:`declaring_modules`); without, entries are registered by hand."""

    def __init__(self, kind: str, field: str, package: str | None = None) -> None:
        self.kind = kind
        self.field = field
        self.package = package
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def discover(self) -> None:
        """Import the package's declaring modules, once; their top level registers."""
        if self._discovered:
            return
        self._discovered = True  # first: a module that looks a name up must not recurse
        assert self.package is not None
        for module in declaring_modules(self.package):
            try:
                importlib.import_module(module)
            except Exception as err:
                self._discovered = False
                raise ImportError(f"{self.kind} backends: importing {module} failed: {err}") from err

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def backend(self, name: str, builder: str, schema_name: str | None = None) -> Callable[[type], type]:
        """Class decorator for a schema: registers ``name`` as a :class:`Backend` of it."""

        def deco(schema: type) -> type:
            # A backend module run as a script (``python -m irpo.training.deepspeed_trainer``,
            # a worker) registers when it is imported by its name, not twice.
            if schema.__module__ != "__main__":
                self.register(name, Backend(schema, builder, schema_name))  # type: ignore[arg-type]
            return schema

        return deco

    def get(self, name: str, default: Any = _RAISE) -> T:  # type: ignore[override]
        """The entry called ``name``; ValueError naming the field and the known names.

        With ``default`` given, a missing name returns it, as ``dict.get`` does."""
        self.discover()
        try:
            return self._entries[name]
        except KeyError:
            if default is not _RAISE:
                return default
            raise ValueError(
                f"{self.field}={name!r} is not a known {self.kind}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def load(self, name: str) -> Any:
        """The builder of backend ``name``, imported now (ImportError says which backend)."""
        entry = self.get(name)
        assert isinstance(entry, Backend), f"{self.kind} entries are not backends"
        module_name, attr = entry.builder.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ImportError(f"{self.field.split('.')[0]}={name} needs {module_name}: {err}") from err
        return getattr(module, attr)

    def schemas(self) -> dict[str, type]:
        """Schema name -> schema of every backend: the ConfigStore's ``schema/<group>``."""
        self.discover()
        out: dict[str, type] = {}
        for name, entry in self._entries.items():
            assert isinstance(entry, Backend), f"{self.kind} entries are not backends"
            key = entry.schema_name or name
            if out.setdefault(key, entry.schema) is not entry.schema:
                raise ValueError(f"{self.kind} schema name {key!r} stands for two schemas")
            out[key] = entry.schema
        return out

    def __getitem__(self, name: str) -> T:
        self.discover()
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry)

    def __delitem__(self, name: str) -> None:  # tests that register a temporary entry undo it
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(self._entries)

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)
