"""The lm-eval `polar` model: loglikelihoods equal the model's own log-probabilities whatever the batch size,
generation equals MambaLM.generate and honours stop strings, the offline tasks of all request types run
through simple_evaluate, the export's Hugging Face tokenizer has our ids, and stock `hf` agrees with `polar`."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

pytest_plugins = ["tests.eval_fixtures"]
lm_eval = pytest.importorskip("lm_eval")


class Req:
    """The part of lm_eval.api.instance.Instance the model reads."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def polar_lm(tiny_export):
    from eval.harness import PolarLM

    return PolarLM(pretrained=str(tiny_export), batch_size=3, max_length=64)


TEXTS = [("To be, or not to be,", " that is the question"), ("O Romeo,", " Romeo!"), ("Now is the winter", " of our"),
         ("Friends, Romans, countrymen,\nlend me", " your ears;"), ("A", " horse! a horse!")]


def direct_loglikelihood(lm, context: str, continuation: str) -> float:
    """Independent reference: one plain forward of context + continuation, log_softmax, sum over the continuation."""
    ctx, whole = lm.tok.encode(context), lm.tok.encode(context + continuation)
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def test_loglikelihood_equals_direct_sum_and_ignores_batch_size(polar_lm):
    reqs = [Req(c, x) for c, x in TEXTS]
    results = polar_lm.loglikelihood(reqs, disable_tqdm=True)
    for (c, x), (ll, greedy) in zip(TEXTS, results, strict=True):
        assert ll == pytest.approx(direct_loglikelihood(polar_lm, c, x), abs=1e-4)
        assert isinstance(greedy, bool)
    for bs in (1, 5):
        polar_lm.batch_size = bs
        other = polar_lm.loglikelihood(reqs, disable_tqdm=True)
        assert [a for a, _ in other] == pytest.approx([a for a, _ in results], abs=1e-4)
        assert [g for _, g in other] == [g for _, g in results]
    polar_lm.batch_size = 3


def test_is_greedy_matches_argmax(polar_lm):
    ctx = polar_lm.tok.encode("The king")
    with torch.no_grad():
        logits = polar_lm.model(torch.tensor([ctx])).logits[0, -1]
    best = int(logits.argmax())
    (_, greedy_best), (_, greedy_other) = polar_lm._loglikelihood_tokens(
        [(None, ctx, [best]), (None, ctx, [(best + 1) % 512])], disable_tqdm=True)
    assert greedy_best and not greedy_other


def test_rolling_windows_cover_every_token_once(polar_lm):
    text = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate. " * 6
    ids = polar_lm.tok.encode(text)
    m = polar_lm.max_length
    assert len(ids) > 2 * m  # several windows
    (total,) = polar_lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    # reference (lm-eval's scheme): disjoint runs of m predicted tokens, each predicted from the m tokens
    # ending just before its last one (so a short last run also sees the end of the previous one)
    shifted, ref = [polar_lm.prefix_token_id, *ids], 0.0
    with torch.no_grad():
        for start in range(0, len(ids), m):
            end = min(start + m, len(ids))
            inp, target = shifted[max(0, end - m):end], ids[start:end]
            logp = F.log_softmax(polar_lm.model(torch.tensor([inp])).logits[0].float(), -1)[-len(target):]
            ref += float(logp[torch.arange(len(target)), torch.tensor(target)].sum())
    assert total == pytest.approx(ref, rel=1e-5)


def test_generate_until_is_greedy_generate_cut_at_stop(polar_lm):
    model, tok = polar_lm.model, polar_lm.tok
    prompt = "ROMEO:\nBut soft, what light"
    ids = torch.tensor([tok.encode(prompt)])
    ref = tok.decode(model.generate(ids, 20)[0, ids.shape[1]:].tolist())
    (free,) = polar_lm.generate_until([Req(prompt, {"until": ["\x00never"], "max_gen_toks": 20})], disable_tqdm=True)
    assert free == ref
    stop = ref[len(ref) // 2: len(ref) // 2 + 2]
    (cut,) = polar_lm.generate_until([Req(prompt, {"until": [stop], "max_gen_toks": 20})], disable_tqdm=True)
    assert cut == ref.split(stop)[0] and stop not in cut


def test_generate_until_runs_the_transformer_baseline(tiny_export):
    """The harness drives a TransformerLM (KV cache) as it drives Mamba: same text as a no-cache greedy loop."""
    from eval.harness import PolarLM
    from models import ModelConfig, build_model

    lm = PolarLM(pretrained=str(tiny_export), max_length=64)
    lm.model = build_model(ModelConfig.preset("transformer-tiny", vocab_size=lm.model.config.vocab_size)).eval()
    prompt = "ROMEO:\nBut soft, what light"
    ids, new = lm.tok.encode(prompt), []
    with torch.no_grad():
        while len(new) < 12:
            nxt = int(lm.model(torch.tensor([ids + new])).logits[0, -1, : lm.model.config.vocab_size].argmax())
            if nxt == lm.eot_token_id:
                break
            new.append(nxt)
    ref = lm.tok.decode(new)
    (got,) = lm.generate_until([Req(prompt, {"until": ["\x00never"], "max_gen_toks": 12})], disable_tqdm=True)
    assert got == ref


def test_hf_tokenizer_files_have_our_ids(tiny_export):
    from transformers import AutoTokenizer

    from tokenizer.tokenizer import Tokenizer

    ours, hf = Tokenizer.load(tiny_export), AutoTokenizer.from_pretrained(str(tiny_export))
    rng = random.Random()
    alphabet = list("abcdefgh ABC.,;:'\n\t  0123456789éüßæ日本語🎉\u00a0\r") + [" the", "and ", "  ", "<s>", "</s>"]
    texts = ["", "\n", " leading", "trailing  ", "Hark! who\n\n  comes here?", "naïve café 東京 🎭 ∑"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(300)]
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), repr(text)
        assert hf.decode(ids) == text
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)


@pytest.mark.slow
def test_offline_tasks_run_and_stock_hf_agrees(tiny_export, offline_tasks):
    """All four request types through simple_evaluate offline; stock `hf` (MambaForCausalLM) gives the
    same numbers as `polar` on the export (same tokens via the HF tokenizer files, same prefix token)."""
    from lm_eval.tasks import TaskManager

    import eval.harness  # noqa: F401  (registers `polar`)

    def run(model: str, args: str) -> dict:
        return lm_eval.simple_evaluate(model=model, model_args=args, tasks=["polar_offline"], limit=2,
                                       task_manager=TaskManager(include_path=str(offline_tasks)))["results"]

    polar = run("polar", f"pretrained={tiny_export},batch_size=2")
    stock = run("hf", f"pretrained={tiny_export},prefix_token_id=3,device=cpu,batch_size=2")
    for task in ("polar_nextline", "polar_lastword", "polar_passages", "polar_complete"):
        assert task in polar, polar.keys()
        for key, value in polar[task].items():
            if "," in key and "stderr" not in key and isinstance(value, float):
                assert stock[task][key] == pytest.approx(value, rel=1e-3, abs=1e-6), (task, key)
