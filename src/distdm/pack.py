"""A synset pack: what someone holding the trained model needs to attribute, diagnose and unlearn
without the training data.

    distdm.pack.export_pack(run, "packs/digits")                # or `distdm export RUN --out PACK`
    pack = distdm.pack.load_pack("packs/digits")                 # checks every file's SHA-256
    scores = pack.attribute(model, x, y, "dist1")                 # DDM online stage on the synsets

A pack is a directory of two files:
- `synset.safetensors`: the synthetic inputs, label vectors, cluster ids, per-cluster loss weights
  and the online fine-tune's lr and steps (exactly what `Synset.to_tensors` holds);
- `pack.json`: the manifest: format, the target model's fingerprint (a SHA-256 over its parameter
  names, shapes, dtypes and bytes), its architecture as the run recorded it, input shape and number of
  classes, per cluster its class, size and an optional human label, the preset with its distillation
  and online settings, the SHA-256 and size of `synset.safetensors`, and a checksum of the manifest
  itself.

It holds no training image, label, index or cluster assignment, and not theta_0 or the trajectory.
The manifest is written last, atomically: a directory without it is not a pack. Loading refuses a
pack whose files were changed, truncated or are missing (naming the file), and `attribute`,
`diagnose` and `unlearn` refuse a model whose parameters differ from the fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .clusters import Clusters
from .config import DistillConfig, OnlineConfig
from .data import TensorData
from .engine import Schedule, State, model_state, select
from .errors import DistdmError
from .scores import Scores
from .store import atomic_write_bytes, digest
from .synset import Synset
from .task import Task

FORMAT = "distdm-pack/1"
MANIFEST = "pack.json"
SYNSET_FILE = "synset.safetensors"


def model_fingerprint(model: nn.Module | State) -> str:
    """The SHA-256 (hex) over a model's parameter and buffer names, shapes, dtypes and values."""
    state = model_state(model) if isinstance(model, nn.Module) else model
    return digest({k: v.detach().cpu() for k, v in state.items()}, length=64)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclasses.dataclass
