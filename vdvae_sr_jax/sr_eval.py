"""The SR literature's evaluation protocols: bicubic, the model at each temperature and pixel decoding, and other
models' outputs, side by side in Markdown and CSV tables, with a labelled comparison figure per image.

'whole' super-resolves each whole HR image (cropped to a multiple of the scale) through tiles; 'thesis' first
resizes and centre-crops it to the model's size, as Chira & Haralampiev (2021) did; 'ntire' is the NTIRE 2021
"Learning the Super-Resolution Space" challenge's: images cropped to a multiple of 8, `evaluate.ntire_samples`
samples each (written under the challenge's file names), LPIPS, its diversity score and LR-PSNR mean and worst.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vdvae_sr_jax import data, evaluate, figures, image_io, metrics, perceptual
from vdvae_sr_jax.resize import bicubic_downscale, bicubic_upscale
from vdvae_sr_jax.upscale import Settings, Upscaler

COLUMNS = ("psnr_y", "ssim_y", "lpips", "lr_psnr", "lr_psnr_worst", "diversity", "pixel_std", "fid")
HEADERS = {"psnr_y": "PSNR-Y (dB)", "ssim_y": "SSIM-Y", "lpips": "LPIPS", "lr_psnr": "LR-PSNR (dB)",
           "lr_psnr_worst": "LR-PSNR worst (dB)", "diversity": "diversity", "pixel_std": "pixel std", "fid": "FID"}
# How a model row turns latents into pixels: DMoL samples or means, then optionally back-projected onto the LR input.
ROW_DECODINGS = ("sample", "mean", "sample+ibp", "mean+ibp")


def crop_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """The top-left part of an image whose sides are multiples of `multiple`, as SR benchmarks prepare HR images."""
    h, w = image.shape[0] - image.shape[0] % multiple, image.shape[1] - image.shape[1] % multiple
    return image[:h, :w]


def parse_external(spec: str) -> dict[str, Path]:
    """'EDSR=/outputs/edsr,ESRGAN=/outputs/esrgan' -> {name: folder}; each folder must exist."""
    folders = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"evaluate.external entry {item!r} is not NAME=FOLDER")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"evaluate.external: the folder of {name}, {folder}, does not exist")
        folders[name] = Path(folder)
    return folders


def external_output(folder: Path, name: str) -> Path | None:
    """Another model's output for the HR image `name`: the one image file in `folder` whose stem starts with
    the HR image's stem (0801.png matches 0801.png, 0801_x4.png or 0801x4_SR.png)."""
    stem = Path(name).stem
    matches = [p for p in sorted(folder.iterdir()) if image_io.is_image_file(p) and p.stem.startswith(stem)]
    exact = [p for p in matches if p.stem == stem]
    return (exact or matches or [None])[0]


class PerceptualMetrics:
    """LPIPS and FID where their weights are at hand; otherwise the reason each is not computed."""

    def __init__(self, config):
        self.lpips_params, self.inception, self.missing = None, None, {}
        try:
            self.lpips_params = perceptual.load_lpips("alex", config.lpips_backbone or None, config.lpips_lin or None)
        except (FileNotFoundError, ImportError) as error:
            self.missing["lpips"] = str(error)
        try:
            self.inception = perceptual.load_fid_inception(config.fid_inception or None)
        except (FileNotFoundError, ImportError) as error:
            self.missing["fid"] = f"{error} Set --config.evaluate.fid_inception to the file."
        for name, reason in self.missing.items():
            logging.warning("%s not computed: %s", name.upper(), reason)

    def lpips_maps(self, samples: np.ndarray, hr: np.ndarray) -> np.ndarray:
        """Spatial LPIPS [S, H, W] of each sample [S, H, W, 3] against the HR image, one sample at a time."""
        return np.concatenate([np.asarray(perceptual.lpips_map(self.lpips_params, s[None], hr[None]))
                               for s in samples])

    def fid(self, srs: list[np.ndarray], hrs: list[np.ndarray]) -> float:
        return perceptual.fid(self.inception, srs, hrs)


