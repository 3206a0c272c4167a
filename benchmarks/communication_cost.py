"""What one train step moves between devices for each config, and what that costs on paper.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python \
      benchmarks/communication_cost.py [--configs configs/fcos_r50_caffe_fpn_gn_1x.py,...]

For each config: the parameter bytes, the trainable parameters' bytes, and the all-reduce bytes
of its train step compiled on the 8 simulated devices (as an accelerator would compile it:
`cpu_kernels.accelerator_kernels`; read from the HLO by `fcos_jax.training.communication`). Then
the time of that all-reduce at 8, 64 and 256 devices on the interconnects of `LINKS` (nominal
rates, as the vendors state them), against the step's compute at the model-zoo recipe's 2 images per
device (3 x `FORWARD_TFLOP` x 2 at `UTILISATION` of the chip's bfloat16 peak). Prints a Markdown
table; docs/architecture.md#communication holds its output and reads it.

The all-reduce model: a ring within a group of g devices moves 2 (g - 1) / g x S per device.
GPUs: hierarchical, 8 per node on NVLink (reduce-scatter, then a ring over the nodes of each
device's S / 8 on its own network interface, then all-gather). TPUs: one ring over the slice's
inter-chip links. Nothing overlaps the reduction with computation (the step reduces once, after
the backward pass), so the times add.
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CONFIGS = (
    "fcos_r50_caffe_fpn_1x",
    "fcos_r50_caffe_fpn_gn_1x",
    "fcos_r101_caffe_fpn_gn_1x",
    "fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x",
    "fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x",
    "torchvision_fcos_r50_fpn",
)
# Forward TFLOP (multiply-adds x 2) of FCOS at 800 x 1344 per (depth, groups): R-50 about 0.42;
# R-101 and X-101 64x4d add their trunks' extra FLOPs at 224 x 224 (7.4 and 23.5 GFLOP) scaled by
# the 21.4 times as many pixels. A training step costs about three forward passes.
FORWARD_TFLOP = {(50, 1): 0.42, (101, 1): 0.58, (101, 64): 0.92}
IMAGES_PER_DEVICE = 2
UTILIZATION = 0.3  # share of the bfloat16 peak a detection train step sustains (an assumption)
# name: (kind, bytes/s per device for the reduction, bfloat16 peak FLOP/s per device)
LINKS = {
    "H100 NVLink 4 + 400 Gb/s NIC per GPU": ("gpu", (450e9, 50e9), 989e12),
    "H100 NVLink 4 + 100 Gb/s NIC per node": ("gpu", (450e9, 12.5e9 / 8), 989e12),
    "TPU v5e ICI (400 GB/s per chip)": ("tpu", 400e9, 197e12),
    "TPU v5p ICI (1200 GB/s per chip)": ("tpu", 1200e9, 459e12),
}
DEVICE_COUNTS = (8, 64, 256)


def ring(bytes_: float, group: int, bandwidth: float) -> float:
    return 2 * (group - 1) / group * bytes_ / bandwidth if group > 1 else 0.0


def allreduce_seconds(bytes_: float, devices: int, link) -> float:
    kind, bandwidth, _ = link
    if kind == "tpu":
        return ring(bytes_, devices, bandwidth)
    nvlink, nic = bandwidth
    node = min(devices, 8)
    nodes = devices // node
    # reduce-scatter + all-gather inside the node, a ring of S / 8 per GPU across the nodes
    return ring(bytes_, node, nvlink) + ring(bytes_ / node, nodes, nic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    args = parser.parse_args()
    import jax

    from fcos_jax.config import load_config
    from fcos_jax.parallel import sharding
    from fcos_jax.training import communication

    if jax.device_count() != 8:
        raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = sharding.make_mesh()
    print("| config | parameters (MB) | trainable (MB) | all-reduce per step (MB) |")
    print("|---|---|---|---|")
    rows = []
    for name in args.configs.split(","):
        config = load_config(REPO / "configs" / f"{os.path.basename(name).removesuffix('.py')}.py")
        config.train.batch_size, config.train.accumulate_steps = 8, 1
        params = communication.parameter_bytes(config)
        hlo = communication.train_step_hlo(config, mesh, (128, 128), accelerator=True)
        reduced = communication.report(hlo).get("all-reduce bytes", 0)
        b = config.model.backbone
        tflop = 3 * FORWARD_TFLOP[b.depth, b.groups]
        rows.append((config.name, reduced, tflop))
        print(
            f"| {config.name} | {params['all'] / 1e6:.1f} | {params['trainable'] / 1e6:.1f} | "
            f"{reduced / 1e6:.1f} |"
        )
    print()
    header = " | ".join(f"{n} devices" for n in DEVICE_COUNTS)
    print(f"| config | interconnect | compute per step (ms) | all-reduce (ms): {header} |")
    print("|---|---|---|" + "---|" * len(DEVICE_COUNTS))
    for name, reduced, tflop in rows:
        for link_name, link in LINKS.items():
            compute = IMAGES_PER_DEVICE * tflop * 1e12 / (UTILIZATION * link[2])
            times = " | ".join(
                f"{1e3 * allreduce_seconds(reduced, n, link):.2f}" for n in DEVICE_COUNTS
            )
            print(f"| {name} | {link_name} | {1e3 * compute:.1f} | {times} |")


if __name__ == "__main__":
    main()
