"""Where a train step's time goes, part by part: ours (JAX) against torchvision's FCOS.

  .venv/bin/python benchmarks/train_parts.py [--runs 3] [--rounds 2] [--height 800] [--width 1344]
      [--batch 2]

Times the two parts of the FCOS R-50 GN model (`configs/fcos_r50_caffe_fpn_gn_1x.py`) that
hold nearly all of a train step's work, each alone, forward and forward + backward:

  backbone + FPN   normalised images [B, H, W, 3] -> P3-P7; gradients of every trainable
                   parameter (stem and stage 1 frozen, as the config and torchvision's
                   pretrained builder freeze them) for a fixed cotangent on P3-P7.
  head             P3-P7 (taken from a forward of the part above) -> class, box and centerness
                   outputs of every level; gradients of the head's parameters and of P3-P7.

The peer is torchvision's `FCOS` pieces as its pretrained builder makes them: `resnet50` with
FrozenBatchNorm2d, `_resnet_fpn_extractor(trainable_layers=3, LastLevelP6P7(256, 256))`,
`FCOSHead(256, 1, 91)` (GroupNorm towers); channels_last, 2 threads. Only speed is compared:
both sides start from their own initialisation, and the losses (the outputs' sums times a small
weight) differ; the work per part is the same up to the class count (80 vs 91 channels).
Each side runs in its own process (`--rounds` alternates them; each timing from its fastest
round), compiled with the library's compile options; the median of `--runs` after one warm-up.
Why: in `op_profile.py`'s per-operation table of the whole step, XLA's asynchronously launched
convolutions are charged until their result is read, so a row can carry time other thunks spent;
timing the parts alone does not mix them.
"""

import argparse
import os
import sys
from pathlib import Path

from common import (  # benchmarks/common.py
    alternating_rounds,
    answer_as_worker,
    cpu_model,
    run_worker,
    synthetic_images,
    timed,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/fcos_r50_caffe_fpn_gn_1x.py"
COTANGENT = 1e-3  # the weight of each output in the parts' losses


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO))
    from fcos_jax.config import load_config
    from fcos_jax.models import build_model
    from fcos_jax.utils import compile_options

    config = load_config(REPO / CONFIG)
    model = build_model(config.model)
    x = jnp.asarray(synthetic_images(args.batch, args.height, args.width))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1, :64, :64])
    params, stats = variables["params"], variables["batch_stats"]
    jit = lambda f: jax.jit(f, compiler_options=compile_options.compiler_options())  # noqa: E731

    def pyramid(p, x):
        feats = model.backbone.apply(
            {"params": p["backbone"], "batch_stats": stats["backbone"]}, x, train=True
        )
        return model.neck.apply({"params": p["neck"]}, feats[1:])

    def heads(head_params, levels):
        outputs = model.bbox_head.apply({"params": head_params}, levels)
        return [v for level in outputs for v in level.values()]

    def weighted_sum(outputs):
        return sum(jnp.sum(o) * COTANGENT for o in outputs)

    trunk = {"backbone": params["backbone"], "neck": params["neck"]}
    trunk_forward = jit(pyramid)
    trunk_grad = jit(jax.grad(lambda p, x: weighted_sum(pyramid(p, x))))
    levels = jax.block_until_ready(trunk_forward(trunk, x))
    head_forward = jit(heads)
    head_grad = jit(jax.grad(lambda h, lv: weighted_sum(heads(h, lv)), argnums=(0, 1)))
    head_params = params["bbox_head"]
    return {
        "backbone + FPN": {
            "forward": timed(lambda: jax.block_until_ready(trunk_forward(trunk, x)), args.runs),
            "forward + backward": timed(
                lambda: jax.block_until_ready(trunk_grad(trunk, x)), args.runs
            ),
        },
        "head": {
            "forward": timed(
                lambda: jax.block_until_ready(head_forward(head_params, levels)), args.runs
            ),
            "forward + backward": timed(
                lambda: jax.block_until_ready(head_grad(head_params, levels)), args.runs
            ),
        },
        "versions": {"jax": jax.__version__},
    }


def torch_worker(args) -> dict:
    import torch
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    trunk = _resnet_fpn_extractor(
        resnet, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    ).to(memory_format=torch.channels_last)
    head = FCOSHead(256, 1, 91).to(memory_format=torch.channels_last)
    x = torch.from_numpy(synthetic_images(args.batch, args.height, args.width)).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last)

    def weighted_sum(outputs):
        return sum(o.sum() * COTANGENT for o in outputs)

    def trunk_forward():
        with torch.no_grad():
            return list(trunk(x).values())

    def trunk_backward():
        trunk.zero_grad(set_to_none=True)
        weighted_sum(trunk(x).values()).backward()

    levels = [f.detach().requires_grad_() for f in trunk_forward()]

    def head_forward():
        with torch.no_grad():
            head(levels)

    def head_backward():
        head.zero_grad(set_to_none=True)
        weighted_sum(head(levels).values()).backward()

    return {
        "backbone + FPN": {
            "forward": timed(trunk_forward, args.runs),
            "forward + backward": timed(trunk_backward, args.runs),
        },
        "head": {
            "forward": timed(head_forward, args.runs),
            "forward + backward": timed(head_backward, args.runs),
        },
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def run_side(side: str, args) -> dict:
    flags = [
        "--runs", str(args.runs), "--batch", str(args.batch), "--height", str(args.height),
        "--width", str(args.width), "--torch-threads", str(args.torch_threads),
    ]  # fmt: skip
    return run_worker(__file__, side, flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="alternating worker runs per side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if answer_as_worker(args, {"jax": jax_worker, "torch": torch_worker}):
        return
    ours, theirs = alternating_rounds(lambda side: run_side(side, args), args.rounds)
    print(
        f"\nFCOS R-50 GN train-step parts, batch {args.batch}, {args.height}x{args.width}, float32,"
        f" {os.cpu_count()} cores ({cpu_model()}), median (min) wall seconds of {args.runs} runs"
        f" (best of {args.rounds} round(s)); ratio = ours / torchvision"
    )
    print("| part | pass | JAX (ours) | torchvision | ratio |\n|---|---|---|---|---|")
    for part in ("backbone + FPN", "head"):
        for kind in ("forward", "forward + backward"):
            a, b = ours[part][kind], theirs[part][kind]
            print(
                f"| {part} | {kind} | {a['median']:.3f} ({a['min']:.3f}) | {b['median']:.3f}"
                f" ({b['min']:.3f}) | {a['median'] / b['median']:.2f} |"
            )
        a, b = ours[part], theirs[part]
        backward = [t["forward + backward"]["median"] - t["forward"]["median"] for t in (a, b)]
        print(
            f"| {part} | backward (difference) | {backward[0]:.3f} | {backward[1]:.3f} |"
            f" {backward[0] / backward[1]:.2f} |"
        )
    print(
        f"peak RSS (GiB): ours {ours['max_rss_gib']:.2f}, torchvision {theirs['max_rss_gib']:.2f}."
        f" Versions: {ours['versions']} {theirs['versions']}. Load average: ours"
        f" {ours['load'][0]:.1f} -> {ours['load'][1]:.1f}, torchvision {theirs['load'][0]:.1f} ->"
        f" {theirs['load'][1]:.1f}."
    )


if __name__ == "__main__":
    main()
