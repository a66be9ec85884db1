"""Offline tests of the data scripts: scripts/textprep.py and the local processing of scripts/prepare-*.sh.

Every input is a small fake built in tmp_path in the exact format of the real download (IWSLT train.tags
and .xml, WMT .sgm, PTB text in simple-examples.tgz, Ding dictionary lines, Rush et al.'s Gigaword files).
fairseq-preprocess takes ~5 s to import, so it runs for real once (the Ding script); the other scripts get
a stub that records its arguments.
"""

import importlib.util
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent


def _load_textprep():
    spec = importlib.util.spec_from_file_location("textprep", SCRIPTS / "textprep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tp = _load_textprep()

# variables the scripts read: a developer's own settings must not leak into the tests
_SCRIPT_VARS = ("DING_FILE", "DING_DEB", "DING_URL", "PHRASES", "BPE_MERGES", "MAX_SUBWORDS", "VALID_SIZE",
                "TEST_SIZE", "SEED", "IWSLT14_SRC", "IWSLT14_ARCHIVE", "IWSLT14_URL", "LOWERCASE", "PTB_SRC",
                "PTB_ARCHIVE", "PTB_URL", "WMT14_SRC", "WMT14_URL_BASE", "GIGAWORD_SRC", "GIGAWORD_ARCHIVE",
                "GIGAWORD_URL", "VOCAB", "FAIRSEQ_BIN")


def run_script(name, out, *, stub=None, **env):
    """Run scripts/NAME OUT with this interpreter's environment first on PATH; returns the process."""
    full = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
    full.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable,
                OMP_NUM_THREADS="1", WORKERS="1", PYTHONHASHSEED="0")
    if stub is not None:
        full.update(FAIRSEQ_BIN=str(stub.parent), STUB_LOG=str(stub.parent / "calls.txt"))
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(SCRIPTS / name), str(out)], env=full, capture_output=True, text=True,
                          timeout=120, cwd=out.parent)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def preprocess_stub(tmp_path):
    """A fake fairseq-preprocess: records its arguments, writes DESTDIR/preprocess.log."""
    stub = tmp_path / "stubbin" / "fairseq-preprocess"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "$@" >> "$STUB_LOG"\n'
                    'while (( $# )); do [[ "$1" == --destdir ]] && dest="$2"; shift; done\n'
                    'mkdir -p "$dest" && echo stub > "$dest/preprocess.log"\n')
    stub.chmod(0o755)
    return stub


def lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines()


# ----------------------------------------------------------------------------- textprep units


def test_strip_markup_iwslt_tags_and_seg():
    tags = ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks, art</keywords>",
            "<speaker>Jane Doe</speaker>", "<talkid>1</talkid>", "<title>Jane Doe: Kunst</title>",
            "<description>TED Talk: Kunst.</description>", "Das ist ein Satz.",
            '<reviewer href="http://x">R</reviewer>', '<translator href="http://y">T</translator>', "  Noch einer. "]
    assert tp.strip_markup(tags, "tags") == ["Jane Doe: Kunst", "TED Talk: Kunst.", "Das ist ein Satz.", "Noch einer."]
    xml = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", '<doc docid="535" genre="lectures">',
           "<description>not a segment</description>", '<seg id="1"> AT&amp;T don\u2019t </seg>',
           '<seg id="2">&quot;Ja&quot;, sagte er.</seg>', "</doc>"]
    assert tp.strip_markup(xml, "seg") == ["AT&T don't", '"Ja", sagte er.']


def test_tokenizer_no_escape_and_lowercase():
    assert tp.Tokenizer("en")("He said \"don't\".") == 'He said " don \'t " .'
    assert tp.Tokenizer("de", lowercase=True)("Der Hund, 3.5 Mio. Euro!") == "der hund , 3.5 mio. euro !"
    assert tp.Tokenizer("en", aggressive_dash_splits=True)("a well-known fact") == "a well @-@ known fact"
    assert tp.Detokenizer("en")("I 'm sure , he said .") == "I'm sure, he said."


