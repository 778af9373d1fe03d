"""Our pretraining step against the AnatoMask reference implementation's, interleaved on one machine.

Needs a local checkout of the reference code (https://github.com/ricklisz/AnatoMask; it is not part of
this project and no test needs it). Its modules are imported from
``<reference>/nnunetv2/training/nnUNetTrainer/variants/pretrain``; ``timm`` is used when installed,
otherwise three stand-ins with timm's arithmetic (``trunc_normal_``, an identity ``DropPath`` for
drop rate 0, and ``ModelEma``'s update) take its place, so that nnU-Net and timm need not be installed.

Both sides run STU-Net-B with the same crop, batch and step: random mask, teacher pass on it, guided
mask (hard ratio 0.5: the reference's last epoch), student forward and backward, gradient clipping (12),
AdamW, EMA update; and SparK's step (random mask, no teacher). The reference step is the
non-AMP branch of its ``pretrain_AntoMask.py`` loop, line for line (``--reference-precision bf16``: its
AMP branch, with bf16 autocast on the device in place of CUDA fp16 autocast, so no grad scaler); ours
is the bundle's iteration (``benchmarks/pretrain_step.py``). Each configuration runs in its own
process (peak memory of its own), interleaved round by round. Example (CPU, about 35 minutes):

    python benchmarks/reference_step.py --reference ~/src/AnatoMask --repeats 2 \
        --out benchmarks/results/reference_step_B_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
from common import add_run_arguments, print_results, run_configurations, step_options, write_report
from pretrain_step import build_step

PRETRAIN_DIR = Path("nnunetv2/training/nnUNetTrainer/variants/pretrain")


class _ModelEma:
    """timm's ``ModelEma`` (v1) update: ``ema = decay * ema + (1 - decay) * model`` over the state dict."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, device=None, resume: str = "") -> None:
        self.ema = copy.deepcopy(model).eval()
        self.decay = decay
        self.device = device
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        prefix = "module." if hasattr(model, "module") else ""
        model_state = model.state_dict()
        for k, ema_v in self.ema.state_dict().items():
            model_v = model_state[prefix + k].detach()
            if self.device is not None:
                model_v = model_v.to(device=self.device)
            ema_v.copy_(ema_v * self.decay + (1.0 - self.decay) * model_v)


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if drop_prob:
            raise NotImplementedError("the stand-in for timm's DropPath supports drop rate 0 only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _install_timm_stand_in() -> bool:
    try:
        import timm.models.layers  # noqa: F401
        import timm.utils  # noqa: F401

        return False
    except ImportError:
        timm = types.ModuleType("timm")
        models = types.ModuleType("timm.models")
        layers = types.ModuleType("timm.models.layers")
        utils = types.ModuleType("timm.utils")
        layers.trunc_normal_ = nn.init.trunc_normal_
        layers.DropPath = _DropPath
        layers.to_3tuple = lambda x: tuple(x) if isinstance(x, list | tuple) else (x, x, x)
        utils.ModelEma = _ModelEma
        timm.models, models.layers, timm.utils = models, layers, utils
        sys.modules.update(
            {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.utils": utils}
        )
        return True


class _LocalDDP(nn.Module):
    """The reference's single-process stand-in for DDP (``model.module``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def build_reference_step(
    reference: str, method: str, roi: list[int], batch: int, precision: str = "fp32", seed: int = 0
):
    """The reference's step for ``method`` ``"anatomask"`` or ``"spark"`` (runs in a child process).

    ``precision="bf16"`` wraps what the reference's AMP branch wraps (masks, teacher pass, student
    forward and loss) in bf16 autocast; backward, clipping, AdamW and EMA stay outside, as there.
    """
    pretrain_dir = Path(reference).expanduser() / PRETRAIN_DIR
    if not (pretrain_dir / "AnatoMask.py").is_file():
        raise FileNotFoundError(
            f"{pretrain_dir / 'AnatoMask.py'} not found: is {reference} the AnatoMask repository?"
        )
    _install_timm_stand_in()
    sys.path.insert(0, str(pretrain_dir))
    from AnatoMask import SparK
    from decoder3D import LightDecoder
    from encoder3D import SparseEncoder
    from STUNet_head import STUNet
    from timm.utils import ModelEma
    from utils.lr_control import get_param_groups

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = STUNet(
        1,
        1,
        depth=[1] * 6,
        dims=[32, 64, 128, 256, 512, 512],
        pool_op_kernel_sizes=[[2, 2, 2]] * 4 + [[1, 1, 1]],
        conv_kernel_sizes=[[3, 3, 3]] * 6,
        enable_deep_supervision=True,
    ).to(device)
    enc = SparseEncoder(head, input_size=tuple(roi), sbn=False).to(device)
    dec = LightDecoder(enc.downsample_ratio, sbn=False, width=512, out_channel=1).to(device)
    model_without_ddp = SparK(sparse_encoder=enc, dense_decoder=dec, mask_ratio=0.6, densify_norm="in").to(
        device
    )
    model_ema = (
        ModelEma(model_without_ddp, decay=0.999, device=device, resume="") if method == "anatomask" else None
    )
    model = _LocalDDP(model_without_ddp)
    param_groups = get_param_groups(
        model_without_ddp, nowd_keys={"cls_token", "pos_embed", "mask_token", "gamma"}
    )
    optimizer = torch.optim.AdamW(params=param_groups, lr=1e-4, weight_decay=1e-5, betas=(0.9, 0.999))
    inp = torch.randn(batch, 1, *roi, generator=torch.Generator().manual_seed(seed)).to(device)
    epochs, clip = 1000, 12

    def forward():
        if method == "anatomask":
            mask1 = model.module.mask(batch, device)
            with torch.no_grad():
                inp1, rec1 = model_ema.ema(inp, active_b1ff=mask1)
                l2_loss = ((rec1 - inp1) ** 2).mean(dim=2, keepdim=False)
                non_active = mask1.logical_not().int().view(mask1.shape[0], -1)
                recon_loss = l2_loss * non_active
            # the last epoch: hard ratio 0.5
            mask, _ = model_ema.ema.generate_mask(
                recon_loss, guide=True, epoch=epochs - 2, total_epoch=epochs - 1
            )
            mask = mask.to(device, non_blocking=True)
        else:
            mask = model.module.mask(batch, device)
        inpp, recc = model(inp, active_b1ff=mask, vis=False)
        loss, _ = model.module.forward_loss(inpp, recc, mask)
        return loss

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        optimizer.step()
        if model_ema is not None:
            model_ema.update(model)
        if not math.isfinite(loss.item()):
            raise FloatingPointError("reference loss is not finite")

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", required=True, help="local checkout of the AnatoMask repository")
    parser.add_argument(
        "--backends", nargs="+", default=["dense"], choices=["dense", "spconv"], help="our sparse backends"
    )
    parser.add_argument(
        "--methods", nargs="+", default=["anatomask", "spark"], choices=["anatomask", "spark"]
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="our side's precision",
    )
    parser.add_argument(
        "--reference-precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="the reference's: fp32 (its default, AMP off) or bf16 (its AMP branch, bf16 autocast)",
    )
    parser.add_argument("--teacher-precision", default=None, choices=["fp32", "bf16"], help="our teacher's")
    add_run_arguments(parser, "benchmarks/results/reference_step.json", repeats=2)
    args = parser.parse_args()

    stand_in = _install_timm_stand_in()
    configurations = []
    for method in args.methods:
        reference = {
            "reference": args.reference,
            "method": method,
            "roi": args.roi,
            "batch": args.batch,
            "precision": args.reference_precision,
        }
        configurations.append((f"reference {method}", build_reference_step, reference))
        for backend in args.backends:
            ours = step_options(args, backend, method, size="B")
            configurations.append((f"ours {method}/{backend}", build_step, ours))
    print(f"STU-Net-B, crop {args.roi}, batch {args.batch}: reference against ours ({args.backends})")
    results = run_configurations(configurations, args.warmup, args.repeats)

    ratios = {}
    for method in args.methods:
        for backend in args.backends:
            ours, ref = results[f"ours {method}/{backend}"], results[f"reference {method}"]
            ratios[f"{method}/{backend}"] = {
                "time_ours_over_reference": ours["median_s"] / ref["median_s"],
                "memory_ours_over_reference": ours["peak_memory_bytes"] / ref["peak_memory_bytes"],
            }
    print_results(results)
    for method, r in ratios.items():
        print(
            f"{method}: ours / reference time {r['time_ours_over_reference']:.3f}, "
            f"peak memory {r['memory_ours_over_reference']:.3f}"
        )
    teacher_ratio = {}
    if {"anatomask", "spark"} <= set(args.methods):
        sides = [("reference", "reference {}")] + [(f"ours/{b}", "ours {}/" + b) for b in args.backends]
        for side, key in sides:
            a, s = results[key.format("anatomask")], results[key.format("spark")]
            teacher_ratio[side] = a["median_s"] / s["median_s"]
            print(f"AnatoMask / SparK ({side}): {teacher_ratio[side]:.3f}")
    write_report(
        args.out,
        {
            "benchmark": "reference_step",
            "size": "B",
            "roi": args.roi,
            "batch": args.batch,
            "backends": args.backends,
            "channels_last": not args.contiguous,
            "precision": args.precision,
            "teacher_precision": args.teacher_precision or args.precision,
            "reference_precision": args.reference_precision,
            "timm": "stand-in" if stand_in else "installed",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "results": results,
            "ratios": ratios,
            "teacher_overhead_ratio": teacher_ratio,
        },
    )


if __name__ == "__main__":
    main()
