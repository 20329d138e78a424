"""The training loop: one loop for pretraining and SFT (and LoRA), resumable to the bit.

One optimizer step:
    lr     <- schedule(step)
    batch  <- grad_accum micro-batches (each process its slice of the global batch)
    loss   =  sum of token losses / number of loss tokens in the *global* batch
              (+ alpha * sequence-wise balance loss), backward per micro-batch
    grads  <- all-reduced (DDP / FSDP2), clipped by global norm
    step AdamW (+ Muon), then the aux-loss-free router bias update from the global load

Normalising by the global token count makes the gradient independent of how the batch is
split over micro-batches and processes (SFT batches have varying numbers of loss tokens).

out_dir holds: checkpoint.pt (everything needed to resume: model, optimizers, step, data
position, RNG states, config; written atomically), config.toml (resolved config),
log.jsonl, curves.png, and at the end model/ (HF checkpoint + tokenizer) and, for LoRA
runs, adapter/ (PEFT format).
"""

import contextlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek.checkpoint.hf import atomic_write
from nanoseek.config import ModelConfig
from nanoseek.cpu_heap import keep_freed_memory
from nanoseek.errors import NanoseekError
from nanoseek.model.transformer import Transformer
from nanoseek.train import dist as D
from nanoseek.train.balance import LoadTracker, keep_scores, sequence_aux_loss, update_bias
from nanoseek.train.config import TrainConfig, dump_toml
from nanoseek.train.data import IGNORE_INDEX, PretrainStream, SFTStream, eval_batches, read_conversations
from nanoseek.hardware import bf16_fast, warn_slow_bf16
from nanoseek.train.metrics import JSONLLog, flops_per_token, peak_flops, plot_curves
from nanoseek.train.optim import build_optimizers, lr_multiplier, set_lr

CHECKPOINT = "checkpoint.pt"


