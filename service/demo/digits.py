"""``digits-cnn``: a small CNN trained on scikit-learn's bundled 8x8 digits, upsampled to
16x16 so that a heatmap over the input has something to show.

Inputs are one grey channel in [0, 1], ink bright on a dark background (as in the data set);
a picture with a light background (ink on paper) is inverted before it reaches the model.
Training is seeded and single-threaded, so the weights are the same on every machine."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.tasks import TaskName

from ..models import LoadedModel
from ..registry import ImageSpec

LABELS = [str(d) for d in range(10)]
IMAGE = {"channels": 1, "size": 16, "mean": [0.0], "std": [1.0], "mode": "L", "invert": "auto"}


def make_model():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def dataset():
    """(images [N,1,16,16] float32 in [0,1], labels [N]) from sklearn's bundled digits."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def sample_png(index: int = 0) -> bytes:
    """A PNG of one held-out digit, for examples and tests (label is ``dataset()[1][index]``)."""
    import io

    from PIL import Image

    x, _ = dataset()
    img = Image.fromarray((x[index, 0].numpy() * 255).round().astype("uint8"), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build(out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, y = dataset()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        test_idx, train_idx = perm[:300], perm[300:]
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            order = train_idx[torch.randperm(len(train_idx), generator=g)]
            for i in range(0, len(order), 64):
                b = order[i : i + 64]
                loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = lambda idx: float((model(x[idx]).argmax(-1) == y[idx]).float().mean())  # noqa: E731
            train_acc, test_acc = acc(train_idx), acc(test_idx)
    finally:
        torch.set_num_threads(threads)
    save_file(model.state_dict(), str(out / "model.safetensors"))
    (out / "image.json").write_text(json.dumps(IMAGE))
    return {
        "task": TaskName.IMAGE_CLASSIFICATION,
        "labels": LABELS,
        "train_accuracy": train_acc,
        "heldout_accuracy": test_acc,
        "heldout_indices": test_idx[:20].tolist(),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }


def load(path: Path) -> LoadedModel:
    from safetensors.torch import load_file

    model = make_model()
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    info = json.loads((path / "build.json").read_text())
    return LoadedModel(
        "digits-cnn",
        TaskName.IMAGE_CLASSIFICATION,
        model.eval(),
        None,
        LABELS,
        ImageSpec.model_validate(IMAGE),
        info,
    )
