#!/usr/bin/env python
"""Text processing shared by the data scripts in scripts/ (one module, many subcommands).

The shell scripts ``prepare-*.sh`` download corpora and chain these steps; every step reads and
writes plain UTF-8 text files, one sentence per line, so each can be run and tested on local files.

Subcommands (``python scripts/textprep.py SUBCOMMAND --help`` for the flags):

``strip-markup``  IWSLT ``train.tags`` files (drop ``<url>``, ``<talkid>``, ... lines, keep the text of
                  ``<title>``/``<description>``) or ``<seg id=..>`` lines of IWSLT ``.xml`` / WMT ``.sgm``
                  files, as fairseq's ``prepare-iwslt14.sh`` and ``prepare-wmt14en2de.sh`` do.
``tokenize``      Moses tokenization with sacremoses (no HTML escaping), optional punctuation
                  normalization, aggressive dash splitting and lowercasing.
``detokenize``    Moses detokenization with sacremoses (for sacreBLEU on detokenized output).
``clean``         Parallel length filter with the semantics of Moses' ``clean-corpus-n.perl``.
``split-every``   Every N-th line to one file, the rest to another (IWSLT14 valid = every 23rd line).
``bpe``           Learn joint BPE codes with subword-nmt on some files and apply them to others.
``ding``          Sentence pairs from the Ding dictionary (Debian package ``trans-de-en``): filter,
                  deduplicate, split into train/valid/test so that no side of a pair is shared
                  across splits.
``gigaword``      Rush et al. (2015) normalization of the Gigaword ``sumdata`` release: lowercase,
                  digits to ``#``, ``UNK`` to fairseq's ``<unk>``.
``gen-extract``   Hypotheses, sources and references of a ``fairseq-generate`` log, in sentence-id order.
``check``         Text that fairseq-preprocess would binarize wrongly or fairseq would train on wrongly, named by
                  file and line before any work is spent on it: invalid UTF-8, a carriage return inside a
                  line, empty lines, lines too long for the model, parallel files of different lengths,
                  tokens outside the vocabulary.
``rouge``         ROUGE-1/2/L F1 with Google's ``rouge-score`` package.
"""

import argparse
import gzip
import html
import itertools
import json
import multiprocessing
import os
import random
import re
import sys
from collections import Counter

# ------------------------------------------------------------------------------------------ I/O


def read_lines(path):
    """All lines of a UTF-8 text file (gzipped when it ends in .gz), without their newline (``-``: stdin)."""
    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path, lines):
    """Write lines to a UTF-8 text file (``-`` writes stdout); return how many were written."""
    n = 0
    out = sys.stdout if path == "-" else open(path, "w", encoding="utf-8", newline="\n")
    try:
        for line in lines:
            out.write(line + "\n")
            n += 1
    finally:
        if out is not sys.stdout:
            out.close()
    return n


def log(*args):
    print("[textprep]", *args, file=sys.stderr, flush=True)


def _parallel_map(func, items, workers, chunksize=2000):
    """``map(func, items)`` in ``workers`` processes (in order); serial when workers <= 1."""
    if workers <= 1 or len(items) < 2 * chunksize:
        return [func(x) for x in items]
    with multiprocessing.Pool(workers) as pool:
        return pool.map(func, items, chunksize=chunksize)


# ------------------------------------------------------------------------------------- markup

# Metadata lines of IWSLT train.tags files; <title> and <description> hold text and are kept
# without their tags (fairseq's prepare-iwslt14.sh does the same with grep -v / sed).
_TEXT_TAGS = re.compile(r"</?(title|description)>")
_SEG = re.compile(r"<seg[^>]*>(.*)</seg>", re.IGNORECASE)


def strip_tags_line(line):
    """One line of an IWSLT ``train.tags`` file -> its text, or None for a metadata line."""
    s = line.strip()
    if s.startswith("<title>") or s.startswith("<description>"):
        return _TEXT_TAGS.sub("", s).strip()
    if s.startswith("<"):
        return None
    return s


