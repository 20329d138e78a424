"""Converting a dense model to DeepSeek Sparse Attention: DSA's two training stages.

DeepSeek-V3.2-Exp was made from V3.1-Terminus this way (its paper, section 2.1):

  1. indexer warm-up: the main attention stays dense and every weight but the lightning
     indexer's is frozen; each layer's indexer learns to match that layer's attention,
         L_I = sum_t KL( p_t || softmax(I_t) ),
     p_t = the main attention of query t summed over heads and L1-normalised.
     (DeepSeek: lr 1e-3, 1000 steps of 16 x 128K tokens.)
  2. sparse training: the top-k selection is switched on and the whole model trains on the
     LM loss; the indexer keeps matching the main attention, now over the selected keys S_t
     only, KL( p_t[S_t] || softmax(I_t[S_t]) ). The indexer's input is detached, so the
     indexer learns only from L_I and the main model only from the LM loss.
     (DeepSeek: lr 7.3e-6, 15000 steps of 480 x 128K tokens, k = 2048.)

The KL of each layer is computed and backpropagated inside the forward, chunk by chunk
(nanoseek.model.indexer.fit_indexer): it touches only the indexer's weights, so no n x n
graph is kept and the warm-up's main forward runs without autograd at all.

`data` is any iterable of token batches: LongTensor [B, T], or (inputs, targets) pairs as
nanoseek.data.shards.PackedDataset yields them.

CLI hook (for `nanoseek train`): add_stage_args(parser) adds the options, run_stage(args)
runs the stage named by args.stage ("indexer-warmup" or "sparse") and saves the model.
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

from nanoseek.errors import NanoseekError
from nanoseek.model.indexer import add_indexers, drop_indexers, indexer_parameters, select_per_group

STAGES = ("indexer-warmup", "sparse")


def indexers(model):
    return [layer.self_attn.indexer for layer in model.layers if getattr(layer.self_attn, "indexer", None) is not None]


def set_stage(model, stage: str | None):
    """Switch every indexer to a stage's behaviour; None restores inference behaviour."""
    if stage not in (None, *STAGES):
        raise NanoseekError(f"unknown stage {stage!r} (have: {', '.join(STAGES)})")
    for ix in indexers(model):
        ix.dense = stage == "indexer-warmup"
        ix.kl = stage is not None
        ix.last_kl = None


def _inputs_targets(batch, device):
    if isinstance(batch, (tuple, list)):
        inputs, targets = batch
    else:
        inputs, targets = batch[:, :-1], batch[:, 1:]
    return torch.as_tensor(inputs, device=device), torch.as_tensor(targets, device=device)


def _mean_kl(model) -> float:
    kls = [ix.last_kl for ix in indexers(model) if ix.last_kl is not None]
    return sum(kls) / max(len(kls), 1)


def _progress(t0: float, step: int, steps: int, batch_tokens: int) -> str:
    """Elapsed time, tokens/s and ETA after step (0-based) of steps."""
    took = time.perf_counter() - t0
    per_step = took / (step + 1)
    return (f"{took:.0f}s  {batch_tokens / per_step:,.0f} tok/s  "
            f"eta {per_step * (steps - step - 1):.0f}s")


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def indexer_warmup(model, data, steps: int = 100, lr: float = 1e-3, warmup_steps: int = 10,
                   grad_clip: float = 1.0, log_every: int = 10, log=None) -> list[float]:
    """Stage 1: train only the indexers to match the dense attention. Returns the KL per step
    (mean over layers of the per-token KL)."""
    ix_params = indexer_parameters(model)
    if not ix_params:
        raise NanoseekError("the model has no indexer: add them first (nanoseek.model.indexer.add_indexers)")
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in ix_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(ix_params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    set_stage(model, "indexer-warmup")
    history, t0 = [], time.perf_counter()
    try:
        for step, batch in zip(range(steps), data):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr, warmup_steps)
            opt.zero_grad(set_to_none=True)
            inputs, _ = _inputs_targets(batch, model.device)
            with torch.no_grad():  # the main model is frozen: its forward needs no graph
                model.hidden_states(inputs)
            torch.nn.utils.clip_grad_norm_(ix_params, grad_clip)
            opt.step()
            history.append(_mean_kl(model))
            if log and (step % log_every == 0 or step == steps - 1):
                log(f"indexer-warmup step {step + 1}/{steps}  kl {history[-1]:.4f}  "
                    f"{_progress(t0, step, steps, inputs.numel())}")
    finally:
        set_stage(model, None)
        for p, r in was.items():
            p.requires_grad_(r)
    return history


