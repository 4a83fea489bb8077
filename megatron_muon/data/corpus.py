"""Training data as Megatron indexed datasets (.bin/.idx), built and cached in a data directory.

With no corpus given, the corpus is the Python standard library of the running interpreter (the paper's Python
domain, arXiv 2505.02222 Sec. 2, and present on every machine): its *.py files outside test packages, one
document per file, a seeded sample of at most `DEFAULT_STDLIB_BYTES`. A user corpus is any mix of files and
directories: `.jsonl` files hold one document per line (the `json_key` field, "text" by default, as
Megatron-LM's preprocess_data.py expects), any other file is one UTF-8 document, and directories contribute
their `TEXT_SUFFIXES` and `.jsonl` files recursively. The whole corpus is held in memory: this is for corpora
of up to a few GB; larger ones belong in Megatron-LM's tools/preprocess_data.py.

Documents are split train / valid at the document level by a seeded shuffle. A byte-fallback BPE sentencepiece
tokenizer is trained on the train split (or an existing sentencepiece model is used), every document is
encoded and ended with the tokenizer's EOS (Megatron's EOD), and each split is written with megatron.core's
IndexedDatasetBuilder. Everything is deterministic: the same inputs and settings give byte-identical files.
Megatron itself is only touched through `megatron_muon/integration/datasets.py`: the format written here, and the
tokenizer and GPTDatasets that read it back.

The result lives in `<data_dir>/<label>-<key>/` where the key hashes the inputs (paths, sizes, modification
times; the tokenizer model's bytes) and every setting. It is built in a temporary sibling directory and moved
into place with one atomic rename, so a failed or interrupted build never leaves a usable-looking directory,
and concurrent builders of the same key agree (the first rename wins, the others discard their copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_muon.integration import datasets as megatron_datasets

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_STDLIB_BYTES = 8 * 2**20  # ~8 MiB of stdlib source (CPython 3.12 has ~11.6 MB outside its tests)
DEFAULT_VALID_FRACTION = 0.05
DEFAULT_SEED = 1234
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
# What the model sees as one training document is never cut; this only bounds the "sentences" sentencepiece
# trains on (its max_sentence_length is 4192 bytes by default and longer ones are dropped).
_TOKENIZER_CHUNK_BYTES = 2048
_TOKENIZER_TRAINING_BYTES = 64 * 2**20
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_TYPE = "GPTSentencePieceTokenizer"  # megatron.training's --tokenizer-type for a sentencepiece model


class DataError(ValueError):
    """A corpus, tokenizer or setting that cannot make the requested dataset; the message says which and why."""


@dataclass(frozen=True)
class BuiltData:
    """A built dataset: Megatron path prefixes of the two splits and the tokenizer that made them."""

    directory: str
    train_prefix: str
    valid_prefix: str
    tokenizer_model: str
    vocab_size: int
    eod_id: int
    train_documents: int
    valid_documents: int
    train_tokens: int
    valid_tokens: int
    corpus: str  # what was read, for logs

    def megatron_flags(self) -> list[str]:
        """megatron.training's data and tokenizer flags for this dataset."""
        return [
            "--train-data-path", self.train_prefix,
            "--valid-data-path", self.valid_prefix,
            "--tokenizer-type", TOKENIZER_TYPE,
            "--tokenizer-model", self.tokenizer_model,
        ]

    def check_sequence_length(self, seq_length: int) -> None:
        """Every split must fill at least one sample of seq_length + 1 tokens (inputs plus shifted labels)."""
        for split, tokens in (("train", self.train_tokens), ("valid", self.valid_tokens)):
            if tokens < seq_length + 1:
                raise DataError(
                    f"sequence length {seq_length} needs at least {seq_length + 1} tokens per split, but the {split} "
                    f"split of {self.corpus} has {tokens}: use a larger corpus, a larger valid fraction, or a "
                    f"shorter sequence length"
                )

    def load_tokenizer(self):
        """megatron.core's tokenizer for this dataset (what --tokenizer-type/--tokenizer-model builds)."""
        return megatron_datasets.load_tokenizer(self.tokenizer_model)

    def gpt_dataset_config(self, seq_length: int, seed: int = DEFAULT_SEED, tokenizer=None, **overrides):
        """A megatron.core GPTDatasetConfig of the train and valid splits, its index cache in this dataset's
        directory; refused before Megatron sees it when a split cannot fill one sequence."""
        self.check_sequence_length(seq_length)
        return megatron_datasets.gpt_dataset_config(
            self.train_prefix, self.valid_prefix, os.path.join(self.directory, "gpt_dataset_cache"), seq_length, seed,
            tokenizer if tokenizer is not None else self.load_tokenizer(), **overrides,
        )


