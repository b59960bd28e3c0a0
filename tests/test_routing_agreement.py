"""Every place that routes sends every token to the same experts with the same weights.

The rules have one definition (moefy.hf.modeling_moefy: topk_experts, gating_weights,
lapsum_route); what runs them:

- the exported MoefyMLP: ``routing_weights``, ``forward_reference``, prefill (many tokens: the
  CPU ``torch.topk`` + tie check; few tokens: the stable sort), batch-1 decode through PyTorch
  GEMVs and through moefy's compiled kernel (its own C++ ``route()`` for mask gating);
- the model scored during training: the trainer's student (``training.student._layer_from_mlp``,
  a DotMoeLayer) in its hard forward, with and without gradients, with a frozen or a learnable
  assignment, in fp32 and under bf16 autocast (how the trainer runs on a GPU);
- that student exported again (``DotMoeLayer.to_moe_mlp``).

A probe FFN makes each path's *output* be its routing: one neuron per expert with
``relu(x0) * x0 = 1`` (``x0 = 1``), expert ``e``'s down column the unit vector ``1 + e``, the
router the identity on ``x[1:1+E]``.  So the logits are exactly the chosen values in every
summation order and dtype, and ``y[:, 1 + e]`` is exactly token's weight for expert ``e`` (0 when
not run).  Logits include exact ties, ties within one ulp, +0/-0, and LapSum weights exactly at,
and one ulp off, the truncation threshold.
"""

from __future__ import annotations

import math

import pytest
import torch

from moefy import kernels
from moefy.dotmoe import DotMoeLayer
from moefy.hf.modeling_moefy import MoefyMLP, lapsum_compute_dtype, lapsum_topk, topk_experts
from moefy.training.student import _layer_from_mlp, _log_exactly

E = 8
ALPHA = float(torch.tensor(-0.75).exp())  # an fp32 exp() value, as every exported alpha is


def lapsum_soft_topk(logits: torch.Tensor, k: float, alpha: float) -> torch.Tensor:
    """LapSum weights as the router computes them: fp32 (fp64 for fp64 logits)."""
    return lapsum_topk(logits.to(lapsum_compute_dtype(logits.dtype)), k, alpha)


def _ulp_step(v: torch.Tensor, up: bool) -> torch.Tensor:
    return torch.nextafter(v, torch.full_like(v, math.inf if up else -math.inf))


