"""The benchmark pipeline: prompts -> n samples per problem -> math-verify grading -> metrics/tables.

Protocol (docs/method.md, "Evaluation protocol"; paper defaults): six benchmarks (MATH500, AMC23, Minerva,
OlympiadBench, AIME24, AIME25), n = 8 samples per problem at temperature 1.0, top-p 0.8, at most 8192
new tokens, prompt = problem + "Please reason step by step, and put your final answer within
\\boxed{}.", checker math-verify; Avg@8, Pass@8, and their unweighted mean over benchmarks.

Outputs in ``out_dir``: ``samples.jsonl`` (one line per sample: benchmark, id, sample, prompt, text,
extracted, correct, timed_out, error, num_tokens, truncated), ``summary.json`` and ``table.md``.
Resumable: a rerun reads ``samples.jsonl`` and skips problems whose n samples are all there.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from tqdm.auto import tqdm

from megatron_eaopd.data import (
    PROMPT_SEPARATOR,
    PROMPT_SUFFIX,
    DataError,
    FieldMap,
    PromptRecord,
    build_prompt,
    load_records,
    read_jsonl,
)
from megatron_eaopd.evaluation.grading import GradingPool
from megatron_eaopd.evaluation.metrics import benchmark_metrics, mean_over_benchmarks

logger = logging.getLogger(__name__)

__all__ = [
    "STANDARD_BENCHMARKS",
    "Sample",
    "Generator",
    "ScriptedGenerator",
    "ReplayGenerator",
    "EvalConfig",
    "resolve_benchmarks",
    "load_benchmark",
    "run_evaluation",
    "check_resume",
    "format_table",
]

#: Standard benchmark name -> file name in ``--data-dir`` (the six benchmark files).
STANDARD_BENCHMARKS: dict[str, str] = {
    "MATH500": "math500.jsonl",
    "AMC23": "amc23.jsonl",
    "Minerva": "minerva_math.jsonl",
    "OlympiadBench": "olympiadbench.jsonl",
    "AIME24": "aime24.jsonl",
    "AIME25": "aime25.jsonl",
}


@dataclass
class Sample:
    """One generated response: text (str), num_tokens (int, response tokens), truncated (bool: cut
    at the max-new-tokens limit rather than ended by EOS)."""

    text: str
    num_tokens: int = 0
    truncated: bool = False


@runtime_checkable
class Generator(Protocol):
    """Anything that samples ``n`` responses for each prompt.

    ``generate(prompts, n, seed)`` returns one list of ``n`` Samples per prompt, in prompt order.
    The same (prompts, n, seed) should give the same outputs (for reproducible reruns).
    """

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Sample]]:
        ...


class ScriptedGenerator:
    """Generator whose outputs are given in advance (tests; debugging).

    Args: outputs: ``{prompt_or_problem: [text | Sample, ...]}`` (looked up by the full prompt first,
        then by the problem with the paper's suffix stripped), or a callable
        ``(prompt, sample_index, seed) -> text | Sample``.
    Attributes: calls (list of (prompts, n, seed)) recording every call.
    Raises (from generate): KeyError naming the prompt when it has no script; ValueError when a
        script has fewer than n outputs.
    """

    def __init__(self, outputs: Mapping[str, Sequence[Any]] | Callable[[str, int, int], Any]):
        self.outputs = outputs if callable(outputs) else {k.strip(): v for k, v in outputs.items()}
        self.calls: list[tuple[list[str], int, int]] = []

    @staticmethod
    def _as_sample(x: Any) -> Sample:
        if isinstance(x, Sample):
            return x
        if isinstance(x, Mapping):
            return Sample(text=x["text"], num_tokens=int(x.get("num_tokens", 0)),
                          truncated=bool(x.get("truncated", False)))
        return Sample(text=str(x), num_tokens=len(str(x).split()), truncated=False)

    def _lookup(self, prompt: str) -> Sequence[Any]:
        assert not callable(self.outputs)
        prompt = prompt.strip()
        if prompt in self.outputs:
            return self.outputs[prompt]
        for sep in (PROMPT_SEPARATOR, "\n", ""):
            tail = sep + PROMPT_SUFFIX
            if prompt.endswith(tail) and prompt[: -len(tail)].strip() in self.outputs:
                return self.outputs[prompt[: -len(tail)].strip()]
        raise KeyError(f"no scripted outputs for prompt {prompt[:80]!r}...")

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Sample]]:
        """See ``Generator``."""
        self.calls.append((list(prompts), n, seed))
        out = []
        for p in prompts:
            if callable(self.outputs):
                out.append([self._as_sample(self.outputs(p, i, seed)) for i in range(n)])
            else:
                texts = self._lookup(p)
                if len(texts) < n:
                    raise ValueError(f"scripted outputs have {len(texts)} samples for a prompt but n={n}")
                out.append([self._as_sample(t) for t in texts[:n]])
        return out


class ReplayGenerator(ScriptedGenerator):
    """Replays existing outputs from a JSONL file, to grade outputs produced elsewhere.

    Each line: ``{"prompt" or "problem": str, "text": str, optional "sample": int,
    "num_tokens": int, "truncated": bool}``; lines with the same prompt/problem form that prompt's
    samples (ordered by ``sample`` when present). A ``samples.jsonl`` written by this runner is valid.
    Raises: FileNotFoundError; DataError naming the line for a missing field or invalid JSON.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"replay file not found: {path}")
        groups: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        for lineno, rec in read_jsonl(path):
            key = rec.get("prompt", rec.get("problem"))
            if key is None or "text" not in rec:
                raise DataError(f"{path}:{lineno}: replay records need 'prompt' (or 'problem') and 'text'")
            groups[key].append((int(rec.get("sample", len(groups[key]))), rec))
        if not groups:
            raise DataError(f"replay file {path} is empty")
        super().__init__({k: [r for _, r in sorted(v, key=lambda t: t[0])] for k, v in groups.items()})