def build_gpt_datasets(data: BuiltData, seq_length: int, train_samples: int, valid_samples: int,
                       seed: int = DEFAULT_SEED, tokenizer=None):
    """(train, valid) megatron.core GPTDatasets of this build with at least the given sample counts
    (`integration.datasets.build_gpt_datasets`: epochs repeat as needed; call it on every rank)."""
    config = data.gpt_dataset_config(seq_length, seed, tokenizer)
    return megatron_datasets.build_gpt_datasets(config, train_samples, valid_samples)


def default_data_dir() -> Path:
    """$MEGATRON_MUON_DATA_DIR, else ~/.cache/megatron-muon/data."""
    configured = os.environ.get("MEGATRON_MUON_DATA_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "megatron-muon" / "data"


def build_dataset(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    tokenizer_model: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_corpus_bytes: int | None = None,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    seed: int = DEFAULT_SEED,
    json_key: str = "text",
    seq_length: int | None = None,
    progress: bool = True,
) -> BuiltData:
    """Build (or find in the cache) the indexed dataset of `inputs`, or of the stdlib when `inputs` is empty.

    max_corpus_bytes caps the corpus by a seeded sample of whole documents: DEFAULT_STDLIB_BYTES for the
    stdlib when None, no cap for a user corpus when None. vocab_size is ignored when tokenizer_model (an
    existing sentencepiece model) is given. seq_length, when given, must fit in both splits.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid fraction must be in (0, 1), got {valid_fraction}")
    if seq_length is not None and seq_length < 1:
        raise DataError(f"sequence length must be >= 1, got {seq_length}")
    if tokenizer_model is None and vocab_size < 300:
        raise DataError(f"vocab size {vocab_size} is too small: byte fallback alone takes 259 tokens")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    use_stdlib = not inputs
    files = stdlib_files() if use_stdlib else corpus_files(inputs)
    if use_stdlib and max_corpus_bytes is None:
        max_corpus_bytes = DEFAULT_STDLIB_BYTES
    tokenizer_path = _existing_file(tokenizer_model, "tokenizer model") if tokenizer_model is not None else None
    settings = dict(
        format=_FORMAT_VERSION,
        vocab_size=None if tokenizer_path else vocab_size,
        max_corpus_bytes=max_corpus_bytes,
        valid_fraction=valid_fraction,
        seed=seed,
        json_key=json_key,
        tokenizer=_sha256_file(tokenizer_path) if tokenizer_path else None,
    )
    label = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}" if use_stdlib else "corpus"
    corpus_description = "the Python standard library" if use_stdlib else ", ".join(str(p) for p in inputs)
    key = _cache_key(files, settings)
    # Absolute, so the prefixes mean the same to every rank whatever its working directory.
    root = (Path(data_dir) if data_dir is not None else default_data_dir()).resolve()
    final = root / f"{label}-{key[:16]}"

    built = _load_manifest(final)
    if built is None:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=root))
        try:
            # mkdtemp's 0700 would follow the rename: a shared cache should read like any directory made here.
            os.chmod(staging, 0o777 & ~_umask())
            built = _build_into(staging, final, files, use_stdlib, corpus_description, tokenizer_path, settings,
                                progress)
            if seq_length is not None:
                built.check_sequence_length(seq_length)
            try:
                os.replace(staging, final)
            except OSError:
                if _load_manifest(final) is None:
                    raise
                # Another process finished the same build first; its files are byte-identical to ours.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        built = _load_manifest(final)
    if seq_length is not None:
        built.check_sequence_length(seq_length)
    return built


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library *.py files outside test packages, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (path for path in root.rglob("*.py") if not _STDLIB_EXCLUDED_DIRS & set(path.relative_to(root).parts[:-1])),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(f"no Python standard library sources under {root} (a stripped interpreter?); pass a corpus")
    return files


def corpus_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files a user corpus consists of, in a deterministic order (inputs in the given order, directories
    sorted recursively)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"corpus path {path} does not exist")
        if path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl")),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not found:
                raise DataError(f"corpus directory {path} has no {'/'.join((*TEXT_SUFFIXES, '.jsonl'))} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"corpus path {path} is neither a file nor a directory")
    return files


def read_documents(files: Sequence[Path], json_key: str = "text", skip_undecodable: bool = False) -> Iterator[str]:
    """The non-empty documents of `files` in order; an unreadable or malformed file is an error naming it."""
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read corpus file {path}: {err.strerror or err}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if skip_undecodable:
                continue
            raise DataError(f"corpus file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text, json_key)
        elif text.strip():
            yield text


def _jsonl_documents(path: Path, text: str, json_key: str) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
            raise DataError(f"{path}:{number}: no string field {json_key!r}")
        if record[json_key].strip():
            yield record[json_key]


def _build_into(staging: Path, final: Path, files, use_stdlib, corpus_description, tokenizer_path, settings,
                progress) -> BuiltData:
    with _progress(progress) as bar:
        reading = bar.add_task("reading corpus", total=None)
        documents = []
        for document in read_documents(files, settings["json_key"], skip_undecodable=use_stdlib):
            documents.append(document)
            bar.advance(reading)
        bar.update(reading, total=len(documents))
        if not documents:
            raise DataError(f"corpus {corpus_description} has no text")
        documents = _sample(documents, settings["max_corpus_bytes"], settings["seed"])
        if len(documents) < 2:
            raise DataError(
                f"corpus {corpus_description} has {len(documents)} document; a train/valid split needs at least 2 "
                f"(a plain text file is one document: use several files or JSONL lines)"
            )
        train, valid = _split(documents, settings["valid_fraction"], settings["seed"])

        model_path = staging / "tokenizer.model"
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, model_path)
        else:
            training = bar.add_task(f"training tokenizer (vocab {settings['vocab_size']})", total=1)
            model_path.write_bytes(_train_tokenizer(train, settings["vocab_size"]))
            bar.advance(training)
        import sentencepiece

        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        if tokenizer.eos_id() < 0:
            raise DataError(f"tokenizer {tokenizer_path} has no EOS token to end documents with")

        counts = {}
        tokenizing = bar.add_task("tokenizing", total=len(documents))
        for split, split_documents in (("train", train), ("valid", valid)):
            counts[split] = _write_split(staging / split, split_documents, tokenizer, lambda: bar.advance(tokenizing))

    built = BuiltData(
        directory=str(final),
        train_prefix=str(final / "train"),
        valid_prefix=str(final / "valid"),
        tokenizer_model=str(final / "tokenizer.model"),
        vocab_size=tokenizer.vocab_size(),
        eod_id=tokenizer.eos_id(),
        train_documents=len(train),
        valid_documents=len(valid),
        train_tokens=counts["train"],
        valid_tokens=counts["valid"],
        corpus=corpus_description,
    )
    manifest = dict(asdict(built), settings=settings, python=sys.version.split()[0])
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return built


def _sample(documents: list[str], max_bytes: int | None, seed: int) -> list[str]:
    """Whole documents, drawn in a seeded order until max_bytes, back in corpus order: a sample spread over the
    corpus (a prefix of the stdlib would be only its first modules alphabetically)."""
    if max_bytes is None:
        return documents
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for index in order:
        size = len(documents[index].encode("utf-8"))
        if total + size > max_bytes and chosen:
            continue
        chosen.append(index)
        total += size
    return [documents[index] for index in sorted(chosen)]


def _split(documents: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    order = list(range(len(documents)))
    random.Random(seed + 1).shuffle(order)
    valid_count = min(len(documents) - 1, max(1, round(valid_fraction * len(documents))))
    valid = set(order[:valid_count])
    return ([d for i, d in enumerate(documents) if i not in valid], [d for i, d in enumerate(documents) if i in valid])


def _train_tokenizer(documents: list[str], vocab_size: int) -> bytes:
    """A serialized byte-fallback BPE model that reproduces any UTF-8 text exactly: identity normalization, no
    whitespace folding, no dummy prefix, so indentation and newlines of code survive a round trip."""
    import io

    import sentencepiece

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_training_chunks(documents),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            max_sentence_length=_TOKENIZER_CHUNK_BYTES,
            # No sampling and one thread: the model depends on the corpus only.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise DataError(
            f"sentencepiece could not train a {vocab_size}-token vocabulary on this corpus: {err}"
        ) from None
    return model.getvalue()


def _training_chunks(documents: list[str]) -> Iterator[str]:
    budget = _TOKENIZER_TRAINING_BYTES
    for document in documents:
        chunk, chunk_bytes = [], 0
        for line in document.splitlines(keepends=True):
            for piece in _cut(line, _TOKENIZER_CHUNK_BYTES):
                size = len(piece.encode("utf-8"))
                if chunk and chunk_bytes + size > _TOKENIZER_CHUNK_BYTES:
                    yield "".join(chunk)
                    chunk, chunk_bytes = [], 0
                chunk.append(piece)
                chunk_bytes += size
                budget -= size
        if chunk:
            yield "".join(chunk)
        if budget <= 0:
            return


def _cut(line: str, max_bytes: int) -> Iterator[str]:
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    step = max_bytes // 4  # a character is at most 4 UTF-8 bytes
    for start in range(0, len(line), step):
        yield line[start : start + step]


def _write_split(prefix: Path, documents: list[str], tokenizer, advance) -> int:
    def encoded():
        for document in documents:
            yield tokenizer.encode(document) + [tokenizer.eos_id()]
            advance()

    return megatron_datasets.write_indexed_dataset(prefix, encoded(), tokenizer.vocab_size())


def _load_manifest(directory: Path) -> BuiltData | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    fields = {name: manifest[name] for name in BuiltData.__dataclass_fields__}
    return BuiltData(**fields)


def _cache_key(files: Sequence[Path], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist or is not a file")
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        yield bar


def main(argv: list[str] | None = None) -> None:
    """python -m megatron_muon.data [CORPUS ...] [options]: build (or find) a dataset, print its flags."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_muon.data", description=main.__doc__)
    parser.add_argument("corpus", nargs="*", help="text / .jsonl files or directories (default: the Python stdlib)")
    parser.add_argument("--data-dir", default=None, help=f"cache directory (default: {default_data_dir()})")
    parser.add_argument("--tokenizer-model", default=None, help="an existing sentencepiece .model to use")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--max-corpus-bytes", type=int, default=None)
    parser.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--seq-length", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        built = build_dataset(
            args.corpus, data_dir=args.data_dir, tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
            max_corpus_bytes=args.max_corpus_bytes, valid_fraction=args.valid_fraction, seed=args.seed,
            json_key=args.json_key, seq_length=args.seq_length,
        )
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"# {built.corpus}: {built.train_documents} + {built.valid_documents} documents, "
          f"{built.train_tokens} + {built.valid_tokens} tokens (train + valid), vocab {built.vocab_size}")
    print(" ".join(built.megatron_flags()))


if __name__ == "__main__":
    main()
