"""Run configuration: typed dataclasses that round-trip to YAML, with dotted ``key=value`` overrides.

A run file looks like::

    backbone: {name: litemedsam, checkpoint: null, input_size: null, normalization: native}
    method: {name: decoder, options: {num_tokens: 2}}
    data: {path: data/Dataset001_MNI152Brain, axis: 0, empty_ratio: 0.25}
    train: {epochs: 20, batch_size: 8, lr: 1.0e-4}
    output: runs/decoder

Values are coerced to each field's annotated type (``samadapt.methods.options.coerce``); ``method.options`` are
typed and checked against the method's own config dataclass as soon as the config is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..methods import METHODS
from ..methods.base import config_from_dict
from ..methods.options import coerce


@dataclass
class BackboneSpec:
    name: str = "litemedsam"
    """Backbone name (``samadapt info`` lists them)."""
    checkpoint: str | None = None
    """Weights file; default: the bundled or cached weights of the backbone."""
    input_size: int | None = None
    """Input side in px; None: the backbone's native size. SAM ViT takes multiples of 16 (H-SAM's 512 or 224, with
    resampled position embeddings); LiteMedSAM (256) and tiny (64) accept only their own size."""
    normalization: str = "native"
    """native (the backbone's own pixel mean/std) | unit (the [0, 1] images unchanged, as H-SAM/SAMed feed SAM)."""


@dataclass
class MethodSpec:
    name: str = "decoder"
    """Method name (``samadapt info`` lists them)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Method-specific options (its config dataclass)."""


@dataclass
class DataConfig:
    path: str = ""
    """Dataset folder: nnU-Net raw (dataset.json), 2D folder (images/ + masks/), or .npz folder."""
    format: str = "auto"
    axis: int = 0
    """Slicing axis of 3D volumes in numpy (z, y, x) order: 0 = axial for RAS-like volumes."""
    resize: str = "longest"
    """How a slice becomes the model's S x S input: longest (SAM: longest side to S, zero-pad bottom/right) |
    stretch (resized directly to S x S, no padding: ProMISe's release). Predictions follow the run's setting."""
    resize_via: int | None = None
    """With resize=stretch: first stretch to this size, then to S (DeSAM's release: slices stored at 256 x 256,
    resized to 1024 at the model input, i.e. 256)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    split_file: str | None = None
    """JSON {"train": [...], "val": [...], "test": [...]} case lists; overrides the fractions."""
    fold: int | None = None
    folds: int | None = None
    fewshot: int | float | None = None
    """Keep this fraction (< 1) or count (>= 1) of labelled training slices (H-SAM's 10% setting: 0.1)."""
    intensity_mode: str = "auto"
    """auto | ct | mr | percentile | none."""
    window: str | None = None
    """Named CT window (e.g. abdomen) or None."""
    window_min: float | None = None
    window_max: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    """MR / percentile mode: clip to these intensity percentiles before scaling to [0, 1]."""
    augment: str = "none"
    """Augmentation recipe: none | light | standard | elastic. Image-space augmentation disables the cache."""
    empty_ratio: float | None = 0.25
    """Training slices without foreground kept per foreground slice; None keeps every slice."""
    cache: str = "auto"
    """Embedding cache: auto (on when the encoder is frozen and augment is none) | on | off."""
    cache_dir: str | None = None
    nonfinite: str = "error"
    """NaN/Inf image values: error (names file, case and count) | zero (replace them with 0)."""


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    """adamw | adam | sgd."""
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "poly"
    """constant | poly | warmup_poly | multistep | cosine."""
    warmup_steps: int = 0
    poly_power: float = 0.9
    milestones: tuple[float, ...] = (0.6, 0.9)
    """multistep: fractions of the total steps at which the lr is multiplied by ``gamma``."""
    gamma: float = 0.1
    grad_accum: int = 1
    amp: str = "auto"
    """auto | none | bf16 | fp16 (fp16 only on CUDA). auto: bf16 autocast where the device computes bf16 natively
    (CUDA with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere (``engine.fast.resolve_amp``)."""
    reuse_memory: bool = True
    """glibc: keep freed tensor memory in the heap instead of unmapping it every step (``engine.allocator``)."""
    grad_clip: float | None = None
    val_every: int = 1
    val_every_steps: int | None = None
    """Validate at most once per this many optimizer steps: an epoch of a few-label run is a few steps, so epochs
    are grouped and ``patience`` counts comparable training whatever the dataset size. The interval in epochs is
    ``max(val_every, ceil(val_every_steps / steps per epoch))``."""
    select_on: str = "dice"
    """The best checkpoint (and early stopping) follows the validation ``dice`` (highest) or ``loss`` (lowest: the
    method's own training loss on the validation split; DeSAM's release selects on validation DiceCE loss)."""
    patience: int | None = None
    """Early stopping after this many validations without improvement (see ``select_on``)."""
    max_minutes: float | None = None
    """Stop after the epoch during which this wall-time budget ran out."""
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""
    threads: int | None = None
    """torch CPU threads (None = torch's default)."""


@dataclass
class RunConfig:
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: str = "runs/run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """The config of a nested mapping in ``to_dict``'s form (a run's manifest ``config``): each value coerced
        to its setting's type, method options typed and checked (``method_options``); ``ConfigError`` names an
        unknown key or a bad value."""
        config = cls()
        _update(config, values, "")
        config.method.options = method_options(config.method)
        return config


def check_config(config: RunConfig) -> RunConfig:
    """Raise ``ConfigError`` naming the first setting outside its range (checked before a run starts)."""
    t, d = config.train, config.data
    checks = [
        ("train.epochs", t.epochs, t.epochs >= 1, ">= 1"),
        ("train.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
        ("train.lr", t.lr, math.isfinite(t.lr) and t.lr > 0, "a number > 0"),
        ("train.weight_decay", t.weight_decay, math.isfinite(t.weight_decay) and t.weight_decay >= 0, ">= 0"),
        ("train.grad_accum", t.grad_accum, t.grad_accum >= 1, ">= 1"),
        ("train.val_every", t.val_every, t.val_every >= 1, ">= 1"),
        ("train.val_every_steps", t.val_every_steps, t.val_every_steps is None or t.val_every_steps >= 1,
         ">= 1 or null"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("train.num_workers", t.num_workers, t.num_workers >= 0, ">= 0"),
        ("train.patience", t.patience, t.patience is None or t.patience >= 1, ">= 1 or null"),
        ("train.max_minutes", t.max_minutes, t.max_minutes is None or t.max_minutes > 0, "> 0 or null"),
        ("train.grad_clip", t.grad_clip, t.grad_clip is None or t.grad_clip > 0, "> 0 or null"),
        ("train.threads", t.threads, t.threads is None or t.threads >= 1, ">= 1 or null"),
        ("train.amp", t.amp, t.amp in ("auto", "none", "bf16", "fp16"), "auto, none, bf16 or fp16"),
        ("train.select_on", t.select_on, t.select_on in ("dice", "loss"), "dice or loss"),
        ("data.val_fraction", d.val_fraction, 0 <= d.val_fraction < 1, "in [0, 1)"),
        ("data.test_fraction", d.test_fraction, 0 <= d.test_fraction < 1, "in [0, 1)"),
        ("data.empty_ratio", d.empty_ratio, d.empty_ratio is None or d.empty_ratio >= 0, ">= 0 or null"),
        ("data.fewshot", d.fewshot, d.fewshot is None or d.fewshot > 0, "> 0 or null"),
        ("data.cache", d.cache, d.cache in ("auto", "on", "off"), "auto, on or off"),
        ("data.nonfinite", d.nonfinite, d.nonfinite in ("error", "zero"), "error or zero"),
        ("data.resize", d.resize, d.resize in ("longest", "stretch"), "longest or stretch"),
        ("data.resize_via", d.resize_via, d.resize_via is None or d.resize_via >= 1, ">= 1 or null"),
        ("data.resize_via", d.resize_via, d.resize_via is None or d.resize == "stretch",
         "null unless data.resize=stretch (the two-step route stretches to resize_via, then to the input size)"),
        ("output", config.output, bool(str(config.output).strip()), "a folder name"),
    ]
    for key, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r} is out of range: expected {expected}")
    return config


def _update(obj: Any, values: dict[str, Any], prefix: str) -> None:
    for key, value in values.items():
        where = f"{prefix}{key}"
        if isinstance(obj, dict):
            obj[key] = value
            continue
        if not dataclasses.is_dataclass(obj) or key not in {f.name for f in dataclasses.fields(obj)}:
            valid = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
            raise ConfigError(f"unknown config key {where!r}; valid here: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) or isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r}")
            _update(current, value, where + ".")
        else:
            setattr(obj, key, coerce(value, typing.get_type_hints(type(obj))[key], where))


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars/lists, coerced to the setting's type).

    ``method.options.<key>`` overrides apply after the others (typed by the method named last, wherever
    ``method.name`` comes); then every method option is typed and checked by ``method_options``."""
    options: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        nested: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            nested = {part: nested}
        if parts[0] == "method" and len(parts) > 2 and parts[1] == "options":
            options[".".join(parts[2:])] = value
            continue
        _update(config, nested, "")
    config.method.options.update(options)
    config.method.options = method_options(config.method)
    return config


def method_options(spec: MethodSpec) -> dict[str, Any]:
    """``spec.options`` coerced to the field types of method ``spec.name``'s config class and checked against
    their allowed values (``samadapt.methods.base.config_from_dict``); ConfigError names ``method.options.<key>``."""
    config = config_from_dict(METHODS.get(spec.name).config_class, spec.options)
    return {key: getattr(config, key) for key in spec.options}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or a preset name from samadapt/config/presets) and apply overrides."""
    config = RunConfig()
    if path:
        source = resolve_preset(path)
        try:
            values = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({exc})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        _update(config, values, "")
    return apply_overrides(config, overrides or [])


def preset_dir() -> Path:
    return Path(__file__).resolve().parent / "presets"


def resolve_preset(path: str | Path) -> Path:
    """A YAML path, or the name of a bundled preset (``decoder_cpu`` -> samadapt/config/presets/decoder_cpu.yaml)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    bundled = preset_dir() / f"{path}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in preset_dir().glob("*.yaml"))
    raise ConfigError(f"{path}: no such config file or preset; presets: {', '.join(names)}")


def save_config(config: RunConfig, path: str | Path) -> None:
    from ..io_utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
