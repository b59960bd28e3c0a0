"""The fast inference path of MoefyMLP equals its masked dense definition, reads expert
weights only through views, and drives generate() with and without the KV cache."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moefy.hf.modeling_moefy import MoefyMLP
from tiny_moefy import calib_ids, tiny_moefy

GATINGS = ("mask", "softmax", "softmax-renorm")


@pytest.fixture(autouse=True, params=["grouped", "masked"])
def prefill_path(request, monkeypatch):
    """Every test here runs with each multi-token path (small experts, as these are, pick
    "masked" by themselves; the threshold is moved so that each path is the automatic choice)."""
    import moefy.hf.modeling_moefy as modeling

    monkeypatch.setattr(modeling, "MASKED_PREFILL_MAX_EXPERT_SIZE", 0 if request.param == "grouped" else 10**9)
    return request.param


def make_mlp(
    sizes=(6, 9, 4, 7, 8), n_shared=5, top_k=2, bias=False, gating="mask", router="topk", hidden=16, seed=0,
    dtype=torch.float32,
) -> MoefyMLP:
    torch.manual_seed(seed)
    mlp = MoefyMLP(hidden, list(sizes), n_shared=n_shared, top_k=top_k, bias=bias, gating=gating, router=router)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.5)
    return mlp.to(dtype).eval()


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=rtol, atol=atol), float((a - b).abs().max())


@pytest.mark.parametrize("tokens", [1, 2, 7, 300])
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("n_shared", [0, 5])
def test_fast_equals_reference(tokens, gating, n_shared):
    mlp = make_mlp(n_shared=n_shared, gating=gating)
    x = torch.randn(tokens, 16)
    with torch.no_grad():
        assert_close(mlp(x), mlp.forward_reference(x))


@pytest.mark.parametrize("tokens", [1, 9, 257])
def test_bias_and_unequal_experts(tokens):
    mlp = make_mlp(sizes=(1, 13, 2, 30), n_shared=3, top_k=3, bias=True, gating="softmax")
    x = torch.randn(tokens, 16)
    with torch.no_grad():
        assert_close(mlp(x), mlp.forward_reference(x))


@pytest.mark.parametrize("top_k", [1, 5])
def test_extreme_top_k(top_k):
    mlp = make_mlp(top_k=top_k, gating="softmax-renorm")
    for tokens in (1, 40):
        x = torch.randn(tokens, 16)
        with torch.no_grad():
            assert_close(mlp(x), mlp.forward_reference(x))


def test_lapsum_router_variable_experts_per_token():
    mlp = make_mlp(top_k=2.0, gating="lapsum", router="lapsum")
    for tokens in (1, 33):
        x = torch.randn(tokens, 16)
        with torch.no_grad():
            assert_close(mlp(x), mlp.forward_reference(x))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_no_routed_experts_is_shared_only():
    mlp = make_mlp(sizes=(), n_shared=12, top_k=0)
    for tokens in (1, 5):
        x = torch.randn(tokens, 16)
        with torch.no_grad():
            assert_close(mlp(x), mlp.forward_reference(x))


def test_batched_3d_input_and_empty_batch():
    mlp = make_mlp()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert_close(mlp(x), mlp.forward_reference(x))
        assert mlp(torch.randn(2, 0, 16)).shape == (2, 0, 16)
        assert mlp(torch.randn(1, 1, 16)).shape == (1, 1, 16)


@pytest.mark.parametrize("tokens", [1, 64])
def test_bf16_close_to_fp32_reference(tokens):
    mlp32 = make_mlp(gating="softmax-renorm")
    mlp16 = make_mlp(gating="softmax-renorm", dtype=torch.bfloat16)
    # routing can flip between near-tied experts in bf16: compare with the same routing
    x = torch.randn(tokens, 16).bfloat16()
    with torch.no_grad():
        ref16 = mlp16.forward_reference(x).float()
        fast16 = mlp16(x).float()
        ref32 = mlp32.forward_reference(x.float())
    scale = ref32.abs().max()
    assert (fast16 - ref16).abs().max() <= 0.02 * scale
    same_route = torch.equal(mlp16.routing_weights(x) != 0, mlp32.routing_weights(x.float()) != 0)
    if same_route:
        assert (fast16 - ref32).abs().max() <= 0.03 * scale


def test_down_proj_relaid_out_without_changing_the_state_dict():
    mlp = make_mlp()
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with torch.no_grad():
        mlp(torch.randn(1, 16))
    w = mlp.down_proj.weight
    assert w.shape == (16, mlp.intermediate_size) and w.t().is_contiguous()
    after = mlp.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k])
    other = make_mlp(seed=1)
    other.load_state_dict(after)  # loads back into a plain (contiguous) module
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(other.forward_reference(x), mlp.forward_reference(x))


def test_changing_transpose_down_after_first_use_takes_effect():
    mlp = make_mlp()
    x = torch.randn(1, 16)
    with torch.no_grad():
        ref = mlp(x)
        assert mlp.down_proj.weight.t().is_contiguous()
        mlp.transpose_down = False
        assert_close(mlp(x), ref)
        assert mlp.down_proj.weight.is_contiguous()


def test_strided_down_layout_gives_the_same_result():
    a, b = make_mlp(), make_mlp()
    b.transpose_down = False
    for tokens in (1, 20):
        x = torch.randn(tokens, 16)
        with torch.no_grad():
            assert_close(a(x), b(x))
    assert not b.down_proj.weight.t().is_contiguous()


def test_layout_is_rechosen_after_a_cast_or_a_new_setting():
    mlp = make_mlp()
    x = torch.randn(3, 16)
    with torch.no_grad():
        mlp(x)
        assert mlp.down_proj.weight.t().is_contiguous()  # CPU: transposed
        mlp.to(torch.bfloat16)
        mlp.transpose_down = False
        fast = mlp(x.bfloat16())
        assert mlp.down_proj.weight.is_contiguous()  # nn.Linear's layout on request
        assert_close(fast.float(), mlp.forward_reference(x.bfloat16()).float(), rtol=2e-2, atol=2e-2)
        mlp.to(torch.float32)
        mlp.transpose_down = None
        mlp(x)
        assert mlp.down_proj.weight.t().is_contiguous()  # the default again after the cast
        mlp.train()
        mlp.transpose_down = False
        mlp(x)  # no layout changes while training
        assert mlp.down_proj.weight.t().is_contiguous()


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((str(func.overloadpacket.__name__), shapes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("transpose_down", [None, False])
def test_decode_reads_expert_weights_through_views_only(transpose_down):
    mlp = make_mlp(sizes=(40, 40, 40, 40), n_shared=8, hidden=32)
    mlp.transpose_down = transpose_down
    mlp.use_kernel = False  # the PyTorch GEMV path (moefy's kernel is checked in test_kernels.py)
    x = torch.randn(1, 32)
    with torch.no_grad():
        mlp(x)  # first call: one-time layout of down_proj
        log = _OpLog()
        with log:
            mlp(x)
    copies = {"index_select", "gather", "index", "clone", "copy_", "_to_copy", "contiguous", "cat", "stack"}
    assert not [op for op, _ in log.ops if op in copies], log.ops
    # matmuls only ever see one expert's (or the shared) rows, never the whole FFN
    for op, shapes in log.ops:
        if op in ("mm", "addmm", "addmm_", "linear"):
            assert all(mlp.intermediate_size not in s for s in shapes), (op, shapes)
    assert any(op in ("topk", "sort") for op, _ in log.ops)  # the routing ran (topk_experts)


def test_gradients_match_reference():
    mlp = make_mlp(gating="softmax-renorm")
    x = torch.randn(9, 16)
    for tokens in (1, 9):
        xs = x[:tokens]
        mlp.zero_grad()
        mlp(xs).pow(2).sum().backward()
        fast = {n: p.grad.clone() for n, p in mlp.named_parameters()}
        mlp.zero_grad()
        mlp.forward_reference(xs).pow(2).sum().backward()
        for n, p in mlp.named_parameters():
            assert torch.allclose(fast[n], p.grad, rtol=1e-4, atol=1e-4), n


@pytest.mark.parametrize("gating", ["mask", "softmax-renorm"])
def test_model_logits_fast_equal_reference(gating, monkeypatch):
    model = tiny_moefy(n_shared=8, gating=gating)
    ids = calib_ids(n=2, seq=24, seed=3)
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        monkeypatch.setattr(MoefyMLP, "forward", MoefyMLP.forward_reference)
        ref = model(input_ids=ids).logits
    assert_close(fast, ref)


def test_generate_with_kv_cache_equals_without(monkeypatch):
    model = tiny_moefy(n_shared=8)
    ids = calib_ids(n=1, seq=10, seed=5)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
        monkeypatch.setattr(MoefyMLP, "forward", MoefyMLP.forward_reference)
        reference = model.generate(ids, use_cache=True, **kw)
    assert cached.shape == (1, 22)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


def test_generate_batched_with_cache():
    model = tiny_moefy(gating="softmax-renorm")
    ids = calib_ids(n=3, seq=6, seed=7)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, **kw)
        single = torch.cat([model.generate(ids[i : i + 1], **kw) for i in range(3)])
    assert torch.equal(batched, single)


def test_masked_path_is_chosen_for_small_experts_only(prefill_path, monkeypatch):
    """The automatic choice follows the mean routed-expert size; ``prefill_path`` forces either
    path and both give the reference output; anything else is refused."""
    import moefy.hf.modeling_moefy as modeling

    monkeypatch.setattr(modeling, "MASKED_PREFILL_MAX_EXPERT_SIZE", 16)
    small, large = make_mlp(sizes=(8,) * 6, n_shared=4), make_mlp(sizes=(40,) * 3, n_shared=4)
    assert small._use_masked() and not large._use_masked()
    x = torch.randn(11, 16)
    for mlp in (small, large):
        with torch.no_grad():
            ref = mlp.forward_reference(x)
            for path in ("grouped", "masked"):
                mlp.prefill_path = path
                assert mlp._use_masked() == (path == "masked")
                assert_close(mlp(x), ref)
        mlp.prefill_path = "fast"
        with pytest.raises(ValueError, match="prefill_path"):
            mlp(x)


def test_masked_path_counts_active_pairs_as_grouped(monkeypatch):
    """``count_active`` (moefy eval's measured experts per token) reads the same on both paths,
    across the masked path's token chunks."""
    import moefy.hf.modeling_moefy as modeling

    monkeypatch.setattr(modeling, "MASKED_PREFILL_CHUNK", 7)
    x = torch.randn(30, 16)
    counts = {}
    for path in ("grouped", "masked"):
        mlp = make_mlp(top_k=2.0, gating="lapsum", router="lapsum")
        mlp.prefill_path, mlp.count_active = path, True
        with torch.no_grad():
            out = mlp(x)
            assert_close(out, mlp.forward_reference(x))
        counts[path] = (mlp.active_pairs, mlp.tokens_seen)
    assert counts["grouped"] == counts["masked"] and counts["masked"][1] == 30
