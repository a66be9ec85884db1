"""Parameter counts of the registered models beside the paper's Tables 1-4.

    python -m grnn_fairseq.tables

Models are built through fairseq's own argument parser and registry, exactly as fairseq-train builds them,
on the meta device (nothing is allocated), with a synthetic dictionary of the paper's vocabulary size.
Prints markdown.

Table 1 counts the whole language model. Tables 2-4 count the "recurrent layers": every GroupLSTM and
GroupLSTMCell parameter, biases included (the bidirectional and upper encoder layers, the first (attention)
decoder layer and the upper decoder layers); the attention (W_q, W_k, v; W_o), the decoder init projection,
embeddings and output layers are excluded.
"""

from types import SimpleNamespace

import numpy as np
import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY

import grnn_fairseq  # noqa: F401  (registers the models)
from grnn_fairseq.models.group_rnnsearch import recurrent_parameter_count


def synthetic_dictionary(num_words: int) -> Dictionary:
    """A fairseq dictionary with ``num_words`` entries in all (its 4 special symbols included)."""
    d = Dictionary()
    for i in range(num_words - len(d)):
        d.add_symbol(f"w{i}")
    return d


def build(arch: str, extra_args, vocab: int, device=None):
    """Build ``arch`` with fairseq's parser defaults plus ``extra_args`` (CLI flags, ``--task`` included).

    One dictionary serves as source and target (a joined vocabulary, as the paper's BPE setups).
    """
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/dev/null", "--arch", arch, *extra_args])
    d = synthetic_dictionary(vocab)
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d, dictionary=d)
    with torch.device(device or "cpu"):
        return ARCH_MODEL_REGISTRY[arch].build_model(args, task)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Table 1 (PTB, 10k words, 2 layers of 1500, embedding 1500): whole-model parameters
TABLE1 = [
    ("LSTM", 1, False, 66e6),
    ("2 Group LSTM", 2, False, 48e6),
    ("LSTM + WT", 1, True, 51e6),
    ("2 Group LSTM + WT", 2, True, 33e6),
]
# Table 2 (IWSLT'14 De-En), Table 3 (WMT'14 En-De), Table 4 (Gigaword): K -> millions of recurrent parameters
PAPER_IWSLT = {1: 6.0, 2: 4.3, 4: 3.4, 8: 3.0, 16: 2.7}
PAPER_WMT = {2: 111.0, 4: 78.0}
PAPER_GIGAWORD = {1: 24.1, 2: 17.0, 4: 13.5, 8: 11.8, 16: 10.9}
# readings of "the hidden size is d = 256 for all LSTM layers" for the decoder (the encoder is fixed by
# footnote 3: a bidirectional layer of d per direction, then 2d); the architectures use reading C
IWSLT_READINGS = {
    "A: decoder d, d": ["--decoder-first-layer-hidden-size", "256", "--decoder-hidden-size", "256"],
    "B: decoder 2d, 2d": ["--decoder-first-layer-hidden-size", "512", "--decoder-hidden-size", "512"],
    "C: decoder 2d, d (arch)": [],
}


def table1(vocab: int = 10000):
    """Rows (name, groups, tied, paper, ours, recurrent) for group_lstm_lm_ptb."""
    rows = []
    for name, groups, tied, paper in TABLE1:
        flags = ["--task", "language_modeling", "--decoder-groups", str(groups)]
        if tied:
            flags.append("--share-decoder-input-output-embed")
        model = build("group_lstm_lm_ptb", flags, vocab, device="meta")
        rows.append((name, groups, tied, paper, count(model), count(model.decoder.rnn)))
    return rows


def rnnsearch_counts(arch: str, vocab: int, groups: int, flags=()):
    """(recurrent, whole-model) parameter counts of a group_rnnsearch architecture, in millions."""
    flags = ["--task", "translation", "--encoder-groups", str(groups), "--decoder-groups", str(groups), *flags]
    model = build(arch, flags, vocab, device="meta")
    return recurrent_parameter_count(model) / 1e6, count(model) / 1e6


def fit_ungrouped_grouped(paper):
    """Least-squares fit of paper[K] = U + G / K: the ungrouped and grouped counts the paper's numbers imply."""
    K = np.array(sorted(paper), dtype=float)
    A = np.stack([np.ones_like(K), 1.0 / K], 1)
    (U, G), *_ = np.linalg.lstsq(A, np.array([paper[k] for k in sorted(paper)]), rcond=None)
    return U, G


def rms_relative_error(ours, paper):
    return float(np.sqrt(np.mean([(ours[k] / paper[k] - 1) ** 2 for k in paper])))


def print_table1(vocab: int = 10000) -> None:
    print(f"## group_lstm_lm_ptb (vocabulary {vocab}), whole-model parameters\n")
    print("| model | paper | ours | diff | recurrent |\n|---|---|---|---|---|")
    for name, _, _, paper, ours, rec in table1(vocab):
        print(f"| {name} | {paper / 1e6:.0f}M | {ours / 1e6:.2f}M | {100 * (ours - paper) / paper:+.1f}% | {rec / 1e6:.2f}M |")


def print_rnnsearch_tables() -> None:
    print("\n## group_rnnsearch_iwslt (25k joined vocabulary), recurrent parameters in millions\n")
    U, G = fit_ungrouped_grouped(PAPER_IWSLT)
    print(f"Table 2 fits U + G/K with U = {U:.2f}M ungrouped and G = {G:.2f}M grouped.\n")
    names = list(IWSLT_READINGS)
    table = {n: {K: rnnsearch_counts("group_rnnsearch_iwslt", 25000, K, IWSLT_READINGS[n]) for K in PAPER_IWSLT} for n in names}
    print("| K | Table 2 | " + " | ".join(names) + " | whole model (C) |")
    print("|---" * (len(names) + 3) + "|")
    for K in PAPER_IWSLT:
        cells = " | ".join(f"{table[n][K][0]:.2f}" for n in names)
        print(f"| {K} | {PAPER_IWSLT[K]:.1f} | {cells} | {table[names[-1]][K][1]:.2f} |")
    errors = " | ".join(f"{rms_relative_error({K: table[n][K][0] for K in PAPER_IWSLT}, PAPER_IWSLT):.0%}" for n in names)
    print(f"| rms rel. error | | {errors} | |")
    for arch, title, paper_counts in (
        ("group_rnnsearch_wmt", "Table 3", PAPER_WMT),
        ("group_rnnsearch_gigaword", "Table 4", PAPER_GIGAWORD),
    ):
        print(f"\n## {arch} (30k joined vocabulary), parameters in millions\n")
        print(f"| K | {title} | recurrent | whole model |\n|---|---|---|---|")
        for K, paper in paper_counts.items():
            rec, whole = rnnsearch_counts(arch, 30000, K)
            print(f"| {K} | {paper:.1f} | {rec:.1f} | {whole:.1f} |")


def main():
    print_table1()
    print_rnnsearch_tables()


if __name__ == "__main__":
    main()