def load_tokenizer(path):
    from nanoseek.tokenizer import Tokenizer
    return Tokenizer.from_dir(str(path))


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.info = D.setup(cfg.run.device)
        self.device = self.info.device
        if torch.device(self.device).type == "cpu":
            keep_freed_memory()  # each step's activations reuse the heap instead of fresh pages
        if cfg.run.bf16 and not bf16_fast(self.device):
            # bf16 autocast only buys speed (master weights are fp32 either way); where the device has
            # no bf16 matmul units it costs 7x instead, so the run (and the config it stores) is fp32
            cfg.run.bf16 = False
            if self.info.is_main:
                warn_slow_bf16("run.bf16 -> false", "training in fp32", self.device)
        self._check_data_exists()  # fail on a bad path before minutes of model set-up
        self._seed_everything(cfg.run.seed)
        self.tokenizer, self.tokenizer_dir = None, None
        self.model = self._build_model()
        self.model.to(self.device).train()
        if cfg.lora.enabled:
            from nanoseek.train.lora import apply_lora
            apply_lora(self.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
            self.model.to(self.device)
        self.wrapped = D.wrap(self.model, self.info, cfg.run.dist)
        self.opts = build_optimizers(self.model, cfg)
        self.stream = self._build_stream()
        self.eval_data = eval_batches(cfg, self.tokenizer, cfg.eval.batches, self.info.rank, self.info.world_size)
        self.tracker = LoadTracker(self.model)
        keep_scores(self.model, cfg.moe.seq_aux_loss > 0)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        resumed = resume and (self.out / CHECKPOINT).is_file()
        if resumed:
            self._load_checkpoint()
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.toml", lambda tmp: Path(tmp).write_text(dump_toml(cfg.to_dict())))
        self.flops_per_token = flops_per_token(self.model.config, cfg.data.seq_len)
        if cfg.lora.enabled:  # frozen weights need no weight gradients: ~2/3 of the backward
            self.flops_per_token *= 2 / 3
        self.peak = peak_flops(self.device.type, bf16=cfg.run.bf16) * self.info.world_size
        self.log = JSONLLog(self.out / "log.jsonl", resume_step=self.step if resumed else None, enabled=self.info.is_main)
        if not resumed:
            self.log.write({"step": 0, "event": "config", "config": cfg.to_dict(),
                            "model_config": self.model.config.to_dict(), "world_size": self.info.world_size,
                            "params": self.model.config.num_params(),
                            "active_params": self.model.config.num_params(active=True),
                            "flops_per_token": self.flops_per_token, "peak_flops": self.peak})

    # ---- set-up ---------------------------------------------------------------------------

    def _check_data_exists(self):
        d = self.cfg.data
        if d.mode == "pretrain":
            from nanoseek.data.shards import read_index
            for shards in filter(None, (d.shards, d.eval_shards)):
                read_index(shards)
        for field, f in (("data.train_file", d.train_file), ("data.eval_file", d.eval_file)):
            if d.mode == "sft" and f and not Path(f).is_file():
                raise NanoseekError(f"{f}: no such file (config field {field})")

    def _seed_everything(self, seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _tokenizer_path(self) -> Path | None:
        d = self.cfg.data
        if d.tokenizer:
            return Path(d.tokenizer)
        if d.mode == "pretrain" and d.shards:
            meta = json.loads((Path(d.shards) / "index.json").read_text()).get("meta", {}) \
                if (Path(d.shards) / "index.json").is_file() else {}
            if meta.get("tokenizer") and (Path(meta["tokenizer"]) / "tokenizer.json").is_file():
                return Path(meta["tokenizer"])
        return None

    def _build_model(self) -> Transformer:
        m = self.cfg.model
        tok_path = self._tokenizer_path()
        if tok_path is not None:
            self.tokenizer, self.tokenizer_dir = load_tokenizer(tok_path), tok_path
        if m.init_from:
            if m.overrides:
                raise NanoseekError("config: field model.overrides: applies to model.preset, not to model.init_from")
            from nanoseek.loading import load
            model, tok = load(m.init_from, "fp32")
            if self.tokenizer is None:
                self.tokenizer = tok
            return model
        cfg_dict = ModelConfig.preset(m.preset).to_dict()
        if self.tokenizer is not None:  # the embedding table follows the tokenizer
            cfg_dict.update(vocab_size=len(self.tokenizer), bos_token_id=self.tokenizer.bos_token_id,
                            eos_token_id=self.tokenizer.eos_token_ids)
        cfg_dict["max_seq_len"] = max(cfg_dict["max_seq_len"], self.cfg.data.seq_len)
        unknown = sorted(set(m.overrides) - set(cfg_dict))
        if unknown:
            raise NanoseekError(f"config: field model.overrides: unknown model field(s) {', '.join(unknown)}")
        cfg_dict.update(m.overrides)
        return Transformer(ModelConfig.from_dict(cfg_dict)).init_weights(m.init_std, seed=self.cfg.run.seed)

    def _build_stream(self):
        d, info = self.cfg.data, self.info
        if d.mode == "pretrain":
            return PretrainStream(d.shards, d.seq_len, d.batch_size, info.rank, info.world_size,
                                  seed=self.cfg.run.seed, buffer_size=d.buffer_size)
        if self.tokenizer is None:
            raise NanoseekError("config: field data.tokenizer: SFT needs a tokenizer (set data.tokenizer or model.init_from)")
        return SFTStream(read_conversations(d.train_file), self.tokenizer, d.seq_len, d.batch_size,
                         info.rank, info.world_size, seed=self.cfg.run.seed)

    # ---- one step -------------------------------------------------------------------------

    def _autocast(self):
        if not self.cfg.run.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _global_count(self, batches) -> torch.Tensor:
        n = sum((y != IGNORE_INDEX).sum() for _, y in batches).to(torch.float64)
        return D.all_reduce_sum(n)

    def train_step(self) -> dict:
        cfg, world = self.cfg, self.info.world_size
        t0 = time.perf_counter()
        mult = lr_multiplier(self.step, cfg)
        set_lr(self.opts, mult)
        batches = [self.stream.next_batch() for _ in range(cfg.data.grad_accum)]
        if any(b is None for b in batches):
            raise NanoseekError(f"{cfg.data.shards}: the data ran out")
        n_global = self._global_count(batches)
        if n_global == 0:
            raise NanoseekError("a training batch has no loss tokens (SFT data without assistant turns?)")
        loss_sum, aux_sum = torch.zeros((), dtype=torch.float64), 0.0
        for i, (x, y) in enumerate(batches):
            x, y = x.to(self.device), y.to(self.device)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    logits = self.wrapped(x)
                token_loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
                # DDP/FSDP average gradients over processes; the loss is a sum over the global batch
                loss = token_loss * (world / n_global.item())
                if cfg.moe.seq_aux_loss > 0 and self.tracker.gates:
                    real = (x != self.stream.pad_id) if cfg.data.mode == "sft" else None  # SFT rows are padded
                    aux = sequence_aux_loss(self.model, x.shape[0], x.shape[1], cfg.moe.seq_aux_loss, real) / len(batches)
                    loss = loss + aux
                    aux_sum += aux.item()
                loss.backward()
            self.tracker.add()
            loss_sum += token_loss.detach().double()
        loss_value = (D.all_reduce_sum(loss_sum) / n_global).item()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        for opt in self.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        speed = cfg.moe.bias_update_speed if not cfg.lora.enabled else 0.0  # LoRA keeps the base frozen
        loads = update_bias(self.tracker, speed)
        self.tracker.reset()
        self.step += 1
        dt = time.perf_counter() - t0
        step_tokens = sum(x.numel() for x, _ in batches) * world
        self.tokens += step_tokens
        self.elapsed += dt
        tps = step_tokens / dt
        record = {"step": self.step, "loss": loss_value, "lr": cfg.optim.lr * mult, "lr_mult": mult, "grad_norm": grad_norm,
                  "tokens_per_s": tps, "mfu": tps * self.flops_per_token / self.peak,
                  "tokens": self.tokens, "time": self.elapsed, "step_time": dt}
        if len(self.opts) > 1:
            record["muon_lr"] = cfg.optim.muon_lr * mult
        if aux_sum:
            record["aux_loss"] = aux_sum
        if loads:
            record["expert_load"] = [[round(f, 5) for f in layer] for layer in loads]
        if not math.isfinite(loss_value):
            raise NanoseekError(f"loss is {loss_value} at step {self.step}; lower optim.lr / optim.muon_lr")
        return record

    # ---- eval -----------------------------------------------------------------------------

    @torch.no_grad()
    def eval_loss(self) -> float | None:
        if not self.eval_data:
            return None
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for x, y in self.eval_data:
            with self._autocast():
                logits = self.wrapped(x.to(self.device))
            total += F.cross_entropy(logits.view(-1, logits.shape[-1]), y.to(self.device).reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").double().cpu()
            count += (y != IGNORE_INDEX).sum()
        self.model.train()
        return (D.all_reduce_sum(total) / D.all_reduce_sum(count)).item()

    @torch.no_grad()
    def samples(self) -> list[dict]:
        """Greedy continuations of eval.samples (chat-formatted in SFT mode); every rank computes them."""
        if not self.cfg.eval.samples or self.tokenizer is None:
            return []
        self.model.eval()
        out = []
        stops = set(self.tokenizer.eos_token_ids)
        for prompt in self.cfg.eval.samples:
            if self.cfg.data.mode == "sft" and self.tokenizer.chat_template:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            else:
                ids = self.tokenizer.encode(prompt)
            ids, new = list(ids), []
            for _ in range(self.cfg.eval.sample_tokens):
                with self._autocast():
                    logits = self.wrapped(torch.tensor([ids + new], device=self.device))
                nxt = int(logits[0, -1].argmax())
                if nxt in stops:
                    break
                new.append(nxt)
            out.append({"prompt": prompt, "completion": self.tokenizer.decode(new)})
        self.model.train()
        return out

    def evaluate(self) -> dict:
        rec = {"step": self.step}
        loss = self.eval_loss()
        if loss is not None:
            rec["eval_loss"] = loss
        samples = self.samples()
        if samples:
            rec["samples"] = samples
        return rec

    # ---- checkpoints ----------------------------------------------------------------------

    def _model_state(self) -> dict:
        state = D.model_state(self.wrapped)
        if self.cfg.lora.enabled:  # the base is the init_from checkpoint: keep adapters + buffers only
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable or "e_score_correction_bias" in k}
        return state

    def save_checkpoint(self):
        state = {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
            "model": self._model_state(),
            "optimizers": [D.optim_state(self.wrapped, o) for o in self.opts],
            "data": self.stream.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": self.cfg.to_dict(),
        }
        if self.info.is_main:
            atomic_write(self.out / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        if self.info.enabled:
            torch.distributed.barrier()

    def _load_checkpoint(self):
        path = self.out / CHECKPOINT
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise NanoseekError(f"{path}: cannot read checkpoint ({e})") from None
        D.load_model_state(self.wrapped, state["model"], strict=not self.cfg.lora.enabled)
        if len(state["optimizers"]) != len(self.opts):
            raise NanoseekError(f"{path}: optimizer layout changed (optim.muon differs from the checkpoint?)")
        for opt, s in zip(self.opts, state["optimizers"]):
            D.load_optim_state(self.wrapped, opt, s)
        self.stream.load_state_dict(state["data"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]

    def export(self):
        """model/ (HF checkpoint + tokenizer) and, for LoRA runs, adapter/ (PEFT format)."""
        state = D.model_state(self.wrapped) if D.is_sharded(self.model) else None
        if not self.info.is_main:
            return
        model = self.model
        if state is not None:  # FSDP: rebuild an unsharded copy from the gathered state
            with torch.device("meta"):
                model = Transformer(self.model.config)
            model.load_state_dict(state, assign=True)
        if self.cfg.lora.enabled:
            from nanoseek.train.lora import merge_lora, save_adapter
            save_adapter(model, self.out / "adapter", base_model=self.cfg.model.init_from or None)
            if not self.cfg.lora.merge:
                return
            import copy
            model = merge_lora(copy.deepcopy(model))
        model.save(self.out / "model", tokenizer=self.tokenizer)

    # ---- the loop -------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to schedule.steps (or stop_after steps in this call); save, eval, log, plot."""
        from tqdm import tqdm
        cfg = self.cfg
        total = cfg.schedule.steps
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.run.progress and self.info.is_main), dynamic_ncols=True)
        t_start, last = time.perf_counter(), {}
        ran = 0
        while self.step < total:
            rec = self.train_step()
            ran += 1
            if self.step % cfg.run.log_every == 0 or self.step == total:
                self.log.write(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", mfu=f"{100 * rec['mfu']:.1f}%")
            last = rec
            out_of_time = cfg.run.max_minutes and time.perf_counter() - t_start > 60 * cfg.run.max_minutes
            done = self.step == total or out_of_time or (stop_after is not None and ran >= stop_after)
            if (cfg.eval.every and self.step % cfg.eval.every == 0) or done:
                ev = self.evaluate()
                if len(ev) > 1:
                    self.log.write(ev)
                    last.update({k: v for k, v in ev.items() if k != "step"})
            if self.step % cfg.run.save_every == 0 or done:
                self.save_checkpoint()
                if cfg.run.plot and self.info.is_main:  # matplotlib is slow: only with checkpoints
                    plot_curves(self.out / "log.jsonl", self.out / "curves.png")
            if done:
                break
        bar.close()
        if self.step == total or (cfg.run.max_minutes and ran and self.step < total):
            self.export()
        return last

    def close(self):
        D.teardown()


def train(cfg: TrainConfig, resume: bool = True, stop_after: int | None = None) -> dict:
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit(stop_after=stop_after)
    finally:
        trainer.close()
