"""Storage of a distilled datamodel against an influence-function cache and the training data.

    python benchmarks/storage.py

For K clusters and a model with P parameters, answering new queries needs, without the training data:
- DDM: the synsets, K x ipc synthetic inputs with their label vectors (plus a cluster id and a scale
  per sample/cluster), float32, exactly as `Synset.nbytes` counts them;
- an influence function: at least the K removal vectors d_k = (H + lambda I)^-1 g_k / N (K x P
  floats; a query's scores are then its gradient dotted with each); Scaleup (Arnoldi) keeps instead
  the top-r eigenbasis (r x P) and the K projected cluster gradients, and an exact influence function
  the dense P x P factorisation;
- the training data itself (float32 tensors as the library holds them; uint8 pixels in brackets).
Counts are computed from the models' real parameter counts; no training is needed.
"""

from __future__ import annotations

import argparse
import datetime
import math

from distdm.models import build_model

# name -> (model, its kwargs, input shape, training images, classes)
SETTINGS = {
    "digits-mlp-k100": ("mlp", {"hidden": (128,)}, (64,), 1437, 10),
    "fmnist-convnet-k100": ("convnet", {"width": 16, "depth": 3}, (1, 28, 28), 2000, 10),
    "cifar10-resnet18-ap (ResNet-18-sized)": ("resnet18-ap", {}, (3, 32, 32), 50000, 10),
}


def synset_bytes(k: int, ipc: int, input_numel: int, classes: int) -> int:
    """Bytes of K synsets of ipc samples: inputs, labels, cluster ids (int64), a scale per cluster."""
    return 4 * k * ipc * (input_numel + classes) + 8 * k * ipc + 4 * k


def mb(n: float) -> str:
    """Bytes as MB with 3 significant digits."""
    return f"{n / 1e6:.3g} MB"


def main() -> None:
    """Print the storage table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--ipcs", default="1,4,10")
    ap.add_argument("--rank", type=int, default=200, help="Arnoldi rank r of the Scaleup cache")
    args = ap.parse_args()
    k = args.clusters
    print(f"K = {k}; float32; {datetime.date.today()}\n")
    print(
        "| setting | P | training data | IF cache K x P | Scaleup cache (r + K) x P | dense IF P x P "
        "| synset ipc | synset | synset / IF cache |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (model, kw, shape, n, classes) in SETTINGS.items():
        p = sum(t.numel() for t in build_model(model, shape, classes, **kw).parameters())
        numel = math.prod(shape)
        cache = 4 * k * p
        for ipc in (int(v) for v in args.ipcs.split(",")):
            syn = synset_bytes(k, ipc, numel, classes)
            print(
                f"| {name} | {p:,} | {mb(4 * n * numel)} ({mb(n * numel)} uint8) | {mb(cache)} "
                f"| {mb(4 * (args.rank + k) * p)} | {mb(4 * p * p)} | {ipc} | {mb(syn)} | {syn / cache:.4f} |"
            )


if __name__ == "__main__":
    main()