def sparse_train(model, data, steps: int = 100, lr: float = 7.3e-6, indexer_lr: float = 1e-4,
                 warmup_steps: int = 10, grad_clip: float = 1.0, log_every: int = 10, log=None) -> list[dict]:
    """Stage 2: sparse attention on, the whole model trains on the LM loss, the indexers on
    their KL over the selected keys. Returns [{"loss": ..., "kl": ...}] per step."""
    ix_params = indexer_parameters(model)
    if not ix_params:
        raise NanoseekError("the model has no indexer: add them and run the warm-up stage first")
    ix_ids = {id(p) for p in ix_params}
    main_params = [p for p in model.parameters() if id(p) not in ix_ids]
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": main_params, "lr": lr, "base": lr},
                             {"params": ix_params, "lr": indexer_lr, "base": indexer_lr}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    set_stage(model, "sparse")
    model.train()
    history, t0 = [], time.perf_counter()
    try:
        for step, batch in zip(range(steps), data):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, g["base"], warmup_steps)
            opt.zero_grad(set_to_none=True)
            inputs, targets = _inputs_targets(batch, model.device)
            logits = model(inputs)  # the indexers' KL grads land during this forward
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
            loss.backward()  # LM loss: main weights only (the indexers' inputs are detached)
            torch.nn.utils.clip_grad_norm_(main_params, grad_clip)
            torch.nn.utils.clip_grad_norm_(ix_params, grad_clip)
            opt.step()
            history.append({"loss": loss.item(), "kl": _mean_kl(model)})
            if log and (step % log_every == 0 or step == steps - 1):
                log(f"sparse step {step + 1}/{steps}  loss {history[-1]['loss']:.4f}  "
                    f"kl {history[-1]['kl']:.4f}  {_progress(t0, step, steps, inputs.numel())}")
    finally:
        set_stage(model, None)
        model.eval()
    return history


# ---- data and CLI glue -------------------------------------------------------------------

