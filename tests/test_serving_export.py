"""`moefy export`: every format reloads with the moefy model's logits (HF formats through stock
transformers classes, GGUF through GGUFReader), refusals are one line with exit 15, and outputs
appear atomically."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from conftest import STORIES, needs_shared
from moefy.cli import main
from moefy.errors import ExportRefusedError, OutputExistsError, UnsupportedModelError
from moefy.export import save_checkpoint
from moefy.serving_export import (
    GGUF_SHEXP_GATE,
    export_model,
    gguf_qwen2moe_refusal,
    gguf_refusal,
    mixtral_refusal,
    qwen2_moe_refusal,
    set_gating,
    to_mixtral,
    unpermute_qk,
    write_gguf,
)
from tiny_moefy import calib_ids, tiny_moefy

IDS = calib_ids(n=2, seq=40, seed=11)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    return int(exc.value.code or 0), capsys.readouterr().err


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_logits(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """fp32 agreement: max |a - b| <= tol * max(1, max |b|) (pure summation-order differences)."""
    assert a.shape == b.shape
    bound = tol * max(1.0, float(b.abs().max()))
    assert (a - b).abs().max() <= bound, (float((a - b).abs().max()), bound)


def save(model, path: Path, tokenizer=None) -> Path:
    return save_checkpoint(model, tokenizer, path, {"method": "dot"})


def no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


@pytest.fixture(scope="module")
def renorm_ckpt(tmp_path_factory) -> Path:
    """All layers, 4 equal experts, top-2, no shared neurons, softmax-renorm: Mixtral-exact."""
    return save(tiny_moefy(gating="softmax-renorm"), tmp_path_factory.mktemp("renorm") / "moe")


@pytest.fixture(scope="module")
def mask_ckpt(tmp_path_factory) -> Path:
    """Mask gating with top-2: representable by no stock format."""
    return save(tiny_moefy(gating="mask"), tmp_path_factory.mktemp("mask") / "moe")


# ------------------------------------------------------------------------------- hf
def test_hf_export_is_a_loadable_copy(renorm_ckpt, tmp_path, capsys):
    out = tmp_path / "copy"
    code, err = run_cli(["export", str(renorm_ckpt), "--format", "hf", "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in renorm_ckpt.iterdir())
    a = AutoModelForCausalLM.from_pretrained(renorm_ckpt).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(a), logits(b))


# --------------------------------------------------------------------------- mixtral
def test_mixtral_export_reloads_with_equal_logits_and_tokens(renorm_ckpt, tmp_path, capsys):
    out = tmp_path / "mixtral"
    code, err = run_cli(["export", str(renorm_ckpt), "--format", "mixtral", "--out", str(out)], capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert (out / "moefy.json").is_file()
    moe = AutoModelForCausalLM.from_pretrained(renorm_ckpt).eval()
    mix = AutoModelForCausalLM.from_pretrained(out).eval()  # stock class, default experts kernel
    assert type(mix) is MixtralForCausalLM
    assert_same_logits(logits(mix), logits(moe))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(mix.generate(IDS[:1, :6], **kw), moe.generate(IDS[:1, :6], **kw))


def test_mixtral_top1_mask_gating_is_exact(tmp_path):
    moe = tiny_moefy(top_k=1, gating="mask")
    assert mixtral_refusal(moe) is None
    export_model(moe, "mixtral", tmp_path / "m")
    mix = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert_same_logits(logits(mix), logits(moe))


def test_unequal_expert_sizes_are_zero_padded(tmp_path):
    moe = tiny_moefy(n_experts=5, gating="softmax-renorm")  # 72 neurons: 15, 15, 14, 14, 14
    sizes = {s for layer in moe.config.moe_layers for s in layer["expert_sizes"]}
    assert len(sizes) > 1
    export_model(moe, "mixtral", tmp_path / "m")
    mix = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert mix.config.intermediate_size % 8 == 0
    assert_same_logits(logits(mix), logits(moe))


def test_mixtral_keeps_mistral_sliding_window():
    moe = tiny_moefy(family="mistral", gating="softmax-renorm")
    mix = to_mixtral(moe)
    assert mix.config.sliding_window == 64
    ids = calib_ids(n=1, seq=100, seed=2)  # longer than the window
    assert_same_logits(logits(mix, ids), logits(moe, ids))


def test_mixtral_refusal_via_cli_is_one_line_exit_15_and_writes_nothing(mask_ckpt, tmp_path, capsys):
    out = tmp_path / "mixtral"
    code, err = run_cli(["export", str(mask_ckpt), "--format", "mixtral", "--out", str(out)], capsys)
    assert code == ExportRefusedError.exit_code == 15
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    msg = errors[0]
    assert "top_k=1 or --gating softmax-renorm" in msg and "mask gating" in msg
    no_leftovers(tmp_path, "mixtral")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(n_shared=8, gating="softmax-renorm"), "shared"),
        (dict(layers=(1,), gating="softmax-renorm"), "every layer converted"),
        (dict(family="qwen2", gating="softmax-renorm"), "'qwen2'"),
        (dict(family="gemma", gating="softmax-renorm"), "'gemma'"),
        (dict(gating="softmax"), "softmax-renorm"),
    ],
)
def test_mixtral_refusals(kwargs, needle, tmp_path):
    moe = tiny_moefy(**kwargs)
    reason = mixtral_refusal(moe)
    assert reason is not None and needle in reason and "\n" not in reason
    with pytest.raises(ExportRefusedError):
        export_model(moe, "mixtral", tmp_path / "m")
    no_leftovers(tmp_path, "m")


def test_lapsum_router_is_refused():
    moe = tiny_moefy(gating="softmax-renorm")
    for layer in moe.model.model.layers:
        layer.mlp.router_type = "lapsum"
    for check in (mixtral_refusal, qwen2_moe_refusal, gguf_refusal):
        assert "router" in check(moe)


# ------------------------------------------------------------------------- qwen2-moe
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_shared=8, gating="softmax"),  # norm_topk_prob = false
        dict(n_shared=8, gating="softmax-renorm"),  # norm_topk_prob = true
        dict(n_shared=0, gating="softmax"),  # a zero one-neuron shared expert
        dict(n_shared=8, top_k=1, gating="mask"),
        dict(n_shared=8, gating="softmax", layers=(0,)),  # layer 1 stays dense: mlp_only_layers
        dict(family="qwen2", n_shared=8, gating="softmax-renorm"),  # q/k/v biases
        dict(n_experts=5, n_shared=8, gating="softmax"),  # unequal experts, zero-padded
    ],
)
def test_qwen2_moe_export_reloads_with_equal_logits(kwargs, tmp_path):
    moe = tiny_moefy(**kwargs)
    assert qwen2_moe_refusal(moe) is None
    export_model(moe, "qwen2-moe", tmp_path / "q")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert type(q).__name__ == "Qwen2MoeForCausalLM"
    assert q.config.norm_topk_prob == (kwargs["gating"] != "softmax")
    assert q.config.mlp_only_layers == ([1] if kwargs.get("layers") == (0,) else [])
    assert_same_logits(logits(q), logits(moe))


def test_qwen2_moe_via_cli(tmp_path, capsys):
    src = save(tiny_moefy(n_shared=8, gating="softmax"), tmp_path / "moe")
    code, err = run_cli(["export", str(src), "-f", "qwen2-moe", "-o", str(tmp_path / "q")], capsys)
    assert code == 0, err
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert_same_logits(logits(q), logits(AutoModelForCausalLM.from_pretrained(src).eval()))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(n_shared=8, gating="mask"), "mask gating"),
        (dict(family="mistral", gating="softmax"), "sliding-window"),
        (dict(family="phi3", gating="softmax"), "'phi3'"),
    ],
)
def test_qwen2_moe_refusals(kwargs, needle, tmp_path):
    moe = tiny_moefy(**kwargs)
    reason = qwen2_moe_refusal(moe)
    assert reason is not None and needle in reason
    with pytest.raises(ExportRefusedError):
        export_model(moe, "qwen2-moe", tmp_path / "q")
    no_leftovers(tmp_path, "q")


# ------------------------------------------------------------------------------ gguf
def gguf_field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def mixtral_from_gguf(path: Path) -> MixtralForCausalLM:
    """Rebuild the model llama.cpp would run from the GGUF tensors alone (inverse mapping)."""
    r = gguf.GGUFReader(str(path))
    t = {x.name: torch.from_numpy(np.array(x.data)).float() for x in r.tensors}
    n_layers = gguf_field(r, "llama.block_count")
    n_head, n_kv = gguf_field(r, "llama.attention.head_count"), gguf_field(r, "llama.attention.head_count_kv")
    tied = "output.weight" not in t
    cfg = MixtralConfig(
        vocab_size=t["token_embd.weight"].shape[0], hidden_size=gguf_field(r, "llama.embedding_length"),
        intermediate_size=gguf_field(r, "llama.feed_forward_length"), num_hidden_layers=n_layers,
        num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=gguf_field(r, "llama.rope.dimension_count"),
        rms_norm_eps=gguf_field(r, "llama.attention.layer_norm_rms_epsilon"),
        rope_parameters={"rope_type": "default", "rope_theta": gguf_field(r, "llama.rope.freq_base")},
        num_local_experts=gguf_field(r, "llama.expert_count"), num_experts_per_tok=gguf_field(r, "llama.expert_used_count"),
        max_position_embeddings=gguf_field(r, "llama.context_length"), tie_word_embeddings=tied,
    )
    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"],
          "lm_head.weight": t["token_embd.weight"] if tied else t["output.weight"]}
    for i in range(n_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t[b + "attn_norm.weight"]
        sd[p + "self_attn.q_proj.weight"] = unpermute_qk(t[b + "attn_q.weight"], n_head)
        sd[p + "self_attn.k_proj.weight"] = unpermute_qk(t[b + "attn_k.weight"], n_kv)
        sd[p + "self_attn.v_proj.weight"] = t[b + "attn_v.weight"]
        sd[p + "self_attn.o_proj.weight"] = t[b + "attn_output.weight"]
        sd[p + "post_attention_layernorm.weight"] = t[b + "ffn_norm.weight"]
        sd[p + "mlp.gate.weight"] = t[b + "ffn_gate_inp.weight"]
        sd[p + "mlp.experts.gate_up_proj"] = torch.cat([t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"]], 1)
        sd[p + "mlp.experts.down_proj"] = t[b + "ffn_down_exps.weight"]
    model = MixtralForCausalLM(cfg)
    model.load_state_dict(sd, strict=True)
    model.set_experts_implementation("eager")
    return model.eval()


def test_gguf_export_tensors_and_metadata(renorm_ckpt, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    code, err = run_cli(["export", str(renorm_ckpt), "--format", "gguf", "--out", str(out)], capsys)
    assert code == 0, err
    moe = AutoModelForCausalLM.from_pretrained(renorm_ckpt).eval()
    r = gguf.GGUFReader(str(out))
    assert gguf_field(r, "general.architecture") == "llama"
    assert gguf_field(r, "llama.expert_count") == 4 and gguf_field(r, "llama.expert_used_count") == 2
    assert gguf_field(r, "llama.feed_forward_length") == 18
    assert gguf_field(r, "tokenizer.ggml.model") == "no_vocab"  # the tiny model has no tokenizer
    t = {x.name: np.array(x.data) for x in r.tensors}
    mlp = moe.model.model.layers[1].mlp
    e = 2
    lo, hi = mlp.offsets[e], mlp.offsets[e + 1]
    assert t["blk.1.ffn_gate_exps.weight"].shape == (4, 18, 32)
    assert t["blk.1.ffn_down_exps.weight"].shape == (4, 32, 18)
    np.testing.assert_array_equal(t["blk.1.ffn_gate_exps.weight"][e], mlp.gate_proj.weight[lo:hi].detach().numpy())
    np.testing.assert_array_equal(t["blk.1.ffn_up_exps.weight"][e], mlp.up_proj.weight[lo:hi].detach().numpy())
    np.testing.assert_array_equal(t["blk.1.ffn_down_exps.weight"][e], mlp.down_proj.weight[:, lo:hi].detach().numpy())
    np.testing.assert_array_equal(t["blk.1.ffn_gate_inp.weight"], mlp.router.weight.detach().numpy())
    attn = moe.model.model.layers[0].self_attn
    np.testing.assert_array_equal(
        unpermute_qk(torch.from_numpy(t["blk.0.attn_q.weight"].copy()), 4).numpy(), attn.q_proj.weight.detach().numpy()
    )
    # the function llama.cpp computes from these tensors is the moefy model's
    assert_same_logits(logits(mixtral_from_gguf(out)), logits(moe))


def test_gguf_f16(tmp_path):
    moe = tiny_moefy(top_k=1, gating="mask")
    path = export_model(moe, "gguf", tmp_path / "m.gguf", dtype="f16")
    r = gguf.GGUFReader(str(path))
    types = {x.name: x.tensor_type for x in r.tensors}
    assert types["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    ref = logits(moe)
    assert (logits(mixtral_from_gguf(path)) - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(gating="mask"), "mask gating"),
        (dict(n_shared=8, gating="softmax-renorm"), "shared"),
        (dict(n_shared=8, gating="softmax"), "use --format gguf-qwen2moe"),
        (dict(family="mistral", gating="softmax-renorm"), "sliding-window"),
    ],
)
def test_gguf_refusals_leave_no_file(kwargs, needle, tmp_path):
    moe = tiny_moefy(**kwargs)
    assert needle in gguf_refusal(moe)
    with pytest.raises(ExportRefusedError):
        write_gguf(moe, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- gguf qwen2moe
def qwen2moe_from_gguf(path: Path) -> Qwen2MoeForCausalLM:
    """Rebuild, from the GGUF tensors alone, the model llama.cpp's qwen2moe graph computes: softmax
    over all experts, top-k, weights not renormalised (norm_topk_prob false), the shared expert
    gated by sigmoid(ffn_gate_inp_shexp . x); RoPE NEOX (HF's q/k row order); missing q/k/v biases
    are zero (llama.cpp adds none)."""
    r = gguf.GGUFReader(str(path))
    t = {x.name: torch.from_numpy(np.array(x.data)).float() for x in r.tensors}
    f = lambda key: gguf_field(r, f"qwen2moe.{key}")  # noqa: E731
    n_layers, hidden = f("block_count"), f("embedding_length")
    cfg = Qwen2MoeConfig(
        vocab_size=t["token_embd.weight"].shape[0], hidden_size=hidden, intermediate_size=f("feed_forward_length"),
        num_hidden_layers=n_layers, num_attention_heads=f("attention.head_count"),
        num_key_value_heads=f("attention.head_count_kv"), rms_norm_eps=f("attention.layer_norm_rms_epsilon"),
        rope_parameters={"rope_type": "default", "rope_theta": f("rope.freq_base")},
        max_position_embeddings=f("context_length"), tie_word_embeddings=False,
        num_experts=f("expert_count"), num_experts_per_tok=f("expert_used_count"), norm_topk_prob=False,
        moe_intermediate_size=f("expert_feed_forward_length"),
        shared_expert_intermediate_size=f("expert_shared_feed_forward_length"),
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False,
    )
    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"],
          "lm_head.weight": t["output.weight"]}
    for i in range(n_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t[b + "attn_norm.weight"]
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            w = t[b + theirs + ".weight"]
            sd[p + f"self_attn.{ours}.weight"] = w
            sd[p + f"self_attn.{ours}.bias"] = t.get(b + theirs + ".bias", torch.zeros(w.shape[0]))
        sd[p + "self_attn.o_proj.weight"] = t[b + "attn_output.weight"]
        sd[p + "post_attention_layernorm.weight"] = t[b + "ffn_norm.weight"]
        sd[p + "mlp.gate.weight"] = t[b + "ffn_gate_inp.weight"]
        sd[p + "mlp.experts.gate_up_proj"] = torch.cat([t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"]], 1)
        sd[p + "mlp.experts.down_proj"] = t[b + "ffn_down_exps.weight"]
        sd[p + "mlp.shared_expert.gate_proj.weight"] = t[b + "ffn_gate_shexp.weight"]
        sd[p + "mlp.shared_expert.up_proj.weight"] = t[b + "ffn_up_shexp.weight"]
        sd[p + "mlp.shared_expert.down_proj.weight"] = t[b + "ffn_down_shexp.weight"]
        sd[p + "mlp.shared_expert_gate.weight"] = t[b + "ffn_gate_inp_shexp.weight"].reshape(1, hidden)
    model = Qwen2MoeForCausalLM(cfg)
    model.load_state_dict(sd, strict=True)
    model.set_experts_implementation("eager")
    return model.eval()


def llamacpp_shexp_gates(model: Qwen2MoeForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The shared-expert gate as llama.cpp computes it, silu(z) / z, at every layer and token."""
    zs: list[torch.Tensor] = []
    hooks = [layer.mlp.shared_expert_gate.register_forward_hook(lambda m, i, o: zs.append(o.detach()))
             for layer in model.model.layers]
    logits(model, ids)
    for h in hooks:
        h.remove()
    z = torch.cat([x.flatten() for x in zs])
    return torch.nn.functional.silu(z) / z


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_shared=8, gating="softmax"),  # moefy's recommended layout: shared neurons + routed experts
        dict(n_shared=0, gating="softmax"),  # a one-neuron all-zero shared expert
        dict(n_experts=5, n_shared=8, gating="softmax"),  # unequal experts, zero-padded
        dict(n_experts=5, n_shared=8, top_k=1, gating="softmax"),
        dict(family="qwen2", n_shared=8, gating="softmax"),  # q/k/v biases travel
    ],
)
def test_gguf_qwen2moe_rebuilds_with_equal_logits(kwargs, tmp_path):
    moe = tiny_moefy(**kwargs)
    assert gguf_qwen2moe_refusal(moe) is None
    path = export_model(moe, "gguf-qwen2moe", tmp_path / "q.gguf")
    r = gguf.GGUFReader(str(path))
    assert gguf_field(r, "general.architecture") == "qwen2moe"
    n_experts = kwargs.get("n_experts", 4)
    assert gguf_field(r, "qwen2moe.expert_count") == n_experts
    assert gguf_field(r, "qwen2moe.expert_used_count") == kwargs.get("top_k", 2)
    assert gguf_field(r, "qwen2moe.expert_feed_forward_length") == -(-(72 - kwargs["n_shared"]) // n_experts)
    assert gguf_field(r, "qwen2moe.expert_shared_feed_forward_length") == max(1, kwargs["n_shared"])
    t = {x.name: np.array(x.data) for x in r.tensors}
    assert ("blk.0.attn_q.bias" in t) == (kwargs.get("family") == "qwen2")
    mlp = moe.model.model.layers[1].mlp
    ns = mlp.n_shared
    if ns:
        np.testing.assert_array_equal(t["blk.1.ffn_gate_shexp.weight"][:ns], mlp.gate_proj.weight[:ns].detach().numpy())
        np.testing.assert_array_equal(t["blk.1.ffn_down_shexp.weight"][:, :ns], 2 * mlp.down_proj.weight[:, :ns].detach().numpy())
    np.testing.assert_array_equal(t["blk.1.attn_q.weight"], moe.model.model.layers[1].self_attn.q_proj.weight.detach().numpy())
    assert (t["blk.1.ffn_gate_inp_shexp.weight"] == GGUF_SHEXP_GATE).all()  # not 0: llama.cpp's silu(0)/0 is NaN
    rebuilt = qwen2moe_from_gguf(path)
    assert_same_logits(logits(rebuilt), logits(moe))
    assert (llamacpp_shexp_gates(rebuilt, IDS) == 0.5).all()  # llama.cpp's sigmoid, exactly


def test_gguf_qwen2moe_via_cli_and_f16(tmp_path, capsys):
    src = save(tiny_moefy(n_shared=8, gating="softmax"), tmp_path / "moe")
    out = tmp_path / "q.gguf"
    code, err = run_cli(["export", str(src), "-f", "gguf-qwen2moe", "-o", str(out), "--dtype", "f16"], capsys)
    assert code == 0, err
    r = gguf.GGUFReader(str(out))
    types = {x.name: x.tensor_type for x in r.tensors}
    assert types["blk.0.ffn_up_exps.weight"] == types["blk.0.ffn_down_shexp.weight"] == gguf.GGMLQuantizationType.F16
    for name in ("ffn_gate_inp", "ffn_gate_inp_shexp", "attn_norm"):  # 2^-64 would be 0 in f16
        assert types[f"blk.0.{name}.weight"] == gguf.GGMLQuantizationType.F32
    ref = logits(AutoModelForCausalLM.from_pretrained(src).eval())
    assert (logits(qwen2moe_from_gguf(out)) - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_gguf_align_pads_experts_for_llamacpp_quantization(tmp_path, capsys):
    """--gguf-align 32: expert and shared widths a multiple of 32 (llama.cpp's Q8_0/Q5_0/Q4_0 block
    along a row), padded with zero neurons, same function; refused for non-GGUF formats."""
    src = save(tiny_moefy(n_experts=5, n_shared=8, gating="softmax"), tmp_path / "moe")  # experts of 13 and 12
    out = tmp_path / "q.gguf"
    code, err = run_cli(["export", str(src), "-f", "gguf-qwen2moe", "-o", str(out), "--gguf-align", "32"], capsys)
    assert code == 0, err
    r = gguf.GGUFReader(str(out))
    assert gguf_field(r, "qwen2moe.expert_feed_forward_length") == gguf_field(r, "qwen2moe.expert_shared_feed_forward_length") == 32
    t = {x.name: np.array(x.data) for x in r.tensors}
    assert t["blk.0.ffn_down_exps.weight"].shape == (5, 32, 32) and t["blk.0.ffn_down_shexp.weight"].shape == (32, 32)
    assert_same_logits(logits(qwen2moe_from_gguf(out)), logits(AutoModelForCausalLM.from_pretrained(src).eval()))
    code, err = run_cli(["export", str(src), "-f", "gguf", "-o", str(tmp_path / "l.gguf"), "--gguf-align", "32"], capsys)
    assert code == ExportRefusedError.exit_code  # softmax gating + shared neurons: not the llama architecture
    code, err = run_cli(["export", str(src), "-f", "qwen2-moe", "-o", str(tmp_path / "hf"), "--gguf-align", "32"], capsys)
    assert code == 14 and "--gguf-align applies to the GGUF formats" in err


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(n_shared=8, gating="mask"), "mask gating"),
        (dict(n_shared=8, top_k=1, gating="mask"), "mask gating"),
        (dict(n_shared=8, gating="softmax-renorm"), "softmax-renorm gating"),
        (dict(n_shared=8, gating="softmax", layers=(0,)), "every layer converted"),
        (dict(family="mistral", gating="softmax"), "sliding-window"),
        (dict(family="phi3", gating="softmax"), "'phi3'"),
    ],
)
def test_gguf_qwen2moe_refusals_are_one_line_exit_15_and_write_nothing(kwargs, needle, tmp_path, capsys):
    moe = tiny_moefy(**kwargs)
    reason = gguf_qwen2moe_refusal(moe)
    assert reason is not None and needle in reason and "\n" not in reason
    src = save(moe, tmp_path / "moe")
    code, err = run_cli(["export", str(src), "-f", "gguf-qwen2moe", "-o", str(tmp_path / "q.gguf")], capsys)
    assert code == ExportRefusedError.exit_code == 15
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and needle in errors[0], err
    no_leftovers(tmp_path, "q.gguf")