@dataclass
class EvalConfig:
    """Evaluation settings (defaults: the paper's, docs/method.md "Evaluation protocol").

    n (int): samples per problem (8); ks (list[int]): pass@k values (default [n]); temperature (1.0),
    top_p (0.8), max_new_tokens (8192): recorded for the generator/summary; seed (int): base seed
    (each generation call uses ``seed + 1000003*benchmark_index + first_problem_index``);
    batch_problems (int): problems per generate() call; limit (int | None): first N problems per
    benchmark; grading_workers (int), grading_timeout (float, seconds per sample);
    suffix/separator/chat_template/chat_template_kwargs/tokenizer: prompt construction (see
    ``prompts.build_prompt``; kwargs default ``{"enable_thinking": False}``);
    fields (FieldMap): field names in the benchmark files; progress (bool): tqdm bar.
    """

    n: int = 8
    ks: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 0.8
    max_new_tokens: int = 8192
    seed: int = 0
    batch_problems: int = 64
    limit: int | None = None
    grading_workers: int = 2
    grading_timeout: float = 10.0
    suffix: str | None = PROMPT_SUFFIX
    separator: str = PROMPT_SEPARATOR
    chat_template: bool = False
    chat_template_kwargs: dict | None = None
    tokenizer: Any = None
    fields: FieldMap = field(default_factory=lambda: FieldMap(problem="problem", answer="answer", id="id"))
    progress: bool = True

    def resolved_ks(self) -> list[int]:
        """The pass@k list, validated. Raises ValueError when any k > n or k < 1."""
        ks = list(self.ks) if self.ks else [self.n]
        bad = [k for k in ks if not 1 <= k <= self.n]
        if bad:
            raise ValueError(f"k must satisfy 1 <= k <= n={self.n}; got k={bad} (draw more samples with --n)")
        return ks


