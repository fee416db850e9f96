"""Feature extraction at data-set scale: inputs, decoding, a DataLoader pipeline, sharded output, a reader.

    flashdino features DATA/ --model dinov3_vitl16 --weights W --out feats/     # one process
    torchrun --nproc_per_node=8 -m flashdino features DATA/ ... --out feats/    # one rank per GPU
    fs = flashdino.read_features("feats/"); fs.cls, fs.ids, fs.patch(0)

Modules: ``inputs`` (what to process, in a deterministic order), ``decode`` (the image decoder of
the whole package), ``dataset`` (decoding and preprocessing in DataLoader workers, surviving a
worker's death), ``shardfile`` (a shard's bytes, checksum and verification), ``writer`` (atomic
shards, manifests, settings, the folder lock, what flashdino may delete), ``runner`` (the loop:
resume, ranks, progress), ``reader`` (checked reading).
"""

from __future__ import annotations
