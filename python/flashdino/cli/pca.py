"""The ``--pca`` picture: the first three principal components of patch features as RGB."""

from __future__ import annotations

from pathlib import Path

PCA_MAX_IMAGES = 8  # rows of the --pca picture
PCA_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def pca_rgb(features, grids, n_components: int = 3):
    """Projects patch features onto their first 3 principal components (fitted jointly) as [0, 1] RGB.

    features: list of [h*w, D] tensors; grids: list of (h, w). Returns a list of [h, w, 3] tensors.
    """
    import torch

    X = torch.cat([f.float() for f in features], dim=0)
    mean = X.mean(dim=0, keepdim=True)
    Xc = X - mean
    q = min(n_components, Xc.shape[0], Xc.shape[1])
    # SVD of the centred data: rows of Vh are the principal directions (deterministic, exact)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    comps = Xc @ Vh[:q].T
    if q < n_components:
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], n_components - q)], dim=1)
    # sign convention (SVD signs are arbitrary): the largest-magnitude projection is positive
    peak = comps.abs().argmax(dim=0)
    comps = comps * torch.sign(comps[peak, torch.arange(comps.shape[1])]).clamp_min(0).mul(2).sub(1)
    lo = torch.quantile(comps, 0.01, dim=0)
    hi = torch.quantile(comps, 0.99, dim=0)
    comps = ((comps - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    out, start = [], 0
    for (h, w) in grids:
        out.append(comps[start: start + h * w].reshape(h, w, n_components))
        start += h * w
    return out


def render_pca(images, features, grids, path, max_images: int = PCA_MAX_IMAGES):
    """Writes a PNG with one row per image: the (preprocessed) input next to its PCA colouring."""
    import numpy as np
    import torch
    from PIL import Image

    images, features, grids = images[:max_images], features[:max_images], grids[:max_images]
    rgbs = pca_rgb(features, grids)
    rows = []
    for img, rgb in zip(images, rgbs):  # img: [3, H, W] in [0, 1]
        H, W = img.shape[-2:]
        left = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        right = torch.nn.functional.interpolate(rgb.permute(2, 0, 1)[None], size=(H, W), mode="nearest")[0]
        right = (right.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        rows.append(np.concatenate([left, right], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    canvas = np.concatenate(rows, axis=0)
    from flashdino.outputs import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:  # the temporary name keeps the suffix, which tells PIL the format
        Image.fromarray(canvas).save(tmp, **_marker_kwargs(path))
    return path


PCA_MARKER = "flashdino features --pca"  # embedded in PNG / JPEG output: a later --overwrite may replace it


def _marker_kwargs(path) -> dict:
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", PCA_MARKER)
        return {"pnginfo": info}
    if suffix in (".jpg", ".jpeg"):
        return {"comment": PCA_MARKER}
    return {}


def written_by_pca(path) -> bool:
    """True for an image this command wrote (its marker; formats without one are never claimed)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            text = img.info.get("Software") or img.info.get("comment") or b""
    except Exception:  # noqa: BLE001 - unreadable or not an image: not ours
        return False
    return (text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)) == PCA_MARKER


