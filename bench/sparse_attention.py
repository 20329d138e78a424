"""DSA sparse attention vs dense (PyTorch SDPA) on this CPU: speed, memory, and quality.

    python bench/sparse_attention.py speed --config mla --lengths 4096,8192,16384,32768
    python bench/sparse_attention.py speed --config smollm2 --layers 6 --dense-layers 0 --index-groups 3 \\
        --block-size 32 --topk 1024 --lengths 4096,8192,16384,32768,65536 --tag _hybrid6_k1024
    python bench/sparse_attention.py quality --steps 60 --lr 3e-3 --save /tmp/dsa60
    python bench/sparse_attention.py quality --init /tmp/dsa60 --steps 30 --lr 1e-3 --seed 1 --save /tmp/dsa90

speed: prefill time and peak memory (RSS, each measurement in a fresh process) and decode
time per token, for a bench model of `--layers` layers with random weights, dense (the model
without indexers: SDPA with is_causal) vs sparse (the same model with DSA indexers). Decode
runs on a cache filled with random keys of the given length: its cost depends on shapes only.
Configs:
  mla     DeepSeek-V2-Lite-like MLA (dim 2048, 16 heads, kv_lora 512, rope 64, v 128) with
          nope 64 instead of 128, so that q/k and v head dims match (128) and dense SDPA runs
          its flash kernel (with 192 vs 128 it falls back to the math path, which materialises
          the n x n scores); dense SwiGLU FFN 1408; indexer 4 heads x 64 (rope 32), k = --topk
  smollm2 SmolLM2-135M's layer (dim 576, GQA 9/3 heads x 64, FFN 1536); indexer 4 x 64
--dense-layers leaves those layers dense in the sparse model (a hybrid: 1 of 6 is the share of
the 5-of-30 SmolLM2 hybrid that keeps quality; the dense peer is unchanged).
Times are wall clock and CPU time of the (single-threaded by default) process: on a shared
machine the CPU time is the comparable number; the plot shows it.
Writes bench/results/sparse_<config>.json and .png.

layers: with a converted model, one layer sparse at a time (the rest dense): where the
perplexity is lost. Writes bench/results/sparse_layers<tag>.json.

stage2: DeepSeek's second stage (sparse training of the whole model) on a warmed-up model, and
the dense model fine-tuned on the same batches as its control; perplexity and passkey.

    python bench/sparse_attention.py stage2 --init DIR --dense-layers 7,8,18,20,23 --steps 40 --lr 2e-5

quality: converts SmolLM2-135M-Instruct (nanoseek.load) with the warm-up stage on Python's
own documentation text (pydoc topics, first 80%), then compares held-out perplexity (last
20%) at 2K/4K/8K and passkey retrieval at several depths, dense vs sparse. Writes
bench/results/sparse_quality.json.
"""

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model.indexer import add_indexers, drop_indexers  # noqa: E402
from nanoseek.model.kv_cache import DenseKVCache  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402

RESULTS = ROOT / "bench" / "results"

CONFIGS = {
    "mla": dict(arch="deepseek_v3", attn_type="mla", vocab_size=32000, dim=2048, n_heads=16, q_lora_rank=0,
                kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, inter_dim=1408,
                n_activated_experts=1, rope_interleave=True, max_seq_len=65536),
    "smollm2": dict(arch="llama", attn_type="gqa", vocab_size=49152, dim=576, n_heads=9, n_kv_heads=3, head_dim=64,
                    inter_dim=1536, rope_theta=100000.0, max_seq_len=65536),
}


def build(config, layers, topk, index_heads, index_dim, sparse, block=1, groups=1, dense_layers=None):
    """The bench model; sparse: DSA indexers on every layer except `dense_layers` (a hybrid)."""
    cfg = ModelConfig(**CONFIGS[config], n_layers=layers)
    model = Transformer(cfg).init_weights(seed=0).to(torch.bfloat16).eval()
    if sparse:
        add_indexers(model, index_heads, index_dim, topk, block_size=block, groups=groups)
        if dense_layers:
            drop_indexers(model, dense_layers.split(","))
    return model


