"""Shared pieces for the serve tests (imported by the other test_serve_* modules; no tests here).

- CharTokenizer: one token per printable ASCII character plus chat specials, so a random
  model's output is always valid text and token counts are easy to predict.
- tiny_model(): a random 2-layer Llama-shaped Transformer (fast on a CPU).
- ScriptedModel: a stand-in model whose greedy output is a fixed script, for exact-output
  tests (reasoning tags split across stream chunks, stop strings).
- LiveServer: uvicorn on a free loopback port in a thread, for real HTTP clients.
- LAUNCHER: a script running the real `nanoseek serve` CLI in a child process with the
  tiny model, for tests that need a process of its own (signals, RSS); ServerProcess runs it.
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer

ROOT = Path(__file__).resolve().parent.parent

# A `nanoseek serve` process (the real CLI -> uvicorn) whose model loader is replaced by a tiny
# random model: SERVE_TEST_LOAD_DELAY / _STEP_DELAY / _MAX_LEN tune it; SERVE_TEST_ROOT is the repo.
LAUNCHER = r'''
import os, sys, time
sys.path.insert(0, os.environ["SERVE_TEST_ROOT"])
import torch
torch.set_num_threads(1)
from tests.test_serve_helpers import CharTokenizer, GatedModel, tiny_model
import nanoseek.serve.server as server

def load_model(path, precision):
    time.sleep(float(os.environ.get("SERVE_TEST_LOAD_DELAY", "0")))
    model = tiny_model(seed=0, max_seq_len=int(os.environ.get("SERVE_TEST_MAX_LEN", "512")))
    delay = float(os.environ.get("SERVE_TEST_STEP_DELAY", "0"))
    return (GatedModel(model, delay) if delay else model), CharTokenizer()

server.load_model = load_model
from nanoseek.serve.cli import main
sys.exit(main(sys.argv[1:]))
'''

SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


class CharTokenizer:
    """ids 0..95: printable ASCII + newline; 96: <|im_start|>; 97: <|im_end|> (eos)."""

    def __init__(self):
        self.vocab = CHARS + SPECIALS
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.eos_token_ids = [self.ids["<|im_end|>"]]
        self.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    @property
    def vocab_size(self):
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self._split.split(text):
            if part in SPECIALS:
                ids.append(self.ids[part])
            else:
                ids.extend(self.ids.get(c, self.ids["?"]) for c in part)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        n = len(CHARS)
        return "".join(self.vocab[i] for i in ids if i < len(self.vocab) and not (skip_special_tokens and i >= n))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n" + kwargs.get("generation_prefix", "")
        return self.encode(text)


def tiny_config(max_seq_len: int = 1024, vocab_size: int = 98) -> ModelConfig:
    return ModelConfig(arch="llama", attn_type="gqa", vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4,
                       n_kv_heads=2, head_dim=16, inter_dim=128, max_seq_len=max_seq_len, eos_token_id=[97])


def tiny_model(seed: int = 0, max_seq_len: int = 1024) -> Transformer:
    return Transformer(tiny_config(max_seq_len)).init_weights(std=0.5, seed=seed).eval()


class ScriptedModel(nn.Module):
    """Emits `script` (token ids) greedily, starting at absolute position `start` (= prompt length),
    then EOS; looks like a Transformer to the engine (config, dtype, device, hidden_states, logits)."""

    def __init__(self, script: list[int], start: int, eos: int = 97, max_seq_len: int = 1024):
        super().__init__()
        self.config = tiny_config(max_seq_len)
        self.script, self.start, self.eos = script, start, eos
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def dtype(self):
        return self.anchor.dtype

    @property
    def device(self):
        return self.anchor.device

    def hidden_states(self, input_ids, positions=None, cache=None):
        return positions.to(torch.float32).unsqueeze(-1)     # [B, T, 1]: each row remembers its position

    def logits(self, h):
        positions = h[..., 0].reshape(-1).long().tolist()
        out = torch.zeros(len(positions), self.config.vocab_size)
        for row, pos in enumerate(positions):
            k = pos + 1 - self.start                           # index of the token this row predicts
            out[row, self.script[k] if 0 <= k < len(self.script) else self.eos] = 10.0
        return out.view(*h.shape[:-1], self.config.vocab_size)


class GatedModel(nn.Module):
    """Wraps a model so each engine step waits for `gate` and then sleeps `delay` seconds:
    long-running requests and a stalled engine on demand, whatever the machine's speed."""

    def __init__(self, inner, delay: float = 0.0):
        super().__init__()
        self.inner, self.delay = inner, delay
        self.config = inner.config
        self.gate = threading.Event()
        self.gate.set()

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def hidden_states(self, input_ids, positions=None, cache=None):
        self.gate.wait(timeout=60)
        if self.delay:
            time.sleep(self.delay)
        return self.inner.hidden_states(input_ids, positions, cache)

    def logits(self, h):
        return self.inner.logits(h)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`with LiveServer(app) as base_url:` runs uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class ServerProcess:
    def __init__(self, tmp_path: Path, args: list[str], **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = tmp_path / "launch_serve.py"
        script.write_text(LAUNCHER)
        self.log = tmp_path / "server.log"
        full_env = dict(os.environ, SERVE_TEST_ROOT=str(ROOT), **{k: str(v) for k, v in env.items()})
        self.proc = subprocess.Popen([sys.executable, str(script), "--port", str(self.port), *args],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=full_env)

    def health_history(self, timeout: float = 60) -> list:
        """Poll /health until 200; every status seen along the way."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.log.read_text()}"
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                seen.append((r.status_code, r.json().get("status")))
                if r.status_code == 200:
                    return seen
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not healthy after {timeout}s:\n{self.log.read_text()}")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
