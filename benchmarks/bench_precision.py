"""Training-step throughput by precision and memory format on the machine at hand.

What ``amp`` and ``channels_last`` buy: the planned BUSI network (MONAI UNet 16..256, 5 downsamplings,
Dice+CE, AdamW) at a given size and batch, fp32 vs bf16 autocast, contiguous vs channels_last, one
warm-up step then the best of ``--repeat`` timings of ``--steps`` steps each. On a CPU, tumorseg uses
bf16 only where ``tumorseg.inference.cpu_has_bf16`` says the CPU computes it natively.

    python benchmarks/bench_precision.py --size 224 256 --batch 8 --device cpu
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch

    from tumorseg.config import LossConfig, ModelConfig
    from tumorseg.inference import amp_dtype, cpu_has_bf16, resolve_device
    from tumorseg.model import build_loss, build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=[224, 256])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    net = build_model(ModelConfig(channels=[16, 32, 64, 128, 256]), 1).to(device)
    loss_fn = build_loss(LossConfig(name="dice_ce"))
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randn(args.batch, 1, *args.size, device=device)
    y = (torch.rand(args.batch, 1, *args.size, device=device) > 0.9).float()
    low = torch.bfloat16 if device.type == "cpu" else (amp_dtype(device, True) or torch.bfloat16)

    def step(dtype: torch.dtype | None, inputs: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(net(inputs), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(f"device {device}, native bf16 on this CPU: {cpu_has_bf16()}, tumorseg's amp dtype: "
          f"{amp_dtype(device, True)}; UNet 16..256, {args.size[0]}x{args.size[1]}, batch {args.batch}")
    print(f"| {'memory format':<14} | {'precision':<9} | {'img/s':>7} | {'vs fp32 contiguous':>18} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 9}|{'-' * 20}|")
    base = None
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net.to(memory_format=fmt)  # type: ignore[call-overload]
        inputs = x.contiguous(memory_format=fmt)
        for dtype in (None, low):
            step(dtype, inputs)
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(dtype, inputs)
                best = min(best, (time.perf_counter() - t0) / args.steps)
            ips = args.batch / best
            base = base or ips
            name = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
            fmt_name = "channels_last" if channels_last else "contiguous"
            print(f"| {fmt_name:<14} | {name:<9} | {ips:7.1f} | {ips / base:17.2f}x |", flush=True)


if __name__ == "__main__":
    main()
