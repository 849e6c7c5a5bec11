"""`quantize`: write a full-precision model directory as an INT4 / Q4_0 / Q8_0 / Q2_K GGUF for the kernel.

The default mix keeps the tensors a model is most sensitive to in a higher-precision format (the
report names them); `--calibration FILE` weights each block's scale search by the activations the
full-precision model feeds each Linear while reading FILE (hierarchos/quant/calibration.py)."""

from __future__ import annotations

import argparse

HELP = "quantize a model directory to INT4 / Q4_0 / Q8_0 / Q2_K (one GGUF file for the C++ kernel)"
QTYPES = ("INT4", "Q4_0", "Q8_0", "Q2_K")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..quant.quantized_dir import DEFAULT_CALIBRATION_TOKENS, MIXES

    p.add_argument("--model-path", "--model_path", required=True, metavar="DIR",
                   help="full-precision model directory (from train, ckpt-2-inf or merge-lora)")
    p.add_argument("--out-dir", "--out_dir", default=None, metavar="DIR",
                   help="quantized model directory to write (default: MODEL_PATH-QTYPE)")
    p.add_argument("--qtype", type=str.upper, choices=QTYPES, default="INT4",
                   help="format of the Linear weights and the head (default: INT4)")
    p.add_argument("--mix", choices=MIXES, default="auto",
                   help="auto (default): keep the most sensitive tensors (the output head) at Q8_0 when QTYPE "
                        "is 4- or 2-bit, as llama.cpp's mixes do; pure: every quantized Linear in QTYPE")
    p.add_argument("--calibration", metavar="TEXTFILE", default=None,
                   help="UTF-8 text the full-precision model reads first: each Linear's mean squared input per "
                        "channel (an importance matrix) then weights the scale search of its 4-/2-bit blocks")
    p.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS, metavar="N",
                   help=f"read at most N tokens of --calibration (default {DEFAULT_CALIBRATION_TOKENS})")


def default_out_dir(model_path: str, qtype: str) -> str:
    return f"{str(model_path).rstrip('/').rstrip(chr(92))}-{qtype}"


def report(info: dict, out_dir) -> str:
    parts = ", ".join(f"{kind} {v['tensors']} tensors {v['bytes'] / 2**20:.1f} MiB" for kind, v in info["storage"].items())
    lines = [f"wrote {out_dir}/{info['file']}: {info['parameters']:,} parameters, {info['bytes'] / 2**20:.1f} MiB "
             f"({info['fp32_bytes'] / max(1, info['bytes']):.1f}x smaller than fp32) [{parts}]"]
    mix = info.get("mix") or {}
    for name, kept in (mix.get("kept") or {}).items():
        lines.append(f"mix {mix['name']}: {name} kept at {kept['format']} instead of {info['qtype']} ({kept['why']}; "
                     "--mix pure to quantize it too)")
    calibration = info.get("calibration")
    if calibration:
        lines.append(f"calibration: {calibration['tokens']:,} tokens of {calibration['file']} weighted the scale "
                     f"search of {calibration['weighted_tensors']} tensors")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..quant import kernel
    from ..quant.quantized_dir import quantize_model_dir

    out_dir = args.out_dir or default_out_dir(args.model_path, args.qtype)
    info = quantize_model_dir(args.model_path, out_dir, args.qtype, mix=args.mix, calibration=args.calibration,
                              calibration_tokens=args.calibration_tokens)
    print(report(info, out_dir))
    print(f"kernel: {kernel.backend_name()}; chat with: hierarchos chat --model-path {out_dir}")
    return 0