# ---------------------------------------------------------------------- atomicity
def test_failed_hf_write_leaves_nothing(tmp_path, monkeypatch):
    moe = tiny_moefy(gating="softmax-renorm")

    def boom(self, path, **kw):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(MixtralForCausalLM, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        export_model(moe, "mixtral", tmp_path / "m")
    no_leftovers(tmp_path, "m")


def test_failed_gguf_write_leaves_nothing(tmp_path, monkeypatch):
    moe = tiny_moefy(gating="softmax-renorm")

    def boom(self, *a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError):
        write_gguf(moe, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(renorm_ckpt, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, err = run_cli(["export", str(renorm_ckpt), "--format", "mixtral", "--out", str(out)], capsys)
    assert code == OutputExistsError.exit_code and "--overwrite" in err
    code, err = run_cli(["export", str(renorm_ckpt), "--format", "mixtral", "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    no_leftovers(tmp_path, "nothing")


def test_bad_inputs(renorm_ckpt, tmp_path, capsys):
    code, err = run_cli(["export", str(renorm_ckpt), "--format", "onnx", "--out", str(tmp_path / "x")], capsys)
    assert code == 14 and "hf, mixtral, qwen2-moe, gguf" in err
    code, err = run_cli(["export", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "x")], capsys)
    assert code == 3
    dense = tmp_path / "dense"
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(dense)
    code, err = run_cli(["export", str(dense), "--format", "mixtral", "--out", str(tmp_path / "x")], capsys)
    assert code == UnsupportedModelError.exit_code and "not a moefy checkpoint" in err
    code, err = run_cli(["export", str(renorm_ckpt), "--format", "gguf", "--dtype", "q4", "--out", str(tmp_path / "x.gguf")], capsys)
    assert code == 14
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.gguf").exists()


def test_export_model_gating_override(tmp_path):
    moe = tiny_moefy(gating="mask")
    export_model(moe, "mixtral", tmp_path / "m", gating="softmax-renorm")
    assert moe.config.gating == "mask"  # the caller's model is unchanged
    mix = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert_same_logits(logits(mix), logits(tiny_moefy(gating="softmax-renorm")))


def test_set_gating_changes_every_layer():
    moe = set_gating(tiny_moefy(), "softmax-renorm")
    assert moe.config.gating == "softmax-renorm"
    assert all(layer.mlp.gating == "softmax-renorm" for layer in moe.model.model.layers)


# ------------------------------------------------------------- real tokenizer (stories260K)
@needs_shared()
def test_stories260k_gguf_carries_the_tokenizer_and_mixtral_matches(tmp_path, capsys):
    from moefy.config import ConvertConfig
    from moefy.convert import layerwise_stage
    from moefy.export import to_moefy_model

    dense = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tok = AutoTokenizer.from_pretrained(STORIES)
    cfg = ConvertConfig(n_experts=4, top_k=1, calib_tokens=512, seq_len=64, steps=2, weights="none", eval_every=1)
    layerwise_stage(dense, torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0)), cfg, batch=4)
    src = save(to_moefy_model(dense), tmp_path / "moe", tokenizer=tok)
    code, err = run_cli(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "s.gguf")], capsys)
    assert code == 0, err
    r = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    assert gguf_field(r, "tokenizer.ggml.model") == "llama"
    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 512
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[100] == tok.convert_ids_to_tokens(100)
    assert gguf_field(r, "tokenizer.ggml.bos_token_id") == 1 and gguf_field(r, "tokenizer.ggml.eos_token_id") == 2
    ids = tok("Once upon a time there was a little dog", return_tensors="pt").input_ids
    moe = AutoModelForCausalLM.from_pretrained(src).eval()
    assert_same_logits(logits(mixtral_from_gguf(tmp_path / "s.gguf"), ids), logits(moe, ids))
    code, err = run_cli(["export", str(src), "--format", "mixtral", "--out", str(tmp_path / "mix")], capsys)
    assert code == 0, err
    mix = AutoModelForCausalLM.from_pretrained(tmp_path / "mix").eval()
    assert_same_logits(logits(mix, ids), logits(moe, ids))
    assert AutoTokenizer.from_pretrained(tmp_path / "mix")("Once").input_ids == tok("Once").input_ids


