"""`quantize`: write a full-precision model directory as an INT4 / Q4_0 / Q8_0 / Q2_K GGUF for the kernel."""

from __future__ import annotations

import argparse

HELP = "quantize a model directory to INT4 / Q4_0 / Q8_0 / Q2_K (one GGUF file for the C++ kernel)"
QTYPES = ("INT4", "Q4_0", "Q8_0", "Q2_K")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", "--model_path", required=True, metavar="DIR",
                   help="full-precision model directory (from train, ckpt-2-inf or merge-lora)")
    p.add_argument("--out-dir", "--out_dir", default=None, metavar="DIR",
                   help="quantized model directory to write (default: MODEL_PATH-QTYPE)")
    p.add_argument("--qtype", type=str.upper, choices=QTYPES, default="INT4",
                   help="format of the Linear weights and the head (default: INT4)")


def default_out_dir(model_path: str, qtype: str) -> str:
    return f"{str(model_path).rstrip('/').rstrip(chr(92))}-{qtype}"


def report(info: dict, out_dir) -> str:
    parts = ", ".join(f"{kind} {v['tensors']} tensors {v['bytes'] / 2**20:.1f} MiB" for kind, v in info["storage"].items())
    return (f"wrote {out_dir}/{info['file']}: {info['parameters']:,} parameters, {info['bytes'] / 2**20:.1f} MiB "
            f"({info['fp32_bytes'] / max(1, info['bytes']):.1f}x smaller than fp32) [{parts}]")


def run(args: argparse.Namespace) -> int:
    from ..quant import kernel
    from ..quant.quantized_dir import quantize_model_dir

    out_dir = args.out_dir or default_out_dir(args.model_path, args.qtype)
    info = quantize_model_dir(args.model_path, out_dir, args.qtype)
    print(report(info, out_dir))
    print(f"kernel: {kernel.backend_name()}; chat with: hierarchos chat --model-path {out_dir}")
    return 0
