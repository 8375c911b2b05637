"""What GSM8K, MATH and ARC share: finding and reading their data, the split rules, prompts.

Not run on its own; :mod:`irpo.tasks.gsm8k`, :mod:`irpo.tasks.math` and :mod:`irpo.tasks.arc`
build on :class:`HubTask`.

Data resolution (:func:`load_records`), first hit wins:

1. ``dataset.data_dir`` from the config. It may be the data root (one folder per
   task: ``<root>/gsm8k/train.jsonl``), the task's own folder (``<root>/gsm8k``), or a
   folder written by ``datasets.save_to_disk`` (needs the ``datasets`` package). When it is set
   and holds nothing usable, that is an error: a typo must not silently fall through to the hub.
2. The ``IRPO_DATA_DIR`` environment variable, a data root as above.
3. The Hugging Face hub via ``datasets.load_dataset`` (needs ``datasets`` and a network).

Split rules (:meth:`HubTask.load_split`): ``valid`` is a seeded, fixed sample of ``valid_size``
training prompts, excluded from ``train``; sizes of None take the whole split, a size larger than
what is there is an error naming the config field. Subsets are seeded samples, not prefixes,
because MATH and ARC files are ordered by subject / source.

Prompt templates (``dataset.prompt_template``) are filled like ``str.format`` (see
:func:`render`): ``{question}`` everywhere; ``{examples}`` (the few-shot block) for MATH;
``{stem}`` and ``{choices}`` for ARC, whose ``{question}`` is the stem followed by the options.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irpo.config import ConfigError, DatasetConfig
from irpo.tasks.base import Example

DATA_ENV = "IRPO_DATA_DIR"
SPLITS_OF_HUB_TASKS = ("train", "valid", "test")


@dataclass
class HubTaskConfig(DatasetConfig):
    """A real benchmark read from a local copy or the Hugging Face hub: the schema every hub
    task registers (``schema/dataset/hub``; each task's module declares its name and builder)."""

    hub_name: str | None = None
    hub_config: str | None = None
    num_shots: int = 0
    # The paper's checkpoint selection: 4 evenly spaced checkpoints per iteration, the best
    # on the valid split (held-out training prompts) kept.
    checkpoints: int = 4


class DataError(ConfigError):
    """Data the task cannot use: the message names the file and line (or hub row) and what is wrong.

    A ``ConfigError`` (hence a ``ValueError``): the data is an input of the run like its config,
    and ``python -m irpo.main`` prints it as one ``error: ...`` line.
    """


class DataNotFoundError(FileNotFoundError, DataError):
    """No configured place holds the data; the message lists what was tried and the fix."""


class Record(dict):
    """One raw record that knows where it came from: ``where`` is ``file:line`` or a hub row.

    Reading a required field (``rec["answer"]``) that the record lacks, or holds as null, raises
    :class:`DataError` naming the place and the field, not a bare ``KeyError``; ``get`` is
    unchanged for optional fields. Objects nested in a record are Records with the same ``where``.
    """

    __slots__ = ("where",)

    def __init__(self, data: Any = (), where: str = "?"):
        super().__init__(data)
        self.where = where

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)  # absent: __missing__
        if value is None:
            raise DataError(f"{self.where}: record's {key!r} field is null")
        return value

    def __missing__(self, key: str) -> Any:
        raise DataError(f"{self.where}: record has no {key!r} field")


def as_record(obj: Any, where: str) -> Any:
    """``obj`` with every dict in it (at any depth, in lists too) made a :class:`Record`."""
    if isinstance(obj, dict):
        return Record({k: as_record(v, where) for k, v in obj.items()}, where)
    if isinstance(obj, list):
        return [as_record(v, where) for v in obj]
    return obj


@contextmanager
def reading(rec: Any) -> Iterator[None]:
    """Turn one record into an Example: a ValueError inside (a gold answer that does not parse)
    becomes a :class:`DataError` that names the record's place."""
    try:
        yield
    except DataError:
        raise
    except ValueError as err:
        raise DataError(f"{getattr(rec, 'where', '?')}: {err}") from err


@dataclass(frozen=True)
class Source:
    """One data file set: where it lives locally and on the hub."""

    folder: str  # sub-folder of a data root, e.g. "gsm8k"
    files: dict[str, str]  # split -> JSONL file name inside ``folder``
    hub_name: str
    hub_configs: tuple[str | None, ...] = (None,)  # rows of all configs are concatenated
    hub_splits: dict[str, str] = field(default_factory=dict)  # split -> hub split name
    ids: dict[str, str] = field(default_factory=dict)  # split -> file of record ids, line-aligned


