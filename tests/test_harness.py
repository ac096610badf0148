"""The lm-eval `polar` model: loglikelihoods equal the model's own log-probabilities whatever the batch size,
generation equals MambaLM.generate and honours stop strings, the offline tasks of all request types run
through simple_evaluate, the export's Hugging Face tokenizer has our ids, and stock `hf` agrees with `polar`."""

from __future__ import annotations

import json
import shlex
import sys

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
    (got,) = lm.generate_until([Req(prompt, {"until": ["\x00never"], "max_gen_toks": 12})], disable_tqdm=True)
    assert got == lm.tok.decode(greedy_until_eos(lm, prompt, 12))


def greedy_until_eos(lm, prompt: str, n: int) -> list[int]:
    """Independent reference: up to ``n`` greedy tokens by full forwards without a cache, stopping before EOS."""
    ids, new = lm.tok.encode(prompt), []
    with torch.no_grad():
        while len(new) < n:
            nxt = int(lm.model(torch.tensor([ids + new])).logits[0, -1, : lm.model.config.vocab_size].argmax())
            if nxt == lm.eot_token_id:
                break
            new.append(nxt)
    return new


@pytest.mark.parametrize("until", [[], "", [""], None], ids=["empty-list", "empty-string", "list-of-empty", "none"])
def test_empty_stop_list_generates_to_max_gen_toks(polar_lm, until):
    """RULER's tasks pass ``until: []``: generation runs to max_gen_toks or EOS, as lm-eval's hf model does.
    Catches the old fallback to the decoded EOS, '' for our tokenizer: ``text.split('')`` raised "empty
    separator" (and ``'' in text`` would have stopped after one token)."""
    prompt, n = "KING HENRY:\nOnce more unto the breach", 16
    ref = greedy_until_eos(polar_lm, prompt, n)
    assert len(ref) > 1  # the bug this catches stopped after one token
    kwargs = {"max_gen_toks": n} if until is None else {"until": until, "max_gen_toks": n}
    (got,) = polar_lm.generate_until([Req(prompt, kwargs)], disable_tqdm=True)
    assert got == polar_lm.tok.decode(ref)


def test_run_folder_gives_ruler_a_loadable_tokenizer(tiny_run, eval_tokenizer_dir, tmp_path, monkeypatch, rng):
    """`polar eval lm RUN` hands lm-eval's RULER tasks (which load model_args' tokenizer, else pretrained, with
    transformers.AutoTokenizer) a folder that loads with our exact ids. Catches the run folder reaching
    AutoTokenizer as it was ("You need to have sentencepiece or tiktoken installed"), and a tokenizer that
    loads but tokenizes differently (RULER would then size its prompts wrongly)."""
    from lm_eval.tasks.ruler.common_utils import get_tokenizer, resolve_tokenizer_name

    from eval.harness import lm_eval_namespace
    from eval.registry import get
    from tokenizer.tokenizer import Tokenizer

    monkeypatch.setenv("HOME", str(tmp_path))  # the converted copy goes to the user cache
    args = get("lm").parse(["--tasks", "niah_single_1"], str(tiny_run), "--step", "3")
    ns = lm_eval_namespace(args)
    assert ns.model_args["pretrained"] == str(tiny_run) and ns.model_args["step"] == 3
    hf = get_tokenizer(resolve_tokenizer_name(ns.model_args))
    ours = Tokenizer.load(eval_tokenizer_dir)
    words = ["The", " special", " magic", " number", " is", ":", " 1234567", ".", "\n", " What", " uuid", "-"]
    for _ in range(50):
        text = "".join(rng.choice(words) for _ in range(rng.randrange(1, 40)))
        assert hf(text, add_special_tokens=False).input_ids == ours.encode(text), repr(text)
    assert lm_eval_namespace(args).model_args == ns.model_args  # the cached copy is reused


def test_hf_tokenizer_files_have_our_ids(tiny_export, rng):
    from transformers import AutoTokenizer

    from tokenizer.tokenizer import Tokenizer

    ours, hf = Tokenizer.load(tiny_export), AutoTokenizer.from_pretrained(str(tiny_export))
    alphabet = list("abcdefgh ABC.,;:'\n\t  0123456789éüßæ日本語🎉\u00a0\r") + [" the", "and ", "  ", "<s>", "</s>"]
    texts = ["", "\n", " leading", "trailing  ", "Hark! who\n\n  comes here?", "naïve café 東京 🎭 ∑"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(300)]
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), repr(text)
        assert hf.decode(ids) == text
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)


