"""The `m3vit` command line.

Each command's parser is declared here; its work is done by a handler in the subsystem that owns it,
imported only when the command runs (so `m3vit --help` stays fast). Handlers raise
`UsageError` (exit 2) or `M3ViTError` (exit 1); `main` turns those into one line on stderr and,
without --debug, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from m3vit import __version__
from m3vit.errors import M3ViTError

# command -> (module, handler, one-line help)
COMMANDS = {
    "flow": ("m3vit.flow", "cli_flow", "the main job: profile, ONNX export, compile, fidelity, resources, C-sim, RTL sim and the task head, with one report"),
    "train": ("m3vit.model.train_cli", "cli_train", "train a model briefly on synthetic multi-task data and save a checkpoint"),
    "export": ("m3vit.model.export", "cli_export", "export one task's pathway (or the multi-task backbone) to ONNX"),
    "profile": ("m3vit.model.profile", "cli_profile", "exact MACs, parameters and expert usage of one task's pathway"),
    "synth": ("m3vit.rtl_sim.synth", "cli_synth",
              "synthesise the RTL datapath with yosys and report DSP/LUT/FF/BRAM against the ZCU104 budget"),
    "calibrate": ("m3vit.compiler.quant_cli", "cli_calibrate",
                  "calibrate activation ranges on sample images and write the formats of a precision"),
    "quantize": ("m3vit.compiler.quant_cli", "cli_quantize", "build the quantized graph (QGraph .json + .npz)"),
    "quant-report": ("m3vit.compiler.quant_cli", "cli_quant_report",
                     "fidelity of the bit-exact quantized model against the float model"),
    "compile": ("m3vit.compiler.compile_cli", "cli_compile",
                "compile an ONNX model into a Program, weights and a Vitis HLS project for the accelerator"),
    "csim": ("m3vit.hls.csim", "cli_csim",
             "C-simulate a compiled build's HLS kernel with g++ and compare it bit for bit with the golden model"),
    "rtlsim": ("m3vit.rtl_sim.rtlsim", "cli_rtlsim",
               "run a compiled build on the RTL accelerator (Verilator) and report bits, cycles and DDR traffic"),
    "trace-diff": ("m3vit.rtl_sim.tracediff", "cli_tracediff",
                   "compare every traced tensor of two executors (golden, program, csim, rtl) on one build"),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other usage error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser, task: bool = True, default_preset: str = "edge-moe") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", help=f"built-in model: tiny, edge-moe, m3vit-small (default: {default_preset})")
    g.add_argument("--dataset", help="the preset's dataset (m3vit-small: pascal or nyud)")
    g.add_argument("--config", metavar="FILE", help="JSON or YAML config: a 'preset' key plus any overrides")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one config value, e.g. --set dim=256 --set tasks=semseg:19,depth:1")
    g.add_argument("--checkpoint", metavar="FILE", help="weights (and config) saved by 'm3vit train'")
    g.add_argument("--seed", type=int, default=0, help="seed of the random initial weights")
    if task:
        g.add_argument("--task", help="task name or index (default: the first task)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="m3vit",
        description="Co-design stack for sparse multi-task vision transformers (M3ViT / Edge-MoE) on FPGAs.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"m3vit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = {name: sub.add_parser(name, help=h, description=h[0].upper() + h[1:] + ".", formatter_class=_Formatter)
         for name, (_, _, h) in COMMANDS.items()}

    from m3vit.flow import FLOW_PRESET

    add_model_args(p["flow"], default_preset=FLOW_PRESET)
    p["flow"].add_argument("--out", default="build/flow", help="folder for the flow's outputs")
    p["flow"].add_argument("--images", type=int, default=4, help="images for the data-dependent profile and the fidelity report")
    p["flow"].add_argument("--calib-images", type=int, default=8, help="calibration images for the compiler")
    p["flow"].add_argument("--hw", metavar="FILE", help="hardware config (default: the shipped rtl_sim/hw.json)")
    p["flow"].add_argument("--parallel", metavar="PINxPOUT", help="override the MAC array, e.g. 16x16")
    p["flow"].add_argument("--no-rtlsim", action="store_true", help="skip the RTL simulation stage")
    p["flow"].add_argument("--synth", action="store_true",
                           help="measure the resources with yosys (minutes) instead of the design model")
    p["flow"].add_argument("--json", action="store_true", help="print one JSON summary on stdout")

    add_model_args(p["train"], task=False)
    p["train"].add_argument("--steps", type=int, default=200, help="optimizer steps")
    p["train"].add_argument("--batch", type=int, default=2, help="images per step")
    p["train"].add_argument("--lr", type=float, default=3e-4, help="learning rate (AdamW)")
    p["train"].add_argument("--out", required=True, help="checkpoint file to write")
    p["train"].add_argument("--probe-heads", action="store_true",
                            help="train the backbone through linear token probes instead of the SETR heads "
                                 "(cheap on CPU for large presets; the heads stay untrained)")
    p["train"].add_argument("--tasks-per-step", type=int, metavar="N",
                            help="visit only N tasks per step, in turn (default: every task)")
    p["train"].add_argument("--keep-tokens", type=float, metavar="F",
                            help="with --probe-heads: run each step on this fraction of the patch tokens (default: all)")
    p["train"].add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    add_model_args(p["export"])
    p["export"].add_argument("--out", required=True, help="ONNX file to write")
    p["export"].add_argument("--with-head", action="store_true", help="include the task's dense-prediction head")
    p["export"].add_argument("--all-tasks", action="store_true",
                             help="export the multi-task backbone with a task-id input instead of one task")
    p["export"].add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer)")
    p["export"].add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                             help="torch.onnx exporter")
    p["export"].add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")
    p["export"].add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    add_model_args(p["profile"])
    p["profile"].add_argument("--images", type=int, default=8,
                              help="images for the data-dependent figures (bundled photographs, then random)")
    p["profile"].add_argument("--with-head", dest="with_head", action="store_true", default=True,
                              help="include the task head's convolutions")
    p["profile"].add_argument("--no-head", dest="with_head", action="store_false", help="backbone only")
    p["profile"].add_argument("--weight-bits", type=int, default=8, help="weight width for the bytes-touched figures")
    p["profile"].add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p["profile"].add_argument("--plot", metavar="PNG", help="write the MAC / expert-usage / dense-vs-MoE figure")

    for name in ("calibrate", "quantize", "quant-report"):
        q = p[name]
        add_model_args(q, task=False)
        if name == "quant-report":
            q.add_argument("--task", help="task name or index (default: every task)")
        g = q.add_argument_group("quantization")
        g.add_argument("--precision", metavar="P|FILE",
                       help="W8A8, W8A16, W16A16, or a JSON/YAML spec with layer_type / layer_name overrides "
                            "(default: W16A16 with 8-bit expert weights)")
        g.add_argument("--layer-precision", metavar="KEY=P", action="append", default=[],
                       help="override one layer type (e.g. gate=W16A16) or layer name (e.g. blocks.1.norm2=A16)")
        g.add_argument("--calib", metavar="DIR", help="calibrate on this folder of images (default: bundled photographs "
                                                      "plus seeded random images)")
        g.add_argument("--calib-images", type=int, default=16, help="calibration images")
        if name != "calibrate":
            g.add_argument("--calib-file", metavar="FILE", help="reuse a calibration written by 'm3vit calibrate'")
        q.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p["calibrate"].add_argument("--out", required=True, help="calibration file to write (JSON)")
    p["quantize"].add_argument("--out", required=True, help="graph path stem: writes STEM.json and STEM.npz")
    p["quant-report"].add_argument("--images", type=int, default=4,
                                   help="evaluation images (seeded crops of the bundled photographs)")
    p["quant-report"].add_argument("--plot", metavar="PNG", help="write per-layer SQNR / cosine and routing plots")
    from m3vit.compiler.compile_cli import add_compile_args
    from m3vit.hls.csim import add_csim_args
    from m3vit.rtl_sim.rtlsim import add_rtlsim_args
    from m3vit.rtl_sim.synth import add_synth_args
    from m3vit.rtl_sim.tracediff import add_tracediff_args

    add_synth_args(p["synth"])
    add_compile_args(p["compile"])
    add_csim_args(p["csim"])
    add_rtlsim_args(p["rtlsim"])
    add_tracediff_args(p["trace-diff"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module, handler, _ = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), handler)(args) or 0)
    except M3ViTError as exc:
        if args.debug:
            raise
        print(f"m3vit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"m3vit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"m3vit {args.command}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