def read_jsonl(path: Path) -> list[Record]:
    """Parse a JSON Lines file into :class:`Record` objects that know their ``file:line``.

    A bad line raises :class:`DataError` (a ValueError) naming the file and the line.
    """
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line, object_hook=lambda obj, where=where: Record(obj, where))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON line ({err.msg})") from None
            if not isinstance(rec, dict):  # a data error, like the malformed line above
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records


def _from_directory(root: Path, source: Source, split: str,
                    tried: list[str]) -> list[Record] | None:
    """Records of ``split`` under ``root`` (data root, task folder or sibling folder), or None."""
    name = source.files[split]
    for folder in (root / source.folder, root, root.parent / source.folder):
        path = folder / name
        if path.is_file():
            return _with_ids(read_jsonl(path), folder / source.ids.get(split, ""))
        tried.append(str(path))
    for folder in (root / source.folder, root):
        if (folder / "dataset_dict.json").is_file():
            return _from_saved(folder, source.hub_splits.get(split, split), tried)
    return None


def _with_ids(records: list[dict], ids_path: Path) -> list[dict]:
    """Attach ``unique_id`` from a line-aligned ids file (MATH's original paths), if present."""
    if ids_path.is_file():
        ids = ids_path.read_text(encoding="utf-8").split()
        if len(ids) != len(records):
            raise DataError(f"{ids_path}: {len(ids)} ids for {len(records)} records")
        for rec, rec_id in zip(records, ids):
            rec.setdefault("unique_id", rec_id)
    return records


def _from_saved(folder: Path, split: str, tried: list[str]) -> list[dict] | None:
    try:
        import datasets  # optional dependency
    except ImportError:
        tried.append(f"{folder} (a saved `datasets` folder, but `datasets` is not installed)")
        return None
    saved = datasets.load_from_disk(str(folder))
    if split not in saved:
        raise DataError(f"{folder}: saved dataset has splits {list(saved)}, not {split!r}")
    return [as_record(dict(row), f"{folder} ({split} split, row {i})")
            for i, row in enumerate(saved[split])]


def _from_hub(source: Source, split: str, hub_name: str, configs: Iterable[str | None],
              tried: list[str]) -> list[dict] | None:
    hub_split = source.hub_splits.get(split, split)
    try:
        import datasets  # optional dependency
    except ImportError:
        tried.append(f"hub {hub_name}: the `datasets` package is not installed (pip install datasets)")
        return None
    rows: list[dict] = []
    for config in configs:
        try:
            part = datasets.load_dataset(hub_name, config, split=hub_split)
        except Exception as err:  # noqa: BLE001  # network, auth, moved repo: report and try nothing else
            tried.append(f"hub {hub_name} config={config} split={hub_split}: {type(err).__name__}: {err}")
            return None
        where = f"hub {hub_name} config={config} split={hub_split}"
        rows.extend(as_record(dict(row), f"{where}, row {i}") for i, row in enumerate(part))
    return rows


def load_records(cfg: DatasetConfig, source: Source, split: str, *, hub_name: str | None = None,
                 hub_configs: Iterable[str | None] | None = None) -> list[Record]:
    """Raw records of ``split`` ("train"/"test") of ``source``, resolved as the module says.

    Each is a :class:`Record`: a required field it lacks raises :class:`DataError` naming
    the file and line (or hub row) and the field.
    """
    tried: list[str] = []
    data_dir = cfg.data_dir
    if data_dir:
        root = Path(data_dir).expanduser()
        records = _from_directory(root, source, split, tried) if root.is_dir() else None
        if records is None:
            if not root.is_dir():
                tried.append(f"{root} (not a directory)")
            raise DataNotFoundError(
                f"dataset.data_dir={data_dir!r} holds no {source.folder} {split} data; tried: "
                + "; ".join(tried)
                + f". Point dataset.data_dir at a data root with one folder per task "
                f"(<dir>/{source.folder}/{source.files[split]}) or at the {source.folder} folder."
            )
        return records
    env_dir = os.environ.get(DATA_ENV)
    if env_dir:
        root = Path(env_dir).expanduser()
        if root.is_dir():
            records = _from_directory(root, source, split, tried)
            if records is not None:
                return records
        else:
            tried.append(f"{DATA_ENV}={env_dir} (not a directory)")
    else:
        tried.append(f"{DATA_ENV} (not set)")
    records = _from_hub(source, split, hub_name or source.hub_name,
                        source.hub_configs if hub_configs is None else hub_configs, tried)
    if records is not None:
        return records
    raise DataNotFoundError(
        f"no {source.folder} {split} data found; tried: " + "; ".join(tried)
        + f". Fix: set dataset.data_dir=/path/to/data (a folder holding "
        f"{source.folder}/{source.files[split]}), or export {DATA_ENV}=/path/to/data, "
        "or install `datasets` and go online to read the hub copy."
    )