def test_cuda_default_falls_back_to_cpu_with_a_warning(tiny_export, caplog, monkeypatch):
    from eval.harness import PolarLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        lm = PolarLM(pretrained=str(tiny_export), device="cuda:0")  # lm-eval's CLI default
    assert lm._device.type == "cpu"
    assert len([r for r in caplog.records if "CUDA is not available" in r.message]) == 1


def documented_command(program: str, export, task: str, tasks_dir=None) -> list[str]:
    """The `program ... --tasks TASK` command of docs/eval.md's comparisons with stock `hf` on an export, with
    this test's export (and task folder), its --limit lowered to 2."""
    from tests.train_helpers import ROOT

    text = (ROOT / "docs" / "eval.md").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines()
                if line.startswith(program + " ") and "export" in line and f"--tasks {task} " in line)
    line = line.split("#")[0].replace("runs/demo-cpu/export", str(export)).replace("runs/tasks", str(tasks_dir))
    argv = shlex.split(line)[len(program.split()):]
    return [("2" if prev == "--limit" else a) for prev, a in zip([None, *argv], argv)]


def result_of(folder) -> dict:
    (path,) = [p for p in folder.rglob("*.json") if not p.name.startswith("samples_")]
    return json.loads(path.read_text())["results"]


@pytest.mark.slow
def test_documented_polar_and_stock_hf_commands_agree(tiny_export, offline_tasks, offline_task_index, tmp_path,
                                                     monkeypatch):
    """docs/eval.md's two commands, run as written (paths swapped for this test's export and tasks; --limit
    lowered): `polar eval lm` (lm-eval's own flags, the polar model) and stock `lm_eval --model hf` (the
    export in transformers' MambaForCausalLM) give the same numbers on all four offline request types."""
    from lm_eval.__main__ import cli_evaluate

    from pretrain.cli import main

    polar = documented_command("polar eval lm", tiny_export, "polar_offline", offline_tasks)
    assert main(["eval", "lm", *polar, "--output_path", str(tmp_path / "polar")]) == 0
    stock = documented_command("lm_eval", tiny_export, "polar_offline", offline_tasks)
    monkeypatch.setattr(sys, "argv", ["lm_eval", *stock, "--output_path", str(tmp_path / "hf")])
    cli_evaluate()
    polar, stock = result_of(tmp_path / "polar"), result_of(tmp_path / "hf")
    for task in ("polar_nextline", "polar_lastword", "polar_passages", "polar_complete"):
        keys = [k for k, v in polar[task].items() if "," in k and "stderr" not in k and isinstance(v, float)]
        assert keys, polar[task]
        for key in keys:
            assert stock[task][key] == pytest.approx(polar[task][key], rel=1e-3, abs=1e-6), (task, key)


def samples_of(folder, task: str) -> list[dict]:
    (path,) = folder.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_lm_evals_niah_single_1_runs_the_same_through_polar_and_stock_hf(tiny_export, ruler_task_index, tmp_path,
                                                                         monkeypatch):
    """docs/eval.md's two commands for lm-eval's own RULER niah_single_1 (noise haystack: offline once
    `wonderwords` and `nltk` are installed), run as written (this test's export, --limit 2): `polar eval lm`
    and stock `lm_eval --model hf` give the same prompts, the same greedy generations to max_gen_toks
    (RULER's `until: []`) and the same scores. Catches the polar model stopping
    early on the empty stop list (the old "empty separator" crash, a one-token answer), decoding differently
    from transformers, or RULER sizing its prompts with another tokenizer."""
    pytest.importorskip("wonderwords")
    pytest.importorskip("nltk")
    from lm_eval.__main__ import cli_evaluate

    from pretrain.cli import main

    polar = documented_command("polar eval lm", tiny_export, "niah_single_1")
    assert main(["eval", "lm", *polar, "--log_samples", "--output_path", str(tmp_path / "polar")]) == 0
    stock = documented_command("lm_eval", tiny_export, "niah_single_1")
    monkeypatch.setattr(sys, "argv", ["lm_eval", *stock, "--log_samples", "--output_path", str(tmp_path / "hf")])
    cli_evaluate()
    polar, stock = samples_of(tmp_path / "polar", "niah_single_1"), samples_of(tmp_path / "hf", "niah_single_1")
    assert len(polar) == 2 and [s["arguments"] for s in polar] == [s["arguments"] for s in stock]
    assert [s["resps"] for s in polar] == [s["resps"] for s in stock]
    from tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_export)
    assert all(len(tok.encode(s["resps"][0][0])) > 64 for s in polar)  # generated well past one token
    assert result_of(tmp_path / "polar")["niah_single_1"] == result_of(tmp_path / "hf")["niah_single_1"]


