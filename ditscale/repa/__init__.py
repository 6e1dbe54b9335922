"""REPA (Yu et al. 2025, representation alignment): the tokens after an early DiT block, through a small
trainable MLP, are pulled towards the patch features a frozen self-supervised encoder (DINOv2) gives
the clean image; one term, λ · mean negative cosine, beside the diffusion loss.

- encoder.py  the frozen DINOv2 ViT-S/B/L/G-14 from a local weights file, REPA's preprocessing
- align.py    the projector, the token-grid match, the loss (pure functions)
- model.py    the DiT + projector module for the engine to train (the projector never leaves in exports)
- term.py     per batch: the encoder's targets and the term the objective adds to its loss

The shards must keep the clean image (`data_prep encode --keep-image`); `repa.enabled` in the config
turns it on (ditscale.config.RepaConfig; the trainer's `load_repa` and `micro_step(..., extra=)`).
"""