def resolve_benchmarks(names: Sequence[str], data_dir: str | Path | None) -> list[tuple[str, Path]]:
    """Benchmark names/paths -> ``[(display name, file path)]``.

    A standard name (case-insensitive: MATH500, AMC23, Minerva, OlympiadBench, AIME24, AIME25, or
    ``all``) resolves to its file in ``data_dir``; anything else is taken as a file path (display
    name = file stem). Raises FileNotFoundError naming the missing file (and the standard names when
    the argument was neither); ValueError for a standard name without ``data_dir``.
    """
    lower = {k.lower(): k for k in STANDARD_BENCHMARKS}
    expanded: list[str] = []
    for nm in names:
        expanded.extend(STANDARD_BENCHMARKS if nm.lower() == "all" else [nm])
    out: list[tuple[str, Path]] = []
    for nm in expanded:
        if nm.lower() in lower:
            std = lower[nm.lower()]
            if data_dir is None:
                raise ValueError(f"benchmark {std} needs --data-dir (the folder holding {STANDARD_BENCHMARKS[std]})")
            p = Path(data_dir) / STANDARD_BENCHMARKS[std]
            if not p.is_file():
                raise FileNotFoundError(f"benchmark {std}: file not found: {p}")
            out.append((std, p))
        else:
            p = Path(nm)
            if not p.is_file():
                raise FileNotFoundError(f"benchmark {nm!r} is neither a standard name "
                                        f"({', '.join(STANDARD_BENCHMARKS)}) nor an existing file")
            out.append((p.stem, p))
    return out


def load_benchmark(path: str | Path, fields: FieldMap | None = None, limit: int | None = None) -> list[PromptRecord]:
    """Load one benchmark file (JSONL/Parquet rows with ``id``, ``problem``, ``answer`` by default).

    When the file has no ``id`` field the 0-based row index is used. Raises FileNotFoundError,
    DataError naming the file and line of a missing field, DataError for an empty file.
    """
    fields = fields or FieldMap(problem="problem", answer="answer", id="id")
    try:
        return load_records(path, fields, limit=limit)
    except DataError as e:
        if fields.id is not None and f"missing id field {fields.id!r}" in str(e):
            return load_records(path, FieldMap(fields.problem, fields.answer, None, fields.answer_transform), limit=limit)
        raise


