"""`nanoseek quantize`: the per-layer report, the checkpoint it writes, and bad input."""

import argparse
import io
import re

import pytest
import torch

import nanoseek
from nanoseek.errors import NanoseekError
from nanoseek.quant.cli import add_quantize_parser
from nanoseek.quant.layers import Fp8Linear
from tests.tiny_models import make_deepseek_v3


from tests.fixtures import one_thread  # noqa: E402,F401  (autouse: this module runs on one thread)


def quantize(*argv) -> str:
    parser = argparse.ArgumentParser(prog="nanoseek")
    add_quantize_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quantize", *map(str, argv)])
    out = io.StringIO()
    args.func(args, out=out)
    return out.getvalue()


def test_quantize_with_report(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "fp8"
    make_deepseek_v3(src)
    text = quantize(src, dst, "--to", "fp8", "--report")
    rows = [line for line in text.splitlines() if line.startswith("layers.")]
    # 3 layers x 5 attention projections, 1 dense MLP x 3, 2 MoE layers x (8 experts + shared) x 3
    assert len(rows) == 3 * 5 + 3 + 2 * 9 * 3
    errs = [float(re.search(r"([\d.]+)%$", r).group(1)) for r in rows]
    assert all(0 < e < 5 for e in errs)  # e4m3: a few percent per layer
    assert "mean" in text and "max" in text and "fp8 checkpoint" in text
    model, _ = nanoseek.load(dst)
    assert isinstance(model.layers[2].mlp.experts[7].up_proj, Fp8Linear)
    assert "embed_tokens" not in text  # embeddings stay float unless asked


def test_unknown_scheme_and_missing_model_name_the_culprit(tmp_path):
    with pytest.raises(NanoseekError, match="--to 'int3'"):
        quantize(tmp_path, tmp_path / "out", "--to", "int3")
    missing = tmp_path / "no_such_model"
    with pytest.raises(NanoseekError, match=re.escape(str(missing))):
        quantize(missing, tmp_path / "out", "--to", "int8")
    (tmp_path / "file").write_text("")
    make_deepseek_v3(tmp_path / "src")
    with pytest.raises(NanoseekError, match="file: exists and is not a directory"):
        quantize(tmp_path / "src", tmp_path / "file", "--to", "int8")
