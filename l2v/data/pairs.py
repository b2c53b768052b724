"""Pair data for supervised contrastive training: E5 / echo-embeddings jsonl (``query``, ``positive``, optional
``negative``), a per-dataset instruction map, and a batch sampler that draws each batch from one dataset.

One example per line::

    {"query": "how do solar panels work", "positive": "Solar panels convert ...", "negative": "Wind ..."}

Accepted spellings: ``pos``/``neg`` for ``positive``/``negative``; a list of strings for either (the first is
used); ``query`` as an ``[instruction, text]`` pair (a per-example instruction). The dataset of a line is its
``dataset`` field, else the file's stem (the E5 layout: one ``<dataset>.jsonl`` per dataset).

Instruction map (JSON object): ``{"<dataset>": "instruction"}`` for an asymmetric task (instruction on queries
only, documents bare), or ``{"<dataset>": {"instruction": "...", "symmetric": true}}`` for a symmetric task
(both sides are "queries" and get the instruction).

Every error names the file and line; ``skip_bad_lines=True`` skips bad lines and counts them instead.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_directory, atomic_file, atomic_write_text, iter_lines


class PairDataError(ValueError):
    """Bad pair data; the message starts with ``file:line``."""


@dataclass
class PairExample:
    query: str
    positive: str
    negative: str | None = None
    dataset: str = "default"
    source: str = ""                    # "file:line", for messages
    query_instruction: str | None = None
    doc_instruction: str | None = None  # set only for symmetric tasks


@dataclass
class DatasetInstruction:
    instruction: str
    symmetric: bool = False


@dataclass
class PairData:
    examples: list[PairExample]
    skipped: list[str] = field(default_factory=list)   # one "file:line: reason" per skipped line
    files: dict[str, str] = field(default_factory=dict)  # dataset -> first file it came from

    def datasets(self) -> Counter:
        return Counter(e.dataset for e in self.examples)

    def summary(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.datasets().items()))
        text = f"{len(self.examples)} pairs ({parts})"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} bad line(s), first: {self.skipped[0]}"
        return text


def _text_field(rec: dict, names: Sequence[str], where: str, required: bool) -> str | None:
    for name in names:
        if name in rec:
            value = rec[name]
            if isinstance(value, list):
                if not value:
                    raise PairDataError(f"{where}: {name!r} is an empty list; give at least one string.")
                value = value[0]
            if not isinstance(value, str):
                raise PairDataError(f"{where}: {name!r} must be a string, got {type(value).__name__}.")
            if not value.strip():
                raise PairDataError(f"{where}: {name!r} is an empty string.")
            return value
    if required:
        raise PairDataError(f"{where}: missing {names[0]!r} (each line needs 'query' and 'positive', "
                            f"optionally 'negative'); keys present: {sorted(rec)[:8]}.")
    return None


def parse_pair(line: str, where: str, default_dataset: str) -> PairExample | None:
    """One jsonl line -> example (``None`` for a blank line). Raises :class:`PairDataError` naming ``where``."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PairDataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}).") from exc
    if not isinstance(rec, dict):
        raise PairDataError(f"{where}: expected a JSON object with 'query' and 'positive', "
                            f"got {type(rec).__name__}.")
    instruction = None
    q = rec.get("query")
    if isinstance(q, list) and len(q) == 2 and all(isinstance(x, str) for x in q):
        instruction, q = q
        if not q.strip():
            raise PairDataError(f"{where}: 'query' text is an empty string.")
        instruction = instruction or None
    else:
        q = _text_field(rec, ("query",), where, required=True)
    pos = _text_field(rec, ("positive", "pos"), where, required=True)
    neg = _text_field(rec, ("negative", "neg"), where, required=False)
    dataset = rec.get("dataset", default_dataset)
    if not isinstance(dataset, str) or not dataset:
        raise PairDataError(f"{where}: 'dataset' must be a non-empty string, got {dataset!r}.")
    return PairExample(query=q, positive=pos, negative=neg, dataset=dataset, source=where,
                       query_instruction=instruction)


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files and directories (all ``*.jsonl`` inside, sorted) -> list of files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no *.jsonl pair files.")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such pair file or directory.")
    return out


