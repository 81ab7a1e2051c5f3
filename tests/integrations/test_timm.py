"""attnzoo.integrations.timm: timm ViTs with attnzoo mechanisms.

References are timm's own models: with ``softmax`` the swapped model must equal the original;
with a spatial mechanism it must equal the original run with a hand-written dense ``attn_mask``
(timm: bool, True = attend) that states the pattern: prefix rows and columns all True, patch
pairs by NATTEN's window rule (neighborhood) or Swin's window ids (window). Exactness is
asserted in float64; tiny configs (depth 2, 3-5 patches a side) keep the file fast.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("timm")  # tests/conftest.py made torchvision importable first
import timm  # noqa: E402

from attnzoo.errors import ParameterError, ShapeError, UnknownMechanismError  # noqa: E402
from attnzoo.integrations.timm import AttnzooAttention, swap_attention, track_grid  # noqa: E402

import attnzoo  # noqa: E402

TINY = dict(pretrained=False, depth=2)


def make(name: str, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **kwargs}).to(dtype).eval()


def images(h: int, w: int, dtype=torch.float64, batch: int = 2):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1), dtype=dtype)


# ---- hand-written patterns over (H, W) patches, row-major like timm's flatten ----------------
def natten_window(i: int, length: int, kernel: int) -> range:
    """NATTEN's 1D window (dilation 1): centred, shifted inward at the borders."""
    start = min(max(i - kernel // 2, 0), length - kernel)
    return range(start, start + kernel)


def neighborhood_pairs(gh: int, gw: int, kernel: int) -> torch.Tensor:
    allowed = torch.zeros(gh * gw, gh * gw, dtype=torch.bool)
    for y in range(gh):
        for x in range(gw):
            for ky in natten_window(y, gh, kernel):
                for kx in natten_window(x, gw, kernel):
                    allowed[y * gw + x, ky * gw + kx] = True
    return allowed


def window_pairs(gh: int, gw: int, size: int) -> torch.Tensor:
    ids = torch.tensor([(y // size) * gw + (x // size) for y in range(gh) for x in range(gw)])
    return ids[:, None] == ids[None, :]


def with_prefix(patch_pairs: torch.Tensor, prefix: int) -> torch.Tensor:
    """Prefix tokens attend to all and are attended by all; patches by ``patch_pairs``."""
    n = prefix + patch_pairs.shape[0]
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[prefix:, prefix:] = patch_pairs
    return mask


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_model_outputs(swapped, reference, x, ref_kwargs, atol, kwargs=None):
    """Features (every token of the last block) and every parameter gradient agree.

    ``swapped.forward_features(x, **kwargs)`` against ``reference.forward_features(x, **ref_kwargs)``;
    all tokens, not the class token's head, so every layer's patch rows reach the loss.
    """
    out, ref = swapped.forward_features(x, **(kwargs or {})), reference.forward_features(x, **ref_kwargs)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    got, want = grads(swapped), grads(reference)
    assert got.keys() == want.keys() and {f"blocks.{i}.attn.qkv.weight" for i in range(2)} <= got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-7, msg=name)


# ---- softmax: the swapped model is the original ---------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", dict(img_size=64)),  # 1 class token, 4x4 patches
        ("deit_tiny_distilled_patch16_224", dict(img_size=(48, 64))),  # class + distillation token, 3x4
        ("vit_tiny_patch16_224", dict(img_size=48, class_token=False, reg_tokens=2, global_pool="avg", qk_norm=True)),
    ],
    ids=["vit", "deit-distilled", "vit-reg2-qknorm"],
)
def test_swap_softmax_equals_original_float32(name, kwargs):
    original = make(name, torch.float32, **kwargs)
    swapped = swap_attention(copy.deepcopy(original), "softmax")
    assert sum(isinstance(m, AttnzooAttention) for m in swapped.modules()) == 2
    assert swapped.state_dict().keys() == original.state_dict().keys()
    size = original.patch_embed.img_size
    x = images(*size, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), original(x), atol=1e-5, rtol=0)


def test_swap_shares_weights_in_place():
    model = make("vit_tiny_patch16_224", img_size=32)
    qkv = model.blocks[0].attn.qkv
    assert swap_attention(model, "softmax") is model
    assert model.blocks[0].attn.qkv is qkv  # the same parameters: an optimizer built before still trains them


def test_softmax_honors_attn_mask_and_is_causal():
    original = make("vit_tiny_patch16_224", img_size=32)  # 1 + 2x2 = 5 tokens
    swapped = swap_attention(copy.deepcopy(original), "softmax")
    x = images(32, 32)
    keep = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(3)) > 0.5
    keep |= torch.eye(5, dtype=torch.bool)  # every row keeps a key
    additive = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for kwargs in (dict(attn_mask=keep), dict(attn_mask=additive), dict(is_causal=True)):
        assert_same_model_outputs(swapped, original, x, kwargs, atol=1e-10, kwargs=kwargs)
        swapped.zero_grad(), original.zero_grad()
        assert not torch.allclose(swapped(x, **kwargs), original(x)), kwargs  # the mask changed something


