"""Every exact execution scheme of every dynamic conv gives the same logits and gradients, on any device.

For ResNet-18 and MobileNetV2 x1.0 with CondConv, DY-Conv and ODConv convs, fully dynamic and PAD (random
element and output-unit masks at ratio 0.3), in eval mode (BatchNorm on its running statistics, so that a
batch of 4 does not amplify rounding), every scheme of :data:`dyconv.schemes.SCHEMES` that is exact for the
model is compared with ``grouped``: logits, input gradient and every parameter gradient (each relative to
the largest entry of its kind). Then, for each PAD model, its inference form (:func:`dyconv.inference.to_inference`)
against the trained model, and float16 (CUDA) / bfloat16 (CPU) autocast against float32. Unit tests check the
same per layer on CPU; this checks whole models on a device the tests do not reach.

Usage: python scripts/check_schemes.py [--device cuda] [--size 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dyconv.bench import set_random_mask  # noqa: E402
from dyconv.inference import to_inference  # noqa: E402
from dyconv.layers import set_conv_scheme  # noqa: E402
from dyconv.models import build_model  # noqa: E402
from dyconv.schemes import SCHEMES  # noqa: E402


def logits_and_grads(model, x):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    # a fixed random projection of the logits: their plain sum can have a vanishing input gradient
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out.float() * projection).sum().backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    return out.detach(), grads


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=64, help="image size (batch 4)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    worst_seen = 0.0
    for arch in ("resnet18", "mobilenetv2_100"):
        for conv in ("condconv", "dyconv", "odconv"):
            for pad, granularity in ((False, None), (True, "element"), (True, "unit")):
                torch.manual_seed(0)
                model = build_model(arch, conv, pad, num_classes=10).to(device).eval()
                if pad:
                    set_random_mask(model, 0.3, granularity=granularity)
                x = torch.randn(4, 3, args.size, args.size, device=device)
                set_conv_scheme(model, "grouped")
                ref_out, ref_grads = logits_and_grads(model, x)
                label = f"{arch:16s} {conv:8s} {'pad ' + granularity if pad else 'dynamic':12s}"
                for scheme in SCHEMES[1:]:
                    try:
                        set_conv_scheme(model, scheme)
                        out, grads = logits_and_grads(model, x)
                    except ValueError as err:  # not exact for some layer (ODConv's spatial attention)
                        print(f"{label} {scheme:8s} not applicable: {err}")
                        continue
                    d_out, d_grad, name = relative_errors(out, grads, ref_out, ref_grads)
                    worst_seen = max(worst_seen, d_out)
                    print(f"{label} {scheme:8s} logits {d_out:.1e}  gradients {d_grad:.1e} ({name})")
                if pad:
                    set_conv_scheme(model, "auto")
                    with torch.no_grad():
                        trained = model(x)
                        folded = to_inference(model)(x)
                        with torch.autocast(device.type, dtype=low):
                            autocast = model(x)
                    d_fold = ((folded - trained).abs().max() / trained.abs().max()).item()
                    d_low = ((autocast.float() - trained).abs().max() / trained.abs().max()).item()
                    worst_seen = max(worst_seen, d_fold)
                    print(f"{label} inference form {d_fold:.1e}  {str(low).split('.')[1]} autocast {d_low:.1e}"
                          f" (finite: {bool(torch.isfinite(autocast).all())})")
    print(f"largest float32 logits difference (schemes, inference form): {worst_seen:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