def load_pairs(paths: str | os.PathLike | Iterable[str | os.PathLike], skip_bad_lines: bool = False,
               instructions: str | os.PathLike | dict | None = None) -> PairData:
    """Read pair files; with ``instructions`` (a map file or dict), attach each dataset's instruction."""
    data = PairData(examples=[])
    for path in expand_paths(paths):
        for n, line in iter_lines(path, PairDataError):
            where = f"{path}:{n}"
            try:
                ex = parse_pair(line, where, default_dataset=path.stem)
            except PairDataError as exc:
                if not skip_bad_lines:
                    raise
                data.skipped.append(str(exc))
                continue
            if ex is not None:
                data.examples.append(ex)
                data.files.setdefault(ex.dataset, str(path))
    if not data.examples:
        names = ", ".join(str(p) for p in expand_paths(paths))
        raise PairDataError(f"{names}: no usable pairs" + (f" ({len(data.skipped)} bad lines skipped)"
                                                           if data.skipped else "") + ".")
    if instructions is not None:
        apply_instructions(data, instructions)
    return data


def load_instruction_map(source: str | os.PathLike | dict) -> tuple[dict[str, DatasetInstruction], dict[str, str]]:
    """Parse an instruction map; returns (map, dataset -> "file:line" of its entry, for messages)."""
    if isinstance(source, dict):
        raw, text, name = source, None, "<instructions>"
    else:
        name = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{name}: instruction map not found.") from exc
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PairDataError(f"{name}:{exc.lineno}: invalid JSON ({exc.msg}).") from exc
        if not isinstance(raw, dict):
            raise PairDataError(f"{name}:1: expected a JSON object mapping dataset name -> instruction.")
    where: dict[str, str] = {}
    out: dict[str, DatasetInstruction] = {}
    for key, value in raw.items():
        line = 1
        if text is not None:
            pos = text.find(json.dumps(key))
            line = text.count("\n", 0, pos) + 1 if pos >= 0 else 1
        where[key] = f"{name}:{line}"
        if isinstance(value, str):
            out[key] = DatasetInstruction(value)
        elif isinstance(value, dict) and isinstance(value.get("instruction"), str) \
                and isinstance(value.get("symmetric", False), bool) \
                and not set(value) - {"instruction", "symmetric"}:
            out[key] = DatasetInstruction(value["instruction"], value.get("symmetric", False))
        else:
            raise PairDataError(f"{where[key]}: entry {key!r} must be a string or "
                                '{"instruction": "...", "symmetric": false}.')
    return out, where


def apply_instructions(data: PairData, source: str | os.PathLike | dict) -> None:
    """Set query (and, for symmetric tasks, document) instructions from the map; unknown names are errors."""
    imap, where = load_instruction_map(source)
    known = set(data.datasets())
    for key in imap:
        if key not in known:
            raise PairDataError(f"{where[key]}: unknown dataset {key!r} in the instruction map; "
                                f"datasets in the data: {', '.join(sorted(known))}.")
    for ex in data.examples:
        spec = imap.get(ex.dataset)
        if spec is None:
            continue
        if ex.query_instruction is None:
            ex.query_instruction = spec.instruction or None
        if spec.symmetric:
            ex.doc_instruction = ex.query_instruction


