"""Building blocks of self-supervised methods: plain nn.Modules and functions of numbers and
tensors, never a config (lightly's modules are the model), each with a runnable docstring example.

- losses: DINO, iBOT, KoLeo, NT-Xent, MAE pixel loss (+ Sinkhorn-Knopp, patchify)
- heads: DINOHead, SimCLR projection head, MAE decoder
- masked_vit: a timm ViT's forward with a masking hook (iBOT mask tokens, MAE visible patches)
- masks: iBOT block masks, MAE random masking
- ema: EMA teachers
- knn: the DINO weighted k-NN classifier (online monitor and `python -m eval knn`)

Methods (pretrain/methods) assemble them; they import nothing above pretrain's core.
"""