def strip_seg_line(line):
    """One line of an IWSLT ``.xml`` or WMT ``.sgm`` file -> the text of its ``<seg>``, or None.

    XML entities are unescaped (the tokenizer does not escape, so train and test agree) and the
    typographic apostrophe becomes ``'`` as in fairseq's recipe.
    """
    m = _SEG.search(line)
    if m is None:
        return None
    return html.unescape(m.group(1)).strip().replace("\u2019", "'")


def strip_markup(lines, fmt):
    strip = strip_tags_line if fmt == "tags" else strip_seg_line
    return [s for s in map(strip, lines) if s is not None]


# ----------------------------------------------------------------------------------- tokenize

_MOSES = {}


def _moses(kind, lang):
    """Cached sacremoses objects (imported lazily: only the processing steps need sacremoses)."""
    key = (kind, lang)
    if key not in _MOSES:
        import sacremoses

        if kind == "tok":
            _MOSES[key] = sacremoses.MosesTokenizer(lang=lang)
        elif kind == "detok":
            _MOSES[key] = sacremoses.MosesDetokenizer(lang=lang)
        else:  # normalize-punctuation.perl + remove-non-printing-char.perl of fairseq's WMT recipe
            _MOSES[key] = sacremoses.MosesPunctNormalizer(
                lang=lang, pre_replace_unicode_punct=True, post_remove_control_chars=True)
    return _MOSES[key]


class Tokenizer:
    """Moses tokenization of one line; a picklable callable for multiprocessing.

    ``escape=False``: no ``&apos;``/``&quot;`` entities, like fairseq's ``--moses-no-escape``,
    so that ``fairseq-interactive`` input and the detokenizer see plain text.
    """

    def __init__(self, lang, lowercase=False, normalize_punct=False, aggressive_dash_splits=False):
        self.lang = lang
        self.lowercase = lowercase
        self.normalize_punct = normalize_punct
        self.aggressive_dash_splits = aggressive_dash_splits

    def __call__(self, line):
        if self.normalize_punct:
            line = _moses("norm", self.lang).normalize(line)
        out = _moses("tok", self.lang).tokenize(
            line, aggressive_dash_splits=self.aggressive_dash_splits, return_str=True, escape=False)
        out = " ".join(out.split())
        return out.lower() if self.lowercase else out


class Detokenizer:
    def __init__(self, lang):
        self.lang = lang

    def __call__(self, line):
        return _moses("detok", self.lang).detokenize(line.split())


# -------------------------------------------------------------------------------------- clean


def keep_pair(src, tgt, min_len=1, max_len=175, ratio=1.5):
    """clean-corpus-n.perl's test: both sides have min_len..max_len tokens and length ratio <= ratio.

    ``ratio <= 0`` disables the ratio test (then this is a plain length filter, e.g. for 64 subwords).
    """
    ns, nt = len(src.split()), len(tgt.split())
    if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
        return False
    return ratio <= 0 or (ns / nt <= ratio and nt / ns <= ratio)


def clean_parallel(src_lines, tgt_lines, min_len=1, max_len=175, ratio=1.5):
    if len(src_lines) != len(tgt_lines):
        raise ValueError(f"parallel files differ in length: {len(src_lines)} vs {len(tgt_lines)} lines")
    kept = [(s, t) for s, t in zip(src_lines, tgt_lines) if keep_pair(s, t, min_len, max_len, ratio)]
    return [s for s, _ in kept], [t for _, t in kept]


# ---------------------------------------------------------------------------------------- BPE