class Pack:
    """A loaded, verified synset pack: the synset and its manifest (see the module doc)."""

    path: Path
    manifest: dict[str, Any]
    synset: Synset

    @property
    def n_clusters(self) -> int:
        """Number of clusters the pack answers about."""
        return self.synset.n_clusters

    @property
    def cluster_class(self) -> np.ndarray:
        """Class of each cluster (K,)."""
        return np.asarray([c["class"] for c in self.manifest["clusters"]], dtype=np.int64)

    @property
    def cluster_size(self) -> np.ndarray:
        """Number of training samples of each cluster (K,)."""
        return np.asarray([c["size"] for c in self.manifest["clusters"]], dtype=np.int64)

    @property
    def cluster_labels(self) -> list[str | None]:
        """Human label of each cluster, None where none was given."""
        return [c.get("label") for c in self.manifest["clusters"]]

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose parameters are not the target model's this pack was exported for."""
        if not isinstance(model, nn.Module):
            raise DistdmError(f"model must be an nn.Module, got {type(model).__name__}")
        want = self.manifest["model"]["fingerprint"]
        got = model_fingerprint(model)
        if got != want:
            raise DistdmError(
                f"the model's parameters (fingerprint {got[:16]}) are not those of the target model pack "
                f"{self.path} was exported for ({want[:16]}): load the trained target's weights into it "
                f"(an answer about another model would be wrong)"
            )

    def task(self, model: nn.Module) -> Task:
        """A Task on the synsets alone (no training data): what the DDM online stage needs."""
        self.check_model(model)
        syn = self.synset
        final = model_state(model)
        n_classes = int(self.manifest["model"]["num_classes"])
        empty_x = syn.x[:0]
        data = TensorData(
            syn.x, syn.y.argmax(1), empty_x, torch.zeros(0, dtype=torch.long), n_classes, name="pack"
        )
        clusters = Clusters(syn.cluster.cpu().numpy(), self.cluster_class, "pack")
        # DDM's online stage starts from theta_tau only; the endpoints pair stands in for a trajectory
        sched = Schedule(epochs=1, lr=syn.lr, batch_size=None, shuffle=False)
        return Task(model, data, clusters, sched, [final, final], loss="ce")

    def attributor(self, model: nn.Module) -> Any:
        """The DDM attributor of the pack's preset and online settings, fitted on the synsets."""
        from .attribution.ddm import DDM

        m = self.manifest
        ddm = DDM(
            m["preset"],
            distill=DistillConfig.from_dict(m["distill"]),
            online=OnlineConfig.from_dict(m["online"]),
            synset=self.synset,
        )
        return ddm.fit(self.task(model))

    def attribute(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: str = "dist1"
    ) -> Scores:
        """Scores (clusters x queries): change of the objective on each query when a cluster is removed,
        by the DDM online stage on the pack's synsets (the same answer as from the run)."""
        s = self.attributor(model).scores(x, y, objective)
        s.unit_class, s.unit_size = self.cluster_class, self.cluster_size
        return s

    def diagnose(self, model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> np.ndarray:
        """Per cluster (K,): estimated change of the mean validation cross-entropy when it is removed
        (the 'global' objective); the most negative clusters hurt the model most."""
        from .applications.diagnose import validation_scores

        return validation_scores(self.attributor(model), x_val, y_val)

    def unlearn(self, model: nn.Module, clusters: Sequence[int]) -> State:
        """The target model's state with these clusters' effect removed by fine-tuning on their synsets."""
        from .applications.unlearn import delete_mask, parse_clusters
        from .distill import finetune

        task = self.task(model)
        ids = parse_clusters(list(clusters), self.n_clusters)
        return select(finetune(task, self.synset, delete_mask(ids, self.n_clusters)), 0)


def _cluster_labels(labels: Sequence[str | None] | Mapping[int, str] | None, k: int) -> list[str | None]:
    if labels is None:
        return [None] * k
    if isinstance(labels, Mapping):
        bad = [c for c in labels if not (isinstance(c, (int, np.integer)) and 0 <= int(c) < k)]
        if bad:
            raise DistdmError(f"cluster labels name clusters {bad[:5]} outside 0..{k - 1}")
        return [None if labels.get(i) is None else str(labels[i]) for i in range(k)]
    labels = list(labels)
    if len(labels) != k:
        raise DistdmError(f"give one label per cluster ({k}), got {len(labels)}")
    return [None if v is None else str(v) for v in labels]


def write_pack(
    path: str | os.PathLike,
    synset: Synset,
    *,
    final: State,
    cluster_class: Sequence[int],
    cluster_size: Sequence[int],
    preset: str,
    distill: DistillConfig,
    online: OnlineConfig,
    model_info: Mapping[str, Any],
    labels: Sequence[str | None] | Mapping[int, str] | None = None,
) -> Path:
    """Write a pack directory (see the module doc) from a synset and the target's final state."""
    from safetensors.torch import save as safetensors_bytes

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DistdmError(f"{out} is a file: name a directory for the pack")
    if out.is_dir() and any(p.name not in (MANIFEST, SYNSET_FILE) for p in out.iterdir()):
        raise DistdmError(f"{out} holds other files: export the pack into an empty or new directory")
    k = synset.n_clusters
    if len(cluster_class) != k or len(cluster_size) != k:
        raise DistdmError(f"cluster metadata covers {len(cluster_class)} clusters, the synset {k}")
    tensors = {name: t.detach().cpu().contiguous() for name, t in synset.to_tensors().items()}
    blob = safetensors_bytes(tensors)
    names = _cluster_labels(labels, k)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model": {**dict(model_info), "fingerprint": model_fingerprint(final)},
        "clusters": [
            {"id": i, "class": int(c), "size": int(s), "label": names[i]}
            for i, (c, s) in enumerate(zip(cluster_class, cluster_size, strict=True))
        ],
        "preset": preset,
        "distill": distill.to_dict(),
        "online": online.to_dict(),
        "synset": {
            "n_synthetic": int(synset.x.shape[0]),
            "ipc": int(synset.x.shape[0] // max(k, 1)),
            "lr": synset.lr,
            "steps": synset.steps,
            "input_min": float(synset.x.min()),
            "input_max": float(synset.x.max()),
        },
        "files": {SYNSET_FILE: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}},
    }
    manifest["checksum"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-replaced pack must not pass for a complete one
    atomic_write_bytes(out / SYNSET_FILE, blob)
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
    return out


def export_pack(
    run: Any,
    out: str | os.PathLike,
    preset: str = "default",
    *,
    distill: DistillConfig | Mapping[str, Any] | None = None,
    labels: Sequence[str | None] | Mapping[int, str] | None = None,
) -> Path:
    """Export a run's synset of `preset` (distilled now if it is not stored) as a pack at `out`."""
    ddm = run.attributor("ddm", preset=preset, distill=distill)
    task = run.task()
    recorded = run.store.config("model") or {}
    model_info = {
        "architecture": {k: recorded.get(k) for k in ("name", "spec", "kwargs")},
        "n_params": recorded.get("n_params"),
        "input_shape": list(task.data.input_shape),
        "num_classes": int(task.data.num_classes),
    }
    final = {k: v.detach().cpu() for k, v in task.final.items()}
    return write_pack(
        out, ddm.synset_, final=final, cluster_class=task.clusters.cluster_class.tolist(),
        cluster_size=task.clusters.sizes().tolist(), preset=preset, distill=ddm.distill_config_,
        online=ddm.online_, model_info=model_info, labels=labels,
    )  # fmt: skip


def _read_verified(root: Path, name: str, entry: Any) -> bytes:
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)):
        raise DistdmError(f"{root / MANIFEST} lists {name} without a checksum: the manifest was edited")
    p = root / name
    if not p.is_file():
        raise DistdmError(f"pack file {p} is missing: copy the whole pack directory")
    data = p.read_bytes()
    if len(data) != entry.get("bytes"):
        raise DistdmError(
            f"pack file {p} has {len(data)} bytes, the manifest says {entry.get('bytes')}: it was "
            f"truncated or changed; copy it again from the exporter"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DistdmError(
            f"pack file {p} does not match its SHA-256 in the manifest: it was changed or damaged"
        )
    return data


def load_pack(path: str | os.PathLike) -> Pack:
    """Read and verify a pack directory; a changed, truncated or missing file is refused by name."""
    from safetensors.torch import load as safetensors_load

    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DistdmError(f"{root} is not a synset pack (no {MANIFEST}): export one with `distdm export`")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DistdmError(
            f"pack manifest {mpath} is not valid JSON ({e}): it was changed or truncated"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DistdmError(f"{mpath} is not a {FORMAT} manifest")
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    if hashlib.sha256(_canonical(body)).hexdigest() != manifest.get("checksum"):
        raise DistdmError(f"pack manifest {mpath} does not match its checksum: it was edited or damaged")
    files = manifest.get("files")
    if not isinstance(files, dict) or SYNSET_FILE not in files:
        raise DistdmError(f"{mpath} lists no {SYNSET_FILE}")
    blob = _read_verified(root, SYNSET_FILE, files[SYNSET_FILE])
    try:
        synset = Synset.from_tensors(safetensors_load(blob), {"pack": str(root)})
    except Exception as e:  # noqa: BLE001 - a verified file that still fails to parse was written wrong
        raise DistdmError(f"pack file {root / SYNSET_FILE} is not a synset ({e})") from None
    if len(manifest["clusters"]) != synset.n_clusters:
        raise DistdmError(
            f"{mpath} describes {len(manifest['clusters'])} clusters, the synset has {synset.n_clusters}"
        )
    return Pack(root, manifest, synset)


def attribute(
    pack: Pack | str | os.PathLike,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: str = "dist1",
) -> Scores:
    """Attribute queries (x, y) to the pack's clusters with the trained target `model` (Pack.attribute)."""
    p = pack if isinstance(pack, Pack) else load_pack(pack)
    return p.attribute(model, x, y, objective)


def model_from_pack(pack: Pack, weights: str | os.PathLike, spec: str | None = None) -> nn.Module:
    """The target model for a pack: its recorded architecture (a built-in model, or `spec`
    'package.module:callable' / 'file.py:callable' for your own) with the weights of a .safetensors file."""
    from safetensors.torch import load_file

    from .models import MODELS, build_model
    from .userdata import load_model_spec, normalise_spec

    m = pack.manifest["model"]
    arch = m.get("architecture") or {}
    shape, n_out = tuple(m["input_shape"]), int(m["num_classes"]) or 1
    spec = spec or arch.get("spec")
    if spec:
        probe = TensorData(torch.zeros(2, *shape), torch.zeros(2, dtype=torch.long), torch.zeros(0, *shape),
                           torch.zeros(0, dtype=torch.long), n_out)  # fmt: skip
        model = load_model_spec(normalise_spec(spec), probe, seed=0, model_kwargs=arch.get("kwargs") or None)
    elif arch.get("name") in MODELS:
        model = build_model(arch["name"], shape, n_out, seed=0, **(arch.get("kwargs") or {}))
    else:
        raise DistdmError(
            f"the pack's model is your own nn.Module ({arch.get('name')}): give its constructor with "
            f"--arch package.module:callable (or build it in Python and load the weights)"
        )
    p = Path(weights)
    if not p.is_file() or p.suffix != ".safetensors":
        raise DistdmError(
            f"--model must be the target model's weights as a .safetensors file, got {str(p)!r}"
        )
    try:
        state = load_file(str(p))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise DistdmError(f"{p} is not a safetensors file of model weights ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DistdmError(f"the weights in {p} do not fit the pack's model architecture: {e}") from None
    return model
