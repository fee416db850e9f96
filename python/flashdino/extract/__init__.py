"""Feature extraction at data-set scale: inputs, decoding, a DataLoader pipeline, sharded output, a reader.

    flashdino features DATA/ --model dinov3_vitl16 --weights W --out feats/     # one process
    torchrun --nproc_per_node=8 -m flashdino features DATA/ ... --out feats/    # one rank per GPU
    fs = flashdino.read_features("feats/"); fs.cls, fs.ids, fs.patch(0)

Modules: ``inputs`` (what to process, in a deterministic order), ``decode`` (the image decoder of
the whole package), ``dataset`` (decoding and preprocessing in DataLoader workers), ``writer``
(atomic shards, manifests, settings), ``runner`` (the loop: resume, ranks, progress), ``reader``.
"""

from __future__ import annotations
