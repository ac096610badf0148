"""Mamba-1 interchange with transformers' ``MambaForCausalLM`` and mamba_ssm's folders.

Our parameter names already follow transformers'; what differs is A_log. We keep A_log for the N learned
channels only; stock transformers has one A_log over all state channels, so export expands it to
``[-inf]*ones ++ learned ++ [+inf]*zeros`` (:mod:`models.hf_ssm`). In ``zero_mode: reference`` the zero
channels export as A_log = log(100), i.e. the paper's A = -100. mamba_ssm checkpoints (``config.json`` with
d_model/n_layer/ssm_cfg, ``pytorch_model.bin``) differ only by ``backbone.embedding.weight``.
"""

from __future__ import annotations

import math
from typing import Any

from models.config import ModelConfig
from models.hf_adapter import HFAdapter, StateDict
from models.hf_ssm import (
    is_mamba_ssm,
    mamba_ssm_fields,
    polar_a_log,
    ssm_config_json,
    ssm_fields_from_json,
    with_our_embedding_name,
)
from models.typed_config import ConfigError


class MambaAdapter(HFAdapter):
    def config_json(self, cfg: Any) -> dict[str, Any]:
        return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **ssm_config_json(cfg),
                "time_step_rank": cfg.dt_rank}

    def export_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        zero_value = math.log(100.0) if cfg.polarize.zero_mode == "reference" else math.inf
        return {k: polar_a_log(v, cfg, zero_value) if k.endswith("mixer.A_log") else v for k, v in sd.items()}

    def import_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        out = with_our_embedding_name(sd)
        for name, t in out.items():
            if name.endswith("mixer.A_log"):
                if t.shape[1] != cfg.d_state_total:
                    raise ConfigError(f"{name} has {t.shape[1]} state channels, config expects {cfg.d_state_total}")
                out[name] = t[:, cfg.polarize.ones : cfg.polarize.ones + cfg.ssm.d_state]
        return out

    def reads(self, data: dict[str, Any]) -> bool:
        return data.get("model_type") == "mamba" or is_mamba_ssm(data, "Mamba1")

    def config_from_json(self, data: dict[str, Any]) -> ModelConfig:
        if data.get("model_type") == "mamba":  # a stock transformers checkpoint (MambaConfig ties by default)
            fields = ssm_fields_from_json(data, d_state=16, tied=True)
            fields["ssm"]["dt_rank"] = data.get("time_step_rank", "auto")
            return ModelConfig.from_dict({"arch": "mamba", **fields})
        ssm_cfg = data.get("ssm_cfg") or {}  # mamba_ssm's MambaConfig
        ssm = {k: ssm_cfg[k] for k in ("d_state", "d_conv", "expand", "dt_rank") if k in ssm_cfg}
        return ModelConfig.from_dict({"arch": "mamba", **mamba_ssm_fields(data), "ssm": ssm})

    def stock_class(self, cfg: Any) -> str | None:
        return "MambaForCausalLM"
