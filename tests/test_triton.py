"""The Triton step kernels (grnn_fairseq/modules/triton_step.py) against the PyTorch-operations step (``TorchStep``,
the semantics to match) and the reference paths: outputs, h_n, c_n and every gradient.

Here they run on Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` with ``step="triton"``), at tiny
sizes; the tests marked ``cuda`` run the compiled kernels on a GPU (``scripts/gpu-check.sh``) and skip without
one. The interpreter has no bfloat16 products (the kernels cast their operands to float32 there) and rounds
float32 to bfloat16 towards zero: the half-precision tolerances cover that.
"""

import copy
import functools
import itertools

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels' tests need triton (pip install -e '.[test]')")

from grnn_fairseq.modules import backend, group_lstm, steps, triton_step  # noqa: E402
from grnn_fairseq.modules.fused_group_lstm import fused_group_lstm_direction  # noqa: E402
from grnn_fairseq.modules.group_lstm import GroupLSTM, GroupLSTMCell, group_lstm_reference  # noqa: E402

from conftest import Dispatched, device_waits  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# relative error bounds against float32 PyTorch operations on the same (rounded) inputs
HALF_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def interpreter(request, monkeypatch):
    """CPU tensors go to the Triton step (on its interpreter) where a test asks for step="triton"; the GPU tests
    run without the variable (Triton's compiler reads it too)."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton kernels' launches by kernel name ("forward", "backward"), through Triton's JIT or
    straight through a compiled variant's launcher."""
    counts = {"forward": 0, "backward": 0}
    real = triton_step.StepLauncher.__call__

    def counted(self, key, t, make_args):
        counts[self.kernel.fn.__name__.split("_")[1]] += 1  # _forward_kernel -> forward
        return real(self, key, t, make_args)

    monkeypatch.setattr(triton_step.StepLauncher, "__call__", counted)
    return counts


def layer_case(T, B, I, H, K, dtype=torch.float32, device="cpu", padded=False, dropout=False, seed=0):
    """One layer's inputs (x, h0, c0, w_ih, w_hh, b_ih, b_hh), lengths (a full-length and shorter sequences, or
    None) and a recurrent dropout mask (B x H, or None), drawn in float32 and cast."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype=dtype, device=device)

    s = 2.0 / H**0.5
    G4 = 4 * H // K
    tensors = [rnd(T, B, I), rnd(B, H), rnd(B, H), rnd(K, G4, I // K, scale=s), rnd(K, G4, H // K, scale=s),
               rnd(K, G4, scale=0.3), rnd(K, G4, scale=0.3)]  # fmt: skip
    lengths = None
    if padded:
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[0] = T
        lengths = lengths.to(device)
    rmask = None
    if dropout:
        rmask = ((torch.rand(B, H, generator=gen) > 0.3).float() / 0.7).to(dtype=dtype, device=device)
    return tensors, lengths, rmask


def run_layer(step, tensors, shuffle, lengths, rmask, reads="all", graphs=False, persistent=False):
    """Outputs, h_n, c_n and the gradients of all seven inputs of one weighted-sum loss, on ``step``; K = 1
    stays on the step (no aten LSTM). reads: what the loss reads, "all", "final" (h_n and c_n: no output
    gradient) or "output" (no final-state gradients).
    graphs, persistent: the backend's cuda_graphs and persistent_loops."""
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
    with backend.use(step=step, cuda_graphs=graphs, persistent_loops=persistent):
        if step != "torch":  # the kernels must run, or the comparison would be of TorchStep with itself
            assert steps.step_kind(inputs[0]) == "triton"
        out, h_n, c_n = fused_group_lstm_direction(*inputs, shuffle, lengths, rmask, aten_at_one_group=False)
        gen = torch.Generator().manual_seed(1)
        loss = sum((v.float() * torch.randn(v.shape, generator=gen).to(v.device)).sum()
                   for v in {"all": (out, h_n, c_n), "final": (h_n, c_n), "output": (out,)}[reads])  # fmt: skip
        grads = torch.autograd.grad(loss, inputs)
    return [out, h_n, c_n, *grads]


def assert_close(got, want, tol, relative=False):
    """Every tensor finite and within ``tol``: of the largest absolute difference, or with ``relative`` of
    ||got - want|| / ||want|| (the measure for half precision, whose rounding scales with the values)."""
    assert len(got) == len(want)
    for n, (a, b) in enumerate(zip(got, want)):
        assert a is not None and b is not None, f"missing tensor #{n}"
        assert a.shape == b.shape, f"tensor #{n}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        assert torch.isfinite(a).all(), f"tensor #{n} has non-finite values"
        err = ((a - b).norm() / b.norm()).item() if relative else (a - b).abs().max().item()
        assert err <= tol, f"tensor #{n} differs by {err:.3g} ({'relative' if relative else 'absolute'})"


# ------------------------------------------------------------------------------------ on the interpreter

