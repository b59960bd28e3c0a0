import torch

from moefy.adapters import FFNWeights
from moefy.dotmoe import DotMoeLayer
from moefy.hf.modeling_moefy import MoefyMLP
from moefy.routing import load_balance_loss, route_ste
from moefy.splits import Split, random_split


def _layer(n=40, d=16, e=4, k=2, shared=None, learn=True, bias=False):
    torch.manual_seed(0)
    ffn = FFNWeights(torch.randn(n, d), torch.randn(n, d), torch.randn(d, n))
    if bias:
        ffn.gate_bias, ffn.up_bias, ffn.down_bias = torch.randn(n), torch.randn(n), torch.randn(d)
    split = random_split(n, e, 0, shared)
    layer = DotMoeLayer(ffn, torch.nn.functional.silu, "silu", split, k, learn_assignment=learn)
    torch.nn.init.normal_(layer.router.weight)
    return ffn, layer


def _dense(ffn, x):
    h = torch.nn.functional.silu(torch.nn.functional.linear(x, ffn.gate, ffn.gate_bias)) * torch.nn.functional.linear(x, ffn.up, ffn.up_bias)
    return torch.nn.functional.linear(h, ffn.down, ffn.down_bias)


def test_k_equals_e_reproduces_dense_ffn():
    ffn, layer = _layer(k=4, bias=True)
    x = torch.randn(7, 16)
    with torch.no_grad():
        assert torch.allclose(layer(x), _dense(ffn, x), atol=1e-4)
        mlp = layer.to_moe_mlp()
        assert torch.allclose(mlp(x), _dense(ffn, x), atol=1e-4)


def test_gradients_reach_affinity_and_router():
    _, layer = _layer()
    x = torch.randn(32, 16)
    y = layer(x)
    zl, lb = layer.aux_losses()
    (y.pow(2).mean() + zl + lb).backward()
    assert layer.affinity.grad is not None and layer.affinity.grad.abs().sum() > 0
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_router_ste_forward_is_hard_mask():
    logits = torch.randn(5, 6, requires_grad=True)
    r, hard, probs = route_ste(logits, 2)
    assert torch.allclose(r.detach(), hard, atol=1e-6)
    assert hard.sum(-1).eq(2).all()
    (r * torch.randn(5, 6)).sum().backward()
    assert logits.grad.abs().sum() > 0
    assert float(load_balance_loss(probs, hard)) > 0


def test_fast_path_equals_reference_and_training_path():
    _, layer = _layer(n=60, d=16, e=6, k=2, shared=torch.tensor([1, 5, 9]), bias=True)
    layer.freeze_assignment()
    mlp = layer.to_moe_mlp()
    for t in (1, 3, 50):
        x = torch.randn(t, 16)
        with torch.no_grad():
            a, b, c = layer(x), mlp(x), mlp.forward_reference(x)
        assert torch.allclose(a, b, atol=1e-4)
        assert torch.allclose(b, c, atol=1e-4)


def test_expert_neurons_are_contiguous_slices():
    _, layer = _layer(n=43, e=4)
    layer.freeze_assignment()
    mlp = layer.to_moe_mlp()
    assert sum(mlp.expert_sizes) == 43
    assert mlp.offsets[-1] == 43
    perm = torch.tensor(mlp.source_neurons)
    assert torch.equal(torch.sort(perm).values, torch.arange(43))


def test_pruned_layer_keeps_only_shared():
    torch.manual_seed(0)
    ffn = FFNWeights(torch.randn(20, 8), torch.randn(20, 8), torch.randn(8, 20))
    keep = torch.arange(0, 20, 2)
    layer = DotMoeLayer(ffn, torch.nn.functional.silu, "silu", Split(keep, []), 0)
    x = torch.randn(4, 8)
    h = torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)
    ref = h[:, keep] @ ffn.down[:, keep].T
    with torch.no_grad():
        assert torch.allclose(layer(x), ref, atol=1e-4)
        assert torch.allclose(layer.to_moe_mlp()(x), ref, atol=1e-4)
    assert isinstance(layer.to_moe_mlp(), MoefyMLP)