def seeded_sample(n: int, k: int, key: str) -> list[int]:
    """``k`` of ``range(n)`` chosen by a seeded shuffle (stable across runs and machines)."""
    order = list(range(n))
    random.Random(key).shuffle(order)  # str seeds hash with sha512: no PYTHONHASHSEED dependence
    return sorted(order[:k])


_FIELD_RE = re.compile(r"\{\{|\}\}|\{(\w+)\}")


def render(template: str, **fields: str) -> str:
    """Fill a prompt template the way ``str.format`` would, but forgiving LaTeX.

    ``{name}`` of a given field is replaced; ``{{`` and ``}}`` are literal braces as in
    ``str.format``; any other brace is kept as written, so ``\\boxed{}`` needs no escaping.
    """
    def fill(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        return fields.get(m.group(1), m.group(0))

    return _FIELD_RE.sub(fill, template)


_FINAL_RE = re.compile(r"final\s+answer", re.IGNORECASE)


def after_last_final_answer(text: str) -> str | None:
    """Text after the last "Final answer" (any case, optional ``:`` / ``is``), or None."""
    last = None
    for last in _FINAL_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end():]
    return re.sub(r"^[\s*_:]*(?:is\b|was\b|=)?[\s*_:]*", "", rest, count=1)


class HubTask:
    """Split logic common to the three benchmarks; subclasses supply the raw examples."""

    name: str = ""
    max_shots = 0
    stop_sequences: tuple[str, ...] = ()  # for samplers: text that ends a response

    def __init__(self, cfg: DatasetConfig):
        self.cfg = cfg
        for key in ("train_size", "valid_size", "test_size"):
            value = getattr(cfg, key)  # a field of every DatasetConfig
            if value is not None and value < 0:
                raise ConfigError(f"dataset.{key}={value} must be >= 0 or null")
        shots = getattr(cfg, "num_shots", 0) or 0  # HubTaskConfig only
        if not 0 <= shots <= self.max_shots:
            raise ConfigError(
                f"dataset.num_shots={shots}: task {self.name} supports 0..{self.max_shots} shots"
            )
        self.template = cfg.prompt_template or self.default_template
        if not any("{" + f + "}" in self.template for f in self.question_fields):
            raise ConfigError(  # at build time, not after hours of queueing
                "dataset.prompt_template must contain the "
                + " or ".join("{" + f + "}" for f in self.question_fields) + " placeholder"
            )
        self._cache: dict[str, list[Example]] = {}
        self._pools: dict[str, list[Example]] = {}

    default_template = "{question}"
    question_fields: tuple[str, ...] = ("question",)  # a template must use one of them

    def _pool(self, split: str) -> list[Example]:  # pragma: no cover - abstract
        """All examples of "train" (minus few-shot exemplars) or "test", in file order."""
        raise NotImplementedError

    def load_split(self, split: str) -> list[Example]:
        if split not in SPLITS_OF_HUB_TASKS:
            raise ValueError(
                f"task {self.name} has no {split!r} split; it has {', '.join(SPLITS_OF_HUB_TASKS)}"
                + (" (pre-training is only for the built-in arith task)" if split == "pretrain" else "")
            )
        if split not in self._cache:
            self._cache[split] = self._select(split)
        return list(self._cache[split])

    def _pool_once(self, split: str) -> list[Example]:
        if split not in self._pools:  # train feeds both "train" and "valid": read it once
            self._pools[split] = self._pool(split)
        return self._pools[split]

    def _select(self, split: str) -> list[Example]:
        cfg = self.cfg
        if split == "test":
            pool = self._pool_once("test")
            return _subset(pool, cfg.test_size, "test_size", f"irpo-test-{self.name}")
        pool = self._pool_once("train")
        n_valid = cfg.valid_size or 0
        if n_valid > len(pool):
            raise ConfigError(
                f"dataset.valid_size={n_valid} exceeds the {len(pool)} training prompts of {self.name}"
            )
        held = set(seeded_sample(len(pool), n_valid, f"irpo-valid-{self.name}"))
        if split == "valid":
            return [ex for i, ex in enumerate(pool) if i in held]
        rest = [ex for i, ex in enumerate(pool) if i not in held]
        return _subset(rest, cfg.train_size, "train_size", f"irpo-train-{self.name}",
                       note=f" ({len(pool)} training prompts minus valid_size={n_valid})")


def _subset(pool: list[Example], size: int | None, key: str, seed: str, note: str = "") -> list[Example]:
    if size is None:
        return pool
    if size > len(pool):
        raise ConfigError(f"dataset.{key}={size} exceeds the {len(pool)} examples available{note}")
    return [pool[i] for i in seeded_sample(len(pool), size, seed)]