def logit_rows(family: str, k: int, dtype: torch.dtype, n: int = 96, seed: int = 0) -> torch.Tensor:
    """``[n, E]`` logits in ``dtype``; ``ties`` / ``ulp`` put an exact tie / a one-ulp gap at the
    k-th place (and elsewhere) of every row."""
    g = torch.Generator().manual_seed(seed)
    lg = (torch.randn(n, E, generator=g) * 2).to(dtype)
    if family == "random":
        return lg
    rows = []
    for i in range(n):
        r = lg[i].clone()
        order = sorted(range(E), key=lambda e: (-float(r[e]), e))
        kth, other = order[k - 1], order[k + int(torch.randint(0, E - k, (1,), generator=g))]
        if family == "ties":
            r[other] = r[kth]
            if i % 3 == 0:  # a tie inside the chosen set too
                r[order[0]] = r[kth]
        else:  # "ulp": one ulp above or below the k-th logit, and a second pair one ulp apart
            r[other] = _ulp_step(r[kth : kth + 1], up=bool(i % 2))[0]
            r[order[-1]] = _ulp_step(r[order[-2] : order[-2] + 1], up=False)[0]
        rows.append(r)
    special = torch.tensor(
        [[0.5] * E, [0.0, -0.0] * (E // 2), [-0.0, 0.0] * (E // 2), [1.0, 1.0, 2.0, 2.0, 2.0, -1.0, 2.0, 0.0]]
    ).to(dtype)
    return torch.cat([torch.stack(rows), special])


def probe(router: str, gating: str, top_k: float, n_shared: int, dtype: torch.dtype,
          threshold: float = 0.0, max_active: int | None = None) -> MoefyMLP:
    hidden = 1 + E
    mlp = MoefyMLP(hidden, [1] * E, n_shared=n_shared, top_k=top_k, hidden_act="relu", router=router, gating=gating,
                   lapsum_alpha=ALPHA, lapsum_threshold=threshold, max_active=max_active)
    with torch.no_grad():
        one = torch.zeros(n_shared + E, hidden)
        one[:, 0] = 1.0
        mlp.gate_proj.weight.copy_(one)
        mlp.up_proj.weight.copy_(one)
        down = torch.zeros(hidden, n_shared + E)
        down[0, :n_shared] = 1.0
        down[1 + torch.arange(E), n_shared + torch.arange(E)] = 1.0
        mlp.down_proj.weight.copy_(down)
        mlp.router.weight.copy_(torch.cat([torch.zeros(E, 1), torch.eye(E)], dim=1))
    return mlp.to(dtype).eval()


def inputs(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(logits.shape[0], 1, dtype=logits.dtype), logits], dim=1)


def readout(y: torch.Tensor, n_shared: int) -> torch.Tensor:
    assert bool((y[:, 0].float() == n_shared).all()), "the shared neurons must always run"
    return y[:, 1:].float()


def expected(logits: torch.Tensor, mlp: MoefyMLP) -> torch.Tensor:
    """The rule written out independently, row by row: which experts (0/1)."""
    out = torch.zeros(logits.shape, dtype=torch.float32)
    if mlp.router_type == "lapsum":
        p = lapsum_soft_topk(logits, float(mlp.top_k), mlp.lapsum_alpha)
        for i, row in enumerate(p.tolist()):
            order = sorted(range(E), key=lambda e: (-row[e], e))
            keep = {e for e in order if row[e] >= mlp.lapsum_threshold} | {order[0]}
            if mlp.max_active is not None:
                keep &= set(order[: mlp.max_active])
            out[i, sorted(keep)] = 1.0
        return out
    for i, row in enumerate(logits.float().tolist()):
        out[i, sorted(range(E), key=lambda e: (-row[e], e))[: int(mlp.top_k)]] = 1.0
    return out


def reference_weights(logits: torch.Tensor, chosen: torch.Tensor, mlp: MoefyMLP) -> torch.Tensor:
    """float64 weights of the chosen experts (to check the values, up to the dtype's rounding)."""
    lg = logits.double()
    if mlp.router_type == "lapsum":
        return lapsum_soft_topk(lg, float(mlp.top_k), mlp.lapsum_alpha) * chosen
    if mlp.gating == "mask":
        return chosen.double()
    if mlp.gating == "softmax":
        return torch.softmax(lg, -1) * chosen
    masked = torch.where(chosen.bool(), lg, torch.tensor(-math.inf, dtype=torch.float64))
    return torch.softmax(masked, -1)


def student_paths(mlp: MoefyMLP, x: torch.Tensor, n_shared: int, learn: bool) -> dict[str, torch.Tensor]:
    """The trainer's student built from ``mlp``, in its hard forward, and its re-export."""
    out: dict[str, torch.Tensor] = {}
    student = _layer_from_mlp(mlp, learn_assignment=learn, rounding="greedy", sinkhorn_iters=30, margin=3.0).eval()
    assert isinstance(student, DotMoeLayer)
    half = x.dtype != torch.float32
    xs = x.float()  # the student holds fp32 weights; on a GPU the trainer runs it under bf16 autocast
    tag = f"student(learn={learn})"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        with torch.no_grad():
            out[f"{tag} hard forward"] = readout(student(xs), n_shared)
            out[f"{tag} neuron_mask"] = student.neuron_mask(xs)[:, n_shared:].float()
        student.router.weight.requires_grad_(True)  # the training forward: STE graph attached
        y = student(xs)
        assert y.requires_grad
        out[f"{tag} training forward"] = readout(y.detach(), n_shared)
    with torch.no_grad():
        again = student.to_moe_mlp().to(x.dtype).eval()
        out[f"{tag} re-exported prefill"] = readout(again(x), n_shared)
    return out


def exported_paths(mlp: MoefyMLP, x: torch.Tensor, n_shared: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    mlp.use_kernel = False
    with torch.no_grad():
        out["routing_weights"] = mlp.routing_weights(x).float()
        out["forward_reference"] = readout(mlp.forward_reference(x), n_shared)
        out["prefill"] = readout(mlp(x), n_shared)
        out["prefill, 3 tokens a call"] = torch.cat([readout(mlp(x[i : i + 3]), n_shared) for i in range(0, len(x), 3)])
        out["decode (PyTorch)"] = torch.cat([readout(mlp(x[i : i + 1]), n_shared) for i in range(len(x))])
    mlp.use_kernel = True
    return out


def check(paths: dict[str, torch.Tensor], logits: torch.Tensor, mlp: MoefyMLP) -> None:
    chosen = expected(logits, mlp)
    base = paths["routing_weights"] if "routing_weights" in paths else next(iter(paths.values()))
    assert torch.equal((base != 0).float(), chosen), "routing differs from the written-out rule"
    ref = reference_weights(logits, chosen, mlp)
    eps = torch.finfo(logits.dtype).eps
    assert bool(((base.double() - ref).abs() <= eps * ref.abs() + 1e-7).all())
    for name, w in paths.items():
        bad = (w != base).any(-1).nonzero().flatten().tolist()
        assert not bad, f"{name} routes tokens {bad[:5]} differently: {w[bad[:2]].tolist()} vs {base[bad[:2]].tolist()}"


TOPK_CASES = [("mask", 1), ("mask", 2), ("mask", 3), ("softmax", 2), ("softmax-renorm", 2), ("softmax-renorm", 3)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["random", "ties", "ulp"])
@pytest.mark.parametrize("gating,k", TOPK_CASES)
def test_topk_routing_agrees_everywhere(gating, k, family, dtype):
    n_shared = 1 if k == 2 else 0
    logits = logit_rows(family, k, dtype)
    mlp = probe("topk", gating, k, n_shared, dtype)
    x = inputs(logits)
    paths = exported_paths(mlp, x, n_shared)
    for learn in (False, True):
        paths.update(student_paths(mlp, x, n_shared, learn))
    check(paths, logits, mlp)


def lapsum_case(family: str, dtype: torch.dtype, max_active: int | None, at: str) -> tuple[torch.Tensor, float, int]:
    """Logits, and a threshold equal to one token's weight (``at="on"``: kept) or one ulp above it
    (``"above"``: dropped), so that token sits exactly at the truncation edge."""
    logits = logit_rows(family, 2, dtype)
    p = lapsum_soft_topk(logits, 2.5, ALPHA)
    second = p.sort(-1, descending=True).values[:, 1]  # not the best expert: truncation decides
    i = int((second - 0.3).abs().argmin())
    th = second[i : i + 1]
    if at == "above":
        th = _ulp_step(th, up=True)
    return logits, float(th), i


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["random", "ties", "ulp"])
@pytest.mark.parametrize("max_active", [None, 3])
@pytest.mark.parametrize("at", ["on", "above"])
def test_lapsum_routing_agrees_at_the_threshold(at, max_active, family, dtype):
    logits, th, i = lapsum_case(family, dtype, max_active, at)
    mlp = probe("lapsum", "lapsum", 2.5, 1, dtype, threshold=th, max_active=max_active)
    x = inputs(logits)
    paths = exported_paths(mlp, x, 1)
    for learn in (False, True):
        paths.update(student_paths(mlp, x, 1, learn))
    check(paths, logits, mlp)
    w = paths["routing_weights"][i]
    p = lapsum_soft_topk(logits[i : i + 1], 2.5, ALPHA)[0]
    j = int(p.sort(descending=True).indices[1])
    assert (w[j] != 0) == (at == "on")  # the edge token: kept at the threshold, dropped one ulp above


def _kernel_or_skip() -> None:
    if kernels.load() is None:
        pytest.skip(f"moefy's CPU kernel is unavailable here ({kernels.status()['error'] or 'MOEFY_CPU_KERNEL=0'})")


@pytest.fixture
def kernel_decode(monkeypatch):
    """Batch-1 decode through moefy's kernel, and only through it (the PyTorch path would fail)."""
    _kernel_or_skip()

    def boom(*a, **k):
        raise AssertionError("the PyTorch fallback ran instead of the kernel")

    def decode(mlp: MoefyMLP, x: torch.Tensor, n_shared: int) -> torch.Tensor:
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(MoefyMLP, "_rows", boom)
            mlp.use_kernel = True
            return torch.cat([readout(mlp(x[i : i + 1]), n_shared) for i in range(len(x))])

    return decode


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["random", "ties", "ulp"])
@pytest.mark.parametrize("gating,k", TOPK_CASES)
def test_kernel_topk_routing_agrees(gating, k, family, dtype, kernel_decode, monkeypatch):
    """Mask gating: the kernel's own route() (ties toward the lower index); weighted gatings:
    modeling_moefy's weights as the range kernel's scales."""
    fused = {"n": 0}
    real = kernels.moe_decode_topk
    monkeypatch.setattr(kernels, "moe_decode_topk", lambda *a: fused.__setitem__("n", fused["n"] + 1) or real(*a))
    n_shared = 1 if k == 2 else 0
    logits = logit_rows(family, k, dtype)
    mlp = probe("topk", gating, k, n_shared, dtype)
    x = inputs(logits)
    paths = exported_paths(mlp, x, n_shared)
    paths["decode (kernel)"] = kernel_decode(mlp, x, n_shared)
    assert fused["n"] == (len(x) if gating == "mask" else 0)
    check(paths, logits, mlp)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_active", [None, 3])
