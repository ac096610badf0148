"""Function-preserving polarization (models/polarize.py): from random stock transformers Mamba and Mamba-2
checkpoints (odd vocabularies, odd shapes, B/C groups) and from an already polarized model of ours, the
polarized model's fp32 logits are bit for bit the source's; the new channels' C rows get a gradient at the first
step and, after a few AdamW steps, the new B and C rows have moved; other config changes are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from models import ModelConfig, build_model
from models.hf import from_pretrained
from models.polarize import polarize
from models.typed_config import ConfigError
from tests.test_hf_mamba2 import stock_model as stock_mamba2


def stock_mamba(rng) -> MambaForCausalLM:
    """A stock transformers Mamba with an odd vocabulary and weights moved off their init."""
    cfg = MambaConfig(vocab_size=rng.randrange(301, 700, 2), hidden_size=40, state_size=rng.randint(3, 9),
                      num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=5)
    model = MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def source(kind: str, rng, tmp_path) -> torch.nn.Module:
    """Our model loaded from a stock transformers folder (mamba, mamba2), or one of ours already polarized."""
    if kind == "ours-polar":
        model = build_model(ModelConfig.preset("mamba2-tiny-polar", vocab_size=rng.randrange(301, 700, 2),
                                               pad_vocab_size_multiple=1))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        return model.eval()
    (stock_mamba(rng) if kind == "mamba" else stock_mamba2()).save_pretrained(tmp_path)
    return from_pretrained(tmp_path).eval()


def more_channels(cfg, rng):
    """``cfg`` with 1-2 more ones and/or zeros channels (at least one more in all)."""
    ones, zeros = rng.choice([(1, 0), (0, 1), (1, 1), (2, 1), (1, 2)])
    return cfg.with_polarization(cfg.polarize.ones + ones, cfg.polarize.zeros + zeros)


def new_channel_rows(src, dst, start: int) -> list[int]:
    """Rows (of a tensor whose B or C block of one group starts at ``start``) of the channels ``dst`` adds."""
    n_ones = dst.polarize.ones - src.polarize.ones
    n_zeros = dst.polarize.zeros - src.polarize.zeros
    return [start + i for i in range(n_ones)] + [start + dst.d_state_total - 1 - i for i in range(n_zeros)]


def b_c_rows(model, src, dst) -> dict[str, tuple[str, list[int]]]:
    """{"B": (param name, rows), "C": ...}: where the new channels' projection rows are, per architecture."""
    if dst.arch == "mamba":
        r = dst.dt_rank
        return {"B": ("x_proj.weight", new_channel_rows(src, dst, r)),
                "C": ("x_proj.weight", new_channel_rows(src, dst, r + dst.d_state_total))}
    g, nt, di = dst.ssm.n_groups, dst.d_state_total, dst.d_inner
    return {name: ("in_proj.weight", [row for k in range(g) for row in new_channel_rows(src, dst, first + k * nt)])
            for name, first in (("B", 2 * di), ("C", 2 * di + g * nt))}


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("kind", ["mamba", "mamba2", "ours-polar"])
def test_polarized_logits_are_the_sources(kind, dtype, rel, rng, tmp_path):
    """Catches a new channel that leaks into y (a C row not zero, a Mamba-2 conv bias giving C = SiLU(b) ≠ 0), a
    misplaced row that shifts the learned channels' B/C (wrong group stride, B grown before C), and weights
    lost on the way. The polar term is an exact 0, and most shapes give bit-equal fp32 logits; the one
    difference left is the projection GEMM (x_proj / in_proj) gaining rows: BLAS picks its blocking, hence the
    rounding of the very same dot products, by the output width, which moved the projections by ~1 ulp for
    some widths (fp32 logits then differed by up to 7e-7 of their scale over 75 draws; in fp64 by 0)."""
    assert_polarized_logits_equal(source(kind, rng, tmp_path).to(dtype), rng, rel)


def assert_polarized_logits_equal(src_model, rng, rel: float) -> None:
    """``src_model`` with 1-2 more polar channels gives its logits, within ``rel`` of their scale."""
    dst = more_channels(src_model.config, rng)
    polar = polarize(src_model, dst, torch.Generator().manual_seed(rng.randrange(2**31))).eval()
    assert polar.config.d_state_total > src_model.config.d_state_total
    ids = torch.randint(0, src_model.config.vocab_size, (2, rng.randint(9, 40)))
    with torch.no_grad():
        expected, got = src_model(ids).logits, polar(ids).logits
    assert got.dtype == expected.dtype
    assert (got - expected).abs().max() <= rel * expected.abs().max()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_new_channels_learn_from_the_first_step(kind, rng, tmp_path):
    """Catches a dead start: zero B rows too (no gradient ever reaches the new channels), or a Mamba-2 C conv
    filter of zero (SiLU'(0)·0 blocks the gradient to the C rows). C must get a gradient at step 1 in every
    layer; B's is ∝ C, so both must have moved after a few AdamW steps."""
    src_model = source(kind, rng, tmp_path)
    src = src_model.config
    dst = more_channels(src, rng)
    model = polarize(src_model, dst, torch.Generator().manual_seed(rng.randrange(2**31))).train()
    where = b_c_rows(model, src, dst)
    mixers = [layer.mixer for layer in model.backbone.layers]
    before = {k: [m.get_parameter(name)[rows].clone() for m in mixers] for k, (name, rows) in where.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, src.vocab_size, (2, 24))
    for step in range(3):
        opt.zero_grad()
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        if step == 0:
            name, rows = where["C"]
            assert all(m.get_parameter(name).grad[rows].abs().amax(1).min() > 0 for m in mixers)
        opt.step()
    for k, (name, rows) in where.items():
        for m, old in zip(mixers, before[k]):
            assert (m.get_parameter(name)[rows] - old).abs().amax(1).min() > 0, k


@pytest.mark.parametrize("dst, message", [
    (ModelConfig.preset("mamba-tiny-polar", d_model=48), "model.d_model: the source has 64"),
    (ModelConfig.preset("mamba-tiny-polar").with_polarization(0, 1), "can be added, not removed"),
    (ModelConfig.preset("mamba2-tiny-polar"), "model.arch: the source is 'mamba'"),
])
def test_other_changes_are_refused(dst, message):
    """Catches a polarization that silently reshapes or drops trained weights instead of naming the difference."""
    with pytest.raises(ConfigError, match=message):
        polarize(build_model(ModelConfig.preset("mamba-tiny-polar")), dst)
