"""Optimisers and learning-rate schedules (per iteration) used by the methods' recipes."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError
from ..config.run_config import TrainConfig


def build_optimizer(param_groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not any(g["params"] for g in param_groups):
        raise ConfigError("the method has no trainable parameters")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adamw, adam or sgd")


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at optimiser step ``step`` of ``total``."""
    total = max(total, 1)
    warm = cfg.warmup_steps if cfg.scheduler == "warmup_poly" or cfg.warmup_steps else 0
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.scheduler == "constant":
        return 1.0
    progress = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
    if cfg.scheduler in ("poly", "warmup_poly"):
        return (1.0 - progress) ** cfg.poly_power
    if cfg.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.scheduler == "multistep":
        return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    raise ConfigError(f"unknown scheduler {cfg.scheduler!r}; use constant, poly, warmup_poly, multistep or cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    lr_factor(0, total_steps, cfg)  # validate the name now, not mid-training
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
