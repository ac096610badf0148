"""`polar publish`: turn a checkpoint into a Hub-ready folder (weights, config, generation config,
tokenizer, model card), check the folder, and upload it as one commit on one branch per step (as Pythia).

The repo id is checked before anything is written; the folder is written as every output is
(tokenizer/atomic.py). Nothing is uploaded unless the folder passes :func:`verify_folder`. The token comes
from ``HF_TOKEN`` or ``huggingface-cli login``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from models.config import ModelConfig
from models.ssm import SSMModelConfig
from pretrain import checkpoint as ckpt
from pretrain.export import checkpoint_location, eval_folder, export

REQUIRED = ("config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3


class PublishError(RuntimeError):
    """The folder or the upload failed; the message says what to fix."""


def build_folder(run: str | Path, out: str | Path, repo_id: str, step: int | None = None, license: str = "apache-2.0",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False,
                 project_url: str | None = None, revision: str | None = None) -> Path:
    """Export the checkpoint (weights, config, generation config, tokenizer) and add the model card
    ``README.md`` with that step's losses and the results stored under RUN/eval/step-N/."""
    from eval.results import read_step_results
    from pretrain.model_card import render_card

    loc = checkpoint_location(run, step)
    if loc is None:
        raise FileNotFoundError(f"no checkpoints under {run}: pass a run directory written by polar train")
    run_dir, step_n = loc[0].parent, ckpt.step_of(loc[1])
    model_cfg = ModelConfig.from_dict(ckpt.read_state(*loc)["config"]["model"])
    if not isinstance(model_cfg, SSMModelConfig):
        raise PublishError(f"{run} is a {model_cfg.arch} run: publishing is for state-space models (the model card "
                           "describes their state channels); use polar export for its Hugging Face folder")
    results = read_step_results(eval_folder(run, step_n), step_n)

    def finish(folder: Path, model, state: dict) -> None:
        if not (folder / "tokenizer_config.json").is_file():
            raise PublishError(f"{run} names no tokenizer (data.tokenizer): a published model needs one")
        card = render_card(repo_id, state, run_dir, model.num_parameters(), results, license,
                           state.get("hardware", f"{state.get('world_size', '?')} processes"),
                           project_url, revision)
        (folder / "README.md").write_text(card)

    return export(run, out, step_n, force=force, max_shard_bytes=max_shard_bytes, finish=finish)


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed Hub repo id with huggingface_hub's own validator (what the upload would apply)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f"--repo-id {repo_id!r} is not a Hub repo id ({str(e).splitlines()[0]}): pass "
                           "NAMESPACE/NAME, e.g. my-org/polar-mamba-130m") from e


def verify_folder(folder: str | Path) -> None:
    """Refuse a folder with a missing or corrupt file: every required file present, the weights load into
    the config's model (shapes and safetensors headers), the tokenizer loads, the card parses."""
    folder = Path(folder)
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors")
    if missing:
        raise PublishError(f"{folder} is incomplete (missing {', '.join(missing)}): rebuild it with polar publish")
    try:
        from huggingface_hub import ModelCard
        from transformers import AutoTokenizer

        from models.hf import from_pretrained

        from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
        ModelCard.load(folder / "README.md")
        json.loads((folder / "generation_config.json").read_text())
    except Exception as e:  # any failure to load is a corrupt folder
        raise PublishError(f"{folder} failed its checks ({type(e).__name__}: {str(e)[:300]}): rebuild it") from e


def upload(folder: str | Path, repo_id: str, revision: str, private: bool, message: str,
           retries: int = 3, api=None) -> str:
    """Create the repo (and branch) if needed and upload the folder as one commit; retries transient
    failures with backoff. Returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    verify_folder(folder)
    api = api or HfApi()
    for attempt in range(1, retries + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                     commit_message=message)
            return str(getattr(info, "commit_url", info))
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", None)
            if status in (401, 403):
                raise PublishError(f"the Hub refused the credentials for {repo_id} ({status}): set HF_TOKEN to a "
                                   "token with write access or run `huggingface-cli login`") from e
            if attempt == retries or (status is not None and status < 500 and status != 429):
                raise PublishError(f"upload to {repo_id} failed ({status}): {str(e)[:300]}") from e
        except (OSError, ConnectionError) as e:
            if attempt == retries:
                raise PublishError(f"upload to {repo_id} failed after {retries} tries (network: {e}): "
                                   "check the connection and run again") from e
        time.sleep(2**attempt)
    raise AssertionError("unreachable")


def publish(run: str | Path, repo_id: str, step: int | None = None, revision: str | None = None,
            private: bool = False, dry_run: bool = False, license: str = "apache-2.0",
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False, api=None,
            project_url: str | None = None, out: str | Path | None = None) -> str:
    """Build the folder into ``out`` (default: a temporary folder; RUN/hub/step-N with ``dry_run``), verify
    it, and unless ``dry_run`` upload it."""
    import tempfile

    check_repo_id(repo_id)  # before anything is written, with or without --dry-run
    loc = checkpoint_location(run, step)
    if loc is None:
        raise FileNotFoundError(f"no checkpoints under {run}: pass a run directory written by polar train")
    tag = loc[1]
    step_n = ckpt.step_of(tag)
    if out is None and dry_run:
        out = loc[0].parent / "hub" / f"step-{step_n}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out else Path(tmp) / "folder"
        build_folder(run, folder, repo_id, step_n, license, max_shard_bytes=max_shard_bytes, force=force,
                     project_url=project_url, revision=revision)
        verify_folder(folder)
        if dry_run:
            return f"wrote {folder} (checked; not uploaded)"
        url = upload(folder, repo_id, revision or f"step{step_n}", private, f"polar-mamba {tag}", api=api)
        return f"uploaded {run} {tag} to {repo_id}@{revision or f'step{step_n}'}: {url}"