def test_trained_softmax_renorm_model_exports_to_mixtral(tmp_path):
    """--gating softmax-renorm end to end: convert, then a stock Mixtral export equal in logits."""
    import pytest

    from conftest import STORIES, TINYSTORIES

    if not STORIES.exists():
        pytest.skip("../shared not present")
    import torch
    from transformers import AutoModelForCausalLM

    from moefy.config import ConvertConfig
    from moefy.runner import run_convert
    from moefy.serving_export import export_checkpoint

    cfg = ConvertConfig(n_experts=4, top_k=2, gating="softmax-renorm", calib_tokens=1024, seq_len=64, steps=3)
    res = run_convert(str(STORIES), tmp_path / "moe", cfg, [str(TINYSTORIES)], log=lambda *_: None)
    export_checkpoint(res.out, "mixtral", tmp_path / "mixtral")
    ids = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(res.out)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral")(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)


@needs_shared()
@pytest.mark.parametrize("gating", ["softmax", "softmax-renorm"])
def test_converted_with_exportable_gating_serves_as_qwen2_moe(gating, tmp_path, capsys):
    """`moefy convert --gating softmax|softmax-renorm` with shared neurons trains under the rule it
    exports, so its checkpoint is a stock Qwen2-MoE with equal logits and no retraining."""
    from conftest import TINYSTORIES

    out = tmp_path / "moe"
    code, err = run_cli(["convert", str(STORIES), "--experts", "4", "--top-k", "2", "--shared", "32", "--shared-by", "importance",
                         "--gating", gating, "--calib", str(TINYSTORIES), "--calib-tokens", "2048", "--seq-len", "64",
                         "--steps", "4", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["gating"] == gating
    code, err = run_cli(["export", str(out), "-f", "qwen2-moe", "-o", str(tmp_path / "q")], capsys)
    assert code == 0, err
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert q.config.norm_topk_prob == (gating == "softmax-renorm")
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(5))
    assert_same_logits(logits(q, ids), logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids))