class PairBatchSampler:
    """Global batches of example indices. Without ``mix`` every batch comes from one dataset (as in LLM2Vec / E5);
    with ``mix`` batches are drawn from all data shuffled together. Deterministic per (seed, epoch), so every rank
    of a distributed run builds the same global batches and takes its slice."""

    def __init__(self, data: PairData, batch_size: int, seed: int = 0, mix: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}.")
        self.data, self.batch_size, self.seed, self.mix = data, batch_size, seed, mix
        self.by_dataset: dict[str, list[int]] = {}
        for i, ex in enumerate(data.examples):
            self.by_dataset.setdefault(ex.dataset, []).append(i)
        if mix:
            if len(data.examples) < batch_size:
                raise PairDataError(f"{self._where_all()}: {len(data.examples)} pairs in all, fewer than the "
                                    f"batch size {batch_size}; lower --batch-size.")
        else:
            small = {k: v for k, v in self.by_dataset.items() if len(v) < batch_size}
            if small:
                detail = "; ".join(f"{self._where(k)}: dataset {k!r} has {len(v)} pairs" for k, v in small.items())
                raise PairDataError(f"{detail} — fewer than the batch size {batch_size}, and each batch is drawn "
                                    "from one dataset; lower --batch-size or use --mix-datasets.")

    def _where(self, dataset: str) -> str:
        idx = self.by_dataset[dataset]
        first, last = self.data.examples[idx[0]].source, self.data.examples[idx[-1]].source
        return f"{first}-{last.rsplit(':', 1)[-1]}" if first.rsplit(":", 1)[0] == last.rsplit(":", 1)[0] else first

    def _where_all(self) -> str:
        return ", ".join(sorted({self._where(k) for k in self.by_dataset}))

    def batches(self, epoch: int = 0) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        out: list[list[int]] = []
        groups = [list(range(len(self.data.examples)))] if self.mix else \
            [self.by_dataset[k] for k in sorted(self.by_dataset)]
        for idx in groups:
            idx = list(idx)
            rng.shuffle(idx)
            out.extend(idx[s:s + self.batch_size] for s in range(0, len(idx) - self.batch_size + 1,
                                                                 self.batch_size))
        rng.shuffle(out)
        return out

    def __len__(self) -> int:
        return len(self.batches(0))

    def __iter__(self) -> Iterator[list[PairExample]]:
        epoch = 0
        while True:
            for b in self.batches(epoch):
                yield [self.data.examples[i] for i in b]
            epoch += 1


def write_pairs(path: str | os.PathLike, examples: Iterable[PairExample | dict]) -> int:
    """Write examples as jsonl (atomically); returns the count."""
    path = Path(path)
    n = 0
    with atomic_file(path) as fh:
        for ex in examples:
            rec = ex if isinstance(ex, dict) else {"query": ex.query, "positive": ex.positive,
                                                   **({"negative": ex.negative} if ex.negative else {})}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------ offline default: WordNet pairs
PAIRS_FORMAT = 1  # bump when build_wordnet_pairs or WORDNET_INSTRUCTIONS change: cached pair folders rebuild
PAIR_STAMP = "build.json"
WORDNET_INSTRUCTIONS = {
    "wordnet_usage": "Given a sentence, retrieve the definition of the word sense it uses",
    "wordnet_define": "Given a word and its synonyms, retrieve its dictionary definition",
    "wordnet_synonyms": {"instruction": "Retrieve a word or phrase with the same meaning", "symmetric": True},
}


