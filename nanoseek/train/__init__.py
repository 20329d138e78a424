"""Training: one loop for pretraining and SFT (full or LoRA), resumable, multi-process, and the speedrun.

Modules:
  config    TrainConfig sections, TOML/YAML files, `section.key=value` overrides
  data      per-process batches over nanoseek.data (packed shards, chat SFT masking)
  optim     AdamW + Muon, warmup/decay schedule
  balance   MoE balancing: aux-loss-free bias update, sequence-wise aux loss
  metrics   JSONL log, FLOPs/MFU against a measured matmul peak, PNG curves
  dist      torchrun: gloo/nccl, DDP and FSDP2 wrapping, full state dicts
  lora      LoRA layers, PEFT-format adapters, merging
  trainer   the loop, checkpoints, export
  speedrun  tokenizer -> data -> pretrain -> SFT -> eval -> report card
  cli       `nanoseek train`, `nanoseek speedrun`
"""

from nanoseek.train.cli import add_speedrun_parser, add_train_parser

__all__ = ["add_train_parser", "add_speedrun_parser"]