def test_clean_parallel_is_clean_corpus_n():
    src = ["a b c", "a", "a b c d e", "", "x " * 176]
    tgt = ["a b", "a b c", "a b c d e f", "a", "y"]
    # "a"/"a b c": ratio 3 > 1.5; "" empty; 176 tokens > 175
    assert tp.clean_parallel(src, tgt) == (["a b c", "a b c d e"], ["a b", "a b c d e f"])
    assert tp.clean_parallel(["a", "a b c"], ["a b", "a"], max_len=2, ratio=0) == (["a"], ["a b"])
    with pytest.raises(ValueError):
        tp.clean_parallel(["a"], [])


def test_ding_clean_and_filters():
    assert tp.ding_clean("Den Abschluss (des Berichts) bildet ein Anhang.") == "Den Abschluss bildet ein Anhang."
    assert tp.ding_clean("Da ist noch nicht alles verloren.; Da ist noch Abhilfe möglich. [ugs.]") \
        == "Da ist noch nicht alles verloren."
    assert tp.ding_clean("Aal {m} (auf der (Speise)karte) [cook.]") == "Aal"
    assert tp.ding_clean("Er kam (gestern) .") == "Er kam."
    assert tp.ding_clean("I\u2019m sure.") == "I'm sure."
    reason = tp.ding_reject_reason
    assert reason("Er ist mit seinem Job verheiratet.", "He is wedded to his job.") is None
    assert reason("Er ist verheiratet.", "He is married.") == "fewer than 4 words"
    assert reason("Er ist mit seinem Job verheiratet", "He is wedded to his job.") == "not ending in . ! ?"
    assert reason("und das ist erst der Anfang!", "and that's just for starters!") == "starting lowercase"
    assert reason("Ich gebe es jdm. heute zurück.", "I give it back to sb. today.").startswith("phrase placeholder")
    assert reason("Das Geschäft wurde nie abgeschlossen.", "The deal / agreement was never made.") == "'/' alternatives"
    assert reason("Wenn ich nur wüsste, was ...", "If only I knew what he ...") == "ellipsis"
    # phrases: no sentence tests, two words are enough
    assert reason("eine Abkehr vom System", "a departure from the system", sentences=False, min_words=2) is None
    assert reason("mit jdm. sprechen", "to talk to sb.", sentences=False, min_words=2) is None


def test_ding_entries_alignment_and_comments():
    pairs, skipped = tp.ding_entries([
        "# Version :: devel 2023-01-30",
        "Aalfang {m} :: eel fishing",
        "a | b :: c",  # unaligned sub-entries
        "kein Trenner",
        "A {n} | A-Dur {n} :: A | A major",
    ])
    assert pairs == [("Aalfang {m}", "eel fishing"), ("A {n}", "A"), ("A-Dur {n}", "A major")]
    assert skipped["comment or blank line"] == 1 and skipped["line with unaligned sub-entries"] == 1
    assert skipped["line without exactly one ' :: '"] == 1


def test_split_disjoint_groups_shared_sides_and_is_deterministic():
    pairs = [(f"Satz Nummer {i} ist hier.", f"Sentence number {i} is here.") for i in range(40)]
    pairs += [("Ich bin heute sehr müde.", "I am very tired today."),
              ("Ich bin heute sehr müde.", "I'm really tired today."),   # same German side
              ("Heute bin ich sehr müde.", "I'm really TIRED today.")]  # same English side, case-folded
    splits, n_groups = tp.split_disjoint(pairs, valid_size=5, test_size=5, seed=3)
    assert n_groups == 41
    assert len(splits["valid"]) == 5 and len(splits["test"]) == 5
    assert sorted(p for s in splits.values() for p in s) == sorted(pairs)
    where = {name for name, s in splits.items() for p in s if "müde" in p[0]}
    assert len(where) == 1  # the three linked pairs stay together
    for side in (0, 1):
        keys = {name: {tp._dedup_key(p[side]) for p in split} for name, split in splits.items()}
        assert not keys["train"] & keys["valid"] and not keys["train"] & keys["test"]
        assert not keys["valid"] & keys["test"]
    assert tp.split_disjoint(list(pairs), 5, 5, seed=3) == (splits, n_groups)
    assert tp.split_disjoint(pairs, 5, 5, seed=4)[0] != splits


def test_gigaword_normalize():
    assert tp.gigaword_normalize("Sri Lanka 's 2,000 UNK troops -lrb- 1.5 -rrb-") \
        == "sri lanka 's #,### <unk> troops -lrb- #.# -rrb-"
    assert tp.gigaword_normalize("  the <unk> of UNKNOWN  ") == "the <unk> of unknown"


