"""ModelConfig: the fields every architecture shares, and the dispatch to each architecture's own config.

A model config is the dataclass its architecture registered (:mod:`models.registry`): a subclass of
:class:`ModelConfig` adding that architecture's fields and checks (Mamba's ``ssm``/``polarize``, the
Transformer's ``n_head``/``d_ff``/``rope_theta``, ...). ``ModelConfig.from_dict``, ``ModelConfig.preset`` and
``ModelConfig(...)`` itself build the subclass named by ``arch`` (default ``mamba``), so YAML recipes keep
one flat ``model:`` section. Run configs saved before the split (every architecture's fields in one
section) still load: their foreign fields are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Literal, get_type_hints

from models.plugins import load_plugins
from models.registry import PRESETS, get_arch, registered_archs
from models.typed_config import ConfigError, _suggest, apply_overrides, bounded, check_bounds, from_dict, to_dict

# Every saved config of the one-class layout had all of these; no architecture's own config has them all.
_UNION_LAYOUT_KEYS = frozenset({"ssm", "polarize", "n_head", "d_ff", "rope_theta", "init"})


def _keep_known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with only the keys dataclass ``cls`` has, recursively."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    return {k: _keep_known(hints[k], v) if is_dataclass(hints[k]) and isinstance(v, dict) else v
            for k, v in data.items() if k in known}


@dataclass
class InitFromConfig:
    """``model.init_from``: the checkpoint a new run starts from (pretrain/init_from.py). ``path``: a run directory,
    an export, a stock transformers or mamba_ssm folder, or a Hub id ORG/NAME; ``step``: a run's checkpoint
    (default its latest); ``revision``: a Hub revision. The trainer records the revision it read (a run's tag, a
    Hub commit) and ``sha256`` (of the weights as loaded); a recipe that sets ``sha256`` requires that source.
    ``trust_pickle``: load a source whose weights are pickles only (pytorch_model.bin), refused otherwise."""

    path: str | None = None
    step: int | None = bounded(None, ge=0)
    revision: str | None = None
    sha256: str | None = None
    trust_pickle: bool = False  # a source with pickle weights only (pytorch_model.bin) loads only when true


@dataclass
class ModelConfig:
    # fields that only shape a fresh initialisation: a run started from a checkpoint may set them differently
    INIT_ONLY: ClassVar[tuple[str, ...]] = ("initializer_range", "rescale_prenorm_residual", "init_from")

    arch: str = "mamba"  # a registered architecture: mamba, mamba2, transformer, or a plugin's (POLAR_PLUGINS)
    d_model: int = bounded(768, gt=0)
    n_layer: int = bounded(24, gt=0)
    vocab_size: int = bounded(50277, gt=0)
    pad_vocab_size_multiple: int = bounded(8, gt=0)
    norm_eps: float = bounded(1e-5, gt=0)
    residual_in_fp32: bool = True
    tie_embeddings: bool = True  # false: the LM head is its own matrix (lm_head.weight in exports)
    initializer_range: float = bounded(0.02, gt=0)
    rescale_prenorm_residual: bool = True
    final_norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # layernorm: the paper's MQAR model (not HF-exportable)
    # a checkpoint to start from instead of random weights: `init_from: PATH` or {path, step, revision, sha256,
    # trust_pickle}
    init_from: InitFromConfig | str = field(default_factory=InitFromConfig)

    def __new__(cls, *args: Any, **kwargs: Any):
        # ModelConfig(...) builds its architecture's class, so ModelConfig(vocab_size=64) is a Mamba's config
        if cls is ModelConfig:
            cls = get_arch(kwargs.get("arch", "mamba")).config
        return super().__new__(cls)

    def __post_init__(self):
        if isinstance(self.init_from, str):
            self.init_from = InitFromConfig(path=self.init_from)
        check_bounds(type(self), vars(self), "model")  # also when built directly: the checks below divide by these
        if get_arch(self.arch).config is not type(self):
            raise ConfigError(f"model.arch: {self.arch!r} is configured by {get_arch(self.arch).config.__name__}, "
                              f"not {type(self).__name__}")
        if self.d_model % 8:
            raise ConfigError(f"model.d_model must be a multiple of 8 (kernel tiling), got {self.d_model}")
        if self.final_norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"model.final_norm must be rmsnorm|layernorm, got {self.final_norm!r}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def d_model_multiple(self) -> int:
        """The grid d_model must lie on (eval/study.py's width search)."""
        return 8

    @classmethod
    def resolve_config_class(cls, data: dict[str, Any], prefix: str) -> tuple[type, dict[str, Any]]:
        """The config class of ``data["arch"]`` (typed_config's hook), and ``data`` without the other
        architectures' fields when it is a config saved in the one-class layout."""
        spec = get_arch(data.get("arch", "mamba"), f"{prefix}.arch" if prefix else "arch")
        if not issubclass(spec.config, cls):
            raise ConfigError(f"{prefix or 'model'}.arch: {spec.name!r} is not a {cls.__name__}")
        if _UNION_LAYOUT_KEYS <= data.keys():
            data = _keep_known(spec.config, data)
        own = {f.name for f in fields(spec.config)}
        for key in data.keys() - own:
            if owners := sorted(s.name for s in registered_archs() if key in {f.name for f in fields(s.config)}):
                raise ConfigError(f"{prefix or 'model'}.{key} is a field of arch {' / '.join(owners)}, "
                                  f"not of {spec.name}: remove it or set arch")
        return spec.config, data

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "model") -> ModelConfig:
        return from_dict(cls, data, prefix=prefix)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset of any registered architecture; ``overrides`` are dotted keys, e.g.
        ``preset("mamba-130m", **{"polarize.ones": 1})``, or plain fields (``n_layer=4``)."""
        if name not in PRESETS:
            load_plugins()
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset '{name}': {_suggest(name, list(PRESETS))}")
        return cls.from_dict(apply_overrides(PRESETS[name], overrides))
