#!/usr/bin/env python
"""Train the demo CNN on synthetic shapes and save gradcam_batch/assets/demo_cnn.pt.

Reproducible: fixed seeds, single-threaded data, deterministic CPU kernels. Prints test accuracy
and the Grad-CAM pointing game on held-out images; the demo requires the latter >= 0.9.

--shortcut trains the planted-shortcut model instead (gradcam_batch/assets/demo_cnn_shortcut.pt)
on data=demo_shortcut's images: a share of the planted class's images carry a corner mark and a
faint shape. It prints, on held-out images, the share of stamped planted-class images whose map
peaks in the mark's corner (the demo requires >= 0.9: the model reads the mark) and the pointing
game on unstamped images (>= 0.8: it still finds the shapes), and saves nothing if either fails.
The shipped weights came from `python scripts/train_demo_model.py --shortcut` (about 2.5 CPU minutes).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gradcam_batch.data.demo import SHORTCUT_CLASS, SHORTCUT_SHARE, in_mark_corner, make_arrays
from gradcam_batch.methods import compute_cam
from gradcam_batch.models import DEMO_CLASSES, DEMO_SHORTCUT_WEIGHTS, DEMO_WEIGHTS, DemoCNN

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_input(images) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def cam_peaks(model: DemoCNN, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y) pixel centre of each image's Grad-CAM peak for its predicted class."""
    captured = {}
    handle = model.features.register_forward_hook(
        lambda m, i, o: captured.setdefault("a", o.detach().requires_grad_()))
    logits = model(images)
    handle.remove()
    activation = captured["a"]
    # re-run the head from the hooked activation so the gradient reaches it
    logits = model.classifier(model.pool(activation).flatten(1))
    pred = logits.argmax(1)
    (grads,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), activation)
    cams = compute_cam(activation.detach(), grads, "gradcam")[:, 0]
    h, w = cams.shape[-2:]
    peak = cams.flatten(1).argmax(1)
    px = ((peak % w).float() + 0.5) / w * images.shape[-1]
    py = ((peak // w).float() + 0.5) / h * images.shape[-2]
    return px, py


def pointing_game(model: DemoCNN, images: torch.Tensor, boxes: torch.Tensor) -> float:
    px, py = cam_peaks(model, images)
    hit = (px >= boxes[:, 0]) & (px <= boxes[:, 2]) & (py >= boxes[:, 1]) & (py <= boxes[:, 3])
    return hit.float().mean().item()


def shortcut_checks(model: DemoCNN, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor,
                    stamped: torch.Tensor) -> tuple[float, float]:
    """(share of stamped planted-class images whose map peaks in the mark's corner, pointing game
    of the unstamped images)."""
    planted = stamped & (labels == SHORTCUT_CLASS)
    px, py = cam_peaks(model, images[planted])
    in_corner = in_mark_corner(px, py).float().mean().item()
    return in_corner, pointing_game(model, images[~stamped], boxes[~stamped])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--shortcut", action="store_true",
                        help=f"plant the corner mark on {SHORTCUT_SHARE * 100:.0f}%% of the "
                             f"{DEMO_CLASSES[SHORTCUT_CLASS]} images and save the shortcut model")
    parser.add_argument("--out", default=None, help="where to save (default: the shipped weights file)")
    args = parser.parse_args()
    out = args.out or str(DEMO_SHORTCUT_WEIGHTS if args.shortcut else DEMO_WEIGHTS)
    planted = SHORTCUT_CLASS if args.shortcut else None
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    train_x, train_y, _, _ = make_arrays(args.train, seed=1, shortcut_class=planted, shortcut_share=SHORTCUT_SHARE)
    test_x, test_y, test_boxes, test_stamped = make_arrays(1000, seed=2, shortcut_class=planted,
                                                           shortcut_share=SHORTCUT_SHARE)
    train_x, train_y = to_input(train_x), torch.from_numpy(train_y)
    test_x, test_y = to_input(test_x), torch.from_numpy(test_y)
    model = DemoCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * (len(train_x) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for index in range(len(train_x) // 64):
            batch = order[index * 64:(index + 1) * 64]
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} test accuracy {accuracy:.3f}", flush=True)
    model.eval().requires_grad_(False)
    if args.shortcut:
        stamped = torch.from_numpy(test_stamped)
        with torch.no_grad():
            right = model(test_x).argmax(1) == test_y
        in_corner, pointing = shortcut_checks(model, test_x, test_y, torch.from_numpy(test_boxes), stamped)
        planted_name = DEMO_CLASSES[SHORTCUT_CLASS]
        print(f"stamped {planted_name} images: {int(stamped.sum())}, accuracy {right[stamped].float().mean():.3f}; "
              f"unstamped images: accuracy {right[~stamped].float().mean():.3f}")
        print(f"stamped {planted_name} images whose map peaks in the mark's corner {in_corner:.3f} (needs >= 0.9) "
              f"{'ok' if in_corner >= 0.9 else 'FAILED'}")
        print(f"pointing game, unstamped images {pointing:.3f} (needs >= 0.8) {'ok' if pointing >= 0.8 else 'FAILED'}"
              f"  ({time.time() - start:.0f} s)")
        if in_corner < 0.9 or pointing < 0.8:
            raise SystemExit(f"the shortcut model misses its checks: {out} not written")
    else:
        pointing = pointing_game(model, test_x, torch.from_numpy(test_boxes))
        print(f"pointing game {pointing:.3f}  ({time.time() - start:.0f} s)")
    torch.save(model.state_dict(), out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