@pytest.mark.parametrize("at", ["on", "above"])
def test_kernel_lapsum_routing_agrees(at, max_active, dtype, kernel_decode):
    logits, th, _ = lapsum_case("ties", dtype, max_active, at)
    mlp = probe("lapsum", "lapsum", 2.5, 1, dtype, threshold=th, max_active=max_active)
    x = inputs(logits)
    paths = exported_paths(mlp, x, 1)
    paths["decode (kernel)"] = kernel_decode(mlp, x, 1)
    check(paths, logits, mlp)


def test_topk_tie_rule_and_both_branches():
    """Lower index wins ties, in the stable-sort branch and in the CPU topk + tie-check branch."""
    row = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk_experts(row[None], 2).sort(-1).values.tolist() == [[1, 2]]
    many = row.expand(200, 5).clone()
    assert topk_experts(many, 2).sort(-1).values.unique(dim=0).tolist() == [[1, 2]]
    distinct = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(topk_experts(distinct, 2).sort(-1).values, distinct.topk(2).indices.sort(-1).values)
    assert topk_experts(row[None], 5).tolist() == [[0, 1, 2, 3, 4]]


def test_student_alpha_is_the_checkpoints():
    for log_alpha in torch.linspace(-6.0, 3.0, 301):
        alpha = float(log_alpha.exp())
        assert float(_log_exactly(alpha).exp()) == alpha