def image_metrics(samples: np.ndarray, hr: np.ndarray, lr: np.ndarray, scale: int, perc: PerceptualMetrics) -> dict:
    """Metrics of one image's SR samples [S, H, W, 3]: means over samples, the worst LR-PSNR, and with S >= 2 the
    NTIRE diversity score (from the LPIPS maps) and the per-pixel spread."""
    lr_psnrs = [metrics.lr_consistency(s, lr, scale) for s in samples]
    out = {
        "psnr_y": np.mean([metrics.psnr_y(s, hr, scale) for s in samples]),
        "ssim_y": np.mean([metrics.ssim_y(s, hr, scale) for s in samples]),
        "lr_psnr": np.mean(lr_psnrs),
        "lr_psnr_worst": np.min(lr_psnrs),
    }
    if perc.lpips_params is not None and min(hr.shape[:2]) >= 32:
        maps = perc.lpips_maps(samples, hr)
        out["lpips"] = float(maps.mean(axis=(1, 2)).mean())
        if len(samples) > 1:
            out["diversity"] = metrics.diversity_score(maps)
    if len(samples) > 1:
        out["pixel_std"] = metrics.pixel_std(samples)
    return out


def model_rows(temperatures, decodings) -> dict[str, tuple[float, str]]:
    """{row name: (temperature, decoding)}, one row per temperature and decoding, e.g. 'VDVAE-SR t=0.6 mean+ibp'."""
    for decoding in decodings:
        if decoding not in ROW_DECODINGS:
            raise ValueError(f"evaluate.decodings entry {decoding!r}: use one of {', '.join(ROW_DECODINGS)}")
    return {f"VDVAE-SR t={t:g} {decoding}": (float(t), decoding) for t in temperatures for decoding in decodings}


def _external(name: str, folder: Path, image_name: str, hr: np.ndarray) -> np.ndarray | None:
    """Another model's output for `image_name`, cropped to the HR image's size (HR images may have been cropped to
    a multiple of 8, as the challenge's measure.py crops outputs); None, with a warning, if there is none that big."""
    path = external_output(folder, image_name)
    sr = image_io.load_image(path).rgb if path is not None else None
    if sr is None or sr.shape[0] < hr.shape[0] or sr.shape[1] < hr.shape[1]:
        logging.warning("%s: no output of at least the size of %s (%s) in %s; left out of its row", name, image_name,
                        hr.shape, folder)
        return None
    return sr[: hr.shape[0], : hr.shape[1]]


def _rows(images, lrs, upscaler_for, methods, scale, perc, externals, on_output=None, on_image=None) -> dict:
    """{row name: {'metrics': [per-image dicts], 'first': [first sample per image], 'indices': [its image]}} for
    bicubic, each model row in `methods` (made by `upscaler_for(name)`) and each external folder. Image by image:
    each output is measured and handed to `on_output(row, image index, samples)` as it is made, then the first
    samples of all rows to `on_image(index, {row: first sample})`; only what FID needs is kept beyond that."""
    upscalers = {name: upscaler_for(name) for name in methods}
    table = {name: {"metrics": [], "first": [], "indices": []} for name in ["bicubic", *methods, *externals]}
    with tqdm(total=len(methods) * len(lrs), desc="evaluate", unit="image", disable=not methods) as progress:
        for i, ((image_name, hr), lr) in enumerate(zip(images, lrs)):
            firsts = {}
            for name, row in table.items():
                if name == "bicubic":
                    out = bicubic_upscale(lr, scale)
                elif name in upscalers:
                    progress.set_postfix_str(name.removeprefix("VDVAE-SR "))
                    out = upscalers[name].upscale(lr, i)
                    progress.update()
                else:
                    out = _external(name, externals[name], image_name, hr)
                if out is None:
                    continue
                samples = out if out.ndim == 4 else out[None]
                row["metrics"].append(image_metrics(samples, hr, lr, scale, perc))
                row["indices"].append(i)
                if perc.inception is not None:
                    row["first"].append(samples[0])
                if on_output is not None:
                    on_output(name, i, samples)
                firsts[name] = samples[0]
            if on_image is not None:
                on_image(i, firsts)
    return table


