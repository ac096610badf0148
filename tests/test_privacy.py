"""pretrain/privacy.py: what a published folder may name (relative paths, dataset specs, Hub ids) and the guard
that refuses a folder holding a local absolute path or a credential from the environment. The end-to-end check
(train -> export -> publish with planted values) is in tests/test_publish.py."""

from __future__ import annotations

import pytest

from pretrain.privacy import PrivateDataError, check_private, public_path, public_spec


def test_public_paths_and_specs(tmp_path):
    base = tmp_path / "project"
    assert public_path("runs/x") == "runs/x" and public_path("EleutherAI/gpt-neox-20b") == "EleutherAI/gpt-neox-20b"
    assert public_path(base / "runs" / "x", base) == "runs/x"
    assert public_path(tmp_path / "home" / "alice" / "scratch" / "data", base) == "data"
    assert public_path("../../alice/tok") == "tok" and public_path("~/scratch/tok") == "tok"
    assert public_spec("hf:org/name:cfg@train") == "hf:org/name:cfg@train"
    assert public_spec("builtin:shakespeare") == "builtin:shakespeare"
    assert public_spec(f"{tmp_path}/a.txt,{base}/b.jsonl", base) == "a.txt,b.jsonl"


def test_guard_names_the_leak_never_the_secret(tmp_path, monkeypatch):
    secret, scratch = "hf_0123456789abcdefXYZ", tmp_path / "home" / "alice" / "scratch"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a word, not a secret: "false" may appear anywhere
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "README.md").write_text("trained on data, tokenizers parallelism false\n")
    check_private(folder, [scratch / "data"])
    (folder / "config.json").write_text(f'{{"path": "{scratch}/data"}}\n')
    with pytest.raises(PrivateDataError, match=r"config.json holds the local path .*scratch/data"):
        check_private(folder, [scratch / "data"])
    (folder / "config.json").write_text(f'{{"token": "{secret}"}}\n')
    with pytest.raises(PrivateDataError, match=r"config.json holds the value of \$HF_TOKEN") as refused:
        check_private(folder)
    assert secret not in str(refused.value)
