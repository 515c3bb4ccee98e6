"""``repro eval MODEL --suite clean,imagenet-c,shape-bias,top10``: one model on several suites, into ONE JSON
record (written atomically).

MODEL is a run id of the store (or a unique prefix of one), a checkpoint file (``--arch`` names its architecture;
the file is a bare state dict or RepDistiller's ``{'model': ...}``), or a registered/timm model name with
``--pretrained`` or ``--checkpoint``. ``--synthetic`` writes tiny data in the real layouts (ImageNet val folder,
ImageNet-C, cue-conflict) so that the command runs anywhere. The record holds every metric with its protocol, the
model's identity, the data, the options, library versions, commit and device (``repro.analyses.records``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from repro.analyses.resolve import DEFAULT_HEAD, HEADS, IMAGENET_CLASSES
from repro.cli import command
from repro.cli.options import RUN_STORE_HELP, device_of, store_of
from repro.core.errors import ReproError

def parse_suites(text: str) -> list[str]:
    from repro.analyses import SUITES

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ReproError("--suite needs at least one suite name")
    for name in names:
        SUITES.get(name)  # one clear error listing the known suites
    return list(dict.fromkeys(names))



def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate one model on several suites into one result record",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("model", help="run id (or unique prefix), checkpoint file (with --arch), or model name "
                                 "(with --pretrained or --checkpoint)")
    p.add_argument("--suite", default="clean,imagenet-c,shape-bias",
                   help="comma-separated registered suites (repro.analyses; an unknown name lists them; "
                        "default: %(default)s)")
    p.add_argument("--arch", help="architecture of a checkpoint file MODEL (a registered model name)")
    p.add_argument("--checkpoint", help="local weights for a model name (loaded by the model family)")
    p.add_argument("--pretrained", action="store_true", help="a model name's published weights")
    p.add_argument("--num-classes", type=int, default=IMAGENET_CLASSES, help="outputs of a file/name MODEL")
    p.add_argument("--head", choices=sorted(HEADS), help="distilled ViTs: evaluate the cls, dist or averaged head "
                                                          f"(default {DEFAULT_HEAD}, always recorded)")
    p.add_argument("--other", help="second model for top10 (same forms as MODEL)")
    p.add_argument("--other-arch", help="architecture of a checkpoint file --other")
    p.add_argument("--other-checkpoint", help="local weights for a model name --other")
    p.add_argument("--other-head", choices=sorted(HEADS))
    p.add_argument("--data-root", help="labelled class-per-folder set (ImageNet val <wnid>/*.JPEG): clean, top10")
    p.add_argument("--imagenet-c-root", help="ImageNet-C JPEGs: <corruption>/<1-5>/<wnid>/*.JPEG")
    p.add_argument("--cue-conflict-root", help="cue-conflict stimuli: <shape>/<shape><i>-<texture><j>.png")
    p.add_argument("--corruptions", help="comma-separated ImageNet-C corruptions (default: the 15 of mCE)")
    p.add_argument("--synthetic", nargs="?", const="", default=None, metavar="DIR",
                   help="generate tiny data in the real layouts (in DIR, or a temporary folder) instead of the roots")
    p.add_argument("--image-size", type=int, help="centre-crop size (default: the model's input size, else 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, help="data loader workers (default: min(8, CPUs); 0 with --synthetic)")
    p.add_argument("--label-space", default="auto", choices=["auto", "imagenet", "folder"])
    p.add_argument("--amp", action="store_true", help="bf16 autocast (recorded)")
    p.add_argument("--top10-rule", default="largest-difference")
    p.add_argument("--top10-k", type=int, default=10)
    p.add_argument("--out", help="record file (default: runs/<run id>/eval.json for runs, evals/<name>.json else)")
    p.add_argument("--runs", help=RUN_STORE_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p



def run_eval(args: argparse.Namespace) -> int:
    from repro.analyses.records import default_record_path, evaluate_record, summary_line
    from repro.analyses.resolve import default_image_size, load_model, run_normalization
    from repro.analyses.suite_config import SuiteOptions, build_synthetic_eval_data, data_from_args, synthetic_folder
    from repro.core.io import atomic_write_json

    suites = parse_suites(args.suite)
    store, device = store_of(args), device_of(args)
    model = load_model(args.model, store, device, arch=args.arch, checkpoint=args.checkpoint,
                       pretrained=args.pretrained, num_classes=args.num_classes, head=args.head)
    other = None
    if args.other:
        other = load_model(args.other, store, device, arch=args.other_arch, checkpoint=args.other_checkpoint,
                           pretrained=args.pretrained, num_classes=args.num_classes, head=args.other_head)
    if "top10" in suites and other is None:
        raise ReproError("suite top10 compares two models: pass --other MODEL (e.g. the SSL teaching assistant)")
    mean, std = run_normalization(model)
    synthetic = args.synthetic is not None
    options = SuiteOptions(batch_size=args.batch_size, image_size=args.image_size or default_image_size(model),
                          num_workers=args.workers if args.workers is not None else (0 if synthetic else None),
                          mean=mean, std=std, label_space=args.label_space, amp=args.amp,
                          progress=not args.no_progress, top10_rule=args.top10_rule, top10_k=args.top10_k)
    command = "repro " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval"] else ""
    arguments = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    if synthetic:
        with synthetic_folder(args.synthetic) as root:
            data = build_synthetic_eval_data(root, model.num_classes, options.image_size, suites,
                                             data_from_args(args).corruptions)
            record = evaluate_record(model, suites, data, options, device, other, command, arguments)
    else:
        record = evaluate_record(model, suites, data_from_args(args), options, device, other, command,
                                 arguments)
    out = Path(args.out) if args.out else default_record_path(model, store, synthetic)
    atomic_write_json(out, record)
    print(summary_line(record))
    print(f"wrote {out}")
    return 0



@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    return run_eval(args)


def add_parsers(sub: Any) -> None:
    add_eval_parser(sub)
