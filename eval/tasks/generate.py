"""Generate the project's small offline lm-eval tasks from the builtin Shakespeare corpus, one per request type.

``polar eval lm CKPT --tasks polar_offline`` finds them without an include path (:func:`builtin_tasks_dir`
generates them once into the user cache); ``python -m eval.tasks.generate --out DIR`` writes
``DIR/data/*.jsonl`` and ``DIR/polar_*.yaml`` for ``--include_path DIR`` (other sizes or seeds). The YAMLs
use ``dataset_path: json`` with *absolute* ``data_files``: lm-eval hands ``dataset_kwargs`` to
``datasets.load_dataset`` unchanged, which resolves relative paths against the current directory, so
absolute paths are what works from any cwd.

Tasks (deterministic for a given seed; lines of verse with at least six words):
- ``polar_nextline`` (multiple_choice): two lines of a speech, pick the true next line among four.
- ``polar_lastword`` (loglikelihood, LAMBADA-style): perplexity and greedy accuracy of a line's last word.
- ``polar_passages`` (loglikelihood_rolling): word/byte perplexity and bits per byte of 12-line passages.
- ``polar_complete`` (generate_until): greedy completion of a half line, exact match, stopping at newline.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS = ("polar_nextline", "polar_lastword", "polar_passages", "polar_complete")
GROUP = "polar_offline"
VERSION = 1  # bump when the generated documents or YAMLs change: cached copies are then rebuilt

_YAML = {
    "polar_nextline": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "polar_lastword": """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + word}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "polar_passages": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
    "polar_complete": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{completion}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


def _speeches(seed: int) -> list[list[str]]:
    """Runs of consecutive verse lines (blank lines and speaker names end a run), shuffled."""
    from tokenizer.sources import iter_documents

    runs: list[list[str]] = []
    for doc in iter_documents("builtin:shakespeare"):
        run: list[str] = []
        for line in doc.splitlines():
            if len(line.split()) >= 6 and not line.isupper():
                run.append(line.strip())
            else:
                if len(run) >= 3:
                    runs.append(run)
                run = []
    random.Random(seed).shuffle(runs)
    return runs


def make_docs(n: int = 64, seed: int = 0) -> dict[str, list[dict]]:
    """``n`` documents per task."""
    rng = random.Random(seed)
    runs = _speeches(seed)
    pool = [line for run in runs[n:] for line in run]  # distractors come from other speeches
    docs: dict[str, list[dict]] = {t: [] for t in TASKS}
    for run in runs[:n]:
        a, b, nxt = run[:3]
        choices = [nxt, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        docs["polar_nextline"].append({"context": f"{a}\n{b}", "choices": choices, "label": choices.index(nxt)})
        *head, word = b.split()
        docs["polar_lastword"].append({"context": f"{a}\n{' '.join(head)}", "word": word})
        half = len(b.split()) // 2
        docs["polar_complete"].append({"context": f"{a}\n{' '.join(b.split()[:half])}",
                                       "completion": " " + " ".join(b.split()[half:])})
    for k in range(n):
        lines = pool[k * 12:(k + 1) * 12]
        docs["polar_passages"].append({"text": "\n".join(lines)})
    return docs


def write_tasks(out: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write the jsonl data and task YAMLs (plus the ``polar_offline`` group, last) into ``out``."""
    from tokenizer.atomic import write_text as _write  # whole files only: a reader never sees a torn one

    out = Path(out).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    for task, rows in make_docs(n, seed).items():
        data = out / "data" / f"{task}.jsonl"
        _write(data, "".join(json.dumps(r) + "\n" for r in rows))
        header = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                  f"    test: {json.dumps(str(data))}\ntest_split: test\n")
        _write(out / f"{task}.yaml", header + _YAML[task] + "metadata:\n  version: 1.0\n")
    _write(out / f"{GROUP}.yaml", f"group: {GROUP}\ntask:\n" + "".join(f"  - {t}\n" for t in TASKS)
           + "metadata:\n  version: 1.0\n")
    return out


def builtin_tasks_dir() -> Path:
    """The default tasks (64 documents, seed 0) where `polar eval lm` always looks: generated once (well under
    a second) into ~/.cache/polar-mamba/lm-tasks/vVERSION; the group YAML, written last, marks a whole copy."""
    out = Path.home() / ".cache" / "polar-mamba" / "lm-tasks" / f"v{VERSION}"
    return out if (out / f"{GROUP}.yaml").is_file() else write_tasks(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.tasks.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the YAMLs and data (pass it as --include_path)")
    p.add_argument("-n", type=int, default=64, help="documents per task (default 64)")
    p.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    args = p.parse_args(argv)
    print(f"wrote {', '.join(TASKS)} (group {GROUP}) to {write_tasks(args.out, args.n, args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
