"""One registry pattern for everything a config names: tasks, samplers, trainers, losses.

A :class:`Registry` maps a name (what ``dataset.name``, ``sampler.name``, ``trainer.name``
or ``method.loss`` holds) to what that name stands for, and answers an unknown name with
one error line that names the field and lists the known names. Backends that a config
group selects are :class:`Backend` entries: their schema (the dataclass Hydra's
ConfigStore holds under ``schema/<group>``) and their builder, written ``"module:attr"``
and imported only when that backend is used, so that the schemas stay importable without
torch, vLLM or DeepSpeed, and no module below the backends imports them.

    SAMPLERS = Registry("sampler", "sampler.name")

    @SAMPLERS.backend("hf", builder="irpo.sampling.hf:HFSampler")
    @dataclass
    class HFSamplerConfig(SamplerConfig): ...

    SAMPLERS.load("hf")     # the class HFSampler
    SAMPLERS.schemas()      # {"hf": HFSamplerConfig, ...}: the ConfigStore entries
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
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


class Registry(MutableMapping[str, T], Generic[T]):
    """Name -> entry, for one kind of thing a config names in the field ``field``."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def backend(self, name: str, builder: str, schema_name: str | None = None) -> Callable[[type], type]:
        """Class decorator for a schema: registers ``name`` as a :class:`Backend` of it."""

        def deco(schema: type) -> type:
            self.register(name, Backend(schema, builder, schema_name))  # type: ignore[arg-type]
            return schema

        return deco

    def get(self, name: str, default: Any = _RAISE) -> T:  # type: ignore[override]
        """The entry called ``name``; ValueError naming the field and the known names.

        With ``default`` given, a missing name returns it, as ``dict.get`` does."""
        try:
            return self._entries[name]
        except KeyError:
            if default is not _RAISE:
                return default
            raise ValueError(
                f"{self.field}={name!r} is not a known {self.kind}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
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
        out: dict[str, type] = {}
        for name, entry in self._entries.items():
            assert isinstance(entry, Backend), f"{self.kind} entries are not backends"
            key = entry.schema_name or name
            if out.setdefault(key, entry.schema) is not entry.schema:
                raise ValueError(f"{self.kind} schema name {key!r} stands for two schemas")
            out[key] = entry.schema
        return out

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry)

    def __delitem__(self, name: str) -> None:  # tests that register a temporary entry undo it
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