def summarise(table: dict, hrs: list[np.ndarray], perc: PerceptualMetrics) -> dict[str, dict]:
    """Mean of each metric per row, FID over the row's outputs, and how many images each row covers."""
    summary = {}
    for name, row in table.items():
        means = {k: float(np.mean([m[k] for m in row["metrics"]])) for k in COLUMNS if row["metrics"]
                 and all(k in m for m in row["metrics"])}
        if perc.inception is not None and len(row["first"]) >= 2:
            means["fid"] = perc.fid(row["first"], [hrs[i] for i in row["indices"]])
        summary[name] = {"n_images": len(row["metrics"]), **means}
    return summary


def write_tables(summary: dict, path_stem: Path, title: str, notes: list[str]) -> tuple[Path, Path]:
    """`summary` as a Markdown table (rows: methods; columns: metrics, '-' where not computed) and a CSV."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMNS if any(c in s for s in summary.values())] or list(COLUMNS[:1])

    def cell(value):
        return "-" if value is None else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"

    lines = [f"### {title}", "", "| method | images | " + " | ".join(HEADERS[c] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['n_images']} | " + " | ".join(cell(s.get(c)) for c in columns) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    md = path_stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    csv_path = path_stem.with_suffix(".csv")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "n_images", *COLUMNS])
        for name, s in summary.items():
            writer.writerow([name, s["n_images"], *("" if s.get(c) is None else s[c] for c in COLUMNS)])
    return md, csv_path


def write_figure(path: Path, lr: np.ndarray, columns: list[np.ndarray], labels: list[str], scale: int) -> None:
    """LR (nearest x`scale`) | each method's output | HR, as one labelled PNG row."""
    nearest = np.repeat(np.repeat(lr, scale, 0), scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    figures.save_grid(path, [np.stack([nearest, *columns])], labels=["LR", *labels])


def ntire_sample_path(folder: Path, row: str, image: int, sample: int, n_samples: int) -> Path:
    """Where a sample goes under the challenge's names: `{image:06d}_sample{k:05d}.png` (a single output:
    `{image:06d}.png`), one folder per row, so that its own scoring script can run on them."""
    stem = f"{image:06d}_sample{sample:05d}" if n_samples > 1 else f"{image:06d}"
    return folder / re.sub(r"[^A-Za-z0-9.+-]+", "_", row).strip("_") / f"{stem}.png"


def write_ntire_samples(folder: Path, row: str, image: int, samples: np.ndarray) -> None:
    """Writes one image's samples [S, H, W, 3] of a row at their `ntire_sample_path`s."""
    for k, sample in enumerate(samples):
        path = ntire_sample_path(folder, row, image, k, len(samples))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample).save(path)


def _notes(config, scale: int, protocol: str, perc: PerceptualMetrics) -> list[str]:
    cfg = config.evaluate
    n = cfg.ntire_samples if protocol == "ntire" else cfg.num_samples
    notes = [f"x{scale}; LR by MATLAB bicubic; Y channel (BT.601), {scale}-pixel border cropped; SSIM with an 11x11 "
             "Gaussian window (sigma 1.5); LR-PSNR: PSNR (RGB) of the MATLAB-bicubic downscale of each output against "
             "the LR input, mean and worst over samples, then the mean over images",
             f"model rows: {n} samples per image, metrics averaged over them; decodings: 'sample' draws each pixel "
             "from the DMoL, 'mean' takes its expected value, '+ibp' back-projects the output onto the LR input "
             f"({cfg.back_projection_steps} steps)",
             "LPIPS: AlexNet, v0.1; diversity: the NTIRE 2021 score, (min over samples of the mean LPIPS - mean over "
             "pixels of the per-pixel min over samples) / the former x 100; pixel std: the mean per-pixel standard "
             "deviation across samples (0-255)"]
    if protocol == "ntire":
        notes.append("HR images cropped to a multiple of 8 (top-left), as the challenge's measure.py")
    return notes + [f"{name.upper()} not computed: {reason}" for name, reason in perc.missing.items()]


