"""Every exact execution scheme of every dynamic conv gives the same logits and gradients, on any device.

For ResNet-18 and MobileNetV2 x1.0 with CondConv, DY-Conv and ODConv convs, fully dynamic and PAD (random
element and output-unit masks at ratio 0.3; PAD-ODConv also with each --odconv-static-attention), in eval mode (BatchNorm on running statistics taken from the
a batch of 32 first, so that the untrained model neither amplifies rounding through a batch of 4 nor lets its
signal vanish), every scheme of :data:`dyconv.schemes.SCHEMES` that is exact for the
model is compared with ``grouped``: logits, input gradient and every parameter gradient (each relative to
the largest entry of its kind). Then, for each PAD model, its inference form (:func:`dyconv.inference.to_inference`)
against the trained model, and float16 (CUDA) / bfloat16 (CPU) autocast against float32. Unit tests check the
same per layer on CPU; this checks whole models on a device the tests do not reach.

In float64 (the default) every difference must stay below 1e-9, else the check fails (exit status 1): float32
differences of up to a few 1e-2 in a gradient are float32 rounding amplified through MobileNetV2's 17 blocks
(float64 gives 1e-14 on the same model), so float32 (``--dtype float32``) shows magnitudes only.

Usage: python scripts/check_schemes.py [--device cuda] [--size 64] [--dtype float64|float32]
"""
from __future__ import annotations

import sys

import torch

from dyconv.inference import to_inference
from dyconv.layers import ODCONV_STATIC_ATTENTIONS, set_conv_scheme
from dyconv.models import build_model, set_random_mask
from dyconv.schemes import SCHEMES
from pad.runtime import OneLineParser, UsageError, report_error


def logits_and_grads(model, x):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    # a fixed random projection of the logits: their plain sum can have a vanishing input gradient
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out.float() * projection).sum().backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    return out.detach(), grads


def calibrate_batchnorm(model, x) -> None:
    """BatchNorm running statistics := those of ``x`` (one forward pass in training mode), then eval mode. ``x``
    should be a larger batch than the checked one: statistics of a few samples leave near-zero variances."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets them exactly
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def relative_errors(out, grads, ref_out, ref_grads) -> tuple[float, float, str]:
    """(logits error, worst gradient error, its name): relative to the largest reference entry of the kind."""
    if grads.keys() != ref_grads.keys():
        raise AssertionError(f"gradients of different parameters: {sorted(set(grads) ^ set(ref_grads))}")
    scale = max(r.abs().max().item() for n, r in ref_grads.items() if n != "input")
    errors = {n: (g - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() if n == "input" else scale)
              for n, g in grads.items()}
    worst = max(errors, key=errors.get)
    return ((out - ref_out).abs().max() / ref_out.abs().max()).item(), errors[worst], worst


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=64, help="image size (batch 4)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    try:
        args = parser.parse_args(argv)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda but CUDA is not available")
    except UsageError as err:
        return report_error(err)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    dtype = getattr(torch, args.dtype)
    worst_seen = 0.0
    for arch in ("resnet18", "mobilenetv2_100"):
        for conv in ("condconv", "dyconv", "odconv"):
            variants = [(False, None, "none"), (True, "element", "none"), (True, "unit", "none")]
            if conv == "odconv":  # the other readings of PAD-ODConv (--odconv-static-attention)
                variants += [(True, granularity, attention) for attention in ODCONV_STATIC_ATTENTIONS[1:]
                             for granularity in ("element", "unit")]
            for pad, granularity, attention in variants:
                torch.manual_seed(0)
                model = build_model(arch, conv, pad, num_classes=10,
                                    odconv_static_attention=attention).to(device, dtype)
                if pad:
                    set_random_mask(model, 0.3, granularity=granularity)
                x = torch.randn(4, 3, args.size, args.size, device=device, dtype=dtype)
                set_conv_scheme(model, "grouped")
                calibrate_batchnorm(model, torch.randn(32, 3, args.size, args.size, device=device, dtype=dtype))
                ref_out, ref_grads = logits_and_grads(model, x)
                label = (f"{arch:16s} {conv:8s} {'pad ' + granularity if pad else 'dynamic':12s}"
                         + ("" if attention == "none" else f" static attention {attention}"))
                for scheme in SCHEMES[1:]:
                    try:
                        set_conv_scheme(model, scheme)
                        out, grads = logits_and_grads(model, x)
                    except ValueError as err:  # not exact for some layer (ODConv's spatial attention)
                        print(f"{label} {scheme:8s} not applicable: {err}")
                        continue
                    d_out, d_grad, name = relative_errors(out, grads, ref_out, ref_grads)
                    worst_seen = max(worst_seen, d_out, d_grad)
                    print(f"{label} {scheme:8s} logits {d_out:.1e}  gradients {d_grad:.1e} ({name})")
                if pad:
                    set_conv_scheme(model, "auto")
                    with torch.no_grad():
                        trained = model(x)
                        folded = to_inference(model)(x)
                        with torch.autocast(device.type, dtype=low):
                            autocast = model.float()(x.float())
                        model.to(dtype)
                    d_fold = ((folded - trained).abs().max() / trained.abs().max()).item()
                    d_low = ((autocast.float() - trained).abs().max() / trained.abs().max()).item()
                    worst_seen = max(worst_seen, d_fold)
                    print(f"{label} inference form {d_fold:.1e}  {str(low).split('.')[1]} autocast {d_low:.1e}"
                          f" (finite: {bool(torch.isfinite(autocast).all())})")
    print(f"largest {args.dtype} difference (schemes: logits and gradients; inference form): {worst_seen:.1e}")
    if args.dtype == "float64" and worst_seen > 1e-9:
        print("FAILED: a scheme or the inference form differs beyond float64 rounding", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