def learn_bpe(train_files, codes_path, merges, workers=1):
    """Joint BPE: subword-nmt's learn_bpe on the concatenation of ``train_files`` (fairseq's recipe)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # subword-nmt's per-merge progress bar floods the logs
    from subword_nmt.learn_bpe import learn_bpe as _learn

    lines = [line + "\n" for path in train_files for line in read_lines(path)]
    with open(codes_path, "w", encoding="utf-8") as out:
        _learn(lines, out, merges, num_workers=max(1, workers))


_BPE = {}


class BPEApplier:
    """Apply BPE codes to one line (``@@ `` continuation marks, as ``--remove-bpe`` expects)."""

    def __init__(self, codes_path):
        self.codes_path = codes_path

    def __call__(self, line):
        if self.codes_path not in _BPE:
            from subword_nmt.apply_bpe import BPE

            with open(self.codes_path, encoding="utf-8") as f:
                _BPE[self.codes_path] = BPE(f)
        return _BPE[self.codes_path].process_line(line)


# --------------------------------------------------------------------------------------- Ding

# Annotations of the Ding format: {f} {pl} {vt} grammar, [coll.] [Br.] usage, (...) clarifications.
_ANNOTATION = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|\([^()]*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
# Placeholders of dictionary phrases ("jdm. etw. geben" / "to give sb. sth."): not sentences.
_PLACEHOLDER = re.compile(r"(?<!\w)(?:jd|jdm|jdn|jds|etw|sb|sth)\.")
_SENTENCE_END = re.compile(r"[.!?]$")


def ding_entries(lines):
    """Aligned (German, English) sub-entries of Ding lines ``de | de2 ... :: en | en2 ...``.

    Comment lines (``#``) and lines whose two sides have different numbers of ``|`` sub-entries are
    skipped. Returns (pairs, counts of skipped lines).
    """
    pairs, skipped = [], Counter()
    for line in lines:
        if not line.strip() or line.startswith("#"):
            skipped["comment or blank line"] += 1
            continue
        sides = line.split(" :: ")
        if len(sides) != 2:
            skipped["line without exactly one ' :: '"] += 1
            continue
        de, en = (side.split(" | ") for side in sides)
        if len(de) != len(en):
            skipped["line with unaligned sub-entries"] += 1
            continue
        pairs.extend(zip(de, en))
    return pairs, skipped


def ding_clean(text):
    """A Ding sub-entry -> its first alternative without annotations, or '' when nothing is left.

    ``Da ist noch nicht alles verloren.; Da ist noch Abhilfe möglich.`` -> the first sentence;
    ``Den Abschluss (des Berichts) bildet ein Anhang.`` -> ``Den Abschluss bildet ein Anhang.``
    """
    prev = None
    while prev != text:  # nested annotations come off from the inside out
        prev, text = text, _ANNOTATION.sub(" ", text)
    first = text.split(";")[0].replace("\u2019", "'")  # typographic apostrophe -> ASCII, as Moses expects
    first = _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(first.split()))
    return first.strip()


def ding_reject_reason(de, en, sentences=True, min_words=4):
    """Why a cleaned pair is not kept (None when it is kept).

    Both modes: at least ``min_words`` words on each side; no ``/`` (``comes/arrives``, ``He / It``
    are alternatives, not text); no ellipsis (unfinished fragments); no bracket left unbalanced.
    Sentence mode also wants sentences: both sides end in ``.``, ``!`` or ``?``, start without a
    lowercase letter, and hold no phrase placeholder (``jdm.``, ``etw.``, ``sb.``, ``sth.``).
    """
    if min(len(de.split()), len(en.split())) < min_words:
        return f"fewer than {min_words} words"
    both = de + " " + en
    if sentences:
        if not (_SENTENCE_END.search(de) and _SENTENCE_END.search(en)):
            return "not ending in . ! ?"
        if de[0].islower() or en[0].islower():
            return "starting lowercase"
        if _PLACEHOLDER.search(both):
            return "phrase placeholder (jdm./etw./sb./sth.)"
    if "/" in both:
        return "'/' alternatives"
    if "\u2026" in both or "..." in both:
        return "ellipsis"
    if any(c in both for c in "()[]{}"):
        return "unbalanced brackets"
    return None


def _dedup_key(text):
    return " ".join(text.casefold().split())


def split_disjoint(pairs, valid_size, test_size, seed):
    """Split pairs into train/valid/test so that no source and no target occurs in two splits.

    Pairs sharing a (case-folded) source or target form one group (union-find); whole groups are
    assigned, in an order shuffled with ``random.Random(seed)``: to test while it fits, then to
    valid, the rest to train. Each split keeps the input order. Deterministic for a given input.
    Returns ({"train"|"valid"|"test": pairs}, number of groups).
    """
    parent = list(range(len(pairs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen = {}
    for i, (src, tgt) in enumerate(pairs):
        for key in (("src", _dedup_key(src)), ("tgt", _dedup_key(tgt))):
            j = first_seen.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups = {}
    for i in range(len(pairs)):
        groups.setdefault(find(i), []).append(i)
    order = sorted(groups)  # roots are each group's first index: a deterministic order
    random.Random(seed).shuffle(order)
    split_of = {}
    sizes = {"test": 0, "valid": 0}
    for root in order:
        members = groups[root]
        name = "train"
        for candidate, limit in (("test", test_size), ("valid", valid_size)):
            if sizes[candidate] + len(members) <= limit:
                name = candidate
                sizes[candidate] += len(members)
                break
        for i in members:
            split_of[i] = name
    splits = {name: [pairs[i] for i in range(len(pairs)) if split_of[i] == name]
              for name in ("train", "valid", "test")}
    return splits, len(groups)


def ding_pairs(lines, sentences=True, min_words=4):
    """Cleaned, filtered, deduplicated (de, en) pairs of a Ding file, and statistics."""
    entries, skipped = ding_entries(lines)
    stats = Counter({f"skipped {k}": v for k, v in skipped.items()})
    stats["aligned sub-entry pairs"] = len(entries)
    kept, seen = [], set()
    for de, en in entries:
        de, en = ding_clean(de), ding_clean(en)
        reason = ding_reject_reason(de, en, sentences, min_words)
        if reason is not None:
            stats["rejected: " + reason] += 1
            continue
        key = (_dedup_key(de), _dedup_key(en))
        if key in seen:
            stats["rejected: duplicate pair"] += 1
            continue
        seen.add(key)
        kept.append((de, en))
    stats["kept pairs"] = len(kept)
    return kept, stats


# ----------------------------------------------------------------------------------- Gigaword

_DIGIT = re.compile(r"\d")
_UNK = re.compile(r"(?<!\S)(?:UNK|<unk>|unk)(?!\S)")


def gigaword_normalize(line):
    """Rush et al. (2015): lowercase, every digit to ``#``; the release's ``UNK`` -> ``<unk>``.

    fairseq maps the literal ``<unk>`` to its unknown-word symbol, so the model is not trained to
    produce a word "unk" and the 30k vocabulary is not spent on it.
    """
    line = _DIGIT.sub("#", " ".join(line.split()).lower())
    return _UNK.sub("<unk>", line)


# --------------------------------------------------------------------------- generate / ROUGE


def parse_generate(lines):
    """``fairseq-generate`` log -> {'S'/'T'/'H'/'D': {id: text}} (H and D without their scores)."""
    out = {k: {} for k in "STHD"}
    for line in lines:
        m = re.match(r"^([STHD])-(\d+)\t(.*)$", line)
        if not m:
            continue
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind in "HD":
            rest = rest.split("\t", 1)[1] if "\t" in rest else ""
        out[kind].setdefault(idx, rest)  # with --nbest > 1 keep the best hypothesis
    return out


def rouge_f1(refs, hyps, stemmer=True):
    """Mean ROUGE-1/2/L F1 (in %) of hypotheses against references, with ``rouge-score``."""
    from rouge_score import rouge_scorer

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stemmer)
    totals = Counter()
    for ref, hyp in zip(refs, hyps):
        for name, score in scorer.score(ref, hyp).items():
            totals[name] += score.fmeasure
    return {name: 100.0 * totals[name] / max(1, len(refs)) for name in ("rouge1", "rouge2", "rougeL")}


# -------------------------------------------------------------------------------------- check


# what each problem does in fairseq, printed once after its first occurrence
_CHECK_WHY = {
    "utf-8": "fairseq-preprocess stops with a UnicodeDecodeError on such a line; re-encode the file "
             "(iconv -f LATIN1 -t UTF-8, say)",
    "carriage return": "fairseq-preprocess reads a \\r as a line break, so the file gets an extra line and every "
                       "later line is paired with the wrong one",
    "length": "fairseq-preprocess binarizes parallel files of different lengths without a word and pairs line i "
              "with line i, so every pair after the first missing or extra line is misaligned",
    "empty": "fairseq trains on an empty line, or translates it, as a sentence of only </s>",
    "too long": "fairseq-train skips training pairs longer than --max-source-positions / --max-target-positions "
                "with a warning, and stops on such valid/test sentences (so does fairseq-generate) unless "
                "--skip-invalid-size-inputs-valid-test is given; raise those flags, or shorten or drop the lines",
    "unknown token": "fairseq maps a token outside the dictionary to <unk>",
}


class TextReport:
    """Problems found in text files, each with its FILE:LINE; prints at most ``shown`` per kind and file."""

    def __init__(self, shown=10):
        self.shown = shown
        self.errors = 0
        self.warnings = 0
        self._counts = Counter()
        self._explained = set()

    def add(self, path, line_no, kind, message, error=True):
        key = (path, kind)
        self._counts[key] += 1
        if error:
            self.errors += 1
        else:
            self.warnings += 1
        n = self._counts[key]
        label = "error" if error else "warning"
        if n <= self.shown:
            log(f"check: {label}: {path}:{line_no}: {message}")
            if kind not in self._explained:
                self._explained.add(kind)
                log(f"check:   ({_CHECK_WHY[kind]})")
        elif n == self.shown + 1:
            log(f"check: {label}: {path}: more lines with this problem ({kind}); only the first {self.shown} are shown")

    def total(self, path, kind):
        return self._counts[(path, kind)]


def decoded_lines(path, report):
    """Yield (line number, text) of ``path`` decoded from UTF-8, split on ``\\n`` only, streaming.

    Invalid UTF-8 is reported and the line decoded with replacement characters; a line ending in ``\\r\\n``
    loses its ``\\r`` (Python's universal newlines, which fairseq reads with, take it as one line break).
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.add(path, line_no, "utf-8", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")
                text = raw.decode("utf-8", errors="replace")
            if "\r" in text:
                report.add(path, line_no, "carriage return", "carriage return (\\r) inside the line")
            yield line_no, text


def read_dictionary(path):
    """The symbols of a fairseq ``dict.txt`` (``SYMBOL COUNT [#fairseq:overwrite]`` per line)."""
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n").rsplit(" ", 1)[0] for line in f if line.strip()}


def check_texts(files, parallel=False, max_positions=None, allow_empty=False, vocab=None, vocab_from_first=False,
                joined=False, shown=10):
    """Check text files before fairseq-preprocess, streaming; returns the :class:`TextReport`.

    ``parallel``: ``files`` are pairs (source, target), line i of one translating line i of the other.
    ``max_positions``: a line of n tokens is n + 1 positions (fairseq appends ``</s>``); longer is an error.
    ``vocab``: tokens outside it are warnings (fairseq maps them to ``<unk>``). ``vocab_from_first``: the first
    file (pair) is the training data, whose tokens (per side, or both sides with ``joined``) are the
    vocabulary of the others.
    """
    if parallel and len(files) % 2:
        raise SystemExit("check --parallel wants pairs of files: SRC TGT [SRC TGT ...]")
    report = TextReport(shown)
    groups = [files[i:i + 2] for i in range(0, len(files), 2)] if parallel else [[path] for path in files]
    width = len(groups[0])
    train_vocab = [set() for _ in range(width)]
    for g, group in enumerate(groups):
        if vocab is not None:
            known = [vocab] * width
        elif vocab_from_first and g > 0:
            known = [set().union(*train_vocab)] * width if joined else train_vocab
        else:
            known = [None] * width
        collect = vocab_from_first and vocab is None and g == 0
        unknown = [Counter() for _ in group]
        n_tokens, n_lines = [0] * width, [0] * width
        for items in itertools.zip_longest(*(decoded_lines(path, report) for path in group)):
            for side, item in enumerate(items):
                if item is None:
                    continue
                path, (line_no, text) = group[side], item
                n_lines[side] = line_no
                tokens = text.split()
                n_tokens[side] += len(tokens)
                if not tokens:
                    pair = f" (its pair: {group[1 - side]}:{line_no})" if width == 2 and items[1 - side] else ""
                    report.add(path, line_no, "empty", f"empty line{pair}", error=not allow_empty)
                if max_positions is not None and len(tokens) + 1 > max_positions:
                    report.add(path, line_no, "too long", f"{len(tokens)} tokens + </s> = {len(tokens) + 1} positions "
                                                          f"> --max-positions {max_positions}")
                if collect:
                    train_vocab[side].update(tokens)
                elif known[side] is not None:
                    for tok in tokens:
                        if tok not in known[side]:
                            if tok not in unknown[side]:
                                report.add(path, line_no, "unknown token", f"{tok!r} is not in the vocabulary",
                                           error=False)
                            unknown[side][tok] += 1
        if width == 2 and n_lines[0] != n_lines[1]:
            (a, b), (na, nb) = group, n_lines
            report.add(a if na > nb else b, min(na, nb) + 1, "length",
                       f"no pair: {a} has {na} lines but its parallel file {b} has {nb}")
        for side, path in enumerate(group):
            if unknown[side]:
                total = sum(unknown[side].values())
                log(f"check: warning: {path}: {total} of {n_tokens[side]} tokens "
                    f"({100 * total / max(1, n_tokens[side]):.2f}%, {len(unknown[side])} distinct) are outside the "
                    f"vocabulary and become <unk>")
    return report


# ---------------------------------------------------------------------------------- commands


def cmd_strip_markup(args):
    n = write_lines(args.output, strip_markup(read_lines(args.input), args.format))
    log(f"strip-markup ({args.format}): {n} lines -> {args.output}")


def cmd_tokenize(args):
    if len(args.files) % 2:
        raise SystemExit("tokenize wants pairs of files: IN OUT [IN OUT ...]")
    tok = Tokenizer(args.lang, args.lowercase, args.normalize_punct, args.aggressive_dash_splits)
    for src, dst in zip(args.files[::2], args.files[1::2]):
        n = write_lines(dst, _parallel_map(tok, read_lines(src), args.workers))
        log(f"tokenize ({args.lang}{', lowercased' if args.lowercase else ''}): {n} lines {src} -> {dst}")


def cmd_detokenize(args):
    write_lines(args.output, map(Detokenizer(args.lang), read_lines(args.input)))


def cmd_clean(args):
    src, tgt = read_lines(args.src_in), read_lines(args.tgt_in)
    src_out, tgt_out = clean_parallel(src, tgt, args.min_len, args.max_len, args.ratio)
    write_lines(args.src_out, src_out)
    write_lines(args.tgt_out, tgt_out)
    log(f"clean ({args.min_len}-{args.max_len} tokens, ratio {args.ratio}): kept {len(src_out)} of {len(src)} pairs")


def cmd_split_every(args):
    lines = read_lines(args.input)
    picked = [l for i, l in enumerate(lines, 1) if i % args.n == 0]  # awk's NR % n == 0
    rest = [l for i, l in enumerate(lines, 1) if i % args.n != 0]
    write_lines(args.picked, picked)
    write_lines(args.rest, rest)
    log(f"split-every {args.n}: {len(picked)} -> {args.picked}, {len(rest)} -> {args.rest}")


def cmd_bpe(args):
    if args.learn:
        log(f"learning {args.merges} joint BPE merges on {' + '.join(args.learn)}")
        learn_bpe(args.learn, args.codes, args.merges, args.workers)
    apply = BPEApplier(args.codes)
    for spec in args.apply:
        src, _, dst = spec.partition(":")
        if not dst:
            raise SystemExit(f"--apply wants IN:OUT, got {spec!r}")
        n = write_lines(dst, _parallel_map(apply, read_lines(src), args.workers))
        log(f"bpe: {n} lines {src} -> {dst}")


def add_training_phrases(splits, phrases):
    """Training split + the phrase pairs that share no side with a valid or test pair (nor repeat a training
    pair), so that valid and test stay sentences unseen in any form. Returns the number of pairs added."""
    held = {_dedup_key(side) for name in ("valid", "test") for pair in splits[name] for side in pair}
    seen = {(_dedup_key(de), _dedup_key(en)) for de, en in splits["train"]}
    added = 0
    for de, en in phrases:
        key = (_dedup_key(de), _dedup_key(en))
        if key in seen or key[0] in held or key[1] in held:
            continue
        seen.add(key)
        splits["train"].append((de, en))
        added += 1
    return added


def cmd_ding(args):
    lines = read_lines(args.input)
    pairs, stats = ding_pairs(lines, sentences=not args.phrases, min_words=args.min_words)
    os.makedirs(args.out_dir, exist_ok=True)
    splits, stats["groups of pairs sharing a side"] = split_disjoint(
        pairs, args.valid_size, args.test_size, args.seed)
    if args.train_phrases:
        phrases, _ = ding_pairs(lines, sentences=False, min_words=2)
        stats["training phrase pairs added"] = add_training_phrases(splits, phrases)
    for name, split in splits.items():
        write_lines(f"{args.out_dir}/{name}.de", [de for de, _ in split])
        write_lines(f"{args.out_dir}/{name}.en", [en for _, en in split])
        stats[f"{name} pairs"] = len(split)
        stats[f"{name} words de"] = sum(len(de.split()) for de, _ in split)
        stats[f"{name} words en"] = sum(len(en.split()) for _, en in split)
    with open(f"{args.out_dir}/stats.json", "w", encoding="utf-8") as f:
        json.dump(dict(stats), f, indent=1, ensure_ascii=False)
    for key, value in stats.items():
        print(f"  {key:45s} {value}")


def cmd_gigaword(args):
    n = write_lines(args.output, map(gigaword_normalize, read_lines(args.input)))
    log(f"gigaword: {n} lines -> {args.output}")


def cmd_gen_extract(args):
    parsed = parse_generate(read_lines(args.log))
    ids = sorted(parsed["H"])
    if args.expect is not None and ids != list(range(args.expect)):
        missing = sorted(set(range(args.expect)) - set(ids))[:10]
        raise SystemExit(f"{args.log}: {len(ids)} hypotheses, expected ids 0..{args.expect - 1} "
                         f"(missing e.g. {missing}); did generation skip sentences?")
    for kind, suffix in (("H", "hyp"), ("S", "src"), ("T", "ref")):
        write_lines(f"{args.prefix}.{suffix}", [parsed[kind].get(i, "") for i in ids])
    log(f"gen-extract: {len(ids)} sentences -> {args.prefix}.{{hyp,src,ref}}")


def cmd_rouge(args):
    scores = rouge_f1(read_lines(args.ref), read_lines(args.hyp), stemmer=not args.no_stemmer)
    labels = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
    print(" ".join(f"{labels[name]} {value:.2f}" for name, value in scores.items()))


def cmd_check(args):
    vocab = read_dictionary(args.dict) if args.dict else None
    report = check_texts(args.files, parallel=args.parallel, max_positions=args.max_positions,
                         allow_empty=args.allow_empty, vocab=vocab, vocab_from_first=args.vocab_from_first,
                         joined=args.joined, shown=args.shown)
    if report.errors:
        raise SystemExit(f"[textprep] check: {report.errors} error(s) in {', '.join(args.files)} "
                         f"(each named above with FILE:LINE)")
    log(f"check: {len(args.files)} file(s) ok" + (f", {report.warnings} warning(s)" if report.warnings else ""))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("strip-markup", help="text of IWSLT train.tags (--format tags) or xml/sgm <seg> lines (seg)")
    s.add_argument("--format", choices=["tags", "seg"], required=True)
    s.add_argument("input")
    s.add_argument("output")
    s.set_defaults(func=cmd_strip_markup)

    s = sub.add_parser("tokenize", help="Moses tokenization (sacremoses, no escaping)")
    s.add_argument("--lang", required=True)
    s.add_argument("--lowercase", action="store_true", help="lowercase after tokenizing")
    s.add_argument("--normalize-punct", action="store_true", help="Moses punctuation normalization first")
    s.add_argument("--aggressive-dash-splits", action="store_true", help="Moses -a: split hyphenated words")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("files", nargs="+", metavar="IN OUT", help="pairs of input and output files (- is stdin/stdout)")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("detokenize", help="Moses detokenization (sacremoses)")
    s.add_argument("--lang", required=True)
    s.add_argument("input")
    s.add_argument("output")
    s.set_defaults(func=cmd_detokenize)

    s = sub.add_parser("clean", help="clean-corpus-n.perl: length and length-ratio filter of a parallel corpus")
    s.add_argument("--min-len", type=int, default=1)
    s.add_argument("--max-len", type=int, default=175)
    s.add_argument("--ratio", type=float, default=1.5, help="max length ratio; <= 0 disables the test")
    for name in ("src_in", "tgt_in", "src_out", "tgt_out"):
        s.add_argument(name)
    s.set_defaults(func=cmd_clean)

    s = sub.add_parser("split-every", help="lines number n, 2n, ... (1-based) to PICKED, the others to REST")
    s.add_argument("-n", type=int, required=True)
    for name in ("input", "picked", "rest"):
        s.add_argument(name)
    s.set_defaults(func=cmd_split_every)

    s = sub.add_parser("bpe", help="learn joint BPE codes (--learn) and/or apply them (--apply IN:OUT)")
    s.add_argument("--codes", required=True)
    s.add_argument("--merges", type=int, default=10000)
    s.add_argument("--learn", nargs="*", default=[], metavar="FILE", help="learn on the concatenation")
    s.add_argument("--apply", nargs="*", default=[], metavar="IN:OUT", help="- is stdin/stdout: --apply=-:-")
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(func=cmd_bpe)

    s = sub.add_parser("ding", help="train/valid/test sentence pairs from a Ding de-en dictionary file")
    s.add_argument("input", help="the dictionary, e.g. /usr/share/trans/de-en")
    s.add_argument("out_dir", help="writes {train,valid,test}.{de,en} and stats.json here")
    s.add_argument("--phrases", action="store_true",
                   help="keep every pair of --min-words words, not only sentences")
    s.add_argument("--min-words", type=int, default=None, help="default 4 (sentences) or 2 (--phrases)")
    s.add_argument("--train-phrases", action="store_true",
                   help="valid and test stay sentences; training adds every phrase pair (>= 2 words) that "
                        "shares no side with them")
    s.add_argument("--valid-size", type=int, default=1000)
    s.add_argument("--test-size", type=int, default=1000)
    s.add_argument("--seed", type=int, default=1)
    s.set_defaults(func=cmd_ding)

    s = sub.add_parser("gigaword", help="Rush et al. normalization: lowercase, digits to #, UNK to <unk>")
    s.add_argument("input")
    s.add_argument("output")
    s.set_defaults(func=cmd_gigaword)

    s = sub.add_parser("gen-extract", help="PREFIX.{hyp,src,ref} from a fairseq-generate log, in id order")
    s.add_argument("log")
    s.add_argument("prefix")
    s.add_argument("--expect", type=int, default=None, help="fail unless ids are exactly 0..EXPECT-1")
    s.set_defaults(func=cmd_gen_extract)

    s = sub.add_parser("check", help="problems fairseq would not report (or report deep in a traceback), "
                                      "by FILE:LINE; exit status 1 on errors")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--parallel", action="store_true", help="FILEs are pairs: SRC TGT [SRC TGT ...]")
    s.add_argument("--max-positions", type=int, default=None, metavar="N",
                   help="error for a line of more than N - 1 tokens (fairseq's --max-source-positions is 1024)")
    s.add_argument("--allow-empty", action="store_true", help="empty lines are warnings, not errors")
    s.add_argument("--dict", metavar="DICT", help="warn about tokens not in this fairseq dict.txt")
    s.add_argument("--vocab-from-first", action="store_true",
                   help="the first FILE (pair) is the training data: warn about tokens of the others not in it")
    s.add_argument("--joined", action="store_true", help="with --vocab-from-first: one vocabulary for both sides")
    s.add_argument("--shown", type=int, default=10, help="lines shown per problem and file")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("rouge", help="ROUGE-1/2/L F1 (%%) of HYP against REF (rouge-score package)")
    s.add_argument("ref")
    s.add_argument("hyp")
    s.add_argument("--no-stemmer", action="store_true", help="no Porter stemming (ROUGE-1.5.5 without -m)")
    s.set_defaults(func=cmd_rouge)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "min_words", 0) is None:
        args.min_words = 2 if args.phrases else 4
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