def _read_samples(samples_path: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """All records of an existing samples file: ``{(benchmark, id): {sample index: record}}``."""
    found: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    if not samples_path.is_file():
        return {}
    with samples_path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("ignoring a corrupt line in %s (interrupted write?)", samples_path)
                continue
            found[(rec["benchmark"], str(rec["id"]))][int(rec["sample"])] = rec
    return found


#: Settings that change the samples: a resumed run must use the same ones. ``model`` (the path as
#: given) is compared only when either side lacks ``model_identity`` (what that path resolved to).
_RESUME_KEYS = ("model", "model_identity", "temperature", "top_p", "max_new_tokens", "seed", "prompt_suffix",
                "chat_template", "prompt_separator", "chat_template_kwargs")


def _describe_model(ident: Mapping[str, Any] | None, name: Any) -> str:
    if not ident:
        return repr(name)
    it = f" (iteration {ident['iteration']})" if ident.get("iteration") is not None else ""
    return f"{ident.get('path')}{it}"


def _run_config(cfg: EvalConfig, model_name: str, model_identity: Mapping[str, Any] | None) -> dict:
    """The settings recorded in ``run_config.json`` and the summary."""
    return {"model": model_name, "model_identity": dict(model_identity) if model_identity else None, "n": cfg.n,
            "ks": cfg.resolved_ks(), "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "limit": cfg.limit, "prompt_suffix": cfg.suffix,
            "chat_template": cfg.chat_template, "prompt_separator": cfg.separator,
            "chat_template_kwargs": cfg.chat_template_kwargs if cfg.chat_template else None}


def check_resume(out_dir: str | Path, config: EvalConfig, model_name: str = "",
                 model_identity: Mapping[str, Any] | None = None) -> None:
    """Raise ValueError when ``out_dir`` holds samples that ``run_evaluation`` with these arguments would
    refuse to resume (another model or other generation settings); writes nothing. Lets a caller
    fail before loading a model."""
    _check_resume_config(Path(out_dir), _run_config(config, model_name, model_identity), write=False)


def _check_resume_config(out: Path, run_cfg: dict, write: bool = True) -> None:
    """Raise ValueError when ``out`` holds samples made by another model or with other generation
    settings; then (re)write ``out/run_config.json``. Settings recorded without samples (a run that
    failed before generating) are simply replaced."""
    path, samples = out / "run_config.json", out / "samples.jsonl"
    if path.is_file() and samples.is_file() and samples.stat().st_size > 0:
        old = json.loads(path.read_text())
        fresh = f"use a new --out folder, or delete {samples} to start this folder afresh"
        old_id, new_id = old.get("model_identity"), run_cfg.get("model_identity")
        if old_id and new_id:
            if old_id != new_id:
                same = old_id.get("path") == new_id.get("path") and old_id.get("iteration") == new_id.get("iteration")
                raise ValueError(
                    f"{out} holds samples of another model: saved {_describe_model(old_id, old.get('model'))}, now "
                    f"{_describe_model(new_id, run_cfg.get('model'))}"
                    + (" (same folder, but its files changed since)" if same else "") + f"; {fresh}")
            keys = [k for k in _RESUME_KEYS if k != "model"]
        else:
            keys = list(_RESUME_KEYS)
        # keys a folder was written without (older versions) are not compared
        diff = {k: (old.get(k), run_cfg.get(k)) for k in keys if k in old and old[k] != run_cfg.get(k)}
        if diff:
            raise ValueError(f"{out} holds samples generated with other settings {diff} (saved vs now); {fresh}")
    if write:
        path.write_text(json.dumps({k: run_cfg.get(k) for k in _RESUME_KEYS}, indent=2) + "\n")


def format_table(summary: Mapping[str, Any]) -> str:
    """Markdown table like the paper's Table 2: ``| benchmark | Avg@n | Pass@k ... | mean len | trunc % |``
    with one row per benchmark and a ``mean`` row (unweighted). Values in percent, 2 decimals."""
    n = summary["config"]["n"]
    ks = summary["config"]["ks"]
    head = ["benchmark", f"Avg@{n}"] + [f"Pass@{k}" for k in ks] + ["mean length (tokens)", "truncated %"]
    keys = ["avg"] + [f"pass@{k}" for k in ks] + ["mean_length", "truncation_rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = list(summary["benchmarks"].items()) + [("mean", summary["mean"])]
    for name, m in rows:
        cells = [f"{m[k]:.1f}" if k == "mean_length" else f"{m[k]:.2f}" for k in keys]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines) + "\n"


def run_evaluation(generator: Generator, benchmarks: Sequence[tuple[str, str | Path]], out_dir: str | Path,
                   config: EvalConfig | None = None, model_name: str = "",
                   model_identity: Mapping[str, Any] | None = None) -> dict:
    """Run the benchmark pipeline; returns the summary dict (also written to ``summary.json``).

    Args: generator (Generator); benchmarks: ``[(name, path)]`` (see ``resolve_benchmarks``);
        out_dir: output folder (created); config (EvalConfig); model_name (str: the model as given);
        model_identity (dict | None: what the model resolved to, e.g.
        :func:`megatron_eaopd.models.sources.source_identity`; compared on resume instead of the name).
    Returns: ``{"config": {...}, "benchmarks": {name: metrics}, "mean": {...}, "grading": {...}}``
        where metrics are from ``metrics.benchmark_metrics`` (percent).
    Raises: ValueError for k > n or a generator returning the wrong number of samples; DataError /
        FileNotFoundError for bad benchmark files.
    Resumable: problems whose n samples are already in ``out_dir/samples.jsonl`` are not regenerated;
        ``out_dir/run_config.json`` records the generation settings and a rerun with different ones
        (model identity, temperature, top_p, max_new_tokens, seed, prompt suffix, chat template) raises
        ValueError instead of mixing samples. The benchmark files are loaded (and checked) before
        anything is written to ``out_dir``.
    """
    cfg = config or EvalConfig()
    ks = cfg.resolved_ks()
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate")
    data = [(name, load_benchmark(path, cfg.fields, cfg.limit)) for name, path in benchmarks]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / "samples.jsonl"
    run_cfg = _run_config(cfg, model_name, model_identity)
    _check_resume_config(out, run_cfg)
    found = _read_samples(samples_path)
    complete = {key for key, d in found.items() if all(i in d for i in range(cfg.n))}
    done = {key: [found[key][i] for i in range(cfg.n)] for key in complete}
    # keep every record of complete problems (a run with larger n may reuse them); drop partial
    # problems so they are regenerated cleanly
    if samples_path.exists():
        with samples_path.open("w", encoding="utf-8") as f:
            for key in found:  # file order (a set would reorder the lines on every resume)
                if key not in complete:
                    continue
                for i in sorted(found[key]):
                    f.write(json.dumps(found[key][i], ensure_ascii=False) + "\n")

    total = sum(len(recs) for _, recs in data)
    n_done = sum(1 for name, recs in data for r in recs if (name, r.id) in done)
    skipped_resume = n_done
    bar = tqdm(total=total, initial=n_done, desc="eval", unit="problem", disable=not cfg.progress,
               dynamic_ncols=True)
    t0 = time.time()
    n_timeouts = 0
    with GradingPool(workers=cfg.grading_workers, timeout=cfg.grading_timeout) as pool, \
            samples_path.open("a", encoding="utf-8") as fout:
        for b_idx, (name, recs) in enumerate(data):
            todo = [(i, r) for i, r in enumerate(recs) if (name, r.id) not in done]
            for start in range(0, len(todo), cfg.batch_problems):
                chunk = todo[start: start + cfg.batch_problems]
                prompts = [build_prompt(r.problem, cfg.tokenizer, cfg.chat_template, cfg.suffix, cfg.separator,
                                        cfg.chat_template_kwargs) for _, r in chunk]
                seed = cfg.seed + 1000003 * b_idx + chunk[0][0]
                bar.set_postfix_str(f"{name}: generating")
                gens = generator.generate(prompts, cfg.n, seed)
                if len(gens) != len(prompts) or any(len(g) != cfg.n for g in gens):
                    raise ValueError(f"generator returned {[len(g) for g in gens]} samples for {len(prompts)} "
                                     f"prompts; expected {cfg.n} each")
                pairs = [(r.answer, s.text) for (_, r), g in zip(chunk, gens) for s in g]
                bar.set_postfix_str(f"{name}: grading")
                verdicts = pool.grade(pairs)
                v = iter(verdicts)
                for (_, r), prompt, g in zip(chunk, prompts, gens):
                    recs_out = []
                    for si, s in enumerate(g):
                        res = next(v)
                        n_timeouts += res.timed_out
                        rec = {"benchmark": name, "id": r.id, "sample": si, "prompt": prompt, "text": s.text,
                               "answer": r.answer, "extracted": res.extracted, "correct": res.correct,
                               "timed_out": res.timed_out, "error": res.error,
                               "num_tokens": int(s.num_tokens), "truncated": bool(s.truncated)}
                        recs_out.append(rec)
                        fout.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    done[(name, r.id)] = recs_out
                fout.flush()
                bar.update(len(chunk))
    bar.close()

    per_bench = {}
    for name, recs in data:
        per_bench[name] = benchmark_metrics([done[(name, r.id)] for r in recs], ks)
    summary = {
        "config": {**run_cfg, "benchmarks": {name: str(p) for name, p in benchmarks}},
        "benchmarks": per_bench,
        "mean": mean_over_benchmarks(per_bench),
        "run": {"problems": total, "resumed_problems": skipped_resume, "grading_timeouts_this_run": n_timeouts,
                "seconds": time.time() - t0},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(format_table(summary))
    return summary
