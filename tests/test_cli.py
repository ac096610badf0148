"""The `polar` CLI: help, `polar info` (counted preset sizes), kernel backend selection and its errors."""

import re
import subprocess
import sys

import pytest
import torch

from kernels import dispatch
from models import PRESETS, MambaLM, ModelConfig
from pretrain.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "info" in capsys.readouterr().out


def test_info_prints_counted_parameters(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    rows = re.finditer(r"^ {4}(\S+)\s+([\d,]+) ", out, re.M)  # every architecture's table, plugins' too
    counts = {m[1]: int(m[2].replace(",", "")) for m in rows}
    assert set(counts) == set(PRESETS)
    for name in ("mamba-tiny", "mamba-tiny-polar", "mamba-130m"):
        model = MambaLM(ModelConfig.preset(name))
        assert counts[name] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # the polarization paper's Table 4 buckets are all covered by presets
    assert 100e6 <= counts["mamba-130m"] <= 250e6
    assert 250e6 <= counts["mamba-370m"] <= 400e6
    assert 400e6 <= counts["mamba-550m"] <= 550e6
    assert "selective_scan   torch" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "info"], capture_output=True, text=True, check=True)
    assert "kernel backends" in out.stdout


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2


@pytest.mark.parametrize("value", ["triton", "cuda"])
def test_forced_backend_that_cannot_run_fails_clearly(monkeypatch, value):
    monkeypatch.setenv("POLAR_KERNELS", value)
    with pytest.raises(dispatch.KernelBackendError, match=f"POLAR_KERNELS={value}: .*needs CUDA"):
        dispatch.choose_backend("cpu")
    model = MambaLM(ModelConfig.preset("mamba-tiny"))
    with pytest.raises(dispatch.KernelBackendError):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_bad_backend_name(monkeypatch, capsys):
    monkeypatch.setenv("POLAR_KERNELS", "fast")
    with pytest.raises(dispatch.KernelBackendError, match="not one of auto, torch, triton, cuda"):
        dispatch.choose_backend("cpu")


def test_torch_backend_forced(monkeypatch):
    monkeypatch.setenv("POLAR_KERNELS", "torch")
    assert dispatch.choose_backend("cpu") == "torch"
    monkeypatch.setenv("POLAR_KERNELS", "auto")
    assert dispatch.choose_backend("cpu") == "torch"


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "deepspeed" else {prefix + k: v})
    return out


@pytest.mark.parametrize("command", ["train", "plan"])
def test_help_lists_every_config_key_with_its_default(capsys, command):
    """Checked against the dataclasses: every leaf of TrainConfig() appears as --KEY DEFAULT, nothing else."""
    import json

    from pretrain.config import TrainConfig

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    listed = dict(re.findall(r"^  --((?:\w+\.)+\w+) (.+?)  \(", out, re.M))
    expected = _leaves(TrainConfig().to_dict())
    assert set(listed) == set(expected)
    for key, value in expected.items():
        assert listed[key] == (value if isinstance(value, str) else json.dumps(value)), key


def test_one_flag_grammar_across_subcommands():
    """--dry-run is a switch, --out a folder, --nproc-per-node the process count, wherever they appear."""
    from pretrain.cli import build_parser

    seen = set()
    for path, parser in _commands(build_parser()):
        for a in parser._actions:
            for flag in a.option_strings:
                seen.add(flag)
                if flag == "--dry-run":
                    assert a.nargs == 0, path
                if flag == "--out":
                    assert "folder" in a.help or "DIR" in (a.metavar or ""), (path, a.help)
                assert flag not in ("--nproc", "--output", "--outdir"), path
    assert {"--dry-run", "--out", "--nproc-per-node"} <= seen


def test_bookkeeping_logs_go_to_the_log_file_not_the_terminal(tmp_path, monkeypatch, capfd):
    import logging

    from pretrain.console import configure_logging

    monkeypatch.setenv("POLAR_LOG", str(tmp_path / "polar.log"))
    try:
        configure_logging(verbose=False)
        logging.getLogger("kernels.dispatch").info("kernel backend for scan: torch")
        logging.getLogger("pretrain.trainer").info("step 2: val loss 6.2")
        logging.getLogger("kernels.dispatch").warning("fell back to torch")
        for h in logging.getLogger().handlers:
            h.flush()
        err = capfd.readouterr().err
        assert "step 2" in err and "fell back" in err and "kernel backend" not in err
        log = (tmp_path / "polar.log").read_text()
        assert all(s in log for s in ("kernel backend", "step 2", "fell back"))
    finally:
        for h in logging.getLogger().handlers[:]:
            h.close()
            logging.getLogger().removeHandler(h)


def _commands(parser, path=()):
    """(path, parser) for every leaf command."""
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not sub:
        yield path, parser
    for action in sub:
        for name, child in action.choices.items():
            yield from _commands(child, (*path, name))


def test_every_command_is_declared_in_its_packages_commands_module_with_short_help():
    """One CLI layout: each command's handler comes from ``<package>/commands.py`` (not from a domain module or a
    ``*_cli.py`` variant), and its description is short, pointing to docs/ for the long story. Catches a command
    registered from a stray module (a new naming style) and help that grows back into a page of prose."""
    from pretrain.cli import SUBCOMMAND_MODULES, build_parser

    assert all(m.endswith(".commands") for m in SUBCOMMAND_MODULES)
    for path, parser in _commands(build_parser()):
        func = parser.get_default("func")
        assert func is not None and func.__module__ in SUBCOMMAND_MODULES, (path, func)
        description = parser.description or ""
        assert 0 < len(description) <= 320, (path, len(description))
        if len(description) > 200:
            assert "docs/" in description, path