def _prepare(protocol: str, images, model, scale: int) -> list[tuple[str, np.ndarray]]:
    if protocol == "whole":
        return [(n, crop_to_multiple(hr, scale)) for n, hr in images]
    if protocol == "ntire":
        return [(n, crop_to_multiple(hr, 8)) for n, hr in images]
    if protocol == "thesis":
        return [(n, data.center_crop(hr, model.image_size)) for n, hr in images]
    raise ValueError(f"unknown evaluate.protocols entry {protocol!r}: use 'whole', 'thesis' or 'ntire'")


def evaluate_sr(config, model, params, images: list[tuple[str, np.ndarray]], out_dir: Path) -> dict:
    """Every protocol's table and figures for uint8 HR `images`, and all of them in one table; returns the
    summaries and the table paths."""
    cfg, scale = config.evaluate, model.image_size // model.lr_image_size
    perc = PerceptualMetrics(cfg)
    externals = parse_external(cfg.external)
    base = Settings.from_config(config.upscale)
    methods = model_rows(cfg.temperatures, cfg.decodings)
    result = {"dataset": config.data.dataset, "protocols": {}}
    combined = {}
    for protocol in cfg.protocols:
        prepared = _prepare(protocol, images, model, scale)
        n_samples = cfg.ntire_samples if protocol == "ntire" else cfg.num_samples

        def upscaler_for(name, n_samples=n_samples):
            t, decoding = methods[name]
            settings = dataclasses.replace(
                base, temperature=t, num_samples=n_samples, std_map=False, decode=decoding.removesuffix("+ibp"),
                back_projection_steps=cfg.back_projection_steps if decoding.endswith("+ibp") else 0)
            return Upscaler(model, params, config.data, settings)

        lrs = [bicubic_downscale(hr[None], scale)[0] for _, hr in prepared]
        samples_dir = out_dir / "ntire_samples"
        on_output = partial(write_ntire_samples, samples_dir) if protocol == "ntire" else None

        def on_image(i, firsts, protocol=protocol, prepared=prepared, lrs=lrs):
            if cfg.figures:
                name, hr = prepared[i]
                write_figure(out_dir / "figures" / f"{protocol}_{i:03d}_{Path(name).stem}.png", lrs[i],
                             [*firsts.values(), hr], [r.removeprefix("VDVAE-SR ") for r in firsts] + ["HR"], scale)

        table = _rows(prepared, lrs, upscaler_for, methods, scale, perc, externals if protocol != "thesis" else {},
                      on_output, on_image)
        summary = summarise(table, [hr for _, hr in prepared], perc)
        stem = out_dir / f"{config.data.dataset.replace(' ', '_')}_{protocol}"
        title = f"{config.data.dataset}, {protocol} protocol ({len(prepared)} images)"
        md, csv_path = write_tables(summary, stem, title, _notes(config, scale, protocol, perc))
        result["protocols"][protocol] = {"summary": summary, "markdown": str(md), "csv": str(csv_path)}
        combined.update({f"{protocol}: {name}": row for name, row in summary.items()})
        if protocol == "ntire":
            result["protocols"][protocol]["samples"] = str(samples_dir)
    if len(cfg.protocols) > 1:
        md, csv_path = write_tables(combined, out_dir / f"{config.data.dataset.replace(' ', '_')}_all",
                                    f"{config.data.dataset}, all protocols", [])
        result["all"] = {"markdown": str(md), "csv": str(csv_path)}
    if "thesis" in cfg.protocols:
        crops = np.stack([data.center_crop(hr, model.image_size) for _, hr in images])
        batches = [crops[i : i + 16] for i in range(0, len(crops), 16)]
        result["conditional_elbo"] = evaluate.bits_per_dim(model, params, batches, config.data)
    result["not_computed"] = perc.missing
    return result