def build_wordnet_pairs(entries: Sequence[dict], per_dataset: int = 20000, seed: int = 0) -> dict[str, list[dict]]:
    """Real pairs from WordNet synsets, with hard negatives from *other senses of the same word*.

    * ``wordnet_usage`` (asymmetric): usage example sentence -> gloss of its synset;
    * ``wordnet_define`` (asymmetric): "word, synonym, ..." -> gloss;
    * ``wordnet_synonyms`` (symmetric): lemma -> another lemma of the same synset.

    The hard negative is the gloss (or lemma) of another synset sharing the word, else a random synset of the same
    lexicographer file (e.g. noun.animal). At most ``per_dataset`` pairs each, sampled deterministically.
    """
    rng = random.Random(seed)
    by_lemma: dict[str, list[int]] = {}
    by_lex: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        for lemma in {e["word"].lower(), *(s.lower() for s in e["synonyms"])}:
            by_lemma.setdefault(lemma, []).append(i)
        by_lex.setdefault(e.get("lexname") or e["pos"], []).append(i)

    def other(i: int) -> dict:
        e = entries[i]
        senses = [j for j in by_lemma.get(e["word"].lower(), []) if j != i
                  and entries[j]["gloss"] != e["gloss"]]
        if senses:
            return entries[rng.choice(senses)]
        pool = by_lex[e.get("lexname") or e["pos"]]
        for _ in range(8):
            j = rng.choice(pool)
            if j != i and e["word"].lower() not in {entries[j]["word"].lower(), *map(str.lower, entries[j]["synonyms"])}:
                return entries[j]
        return entries[(i + 1) % len(entries)]

    usage, define, synonyms = [], [], []
    for i, e in enumerate(entries):
        if not e.get("gloss"):
            continue
        for ex in e["examples"][:1]:
            if len(ex.split()) >= 3:
                usage.append({"query": ex, "positive": e["gloss"], "negative": other(i)["gloss"]})
        if e["synonyms"]:
            define.append({"query": ", ".join([e["word"], *e["synonyms"]]), "positive": e["gloss"],
                           "negative": other(i)["gloss"]})
            own = {e["word"].lower(), *(x.lower() for x in e["synonyms"])}
            neg = other(i)
            cands = [w for w in [neg["word"], *neg["synonyms"]] if w.lower() not in own]
            if not cands:  # another sense whose lemmas are all ours: take an unrelated word of the same field
                cands = [w for w in (entries[rng.choice(by_lex[e.get("lexname") or e["pos"]])]["word"]
                                     for _ in range(8)) if w.lower() not in own][:1]
            if cands:
                synonyms.append({"query": e["word"], "positive": e["synonyms"][0], "negative": cands[0]})
    out = {}
    for name, rows in (("wordnet_usage", usage), ("wordnet_define", define), ("wordnet_synonyms", synonyms)):
        if len(rows) > per_dataset:
            rows = [rows[k] for k in sorted(rng.sample(range(len(rows)), per_dataset))]
        out[name] = rows
    return out


def _pair_dir_is_current(folder: Path, stamp: dict) -> bool:
    from .sources import stamp_is_current

    try:
        recorded = json.loads((folder / PAIR_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing (a folder from an older l2v, or none yet) or unreadable
        return False
    return stamp_is_current(recorded, stamp) and (folder / "instructions.json").is_file()


def default_pair_dir(per_dataset: int = 20000) -> Path:
    """A directory of offline pair files (``<dataset>.jsonl`` + ``instructions.json``) built from WordNet, cached.

    ``build.json`` records what it was built from (sources.cache_stamp: the WordNet files' fingerprint, the synset
    format, PAIRS_FORMAT); when any changes the folder is rebuilt, as the other data caches are. It is built beside
    its place and renamed in whole (io.atomic_directory), so a killed build leaves the previous folder, never a
    mix of new files under an old completion marker.
    """
    from .sources import cache_stamp, data_dir, note, wordnet_entries, wordnet_files

    folder = data_dir() / f"pairs-wordnet-{per_dataset}"
    stamp = cache_stamp(wordnet_files, pairs_format=PAIRS_FORMAT, per_dataset=per_dataset)
    if _pair_dir_is_current(folder, stamp):
        return folder
    note(f"building WordNet pairs into {folder}" + (" (its source or format changed)" if folder.exists() else "")
          + "...")
    built = build_wordnet_pairs(wordnet_entries(), per_dataset=per_dataset)
    try:
        with atomic_directory(folder) as tmp:
            for name, rows in built.items():
                write_pairs(tmp / f"{name}.jsonl", rows)
            atomic_write_text(tmp / "instructions.json", json.dumps(WORDNET_INSTRUCTIONS, indent=2) + "\n")
            atomic_write_text(tmp / PAIR_STAMP, json.dumps(stamp) + "\n")
    except OSError:
        if not _pair_dir_is_current(folder, stamp):  # else another process put the same build in place first
            raise
    return folder
