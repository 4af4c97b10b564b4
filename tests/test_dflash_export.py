"""Export of block drafters to vLLM's DFlash format: names, shapes and values round-trip; a drafter in the
DFlash layout computes, from the exported tensors alone and the way vLLM's DFlash drafter does, exactly its
own drafts; the CLI; and vLLM serving the shipped drafter's export losslessly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import run_cli_here
from safetensors.torch import load_file
from test_vllm_engine import SHORT, loop, ray_local, replica, run_all, start_core  # noqa: F401 (shared fixtures)

from specserve.config import SamplingParams
from specserve.drafters.block import BlockDrafterConfig, build_model, default_checkpoint, save_checkpoint
from specserve.drafters.block.dflash import MASK_EMBEDDING_FILE, WEIGHTS_FILE, export_dflash

#: The tiny target has 2 layers: tapping only layer 0 keeps clear of the last layer's final-norm difference.
EXACT = BlockDrafterConfig(block_size=4, num_layers=2, target_layers=(0,), draft_vocab_size=512,
                           qk_norm=True, last_context_input=False, mask_rows=True)
SHIPPED_LAYOUT = BlockDrafterConfig(block_size=4, num_layers=1, target_layers=(0, 1), draft_vocab_size=512)


def random_drafter(cfg: BlockDrafterConfig, target, seed: int = 0):
    """A drafter with every weight random (norms near, not at, one) and a random draft vocabulary."""
    torch.manual_seed(seed)
    model = build_model(cfg, target, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
        model.set_draft_vocab(torch.randperm(model.target_vocab_size)[: cfg.draft_vocab_size])
    return model


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """vLLM's neox-style rotary embedding of x [T, heads, d] at positions pos [T]."""
    d = x.shape[-1]
    angles = pos[:, None].double() * (1.0 / theta ** (torch.arange(0, d, 2).double() / d))  # [T, d/2]
    cos, sin = (torch.cat([angles, angles], -1)[:, None].float().cos(), torch.cat([angles, angles], -1)[:, None].float().sin())
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def dflash_reference(out_dir, embed: torch.Tensor, features: torch.Tensor, anchor: int, k: int):
    """Draft logits [k, target vocab] the way vLLM's DFlash drafter computes them, from the export alone.

    Context: target features [n, F] -> fc -> hidden_norm -> each layer's k/v projection -> k_norm -> RoPE at
    0..n-1. Queries: the anchor at n and k masks (the mask embedding) at n+1..n+k, non-causal attention over
    context and queries, Qwen3 layers, final norm; the k mask rows through the draft head, scattered to
    target ids i + d2t[i]. ``embed`` is the target's token embedding (vLLM shares it).
    """
    cfg = json.loads((out_dir / "config.json").read_text())
    w = load_file(str(out_dir / WEIGHTS_FILE))
    mask = torch.load(out_dir / MASK_EMBEDDING_FILE, weights_only=True)
    eps, theta, d = cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"], cfg["head_dim"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    n = features.shape[0]
    ctx = rms(features @ w["fc.weight"].T, w["hidden_norm.weight"], eps)  # [n, hidden]
    x = torch.stack([embed[anchor]] + [mask["embedding"]] * k)  # [k + 1, hidden]
    pos_q, pos_c = torch.arange(n, n + k + 1), torch.arange(n)
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."

        def keys_values(h, pos, p=p):
            key = rms((h @ w[p + "self_attn.k_proj.weight"].T).view(len(h), kv_heads, d), w[p + "self_attn.k_norm.weight"], eps)
            return rope(key, pos, theta), (h @ w[p + "self_attn.v_proj.weight"].T).view(len(h), kv_heads, d)

        h = rms(x, w[p + "input_layernorm.weight"], eps)
        q = rope(rms((h @ w[p + "self_attn.q_proj.weight"].T).view(len(h), heads, d), w[p + "self_attn.q_norm.weight"], eps),
                 pos_q, theta)  # [k + 1, heads, d]
        kc, vc = keys_values(ctx, pos_c)
        kq, vq = keys_values(h, pos_q)
        keys = torch.cat([kc, kq]).repeat_interleave(heads // kv_heads, 1)  # [n + k + 1, heads, d]
        values = torch.cat([vc, vq]).repeat_interleave(heads // kv_heads, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, keys) / math.sqrt(d), -1)  # no causal mask
        x = x + torch.einsum("hqk,khd->qhd", att, values).reshape(len(x), -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    draft = rms(x, w["norm.weight"], eps)[1:] @ w["lm_head.weight"].T  # [k, draft vocab]
    logits = torch.full((k, cfg["vocab_size"]), float("-inf"))
    logits[:, torch.arange(cfg["draft_vocab_size"]) + w["d2t"]] = draft
    return logits


def test_export_writes_every_weight_under_vllms_names_and_they_round_trip(tiny_target, tmp_path):
    model = random_drafter(EXACT, tiny_target)
    result = export_dflash(model, tiny_target, tmp_path)
    w = load_file(str(tmp_path / WEIGHTS_FILE))
    layer = {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj"}
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight", "lm_head.weight", "d2t"}
    expected |= {f"layers.{i}.{name}.weight" for i in range(EXACT.num_layers) for name in layer}
    assert set(w) == expected
    assert torch.equal(w["fc.weight"], model.fc.weight) and torch.equal(w["hidden_norm.weight"], model.ctx_norm.weight)
    assert torch.equal(w["layers.1.self_attn.k_norm.weight"], model.layers[1].k_norm.weight)
    assert torch.equal(w["layers.0.mlp.down_proj.weight"], model.layers[0].down_proj.weight)
    # The draft head is the target's rows; vLLM maps draft index i to target id i + d2t[i].
    assert w["d2t"].dtype == torch.int64
    assert torch.equal(torch.arange(512) + w["d2t"], model.draft_vocab)
    assert torch.equal(w["lm_head.weight"], tiny_target.model.get_output_embeddings().weight[model.draft_vocab])
    mask = torch.load(tmp_path / MASK_EMBEDDING_FILE, weights_only=True)
    assert mask["mask_token_id"] == result.mask_token_id and torch.equal(mask["embedding"], model.mask_embedding)

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"]["target_layer_ids"] == [0] and cfg["dflash_config"]["mask_token_id"] == result.mask_token_id
    assert (cfg["num_hidden_layers"], cfg["draft_vocab_size"], cfg["vocab_size"]) == (2, 512, tiny_target.model.config.vocab_size)
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["num_key_value_heads"], cfg["block_size"]) == (64, 16, 2, 5)
    # The mask id is neither a special token nor one the drafter drafts.
    assert result.mask_token_id not in model.draft_vocab.tolist()
    assert result.mask_token_id not in tiny_target.tokenizer.all_special_ids
    assert result.num_speculative_tokens == EXACT.block_size and result.differences == ()


@pytest.mark.parametrize("n", [1, 9], ids=["one-token-context", "nine-token-context"])
def test_vllms_dflash_forward_of_the_export_equals_the_drafters_own_in_the_dflash_layout(tiny_target, tmp_path, n):
    model = random_drafter(EXACT, tiny_target, seed=n)
    export_dflash(model, tiny_target, tmp_path)
    torch.manual_seed(100 + n)
    features = torch.randn(n, 64)  # [n, len(target_layers) * hidden]
    anchor = 1234
    with torch.no_grad():
        c = model.fuse(features[None])  # [1, n, hidden]
        kv = model.context_kv(c, torch.arange(n)[None])
        hidden = model.block_hidden(kv, c[:, -1:], torch.tensor([[anchor]]), torch.tensor([[n]]))  # [1, 1, K, hidden]
        ours = model.logits(hidden)[0, 0]  # [K, draft vocab]
        embed = tiny_target.model.get_input_embeddings().weight
        theirs = dflash_reference(tmp_path, embed, features, anchor, EXACT.block_size)  # [K, vocab]
    torch.testing.assert_close(theirs[:, model.draft_vocab], ours, rtol=1e-5, atol=1e-5)
    assert torch.isinf(theirs).sum() == EXACT.block_size * (theirs.shape[1] - 512)
    assert torch.equal(theirs.argmax(-1), model.to_target_ids(ours.argmax(-1)))


def test_the_shipped_layout_exports_with_each_difference_from_vllms_forward_named(tiny_target, tmp_path):
    model = random_drafter(SHIPPED_LAYOUT, tiny_target)
    result = export_dflash(model, tiny_target, tmp_path)
    text = " ".join(result.differences)
    assert len(result.differences) == 4
    for phrase in ("q_norm/k_norm", "newest fused context", "one position late", "final norm"):
        assert phrase in text
    # vLLM's query block [anchor, k masks] is the drafter's own block at k = block_size - 1; unit q/k norms.
    assert result.num_speculative_tokens == SHIPPED_LAYOUT.block_size - 1
    w = load_file(str(tmp_path / WEIGHTS_FILE))
    assert torch.equal(w["layers.0.self_attn.q_norm.weight"], torch.ones(16))


def test_cli_exports_a_checkpoint_and_says_how_to_serve_it(tiny_target, tiny_dir, tmp_path):
    ckpt = save_checkpoint(tmp_path / "drafter.pt", random_drafter(SHIPPED_LAYOUT, tiny_target), tiny_target)
    out = run_cli_here("export-dflash", "--drafter", str(ckpt), "--model", str(tiny_dir), "--out", str(tmp_path / "x"))
    assert out.returncode == 0, out.stderr
    assert '"method": "dflash"' in out.stdout and '"num_speculative_tokens": 3' in out.stdout
    assert "not exact" in out.stdout
    assert (tmp_path / "x" / WEIGHTS_FILE).is_file() and (tmp_path / "x" / MASK_EMBEDDING_FILE).is_file()


@pytest.mark.parametrize("args, named", [
    (["--drafter", "/no/such.pt"], "--drafter"),
    (["--drafter", "CKPT", "--mask-token-id", "-1"], "--mask-token-id"),
    (["--drafter", "CKPT", "--model", "/no/such/model"], "--model"),
    (["--drafter", "CKPT", "--out-is-a-file"], "--out"),
])
def test_cli_bad_input_is_one_line_naming_the_parameter(tiny_target, tiny_dir, tmp_path, args, named):
    ckpt = save_checkpoint(tmp_path / "drafter.pt", random_drafter(SHIPPED_LAYOUT, tiny_target), tiny_target)
    out_dir = tmp_path / "out"
    if "--out-is-a-file" in args:
        args = [a for a in args if a != "--out-is-a-file"]
        out_dir.write_text("")
    args = [str(ckpt) if a == "CKPT" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_dir)]
    out = run_cli_here("export-dflash", *args, "--out", str(out_dir))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), out.stderr


# vLLM on the real target. The engines are started through the project's own vLLM core (drafter.vllm_placement
# 'vllm_builtin', vllm_builtin_method 'dflash'), with the helpers of test_vllm_engine.
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.real_model
@pytest.mark.usefixtures("ray_local")
def test_vllm_serving_the_exported_shipped_drafter_is_token_identical_to_plain_vllm(default_dir, tmp_path, loop):  # noqa: F811
    pytest.importorskip("vllm")
    from specserve.config import ModelConfig
    from specserve.models import ModelInfo

    checkpoint = default_checkpoint()
    if checkpoint is None:
        pytest.skip("the shipped block drafter is not installed")
    result = export_dflash(checkpoint, default_dir, tmp_path / "dflash")
    info = ModelInfo.load(ModelConfig())
    prompts = [info.encode(p, chat=True) for p in SHORT]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    outputs = {}
    for name, drafter in [("plain", {"kind": "none", "num_speculative_tokens": 0}),
                          ("dflash", {"kind": "none", "vllm_placement": "vllm_builtin", "vllm_builtin_method": "dflash",
                                      "path": str(result.out_dir),
                                      "num_speculative_tokens": result.num_speculative_tokens})]:
        core = start_core(loop, replica(drafter))
        try:
            outputs[name] = run_all(loop, core, prompts, params)
        finally:
            core.shutdown()
    assert [t for t, _ in outputs["dflash"]] == [t for t, _ in outputs["plain"]]
    drafted = sum(last.stats["num_draft_tokens"] for _, last in outputs["dflash"])
    assert drafted > 0, "vLLM ran the DFlash drafter"

