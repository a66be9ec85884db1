"""The fused group LSTM path against the autograd path and ``group_lstm_reference``: outputs and every gradient."""

import contextlib
import copy
import itertools

import pytest
import torch

from conftest import Dispatched, device_waits
from grnn_fairseq.modules import backend, group_lstm, steps
from grnn_fairseq.modules.functional import step_mask
from grnn_fairseq.modules.fused_group_lstm import FusedGroupLSTMFunction, fused_supported
from grnn_fairseq.modules.group_lstm import (
    GroupLSTM,
    group_lstm_direction,
    group_lstm_direction_autograd,
    group_lstm_reference,
)

T, B, C, H = 5, 3, 8, 16  # H/K = 4 is divisible by K = 4, so the shuffle takes the fused path at every K
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture
def onednn_available():
    if not backend.onednn_usable(torch.zeros(1)):
        pytest.skip("this torch has no oneDNN linear")


@pytest.fixture
def c_kernel():
    if not steps.c_kernel_available():
        pytest.skip("the C kernel is not built (setup.py builds it; a missing compiler leaves it out)")


def outputs_and_grads(run, module, x, hx, lengths, reads="y h c", backward_mode=None):
    """Outputs, h_n, c_n and the gradients of x, h0, c0 and every parameter of one weighted-sum loss of the
    outputs named in ``reads``; ``backward_mode``: a context the backward pass runs in."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    h0, c0 = (v.clone().requires_grad_(True) for v in hx)
    y, (h, c) = run(module, x, (h0, c0), lengths)
    gen = torch.Generator().manual_seed(1)
    read = [{"y": y, "h": h, "c": c}[name] for name in reads.split()]
    loss = sum((v * torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)).sum() for v in read)
    with backward_mode or contextlib.nullcontext():
        loss.backward()
    return [y, h, c, x.grad, h0.grad, c0.grad] + [p.grad for p in module.parameters()]


def run_module(module, x, hx, lengths):
    return module(x, hx, lengths=lengths)


def assert_close(got, want, tol):
    assert len(got) == len(want)
    for n, (a, b) in enumerate(zip(got, want)):
        assert a is not None and b is not None, f"missing gradient #{n}"
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= tol, f"tensor #{n} differs by {(a - b).abs().max().item():.3g}"


def make_case(K, dtype, bidirectional, shuffle_time, shuffle_layers, bias=True, seed=0):
    torch.manual_seed(seed)
    module = GroupLSTM(
        C,
        H,
        num_layers=2,
        groups=K,
        bidirectional=bidirectional,
        shuffle_time=shuffle_time,
        shuffle_layers=shuffle_layers,
        bias=bias,
    ).to(dtype)
    module.eval()
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, C, dtype=dtype)
    hx = (torch.randn(2 * D, B, H, dtype=dtype), torch.randn(2 * D, B, H, dtype=dtype))
    return module, x, hx


CASES = list(itertools.product([1, 2, 4], [False, True], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("K,shuffle_time,shuffle_layers,bidirectional,padded", CASES)
def test_fused_matches_autograd_and_reference(fused_mode, dtype, K, shuffle_time, shuffle_layers, bidirectional, padded):
    module, x, hx = make_case(K, dtype, bidirectional, shuffle_time, shuffle_layers)
    lengths = torch.tensor([5, 2, 4]) if padded else None
    fused_mode(True)
    fused = outputs_and_grads(run_module, module, x, hx, lengths)
    fused_mode(False)
    autograd = outputs_and_grads(run_module, module, x, hx, lengths)
    reference = outputs_and_grads(group_lstm_reference, module, x, hx, lengths)
    assert_close(fused, autograd, TOL[dtype])
    assert_close(fused, reference, TOL[dtype])


@pytest.mark.parametrize("K", [1, 2, 4])
def test_fused_without_bias_and_empty_sequence(fused_mode, K):
    module, x, hx = make_case(K, torch.float64, True, True, True, bias=False)
    fused_mode(True)
    lengths = torch.tensor([5, 1, 3])
    fused = outputs_and_grads(run_module, module, x, hx, lengths)
    reference = outputs_and_grads(group_lstm_reference, module, x, hx, lengths)
    assert_close(fused, reference, 1e-10)
    lengths = torch.tensor([5, 0, 3])  # an empty sequence keeps its initial state (the reference cannot run it)
    fused = outputs_and_grads(run_module, module, x, hx, lengths)
    fused_mode(False)
    autograd = outputs_and_grads(run_module, module, x, hx, lengths)
    assert_close(fused, autograd, 1e-10)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_fused_recurrent_dropout_matches_autograd(fused_mode, K):
    module, x, hx = make_case(K, torch.float64, True, True, True)
    module.recurrent_dropout = 0.3
    module.train()  # the same seed draws the same masks on both paths
    lengths = torch.tensor([5, 2, 4])
    results = []
    for enabled in (True, False):
        fused_mode(enabled)
        torch.manual_seed(7)
        results.append(outputs_and_grads(run_module, module, x, hx, lengths))
    assert_close(results[0], results[1], 1e-10)


@pytest.mark.parametrize("shuffle", [False, True])
def test_fused_function_at_one_group(shuffle):
    """K = 1 without padding dispatches to aten's LSTM; the Function itself must still be right there."""
    torch.manual_seed(0)
    x = torch.randn(T, B, C, dtype=torch.float64)
    h, c = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    w_ih, w_hh = 0.3 * torch.randn(1, 4 * H, C, dtype=torch.float64), 0.3 * torch.randn(1, 4 * H, H, dtype=torch.float64)
    b_ih, b_hh = torch.randn(1, 4 * H, dtype=torch.float64), torch.randn(1, 4 * H, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, h, c, w_ih, w_hh, b_ih, b_hh)]
    got = FusedGroupLSTMFunction.apply(*inputs, shuffle, None, None)
    want = group_lstm_direction_autograd(*inputs, shuffle)
    grads_got = torch.autograd.grad(sum(v.sum() for v in got), inputs)
    grads_want = torch.autograd.grad(sum(v.sum() for v in want), inputs)
    assert_close(list(got) + list(grads_got), list(want) + list(grads_want), 1e-10)


