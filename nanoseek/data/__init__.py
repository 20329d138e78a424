"""Data pipeline: ingest -> clean/dedup -> tokenizer -> tokenized shards -> packed batches.

Modules (imported lazily by callers, so `import nanoseek.data` stays cheap):
  ingest          read text / JSONL / chat JSONL into normalised Documents
  dedup           exact + MinHash near-duplicate removal, quality filters, removal report
  tokenizer_train byte-level BPE training with chat special tokens, HF-compatible save
  problems        verifiable arithmetic word problems, GSM8K loader, answer reward
  shards          token shards on disk, BOS-aligned packed pretraining batches, SFT batches
  cli             `nanoseek data ...` subcommands
"""