def test_student_of_a_converted_model_routes_as_its_export():
    """A whole converted model: each MoE layer of the trainer's student and of the exported
    checkpoint route the checkpoint's own hidden states identically; the logits agree."""
    from moefy.training.student import build_student
    from tiny_moefy import calib_ids, tiny_moefy

    for gating in ("mask", "softmax-renorm"):
        moe = tiny_moefy(n_shared=4, gating=gating)
        mlps = {i: layer.mlp for i, layer in enumerate(moe.model.model.layers) if isinstance(layer.mlp, MoefyMLP)}
        xs: dict[int, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, i=i: xs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
                 for i, m in mlps.items()]
        ids = calib_ids(n=2, seq=24, seed=5)
        with torch.no_grad():
            ref = moe(input_ids=ids).logits
        for h in hooks:
            h.remove()
        student = build_student(moe, learn_assignment=False)
        with torch.no_grad():
            for i, mlp in mlps.items():
                dot = student.layers[i]
                w = mlp.routing_weights(xs[i])
                nz = [e for e in range(mlp.n_experts) if mlp.expert_sizes[e]]
                from_mask = dot.neuron_mask(xs[i])[:, [mlp.offsets[e] for e in nz]]
                assert torch.equal(from_mask, w[:, nz]), (gating, i)
            out = student.model(input_ids=ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router,gating,k", [("lapsum", "lapsum", 2.5), ("topk", "softmax-renorm", 2), ("topk", "softmax", 2)])
def test_router_gradients_agree(router, gating, k):
    """The exported model is trainable as it routes: its router gradient (prefill and
    forward_reference) equals the training layer's (whose STE adds P's gradient for mask gating only)."""
    logits = logit_rows("random", 2, torch.float32, n=40)
    mlp = probe(router, gating, k, 1, torch.float32, threshold=0.2, max_active=3)
    x = inputs(logits)
    v = torch.randn(x.shape[0], 1 + E, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, fn in (("prefill", mlp), ("forward_reference", mlp.forward_reference)):
        mlp.zero_grad()
        (fn(x) * v).sum().backward()
        grads[name] = mlp.router.weight.grad.clone()
    student = _layer_from_mlp(mlp, learn_assignment=False, rounding="greedy", sinkhorn_iters=30, margin=3.0)
    student.router.weight.requires_grad_(True)
    (student(x) * v).sum().backward()
    grads["student"] = student.router.weight.grad
    assert float(grads["prefill"].abs().max()) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, grads["forward_reference"], rtol=1e-5, atol=1e-6, msg=name)
