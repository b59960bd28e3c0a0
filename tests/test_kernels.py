"""moefy's compiled CPU decode kernel (moefy.kernels): the fused batch-1 path equals the
masked-dense definition, in every gating, activation and dtype, and falls back cleanly."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from moefy import kernels
from moefy.hf.modeling_moefy import MoefyMLP

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler here: moefy's CPU kernel cannot be built (decode then uses PyTorch GEMVs)",
)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to fp32 summation order: ``tol`` relative to the output's scale."""
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def make_mlp(sizes=(6, 9, 4, 7, 8), n_shared=5, top_k=2, hidden=40, act="silu", gating="mask", router="topk",
             bias=False, dtype=torch.float32, seed=0) -> MoefyMLP:
    torch.manual_seed(seed)
    mlp = MoefyMLP(hidden, list(sizes), n_shared=n_shared, top_k=top_k, hidden_act=act, gating=gating, router=router, bias=bias)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.5)
    return mlp.to(dtype).eval()


@pytest.fixture
def kernel_only(monkeypatch):
    """Make the PyTorch fallback fail, so a passing test proves the kernel ran."""

    def boom(*a, **k):
        raise AssertionError("the PyTorch fallback ran instead of the kernel")

    monkeypatch.setattr(MoefyMLP, "_rows", boom)  # the PyTorch path's per-range computation


@needs_compiler
def test_kernel_builds_and_shares_torchs_openmp():
    assert kernels.load() is not None, kernels.status()
    if sys.platform.startswith("linux"):
        maps = Path("/proc/self/maps").read_text().splitlines()
        # one libgomp.so.1 (wheels that vendor a renamed copy, e.g. sentencepiece's, do not count):
        # the kernel's OpenMP is torch's own runtime, so it runs on torch's threads
        gomp = {line.split()[-1] for line in maps if line.split()[-1].rsplit("/", 1)[-1].startswith("libgomp.so")}
        assert len(gomp) <= 1, gomp


@needs_compiler
@pytest.mark.parametrize("act", sorted(kernels.ACTIVATIONS))
@pytest.mark.parametrize("gating", ["mask", "softmax", "softmax-renorm"])
@pytest.mark.parametrize("n_shared", [0, 5])
def test_kernel_decode_equals_reference(act, gating, n_shared, kernel_only):
    mlp = make_mlp(act=act, gating=gating, n_shared=n_shared)
    with torch.no_grad():
        for seed in range(4):
            x = torch.randn(1, 40, generator=torch.Generator().manual_seed(seed))
            fast, ref = mlp(x), mlp.forward_reference(x)
            assert close(fast, ref), float((fast - ref).abs().max())


@needs_compiler
@pytest.mark.parametrize("hidden", [1, 15, 16, 17, 33, 200])
def test_kernel_any_hidden_size_and_unequal_experts(hidden, kernel_only):
    mlp = make_mlp(sizes=(1, 13, 2, 30), n_shared=3, top_k=3, hidden=hidden, gating="softmax")
    with torch.no_grad():
        x = torch.randn(1, 1, hidden)
        assert close(mlp(x), mlp.forward_reference(x))


@needs_compiler
def test_kernel_lapsum_variable_experts(kernel_only):
    mlp = make_mlp(top_k=2.0, gating="lapsum", router="lapsum")
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(1, 40)
            assert close(mlp(x), mlp.forward_reference(x))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_is_the_fp32_math_rounded_once(dtype, kernel_only):
    mlp = make_mlp(hidden=64, dtype=dtype, gating="softmax-renorm")
    ref32 = make_mlp(hidden=64, gating="softmax-renorm")
    ref32.load_state_dict({k: v.float() for k, v in mlp.state_dict().items()})
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(1, 64).to(dtype)
            w = mlp.routing_weights(x)  # the half model's routing, applied in fp32
            h = ref32.act_fn(ref32.gate_proj(x.float())) * ref32.up_proj(x.float())
            exact = ref32.down_proj(h * ref32.neuron_mask(w.float()))
            fast = mlp(x).float()
            assert fast.dtype == torch.float32 and mlp(x).dtype == dtype
            # the kernel computes in fp32 and rounds once: within half an ulp of the output dtype
            ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
            assert ((fast - exact).abs() <= ulp + 1e-6 * exact.abs().max()).all()


@needs_compiler
def test_kernel_and_pytorch_fallback_agree():
    a = make_mlp(sizes=(40,) * 6, n_shared=16, hidden=96, top_k=3)
    b = make_mlp(sizes=(40,) * 6, n_shared=16, hidden=96, top_k=3)
    b.use_kernel = False
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(1, 96)
            assert close(a(x), b(x))


@needs_compiler
def test_kernel_result_does_not_depend_on_thread_count():
    mlp = make_mlp(sizes=(64,) * 8, n_shared=32, hidden=128, top_k=3)
    x = torch.randn(1, 128)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            outs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append(mlp(x))
    finally:
        torch.set_num_threads(before)
    for o in outs[1:]:
        assert close(o, outs[0])


