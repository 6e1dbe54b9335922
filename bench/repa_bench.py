"""What REPA adds to a training step: the frozen encoder's forward, the projector, the alignment loss.

    python bench/repa_bench.py [--steps 12] [--batch 8] [--device cpu|cuda]

One process trains the same DiT on the same batch three ways, measured in the same run (ratios, not
absolute times, are what survive a shared machine):
- base: the diffusion loss alone (plain DiT);
- repa: DiT + projector, the encoder's patch tokens of the batch's images, loss + λ · alignment;
- encoder: the encoder's forward alone (its share of the repa step).
Rows: DiT-S/4 with the tiny random ViT the tests use (`vit_tiny_test`) and with DINOv2 ViT-S/14 (random
weights: the same cost as the real ones; nothing is downloaded); on a GPU also DiT-XL/2 with ViT-B/14 and
ViT-L/14. 256-px images (32×32×4 latents); on a GPU bf16 weights, the encoder in bf16 as in training.
The three are called in turn each round (load drift on a shared machine hits all alike).
"""

from __future__ import annotations

import argparse
import time

import torch


def _interleaved(fns: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """Seconds per call of each function, called in turn for `rounds` rounds (the first third is warm-up):
    a shared machine's load drifts, interleaving spreads it over all sides alike."""
    spent = dict.fromkeys(fns, 0.0)
    warm = rounds // 3
    for r in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warm:
                spent[name] += time.perf_counter() - t0
    return {k: v / (rounds - warm) for k, v in spent.items()}


def bench(dit_shape: dict, encoder_name: str, batch: int, steps: int, device: torch.device) -> dict:
    from ditscale.diffusion import create_diffusion
    from ditscale.models import DiT
    from ditscale.repa.align import alignment_loss, match_tokens
    from ditscale.repa.encoder import FrozenEncoder, build_vit, encoder_dim, encoder_input_size
    from ditscale.repa.model import DiTWithProjector

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    kwargs = dict(input_size=32, in_channels=4, num_classes=1000, **dit_shape)
    base = DiT(**kwargs).to(device, dtype)
    repa = DiTWithProjector(align_block=min(4, dit_shape["depth"]), encoder_dim=encoder_dim(encoder_name), **kwargs).to(
        device, dtype
    )
    encoder = FrozenEncoder(build_vit(encoder_name).to(device, dtype), encoder_name).to(device)
    size = encoder_input_size(256)
    diffusion = create_diffusion("")
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (base, repa)}

    def step(model, align: bool) -> None:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        extras = {}

        def call(xt, tt, **kw):
            out = model(xt, tt, **kw, align=True) if align else model(xt, tt, **kw)
            if align:
                out, more = out
                extras.update(more)
            return out

        loss = diffusion.training_losses(call, x, t, {"y": y})["loss"]
        if align:
            projected = extras["repa_tokens"]
            loss = loss + 0.5 * alignment_loss(projected, match_tokens(encoder(images, size), projected.shape[1]))
        loss.mean().backward()
        opts[model].step()
        opts[model].zero_grad(set_to_none=True)

    return _interleaved(
        {"base": lambda: step(base, False), "repa": lambda: step(repa, True), "encoder": lambda: encoder(images, size)},
        steps,
        device,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="rounds (the first third is warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    s4 = dict(depth=12, hidden_size=384, num_heads=6, patch_size=4)
    rows = [("DiT-S/4", s4, "vit_tiny_test"), ("DiT-S/4", s4, "dinov2_vits14")]
    if device.type == "cuda":
        xl = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
        rows += [("DiT-XL/2", xl, "dinov2_vitb14"), ("DiT-XL/2", xl, "dinov2_vitl14")]
    print(f"device {device}, batch {args.batch}, 256-px images, {args.steps} rounds (timed: last two thirds)")
    print(f"{'model':<16} {'encoder':<15} {'base ms':>9} {'repa ms':>9} {'repa/base':>10} {'encoder share':>14}")
    for name, shape, enc in rows:
        r = bench(shape, enc, args.batch, args.steps, device)
        print(
            f"{name:<16} {enc:<15} {1e3 * r['base']:>9.1f} {1e3 * r['repa']:>9.1f} "
            f"{r['repa'] / r['base']:>10.2f} {r['encoder'] / r['repa']:>14.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