def fill_cache(model, n):
    """A cache holding n random tokens (decode cost depends on shapes, not values)."""
    cfg = model.config
    cache = DenseKVCache(cfg.n_layers, n + 16)
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(model.layers):
        if cfg.attn_type == "mla":
            cache.k[i] = torch.randn(1, n + 16, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=g).bfloat16()
        else:
            cache.k[i] = torch.randn(1, n + 16, cfg.n_kv_heads, cfg.head_dim, generator=g).bfloat16()
            cache.v[i] = torch.randn(1, n + 16, cfg.n_kv_heads, cfg.head_dim, generator=g).bfloat16()
        if layer.self_attn.indexer is not None:
            cache.ik[i] = torch.randn(1, n + 16, cfg.index_head_dim, generator=g).bfloat16()
    cache.length = n
    return cache


def one(args):
    """One measurement in this (fresh) process: prints a JSON line."""
    torch.set_num_threads(args.threads)
    model = build(args.config, args.layers, args.topk, args.index_heads, args.index_dim, args.mode == "sparse",
                  args.block_size, args.index_groups, args.dense_layers)
    n = args.n
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        h = model.hidden_states(ids)
        model.logits(h[:, -1:])
        prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del h
        cache = fill_cache(model, n)
        tok = torch.tensor([[1]])
        steps, cpu = [], []
        for i in range(args.decode_steps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            model(tok, torch.tensor([[cache.length]]), cache)
            cache.advance(1)
            steps.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    print(json.dumps(dict(config=args.config, mode=args.mode, n=n, prefill_s=prefill, prefill_cpu_s=prefill_cpu,
                          decode_ms=1000 * sorted(steps[1:])[len(steps[1:]) // 2],
                          decode_cpu_ms=1000 * sorted(cpu[1:])[len(cpu[1:]) // 2],
                          peak_rss_mb=rss1 / 1024, rss_before_prefill_mb=rss0 / 1024)), flush=True)


def speed(args):
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sparse_{args.config}{args.tag}.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() and args.resume else []
    done = {(r["mode"], r["n"]) for r in rows}
    for n in [int(x) for x in args.lengths.split(",")]:
        for mode in ("sparse", "dense"):
            if (mode, n) in done:
                continue
            cmd = [sys.executable, __file__, "_one", "--mode", mode, "--n", str(n), "--config", args.config,
                   "--layers", str(args.layers), "--topk", str(args.topk), "--block-size", str(args.block_size),
                   "--index-heads", str(args.index_heads), "--index-dim", str(args.index_dim),
                   "--index-groups", str(args.index_groups), "--threads", str(args.threads),
                   "--decode-steps", str(args.decode_steps)]
            if args.dense_layers:
                cmd += ["--dense-layers", args.dense_layers]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
            meta = dict(config=args.config, model=CONFIGS[args.config], layers=args.layers, topk=args.topk,
                        index_heads=args.index_heads, index_dim=args.index_dim, index_groups=args.index_groups,
                        block_size=args.block_size, threads=args.threads, dense_layers=args.dense_layers,
                        torch=torch.__version__)
            out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    plot(out)


def plot(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(Path(path).read_text())
    rows, meta = data["rows"], data["meta"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, style in (("dense", "o-"), ("sparse", "s-")):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [r["prefill_cpu_s"] for r in rs], style, label=mode)
        axes[1].plot(ns, [r["peak_rss_mb"] for r in rs], style, label=mode)
        axes[2].plot(ns, [r["decode_cpu_ms"] for r in rs], style, label=mode)
    for ax, title in zip(axes, ["prefill CPU time (s)", "peak RSS (MB)", "decode CPU time per token (ms)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    hybrid = f" (dense: layer {meta['dense_layers']})" if meta.get("dense_layers") else ""
    fig.suptitle(f"DSA vs dense SDPA, {meta['config']} x {meta['layers']} layers{hybrid}, top-k {meta['topk']}, "
                 f"block {meta.get('block_size', 1)}, groups {meta.get('index_groups', 1)}, "
                 f"indexer {meta['index_heads']}x{meta['index_dim']}, {meta['threads']} CPU thread(s), bf16")
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=110)


# ---- quality: SmolLM2-135M converted with the warm-up stage ---------------------------------

def text_tokens(tok):
    import pydoc_data.topics as topics
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    cut = int(len(ids) * 0.8)
    return ids[:cut], ids[cut:]


@torch.inference_mode()
def perplexity(model, ids, ctx, windows):
    """Mean NLL over the second half of each window (every scored token sees >= ctx/2 context)."""
    nll, count = 0.0, 0
    for w in range(windows):
        start = w * ctx
        x = ids[start:start + ctx + 1]
        if len(x) < ctx + 1:
            break
        logits = model.logits(model.hidden_states(x[None, :-1])[:, ctx // 2:])
        nll += torch.nn.functional.cross_entropy(logits[0], x[1 + ctx // 2:], reduction="sum").item()
        count += ctx - ctx // 2
    return float(torch.exp(torch.tensor(nll / count)))


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@torch.inference_mode()
def passkey(model, tok, ctx, depth, key):
    """Hide `key` at `depth` (0..1) of a ~ctx-token haystack; greedy-decode the answer."""
    n_fill = len(tok.encode(FILLER, add_special_tokens=False))
    reps = max((ctx - 60) // n_fill, 1)
    at = int(reps * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            + FILLER * at + needle + FILLER * (reps - at) + "What is the pass key? The pass key is")
    ids = torch.tensor([tok.encode(text)])
    cache = DenseKVCache(model.config.n_layers, ids.shape[1] + 8)
    out = []
    x = ids
    for _ in range(6):
        logits = model(x, cache.positions(1, x.shape[1]), cache)
        cache.advance(x.shape[1])
        out.append(int(logits[0, -1].argmax()))
        x = torch.tensor([[out[-1]]])
    answer = tok.decode(out)
    return str(key) in answer.replace(" ", ""), answer, ids.shape[1]


def quality(args):
    import nanoseek
    from nanoseek.train.sparse_stages import indexer_warmup, indexers, token_batches
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sparse_quality{args.tag}.json"
    model, tok = nanoseek.load(None, "bf16")
    dense = copy.deepcopy(model)
    train, held = text_tokens(tok)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if args.init:  # continue the warm-up of a model converted (and saved) before
        from nanoseek.checkpoint.hf import load_hf
        model = load_hf(args.init, "bf16")
        if args.index_groups > 1 and model.config.index_groups == 1:
            from nanoseek.model.indexer import select_per_group
            select_per_group(model, args.index_groups)  # each group starts from the shared choice
    else:
        add_indexers(model, args.index_heads, args.index_dim, args.topk, seed=0, block_size=args.block_size,
                     groups=args.index_groups)
    if args.new_block_size:  # the saved indexers at another block size: their keys pooled over other blocks
        model.config.index_block_size = args.new_block_size
        for ix in indexers(model):
            ix.block = args.new_block_size
    for ix in indexers(model):
        ix.float()  # fp32 master weights while training
        ix.kl_every = args.kl_every
    hist = [None] if args.steps == 0 else indexer_warmup(  # --steps 0: evaluate a saved model (--init) only
        model, token_batches(train, args.seq_len, args.batch_size, seed=args.seed),
        steps=args.steps, lr=args.lr, warmup_steps=max(args.steps // 10, 1), log_every=5, log=log)
    for ix in indexers(model):
        ix.to(torch.bfloat16)
    if args.dense_layers:  # evaluate with these layers' attention dense (their indexers unused)
        keep = {int(i) for i in args.dense_layers.split(",")}
        for ix in indexers(model):
            ix.dense = ix.layer_id in keep
    if args.eval_topk:  # evaluate with another top-k than the one trained with
        model.config.index_topk = args.eval_topk
        for ix in indexers(model):
            ix.topk = args.eval_topk
    train_s = time.perf_counter() - t0
    if args.save:
        model.save(args.save, tok)
    res = dict(setup=dict(model="SmolLM2-135M-Instruct bf16", index_heads=args.index_heads, index_dim=args.index_dim,
                          topk=model.config.index_topk, block_size=model.config.index_block_size,
                          index_groups=model.config.index_groups, kl_every=args.kl_every,
                          init=args.init, dense_layers=args.dense_layers, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                          lr=args.lr, train_tokens=len(train), heldout_tokens=len(held), threads=args.threads),
               warmup=dict(seconds=train_s, kl_first=hist[0], kl_last=hist[-1], kl=hist), ppl={}, passkey=[])
    for ctx in [int(c) for c in args.ppl_lengths.split(",") if c]:
        d = perplexity(dense, held, ctx, args.windows)
        s = perplexity(model, held, ctx, args.windows)
        res["ppl"][ctx] = dict(dense=d, sparse=s, rel=(s - d) / d)
        log(f"ppl@{ctx}: dense {d:.3f} sparse {s:.3f} ({100 * (s - d) / d:+.2f}%)")
        out.write_text(json.dumps(res, indent=1))
    for ctx in [int(c) for c in args.passkey_lengths.split(",") if c]:
        for depth in [float(x) for x in args.depths.split(",")]:
            key = 10000 + (int(ctx * 7 + depth * 1000) * 7919) % 89999
            ok_d, ans_d, n = passkey(dense, tok, ctx, depth, key)
            ok_s, ans_s, _ = passkey(model, tok, ctx, depth, key)
            res["passkey"].append(dict(ctx=n, depth=depth, key=key, dense=ok_d, sparse=ok_s,
                                       dense_answer=ans_d, sparse_answer=ans_s))
            log(f"passkey ctx {n} depth {depth}: dense {ok_d} sparse {ok_s}  ({ans_d!r} / {ans_s!r})")
            out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("setup", "ppl")}, indent=1))


def layers(args):
    """Which layers' selection costs the most: a converted model (--init) run with one layer
    sparse at a time, the rest dense; held-out perplexity at --ctx against all-dense."""
    import nanoseek
    from nanoseek.checkpoint.hf import load_hf
    from nanoseek.train.sparse_stages import indexers
    torch.set_num_threads(args.threads)
    _, tok = nanoseek.load(None, "bf16")
    model = load_hf(args.init, "bf16")
    _, held = text_tokens(tok)
    ixs = indexers(model)
    for ix in ixs:
        ix.dense = True
    base = perplexity(model, held, args.ctx, args.windows)
    rows = []
    for ix in ixs:
        ix.dense = False
        p = perplexity(model, held, args.ctx, args.windows)
        ix.dense = True
        rows.append(dict(layer=ix.layer_id, ppl=p, rel=(p - base) / base))
        print(f"layer {ix.layer_id}: {100 * rows[-1]['rel']:+.2f}%", file=sys.stderr, flush=True)
    out = RESULTS / f"sparse_layers{args.tag}.json"
    out.write_text(json.dumps(dict(init=args.init, ctx=args.ctx, windows=args.windows, dense_ppl=base, rows=rows),
                              indent=1))
    print(out)


def oracle_attention(q, k, v, scale, v_dim, index, per_group=False, chunk=512):
    """Block-sparse attention that chooses its blocks by the true dense attention mass (the
    indexer's KL target) instead of the indexer's scores: the ceiling of block selection at
    this top-k. per_group: each KV head's query group chooses its own blocks (as NSA does)."""
    from nanoseek.model.indexer import attention_target, choose_blocks, group_heads
    from nanoseek.model.sparse_attention import attend_blocks
    B, T, H, Dk = q.shape
    Hkv, bs = k.shape[2], index.block
    m, nb = index.topk // bs, (T + bs - 1) // bs
    G = Hkv if per_group else 1
    out = q.new_empty(B, T, H, v_dim)
    for b in range(B):
        for g in range(G):
            hs, ks = group_heads(g, G, H, Hkv)
            K, V = k[b, :, ks], None if v is None else v[b, :, ks]
            for a in range(0, T, chunk):
                e = min(a + chunk, T)
                p, _ = attention_target(q[b, a:e, hs], K[:e], scale, a)                  # [C, e]
                mass = F.pad(p, (0, nb * bs - e)).view(e - a, nb, bs).sum(-1)
                sel = choose_blocks(mass.log(), torch.arange(a, e) // bs, m)
                out[b, a:e, hs] = attend_blocks(q[b, a:e, hs], K, V, scale, v_dim, sel, a, bs)
    return out


def oracle(args):
    """Perplexity with blocks chosen by the true attention mass (shared, and per KV group):
    what a perfect indexer would reach at this top-k and block size."""
    import nanoseek
    import nanoseek.model.attention as attention
    from nanoseek.train.sparse_stages import indexers
    torch.set_num_threads(args.threads)
    model, tok = nanoseek.load(None, "bf16")
    _, held = text_tokens(tok)
    add_indexers(model, args.index_heads, args.index_dim, args.topk, seed=0, block_size=args.block_size)  # only
    # their block size and top-k are used: the oracle replaces their scores
    dense_layers = {int(i) for i in args.dense_layers.split(",")} if args.dense_layers else set()
    res = dict(topk=args.topk, block_size=args.block_size, dense_layers=args.dense_layers, windows=args.windows, ppl={})
    real = attention.sparse_causal_attention
    for ctx in [int(c) for c in args.ppl_lengths.split(",")]:
        row = {}
        for name, per_group in (("dense", None), ("shared", False), ("per_group", True)):
            for ix in indexers(model):
                ix.dense = name == "dense" or ix.layer_id in dense_layers
            attention.sparse_causal_attention = (lambda q, k, v, sc, vd, index, pg=per_group:
                                                 oracle_attention(q, k, v, sc, vd, index, pg))
            row[name] = perplexity(model, held, ctx, args.windows)
            print(f"ppl@{ctx} {name}: {row[name]:.3f}", file=sys.stderr, flush=True)
        attention.sparse_causal_attention = real
        row.update({f"{n}_rel": (row[n] - row["dense"]) / row["dense"] for n in ("shared", "per_group")})
        res["ppl"][ctx] = row
        out = RESULTS / f"sparse_oracle{args.tag}.json"
        out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


def lm_finetune(model, data, steps, lr, warmup_steps, log):
    """The dense control for stage 2: the same optimizer, schedule, clipping and batches as
    sparse_stages.sparse_train, on the LM loss alone."""
    from nanoseek.train.sparse_stages import _lr_at
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    hist, t0 = [], time.perf_counter()
    for step, batch in zip(range(steps), data):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup_steps)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            log(f"dense fine-tune step {step + 1}/{steps}  loss {hist[-1]:.4f}  {time.perf_counter() - t0:.0f}s")
    model.eval()
    return hist


def stage2(args):
    """DeepSeek's second stage on a warmed-up model (sparse attention on, the whole model on the
    LM loss, the indexers on their KL over the chosen keys), against its fair control: the dense
    model fine-tuned on the same batches with the same optimizer. Held-out perplexity at each
    length for the original dense model, the fine-tuned dense one, the warmed-up sparse model
    before stage 2 and after it; passkey for the last two trained models."""
    import nanoseek
    from nanoseek.checkpoint.hf import load_hf
    from nanoseek.train.sparse_stages import indexers, sparse_train, token_batches
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    out = RESULTS / f"sparse_stage2{args.tag}.json"
    dense0, tok = nanoseek.load(None, "fp32")
    train, held = text_tokens(tok)
    warm = load_hf(args.init, "fp32")
    if args.dense_layers:
        drop_indexers(warm, [int(i) for i in args.dense_layers.split(",")])
    sparse = copy.deepcopy(warm)
    warmup = max(args.steps // 10, 1)
    t0 = time.perf_counter()
    # bf16 matmuls, fp32 master weights; no cast cache: it would keep the first step's bf16 copies
    # of weights that every step updates (and their graph) for the whole loop
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        hist_s = sparse_train(sparse, token_batches(train, args.seq_len, 1, seed=args.seed), steps=args.steps, lr=args.lr,
                              indexer_lr=args.indexer_lr, warmup_steps=warmup, log_every=5, log=log)
    sparse_s = time.perf_counter() - t0
    dense1 = copy.deepcopy(dense0)
    t0 = time.perf_counter()
    hist_d = lm_finetune(dense1, token_batches(train, args.seq_len, 1, seed=args.seed), args.steps, args.lr, warmup, log)
    dense_s = time.perf_counter() - t0
    if args.save:
        sparse.save(args.save, tok)
    models = {"dense": dense0, "dense_finetuned": dense1, "sparse_warmup": warm, "sparse_stage2": sparse}
    for m in models.values():
        m.to(torch.bfloat16)
    res = dict(setup=dict(init=args.init, dense_layers=args.dense_layers, steps=args.steps, seq_len=args.seq_len,
                          lr=args.lr, indexer_lr=args.indexer_lr, seed=args.seed, threads=args.threads,
                          topk=warm.config.index_topk, block_size=warm.config.index_block_size,
                          index_groups=warm.config.index_groups, train_tokens=len(train), heldout_tokens=len(held)),
               seconds=dict(sparse=sparse_s, dense=dense_s), sparse_history=hist_s, dense_loss=hist_d, ppl={}, passkey=[])
    for ctx in [int(c) for c in args.ppl_lengths.split(",") if c]:
        row = {name: perplexity(m, held, ctx, args.windows) for name, m in models.items()}
        row["stage2_vs_finetuned"] = (row["sparse_stage2"] - row["dense_finetuned"]) / row["dense_finetuned"]
        row["stage2_vs_dense"] = (row["sparse_stage2"] - row["dense"]) / row["dense"]
        row["warmup_vs_dense"] = (row["sparse_warmup"] - row["dense"]) / row["dense"]
        res["ppl"][ctx] = row
        log(f"ppl@{ctx}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        out.write_text(json.dumps(res, indent=1))
    for ctx in [int(c) for c in args.passkey_lengths.split(",") if c]:
        for depth in [float(x) for x in args.depths.split(",")]:
            key = 10000 + (int(ctx * 7 + depth * 1000) * 7919) % 89999
            row = dict(depth=depth, key=key)
            for name in ("dense_finetuned", "sparse_stage2"):
                row[name], row[f"{name}_answer"], row["ctx"] = passkey(models[name], tok, ctx, depth, key)
            res["passkey"].append(row)
            log(f"passkey {row}")
            out.write_text(json.dumps(res, indent=1))
    print(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "_one", "quality", "layers", "oracle", "stage2"):
        s = sub.add_parser(name)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--topk", type=int, default=512)
        s.add_argument("--index-heads", type=int, default=4)
        s.add_argument("--index-dim", type=int, default=64)
        s.add_argument("--block-size", type=int, default=64, help="index block size (1 = token-level DSA)")
        if name in ("speed", "_one"):
            s.add_argument("--index-groups", type=int, default=1, help="selections per layer (GQA: up to n_kv_heads)")
            s.add_argument("--config", choices=list(CONFIGS), default="mla")
            s.add_argument("--layers", type=int, default=2)
            s.add_argument("--decode-steps", type=int, default=5)
            s.add_argument("--dense-layers", default=None,
                           help="sparse mode: comma-separated layers left dense (a hybrid, e.g. 0 of 6 = 5 of 30)")
        if name == "speed":
            s.add_argument("--lengths", default="4096,8192,16384,32768")
            s.add_argument("--resume", action="store_true", help="keep rows already in the JSON")
            s.add_argument("--tag", default="", help="results file suffix: sparse_<config><tag>.json")
        if name == "_one":
            s.add_argument("--mode", choices=["dense", "sparse"], required=True)
            s.add_argument("--n", type=int, required=True)
        if name == "layers":
            s.add_argument("--init", required=True, help="a converted model saved by quality --save")
            s.add_argument("--ctx", type=int, default=4096)
            s.add_argument("--windows", type=int, default=1)
            s.add_argument("--tag", default="")
        if name == "oracle":
            s.add_argument("--windows", type=int, default=2)
            s.add_argument("--ppl-lengths", default="2048,4096,8192")
            s.add_argument("--dense-layers", default=None, help="comma-separated layers kept dense")
            s.add_argument("--tag", default="")
        if name == "quality":
            s.add_argument("--steps", type=int, default=40)
            s.add_argument("--seq-len", type=int, default=2048)
            s.add_argument("--batch-size", type=int, default=1)
            s.add_argument("--lr", type=float, default=1e-3)
            s.add_argument("--windows", type=int, default=2)
            s.add_argument("--ppl-lengths", default="2048,4096,8192")
            s.add_argument("--passkey-lengths", default="2048,4096,8000")
            s.add_argument("--depths", default="0.1,0.5,0.9")
            s.add_argument("--save", default=None, help="save the converted model here")
            s.add_argument("--init", default=None, help="continue from a converted model saved by --save")
            s.add_argument("--seed", type=int, default=0, help="training-window sampling seed")
            s.add_argument("--kl-every", type=int, default=1, help="fit every n-th chunk of 64 queries")
            s.add_argument("--index-groups", type=int, default=1, help="selections per layer (3: one per KV head)")
            s.add_argument("--eval-topk", type=int, default=None, help="top-k for the evaluation (default: trained)")
            s.add_argument("--new-block-size", type=int, default=None,
                           help="with --init: train and evaluate the saved indexers at this block size")
            s.add_argument("--dense-layers", default=None, help="comma-separated layers evaluated dense")
            s.add_argument("--tag", default="", help="results file suffix: sparse_quality<tag>.json")
        if name == "stage2":
            s.add_argument("--init", required=True, help="a warmed-up model saved by quality --save")
            s.add_argument("--dense-layers", default=None, help="comma-separated layers made dense (indexers dropped)")
            s.add_argument("--steps", type=int, default=40)
            s.add_argument("--seq-len", type=int, default=4096)
            s.add_argument("--lr", type=float, default=2e-5, help="the main weights' lr (sparse stage and dense control)")
            s.add_argument("--indexer-lr", type=float, default=1e-4)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--windows", type=int, default=2)
            s.add_argument("--ppl-lengths", default="2048,4096,8192")
            s.add_argument("--passkey-lengths", default="2048,4096,8000")
            s.add_argument("--depths", default="0.1,0.5,0.9")
            s.add_argument("--save", default=None, help="save the stage-2 model here")
            s.add_argument("--tag", default="", help="results file suffix: sparse_stage2<tag>.json")
    args = p.parse_args()
    {"speed": speed, "_one": one, "quality": quality, "layers": layers, "oracle": oracle,
     "stage2": stage2}[args.cmd](args)


if __name__ == "__main__":
    main()