def test_inference_matches_training_forward(fused_mode):
    module, x, hx = make_case(4, torch.float32, True, True, True)
    lengths = torch.tensor([5, 2, 4])
    with torch.no_grad():
        y, (h, c) = module(x, hx, lengths=lengths)
    y2, (h2, c2) = module(x, hx, lengths=lengths)
    assert_close([y, h, c], [y2, h2, c2], 1e-6)  # strided and contiguous sigmoid kernels may differ in an ulp


def test_gradcheck_fused_function():
    torch.manual_seed(0)
    K, Hs, Cs, Ts, Bs = 2, 4, 4, 4, 3
    dt = torch.float64
    x = torch.randn(Ts, Bs, Cs, dtype=dt)
    h, c = torch.randn(Bs, Hs, dtype=dt), torch.randn(Bs, Hs, dtype=dt)
    w_ih, w_hh = torch.randn(K, 4 * Hs // K, Cs // K, dtype=dt), torch.randn(K, 4 * Hs // K, Hs // K, dtype=dt)
    b_ih, b_hh = torch.randn(K, 4 * Hs // K, dtype=dt), torch.randn(K, 4 * Hs // K, dtype=dt)
    inputs = tuple(t.requires_grad_(True) for t in (x, h, c, w_ih, w_hh, b_ih, b_hh))
    lengths = torch.tensor([4, 1, 3])
    rmask = torch.rand(Bs, Hs, dtype=dt) * 2

    def fn(*args):
        return FusedGroupLSTMFunction.apply(*args, True, lengths, rmask)

    assert torch.autograd.gradcheck(fn, inputs)


def test_unsupported_calls_fall_back(fused_mode):
    torch.manual_seed(0)
    x = torch.randn(T, B, 8)
    K, Hs = 4, 8  # H/K = 2 is not divisible by K = 4: no strided shuffle view
    w_hh = torch.randn(K, 4 * Hs // K, Hs // K)
    assert not fused_supported(x, w_hh, True, None)[0]
    assert fused_supported(x, w_hh, False, None)[0]
    # a mask that is not right padding goes to the autograd path, with the autograd path's result
    mask = torch.ones(T, B, 1, dtype=torch.bool)
    mask[1, 0] = False
    assert not fused_supported(x, w_hh, False, mask)[0]
    ok, lengths = fused_supported(x, w_hh, False, step_mask(torch.tensor([5, 2, 4]), T, x.device))
    assert ok and lengths.tolist() == [5, 2, 4]
    w_ih = torch.randn(K, 4 * Hs // K, 8 // K)
    h = torch.zeros(B, Hs)
    args = (x, h, h, w_ih, w_hh, None, None, True, mask)
    assert_close(list(group_lstm_direction(*args)), list(group_lstm_direction_autograd(*args)), 0.0)


def test_retain_graph_gives_the_same_gradients_twice(fused_mode):
    module, x, hx = make_case(2, torch.float64, False, True, True)
    x.requires_grad_(True)
    y, _ = module(x, hx)
    first = torch.autograd.grad(y.sum(), x, retain_graph=True)[0]
    second = torch.autograd.grad(y.sum(), x)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("reads", ["y", "y h", "y c", "h"])
def test_unused_outputs_send_no_gradient_into_the_loop(fused_mode, reads):
    """An output the loss does not use (an encoder's h_n and c_n) reaches the backward as None, not as zeros:
    the outputs and gradients equal the autograd path's, and with the output sequence alone the backward loop
    adds in no final state (no index_copy at the steps where rows end, no lengths read back)."""
    module, x, hx = make_case(2, torch.float64, True, True, True)
    lengths = torch.tensor([5, 2, 4])

    ops = Dispatched()  # every operator the backward dispatched
    fused_mode(True)
    fused = outputs_and_grads(run_module, module, x, hx, lengths, reads, backward_mode=ops)
    fused_mode(False)
    assert_close(fused, outputs_and_grads(run_module, module, x, hx, lengths, reads), TOL[torch.float64])
    if reads == "y":
        assert "index_copy_" not in ops.names and "index_select" not in ops.names, ops.names


@pytest.mark.parametrize("K", [1, 4])
def test_padded_stack_passes_its_lengths_on(fused_mode, K):
    """GroupLSTM hands its lengths to every layer's fused call rather than have each recover them from the mask
    (a comparison that, on a GPU, waits for every queued kernel): its forward of a padded batch reads nothing back
    to the host; the lengths recovered from a bare mask are the same."""
    module, x, hx = make_case(K, torch.float64, True, True, True)
    lengths = torch.tensor([5, 2, 4])
    fused_mode(True)
    with device_waits() as waits:
        module(x, hx, lengths=lengths)
    assert waits == [], waits
    mask = step_mask(lengths, T, x.device)
    assert torch.equal(fused_supported(x, module.weight_hh_l0, True, mask)[1], lengths)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("K", [1, 2, 4])
def test_cuda_matches_cpu(fused_mode, K):
    module, x, hx = make_case(K, torch.float64, True, True, True)
    lengths = torch.tensor([5, 2, 4])
    cpu = outputs_and_grads(run_module, module, x, hx, lengths)
    module_cuda = copy.deepcopy(module).cuda()  # .cuda() in place would move the CPU run's gradients too
    gpu = outputs_and_grads(run_module, module_cuda, x.cuda(), tuple(v.cuda() for v in hx), lengths.cuda())
    assert_close([v.cpu() for v in gpu], cpu, 1e-10)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_onednn_products_match_aten(fused_mode, onednn_available, K):
    """float32 on CPU: oneDNN's linear for every product of the fused path against aten's, with padding,
    recurrent dropout and the shuffle."""
    module, x, hx = make_case(K, torch.float32, True, True, True)
    module.recurrent_dropout = 0.2
    module.train()
    lengths = torch.tensor([5, 2, 4])
    results = []
    for products in ("onednn", "aten"):
        fused_mode(products=products)
        torch.manual_seed(3)
        results.append(outputs_and_grads(run_module, module, x, hx, lengths))
    assert_close(results[0], results[1], 1e-5)


def test_benchmark_measures_once_per_shape(fused_mode, onednn_available, monkeypatch):
    """benchmark on: the kernel of each product is measured at its first shape, cached per shape and layout,
    and the result equals the fixed choices'; off (the default), nothing is measured."""
    module, x, hx = make_case(2, torch.float32, True, True, True)
    monkeypatch.setattr(backend, "MIN_ONEDNN_MACS", 0)  # measure even these tiny products
    results = {}
    for products, bench in (("auto", True), ("aten", False), ("onednn", False), ("auto", False)):
        backend.clear_measured()
        fused_mode(products=products, benchmark=bench)
        results[products, bench] = outputs_and_grads(run_module, module, x, hx, torch.tensor([5, 2, 4]))
        if bench:
            measured = backend.measured()
            assert {key[0] for key in measured} == {"step", "input_projections", "weight_grad"}
            outputs_and_grads(run_module, module, x, hx, torch.tensor([5, 2, 4]))
            assert backend.measured() == measured  # the same shapes again: nothing measured anew
        else:
            assert backend.measured() == {}
    for key in results:
        assert_close(results[key], results["aten", False], 1e-5)
    backend.clear_measured()


def test_workspace_buffers_are_not_shared_between_live_graphs(fused_mode):
    """Two forward passes alive at once, their backward passes in reverse order: the pooled buffers of the
    first graph must survive the second call, and return to the pool when the graphs die."""
    from grnn_fairseq.modules import fused_group_lstm as fgl

    module, x, hx = make_case(2, torch.float64, False, True, True)
    inputs = [x, 2 * x]
    weights = [torch.randn(x.size(0), x.size(1), H, dtype=x.dtype) for _ in inputs]

    def grads(fused):
        fused_mode(fused)
        xs = [v.clone().requires_grad_(True) for v in inputs]
        ys = [module(v, hx)[0] for v in xs]  # both graphs alive
        for y, w in reversed(list(zip(ys, weights))):
            (y * w).sum().backward()
        return [v.grad for v in xs]

    want = grads(False)
    fgl._WORKSPACE.clear()
    got = grads(True)
    assert_close(got, want, 1e-10)
    assert len(fgl._WORKSPACE.free) >= 2  # the graphs are gone: their saved slabs are back in the pool


KERNEL_CASES = list(itertools.product([1, 2, 4], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("K,shuffle,padded,step_onednn", KERNEL_CASES)
def test_c_kernel_matches_pytorch_step(fused_mode, c_kernel, K, shuffle, padded, step_onednn):
    """float32 on CPU: the C kernel's step (grnn_fairseq/csrc) against the same step in PyTorch operations, with
    both product kernels, the shuffle, padding, recurrent dropout, and gradients from h_n/c_n only."""
    products = "onednn" if step_onednn else "aten"
    module, x, hx = make_case(K, torch.float32, True, shuffle, shuffle)
    module.recurrent_dropout = 0.2
    module.train()
    lengths = torch.tensor([5, 2, 4]) if padded else None

    def final_state_only(module, x, hx, lengths):  # no gradient reaches the outputs: d_out is None
        y, (h, c) = module(x, hx, lengths=lengths)
        return y.detach(), (h, c)

    for run in (run_module, final_state_only):
        results = []
        for step in ("c", "torch"):
            fused_mode(step=step, products=products)
            torch.manual_seed(3)
            results.append(outputs_and_grads(run, module, x, hx, lengths))
        assert_close(results[0], results[1], 2e-6)


def test_c_kernel_splits_rows_over_threads(fused_mode, c_kernel):
    """A step's K*B rows split over threads at rows that are not multiples of K (28 rows over 3 threads at K = 4;
    each thread visits its rows group by group): outputs and gradients to the bit of one thread's, the shuffle,
    padding and recurrent dropout on."""
    torch.manual_seed(0)
    module = GroupLSTM(64, 1024, groups=4).train()  # a step of 4 x 7 x 256 units: three threads' worth
    module.recurrent_dropout = 0.2
    x, hx = torch.randn(3, 7, 64), (torch.randn(1, 7, 1024), torch.randn(1, 7, 1024))
    lengths = torch.tensor([3, 1, 2, 3, 2, 3, 1])
    fused_mode(step="c", products="aten")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            torch.manual_seed(3)
            results.append(outputs_and_grads(run_module, module, x, hx, lengths))
    finally:
        torch.set_num_threads(threads)
    assert_close(results[1], results[0], 0.0)


def test_c_kernel_is_used_and_keeps_nan(fused_mode, c_kernel, monkeypatch):
    """The kernel runs every step of float32 CPU calls, forward and backward, and none of float64 ones; a NaN
    input stays NaN (its exp clamps with comparisons, which keep NaN, so fairseq still sees a diverged loss)."""
    calls = {"forward_step": 0, "backward_step": 0}
    for name in calls:
        def counted(*args, _f=getattr(steps._C, name), _name=name):
            calls[_name] += 1
            return _f(*args)
        monkeypatch.setattr(steps._C, name, counted)
    module = GroupLSTM(8, 16, groups=2)
    x = torch.randn(3, 2, 8, requires_grad=True)
    module.double()(x.double())[0].sum().backward()
    assert calls == {"forward_step": 0, "backward_step": 0}
    module.float()(x)[0].sum().backward()
    assert calls == {"forward_step": 3, "backward_step": 3}
    x = x.detach()
    x[1, 0, 0] = float("nan")
    with torch.no_grad():
        y, _ = module(x)
    assert torch.isnan(y[1, 0, :8]).all() and not torch.isnan(y[1, 0, 8:]).any()  # group 0 reads channel 0
    assert torch.isnan(y[2, 0]).all()  # the shuffle passed it to every group
    assert not torch.isnan(y[:, 1]).any() and not torch.isnan(y[0]).any()


def test_c_kernel_is_built_where_a_compiler_exists():
    """setup.py builds the kernel as an optional extension: it may only be missing where no C compiler is (so
    that a broken build cannot hide behind the skips above)."""
    import shutil
    import sysconfig

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the kernel is optional")
    assert steps.c_kernel_available(), "the C kernel did not build or load: reinstall with pip install -e . and read its output"


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("outputs", ["both", "h", "c"])
def test_fused_cell_matches_pytorch_cell(fused_mode, c_kernel, K, outputs):
    """GroupLSTMCell's gate math on the C kernel (FusedLSTMCellFunction) against PyTorch operations, float32:
    h', c' and the gradients of the input, h, c and every parameter, over two chained steps."""
    from grnn_fairseq.modules.group_lstm import GroupLSTMCell

    torch.manual_seed(0)
    cell = GroupLSTMCell(8, 16, groups=K)
    x = torch.randn(2, 3, 8)
    hx = (torch.randn(3, 16), torch.randn(3, 16))

    def run(fused):
        fused_mode(fused)
        cell.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_(True)
        h0, c0 = (v.clone().requires_grad_(True) for v in hx)
        h, c = cell(xs[0], (h0, c0))
        h, c = cell(xs[1], (h, c))
        loss = {"both": (h * 1.5).sum() + (c * c).sum(), "h": (h * h).sum(), "c": c.sum()}[outputs]
        loss.backward()
        return [h, c, xs.grad, h0.grad, c0.grad] + [p.grad for p in cell.parameters()]

    assert_close(run(True), run(False), 2e-6)


@pytest.mark.parametrize("K", [1, 4])
def test_fused_cell_without_gradients(fused_mode, c_kernel, monkeypatch, K):
    """Without autograd (decoding), the C kernel's cell runs without an autograd node and saves nothing: the same
    h' and c' to the bit as with gradients, PyTorch operations' within float32 rounding, and the gates untouched
    (the kernel reads their g rows doubled from a copy)."""
    from grnn_fairseq.modules.group_lstm import GroupLSTMCell

    torch.manual_seed(0)
    cell = GroupLSTMCell(8, 16, groups=K)
    x, hx = torch.randn(3, 8), (torch.randn(3, 16), torch.randn(3, 16))
    fused_mode(True)
    with_grad = cell(x, hx)
    gates, c = torch.randn(K, 3, 4 * 16 // K), torch.randn(K, 3, 16 // K)
    before = gates.clone()
    with torch.no_grad():
        monkeypatch.setattr(steps.FusedLSTMCellFunction, "apply", None)  # fails if called
        no_grad = cell(x, hx)
        pointwise = steps.cell_pointwise(gates, c)
    assert all(v.grad_fn is None for v in no_grad)
    assert_close(list(no_grad), list(with_grad), 0.0)
    assert torch.equal(gates, before)
    assert_close(list(pointwise), list(steps.lstm_cell(gates, c)), 2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_runs_the_fused_path_in_float32(fused_mode, monkeypatch, dtype):
    """float16/bfloat16 modules (fairseq --fp16) take the fused path in float32: outputs equal the float32 run of
    the same (rounded) weights cast to the half dtype, gradients reach the half parameters in their dtype."""
    from grnn_fairseq.modules import fused_group_lstm as fgl

    calls = []
    real = fgl.fused_group_lstm_direction
    monkeypatch.setattr(group_lstm, "fused_group_lstm_direction", lambda *a: calls.append(a[0].dtype) or real(*a))
    module, x, hx = make_case(2, torch.float32, True, True, True)
    half = GroupLSTM(C, H, num_layers=2, groups=2, bidirectional=True).to(dtype)
    half.load_state_dict(module.state_dict())
    module.load_state_dict(half.float().state_dict())  # the float32 twin holds the same rounded weights
    half.to(dtype)
    xh, hxh = x.to(dtype), tuple(v.to(dtype) for v in hx)
    y, (h, c) = half(xh.requires_grad_(True), hxh, lengths=torch.tensor([5, 2, 4]))
    y.float().sum().backward()
    assert y.dtype == h.dtype == c.dtype == dtype
    assert calls and all(d == torch.float32 for d in calls)
    assert all(p.grad is not None and p.grad.dtype == dtype for p in half.parameters())
    want, _ = module(xh.float(), tuple(v.float() for v in hxh), lengths=torch.tensor([5, 2, 4]))
    assert torch.allclose(y.float(), want.to(dtype).float(), atol=1e-2)


def test_autocast_runs_the_fused_path_in_float32(fused_mode, monkeypatch):
    """fairseq --amp (autocast): the fused path still runs, in float32, with the float32 result."""
    calls = []
    real = group_lstm.fused_group_lstm_direction
    monkeypatch.setattr(group_lstm, "fused_group_lstm_direction", lambda *a: calls.append(1) or real(*a))
    module, x, hx = make_case(2, torch.float32, False, True, True)
    want, _ = module(x, hx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = module(x, hx)
    assert calls == [1, 1, 1, 1] and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6)