# ---- spatial mechanisms: patches on their grid, prefix tokens global ------------------------
@pytest.mark.parametrize(
    "name, kwargs, prefix",
    [
        ("vit_tiny_patch16_224", dict(img_size=(48, 64)), 1),
        ("deit_tiny_distilled_patch16_224", dict(img_size=(48, 64)), 2),
        ("vit_tiny_patch16_224", dict(img_size=(48, 64), class_token=False, global_pool="avg"), 0),
    ],
    ids=["cls", "cls+dist", "no-prefix"],
)
def test_neighborhood_equals_masked_original(name, kwargs, prefix):
    original = make(name, **kwargs)
    swapped = swap_attention(copy.deepcopy(original), "neighborhood", kernel_size=3)
    assert swapped.num_prefix_tokens == prefix
    mask = with_prefix(neighborhood_pairs(3, 4, 3), prefix)
    assert_same_model_outputs(swapped, original, images(48, 64), dict(attn_mask=mask), atol=1e-10)


def test_neighborhood_rpb_equals_additive_masked_original():
    """NAT's relative position bias rpb[h, y - x + k - 1] on patch pairs; 0 to and from the prefix."""
    original = make("vit_tiny_patch16_224", img_size=(48, 64))
    rpb = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    swapped = swap_attention(copy.deepcopy(original), "neighborhood", kernel_size=3, rpb=rpb)
    allowed = neighborhood_pairs(3, 4, 3)
    bias = torch.full((3, 13, 13), float("-inf"), dtype=torch.float64)
    bias[:, :1, :] = bias[:, :, :1] = 0.0
    for qi, ki in allowed.nonzero().tolist():
        dy, dx = ki // 4 - qi // 4, ki % 4 - qi % 4
        bias[:, 1 + qi, 1 + ki] = rpb[:, dy + 2, dx + 2]
    assert_same_model_outputs(swapped, original, images(48, 64), dict(attn_mask=bias[None]), atol=1e-10)
    # a learnable rpb gets its gradient through the LSE that joins the prefix token, too
    learned = rpb.clone().requires_grad_()
    learnable = swap_attention(copy.deepcopy(original), "neighborhood", kernel_size=3, rpb=learned)
    target = rpb.clone().requires_grad_()
    dense = torch.full((3, 13, 13), float("-inf"), dtype=torch.float64)
    dense[:, :1, :] = dense[:, :, :1] = 0.0
    for qi, ki in allowed.nonzero().tolist():
        dy, dx = ki // 4 - qi // 4, ki % 4 - qi % 4
        dense[:, 1 + qi, 1 + ki] = target[:, dy + 2, dx + 2]
    weights = torch.randn(2, 13, 192, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (learnable.forward_features(images(48, 64)) * weights).sum().backward()
    (original.forward_features(images(48, 64), attn_mask=dense[None]) * weights).sum().backward()
    torch.testing.assert_close(learned.grad, target.grad, atol=1e-10, rtol=1e-7)


def test_window_equals_masked_original():
    original = make("vit_tiny_patch16_224", img_size=64)  # 4x4 patches, 2x2 windows
    swapped = swap_attention(copy.deepcopy(original), "window", window_size=2)
    mask = with_prefix(window_pairs(4, 4, 2), 1)
    assert_same_model_outputs(swapped, original, images(64, 64), dict(attn_mask=mask), atol=1e-10)


def test_dynamic_image_size_follows_the_grid():
    original = make("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True)
    swapped = swap_attention(copy.deepcopy(original), "neighborhood", kernel_size=3)
    for h, w in ((48, 80), (64, 48)):
        mask = with_prefix(neighborhood_pairs(h // 16, w // 16, 3), 1)
        with torch.no_grad():
            torch.testing.assert_close(swapped(images(h, w)), original(images(h, w), attn_mask=mask), atol=1e-10, rtol=0)
    copied = copy.deepcopy(swapped)  # the copy tracks its own grid
    with torch.no_grad():
        torch.testing.assert_close(copied(images(48, 80)), swapped(images(48, 80)), atol=0, rtol=0)


def test_one_dimensional_mechanism_sees_the_whole_sequence():
    layer = make("vit_tiny_patch16_224", img_size=32).blocks[0].attn
    swapped = swap_attention(layer, "linear", feature_map="elu")
    assert isinstance(swapped, AttnzooAttention) and swapped.qkv is layer.qkv
    x = torch.randn(2, 5, 192, dtype=torch.float64)
    q, k, v = layer.qkv(x).reshape(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
    expected = layer.proj(attnzoo.attention(q, k, v, "linear", feature_map="elu").transpose(1, 2).reshape(2, 5, 192))
    torch.testing.assert_close(swapped(x), expected, atol=1e-12, rtol=0)


# ---- attn_layer through timm.create_model ---------------------------------------------------
def test_attn_layer_softmax_loads_original_state_dict():
    original = make("vit_tiny_patch16_224", img_size=32)
    built = make("vit_tiny_patch16_224", img_size=32, attn_layer=AttnzooAttention.partial("softmax"))
    assert all(type(b.attn).__name__ == "AttnzooAttention_softmax" for b in built.blocks)
    built.load_state_dict(original.state_dict(), strict=True)
    assert_same_model_outputs(built, original, images(32, 32), {}, atol=1e-10)


def test_attn_layer_neighborhood_with_track_grid_or_static_grid():
    original = make("vit_tiny_patch16_224", img_size=(48, 64))
    reference = original(images(48, 64), attn_mask=with_prefix(neighborhood_pairs(3, 4, 3), 1))
    tracked = make("vit_tiny_patch16_224", img_size=(48, 64), attn_layer=AttnzooAttention.partial("neighborhood", kernel_size=3))
    tracked.load_state_dict(original.state_dict(), strict=True)
    with pytest.raises(ParameterError, match="track_grid") as info:
        tracked(images(48, 64))
    assert info.value.argument == "grid_size"
    torch.testing.assert_close(track_grid(tracked)(images(48, 64)), reference, atol=1e-10, rtol=0)
    layer = AttnzooAttention.partial("neighborhood", kernel_size=3, grid_size=(3, 4), num_prefix_tokens=1)
    static = make("vit_tiny_patch16_224", img_size=(48, 64), attn_layer=layer)
    static.load_state_dict(original.state_dict(), strict=True)
    torch.testing.assert_close(static(images(48, 64)), reference, atol=1e-10, rtol=0)


# ---- errors ---------------------------------------------------------------------------------
def test_non_vit_model_is_refused_naming_what_it_has():
    from timm.models.swin_transformer import WindowAttention

    with pytest.raises(ParameterError, match="no timm Attention.*WindowAttention") as info:
        swap_attention(torch.nn.Sequential(WindowAttention(16, num_heads=2)), "softmax")
    assert info.value.argument == "model"


def test_unknown_mechanism_and_parameters():
    model = make("vit_tiny_patch16_224", img_size=32)
    with pytest.raises(UnknownMechanismError, match="registered"):
        swap_attention(model, "no_such_attention")
    with pytest.raises(UnknownMechanismError):
        AttnzooAttention.partial("no_such_attention")
    for bad in ("kernel_sz", "return_lse"):
        with pytest.raises(ParameterError) as info:
            swap_attention(model, "neighborhood", kernel_size=3, **{bad: 1})
        assert info.value.argument == bad
    with pytest.raises(ParameterError) as info:  # checked against the 2x2 grid when swapping
        swap_attention(model, "neighborhood", kernel_size=5)
    assert info.value.argument == "kernel_size"
    assert isinstance(model.blocks[0].attn, timm.layers.Attention)  # nothing was swapped


def test_masks_and_dropout_refused_where_not_exact():
    model = swap_attention(make("vit_tiny_patch16_224", img_size=32), "neighborhood", kernel_size=1)
    x = images(32, 32)
    for kwargs, argument in ((dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), "attn_mask"), (dict(is_causal=True), "is_causal")):
        with pytest.raises(ParameterError) as info:
            model(x, **kwargs)
        assert info.value.argument == argument
    linear = swap_attention(make("vit_tiny_patch16_224", img_size=32), "linear")
    with pytest.raises(ParameterError, match="bias") as info:
        linear(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    assert info.value.argument == "attn_mask"
    dropping = swap_attention(make("vit_tiny_patch16_224", img_size=32, attn_drop_rate=0.1), "softmax")
    dropping(x)  # eval: no dropout to apply
    with pytest.raises(ParameterError) as info:
        dropping.train()(x)
    assert info.value.argument == "attn_drop"


def test_token_count_off_the_grid_and_mechanism_without_lse():
    model = swap_attention(make("vit_tiny_patch16_224", img_size=32), "neighborhood", kernel_size=1)
    with pytest.raises(ShapeError, match="2x2 patch grid") as info:
        model.blocks[0].attn(torch.randn(1, 7, 192, dtype=torch.float64))
    assert info.value.argument == "x"
    varying = swap_attention(make("vit_tiny_patch16_224", img_size=64), "varying_window", window_size=2, ratio=2)
    with pytest.raises(ParameterError, match="log-sum-exp") as info:
        varying(images(64, 64))
    assert info.value.argument == "mechanism"


# ---- the torchvision shim ---------------------------------------------------------------------
def test_timm_and_transformers_import_in_a_fresh_process():
    """What a user runs: attnzoo's integrations first, then timm, torchvision and transformers' models."""
    import subprocess
    import sys

    script = (
        "import importlib.util\n"
        "import attnzoo.integrations.timm\n"
        "import timm, torchvision\n"
        "if importlib.util.find_spec('transformers'):\n"
        "    from transformers import BertModel\n"
        "print('imported', torchvision.extension._has_ops())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("imported")


def test_torchvision_ops_without_their_library_fail_with_torchvision_error():
    import torchvision

    from attnzoo.integrations._torchvision import ensure_importable

    assert ensure_importable() is False  # idempotent: torchvision is imported by now
    if torchvision.extension._has_ops():
        pytest.skip("torchvision's C++ ops load here: the shim defined nothing")
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
