"""Indexed-dataset building: read-back of token ids, tokenizer round trip, determinism and the cache, the stdlib
default, Megatron's GPTDataset on the result, and every bad input failing clearly without leaving a dataset."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_muon.data import corpus as data
from megatron_muon.data.corpus import DataError, build_dataset

VOCAB = 400  # the smallest a tiny corpus trains to comfortably (byte fallback alone takes 259)


def _python_document(rng: random.Random, index: int) -> str:
    names = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "items"]
    lines = [f'"""Module {index}: généré, with ümlauts and tabs."""', ""]
    for f in range(rng.randint(3, 8)):
        a, b = rng.sample(names, 2)
        lines += [f"def {a}_{f}({b}, {a}=None):", f"    if {b} > {rng.randint(0, 999)}:",
                  f"\treturn {b} * {rng.random():.4f}  ", f"    return [{a} for {a} in range({b})]", "", ""]
    return "\n".join(lines)


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """A directory of .py, .txt and .jsonl files (documents in the order the builder reads them)."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    documents = []
    for index in range(12):
        text = _python_document(rng, index)
        (root / "pkg" / f"mod_{index:02d}.py").write_text(text)
        documents.append(text)
    jsonl = [_python_document(rng, 100 + index) for index in range(8)]
    (root / "records.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(jsonl)))
    (root / "readme.txt").write_text("A plain text document.\n\n  Indented line, trailing space \n")
    (root / "ignored.bin").write_bytes(b"\xff\xfe not a corpus file")
    # Sorted relative paths: pkg/mod_*.py, readme.txt, records.jsonl.
    return root, documents + ["A plain text document.\n\n  Indented line, trailing space \n"] + jsonl


def _documents(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    # Copies: the arrays are views of a memory map that closes with the dataset.
    return [np.array(dataset[i]) for i in range(len(dataset))]


def _build(corpus_dir, data_dir, **settings):
    return build_dataset([corpus_dir], data_dir=data_dir, vocab_size=VOCAB, progress=False, **settings)


def test_dataset_reads_back_the_token_ids_of_every_document(corpus, tmp_path):
    import sentencepiece

    root, documents = corpus
    built = _build(root, tmp_path / "data", valid_fraction=0.2)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=built.tokenizer_model)
    train, valid = _documents(built.train_prefix), _documents(built.valid_prefix)
    assert (len(train), len(valid)) == (built.train_documents, built.valid_documents) == (17, 4)
    decoded = [tokenizer.decode(ids[:-1].tolist()) for ids in train + valid]
    assert sorted(decoded) == sorted(documents)  # a document-level split: every document in exactly one split
    for text, ids in zip(decoded, train + valid):
        assert ids.tolist() == tokenizer.encode(text) + [built.eod_id]
    assert built.train_tokens == sum(len(ids) for ids in train) and built.valid_tokens == sum(len(v) for v in valid)
    assert train[0].dtype == np.uint16  # Megatron's optimal dtype for a vocabulary under 65500
    assert built.vocab_size == VOCAB and built.eod_id == tokenizer.eos_id()


def test_tokenizer_round_trips_code_exactly_through_megatron(corpus, tmp_path):
    root, _ = corpus
    tokenizer = _build(root, tmp_path / "data").load_tokenizer()
    for text in ["def f(x):\n    return x  \n\n\n\tpass\n", "  leading spaces", "ümlaut ∑ 😀 never seen in training",
                 "x" * 5000]:
        ids = tokenizer.tokenize(text)
        assert tokenizer.detokenize(ids) == text
    assert len(tokenizer.tokenize("def alpha_1(beta, alpha=None):")) < 20  # merges learned, not bytes


def test_builds_are_deterministic_and_cached(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    first = _build(root, tmp_path / "a")
    second = _build(root, tmp_path / "b")
    names = sorted(os.listdir(first.directory))
    assert names == ["manifest.json", "tokenizer.model", "train.bin", "train.idx", "valid.bin", "valid.idx"]
    for name in names:
        a, b = Path(first.directory, name).read_bytes(), Path(second.directory, name).read_bytes()
        assert a.replace(str(tmp_path / "a").encode(), b"") == b.replace(str(tmp_path / "b").encode(), b""), name

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached dataset was rebuilt")

    monkeypatch.setattr(data, "_build_into", no_rebuild)
    assert _build(root, tmp_path / "a") == first
    with pytest.raises(AssertionError, match="rebuilt"):
        _build(root, tmp_path / "a", seed=7)  # another setting is another dataset
    (root / "pkg" / "mod_00.py").write_text("changed = True\n")
    with pytest.raises(AssertionError, match="rebuilt"):
        _build(root, tmp_path / "a")  # and so is a changed input


def test_an_existing_tokenizer_model_is_used_as_is(corpus, tmp_path):
    import sentencepiece

    root, _ = corpus
    first = _build(root, tmp_path / "a")
    other = tmp_path / "other.jsonl"
    texts = ["first record\n", "second record\n", "third record with more words\n"]
    other.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    built = build_dataset(other, data_dir=tmp_path / "b", tokenizer_model=first.tokenizer_model, json_key="body",
                          valid_fraction=0.3, progress=False)
    assert Path(built.tokenizer_model).read_bytes() == Path(first.tokenizer_model).read_bytes()
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=first.tokenizer_model)
    stored = _documents(built.train_prefix) + _documents(built.valid_prefix)
    assert sorted(ids.tolist() for ids in stored) == sorted(tokenizer.encode(t) + [tokenizer.eos_id()] for t in texts)


def test_default_corpus_is_the_python_standard_library(tmp_path):
    import sysconfig

    built = build_dataset(data_dir=tmp_path, vocab_size=512, max_corpus_bytes=150_000, progress=False)
    assert Path(built.directory).name.startswith("stdlib-py3.")
    assert built.corpus == "the Python standard library"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = data.stdlib_files()
    assert files and all(stdlib in f.parents and "test" not in f.relative_to(stdlib).parts[:-1] for f in files)
    tokenizer = built.load_tokenizer()
    sources = {f.read_text(encoding="utf-8", errors="replace") for f in files}
    first = _documents(built.train_prefix)[0]
    assert tokenizer.detokenize(first[:-1].tolist()) in sources
    assert built.train_tokens + built.valid_tokens > 30_000


def test_megatron_gpt_dataset_reads_the_build(corpus, tmp_path):
    root, _ = corpus
    built = _build(root, tmp_path / "data", valid_fraction=0.2)
    train, valid = data.build_gpt_datasets(built, seq_length=64, train_samples=20, valid_samples=3, seed=5)
    assert len(train) >= 20 and len(valid) >= 3
    sample = train[0]
    assert sample["tokens"].shape == (64,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    flags = built.megatron_flags()
    assert flags[flags.index("--train-data-path") + 1] == built.train_prefix
    assert flags[flags.index("--tokenizer-model") + 1] == built.tokenizer_model


def test_command_line_prints_megatron_flags(corpus, tmp_path, capsys):
    root, _ = corpus
    data.main([str(root), "--data-dir", str(tmp_path / "data"), "--vocab-size", str(VOCAB)])
    out = capsys.readouterr().out
    assert "--train-data-path" in out and "--tokenizer-type GPTSentencePieceTokenizer" in out
    with pytest.raises(SystemExit, match="does not exist"):
        data.main([str(tmp_path / "missing")])


def test_command_line_help_runs_without_megatron():
    """`python -m megatron_muon.data --help` answers without importing Megatron: only writing the format and
    reading it back (integration/datasets.py) need it."""
    script = ("import runpy, sys\n"
              "sys.argv = ['megatron_muon.data', '--help']\n"
              "try:\n"
              "    runpy.run_module('megatron_muon.data', run_name='__main__')\n"
              "except SystemExit as done:\n"
              "    assert done.code == 0, done.code\n"
              "print('megatron imported:', 'megatron' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m megatron_muon.data")
    assert result.stdout.rstrip().endswith("megatron imported: False")


def _assert_no_dataset_left(data_dir: Path):
    assert not data_dir.exists() or list(data_dir.iterdir()) == []


@pytest.mark.parametrize(
    "make_corpus, message",
    [
        (lambda d: d / "missing.txt", r"corpus path .*missing.txt does not exist"),
        (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir", r"corpus directory .*empty_dir has no"),
        (lambda d: (d / "blank.txt").write_text(" \n\n") and d / "blank.txt", r"corpus .*blank.txt has no text"),
        (lambda d: (d / "latin1.txt").write_bytes("café".encode("latin-1")) and d / "latin1.txt",
         r"latin1.txt is not UTF-8 text"),
        (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n') and d / "bad.jsonl",
         r"bad.jsonl:2: no string field 'text'"),
        (lambda d: (d / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "broken.jsonl",
         r"broken.jsonl:2: not a JSON line"),
        (lambda d: (d / "one.txt").write_text("a single document") and d / "one.txt", r"needs at least 2"),
    ],
)
def test_bad_corpora_fail_clearly_and_leave_nothing(tmp_path, make_corpus, message):
    with pytest.raises(DataError, match=message):
        build_dataset([make_corpus(tmp_path)], data_dir=tmp_path / "data", vocab_size=VOCAB, progress=False)
    _assert_no_dataset_left(tmp_path / "data")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_named(corpus, tmp_path):
    root, _ = corpus
    locked = root / "pkg" / "mod_03.py"
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match=r"cannot read corpus file .*mod_03.py"):
            _build(root, tmp_path / "data")
    finally:
        locked.chmod(0o644)
    _assert_no_dataset_left(tmp_path / "data")


def test_a_file_that_cannot_be_read_is_named_and_the_walk_reads_only_files(corpus, tmp_path):
    root, _ = corpus
    (root / "pkg" / "dangling.py").symlink_to(root / "nowhere.py")
    (root / "pkg" / "a_dir.txt").mkdir()
    built = _build(root, tmp_path / "data")
    assert built.train_documents + built.valid_documents == 21
    with pytest.raises(DataError, match=r"cannot read corpus file .*a_dir.txt: Is a directory"):
        list(data.read_documents([root / "pkg" / "a_dir.txt"]))


def test_sequence_length_no_split_can_fill_is_refused_before_anything_is_kept(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(DataError, match=r"sequence length 100000 needs at least 100001 tokens per split, but the"):
        _build(root, tmp_path / "data", seq_length=100_000)
    _assert_no_dataset_left(tmp_path / "data")
    built = _build(root, tmp_path / "data", seq_length=64)  # a cached build is checked against the length too
    with pytest.raises(DataError, match=r"but the valid split"):
        _build(root, tmp_path / "data", seq_length=built.valid_tokens)


def test_a_build_that_fails_midway_leaves_nothing(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    real_write_split = data._write_split

    def fail_after_train(prefix, *args):
        if prefix.name == "valid":
            raise KeyboardInterrupt  # also an interrupt, not only an exception, must clean up
        return real_write_split(prefix, *args)

    monkeypatch.setattr(data, "_write_split", fail_after_train)
    with pytest.raises(KeyboardInterrupt):
        _build(root, tmp_path / "data")
    _assert_no_dataset_left(tmp_path / "data")


def test_a_concurrent_builder_that_finishes_first_wins(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    winner = _build(root, tmp_path / "data")
    real_load = data._load_manifest
    calls = []

    def miss_first_lookup(directory):
        calls.append(directory)
        return None if len(calls) == 1 else real_load(directory)

    monkeypatch.setattr(data, "_load_manifest", miss_first_lookup)
    assert _build(root, tmp_path / "data") == winner
    assert [p.name for p in (tmp_path / "data").iterdir()] == [Path(winner.directory).name]


def test_settings_out_of_range_are_refused(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(DataError, match="valid fraction"):
        _build(root, tmp_path / "data", valid_fraction=1.0)
    with pytest.raises(DataError, match="vocab size 100 is too small"):
        build_dataset([root], data_dir=tmp_path / "data", vocab_size=100, progress=False)
    with pytest.raises(DataError, match="could not train a 60000-token vocabulary"):
        build_dataset([root], data_dir=tmp_path / "data", vocab_size=60_000, progress=False)
    with pytest.raises(DataError, match="tokenizer model .* does not exist"):
        build_dataset([root], data_dir=tmp_path / "data", tokenizer_model=tmp_path / "none.model", progress=False)
    _assert_no_dataset_left(tmp_path / "data")