LM_ARGS = ["--tasks", "polar_nextline,polar_lastword", "--limit", "3", "--device", "cpu"]


@pytest.mark.slow
def test_eval_lm_keeps_every_result_in_its_step_folder(tiny_run, offline_tasks, offline_task_index, tmp_path,
                                                      monkeypatch, capfd):
    from pretrain.cli import main

    monkeypatch.chdir(tmp_path)  # outside any git repository: git's complaint must not reach the terminal

    def results(s):  # the run fixture is shared: count only this test's files
        return set((tiny_run / "eval" / f"step-{s}").glob("lm_*.json"))

    before = {s: results(s) for s in (3, 5)}
    args = [*LM_ARGS, "--include_path", str(offline_tasks)]
    for step in (["--log_samples"], ["--step", "3"], ["--step", "3"]):
        assert main(["eval", "lm", str(tiny_run), *step, *args]) == 0
    files = {s: sorted(results(s) - before[s]) for s in (3, 5)}
    assert [len(files[3]), len(files[5])] == [2, 1]  # the second call kept the first result
    (samples,) = {p.name for p in (tiny_run / "eval" / "step-5").glob("samples_polar_lastword_*.jsonl")} & {
        f"samples_polar_lastword_{files[5][0].stem.removeprefix('lm_')}.jsonl"}  # --log_samples, beside its result
    data = {s: [json.loads(p.read_text()) for p in files[s]] for s in (3, 5)}
    for s, results in data.items():
        for d in results:
            assert d["config"]["checkpoint_step"] == s and d["config"]["limit"] == 3
            assert d["versions"]["polar_lastword"] is not None and d["date"] > 0
    assert data[3][0]["results"] == data[3][1]["results"]
    ppl = {s: data[s][0]["results"]["polar_lastword"]["perplexity,none"] for s in (3, 5)}
    assert ppl[3] != ppl[5]  # different checkpoints were scored
    assert "not a git repository" not in capfd.readouterr().err


@pytest.mark.slow
def test_interrupted_eval_resumes_from_the_cache(tiny_export, offline_tasks, offline_task_index, tmp_path,
                                                monkeypatch):
    """--use_cache: an evaluation killed after its first batch computes only the other batches when rerun,
    and its numbers equal an uncached evaluation's."""
    from eval.harness import PolarLM
    from pretrain.cli import main

    class Killed(Exception):
        pass

    seen, real = [], PolarLM._loglikelihood_tokens
    batches = {"left": None}

    def tracked(self, requests, disable_tqdm=False, **kw):
        seen.append(len(requests))
        return real(self, requests, disable_tqdm=disable_tqdm, **kw)

    def log_softmax(*a, **kw):  # one call per batch: the kill switch
        if batches["left"] is not None:
            if batches["left"] == 0:
                raise Killed
            batches["left"] -= 1
        return torch.log_softmax(*a, **kw)

    monkeypatch.setattr(PolarLM, "_loglikelihood_tokens", tracked)
    monkeypatch.setattr("eval.harness.F.log_softmax", log_softmax)
    args = ["eval", "lm", str(tiny_export), "--tasks", "polar_nextline", "--limit", "4", "--batch_size", "4",
            "--device", "cpu", "--include_path", str(offline_tasks)]
    cache = ["--use_cache", str(tmp_path / "cache")]
    batches["left"] = 1
    with pytest.raises(Killed):
        main([*args, *cache, "--output_path", str(tmp_path / "killed")])
    batches["left"], total = None, seen[0]
    seen.clear()
    assert main([*args, *cache, "--output_path", str(tmp_path / "resumed")]) == 0
    assert seen == [total - 4]  # the first batch of 4 came from the cache
    assert main([*args, "--output_path", str(tmp_path / "fresh")]) == 0
    assert result_of(tmp_path / "resumed") == result_of(tmp_path / "fresh")
