"""scripts/designs_report.py and scripts/ablation_shuffle.py without training: every row's flags parse in this
checkout (a typo would otherwise surface only in the lead's hours-long run), the two scripts share their runs,
and the tables format what they are given; scripts/translation_report.py end to end on a tiny corpus, and
scripts/profile_model.py on it."""

import json
import os
import re
import sys

import pytest

from conftest import ROOT, preprocess_parallel

sys.path.insert(0, os.path.join(ROOT, "scripts"))
designs_report = pytest.importorskip("designs_report")
ablation_shuffle = pytest.importorskip("ablation_shuffle")


@pytest.mark.parametrize("task,common,rows", [
    ("language_modeling", designs_report.LM_COMMON, designs_report.LM_ROWS),
    ("translation", designs_report.NMT_COMMON, designs_report.NMT_ROWS),
])  # fmt: skip
def test_every_row_parses_and_unknown_flags_do_not(task, common, rows):
    assert len({r.name for r in rows}) == len(rows)  # names are run folders: unique
    for row in rows:
        if row.name == "lightrnn":  # another branch adds its flags; the report lists it as not available
            continue
        assert designs_report.available(row, task, common), row
    assert not designs_report.available(designs_report.Row("x", "x", ["--no-such-flag"]), task, common)
    assert not designs_report.available(designs_report.Row("x", "x", [], task="no_such_task"), task, common)


def test_ablation_runs_are_the_designs_report_rows():
    names = {r.name: r.flags for r in designs_report.LM_ROWS}
    for rearrangement in (False, True):
        row = designs_report.lm_group_row(2, rearrangement)
        assert names[row.name] == row.flags  # same folder, same flags: the run is shared
    assert designs_report.lm_group_row(4, False).flags == [
        "--decoder-groups", "4", "--no-shuffle-layers", "--no-shuffle-time"]  # fmt: skip


def test_tables():
    lm = {"task": "LM (Brown)", "model": "SRU", "recurrent_params": 394240, "params": 2960000, "wps": 2327.4,
          "valid_ppl": 979.04, "test_ppl": 909.2}  # fmt: skip
    nmt = {"task": "De-En (Ding)", "model": "SRU RNNSearch", "recurrent_params": 4463104, "params": 8957952,
           "wps": 778.9, "best_valid_loss": 8.7761, "test_bleu": 0.08}  # fmt: skip
    gone = {"task": "LM (Brown)", "model": "LightRNN", "unavailable": True}
    lines = designs_report.table([lm, nmt, gone])
    assert lines[2] == "| LM (Brown) | SRU | 0.39M | 2.96M | 2327 | ppl 979.0 | ppl 909.2 |"
    assert lines[3] == "| De-En (Ding) | SRU RNNSearch | 4.46M | 8.96M | 779 | loss 8.776 (base 2) | BLEU 0.08 |"
    assert "not available" in lines[4]


def test_benchmark_models_leaves_out_the_warm_up_intervals():
    benchmark_models = pytest.importorskip("benchmark_models")
    log = "\n".join(
        ["[...] num. shared model params: 8,110,592 (num. trained: 8,110,592)"]
        + [f"epoch 001:  {20 * i} / 437 loss=9 wps={w} ups=1" for i, w in enumerate([500.0, 900.0, 1000.0, 1200.0], 1)]
    ).replace("epoch 001:", "train_inner | epoch 001:")
    assert benchmark_models.speed_from_log(log, 40) == (1100.0, 8110592)
    assert benchmark_models.speed_from_log(log, 20) == ((900.0 + 1000.0 + 1200.0) / 3, 8110592)
    with pytest.raises(SystemExit, match="raise --updates"):
        benchmark_models.speed_from_log(log, 80)


