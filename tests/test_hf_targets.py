"""Any transformers causal LM as a target: tiny random stock Mamba, Mamba-2, GPT-NeoX and Llama models built
from their configs offline, checked against the stock models' own one-pass forward (chunked prefill,
cached steps, candidate log-likelihoods), run through `polar eval niah` and `polar diagnose`, and the
hook-based recency of a stock Mamba against the project's own mixer on the same weights."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.diagnostics import recency
from eval.hf_targets import HFCausalLM, decoder_layers
from eval.loading import load_for_eval
from pretrain.cli import main
from tokenizer.hf_tokenizer import HFTokenizer

pytest_plugins = ["tests.eval_fixtures"]

VOCAB = 512  # the eval tokenizer's


def stock_config(family: str):
    import transformers as T

    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2}
    if family == "mamba":
        return T.MambaConfig(**common, state_size=8)
    if family == "mamba2":
        return T.Mamba2Config(**common, state_size=8, num_heads=4, head_dim=16, n_groups=1, chunk_size=16)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(**common, num_attention_heads=4, intermediate_size=64)
    return T.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)


FAMILIES = ["mamba", "mamba2", "gpt_neox", "llama"]


@pytest.fixture(scope="module")
def stock_folders(tmp_path_factory, eval_tokenizer_dir):
    """family -> a folder as the Hub would hold it: config, random weights and transformers tokenizer files."""
    from transformers import AutoModelForCausalLM

    from tokenizer.hf_files import write_hf_tokenizer_files

    out = {}
    for family in FAMILIES:
        torch.manual_seed(len(family))
        folder = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(stock_config(family)).save_pretrained(folder)
        write_hf_tokenizer_files(eval_tokenizer_dir / "tokenizer.model", folder)
        out[family] = folder
    return out


def stock(folder) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_in_chunks_and_steps_match_one_pass(stock_folders, family):
    from eval.niah import prefill

    ref = stock(stock_folders[family])
    model = HFCausalLM(stock(stock_folders[family]))
    assert model.chunked_prefill == (family != "mamba")  # transformers' Mamba-1 restarts a chunk's scan
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        full = ref(ids).logits
        torch.testing.assert_close(model(ids).logits, full)
        last, states = prefill(model, ids[:, :18], chunk=5)
        torch.testing.assert_close(last, full[:, 17], atol=1e-4, rtol=1e-4)
        copies = [s.repeat(2) for s in states]  # the originals stay usable, as NIAH needs
        for t in (18, 19, 20):
            torch.testing.assert_close(model.step(ids[:, t], states), full[:, t], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.step(ids[:, 18].repeat_interleave(2), copies),
                                   full[:, 18].repeat_interleave(2, 0), atol=1e-4, rtol=1e-4)


def test_loading_dispatch(stock_folders, eval_tokenizer_dir):
    from models.mamba import MambaLM
    from tokenizer import Tokenizer

    mamba, tok = load_for_eval(stock_folders["mamba"], device="cpu")
    assert isinstance(mamba, MambaLM) and isinstance(tok, HFTokenizer)  # stock Mamba-1 runs on our model
    llama, tok = load_for_eval(stock_folders["llama"], device="cpu")
    assert isinstance(llama, HFCausalLM) and len(decoder_layers(llama)) == 2
    text = "Now is the winter of our discontent\nMade glorious summer."
    assert tok.encode(text) == Tokenizer.load(eval_tokenizer_dir).encode(text)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("family", ["mamba2", "gpt_neox", "llama"])
def test_niah_ranks_as_one_pass_likelihoods(stock_folders, family):
    """NIAH's cached candidate scoring ranks values as the stock model's one-pass log-likelihoods do."""
    import random

    from eval.niah import NiahConfig, make_prompts, run_niah, score_prompts

    model, tok = load_for_eval(stock_folders[family], device="cpu")
    cfg = NiahConfig(lengths=[48], depths=[0.0, 100.0], samples=2, digits=1, distractors=3, prefill_chunk=16,
                     needle="#{value}.", question="\n#")
    result = run_niah(model, tok, cfg, progress=False)
    assert len(result["cells"]) == 2 and all(1 <= s["rank"] <= 4 for s in result["samples"])

    prompts = make_prompts(tok, "A quiet line of prose. " * 40, 48, 50.0, 2, 1, random.Random(0), "#{value}.", "\n#")
    rng = random.Random(1)
    records = score_prompts(model, tok, prompts, cfg, rng)
    ref = stock(stock_folders[family])
    rng = random.Random(1)
    for p, r in zip(prompts, records, strict=True):
        values = {p.value}
        while len(values) < cfg.distractors + 1:
            values.add(str(rng.randrange(1, 10)))
        cands = [p.value, *sorted(values - {p.value})]
        lls = []
        for v in cands:
            cont = tok.encode(" " + v)
            with torch.no_grad():
                logp = F.log_softmax(ref(torch.tensor([p.ids + cont])).logits[0].float(), -1)
            lls.append(sum(float(logp[len(p.ids) - 1 + i, c]) for i, c in enumerate(cont)))
        assert r["rank"] == 1 + sum(s > lls[0] + 1e-4 for s in lls[1:])


@pytest.mark.slow
def test_eval_niah_and_diagnose_cli_on_every_family(stock_folders, tmp_path):
    targets = [str(stock_folders[f]) for f in FAMILIES]
    for i, t in enumerate(targets):
        out = tmp_path / f"niah{i}"
        assert main(["eval", "niah", t, "--lengths", "40", "--depths", "0,100", "--samples", "1", "--digits", "1",
                     "--distractors", "2", "--needle", "#{value}.", "--question", "\\n#", "--out", str(out)]) == 0
        (result,) = out.glob("niah_*.json")  # kept, timestamped like lm-eval's results
        assert json.loads(result.read_text())["cells"][0]["n"] == 1
    out = tmp_path / "diag"
    assert main(["diagnose", *targets, "--out", str(out), "--batch", "2", "--seq-len", "16"]) == 0
    rec = json.loads((out / "recency.json").read_text())
    smooth = json.loads((out / "oversmoothing.json").read_text())
    assert len(rec) == 4 and all(np.asarray(c).shape == (2, 16) for c in rec.values())
    assert all(len(s["mixer"]) == len(s["block"]) == 2 for s in smooth.values())
    assert set(json.loads((out / "a_range.json").read_text())) == {stock_folders["mamba"].name}  # Mamba-1 only


def test_hook_recency_of_stock_mamba_equals_our_mixer(stock_folders):
    """Hooks on transformers' MambaMixer vs the Jacobian of our MambaMixer, called directly, on the same weights."""
    from models.hf import from_pretrained

    ours = from_pretrained(stock_folders["mamba"]).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    got = recency(HFCausalLM(stock(stock_folders["mamba"])), ids, seed=3)

    inputs = []
    hooks = [layer.mixer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
             for layer in ours.backbone.layers]
    with torch.no_grad():
        ours(ids)
    for h in hooks:
        h.remove()
    expected = []
    for layer, x in zip(ours.backbone.layers, inputs, strict=True):
        x = x.clone().requires_grad_(True)
        y = layer.mixer(x)
        r = torch.randn(y.shape[0], y.shape[-1], generator=torch.Generator().manual_seed(3))
        (grad,) = torch.autograd.grad((y[:, -1] * r).sum(), x)
        expected.append(grad.norm(dim=-1).mean(0).flip(0).numpy())
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-4, atol=1e-7)
