"""Built-in models (MLP, logistic regression, ConvNet, AlexNet-IN, ResNet-18-AP, simple ViT) by name.

All use instance norm (GroupNorm with one group per channel) rather than batch norm, so that every
built-in model has no running buffers and can be trained many-at-once with torch.func.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .errors import DistdmError


def _flat_dim(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def _instance_norm(c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True)


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, hidden: tuple[int, ...] = (128,)):
        super().__init__()
        dims = [_flat_dim(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or regression outputs) for a batch."""
        return self.head(self.body(x))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression (one linear layer) on flattened inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        self.head = nn.Linear(_flat_dim(input_shape), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch."""
        return self.head(x.flatten(1))


class ConvNet(nn.Module):
    """The dataset-condensation ConvNet: depth x (conv3x3, instance norm, ReLU, 2x2 avg-pool), linear."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_outputs: int,
        width: int = 16,
        depth: int = 3,
        norm: bool = True,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise DistdmError(f"ConvNet needs (channels, height, width) inputs, got {input_shape}")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1)]
            layers += [_instance_norm(width)] if norm else []
            layers += [nn.ReLU(), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise DistdmError(f"ConvNet depth {depth} is too deep for inputs of size {input_shape}")
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(width * h * w, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch."""
        return self.head(self.body(x))


class AlexNetIN(nn.Module):
    """AlexNet as used in dataset condensation, with instance norm; `width` scales the channels."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, width: int = 32):
        super().__init__()
        c, h, w = input_shape
        w1, w2, w3 = width, width * 3 // 2, width * 2
        self.body = nn.Sequential(
            nn.Conv2d(c, w1, 5, padding=2), _instance_norm(w1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 5, padding=2), _instance_norm(w2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1), _instance_norm(w3), nn.ReLU(),
            nn.Conv2d(w3, w2, 3, padding=1), _instance_norm(w2), nn.ReLU(),
            nn.Conv2d(w2, w2, 3, padding=1), _instance_norm(w2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(w2 * 4, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch."""
        return self.head(self.body(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _instance_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _instance_norm(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _instance_norm(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(out)) + self.skip(x))


class ResNet18AP(nn.Module):
    """ResNet-18 (2-2-2-2 basic blocks) with instance norm and average pooling; `width` = base channels."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, width: int = 64):
        super().__init__()
        side = min(input_shape[1:]) if len(input_shape) == 3 else 0
        for _ in range(3):  # the three stride-2 stages (kernel 3, padding 1)
            side = (side - 1) // 2 + 1
        if side < 2:
            # a 1x1 final map is set to zero by instance norm: every input would give the same output
            raise DistdmError(
                f"ResNet-18-AP needs (channels, height, width) inputs of side >= 9, got {input_shape}"
            )
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, 1, 1, bias=False), _instance_norm(width), nn.ReLU())
        blocks, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            for j in range(2):
                blocks.append(_Block(cin, width * mult, 2 if (i > 0 and j == 0) else 1))
                cin = width * mult
        self.blocks = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch."""
        return self.head(self.blocks(self.stem(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, d))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SimpleViT(nn.Module):
    """A small vision transformer: patch embedding, learned positions, pre-norm blocks, mean pooling."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_outputs: int,
        patch: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise DistdmError(f"SimpleViT: patch {patch} must divide the image size {h}x{w}")
        self.embed = nn.Conv2d(c, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch), dim) * 0.02)
        self.blocks = nn.Sequential(*[_TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch."""
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "logreg": LogisticRegression,
    "convnet": ConvNet,
    "alexnet-in": AlexNetIN,
    "resnet18-ap": ResNet18AP,
    "vit": SimpleViT,
}

_IMAGE_MODELS = ("convnet", "alexnet-in", "resnet18-ap", "vit")
INITS = ("default", "kaiming", "normal", "xavier")


def _reinit(model: nn.Module, init: str) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if init == "kaiming":
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            elif init == "normal":
                nn.init.normal_(m.weight, std=0.02)
            elif init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None and init != "default":
                nn.init.zeros_(m.bias)


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    seed: int = 0,
    init: str = "default",
    **kwargs: object,
) -> nn.Module:
    """A built-in model by name, initialised deterministically from `seed`."""
    if name not in MODELS:
        raise DistdmError(f"unknown model {name!r}; built-in: {sorted(MODELS)}")
    if init not in INITS:
        raise DistdmError(f"unknown init {init!r}; one of {list(INITS)}")
    image_shape = tuple(input_shape)
    if name in _IMAGE_MODELS and len(input_shape) == 1:
        side = int(math.isqrt(input_shape[0]))
        if side * side != input_shape[0]:
            raise DistdmError(f"{name} needs image inputs; {input_shape} is not a square image")
        image_shape = (1, side, side)
    if not isinstance(num_outputs, int) or isinstance(num_outputs, bool) or num_outputs < 1:
        raise DistdmError(f"num_outputs must be an integer >= 1, got {num_outputs!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = MODELS[name](image_shape, num_outputs, **kwargs)
        except (TypeError, ValueError, RuntimeError) as e:  # unknown or nonsense model settings
            raise DistdmError(f"cannot build model {name!r} with settings {kwargs}: {e}") from e
        _reinit(model, init)
    if image_shape != tuple(input_shape):
        # flat square inputs (e.g. digits' 64 features) are viewed as one-channel images
        model = nn.Sequential(nn.Unflatten(1, image_shape), model)
    return model


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear layer (its classifier head); its input is the penultimate feature."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DistdmError("the model has no nn.Linear layer: pass a feature function for clustering")
    return linears[-1]
