"""Backend dispatch: the per-op choice, forced backends and their errors, defensive import probes, and a
tiny MambaLM on the Triton backend (interpreter) against the torch backend."""

import sys

import pytest
import torch

from kernels import dispatch
from models import MambaLM, ModelConfig


def test_auto_picks_torch_on_cpu_for_every_op(monkeypatch):
    monkeypatch.delenv("POLAR_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    info = dispatch.describe("cpu")
    assert {op: info[op] for op in dispatch.OPS} == {op: "torch" for op in dispatch.OPS}
    assert info["torch_available"] == "yes" and info["cuda_available"].startswith("no (")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())


@pytest.mark.parametrize("op", list(dispatch.OPS))
@pytest.mark.parametrize("forced", ["triton", "cuda"])
def test_forced_backend_that_cannot_run_fails_for_every_op(monkeypatch, op, forced):
    monkeypatch.setenv("POLAR_KERNELS", forced)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected = f"POLAR_KERNELS={forced}: .*needs CUDA.*set POLAR_KERNELS=auto"
    with pytest.raises(dispatch.KernelBackendError, match=expected):
        dispatch.choose_backend("cpu", op)
    assert dispatch.describe("cpu")[op].startswith("error: POLAR_KERNELS=")


def test_forced_cuda_names_the_missing_package():
    """On a CUDA device without mamba_ssm the reason is the failed import and the fix is named."""
    if dispatch._probe(dispatch.CUDA_PACKAGES["selective_scan"])[0] is not None:
        pytest.skip("mamba_ssm is importable here")
    reason = dispatch.unavailable_reason("cuda", torch.device("cuda"), "selective_scan")
    assert "import mamba_ssm" in reason and "pip install mamba-ssm" in reason


def test_probe_survives_non_import_errors(tmp_path, monkeypatch):
    """A compiled package can fail with OSError/RuntimeError, not only ImportError: that is 'unavailable'."""
    (tmp_path / "polar_broken_ext.py").write_text("raise OSError('libcudart.so.12: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module, why = dispatch._probe("polar_broken_ext")
    assert module is None and "OSError" in why and "libcudart" in why
    assert dispatch._probe("polar_no_such_module_xyz")[1].startswith("import polar_no_such_module_xyz failed")
    sys.modules.pop("polar_broken_ext", None)


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("POLAR_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    chosen = {op: dispatch.choose_backend("cpu", op) for op in dispatch.OPS}
    assert chosen == {op: "triton" if "triton" in backends else "torch" for op, backends in dispatch.OPS.items()}
    monkeypatch.setenv("POLAR_KERNELS", "auto")  # auto never picks the (slow) interpreter
    assert dispatch.choose_backend("cpu", "selective_scan") == "torch"


def test_model_on_triton_backend_matches_torch_backend(monkeypatch):
    """Forward (logits + loss) and every parameter gradient of a tiny polarized model, both backends."""
    pytest.importorskip("triton")
    cfg = ModelConfig.preset("mamba-tiny", d_model=16, n_layer=2, vocab_size=64,
                             **{"polarize.ones": 1, "polarize.zeros": 1})
    model = MambaLM(cfg)
    ids = torch.randint(0, 64, (2, 9))
    labels = torch.randint(0, 64, (2, 9))
    labels[0, :3] = -100

    def run(backend):
        monkeypatch.setenv("POLAR_KERNELS", backend)
        model.zero_grad()
        out = model(ids, labels=labels)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref, ref_grads = run("torch")
    got, got_grads = run("triton")
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_loss_without_logits(monkeypatch):
    """Training asks for the loss only: same loss, no logits computed."""
    model = MambaLM(ModelConfig.preset("mamba-tiny"))
    ids, labels = torch.randint(0, 512, (2, 12)), torch.randint(0, 512, (2, 12))
    full = model(ids, labels=labels)
    lean = model(ids, labels=labels, return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    expected = torch.nn.functional.cross_entropy(full.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(full.loss, expected)
