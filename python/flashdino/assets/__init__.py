"""Files shipped with flashdino: a small sample image for the README's first run.

``sample_image_path()`` gives the path of ``sample.png`` (320 x 240 RGB), a procedurally drawn scene
(sky gradient, ground, a sun, a house, a tree and a striped flag) whose regions are easy to tell
apart in a PCA rendering of patch features. ``make_sample_image()`` draws it again; the shipped file
was written by it (``python -c "from flashdino.assets import make_sample_image as m; m().save(...)"``).
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_IMAGE_NAME = "sample.png"
SAMPLE_IMAGE_SIZE = (320, 240)  # (width, height), as PIL reports it


def sample_image_path() -> Path:
    """Path of the packaged sample image (a real file on disk)."""
    try:
        from importlib.resources import files

        path = Path(str(files(__name__) / SAMPLE_IMAGE_NAME))
    except Exception:  # pragma: no cover - very old importlib.resources
        path = Path(__file__).resolve().parent / SAMPLE_IMAGE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"the packaged sample image is missing: {path}. Reinstall flashdino, or recreate it with "
            "flashdino.assets.make_sample_image().save(path)"
        )
    return path


def make_sample_image():
    """Draws the sample scene as a PIL RGB image (deterministic, no randomness)."""
    from PIL import Image, ImageDraw

    W, H = SAMPLE_IMAGE_SIZE
    img = Image.new("RGB", (W, H))
    px = img.load()
    horizon = int(H * 0.62)
    for y in range(H):
        for x in range(W):
            if y < horizon:  # sky: vertical blue gradient with a slight horizontal warm shift
                t = y / horizon
                px[x, y] = (int(70 + 90 * t + 20 * x / W), int(130 + 80 * t), int(220 + 30 * t))
            else:  # ground: green with a darker gradient towards the bottom
                t = (y - horizon) / (H - horizon)
                px[x, y] = (int(60 - 30 * t), int(150 - 60 * t), int(50 - 20 * t))
    d = ImageDraw.Draw(img)
    d.ellipse((248, 18, 298, 68), fill=(255, 214, 60), outline=(240, 160, 30), width=3)  # sun
    # house: walls, roof, door, window
    d.rectangle((40, 100, 140, 170), fill=(200, 80, 60), outline=(90, 30, 20), width=2)
    d.polygon([(30, 102), (90, 55), (150, 102)], fill=(110, 60, 40))
    d.rectangle((78, 130, 102, 170), fill=(70, 40, 20))
    d.rectangle((50, 112, 72, 130), fill=(180, 220, 255), outline=(255, 255, 255), width=2)
    d.rectangle((110, 112, 132, 130), fill=(180, 220, 255), outline=(255, 255, 255), width=2)
    # tree
    d.rectangle((190, 120, 202, 172), fill=(100, 60, 30))
    d.ellipse((165, 70, 227, 132), fill=(30, 110, 40))
    # striped flag on a pole
    d.line((262, 100, 262, 190), fill=(60, 60, 60), width=3)
    for i in range(5):
        d.rectangle((264, 100 + 6 * i, 304, 105 + 6 * i), fill=(230, 30, 30) if i % 2 == 0 else (250, 250, 250))
    # a checkerboard path in the foreground
    for i in range(8):
        for j in range(2):
            if (i + j) % 2 == 0:
                d.rectangle((8 + 38 * i, 200 + 16 * j, 46 + 38 * i, 216 + 16 * j), fill=(180, 170, 150))
    return img


__all__ = ["sample_image_path", "make_sample_image", "SAMPLE_IMAGE_SIZE"]
