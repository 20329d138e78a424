"""`nanoseek quantize --to int8|int8-dynamic|fp8 MODEL OUT [--quantize-embeddings] [--report]`."""

import copy
import sys
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.quant.convert import SCHEMES, check_scheme, quantize_model


def add_quantize_parser(subparsers):
    p = subparsers.add_parser("quantize", help="quantize a model (int8, int8-dynamic, fp8) and save it")
    p.add_argument("model", help="GGUF file, HF checkpoint dir or repo id ('default': SmolLM2-135M-Instruct)")
    p.add_argument("out", help="output directory (config.json + model.safetensors + tokenizer)")
    # validated in cmd_quantize, not by argparse, so a bad value is a one-line NanoseekError
    p.add_argument("--to", dest="scheme", required=True, metavar="{" + ",".join(SCHEMES) + "}",
                   help="int8: int8 weights per output channel; int8-dynamic: also int8 activations per token; "
                        "fp8: e4m3 weights in DeepSeek-V3's 128x128 blocks")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="quantize the embedding table and lm_head too (halves a tied-embedding model)")
    p.add_argument("--report", action="store_true", help="print every layer's relative weight error")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args, out=sys.stdout):
    from nanoseek.loading import load
    from nanoseek.quant.report import format_report, weight_errors
    scheme = check_scheme(args.scheme, "--to")
    dest = Path(args.out)
    if dest.exists() and not dest.is_dir():
        raise NanoseekError(f"{dest}: exists and is not a directory")
    original, tokenizer = load(args.model, "fp32")  # quantize from fp32: no bf16 rounding on top
    model = quantize_model(copy.deepcopy(original) if args.report else original, scheme, args.quantize_embeddings)
    if args.report:
        print(format_report(weight_errors(original, model), scheme), file=out)
    model.save(dest, tokenizer)
    size = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    print(f"{dest}: {scheme} checkpoint, {size / 2**20:.1f} MiB of weights", file=out)
