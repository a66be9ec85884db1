"""No model step hands oneDNN an operand layout that sends it to a reference kernel.

oneDNN's verbose mode prints one line per primitive it executes, naming the implementation that ran:
``exec,cpu,inner_product,brg_matmul:avx512_core,...`` or, for a layout its optimized kernels do not take (a
strided weight, a stride-0 gradient), ``exec,cpu,inner_product,ref:any,...``, 10-100x slower. The lines are
written by C code, so they are captured with ``capfd``. The models run at their real sizes (every product
above the measuring threshold), with the product choice measured (the default) and forced to oneDNN, so the
check holds whichever kernel the measurement picks on the machine at hand.

oneDNN's RNN primitive, which ``torch.nn.LSTM`` (and a one-group layer without padding) runs on, names its
training implementation ``ref``: that is its gemm-based driver, the one PyTorch's own LSTM trains with, not a
``ref:`` reference kernel; those lines are counted apart.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from fairseq.sequence_generator import SequenceGenerator

from grnn_fairseq.modules import backend
from grnn_fairseq.modules import products as lin
from test_group_lstm_lm import build_lm
from test_group_rnnsearch import build as build_nmt
from test_group_rnnsearch import make_dictionary

pytestmark = pytest.mark.skipif(not backend.onednn_usable(torch.zeros(1)), reason="no oneDNN in this torch build")

VOCAB = 2000
REF = re.compile(r"^onednn_verbose.*,exec,cpu,([a-z_]+),ref:", re.M)
EXEC = re.compile(r"^onednn_verbose.*,exec,cpu,([a-z_]+),([^,]+),", re.M)


PRODUCT_FLAGS = {"auto": [], "benchmark": ["--grnn-benchmark"], "onednn": ["--grnn-products", "onednn"]}


@pytest.fixture(params=list(PRODUCT_FLAGS))
def products(request):
    """The product choice of the models' flags: the default rule, measured, or forced to oneDNN."""
    backend.clear_measured()
    yield request.param
    backend.clear_measured()


def run_verbose(capfd, step):
    """Run ``step`` once to warm up (measurements, packing), then again under oneDNN's verbose mode; returns
    the (primitive, implementation) pairs that ran."""
    step()
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        step()
    out = capfd.readouterr().out
    refs = REF.findall(out)
    assert not refs, f"oneDNN ran reference kernels: {sorted(set(refs))}\n" + "\n".join(
        line for line in out.splitlines() if ",ref:" in line
    )[:3000]
    return EXEC.findall(out)


def translation_step(groups, flags):
    """A training step and a beam-search step of group_rnnsearch_iwslt at its real sizes (embeddings and d 256,
    first decoder layer 512), 32 sentences."""
    torch.manual_seed(0)
    d = make_dictionary(VOCAB)
    model = build_nmt("group_rnnsearch_iwslt", "--encoder-groups", str(groups), "--decoder-groups", str(groups),
                      *flags, src_dict=d)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    B, S, T = 32, 20, 22
    src = torch.randint(4, VOCAB, (B, S), generator=g)
    src[:, -1] = d.eos()
    src[:4, :3] = d.pad()  # four sentences left padded, as fairseq collates
    lengths = src.ne(d.pad()).sum(1)
    prev = torch.randint(4, VOCAB, (B, T), generator=g)
    prev[:, 0] = d.eos()
    generator = SequenceGenerator([model], d, beam_size=5, max_len_b=8)

    def step():
        model.train()
        model.zero_grad()
        logits, _ = model(src, lengths, prev)
        logits.float().log_softmax(-1)[..., 5].mean().backward()
        model.eval()
        with torch.no_grad():
            generator.forward({"net_input": {"src_tokens": src[:8], "src_lengths": lengths[:8]}})

    return step


@pytest.mark.parametrize("groups", [1, 4])
def test_translation_runs_no_reference_kernel(capfd, products, groups):
    ran = run_verbose(capfd, translation_step(groups, PRODUCT_FLAGS[products]))
    if products == "onednn":  # the check saw oneDNN's products, so it could have failed
        assert any(p == "inner_product" for p, _ in ran)


