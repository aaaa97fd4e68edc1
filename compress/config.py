"""The experiment's typed configuration, composed from the group schemas and the method registry.

Groups that are not methods (``model``, ``calib``, ``eval``, ``train``, ``output``) have their dataclasses
in :mod:`compress.schema`. The method groups (``prune``, ``quant``, ``transform``) take the config
dataclass of the method chosen: :func:`register_configs` stores every registered method as a Hydra group
option, so ``prune=wanda`` composes :class:`~compress.pruning.wanda.WandaConfig` and a key that method
does not have (``prune.lora_steps``) fails at composition, naming the key and the method. :func:`validate`
then builds the dataclasses, whose ``validate`` checks every value, and checks the combination. All of
this happens before a model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List

from compress import pruning, quant, structured, transforms
from compress.core.config import choice
from compress.core.errors import ConfigError
from compress.registry import MethodConfig, NoneConfig, get, not_a_key, spec_of, specs
from compress.schema import CalibConfig, EvalConfig, ModelConfig, OutputConfig, TrainConfig, ZeroShotConfig

METHOD_PACKAGES = (pruning, quant, structured, transforms)  # imported: each method registers itself
STAGE_NAMES = ("prune", "train", "quant")
METHOD_GROUPS = ("prune", "quant", "transform")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the method groups hold the chosen method's config (prune=<method>); None = off. Untyped here: each
    # option brings its own dataclass (a typed default would refuse every other method's)
    prune: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: Any = None  # quant=<quantizer>
    transform: Any = None  # transform=<block transform>, run by the quant stage
    output: OutputConfig = field(default_factory=OutputConfig)
    # the order the stages run in (each runs when its method is not none), e.g. [prune, quant, train]
    stages: List[str] = field(default_factory=lambda: ["prune", "train", "quant"])
    seed: int = 0
    description: str = ""  # set by recipes: one line on what the experiment is for

    def __post_init__(self):
        for group in METHOD_GROUPS:
            if getattr(self, group) is None:
                setattr(self, group, NoneConfig())
            cfg = getattr(self, group)
            if not isinstance(cfg, MethodConfig):
                raise ConfigError(f"{group} must be a method's config (compress {group}=<method>), got {cfg!r}")
            spec = spec_of(cfg, group)
            if spec.kind != group or type(cfg) is not spec.config:
                raise ConfigError(f"{group}.method={cfg.method!r} does not match its config {type(cfg).__name__}: "
                                  f"choose the method with the group option, compress {group}={cfg.method}")
        order = list(self.stages)
        for s in order:
            choice("stages", s, STAGE_NAMES)
        if len(set(order)) != len(order):
            raise ConfigError(f"stages={order} names a stage twice. Valid: an order of {', '.join(STAGE_NAMES)}")
        for s in STAGE_NAMES:
            if s not in order and getattr(self, s).method != "none":
                raise ConfigError(f"{s}.method={getattr(self, s).method!r} but stages={order} leaves the {s} stage out")
        active = [s for s in order if getattr(self, s).method != "none"]
        if "quant" in active and active[-1] != "quant":
            after = active[active.index("quant") + 1:]
            raise ConfigError(f"stages={order} runs {', '.join(after)} after quantizing: not supported (it would move "
                              "the quantized weights off their grid; adapters on a quantized base would have to stay "
                              "unmerged). Put quant last, e.g. stages=[prune, train, quant]")
        if getattr(self.quant, "sparsity", None) is not None and self.prune.method != "none":
            raise ConfigError(f"quant={self.quant.method} chooses its own mask (quant.sparsity, quant.pattern) and "
                              f"would discard prune={self.prune.method}'s zeros: use one of them (the two-pass form is "
                              "prune=sparsegpt quant=gptq, which keeps the pruned zeros)")
        if self.transform.method != "none":
            if self.quant.method == "none" or not hasattr(self.quant, "group_size"):
                raise ConfigError(f"transform={self.transform.method} runs inside the quant stage before a grid "
                                  f"quantizer: it needs quant=" + "|".join(s.name for s in specs("quant")
                                                                          if s.config is not None and "group_size" in
                                                                          s.config.keys()) + f", got quant={self.quant.method}")
        q = self.quant
        if (self.prune.method == "structured" and getattr(q, "group_size", -1) > 0
                and self.prune.round_to % q.group_size):
            raise ConfigError(f"prune.round_to={self.prune.round_to} with quant.group_size={q.group_size}: the kept MLP "
                              "width must stay divisible by the quant group; set prune.round_to to a multiple of "
                              f"{q.group_size} (e.g. prune.round_to={q.group_size})")

    def is_dense_baseline(self) -> bool:
        return all(getattr(self, s).method == "none" for s in STAGE_NAMES)

    def slot_stage(self, slot: str) -> str:
        """The stage that runs a slot of ``stages`` (the method's registered stage; train runs the trainer)."""
        return "train" if slot == "train" else spec_of(getattr(self, slot), slot).stage


def validate(cfg) -> Config:
    """Turn a composed DictConfig into a checked :class:`Config` (raises :class:`ConfigError`)."""
    from omegaconf import DictConfig, OmegaConf

    for group in cfg:  # a key added with Hydra's "+" to a typed group is not one of its fields: refused
        node = cfg[group]
        typ = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if typ is None or not is_dataclass(typ):
            continue
        extra = [k for k in node if k not in {f.name for f in fields(typ)}]
        if extra and group in METHOD_GROUPS:
            raise ConfigError(not_a_key(group, node.get("method", "none"), extra[0]))
        if extra:
            raise ConfigError(f"{group}.{extra[0]} is not a key of {group} ({typ.__name__}). Keys: "
                              + ", ".join(f.name for f in fields(typ)))
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf wraps validate() errors; surface ours
        cause = e
        while cause is not None:
            if isinstance(cause, ConfigError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise ConfigError(str(e)) from None
    if not isinstance(obj, Config):
        raise ConfigError(f"composed config is {type(obj).__name__}, expected Config")
    return obj


def method_config(group: str, values: dict) -> MethodConfig:
    """A method group's config from a plain dict (a record's ``config.<group>``): unknown keys refused."""
    values = dict(values or {"method": "none"})
    name = values.get("method", "none")
    spec = get(group, name)
    bad = [k for k in values if k not in spec.config.keys()]
    if bad:
        raise ConfigError(not_a_key(group, name, bad[0]))
    return spec.config(**values)


def from_dict(d: dict) -> Config:
    """A :class:`Config` from its plain form (``dataclasses.asdict`` or a record's ``config``)."""
    kw = {}
    simple = {"model": ModelConfig, "calib": CalibConfig, "train": TrainConfig, "output": OutputConfig}
    for k, v in d.items():
        if k in METHOD_GROUPS:
            kw[k] = method_config(k, v)
        elif k == "eval":
            v = dict(v)
            if isinstance(v.get("zero_shot"), dict):
                v["zero_shot"] = ZeroShotConfig(**v["zero_shot"])
            kw[k] = EvalConfig(**v)
        elif k in simple:
            kw[k] = simple[k](**v)
        else:
            kw[k] = v
    return Config(**kw)


def label(group: str, values: dict) -> str:
    """``compare``'s label of a method setting from a record's config (old records: keys the method no longer
    has are ignored; an unknown method is shown by name)."""
    values = dict(values or {})
    name = values.get("method", "none")
    try:
        spec = get(group, name)
        known = {k: v for k, v in values.items() if k in spec.config.keys()}
        return spec.config(**known).label()
    except (ConfigError, TypeError, ValueError):
        return name


def register_configs() -> None:
    """Register the schema and every registered method as a Hydra group option (``prune=wanda``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group in METHOD_GROUPS:
        for spec in specs(group):
            cs.store(group=group, name=spec.name, node=spec.config)


def group_options() -> dict:
    """Method group -> [(option, one-line description)], from the registry (``compress list``)."""
    out = {g: [(s.name, s.summary) for s in specs(g)] for g in METHOD_GROUPS}
    out["prune.importance"] = [(s.name, s.summary) for s in specs("importance")]
    return out


def make_config(kind: str, name: str, **values) -> MethodConfig:
    """A registered method's config by name, e.g. ``make_config("prune", "wanda", pattern="2:4")`` (a key the
    method does not have is refused, naming it)."""
    return method_config(kind, dict(values, method=name))


def prune_config(method: str = "none", **values) -> MethodConfig:
    """``prune_config("wanda", pattern="2:4")``: the config of a registered prune method."""
    return make_config("prune", method, **values)


def quant_config(method: str = "none", **values) -> MethodConfig:
    """``quant_config("gptq", bits=4, group_size=64)``: the config of a registered quantizer."""
    return make_config("quant", method, **values)