def token_batches(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
    """Endless random windows of seq_len + 1 tokens from one long token stream -> [B, seq_len + 1]."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() < seq_len + 2:
        raise NanoseekError(f"the training text has {ids.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=g)
        yield torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])


def add_stage_args(p):
    """Options for `nanoseek train --stage indexer-warmup|sparse`. Flags the caller's parser
    already has (--out, --steps, --lr, --seq-len, --batch-size, --seed, ...) are reused, not
    added again; run_stage reads whichever exist."""
    have = {o for a in p._actions for o in a.option_strings}

    def add(flag, **kw):
        if flag not in have:
            p.add_argument(flag, **kw)

    add("--stage", choices=STAGES, default=None, help="DSA conversion stage (sparse attention)")
    add("--model", default=None, help="model to convert: checkpoint dir, GGUF, or default (SmolLM2-135M)")
    add("--data", default=None, help="a nanoseek shard directory, or text files (comma-separated)")
    add("--out", default=None, help="where to save the converted model (HF format)")
    add("--index-heads", type=int, default=4, help="indexer heads, when the model has no indexer yet")
    add("--index-head-dim", type=int, default=64)
    add("--index-topk", type=int, default=None,
        help="keys each query keeps; default 1024 for new indexers, the model's own otherwise "
             "(SmolLM2-135M: 1024 keeps 2K-8K perplexity within 2%% of dense with 5 of 30 layers "
             "dense; 512 loses 3-4%% at 4K-8K, docs/BENCHMARKS.md)")
    add("--index-layers", default=None, help="comma-separated layer ids with an indexer (default: all)")
    add("--index-block-size", type=int, default=None,
        help="new indexers select blocks of this many keys (default 32; 1 = single keys, DSA as published; "
             "blocks are what makes sparse prefill faster than dense SDPA on a CPU)")
    add("--index-groups", type=int, default=None,
        help="block selections per layer: 1 = one for all heads (DSA); g = each of g groups of KV heads "
             "chooses its own blocks (NSA). Default for new indexers: one per KV head for GQA with blocks "
             "(faster prefill and better perplexity than one shared choice, docs/BENCHMARKS.md), else 1; "
             "given for a model that already has indexers, it splits their one choice into g")
    add("--kl-every", type=int, default=1, help="fit the indexer on every n-th chunk of 64 queries (n x cheaper)")
    add("--dense-layers", default=None,
        help="comma-separated layers made dense again (their indexers dropped) before the stage runs; "
             "with --steps 0 this only saves the hybrid")
    add("--steps", type=int, default=None)
    add("--lr", type=float, default=None, help="default: 1e-3 warm-up, 7.3e-6 sparse")
    add("--indexer-lr", type=float, default=1e-4, help="sparse stage: the indexers' lr")
    add("--seq-len", type=int, default=None)
    add("--batch-size", type=int, default=None)
    add("--seed", type=int, default=None)
    return p


def _load_data(spec: str, tok, seq_len: int, batch_size: int, seed: int):
    from pathlib import Path
    path = Path(spec)
    if path.is_dir() and (path / "index.json").is_file():
        from nanoseek.data.shards import PackedDataset
        return PackedDataset(path, seq_len, batch_size, seed=seed)
    if tok is None:
        raise NanoseekError("training on text files needs a model with a tokenizer")
    text = "\n\n".join(Path(f).read_text(errors="replace") for f in spec.split(","))
    return token_batches(tok.encode(text), seq_len, batch_size, seed)


def run_stage(args, log=None):
    """Run args.stage on a nanoseek-loadable model and save it to args.out.

    Reads: stage, model (or init_from), data (or shards / train_file), out, index_* options,
    steps, lr, indexer_lr, seq_len, batch_size, seed, precision; missing ones get defaults."""
    from nanoseek.loading import load

    def arg(name, default=None):
        v = getattr(args, name, None)
        return default if v is None else v

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    stage = arg("stage")
    if stage not in STAGES:
        raise NanoseekError(f"--stage must be one of {', '.join(STAGES)}")
    data_spec = arg("data") or arg("shards") or arg("train_file")
    if not data_spec or not arg("out"):
        raise NanoseekError(f"--stage {stage} needs --data (shard dir or text files) and --out")
    seq_len, batch_size, seed = arg("seq_len", 2048), arg("batch_size", 1), arg("seed", 0)
    model, tok = load(arg("model") or arg("init_from"), arg("precision", "bf16"))
    if not indexers(model):
        if stage == "sparse":
            log("note: the model has no indexer; adding fresh ones (run --stage indexer-warmup first)")
        layers = None if arg("index_layers") is None else [int(i) for i in str(args.index_layers).split(",")]
        cfg, block = model.config, arg("index_block_size", 32)
        groups = arg("index_groups", cfg.n_kv_heads if cfg.attn_type == "gqa" and block > 1 else 1)
        add_indexers(model, arg("index_heads", 4), arg("index_head_dim", 64), arg("index_topk", 1024), layers,
                     seed=seed, block_size=block, groups=groups)
    elif arg("index_groups", 1) > 1 and model.config.index_groups == 1:
        select_per_group(model, args.index_groups)  # each group starts from the shared choice
    if indexers(model) and arg("index_topk") and arg("index_topk") != model.config.index_topk:
        if args.index_topk % model.config.index_block_size:
            raise NanoseekError(f"--index-topk {args.index_topk} must be a multiple of the model's index block "
                                f"size {model.config.index_block_size}")
        model.config.index_topk = args.index_topk
        for ix in indexers(model):
            ix.topk = args.index_topk
    if arg("dense_layers"):
        drop_indexers(model, str(args.dense_layers).split(","))
    for ix in indexers(model):  # fp32 master weights: AdamW's small updates vanish in bf16
        ix.float()
        ix.kl_every = arg("kl_every", 1)
    data = _load_data(data_spec, tok, seq_len, batch_size, seed)
    steps = arg("steps", 100)
    if stage == "indexer-warmup":
        hist = indexer_warmup(model, data, steps, arg("lr", 1e-3), log=log)
        if hist:
            log(f"kl {hist[0]:.4f} -> {hist[-1]:.4f}")
    else:
        hist = sparse_train(model, data, steps, arg("lr", 7.3e-6), arg("indexer_lr", 1e-4), log=log)
    for ix in indexers(model):
        ix.to(model.dtype)
    model.save(args.out, tok)
    log(f"saved {args.out}")
    return hist
