"""Compiled transformer blocks: where a DiT's training step gets its fused kernels.

`compile_blocks` torch.compiles each block in place ("regional" compilation). Every block runs the same
code on inputs of the same shapes, so dynamo traces one graph and all blocks share it: compile time is
one block's, not depth × one. Inductor then fuses what eager PyTorch runs as separate kernels:
LayerNorm + modulate (x·(1 + scale) + shift), the q/k/v split, GELU, bias adds, gate × branch + residual,
forward and backward. Attention stays SDPA's flash / cuDNN kernel and the matmuls stay cuBLAS. The
embedders, the final layer and unpatchify stay eager: a handful of small kernels per step.

- Call it before `deepspeed.initialize` (ZeRO-1/2 register only gradient hooks, which compiled blocks
  keep); ZeRO-3's per-module gather hooks break the graph, so it refuses fullgraph there.
- Activation checkpointing (`DiT.checkpoint_every`) wraps the compiled block: the recomputation runs
  the same compiled graph.
- dynamic=False: one static graph per input shape (batch, resolution), the fastest kernels; each new
  shape compiles once more.
"""

from __future__ import annotations

import torch


def compile_blocks(
    model: torch.nn.Module, *, dynamic: bool = False, fullgraph: bool = True, **compile_kwargs
) -> torch.nn.Module:
    """Compile every block of `model.blocks` in place (nn.Module.compile); returns `model`.
    compile_kwargs go to torch.compile (mode, backend, options)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no `blocks` ModuleList to compile")
    for block in blocks:
        if fullgraph and any(hasattr(p, "ds_id") for p in block.parameters(recurse=True)):
            raise ValueError(
                "compile_blocks: parameters are ZeRO-3 partitioned (their gather hooks break the "
                "graph); compile under ZeRO-1/2, or pass fullgraph=False"
            )
        block.compile(dynamic=dynamic, fullgraph=fullgraph, **compile_kwargs)
    return model