def test_parse_generate_orders_by_id():
    log = ["INFO something", "S-1\tzwei", "T-1\ttwo", "H-1\t-0.5\tzwo", "D-1\t-0.5\tzwo", "P-1\t-0.1 -0.2",
           "S-0\teins", "T-0\tone", "H-0\t-0.2\tone", "H-0\t-0.9\twon"]  # nbest: first one wins
    parsed = tp.parse_generate(log)
    assert parsed["H"] == {0: "one", 1: "zwo"} and parsed["S"][1] == "zwei" and parsed["T"][0] == "one"


def test_gen_extract_cli_checks_count(tmp_path):
    log = tmp_path / "gen.log"
    log.write_text("S-1\tb\nT-1\tB\nH-1\t-1\tbb\nS-0\ta\nT-0\tA\nH-0\t-1\taa\n")
    assert tp.main(["gen-extract", str(log), str(tmp_path / "o"), "--expect", "2"]) == 0
    assert lines(tmp_path / "o.hyp") == ["aa", "bb"] and lines(tmp_path / "o.ref") == ["A", "B"]
    with pytest.raises(SystemExit, match="expected ids 0..2"):
        tp.main(["gen-extract", str(log), str(tmp_path / "o"), "--expect", "3"])


def test_rouge():
    pytest.importorskip("rouge_score")
    scores = tp.rouge_f1(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert scores == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    low = tp.rouge_f1(["the cat sat on the mat"], ["a dog ran"])
    assert low["rouge1"] == 0.0


def test_bpe_learn_apply_roundtrip(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("lower lowest newer newest wider widest\n" * 20)
    codes = tmp_path / "codes"
    tp.main(["bpe", "--codes", str(codes), "--merges", "12", "--learn", str(train),
             "--apply", f"{train}:{tmp_path / 'out'}"])
    out = lines(tmp_path / "out")
    assert len(out) == 20 and "@@ " in out[0]
    assert out[0].replace("@@ ", "") == "lower lowest newer newest wider widest"


# ------------------------------------------------------------------------------ prepare scripts

_DE_EN = [
    ("Das ist ein guter Tag.", "This is a good day."),
    ("Ich habe heute keine Zeit.", "I have no time today."),
    ("Wir gehen morgen ins Kino.", "We are going to the cinema tomorrow."),
    ("Der Hund schläft im Garten.", "The dog is sleeping in the garden."),
    ("Sie liest ein spannendes Buch.", "She is reading an exciting book."),
    ("Kannst du mir bitte helfen?", "Can you help me, please?"),
    ("Das Wetter ist heute schön.", "The weather is nice today."),
    ("Er arbeitet in einer großen Firma.", "He works for a big company."),
]


def _talk_pairs(n):
    return [(f"{de[:-1]} Nummer {i}{de[-1]}", f"{en[:-1]} number {i}{en[-1]}")
            for i in range(n) for de, en in [_DE_EN[i % len(_DE_EN)]]]


def make_iwslt(root):
    """The layout of de-en.tgz: train.tags.de-en.{de,en} and the IWSLT14.TED*.de-en.{de,en}.xml sets."""
    root.mkdir(parents=True)
    pairs = _talk_pairs(60) + [("Ja.", "Yes, of course I will do that for you tomorrow.")]  # ratio > 1.5
    for lang, k in (("de", 0), ("en", 1)):
        body = ["<url>http://www.ted.com/talks/jane_doe.html</url>", "<keywords>talks, art</keywords>",
                "<speaker>Jane Doe</speaker>", "<talkid>1</talkid>",
                "<title>Jane Doe: " + ("Kunst" if k == 0 else "Art") + "</title>",
                "<description>TED Talk Subtitles and Transcript: " + ("Kunst." if k == 0 else "Art.") + "</description>"]
        body += [p[k] for p in pairs]
        body += ['<reviewer href="http://www.ted.com/profiles/1">R</reviewer>',
                 '<translator href="http://www.ted.com/profiles/2">T</translator>']
        (root / f"train.tags.de-en.{lang}").write_text("\n".join(body) + "\n", encoding="utf-8")
        for j, name in enumerate(["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                                  "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012"]):
            segs = [f'<seg id="{i + 1}"> {p[k]} </seg>' for i, p in enumerate(_talk_pairs(3 + j))]
            if j == 0:
                segs.append('<seg id="4"> AT&amp;T, don\u2019t </seg>')
            tag = "srcset" if k == 0 else "refset"
            xml = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", f'<{tag} setid="iwslt2014" srclang="german">',
                   f'<doc docid="{j}" genre="lectures">', "<url>http://www.ted.com/talks/x.html</url>",
                   "<description>not text</description>", "<talkid>9</talkid>", "<title>T</title>",
                   *segs, "</doc>", f"</{tag}>", "</mteval>"]
            (root / f"{name}.de-en.{lang}.xml").write_text("\n".join(xml) + "\n", encoding="utf-8")


def test_prepare_iwslt14_local(tmp_path, preprocess_stub):
    src = tmp_path / "de-en"
    make_iwslt(src)
    out = tmp_path / "iwslt"
    log = ok(run_script("prepare-iwslt14.sh", out, stub=preprocess_stub, IWSLT14_SRC=src, BPE_MERGES=40))
    assert "no download" in log and not (out / "raw").exists()
    plain_de = lines(out / "plain/train.tags.de")
    assert plain_de[:2] == ["Jane Doe: Kunst", "TED Talk Subtitles and Transcript: Kunst."] and len(plain_de) == 63
    # clean-corpus-n drops the 1:11 pair, then every 23rd line of the 62 goes to valid
    train, valid = lines(out / "tok/train.en"), lines(out / "tok/valid.en")
    assert len(valid) == 2 and len(train) == 60 and len(lines(out / "tok/train.de")) == 60
    assert valid[0] == lines(out / "tok/train.tags.en")[22]
    assert all(l == l.lower() for l in train) and "this is a good day number 0 ." in train
    test = lines(out / "tok/test.en")
    assert len(test) == 3 + 4 + 5 + 6 + 7 + 1 and "at & t , don 't" in test
    assert lines(out / "plain/test.en")[3] == "AT&T, don't"
    bpe_train = lines(out / "bpe/train.de")
    assert len(bpe_train) == 60 and any("@@" in l for l in bpe_train)
    calls = lines(preprocess_stub.parent / "calls.txt")
    assert len(calls) == 1 and "--source-lang de --target-lang en" in calls[0]
    assert "--joined-dictionary" not in calls[0]  # fairseq's IWSLT recipe: one dictionary per language

    again = ok(run_script("prepare-iwslt14.sh", out, stub=preprocess_stub, IWSLT14_SRC=src, BPE_MERGES=40))
    assert "skipping cleaning" in again and "binarized already" in again and "tokenized already" in again
    assert len(lines(preprocess_stub.parent / "calls.txt")) == 1


def test_prepare_iwslt14_unreachable_download(tmp_path):
    out = tmp_path / "iwslt"
    proc = run_script("prepare-iwslt14.sh", out, IWSLT14_URL="http://127.0.0.1:9/de-en.tgz")
    assert proc.returncode != 0
    assert "could not download http://127.0.0.1:9/de-en.tgz" in proc.stderr
    assert "IWSLT14_ARCHIVE" in proc.stderr and "IWSLT14_SRC" in proc.stderr
    assert not (out / "raw/de-en.tgz").exists() and not (out / "raw/de-en.tgz.part").exists()


def _targz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


PTB_TRAIN = " aer banknote berlitz calloway centrust cluett fromstein gitano guterman \n pierre <unk> N years old \n"


def test_prepare_ptb_from_archive(tmp_path, preprocess_stub):
    archive = tmp_path / "simple-examples.tgz"
    _targz(archive, {"./simple-examples/data/ptb.train.txt": PTB_TRAIN,
                     "./simple-examples/data/ptb.valid.txt": " consumers may want to move \n",
                     "./simple-examples/data/ptb.test.txt": " no it was n't black monday \n",
                     "./simple-examples/data/ptb.char.train.txt": "a b c\n"})
    out = tmp_path / "ptb"
    log = ok(run_script("prepare-ptb.sh", out, stub=preprocess_stub, PTB_ARCHIVE=archive))
    assert "no download" in log
    assert (out / "text/train.txt").read_text() == PTB_TRAIN  # unchanged, spaces included
    calls = lines(preprocess_stub.parent / "calls.txt")
    assert len(calls) == 1 and "--only-source" in calls[0] and f"--trainpref {out}/text/train.txt" in calls[0]

    again = ok(run_script("prepare-ptb.sh", out, stub=preprocess_stub, PTB_ARCHIVE=archive))
    assert "skipping fetch" in again and "binarized already" in again


def test_prepare_ptb_missing_sources(tmp_path):
    out = tmp_path / "ptb"
    proc = run_script("prepare-ptb.sh", out, PTB_URL="http://127.0.0.1:9/simple-examples.tgz")
    assert proc.returncode != 0 and "could not download" in proc.stderr and "PTB_ARCHIVE" in proc.stderr
    proc = run_script("prepare-ptb.sh", out, PTB_ARCHIVE=tmp_path / "nowhere.tgz")
    assert proc.returncode != 0 and "PTB_ARCHIVE=" in proc.stderr and "does not exist" in proc.stderr
    bad = tmp_path / "page.tgz"
    bad.write_text("<html>quota exceeded</html>")
    proc = run_script("prepare-ptb.sh", out, PTB_ARCHIVE=bad)
    assert proc.returncode != 0 and "not a readable archive" in proc.stderr


def _sgm(setid, tag, segs):
    body = [f'<{tag} setid="{setid}" srclang="any">', '<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">',
            "<p>", *[f'<seg id="{i + 1}">{s}</seg>' for i, s in enumerate(segs)], "</p>", "</doc>", f"</{tag}>"]
    return "\n".join(body) + "\n"


def test_prepare_wmt14_local(tmp_path, preprocess_stub):
    src = tmp_path / "wmt14"
    pairs = _talk_pairs(30)
    for path, chunk in (("training/europarl-v7.de-en", pairs[:10]), ("commoncrawl.de-en", pairs[10:20]),
                        ("training/news-commentary-v9.de-en", pairs[20:])):
        for lang, k in (("de", 0), ("en", 1)):
            f = src / f"{path}.{lang}"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("\n".join(p[k] for p in chunk) + "\n", encoding="utf-8")
    (src / "dev").mkdir()
    for lang, k in (("de", 0), ("en", 1)):
        (src / f"dev/newstest2012.{lang}").write_text(pairs[0][k] + "\n" + pairs[1][k] + "\n", encoding="utf-8")
    # newstest2013 only as .sgm (the fallback), newstest2014 from test-full
    (src / "dev/newstest2013-src.en.sgm").write_text(_sgm("newstest2013", "srcset", ["A well-known fact."]))
    (src / "dev/newstest2013-ref.de.sgm").write_text(_sgm("newstest2013", "refset", ["Eine bekannte Tatsache."]))
    (src / "test-full").mkdir()
    (src / "test-full/newstest2014-deen-src.en.sgm").write_text(
        _sgm("newstest2014", "srcset", ["Gutach: Increased safety for pedestrians", "They are &quot;fine&quot;."]))
    (src / "test-full/newstest2014-deen-ref.de.sgm").write_text(
        _sgm("newstest2014", "refset", ["Gutach: Noch mehr Sicherheit für Fußgänger", "Es geht ihnen \u201egut\u201c."]))
    out = tmp_path / "out"
    log = ok(run_script("prepare-wmt14-en-de.sh", out, stub=preprocess_stub, WMT14_SRC=src, BPE_MERGES=30))
    assert "no download" in log
    assert len(lines(out / "plain/train.en")) == 30 and lines(out / "plain/train.de")[10] == pairs[10][0]
    assert lines(out / "tok/valid.en") == [pairs[0][1][:-1] + " .", pairs[1][1][:-1] + " .", "A well @-@ known fact ."]
    assert lines(out / "plain/test.en") == ["Gutach: Increased safety for pedestrians", 'They are "fine".']
    assert lines(out / "tok/test.de")[1] == 'Es geht ihnen " gut " .'  # punctuation normalized, cased
    calls = lines(preprocess_stub.parent / "calls.txt")
    assert "--source-lang en --target-lang de --joined-dictionary" in calls[0]
    again = ok(run_script("prepare-wmt14-en-de.sh", out, stub=preprocess_stub, WMT14_SRC=src, BPE_MERGES=30))
    assert "binarized already" in again and "skipping" in again


def test_prepare_gigaword_local(tmp_path, preprocess_stub):
    src = tmp_path / "sumdata"
    files = {
        "train/train.article.txt": ["australia 's current account deficit shrunk by a record #.## billion dollars",
                                    "at least two people were killed in a suspected bomb attack",
                                    "UNK UNK said on tuesday"],
        "train/train.title.txt": ["australian current account deficit narrows sharply",
                                  "at least two dead in southern philippines blast", ""],
        "train/valid.article.filter.txt": ["the UNK dollar rose #.# percent against the yen in 2003"],
        "train/valid.title.filter.txt": ["dollar rises against yen"],
        "Giga/input.txt": ["japan 's nec corp. and UNK computer corp. said on monday"],
        "Giga/task1_ref0.txt": ["nec UNK in computer sales tie-up"],
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    out = tmp_path / "giga"
    ok(run_script("prepare-gigaword.sh", out, stub=preprocess_stub, GIGAWORD_SRC=src))
    assert len(lines(out / "tok/train.article")) == 2  # the pair with an empty headline is dropped
    assert lines(out / "tok/valid.article") == ["the <unk> dollar rose #.# percent against the yen in ####"]
    assert lines(out / "tok/test.title") == ["nec <unk> in computer sales tie-up"]
    calls = lines(preprocess_stub.parent / "calls.txt")
    assert "--source-lang article --target-lang title --nwordssrc 30000 --nwordstgt 30000" in calls[0]
    again = ok(run_script("prepare-gigaword.sh", out, stub=preprocess_stub, GIGAWORD_SRC=src))
    assert "skipping fetch and normalization" in again and "binarized already" in again


def make_ding(path):
    """Lines in the format of Debian's /usr/share/trans/de-en (the Ding dictionary)."""
    entries = [
        "# Version :: devel 2023-01-30",
        "# Copyright (c) :: Frank Richter <frank.richter.tu-chemnitz.de>, 1995 - 2023",
        "Aal {m} (auf der Speisekarte) [cook.] | Aal blau :: Eel (on a menu) | Eel au bleu",
        "Abfall verstreuen {vt} | Bitte halten Sie den Rasen sauber! | Schmutzige Wäsche lag über den Boden "
        "verstreut. :: to litter | Please keep the lawn clean! | Dirty clothes littered the floor.",
        "Abhilfe {f} | Da ist noch nicht alles verloren.; Da ist noch Abhilfe möglich. :: remedy | "
        "He / It is not without remedy.",
        "Ahnung {f} | Hast du eine Ahnung, wo er sein könnte? :: idea | Have you any idea where he could be?; "
        "Have you an idea where he could be?",
        "Abschluss {m} | Den Abschluss (des Berichts) bildet ein Anhang. :: conclusion | "
        "The report ends with an appendix.",
        "Absage {f} | eine Absage an etw. :: rejection | a rejection of sth.",
        "Ehe {f} | Sie ist in zweiter Ehe mit Bob Seel verheiratet. :: marriage | Her second husband is Bob Seel.",
        "Job {m} | Er ist mit seinem Job verheiratet. :: job | He is wedded to his job.",
        "Job {m} | Er ist mit seinem Job verheiratet. :: job | He is wedded to his job.",  # duplicate line
        "müde {adj} | Ich bin heute sehr müde. :: tired | I am very tired today.",
        "erschöpft {adj} | Ich bin heute sehr müde. :: exhausted | I'm really tired today.",  # shared German side
        "nur zwei | Teile hier :: only two",  # unaligned
    ]
    entries += [f"Satz {{m}} | {de} :: sentence | {en}" for de, en in _talk_pairs(24)]
    path.write_text("\n".join(entries) + "\n", encoding="utf-8")


def test_ding_selection_cli_deterministic_and_disjoint(tmp_path):
    dic = tmp_path / "de-en"
    make_ding(dic)
    args = ["ding", str(dic), "--valid-size", "4", "--test-size", "4", "--seed", "1"]
    tp.main(args[:2] + [str(tmp_path / "a")] + args[2:])
    tp.main(args[:2] + [str(tmp_path / "b")] + args[2:])
    for name in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (tmp_path / "a" / f"{name}.{lang}").read_bytes() == (tmp_path / "b" / f"{name}.{lang}").read_bytes()
    de = {n: lines(tmp_path / "a" / f"{n}.de") for n in ("train", "valid", "test")}
    en = {n: lines(tmp_path / "a" / f"{n}.en") for n in ("train", "valid", "test")}
    assert len(de["valid"]) == 4 and len(de["test"]) == 4
    everything = set(sum(de.values(), []))
    assert "Den Abschluss bildet ein Anhang." in everything
    assert "Da ist noch nicht alles verloren." not in everything  # its English side has a '/'
    assert "Hast du eine Ahnung, wo er sein könnte?" in everything
    assert "Have you any idea where he could be?" in set(sum(en.values(), []))
    assert not any("etw." in s or "Aal" in s for s in everything)
    # 24 generated + 8 real sentences (the duplicate line counted once)
    assert sum(len(v) for v in de.values()) == 32
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not set(de[a]) & set(de[b]) and not set(en[a]) & set(en[b])
    stats = (tmp_path / "a" / "stats.json").read_text()
    assert '"rejected: duplicate pair": 1' in stats and '"kept pairs": 32' in stats


def test_prepare_ding_end_to_end(tmp_path):
    if not (BIN / "fairseq-preprocess").exists():
        pytest.skip(f"fairseq-preprocess is not installed beside {sys.executable}")
    dic = tmp_path / "de-en"
    make_ding(dic)
    out = tmp_path / "ding"
    env = dict(DING_FILE=dic, VALID_SIZE=4, TEST_SIZE=4, BPE_MERGES=50)
    log = ok(run_script("prepare-ding-de-en.sh", out, **env))
    assert "using DING_FILE" in log and "kept pairs" in log and not (out / "raw").exists()
    assert lines(out / "tok/train.en")[0].endswith(" .") or lines(out / "tok/train.en")[0].endswith(" !")
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (out / "data-bin" / f"{split}.de-en.{lang}.bin").stat().st_size > 0
    assert (out / "data-bin/dict.de.txt").read_bytes() == (out / "data-bin/dict.en.txt").read_bytes()  # joined
    assert len(lines(out / "bpe/test.de")) == 4

    again = ok(run_script("prepare-ding-de-en.sh", out, **env))
    assert "skipping selection" in again and "binarized already" in again and "BPE codes exist" in again


def test_translate_de_en_example_end_to_end(tmp_path):
    """examples/translate-de-en.sh, the De-En demo, at a tiny budget on a Ding-format file: it prepares the data,
    trains group_rnnsearch_iwslt with its default flags, decodes the test set, prints both BLEUs and samples,
    and translates a sentence through fairseq-interactive."""
    if not (BIN / "fairseq-train").exists():
        pytest.skip(f"fairseq is not installed beside {sys.executable}")
    dic = tmp_path / "de-en"
    make_ding(dic)
    example_vars = ("NUM_GROUPS", "MAX_UPDATE", "MAX_EPOCH", "OPTIMIZER_FLAGS", "SCHEDULER_FLAGS", "CRITERION_FLAGS",
                    "MODEL_FLAGS", "EXTRA", "SENTENCE")
    full = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS + example_vars}
    full.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable, OMP_NUM_THREADS="1",
                WORKERS="1", PYTHONHASHSEED="0", DING_FILE=str(dic), VALID_SIZE="4", TEST_SIZE="4", BPE_MERGES="50",
                DATA=str(tmp_path / "ding"), SAVE=str(tmp_path / "ckpt"), MAX_UPDATE="4")  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "examples/translate-de-en.sh"), "Bitte halten Sie den Rasen sauber!"],
                          env=full, capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    out = ok(proc)
    assert "4 updates" in out
    assert re.search(r"tokenized BLEU \(multi-bleu convention\): [\d.]+", out)
    assert re.search(r"sacreBLEU \(detokenized\): BLEU\S* = [\d.]+", out)
    assert out.count("hypothesis:") == 4  # every test sentence of the tiny split, up to 5
    assert "fairseq-interactive: Bitte halten Sie den Rasen sauber!" in out and "translation:" in out
    import torch

    model = torch.load(tmp_path / "ckpt" / "checkpoint_best.pt", weights_only=False)["cfg"]["model"]
    assert model.arch == "group_rnnsearch_iwslt" and model.encoder_groups == 2  # the defaults reached training
    assert model.decoder_residual and model.decoder_hidden_size == 512 and model.lr_scheduler == "fixed"
    assert model.init_uniform == 0.1 and model.attention_type == "luong"
    assert model.criterion == "label_smoothed_cross_entropy" and model.label_smoothing == 0.1
