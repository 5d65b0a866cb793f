//! PEFT-compatible LoRA adapters (read and write) and merged-model export.