def test_benchmark_models_runs_defaults_and_records_memory():
    """Our candidates run with their defaults unless --products asks (then --grnn-products, ours only); a run's
    peak resident memory is that process's own (a child allocating 200 MB reports at least that, and not the
    memory of this test process, which fork copies)."""
    benchmark_models = pytest.importorskip("benchmark_models")
    ours, theirs = "group_rnnsearch_iwslt, groups 4", "fairseq lstm_wiseman_iwslt_de_en, decoder 512"
    assert not any(f.startswith("--grnn") for f in benchmark_models.candidate_flags(ours, None))
    assert benchmark_models.candidate_flags(ours, "onednn")[-2:] == ["--grnn-products", "onednn"]
    assert not any(f.startswith("--grnn") for f in benchmark_models.candidate_flags(theirs, "onednn"))
    env = benchmark_models.candidate_env(1)
    assert env["OMP_NUM_THREADS"] == "1"
    code, log, mib = benchmark_models.run_measured(
        [sys.executable, "-c", "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
         "time.sleep(0.5); print('ok')"], env,
    )
    assert code == 0 and log.strip() == "ok" and 200 <= mib < 1000


def test_benchmark_models_recipe_candidates_are_the_translation_reports_models():
    """The recipe's speed is measured on the models the translation report scores (the same flags but batching
    and optimizer), and the defaults stay fairseq's and the paper's models."""
    from fairseq import options

    benchmark_models = pytest.importorskip("benchmark_models")
    translation_report = pytest.importorskip("translation_report")

    def model_args(flags):  # the model's arguments once the architecture has set its defaults
        args = options.parse_args_and_arch(options.get_training_parser(), input_args=[
            "data", "--task", "translation", "--user-dir", os.path.join(ROOT, "grnn_fairseq"), *flags])
        return {k: v for k, v in vars(args).items() if k.startswith(("encoder_", "decoder_", "attention", "init"))}

    for k in (1, 2, 4):
        measured = model_args(benchmark_models.CANDIDATES[f"group_rnnsearch_iwslt, groups {k}, translation recipe"])
        assert measured == model_args(translation_report.MODELS[f"group_rnnsearch_iwslt, groups {k}"])
        assert measured["decoder_residual"] and measured["decoder_groups"] == k
    assert not any("recipe" in name for name in benchmark_models.DEFAULT_MODELS)
    assert len(benchmark_models.DEFAULT_MODELS) == 5


def test_benchmark_models_table_names_the_batching():
    benchmark_models = pytest.importorskip("benchmark_models")
    rows = [{"model": "m", "params": 2.5e6, "wps": 1234.4, "peak_rss_mib": 812.3, "ratios": [1.5, 2.25]}]
    lines = benchmark_models.table(rows, "max-tokens").splitlines()
    assert lines[0] == "--max-tokens 4000:"
    assert lines[-1] == "| m | 2.50M | 1234 | 812 MiB | 1.50x | 2.25x |"


def tiny_de_en(tmp_path):
    """A tiny De-En corpus laid out as prepare-ding-de-en.sh writes it (raw, tok, plain and data-bin)."""
    words = [("haus", "house"), ("katze", "cat"), ("hund", "dog"), ("baum", "tree"), ("buch", "book")]
    for folder in ("raw", "tok", "plain"):
        (tmp_path / folder).mkdir()
    for split, n in (("train", 64), ("valid", 8), ("test", 6)):
        pairs = []
        for i in range(n):
            (de, en), (de2, en2) = words[i % 5], words[i // 5 % 5]
            pairs.append((f"das {de} ist {de2}", f"the {en} is {en2}"))
        for lang, column in (("de", 0), ("en", 1)):
            text = "".join(p[column] + "\n" for p in pairs)
            for folder in ("raw", "tok", "plain"):
                (tmp_path / folder / f"{split}.{lang}").write_text(text)
    raw = tmp_path / "raw"
    preprocess_parallel([raw / "train", raw / "valid", raw / "test"], tmp_path / "data-bin", langs=("de", "en"))


def test_translation_report_end_to_end(tmp_path):
    """Two rows of the translation report, a few updates each on a tiny De-En corpus: it trains, decodes,
    counts the recurrent parameters (the recipe's values at the IWSLT sizes, whatever the vocabulary), measures
    the source use and writes both tables."""
    translation_report = pytest.importorskip("translation_report")
    tiny_de_en(tmp_path)
    models = ["fairseq lstm_wiseman_iwslt_de_en", "group_rnnsearch_iwslt, groups 2"]
    out = tmp_path / "report"
    translation_report.main([str(tmp_path), "--models", *models, "--updates", "2", "--bootstrap-samples", "10",
                             "--save-root", str(tmp_path / "runs"), "--out", str(out)])  # fmt: skip
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["model"] for r in rows] == models
    assert [r["recurrent_params"] for r in rows] == [1314816, 5259264]
    assert rows[0]["p"] is None and 0 <= rows[1]["p"] <= 1
    assert all(r["valid_bits"] > 0 and r["attention_peak"] is not None for r in rows)
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[2].startswith("| fairseq lstm_wiseman_iwslt_de_en | 1.31M |") and "| baseline |" in table[2]
    assert table[3].startswith("| group_rnnsearch_iwslt, groups 2 | 5.26M |")


