"""`polar eval ruler` (eval/ruler_data.py, eval/ruler.py, eval/kinds/ruler.py): the generated prompts meet
their definitions under three unrelated tokenizers (lengths, needles at the stated depth, no leaking answers,
the word tasks' frequencies), the prompt format is lm-eval's, the scores are RULER's, and the command writes
its files and card section."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from eval.ruler_data import ALL_TASKS, NEEDLE, PASSKEY_NEEDLE, TASKS, Haystack, cell_rng, make_sample

pytest_plugins = ["tests.eval_fixtures"]
NIAH = [t for t in TASKS if TASKS[t].family == "niah"]


class CharTokenizer:
    """One token per character: an independent tokenizer with no subword merges at all."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


@pytest.fixture(scope="module")
def hay() -> Haystack:
    return Haystack.load("builtin")


@pytest.fixture(scope="module")
def tokenizers(eval_tokenizer_dir, hay):
    """Our SentencePiece tokenizer (512 pieces), a byte-level BPE trained here with the `tokenizers` library
    (GPT-2 style pre-tokenization, 2000 pieces) behind transformers, and characters; each with a length at
    which one haystack unit (a UUID needle at most) is under 1% of it."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tokenizer.hf_tokenizer import HFTokenizer
    from tokenizer.tokenizer import Tokenizer

    bpe = RawTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([hay.text[:300_000]], trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]))
    hf = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>"), "bpe-in-test")
    return {"sentencepiece": (Tokenizer.load(eval_tokenizer_dir), 16384), "byte-bpe": (hf, 8192),
            "chars": (CharTokenizer(), 16384)}


@pytest.mark.parametrize("which", ["sentencepiece", "byte-bpe", "chars"])
def test_prompts_fill_the_length_to_within_one_percent(tokenizers, hay, which, rng):
    """Every task's prompt, measured by the tokenizer it was made for, is at most the length and within 1%
    of it. Catches: sizing by a characters-per-token guess, by one tokenizer for another, or a size search
    that stops early (RULER's own loop can land a whole increment short)."""
    tok, length = tokenizers[which]
    for task in ALL_TASKS:
        s = make_sample(task, tok, hay, length, rng.uniform(0, 100), cell_rng(rng.randrange(10**6), task, length, 0))
        n = len(tok.encode(s.prompt))
        assert n == s.tokens and 0.99 * length <= n <= length, (task, n)


def needle_depth(tok, s) -> float:
    """Independently measured: tokens of the context before the anchor needle, in % of the context's tokens."""
    start = s.context.index(s.anchor)
    return 100 * len(tok.encode(s.context[:start])) / len(tok.encode(s.context))


@pytest.mark.parametrize("which", ["sentencepiece", "byte-bpe", "chars"])
def test_needles_are_as_stated_at_the_stated_depth_and_answers_do_not_leak(tokenizers, hay, which, rng):
    """Needle tasks: each answer appears in the prompt exactly once, inside "One of the special magic ... for
    KEY is: VALUE." with a queried key; the first such needle sits at the requested depth of the context
    (within 2.5 points: the nearest sentence end of the prose); the question names every queried key.
    Variable tracking: the chain's assignments appear in order, each variable only in its own statements.
    Passkey: the key only in its needle, the prompt ending with the question.
    Catches: an answer also present in the haystack (a free hit for string matching), a distractor needle
    reusing a queried key or value, needles at the wrong depth, a chain out of order."""
    tok, length = tokenizers[which]
    for task in [*NIAH, "ruler_vt", "passkey"]:
        depth = rng.choice([0.0, 100.0, rng.uniform(0, 100)])
        s = make_sample(task, tok, hay, length, depth, cell_rng(rng.randrange(10**6), task, length, depth))
        assert s.context in s.prompt and s.prompt.count(s.anchor) == 1
        assert abs(needle_depth(tok, s) - depth) <= 2.5, (task, depth, needle_depth(tok, s))
        question = s.prompt[s.prompt.index(s.context) + len(s.context):]
        if task == "passkey":
            (key,) = s.outputs
            assert s.anchor == PASSKEY_NEEDLE.format(key=key) and s.prompt.count(key) == 2  # twice in its needle
            assert s.prompt.endswith("\nWhat is the pass key? The pass key is")
            continue
        if task == "ruler_vt":
            names, (value,) = s.outputs, re.findall(r"VAR \w+ = (\d+)\.", s.anchor)
            statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = {a}." for a, b in zip(names, names[1:])]
            assert [m.start() for m in map(lambda x: re.search(re.escape(x), s.context), statements)] == sorted(
                s.context.index(x) for x in statements)
            for name in names:
                assert s.prompt.count(name) == (1 if name == names[-1] else 2)
            assert s.context.count(value) == 1 and value in question
            continue
        t = TASKS[task]
        kind = t.value
        assert len(s.outputs) == t.values * t.queries
        for value in s.outputs:
            assert s.prompt.count(value) == 1, (task, value)
            (key,) = re.findall(rf"One of the special magic {kind} for (\S+) is: {re.escape(value)}\.", s.context)
            assert key in question
        assert s.anchor == NEEDLE.format(kind=kind, key=s.anchor.split(" for ")[1].split(" is:")[0],
                                         value=s.outputs[0])
        needles = re.findall(rf"One of the special magic {kind} for (\S+) is: (\S+)\.", s.context)
        keys = Counter(k for k, _ in needles)
        assert len(needles) >= t.keys * t.values and all(keys[k] == t.values for k in keys if k in question)


def test_word_tasks_answers_are_the_most_frequent_words(tokenizers, hay, rng):
    """ruler_cwe: the 10 answers each appear more often than any other listed word, and the list is numbered
    1..N; ruler_fwe: the 3 answers are the 3 most frequent coded words, strictly above the 4th. Catches a
    tie or an answer that is not the most frequent (unanswerable prompts), a broken numbering."""
    tok, length = tokenizers["sentencepiece"]
    for size in (length // 4, length):
        s = make_sample("ruler_cwe", tok, hay, size, None, cell_rng(rng.randrange(10**6), "ruler_cwe", size, None))
        entries = re.findall(r"(\d+)\. (\S+)", s.context)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        assert len(s.outputs) == 10 and min(counts[w] for w in s.outputs) > max(
            c for w, c in counts.items() if w not in s.outputs)
        s = make_sample("ruler_fwe", tok, hay, size, None, cell_rng(rng.randrange(10**6), "ruler_fwe", size, None))
        ranked = Counter(s.context.split()).most_common()
        assert [w for w, _ in ranked[:3]] == s.outputs and ranked[2][1] > ranked[3][1]


def test_samples_are_a_function_of_the_seed_and_cell(tokenizers, hay, rng):
    """Catches a generator that draws from a global random state (irreproducible, cells depending on order)."""
    tok, _ = tokenizers["sentencepiece"]
    seed, depth = rng.randrange(10**6), rng.uniform(0, 100)
    a = make_sample("niah_multikey_1", tok, hay, 1024, depth, cell_rng(seed, "niah_multikey_1", 1024, depth))
    make_sample("ruler_vt", tok, hay, 512, depth, cell_rng(seed, "ruler_vt", 512, depth))
    b = make_sample("niah_multikey_1", tok, hay, 1024, depth, cell_rng(seed, "niah_multikey_1", 1024, depth))
    c = make_sample("niah_multikey_1", tok, hay, 1024, depth, cell_rng(seed + 1, "niah_multikey_1", 1024, depth))
    assert a == b and a.prompt != c.prompt


def lm_eval_source(name: str) -> str:
    lm_eval = pytest.importorskip("lm_eval")
    return (Path(lm_eval.__file__).parent / "tasks" / "ruler" / name).read_text()


def test_niah_format_is_lm_evals(tokenizers, hay, rng):
    """Our prompts are lm-eval's niah template (read from its source: its module imports wonderwords, which
    we do not need) with its needle sentence, followed by its gen_prefix joined as lm-eval joins it (one
    space), singular for one answer and plural for several. Catches a template drift that would make our
    scores incomparable with `lm_eval --tasks niah_*`."""
    import ast

    tree = ast.parse(lm_eval_source("niah_utils.py"))
    template = next(n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", "") == "TEMPLATE")
    assert f'NEEDLE = "{NEEDLE.replace("{kind}", "{type_needle_v}")}"' in lm_eval_source("prepare_niah.py")
    tok, _ = tokenizers["sentencepiece"]
    for task, plural in (("niah_single_1", False), ("niah_multivalue", True)):
        s = make_sample(task, tok, hay, 1024, 50.0, cell_rng(rng.randrange(10**6), task, 1024, 50.0))
        query = re.search(r"for (\S+) mentioned", s.prompt).group(1)
        t, kind = template, "numbers"
        if not plural:  # lm-eval's own rewrite for a single answer
            t = t.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
            kind = "number"
        prefix = f"The special magic {kind} for {query} mentioned in the provided text {'are' if plural else 'is'}"
        assert s.prompt == t.format(type_needle_v=kind, context=s.context, query=query) + " " + prefix


def niah_form(prompt: str, key: str, value: str) -> list[str]:
    """A niah prompt's lines with its key and value named, every run of noise passage lines (a cut last one
    included) one NOISE line: the shape two generators share when they agree on format."""
    from eval.ruler_data import NOISE

    lines = prompt.replace(key, "KEY").replace(value, "VALUE").split("\n")
    lines = ["NOISE" if line and NOISE.startswith(line) else line for line in lines]
    return [line for i, line in enumerate(lines) if not (line == "NOISE" and i and lines[i - 1] == "NOISE")]


def test_niah_single_1_has_the_form_of_lm_evals_own_samples(tiny_export, hay, rng):
    """Where lm-eval's RULER runs offline (`wonderwords`, `nltk`; niah_single_1 downloads nothing): samples
    that lm-eval itself generates under the export's tokenizer, and ours at the same length and needle depth,
    have the same lines once key and value are named (instruction, noise passages one per line, the needle
    line, noise, the question and the answer prefix after one space), one 7-digit answer, and ours is no
    longer than lm-eval's prompt budget (its max_seq_length less the 128 tokens to generate) and no shorter
    than its prompt. Catches a noise haystack laid out differently (words instead of passage lines), a
    template, needle or gen_prefix drift, and a prompt sized against the wrong length."""
    pytest.importorskip("wonderwords")
    pytest.importorskip("nltk")
    import random as global_random

    from lm_eval.tasks.ruler.niah_utils import niah_single_1
    from transformers import AutoTokenizer

    from tokenizer import load_tokenizer

    length, budget = 1024, 1024 - TASKS["niah_single_1"].max_new
    global_random.seed(rng.randrange(10**6))  # lm-eval draws from the global random module
    theirs = niah_single_1(pretrained=str(tiny_export), max_seq_lengths=[length])["test"]
    hf, ours_tok = AutoTokenizer.from_pretrained(str(tiny_export)), load_tokenizer(tiny_export)
    for i in rng.sample(range(len(theirs)), 5):
        t = theirs[i]
        prompt = t["input"] + " " + t["gen_prefix"]  # lm-eval's target_delimiter joins gen_prefix
        (value,) = t["outputs"]
        key = re.search(r"for (\S+) mentioned in the provided text\?", t["input"]).group(1)
        lines = t["input"].split("\n")[1:-1]  # the context
        before = lines.index(next(line for line in lines if line.startswith("One of the special")))
        depth = 100 * before / (len(lines) - 1)
        s = make_sample("niah_single_1", ours_tok, hay, budget, depth, cell_rng(rng.randrange(10**6),
                                                                                 "niah_single_1", budget, depth))
        (our_value,) = s.outputs
        our_key = re.search(r"for (\S+) mentioned in the provided text\?", s.prompt).group(1)
        assert re.fullmatch(r"\d{7}", value) and re.fullmatch(r"\d{7}", our_value)
        assert niah_form(s.prompt, our_key, our_value) == niah_form(prompt, key, value), (depth, s.prompt[:400])
        mine, lm_evals = (len(hf(p, add_special_tokens=False).input_ids) for p in (s.prompt, prompt))
        assert mine == s.tokens and lm_evals <= mine <= budget, (mine, lm_evals)


def test_scoring_agrees_with_lm_evals(rng):
    """Per sample, our string_match_all and postprocessing are lm-eval's RULER ones (common_utils, which
    needs no extra package) on random predictions. Catches a scoring drift from `lm_eval --tasks niah_*`."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    from eval import ruler

    pieces = ["1234567", "abc-def", "ABC-DEF", " ", "\n", "\x01", "the", "7654321", "\t"]
    for _ in range(200):
        refs = [rng.choice(pieces[:3] + pieces[7:8]) for _ in range(rng.randrange(1, 4))]
        pred = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 8)))
        (theirs,) = postprocess_pred([pred])
        assert ruler.postprocess(pred) == theirs
        assert ruler.string_match_all(theirs, refs) == string_match_all([theirs], [refs])


def test_scores_are_rulers(monkeypatch, rng):
    """string_match_all / string_match_part against hand-computed values, then a whole grid through
    run_ruler with scripted predictions: cells and the summary are the hand-computed means. Catches
    case-sensitive matching, part scored as all (or lm-eval's max-over-samples variant), cells averaging
    the wrong samples."""
    from eval import ruler, ruler_data
    from eval.kinds.ruler import RulerEvaluation

    assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert ruler.string_match_part("The numbers are 123 and 456.", ["123", "456", "789"]) == 1.0
    assert ruler.string_match_all("apple-PIE", ["Apple-pie"]) == 1.0
    assert ruler.string_match_part("nothing", ["a1", "b2"]) == 0.0
    assert ruler.postprocess("  \x01 42\x02\n") == "42"

    hits = [rng.random() < 0.5 for _ in range(4)]  # which of the 4 samples the scripted model answers
    outputs_of: dict[str, list[str]] = {}
    real = ruler_data.make_sample

    def recording(*a, **kw):
        s = real(*a, **kw)
        outputs_of[s.prompt] = s.outputs
        return s

    def scripted(model, tok, prompt, max_new, chunk):  # every answer in upper case, or a wrong one
        return " and ".join(o.upper() for o in outputs_of[prompt]) if hits[len(outputs_of) - 1] else "no idea"

    class Words:
        def encode(self, text):
            return text.split()

    monkeypatch.setattr(ruler_data, "make_sample", recording)
    monkeypatch.setattr(ruler, "generate", scripted)
    cfg = ruler.RulerConfig(tasks=["niah_single_1", "ruler_cwe"], lengths=[400], depths=[10.0], samples=2)
    result = ruler.run_ruler(None, Words(), cfg, progress=False)
    cells = {c["task"]: c for c in result["cells"]}
    assert cells["niah_single_1"]["all"] == pytest.approx((hits[0] + hits[1]) / 2)
    assert cells["ruler_cwe"]["all"] == pytest.approx((hits[2] + hits[3]) / 2)
    assert cells["ruler_cwe"]["depth"] is None
    score = RulerEvaluation().summarize(result)["ruler/score"]
    assert score.value == pytest.approx(sum(hits) / 4)
    assert f"| **all tasks** | {sum(hits) / 4:.3f} |" in ruler.summary_table(result)


@pytest.mark.slow
def test_polar_eval_ruler_writes_its_files(tiny_run, tmp_path):
    """The command end to end on a tiny run: JSON/CSV/PNG/MD files in the step folder, the JSON recording
    its options, every sample's prompt within its length; unknown task names are one-line errors."""
    from pretrain.cli import main

    out = tmp_path / "out"
    options = ["--tasks", "niah_single_1,ruler_fwe", "--lengths", "512,640", "--depths", "0,100", "--samples", "1",
               "--max-new", "4"]
    assert main(["eval", "ruler", str(tiny_run), *options, "--out", str(out)]) == 0
    (path,) = out.glob("ruler_*.json")
    data = json.loads(path.read_text())
    assert data["options"] == options and data["checkpoint_step"] == 5
    assert {p.suffix for p in out.glob(path.stem + ".*")} == {".json", ".csv", ".png", ".md"}
    assert len(data["cells"]) == 2 * 2 + 2 and all(s["tokens"] <= s["length"] for s in data["samples"])
    with pytest.raises(ValueError, match="unknown task.*niah_single_9"):
        from eval.registry import get

        get("ruler").check(["--tasks", "niah_single_9"])


@pytest.mark.slow
def test_a_killed_sweep_over_two_checkpoints_and_three_lengths_resumes(tiny_run, tmp_path, monkeypatch):
    """`polar eval sweep` with `--ruler` (three lengths) and `--position_loss` over two checkpoints, killed
    after its second evaluation, then rerun: only the missing evaluations run, and the combined table holds
    every checkpoint's RULER score per length and its loss beyond the training length, with the
    loss-by-position figure. Catches a kind whose results the sweep cannot resume or tabulate."""
    import shutil

    from eval import sweep as sw

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run / "checkpoints")
    evals = {"ruler": "--tasks niah_single_1 --lengths 300,350,400 --depths 50 --samples 1 --max-new 2",
             "position_loss": "--length 96 --windows 1 --train-length 32"}
    done, real = [], sw.evaluate

    def killable(name, checkpoint, step, options, progress=False):
        if len(done) == kill_after[0]:
            raise KeyboardInterrupt  # the sweep is killed here
        done.append((name, step))
        return real(name, checkpoint, step, options, progress)

    kill_after = [2]
    monkeypatch.setattr(sw, "evaluate", killable)
    with pytest.raises(KeyboardInterrupt):
        sw.sweep([run], 1, evals, out=tmp_path / "out", progress=False)
    first, kill_after[0] = list(done), None
    table = sw.sweep([run], 1, evals, out=tmp_path / "out", progress=False).read_text()
    assert len(done) == 4 and not set(done[2:]) & set(first)
    for step in (3, 5):
        row = next(line for line in table.splitlines() if line.startswith(f"| run | {step} |"))
        assert row.count("|") == table.splitlines()[0].count("|")
    header = table.splitlines()[0]
    assert all(f"ruler/score@{n}" in header for n in (300, 350, 400)) and "position_loss/beyond" in header
    assert (tmp_path / "out" / "sweep_position_loss.png").stat().st_size > 0


def test_lengths_too_short_for_a_task_are_refused_before_any_generation(tokenizers, hay, monkeypatch):
    """Every (task, length) that cannot hold its instruction, needles and question is named in one error
    before anything is generated; exactly those whose sample cannot be made. Catches a grid that fails at its
    first impossible cell after hours of the others."""
    from eval import ruler

    def never(*a, **kw):
        raise AssertionError("generated before the lengths were checked")

    monkeypatch.setattr(ruler, "generate", never)
    tok, _ = tokenizers["sentencepiece"]
    tasks, lengths = ["niah_single_1", "niah_multiquery", "ruler_cwe", "ruler_fwe"], [96, 160, 4096]
    cfg = ruler.RulerConfig(tasks=tasks, lengths=lengths, depths=[50.0], samples=1)
    impossible = set()
    for task in tasks:
        for n in lengths:
            try:
                make_sample(task, tok, hay, n, 50.0, cell_rng(cfg.seed, task, n, 50.0))
            except ValueError:
                impossible.add(f"{task} at {n}")
    assert impossible and not any(p.endswith(" 4096") for p in impossible)
    with pytest.raises(ValueError) as e:
        ruler.run_ruler(None, tok, cfg, progress=False)
    named = set(re.findall(r"(\w+ at \d+) \(needs \d+\)", str(e.value)))
    assert named == impossible and "\n" not in str(e.value)
