"""Admission under a flood of requests: preemptions and recomputed prompt tokens, with and
without the engine's admission reserve (Engine(watermark=...); None = no reserve).

    python bench/admission.py

300 requests (prompts of 60-140 tokens, 120 new tokens each) into a pool of 200 blocks of 16
tokens: far more than fits at once, so the scheduler must queue and preempt. A tiny random
Llama (tests/tiny_models.py) runs them: what is measured is scheduling, not model speed.
Writes bench/results/admission.json.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.checkpoint.hf import load_hf  # noqa: E402
from nanoseek.engine import LLM  # noqa: E402
from nanoseek.sampling import SamplingParams  # noqa: E402
from tests.tiny_models import VOCAB, make_llama  # noqa: E402


def main():
    torch.set_num_threads(1)
    path = tempfile.mkdtemp()
    make_llama(path)
    model = load_hf(path)
    model.config.max_seq_len = 512
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (int(torch.randint(60, 140, (1,), generator=g)),), generator=g).tolist()
               for _ in range(300)]
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    rows = []
    for watermark in (None, 0.01):
        llm = LLM(model, block_size=16, num_blocks=200, max_batch_tokens=1024, watermark=watermark)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        m = llm.engine.metrics
        rows.append(dict(watermark=watermark, preemptions=m.preemptions, prompt_tokens_computed=m.prompt_tokens,
                         prompt_tokens=sum(map(len, prompts)), completed=sum(len(o.outputs[0].token_ids) == 120
                                                                             for o in outs),
                         seconds=time.perf_counter() - t0))
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "bench" / "results" / "admission.json"
    out.write_text(json.dumps(dict(requests=len(prompts), num_blocks=200, block_size=16, rows=rows), indent=1))


if __name__ == "__main__":
    main()