def test_profile_model_profiles_fairseq_updates(tmp_path, capsys):
    """scripts/profile_model.py on CPU: fairseq's Trainer updates groups 4 on the tiny corpus's batches under the
    profiler, the host's time in fairseq's forward, backward and optimizer is found, and the table, by input
    shapes, lists the products."""
    profile_model = pytest.importorskip("profile_model")
    tiny_de_en(tmp_path)
    profile_model.main([str(tmp_path / "data-bin"), "--updates", "2", "--warmup", "1", "--rows", "5", "--shapes",
                        "--", "--arch", "group_rnnsearch_iwslt", "--encoder-groups", "4", "--decoder-groups", "4"])
    out = capsys.readouterr().out
    assert "--arch group_rnnsearch_iwslt --encoder-groups 4" in out.splitlines()[0]
    assert re.search(r"^\d+ target words/s under the profiler, [\d.]+ ms per update", out, re.M)
    phases = re.search(r"^host ms per update: forward ([\d.]+), backward ([\d.]+), .*optimizer ([\d.]+), the rest", out,
                       re.M)  # fmt: skip
    assert phases and all(float(ms) > 0 for ms in phases.groups()), out
    assert "Self CPU" in out and "Input Shapes" in out
    assert re.search(r"aten::(addmm|mm|bmm) |mkldnn::_linear_pointwise ", out)


def test_benchmark_generate_decodes_every_model_to_the_forced_length(tmp_path):
    """scripts/benchmark_generate.py on the tiny corpus: per batch size, every model's beam search decodes the
    same sentences to --length tokens (plus EOS), and the table and the JSON hold its speed against fairseq's."""
    benchmark_generate = pytest.importorskip("benchmark_generate")
    tiny_de_en(tmp_path)
    models = ["fairseq lstm_wiseman_iwslt_de_en, decoder 512", "group_rnnsearch_iwslt, groups 2, translation recipe"]
    out = tmp_path / "generate.json"
    results = benchmark_generate.main([str(tmp_path / "data-bin"), "--batch-size", "4", "1", "--sentences", "6", "2",
                                       "--length", "3", "--rounds", "1", "--models", *models, "--json", str(out)])
    assert list(results) == ["4", "1"] and json.loads(out.read_text())["batch_size"]["1"] == results["1"]
    for batch_size, sentences in (("4", 6), ("1", 2)):
        rows = results[batch_size]
        assert [r["model"] for r in rows] == models
        assert all(r["tokens"] == sentences * 4 for r in rows)  # 3 tokens and EOS per sentence
        assert rows[0]["ratios"] == [None, 1.0] and rows[1]["ratios"][1] > 0
    with pytest.raises(SystemExit):
        benchmark_generate.main([str(tmp_path / "data-bin"), "--batch-size", "4", "1", "--sentences", "6"])
    lines = benchmark_generate.table(results["4"], 4).splitlines()
    assert lines[0] == "--batch-size 4:" and lines[-1].startswith(f"| {models[1]} |")
