"""Shared building blocks used by several methods (LoRA, ...)."""

from .lora import (LoRALinear, LoRAQKV, apply_lora, load_adapter, lora_modules, lora_parameters, lora_state_dict,
                   merge_lora, read_adapter_manifest, save_adapter)

__all__ = ["LoRALinear", "LoRAQKV", "apply_lora", "load_adapter", "lora_modules", "lora_parameters", "lora_state_dict",
           "merge_lora", "read_adapter_manifest", "save_adapter"]