def test_language_model_runs_no_reference_kernel(capfd, products):
    """A training step of group_lstm_lm (2 layers of 1024, 2 groups; 64 x 35 tokens)."""
    torch.manual_seed(0)
    model = build_lm("--decoder-embed-dim", "512", "--decoder-hidden-size", "1024", "--decoder-out-embed-dim", "512",
                     *PRODUCT_FLAGS[products], vocab=VOCAB)  # fmt: skip
    tokens = torch.randint(4, VOCAB, (64, 35), generator=torch.Generator().manual_seed(1))

    def step():
        model.train()
        model.zero_grad()
        logits, _ = model(tokens)
        logits.float().log_softmax(-1)[..., 5].mean().backward()

    ran = run_verbose(capfd, step)
    if products == "onednn":
        assert any(p == "inner_product" for p, _ in ran)


def grouped(x):
    """... x 2C -> 2 x N x C/2 views: the groups of a grouped linear (strided rows)."""
    return x.reshape(-1, 2, x.size(-1) // 2).transpose(0, 1)


OPERANDS = {
    # name: (x, weight, output gradient from the output, whether oneDNN runs the product)
    "column slice of a weight": (lambda: torch.randn(64, 256), lambda: torch.randn(1024, 768)[:, :256],
                                 torch.randn_like, False),  # aten's BLAS: oneDNN would need a copy per call
    "transposed weight": (lambda: torch.randn(64, 256), lambda: torch.randn(256, 1024).t(), torch.randn_like, True),
    "stride-0 gradient": (lambda: torch.randn(64, 256), lambda: torch.randn(1024, 256),
                          lambda y: torch.ones(1).expand_as(y), True),  # what y.sum().backward() passes
    "strided rows": (lambda: torch.randn(64, 512)[:, :256], lambda: torch.randn(1024, 256), torch.randn_like, True),
}


@pytest.mark.parametrize("case", OPERANDS)
def test_products_take_any_layout_without_a_reference_kernel(capfd, case):
    """``linear`` (and ``grouped_linear`` on two groups of the same operands) forced to oneDNN, forward and
    backward, on each layout a caller may pass: no reference kernel, and the results of F.linear / bmm."""
    make_x, make_w, make_dy, on_onednn = OPERANDS[case]
    torch.manual_seed(0)
    x, w = make_x().requires_grad_(), make_w().requires_grad_()
    xg = grouped(x)  # 2 x 64 x 128
    wg = w[:512].reshape(2, 256, 256)[..., :128] if case == "column slice of a weight" else w.view(2, 512, 256)[..., :128]
    if case == "transposed weight":
        wg = torch.randn(2, 128, 512).transpose(1, 2).requires_grad_()  # 2 x 512 x 128, each group transposed
    calls = [
        (lin.linear, F.linear, (x, w)),
        (lin.grouped_linear, lambda a, b: torch.bmm(a, b.transpose(1, 2)), (xg, wg)),
    ]

    def step():
        results = []
        for fn, ref, args in calls:
            got = fn(*args)
            dy = make_dy(got)
            want = ref(*args)
            results.append((got, want, torch.autograd.grad(got, args, dy), torch.autograd.grad(want, args, dy)))
        return results

    with backend.use(products="onednn"):
        ran = run_verbose(capfd, step)
        assert any(p == "inner_product" for p, _ in ran) == on_onednn
        results = step()
    for got, want, got_grads, want_grads in results:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_measured_choice_holds_for_its_layout_only():
    """--grnn-benchmark measures a product on operands laid out as the call's and keeps the choice per layout: a
    transposed weight is measured apart from a contiguous one; a strided weight is never measured (it runs
    on aten's BLAS, which reads any strides)."""
    backend.clear_measured()
    x = torch.randn(64, 256)
    with torch.no_grad(), backend.use(products="auto", benchmark=True):
        lin.linear(x, torch.randn(1024, 256))
        lin.linear(x, torch.randn(256, 1024).t())
        lin.linear(x, torch.randn(1024, 768)[:, :256])
    layouts = sorted(key[-2] for key in backend.measured() if key[0] == "linear")  # (..., weight layout, threads)
    backend.clear_measured()
    assert layouts == ["c", "t"]
