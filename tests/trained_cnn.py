"""A small trained CNN for accuracy tests: :class:`SmallCNN` on scikit-learn's handwritten digits.

``load_digits`` (1797 8x8 grayscale images, shipped inside scikit-learn, nothing downloaded) is
upsampled to 32x32 and repeated to 3 channels, so it fits ``SmallCNN``'s 3x32x32 input. Ten seconds
of training on one CPU core reach 94% test accuracy. Training runs in float64, so the model is the
same on every machine: in float32, torch's AVX2 and AVX-512 kernels round differently and the
trajectories part (67% and 90% test accuracy, ``ATEN_CPU_CAPABILITY=avx2`` against ``avx512``); in
float64 both give 94.4% and parameters equal to 1e-9.
"""

from __future__ import annotations

import torch
from torch import nn

from maptools.examples import SmallCNN

__all__ = ["digits", "train_small_cnn"]


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_images, train_labels, test_images, test_labels)``; images ``[N, 3, 32, 32]``, standardised."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def train_small_cnn(seed: int = 0, epochs: int = 6, batch: int = 32) -> tuple[SmallCNN, torch.Tensor, torch.Tensor]:
    """Train :class:`SmallCNN` on digits; returns ``(model in eval mode, test_images, test_labels)``.

    Trains on one thread: on a small, busy machine, torch's thread pool makes these tiny
    batches 10-30x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, epochs, batch)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, epochs: int, batch: int) -> tuple[SmallCNN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits(seed)
    model = SmallCNN(num_classes=10).double()
    train_x = train_x.double()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train_y), generator=gen).split(batch):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            loss.backward()
            optimiser.step()
    return model.float().eval(), test_x, test_y


if __name__ == "__main__":
    import time

    started = time.perf_counter()
    net, x, y = train_small_cnn()
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    print(f"test accuracy {accuracy:.3f} on {len(y)} images, {time.perf_counter() - started:.1f} s")