LAYER_CASES = [(1, False)] + list(itertools.product([2, 4], [False, True]))  # K, shuffle (K = 1 has none)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("K,shuffle", LAYER_CASES)
def test_float32_layer_matches_pytorch_step(K, shuffle, padded):
    """float32: the Triton kernels against TorchStep, every gradient; padding comes with recurrent dropout."""
    tensors, lengths, rmask = layer_case(5, 3, 8, 16, K, padded=padded, dropout=padded)
    got = run_layer("triton", tensors, shuffle, lengths, rmask)
    want = run_layer("torch", tensors, shuffle, lengths, rmask)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("reads", ["final", "output"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_one_kind_of_gradient_only(shuffle, reads):
    """No output gradient (d_out None): h_n's and c_n's gradients enter at each sequence's last step; no
    final-state gradients (d_hn and d_cn None): the output's alone."""
    tensors, lengths, rmask = layer_case(5, 3, 8, 16, 2, padded=True)
    got = run_layer("triton", tensors, shuffle, lengths, rmask, reads)
    want = run_layer("torch", tensors, shuffle, lengths, rmask, reads)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_tile_edges(dtype):
    """Sizes that are not multiples of the tiles: two row tiles (B = 20), two unit tiles and two contraction
    chunks with partial last ones (H/K = 24), the shuffle's groups crossing unit tiles (H/K/K = 12)."""
    tensors, lengths, rmask = layer_case(3, 20, 48, 48, 2, dtype=dtype, padded=True, dropout=True)
    got = run_layer("triton", tensors, True, lengths, rmask)
    want = run_layer("torch", [t.float() for t in tensors], True, lengths, None if rmask is None else rmask.float())
    if dtype == torch.float32:
        assert_close(got, want, 1e-5)
    else:
        assert_close(got, want, HALF_TOL[dtype], relative=True)


HALF_CASES = [(torch.bfloat16, 1, False), (torch.bfloat16, 2, False), (torch.bfloat16, 2, True),
              (torch.bfloat16, 4, True), (torch.float16, 2, True)]  # fmt: skip


@pytest.mark.parametrize("dtype,K,shuffle", HALF_CASES)
def test_half_layer_matches_float32(dtype, K, shuffle, monkeypatch):
    """float16/bfloat16 stay in their dtype on the Triton step (products on half operands, C, Q, QC, F in
    float32): outputs and gradients in the half dtype, close to float32 PyTorch operations on the same values."""
    seen = []
    real_init = triton_step.TritonStep.__init__

    def init(self, buf, forward, graphs=False):
        seen.append((buf.x.dtype, buf.R.dtype, buf.C.dtype if forward else buf.DG.dtype, buf.Q.dtype))
        real_init(self, buf, forward, graphs)

    monkeypatch.setattr(triton_step.TritonStep, "__init__", init)
    tensors, lengths, rmask = layer_case(5, 3, 8, 16, K, dtype=dtype, padded=True, dropout=True)
    got = run_layer("triton", tensors, shuffle, lengths, rmask)
    assert all(v.dtype == dtype for v in got)
    assert seen == [(dtype, dtype, torch.float32, torch.float32), (dtype, dtype, dtype, torch.float32)]
    want = run_layer("torch", [t.float() for t in tensors], shuffle, lengths, rmask.float())
    assert_close(got, want, HALF_TOL[dtype], relative=True)


@pytest.mark.parametrize("K,shuffle_time,shuffle_layers", [(2, False, False), (2, True, False), (2, False, True),
                                                           (4, True, True)])  # fmt: skip
def test_module_matches_reference(fused_mode, K, shuffle_time, shuffle_layers):
    """A two-layer bidirectional GroupLSTM with padding on the Triton step, each shuffle on and off, against
    the readable autograd path and ``group_lstm_reference``."""
    torch.manual_seed(0)
    module = GroupLSTM(8, 16, num_layers=2, groups=K, bidirectional=True, shuffle_time=shuffle_time,
                       shuffle_layers=shuffle_layers).eval()  # fmt: skip
    x, lengths = torch.randn(4, 3, 8), torch.tensor([4, 2, 3])

    def run(fn):
        module.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_(True)
        y, (h, c) = fn(module, xs, None, lengths)
        (y.sum() + (h * h).sum() + c.sum()).backward()
        return [y, h, c, xs.grad] + [p.grad for p in module.parameters()]

    def module_call(m, xs, hx, lens):
        return m(xs, hx, lengths=lens)

    fused_mode(step="triton")
    assert steps.step_kind(x) == "triton"
    got = run(module_call)
    fused_mode(False)
    assert_close(got, run(module_call), 1e-5)
    assert_close(got, run(group_lstm_reference), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_module_stays_half_on_triton(fused_mode, monkeypatch, dtype):
    """fairseq --fp16/--bf16 (a half module): the dispatch hands the fused path half tensors, no up-cast; the
    parameters' gradients come back in their dtype."""
    torch.manual_seed(0)
    module = GroupLSTM(8, 16, num_layers=2, groups=2).eval()
    x = torch.randn(4, 3, 8)
    want, _ = module(x, lengths=torch.tensor([4, 2, 3]))
    calls = []
    real = group_lstm.fused_group_lstm_direction
    monkeypatch.setattr(group_lstm, "fused_group_lstm_direction", lambda *a: calls.append(a[0].dtype) or real(*a))
    fused_mode(step="triton")
    module.to(dtype)
    assert steps.step_kind(x.to(dtype)) == "triton"
    y, (h, c) = module(x.to(dtype).requires_grad_(True), lengths=torch.tensor([4, 2, 3]))
    y.float().sum().backward()
    assert calls == [dtype, dtype] and y.dtype == h.dtype == c.dtype == dtype
    assert all(p.grad is not None and p.grad.dtype == dtype for p in module.parameters())
    assert_close([y], [want], HALF_TOL[dtype] * 2, relative=True)  # rounded weights too


def test_autocast_runs_half_on_triton(fused_mode, monkeypatch):
    """Autocast (fairseq --amp): on the Triton step the layer runs in autocast's dtype, as cuDNN's LSTM does."""
    torch.manual_seed(0)
    module = GroupLSTM(8, 16, groups=2).eval()
    x = torch.randn(4, 3, 8)
    want, _ = module(x)
    calls = []
    real = group_lstm.fused_group_lstm_direction
    monkeypatch.setattr(group_lstm, "fused_group_lstm_direction", lambda *a: calls.append(a[0].dtype) or real(*a))
    fused_mode(step="triton")
    assert steps.step_kind(x) == "triton"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = module(x)
    assert calls == [torch.bfloat16] and got.dtype == torch.bfloat16
    assert_close([got], [want], 2 * HALF_TOL[torch.bfloat16], relative=True)


def test_every_step_runs_on_the_kernels(launches):
    """One forward launch per step and one backward launch per step plus the last recurrent product; nothing
    falls back to PyTorch operations."""
    tensors, lengths, rmask = layer_case(5, 3, 8, 16, 2, padded=True, dropout=True)
    run_layer("triton", tensors, True, lengths, rmask)
    assert launches == {"forward": 5, "backward": 6}
    with torch.no_grad(), backend.use(step="triton"):
        fused_group_lstm_direction(*tensors, True, lengths, rmask)
    assert launches["forward"] == 10


@pytest.fixture
def direct_launches(monkeypatch):
    """StepLauncher's direct launches on CPU tensors: Triton's JIT launch is the interpreter's, returning a
    stand-in for the compiled variant whose launcher runs the interpreter on the arguments it is given (by
    position, as Triton's compiled launcher takes them). Counts the launches of each kind."""
    counts = {"jit": 0, "direct": 0}
    real = triton_step._kernel

    class Compiled:  # what a CUDA JIT launch returns: .run, .function, .packed_metadata
        function, packed_metadata = "function", "metadata"

        def __init__(self, kernel, options):
            self.kernel, self.options = kernel, options

        def run(self, g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
            assert (stream, function, packed_metadata) == ("stream", "function", "metadata")
            assert launch_metadata is None and enter_hook is None and exit_hook is None
            counts["direct"] += 1
            named = dict(zip(triton_step._parameters(self.kernel.fn), args))
            self.kernel[(g0, g1, g2)](**named, **self.options)

    class Jit:
        def __init__(self, name, interpreted):
            self.kernel = real(name, interpreted)
            self.fn = self.kernel.fn

        def __getitem__(self, grid):
            def launch(**kwargs):
                counts["jit"] += 1
                options = {k: v for k, v in kwargs.items() if k not in triton_step._parameters(self.fn)}
                self.kernel[grid](**kwargs)
                return Compiled(self.kernel, options)

            return launch

    monkeypatch.setattr(triton_step, "_kernel", functools.lru_cache(maxsize=None)(Jit))  # one per kernel, as real
    monkeypatch.setattr(triton_step, "_VARIANTS", {})
    monkeypatch.setattr(triton_step, "_direct_launch_supported", lambda device: True)
    monkeypatch.setattr(triton_step, "_current_stream", lambda device: "stream")
    monkeypatch.setitem(triton_step._DIRECT_LAUNCH, "broken", None)
    return counts


@pytest.mark.parametrize("reads", ["all", "final"])
def test_direct_launches_match_jit_launches(direct_launches, reads):
    """After the first launch of each argument set, a loop's steps call the compiled variant's launcher with
    the bound arguments, t replaced: the same outputs and gradients as launching every step through the JIT
    (padding, recurrent dropout, final-state gradients entering mid-loop, which switch the output gradient to
    the step's own copy)."""
    tensors, lengths, rmask = layer_case(5, 3, 8, 16, 2, padded=True, dropout=True)
    got = run_layer("triton", tensors, True, lengths, rmask, reads)
    counts = dict(direct_launches)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(triton_step, "_direct_launch_supported", lambda device: False)
        want = run_layer("triton", tensors, True, lengths, rmask, reads)
    assert_close(got, want, 0.0)
    # forward: 1 JIT launch, then 4 direct; backward: its first step (no step t+1), the second (the first with
    # one) and the last product (dr_0) through the JIT, the other 3 steps direct
    assert counts == {"jit": 4, "direct": 7}
    # a second call of these shapes finds every argument set's variant from the first: no JIT launch
    before = dict(direct_launches)
    again = run_layer("triton", tensors, True, lengths, rmask, reads)
    assert_close(again, want, 0.0)
    assert direct_launches == {"jit": before["jit"], "direct": before["direct"] + 11}


def test_cell_launches_directly_from_its_second_call(direct_launches):
    """GroupLSTMCell's steps (new tensors at every call) launch through the JIT once per argument
    specialization: from the second step on, the forward and backward call the variant the first found, also
    at another batch size on another grid, with the same numbers as JIT launches; strides that are multiples
    of 16, or gates whose address is not, go through the JIT again."""
    K, Hk = 2, 8

    def step(B, offset=0, seed=0):  # gates at ``offset`` elements into their buffer
        gen = torch.Generator().manual_seed(seed)
        gates = torch.randn(K * B * 4 * Hk + offset, generator=gen)[offset:].view(K, B, 4 * Hk).requires_grad_(True)
        c = torch.randn(K, B, Hk, generator=gen).requires_grad_(True)
        h, c_new = triton_step.triton_cell(gates, c)
        dh, dc = torch.randn(K, B, Hk, generator=gen), torch.randn(K, B, Hk, generator=gen)
        return [h, c_new, *torch.autograd.grad((h * dh).sum() + (c_new * dc).sum(), (gates, c))]

    # B, offset, seed: B * Hk (the strides) is a multiple of 16 at B=4 only; B=21 takes two row tiles
    runs = [(3, 0, 0), (3, 0, 1), (3, 0, 2), (21, 0, 3), (4, 0, 4), (4, 1, 5)]
    got, counts = [], []
    for run in runs:
        got.append(step(*run))
        counts.append(dict(direct_launches))
    assert counts == [{"jit": 2, "direct": 0}, {"jit": 2, "direct": 2}, {"jit": 2, "direct": 4},
                      {"jit": 2, "direct": 6}, {"jit": 4, "direct": 6},
                      {"jit": 5, "direct": 7}]  # the last: its backward's tensors are aligned  # fmt: skip
    assert not [v for key in triton_step._VARIANTS for v in key[-1] if isinstance(v, torch.Tensor)]  # none kept
    with pytest.MonkeyPatch.context() as m:
        m.setattr(triton_step, "_direct_launch_supported", lambda device: False)
        for run, mine in zip(runs, got):
            assert_close(mine, step(*run), 0.0)


def test_persistent_loops_launch_directly_from_their_second_call(direct_launches):
    """The loop kernels (one launch per loop) and dr_0's product find the first call's variants at the
    second call of the same shapes, with the same numbers."""
    tensors, lengths, rmask = layer_case(4, 3, 8, 16, 2, padded=True, dropout=True)
    first = run_layer("triton", tensors, True, lengths, rmask, persistent=True)
    assert direct_launches == {"jit": 3, "direct": 0}
    second = run_layer("triton", tensors, True, lengths, rmask, persistent=True)
    assert direct_launches == {"jit": 3, "direct": 3}
    assert_close(second, first, 0.0)


def test_launch_options(monkeypatch):
    """Every launch asks for fused multiply-adds (what the kernels were measured with, whatever the installed
    Triton's default); the loop kernels, and only they, for a cooperative launch (every program at once, or an
    error)."""
    seen = []
    real = triton_step.StepLauncher.__call__

    def record(self, key, t, make_args):
        seen.append((self.kernel.fn.__name__, dict(self.options)))
        return real(self, key, t, make_args)

    monkeypatch.setattr(triton_step.StepLauncher, "__call__", record)
    tensors, lengths, rmask = layer_case(4, 3, 8, 16, 2, padded=True, dropout=True)
    run_layer("triton", tensors, True, lengths, rmask, persistent=True)
    run_layer("triton", tensors, True, lengths, rmask)
    gates = torch.randn(2, 3, 32, requires_grad=True)
    h, c = triton_step.triton_cell(gates, torch.randn(2, 3, 8))
    h.sum().backward()
    kernels = {name for name, _ in seen}
    assert kernels == {"_forward_kernel", "_backward_kernel", "_forward_loop_kernel", "_backward_loop_kernel"}
    for name, options in seen:
        assert options["enable_fp_fusion"] is True and options["num_warps"] >= 1
        assert options.get("launch_cooperative_grid", False) is ("loop" in name)


def test_a_failed_loop_launch_names_the_flag(monkeypatch):
    """A loop launch the driver refuses (a cooperative grid it cannot run at once) stops with the flag named."""

    def refuse(self, key, t, make_args):
        if "loop" in self.kernel.fn.__name__:
            raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    monkeypatch.setattr(triton_step.StepLauncher, "__call__", refuse)
    tensors, lengths, rmask = layer_case(4, 3, 8, 16, 2)
    with pytest.raises(RuntimeError, match="--grnn-persistent-loops: launching the forward_loop kernel .* too many"):
        run_layer("triton", tensors, True, lengths, rmask, persistent=True)


def test_variant_key_holds_what_triton_specializes_on():
    """Two launches with one ``_variant_key`` get one compiled variant from the installed Triton: its JIT's
    binder for CUDA (Hopper) gives them the same specialization, over argument sets that vary every tensor's
    dtype and alignment, the sizes, the step index and the flags; and a step's key is the same at every t."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = triton_step._kernel("forward", False)  # what CUDA tensors launch
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    params, positions = triton_step._parameters(kernel.fn), triton_step._runtime_positions(kernel.fn)
    gen = torch.Generator().manual_seed(0)
    buffer = {dt: torch.empty(64, dtype=dt) for dt in (torch.float32, torch.bfloat16)}

    def pick(options):
        return options[torch.randint(len(options), (1,), generator=gen).item()]

    def options(i, kp):  # pointers, then integers from t on, then constexpr flags and tile sizes
        if kp.is_constexpr:
            return [16, 32] if kp.name.startswith("BLOCK") else ["ieee"] if kp.name == "PRECISION" else [True, False]
        if i >= params.index("t"):
            return [0, 1, 2, 15, 16, 17, 48, 2**31 - 1, 2**31]
        return [None] + [buffer[dt][offset:] for dt in buffer for offset in (0, 1, 2, 4, 8)]

    # arguments drawn at random, and each one's every option with the others held: the same key must get
    # the same specialization
    triton_of = {}
    for _ in range(30):
        drawn = [pick(options(i, kp)) for i, kp in enumerate(kernel.params)]
        for i, kp in enumerate(kernel.params):
            for value in options(i, kp):
                values = drawn[:i] + [value] + drawn[i + 1:]
                key = triton_step._variant_key(values, positions)
                specialization = binder(**dict(zip(params, values)))[1]
                assert triton_of.setdefault(key, specialization) == specialization, (params[i], key[i])
    assert len(triton_of) > 1000
    # a loop's steps, and a later call's fresh tensors: one key
    t = params.index("t")
    keys = set()
    for step in (0, 1, 2, 35):
        fresh = [torch.empty(16) if isinstance(v, torch.Tensor) else v for v in drawn]
        keys.add(triton_step._variant_key(fresh[:t] + [step] + fresh[t + 1:], positions))
    assert len(keys) == 1


def test_direct_launches_follow_the_installed_triton():
    """The convention StepLauncher repeats is the installed Triton's: its JIT launch passes the compiled
    variant's launcher the grid, the stream, the variant's function and metadata, the launch metadata and hooks,
    then every bound argument in parameter order; direct launches are off on CPU tensors and while a launch
    hook is set."""
    import inspect

    from triton.runtime.jit import JITFunction

    source = " ".join(inspect.getsource(JITFunction.run).split())
    assert ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
            "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())") in source
    cuda = torch.device("cuda", 0)
    assert triton_step._direct_launch_supported(cuda) and not triton_step._direct_launch_supported(torch.device("cpu"))
    hooks = triton.knobs.runtime.launch_enter_hook

    def hook(metadata):
        pass

    hooks.add(hook)
    try:
        assert not triton_step._direct_launch_supported(cuda)
    finally:
        hooks.remove(hook)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_cell_matches_pytorch_cell(fused_mode, launches, dtype, K):
    """GroupLSTMCell on the Triton cell kernels against PyTorch operations over two chained steps: h', c' and
    the gradients of the input, h, c and every parameter, from losses on h and c, on h only and on c only."""
    torch.manual_seed(0)
    cell = GroupLSTMCell(8, 16, groups=K).to(dtype)
    x = torch.randn(2, 3, 8).to(dtype)
    hx = (torch.randn(3, 16).to(dtype), torch.randn(3, 16).to(dtype))

    def run(step, loss_of, dt):  # the reference in float32 on the same (rounded) values
        fused_mode(step=step)
        cell.to(dt).zero_grad(set_to_none=True)
        xs = x.to(dt, copy=True).requires_grad_(True)
        h0, c0 = (v.to(dt, copy=True).requires_grad_(True) for v in hx)
        h, c = cell(xs[0], (h0, c0))
        h, c = cell(xs[1], (h, c))
        loss_of(h.float(), c.float()).backward()
        return [h, c, xs.grad, h0.grad, c0.grad] + [p.grad for p in cell.parameters()]

    for loss_of in (lambda h, c: (1.5 * h).sum() + (c * c).sum(), lambda h, c: (h * h).sum(), lambda h, c: c.sum()):
        got = run("triton", loss_of, dtype)
        assert all(v.dtype == dtype for v in got)
        want = run("torch", loss_of, torch.float32)
        if dtype == torch.float32:
            assert_close(got, want, 1e-5)
        else:
            assert_close(got, want, HALF_TOL[dtype], relative=True)
    assert launches == {"forward": 6, "backward": 6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cell_backward_is_one_launch(monkeypatch, dtype):
    """The cell's backward reads dc_t in its own dtype and writes dc_{t-1} in c's: around its one launch it
    allocates and copies or casts nothing (on a GPU every copy is a launch per decoder step), and its
    gradients equal those of PyTorch operations."""
    in_launch, launched = [False], []
    real = triton_step.StepLauncher.__call__

    def launch(self, key, t, make_args):  # the interpreter's own operators are not the step's
        launched.append(self.kernel.fn.__name__)
        in_launch[0] = True
        try:
            return real(self, key, t, make_args)
        finally:
            in_launch[0] = False

    class Outside(Dispatched):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if in_launch[0]:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    monkeypatch.setattr(triton_step.StepLauncher, "__call__", launch)
    gen = torch.Generator().manual_seed(0)
    gates, c = (torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True) for shape in ((2, 3, 32), (2, 3, 8)))
    h, c_new = triton_step.triton_cell(gates, c)
    dh, dc = torch.randn(2, 3, 8, generator=gen).to(dtype), torch.randn(2, 3, 8, generator=gen).to(dtype)
    launched.clear()
    with Outside() as ops:
        got = torch.autograd.grad((h, c_new), (gates, c), (dh, dc))
    assert launched == ["_backward_kernel"] and sorted(ops.names) == ["empty", "empty"]  # dgates, dc_{t-1}
    assert [g.dtype for g in got] == [dtype, dtype]
    want = torch.autograd.grad(steps.lstm_cell(gates.float(), c.float()), (gates, c), (dh.float(), dc.float()))
    assert_close(got, want, 1e-5 if dtype == torch.float32 else HALF_TOL[dtype], relative=dtype != torch.float32)


@pytest.mark.parametrize("reads", ["all", "final", "output"])
def test_loop_graph_buffers_match_eager(reads):
    """cuda_graphs on the interpreter: the loops run on LoopGraphs' own buffers (the copies in and out, dh_n and
    dc_n entering at each row's last step through the float32 output gradient and DC) and give the eager loops'
    numbers, with padding, the shuffle and recurrent dropout, on the first call and on a key seen before."""
    triton_step.LOOP_GRAPHS.clear()
    tensors, lengths, rmask = layer_case(5, 6, 8, 16, 2, padded=True, dropout=True)
    want = run_layer("triton", tensors, True, lengths, rmask, reads)
    for _ in range(2):
        got = run_layer("triton", tensors, True, lengths, rmask, reads, graphs=True)
        assert_close(got, want, 1e-6)
    assert triton_step.LOOP_GRAPHS.seen and not triton_step.LOOP_GRAPHS.graphs  # nothing is captured on CPU


@pytest.mark.parametrize("reads", ["all", "final", "output"])
@pytest.mark.parametrize("T,B,H,K,shuffle", [(5, 3, 16, 1, False), (5, 3, 16, 4, False), (5, 3, 16, 4, True),
                                             (4, 20, 64, 2, True)])  # the last: 2 row tiles x 2 unit tiles
def test_persistent_loops_match_pytorch_step(launches, T, B, H, K, shuffle, reads):
    """persistent_loops on the interpreter (one program, which computes every tile of a step and passes the
    grid barrier alone): a launch for the forward loop, one for the backward loop and dr_0's, and TorchStep's
    numbers, with padding, recurrent dropout and the final states' gradients entering at each row's last step
    (dh_n through the output gradient, dc_n through DC_ADD); persistent_loops before cuda_graphs."""
    tensors, lengths, rmask = layer_case(T, B, 16, H, K, padded=True, dropout=True)
    got = run_layer("triton", tensors, shuffle, lengths, rmask, reads, graphs=True, persistent=True)
    assert launches == {"forward": 1, "backward": 2}
    want = run_layer("torch", tensors, shuffle, lengths, rmask, reads)
    assert_close(got, want, 1e-5)


def test_persistent_loops_in_bfloat16():
    """bfloat16 inputs on the persistent loops: the per-step launches' numbers (the same arithmetic)."""
    tensors, lengths, rmask = layer_case(4, 20, 16, 64, 2, torch.bfloat16, padded=True, dropout=True)
    want = run_layer("triton", tensors, True, lengths, rmask)
    got = run_layer("triton", tensors, True, lengths, rmask, persistent=True)
    assert_close(got, want, 1e-6, relative=True)


@pytest.mark.parametrize("persistent", [False, True], ids=["steps", "persistent"])
@pytest.mark.parametrize("K", [1, 4])
def test_padded_stack_never_waits_for_the_device(K, persistent):
    """What a GPU runs, on the interpreter: a padded GroupLSTM (two bidirectional layers, a sequence of length 0,
    a loss of the outputs and of h_n and c_n) on the Triton step reads no tensor back to the host in its forward
    or backward pass (on a GPU each read waits for every queued kernel), and equals the PyTorch step."""
    torch.manual_seed(0)
    module = GroupLSTM(8, 16, num_layers=2, groups=K, bidirectional=True)
    x, h0 = torch.randn(5, 3, 8), torch.randn(4, 3, 16)
    lengths = torch.tensor([5, 0, 3])
    results = []
    for step in ("triton", "torch"):
        inputs = [v.clone().requires_grad_(True) for v in (x, h0, h0)]
        with backend.use(step=step, persistent_loops=persistent), device_waits() as waits:
            y, (h, c) = module(inputs[0], tuple(inputs[1:]), lengths=lengths)
            loss = (y * y).sum() + (h * c).sum() + c.sum()
            grads = torch.autograd.grad(loss, inputs + list(module.parameters()))
        if step == "triton":
            assert waits == [], waits
        results.append([y, h, c, *grads])
    assert_close(*results, 1e-5)


def test_translation_step_never_waits_for_the_device(launches):
    """The translation recipe's model (4 groups, residual decoder, Luong's attention) on the Triton step, as a GPU
    trains it, on the interpreter: a padded batch's forward and backward read nothing back to the host."""
    from test_group_rnnsearch import RESIDUAL, tiny, training_step_waits

    waits = training_step_waits(tiny(4, "luong", *RESIDUAL, "--grnn-step", "triton").float().train())
    assert waits == [], waits
    assert launches["forward"] > 0 and launches["backward"] > 0


def test_loop_graphs_decide_per_key():
    """On CUDA a key's first occurrence runs eagerly on the call's own buffers; the second goes through the graph's
    buffers (its capture is due), as does every call once a graph is held, unless its capture failed; on CPU
    every call goes through them. The occurrence counts keep the most recent max_seen keys."""
    graphs = triton_step.LoopGraphs(max_graphs=2, max_seen=3)
    assert [graphs.begin("a", cuda=True) for _ in range(3)] == [False, True, True]
    graphs.failed.add("b")
    assert [graphs.begin("b", cuda=True) for _ in range(2)] == [False, False]
    graphs.graphs["c"] = ("step", "graph")
    assert graphs.begin("c", cuda=True)
    assert graphs.begin("d", cuda=False)
    assert list(graphs.seen) == ["b", "c", "d"]  # "a", the least recently seen, dropped
    assert not graphs.begin("a", cuda=True)


def test_step_kind_resolution(monkeypatch):
    """auto takes Triton for CUDA tensors of float32, bfloat16 and float16 only; an explicit "triton" takes CPU
    tensors only on the interpreter, never float64 (PyTorch operations run those)."""
    with backend.use(step="triton"):
        assert steps.step_kind(torch.zeros(1)) == "triton"
        assert steps.step_kind(torch.zeros(1, dtype=torch.bfloat16)) == "triton"
        assert steps.step_kind(torch.zeros(1, dtype=torch.float64)) == "torch"
        monkeypatch.delenv("TRITON_INTERPRET")
        assert steps.step_kind(torch.zeros(1)) == "torch"
        monkeypatch.setattr(steps, "triton_available", lambda: False)
        with pytest.raises(RuntimeError, match="--grnn-step triton: Triton is not installed"):
            steps.step_kind(torch.zeros(1))
    with backend.use(step="auto"):
        assert steps.step_kind(torch.zeros(1, dtype=torch.bfloat16)) == "torch"  # no CUDA, no interpreter


def test_separate_input_projections_are_copied(launches):
    """oneDNN's input projections (CPU, products="onednn") are separate tensors, not the slices of one buffer the
    kernels index: the step copies them into one, and the layer equals the PyTorch step's."""
    if not backend.onednn_usable(torch.zeros(1)):
        pytest.skip("this torch has no oneDNN linear")
    tensors, lengths, rmask = layer_case(5, 3, 8, 16, 2, padded=True)
    with backend.use(products="onednn"):
        got = run_layer("triton", tensors, True, lengths, rmask)
    assert launches["forward"] > 0
    assert_close(got, run_layer("torch", tensors, True, lengths, rmask), 1e-5)


def test_bad_buffers_are_refused():
    """The kernels compute addresses from the sizes: a buffer of another dtype or layout is an error naming it."""
    tensors, _, _ = layer_case(3, 2, 8, 16, 2)
    x = tensors[0]
    K, T, B, Hk = 2, 3, 2, 8
    R = x.new_zeros(K, T + 1, B, Hk)
    C = x.new_zeros(K, T + 1, B, Hk)
    G = x.new_zeros(K, T * B, 4 * Hk)
    buf = steps.StepBuffers(x=x, K=K, T=T, B=B, Hk=Hk, shuffle=True, R=R, C=C, w_hh=x.new_zeros(K, 4 * Hk, Hk),
                            G=[g.view(T, B, 4 * Hk) for g in G], out=x.new_empty(T, B, K * Hk))  # fmt: skip
    triton_step.TritonStep(buf, forward=True)  # the layout the fused path makes
    with pytest.raises(ValueError, match="Triton step: C must be torch.float32"):
        triton_step.TritonStep(steps.StepBuffers(**{**buf.__dict__, "C": C.double()}), forward=True)
    strided = R.transpose(2, 3).contiguous().transpose(2, 3)  # the same shape, another layout
    with pytest.raises(ValueError, match="Triton step: R must be contiguous"):
        triton_step.TritonStep(steps.StepBuffers(**{**buf.__dict__, "R": strided}), forward=True)
    with pytest.raises(ValueError, match="inputs must be float32, bfloat16 or float16"):
        triton_step.TritonStep(steps.StepBuffers(**{**buf.__dict__, "x": x.double()}), forward=True)


def test_tile_rule():
    """The interpreter takes the smallest tiles; on a GPU, tiles are at least tl.dot's 16, powers of two, at
    most 64 rows and 32 units, shrink until the grid has a program per multiprocessor where they can, and
    have at most 32 forward and 64 backward tile elements per thread."""
    assert triton_step.tile_sizes(64, 4, 256, True, None) == triton_step.Tiles(16, 16, 16, 16, 16, 4, 4)
    for B, K, Hk, sms in itertools.product([3, 64, 128], [1, 4, 16], [16, 64, 256, 1024], [132]):
        t = triton_step.tile_sizes(B, K, Hk, True, sms)
        for size in (t.BLOCK_B, t.BLOCK_J, t.BLOCK_U, t.BLOCK_R, t.BLOCK_N):
            assert 16 <= size <= 64 and size & (size - 1) == 0
        assert t.BLOCK_J == t.BLOCK_R <= 32
        programs = K * -(-B // t.BLOCK_B) * -(-Hk // t.BLOCK_J)
        assert programs >= sms or t.BLOCK_J == 16 and t.BLOCK_B <= (32 if B >= 32 else 16)
        assert t.BLOCK_B * t.BLOCK_J <= 32 * 32 * t.forward_warps and t.BLOCK_B * t.BLOCK_J <= 64 * 32 * t.backward_warps
    assert triton_step.tile_sizes(64, 1, 1024, False, 132).BLOCK_U == 32  # float32 contraction chunks


def compile_for_hopper(name, pointer_types, constants, num_warps):
    """Triton's compiler (front end, LLVM and its bundled ptxas) on one kernel variant for sm_90, no GPU needed:
    its PTX (the machine code checked non-empty)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton_step._kernel(name, False)
    signature = {a: "constexpr" if a in constants else pointer_types.get(a, "i32") for a in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                            options=triton_step._launch_options(num_warps, "loop" in name))  # fmt: skip
    assert kernel.asm["cubin"]
    return kernel.asm["ptx"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper(dtype):
    """Every variant the layer and the cell launch compiles to sm_90 machine code with the tile rule's tiles,
    at the tiles of a small and of a large configuration (what the interpreter cannot show: tl.dot's shape and
    type rules, the lowering of every operation); the loop kernels' PTX holds the grid barrier, the step
    kernels' none."""
    pytest.importorskip("triton.compiler", reason="Triton's compiler")
    for name in ("forward", "backward", "forward_loop", "backward_loop"):  # a JIT launch's cache key, which
        assert triton_step._kernel(name, False).cache_key  # hashes the device functions' sources too, resolves
    half = dtype != "fp32"
    p = "*" + dtype
    fwd = {"G": p, "R": p, "R_next": p, "W": p, "RM": p, "OUT": p, "C": "*fp32", "C_next": "*fp32", "Q": "*fp32",
           "QC": "*fp32", "F": "*fp32", "SYNC": "*i32"}  # fmt: skip
    bwd = {"DG": p, "W": p, "DY": p, "RM": p, "Q": "*fp32", "QC": "*fp32", "F": "*fp32", "DC": "*fp32",
           "DC_OUT": "*fp32", "DR": "*fp32", "DC_ADD": "*fp32", "SYNC": "*i32"}  # fmt: skip
    dot = {"UPCAST_DOT": False, "PRECISION": "ieee"}
    for B, K, Hk in ((64, 4, 256), (128, 1, 2048)):
        t = triton_step.tile_sizes(B, K, Hk, half, 132)
        ftiles = {"BLOCK_B": t.BLOCK_B, "BLOCK_J": t.BLOCK_J, "BLOCK_U": t.BLOCK_U}
        btiles = {"BLOCK_B": t.BLOCK_B, "BLOCK_R": t.BLOCK_R, "BLOCK_N": t.BLOCK_N}
        for save in (True, False):  # training, inference
            flags = {"SHUFFLE": True, "SAVE": save, "HAS_RM": save, "HAS_PRODUCT": True, "HAS_OUT": True,
                     "SCALE_G": False, **dot, **ftiles}  # fmt: skip
            unused = {} if save else {"Q": None, "QC": None, "F": None, "RM": None}
            for name in ("forward", "forward_loop"):
                assert_loop_barrier(compile_for_hopper(name, fwd, {**flags, **unused}, t.forward_warps), "loop" in name)
        for has_next, pointwise in ((True, True), (False, True), (True, False)):  # a step, the last, dr_0
            flags = {"SHUFFLE": True, "HAS_NEXT": has_next, "POINTWISE": pointwise, "HAS_DY": True, "HAS_RM": True,
                     **dot, **btiles}  # fmt: skip
            unused = {"W": None} if not has_next else ({"DR": None} if pointwise else {})
            assert_loop_barrier(compile_for_hopper("backward", bwd, {**flags, **unused}, t.backward_warps), False)
        for has_dc_add in (True, False):  # a whole backward loop, with and without the final cell state's gradient
            flags = {"SHUFFLE": True, "HAS_DY": True, "HAS_RM": True, "HAS_DC_ADD": has_dc_add, **dot, **btiles}
            unused = {} if has_dc_add else {"DC_ADD": None}
            assert_loop_barrier(compile_for_hopper("backward_loop", bwd, {**flags, **unused}, t.backward_warps), True)
    t = triton_step.tile_sizes(50, 4, 64, half, 132)  # the cell: one step, no product, no shuffle
    flags = {"SHUFFLE": False, "SAVE": True, "HAS_RM": False, "HAS_PRODUCT": False, "HAS_OUT": False, "SCALE_G": True,
             **dot, "BLOCK_B": t.BLOCK_B, "BLOCK_J": t.BLOCK_J, "BLOCK_U": t.BLOCK_U}  # fmt: skip
    unused = {"R": None, "W": None, "RM": None, "OUT": None}
    assert compile_for_hopper("forward", fwd, {**flags, **unused}, t.forward_warps)
    flags = {"SHUFFLE": False, "HAS_NEXT": False, "POINTWISE": True, "HAS_DY": True, "HAS_RM": False, **dot,
             "BLOCK_B": t.BLOCK_B, "BLOCK_R": t.BLOCK_R, "BLOCK_N": t.BLOCK_N}  # fmt: skip
    cell_bwd = {**bwd, "DC": p, "DC_OUT": p}  # dc_t read and dc_{t-1} written in c's dtype
    assert compile_for_hopper("backward", cell_bwd, {**flags, "W": None, "RM": None, "DR": None}, t.backward_warps)


def assert_loop_barrier(ptx, loop):
    """A loop kernel's PTX holds the grid barrier as CUDA's grid sync does it: one thread's (predicated)
    release-add to the counter at GPU scope and its acquire loads of it; a step kernel's has none of it. The add
    is a reduction (``red``, Triton 3.9) or an atomic whose result goes unused (``atom``, Triton 3.6, the GPU
    machines' version): the same release semantics."""
    marks = (("red.global.gpu.release.add", "atom.global.gpu.release.add"), ("ld.global.gpu.acquire",))
    lines = [line.strip() for line in ptx.splitlines() if any(m in line for mark in marks for m in mark)]
    assert all(any(m in line for line in lines for m in mark) == loop for mark in marks), lines
    assert all(line.startswith("@%p") for line in lines), lines  # on one thread


def test_cuda_benchmark_pieces_run_without_a_gpu(tmp_path):
    """What of ``benchmark --device cuda`` runs on a CPU: the grid order (the target configuration first), the
    candidates' closures (Triton on the interpreter, its loop graphs' buffers, the persistent loops, the
    PyTorch-ops step, FlashRNN's glue against a stand-in that checks the shapes of its API; the whole-call graph
    rows need CUDA), the persistent loops' row only when asked for, the figure, and the message without a GPU."""
    from grnn_fairseq import benchmark

    grid = benchmark.cuda_grid([256, 1024], [35, 100], [64], ["float32", "bfloat16"])
    assert grid[0] == (1024, 35, 64, "bfloat16") and len(set(grid)) == len(grid) == 8
    x, gy = torch.randn(3, 2, 16, requires_grad=True), torch.randn(3, 2, 16)
    calls = []

    def flashrnn(Wx, R, b, function, backend, dtype):  # FlashRNN's shapes: BTGHD, GHDP, GHD; states SBTHD
        assert (tuple(Wx.shape), tuple(R.shape), tuple(b.shape)) == ((2, 3, 4, 4, 4), (4, 4, 4, 4), (4, 4, 4))
        assert (function, backend, dtype) == ("lstm", "triton_fused", "float32")
        calls.append(dtype)
        h = torch.tanh(Wx.sum(2) + torch.einsum("ghdp->hd", R) + b.sum(0))  # B x T x K x H/K
        return torch.stack([h, h]), None

    cands = benchmark.cuda_candidates(16, 4, x, gy, flashrnn, persistent=True)
    assert [c["path"] for c in cands] == ["triton", "triton-graph", "loop-graphs", "persistent", "torch-ops", "flashrnn"]
    assert "persistent" not in [c["path"] for c in benchmark.cuda_candidates(16, 4, x, gy, None)]
    for c in cands:
        if c["path"] != "triton-graph":
            for fn in c["make"]().values():
                fn()
    assert len(calls) == 2
    rows = [{"hidden": 16, "dtype": "float32", "seq_len": 3, "batch": 2, "K": k, "path": p,
             "fwd_bwd_tok_s": 1e3 * (k or 1)} for k, p in [(None, "cudnn"), (2, "triton"), (4, "triton"), (4, "flashrnn")]]
    benchmark.plot_cuda(rows, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU on this machine"):
            benchmark.main(["--device", "cuda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
def test_gpu_check_script_says_it_needs_a_gpu():
    import subprocess
    import sys

    from conftest import ROOT

    run = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})  # fmt: skip
    assert run.returncode == 1 and "no CUDA GPU here" in run.stderr and "Nothing was run" in run.stderr


# ------------------------------------------------------------------------------------------ on a GPU

CUDA_CASES = [(1, False)] + [(K, s) for K in (2, 4, 16) for s in (False, True)]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("K,shuffle", CUDA_CASES)
def test_cuda_layer_matches_pytorch_step(K, shuffle, dtype):
    """The compiled kernels (``auto`` on CUDA) against TorchStep in float64 on the CPU, at sizes of several
    tiles (H = 256, B = 37 rows: a partial row tile), padding and recurrent dropout, every gradient."""
    tensors, lengths, rmask = layer_case(9, 37, 128, 256, K, dtype=dtype, device="cuda", padded=True, dropout=True)
    got = run_layer("auto", tensors, shuffle, lengths, rmask)
    want = run_layer("torch", [t.double().cpu() for t in tensors], shuffle, lengths.cpu(), rmask.double().cpu())
    tol = 1e-5 if dtype == torch.float32 else HALF_TOL[dtype]
    assert_close(got, want, tol, relative=True)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "fp16"])
def test_cuda_module_and_cell(dtype):
    """A two-layer bidirectional GroupLSTM and two GroupLSTMCell steps on CUDA (auto: Triton) against float64
    on the CPU: outputs and every gradient."""
    torch.manual_seed(0)
    module = GroupLSTM(64, 128, num_layers=2, groups=4, bidirectional=True).eval().double()
    cell = GroupLSTMCell(64, 128, groups=4).double()
    x, lengths = torch.randn(7, 19, 64, dtype=torch.float64), torch.randint(1, 8, (19,))
    lengths[0] = 7

    def run(m, c, device, dt):  # on copies: .to() in place would convert the other run's gradients
        m, c = copy.deepcopy(m).to(device=device, dtype=dt), copy.deepcopy(c).to(device=device, dtype=dt)
        xs = x.detach().to(device=device, dtype=dt).requires_grad_(True)  # a leaf in both runs
        y, (h, cn) = m(xs, lengths=lengths.to(device))
        h1, c1 = c(xs[0], None)
        h2, c2 = c(xs[1], (h1, c1))
        loss = y.float().sum() + (h.float() ** 2).sum() + cn.float().sum() + h2.float().sum() + (c2.float() ** 2).sum()
        loss.backward()
        return [y, h, cn, h2, c2, xs.grad] + [p.grad for p in m.parameters()] + [p.grad for p in c.parameters()]

    want = run(module, cell, "cpu", torch.float64)
    got = run(module, cell, "cuda", dtype)
    assert_close(got, want, 1e-5 if dtype == torch.float32 else 2 * HALF_TOL[dtype], relative=True)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_loop_graphs_match_eager(dtype):
    """cuda_graphs on a GPU: a key's first call runs eagerly, the second captures, later ones replay; every call,
    each on fresh inputs and lengths, equals the eager loops."""
    triton_step.LOOP_GRAPHS.clear()
    for seed in range(4):
        tensors, lengths, rmask = layer_case(7, 24, 32, 64, 4, dtype, "cuda", padded=True, dropout=True, seed=seed)
        want = run_layer("triton", tensors, True, lengths, rmask)
        got = run_layer("triton", tensors, True, lengths, rmask, graphs=True)
        assert_close(got, want, 1e-6, relative=True)
    assert len(triton_step.LOOP_GRAPHS.graphs) == 2  # the forward and the backward loop


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T,B,H,K", [(9, 37, 256, 1), (9, 37, 256, 4), (6, 128, 1024, 16)])
def test_cuda_persistent_loops_match_pytorch_step(T, B, H, K, dtype):
    """persistent_loops on a GPU (gpu-check.sh runs these apart, under a timeout of their own: a grid barrier
    that never opens hangs): each loop one launch on up to a program per multiprocessor, against TorchStep in
    float64 on the CPU, padding, recurrent dropout, the shuffle; at H = 1024, B = 128, K = 16 a step has more
    tiles than an H100 or H200 has multiprocessors, so programs take several."""
    tensors, lengths, rmask = layer_case(T, B, 128, H, K, dtype=dtype, device="cuda", padded=True, dropout=True)
    got = run_layer("triton", tensors, K > 1, lengths, rmask, persistent=True)
    want = run_layer("torch", [t.double().cpu() for t in tensors], K > 1, lengths.cpu(), rmask.double().cpu())
    tol = 1e-5 if dtype == torch.float32 else HALF_TOL[dtype]
    assert_close(got, want, tol, relative=True)


@pytest.mark.cuda
@cuda
def test_cuda_direct_launches_match_jit_launches(monkeypatch):
    """On the GPU, the launches that call compiled variants' launchers directly (a loop's later steps, a second
    call of the same shapes, GroupLSTMCell's steps) give the same outputs and gradients, to the bit, as launching
    every step through Triton's JIT, and the second call launches nothing through the JIT."""
    jit = []
    real = triton.JITFunction.run
    monkeypatch.setattr(triton.JITFunction, "run", lambda self, *a, **kw: jit.append(self) or real(self, *a, **kw))
    tensors, lengths, rmask = layer_case(7, 24, 32, 64, 4, torch.bfloat16, "cuda", padded=True, dropout=True)
    gen = torch.Generator().manual_seed(2)
    cell_inputs = [torch.randn(4, 24, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(2)]
    cell_inputs.append(torch.randn(4, 24, 16, generator=gen, device="cpu").cuda())  # c_0, float32

    def calls():
        first = run_layer("triton", tensors, True, lengths, rmask)
        launched = len(jit)
        second = run_layer("triton", tensors, True, lengths, rmask)
        again = len(jit) - launched
        gates = [v.clone().requires_grad_(True) for v in cell_inputs]
        h1, c1 = triton_step.triton_cell(gates[0], gates[2])
        h2, c2 = triton_step.triton_cell(gates[1], c1)
        loss = h1.float().sum() + (h2.float() ** 2).sum() + c2.sum()
        return first + second + [h1, h2, c2, *torch.autograd.grad(loss, gates)], again

    got, again = calls()
    assert again == 0 and triton_step._DIRECT_LAUNCH["broken"] is None, (again, triton_step._DIRECT_LAUNCH)
    monkeypatch.setattr(triton_step, "_direct_launch_supported", lambda device: False)
    want, again = calls()
    assert again > 10  # the JIT launches every step now
    assert_close(got, want, 0.0)


@pytest.mark.cuda
@cuda
def test_cuda_kernels_run_and_graph_capture(launches):
    """auto on CUDA runs every step on the kernels; a layer's forward and backward captured as a CUDA graph
    replay to the eager results (the benchmark's "graph" rows time such replays)."""
    tensors, _, _ = layer_case(6, 64, 64, 128, 4, dtype=torch.bfloat16, device="cuda")
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    gy = torch.randn(6, 64, 128, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd():
        out, _, _ = fused_group_lstm_direction(*inputs, True)
        return torch.autograd.grad(out, inputs, gy)

    eager = fwd_bwd()
    assert launches == {"forward": 6, "backward": 7}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fwd_bwd()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fwd_bwd()
    graph.replay()
    torch.cuda.synchronize()
    assert_close(list(captured), list(eager), 1e-6, relative=True)