def test_bias_and_gradients_take_the_pytorch_path():
    mlp = make_mlp(bias=True, gating="softmax")
    x = torch.randn(1, 40)
    with torch.no_grad():
        assert close(mlp(x), mlp.forward_reference(x))
    mlp = make_mlp(gating="softmax-renorm")
    mlp(x).sum().backward()  # grad enabled and weights trainable: autograd-capable GEMVs
    g = mlp.router.weight.grad.clone()
    mlp.zero_grad()
    mlp.forward_reference(x).sum().backward()
    assert torch.allclose(g, mlp.router.weight.grad, rtol=1e-4, atol=1e-5)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.enabled() and kernels.load() is None
    x = torch.randn(4)
    w = torch.randn(3, 4)
    assert kernels.moe_decode(x, w, w, w, [0], [3], [1.0], "silu") is None
    mlp = make_mlp()
    with torch.no_grad():
        x = torch.randn(1, 40)
        assert close(mlp(x), mlp.forward_reference(x))


def test_unsupported_activation_falls_back():
    x = torch.randn(4)
    w = torch.randn(3, 4)
    assert kernels.moe_decode(x, w, w, w, [0], [3], [1.0], "mish") is None
    mlp = make_mlp(act="mish")
    with torch.no_grad():
        x = torch.randn(1, 40)
        assert close(mlp(x), mlp.forward_reference(x))


@needs_compiler
def test_kernel_rejects_bad_arguments():
    w = torch.randn(3, 4)
    x = torch.randn(4)
    with pytest.raises(RuntimeError, match="out of bounds"):
        kernels.moe_decode(x, w, w, w, [0], [4], [1.0], "silu")
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.moe_decode(x, w.bfloat16(), w, w, [0], [3], [1.0], "silu")
    with pytest.raises(RuntimeError, match="unit inner stride"):
        kernels.moe_decode(x, w.t().contiguous().t(), w, w, [0], [3], [1.0], "silu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [3, 40])  # few tokens per expert: half GEMM; many: fp32 upcast
def test_half_prefill_close_to_fp32_math(dtype, tokens):
    mlp = make_mlp(hidden=64, dtype=dtype, gating="softmax")
    ref32 = make_mlp(hidden=64, gating="softmax")
    ref32.load_state_dict({k: v.float() for k, v in mlp.state_dict().items()})
    x = torch.randn(tokens, 64).to(dtype)
    with torch.no_grad():
        w = mlp.routing_weights(x).float()
        h = ref32.act_fn(ref32.gate_proj(x.float())) * ref32.up_proj(x.float())
        exact = ref32.down_proj(h * ref32.neuron_mask(w))
        fast = mlp(x)
    assert fast.dtype == dtype
    assert (fast.float() - exact).abs().max() <= 2e-2 * exact.abs().max()


@needs_compiler
def test_unusual_weight_layouts_fall_back_instead_of_failing():
    mlp = make_mlp()
    mlp.transpose_down = False  # nn.Linear's down layout: not the kernel's
    with torch.no_grad():
        x = torch.randn(1, 40)
        assert close(mlp(x), mlp.forward_reference(x))
        mlp.gate_proj.weight.data = mlp.gate_proj.weight.data.t().contiguous().t()  # column-major gate
        mlp.transpose_down = None
        assert close(mlp(x), mlp.forward_reference(x))


@needs_compiler
@pytest.mark.parametrize("gating", ["mask", "softmax", "softmax-renorm"])
@pytest.mark.parametrize("n_shared,top_k", [(0, 1), (5, 2), (0, 5)])
def test_fused_routing_kernel_equals_reference(gating, n_shared, top_k, monkeypatch, kernel_only):
    """Mask gating routes inside the kernel (one call); weighted gatings are routed by
    modeling_moefy, their one definition, and run through the range kernel."""
    calls = {"fused": 0, "ranges": 0}
    fused, ranges = kernels.moe_decode_topk, kernels.moe_decode

    def counted(name, real):
        def call(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return call

    monkeypatch.setattr(kernels, "moe_decode_topk", counted("fused", fused))
    monkeypatch.setattr(kernels, "moe_decode", counted("ranges", ranges))
    mlp = make_mlp(gating=gating, n_shared=n_shared, top_k=top_k)
    mlp.count_active = True
    with torch.no_grad():
        for seed in range(6):
            x = torch.randn(1, 40, generator=torch.Generator().manual_seed(seed))
            assert close(mlp(x), mlp.forward_reference(x))
    want = {"fused": 6, "ranges": 0} if gating == "mask" else {"fused": 0, "ranges": 6}
    assert calls == want and mlp.active_pairs == 6 * top_k and mlp.tokens_seen == 6


@needs_compiler
def test_fused_routing_respects_router_hooks_and_gradients():
    mlp = make_mlp(gating="softmax")
    seen = []
    handle = mlp.router.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        x = torch.randn(1, 40)
        fast = mlp(x)
        assert len(seen) == 1  # a hooked router runs as a module, not inside the kernel
        assert close(fast, mlp.forward_reference(x))
    handle.remove()
    for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight):
        p.requires_grad_(False)
    mlp(x).sum().backward()  # only the router trains: its gradient must still flow
    g = mlp.router.weight.grad.clone()
    mlp.zero_grad()
    mlp.forward_reference(x).sum().backward()
    assert torch.allclose(g, mlp.router.weight.grad, rtol=1e-4, atol=1e-5)


def test_build_failure_warns_once_and_decode_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(kernels, "_MODULE", None)
    monkeypatch.setattr(kernels, "_FAILED", None)
    monkeypatch.delenv(kernels.ENV, raising=False)

    def no_compiler(*a, **k):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built.*command not found"):
        assert kernels.load() is None
    assert kernels.load() is None and "command not found" in kernels.status()["error"]  # no second attempt
    mlp = make_mlp(gating="softmax")
    with torch.no_grad():
        x = torch.randn(1, 40)
        assert close(mlp(x), mlp.forward_reference(x))
