"""The SR literature's evaluation protocol: bicubic, the model at each temperature and other models' outputs,
side by side in Markdown and CSV tables, with a comparison figure per image.

Two protocols: 'whole' super-resolves each whole HR image (cropped to a multiple of the scale) through tiles;
'thesis' first resizes and centre-crops it to the model's size, as Chira & Haralampiev (2021) did.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from vdvae_sr_jax import data, evaluate, image_io, metrics, perceptual
from vdvae_sr_jax.resize import bicubic_downscale, bicubic_upscale
from vdvae_sr_jax.upscale import Settings, Upscaler

COLUMNS = ("psnr_y", "ssim_y", "lpips", "lr_psnr", "pixel_std", "fid")
HEADERS = {"psnr_y": "PSNR-Y (dB)", "ssim_y": "SSIM-Y", "lpips": "LPIPS", "lr_psnr": "LR-PSNR (dB)",
           "pixel_std": "pixel std", "fid": "FID"}


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """The top-left part of an image whose sides are multiples of `scale`, as SR benchmarks prepare HR images."""
    h, w = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
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
            self.lpips_params = perceptual.load_lpips(config.lpips_backbone or None, config.lpips_lin or None)
        except (FileNotFoundError, ImportError) as error:
            self.missing["lpips"] = f"{error} Set --config.evaluate.lpips_backbone / lpips_lin to the files."
        try:
            self.inception = perceptual.load_fid_inception(config.fid_inception or None)
        except (FileNotFoundError, ImportError) as error:
            self.missing["fid"] = f"{error} Set --config.evaluate.fid_inception to the file."
        for name, reason in self.missing.items():
            logging.warning("%s not computed: %s", name.upper(), reason)

    def lpips(self, sr: np.ndarray, hr: np.ndarray) -> float:
        return float(perceptual.lpips(self.lpips_params, sr[None], hr[None])[0])

    def fid(self, srs: list[np.ndarray], hrs: list[np.ndarray]) -> float:
        return perceptual.fid(self.inception, srs, hrs)


def image_metrics(samples: np.ndarray, hr: np.ndarray, lr: np.ndarray, scale: int, perc: PerceptualMetrics) -> dict:
    """Metrics of one image's SR samples [S, H, W, 3], averaged over samples; their spread when S >= 2."""
    out = {
        "psnr_y": np.mean([metrics.psnr_y(s, hr, scale) for s in samples]),
        "ssim_y": np.mean([metrics.ssim_y(s, hr, scale) for s in samples]),
        "lr_psnr": np.mean([metrics.lr_consistency(s, lr, scale) for s in samples]),
    }
    if perc.lpips_params is not None and min(hr.shape[:2]) >= 31:
        out["lpips"] = np.mean([perc.lpips(s, hr) for s in samples])
    if len(samples) > 1:
        out["pixel_std"] = metrics.pixel_std(samples)
    return out


def _rows(images, lrs, upscaler_for, temperatures, scale, perc, externals) -> dict[str, dict]:
    """{row name: {'metrics': [per-image dicts], 'first': [first sample per image]}} for every method."""
    rows = {"bicubic": [bicubic_upscale(lr, scale) for lr in lrs]}
    for t in temperatures:
        upscaler = upscaler_for(t)
        rows[f"VDVAE-SR t={t:g}"] = [upscaler.upscale(lr, i) for i, lr in enumerate(lrs)]
    for name, folder in externals.items():
        outputs = []
        for (image_name, hr) in images:
            path = external_output(folder, image_name)
            sr = image_io.load_image(path).rgb if path is not None else None
            if sr is None or sr.shape != hr.shape:
                logging.warning("%s: no output of the size of %s (%s) in %s; left out of its row", name, image_name,
                                hr.shape, folder)
                sr = None
            outputs.append(sr)
        rows[name] = outputs
    table = {}
    for name, outputs in rows.items():
        per_image, first = [], []
        for (_, hr), lr, out in zip(images, lrs, outputs):
            if out is None:
                continue
            samples = out if out.ndim == 4 else out[None]
            per_image.append(image_metrics(samples, hr, lr, scale, perc))
            first.append(samples[0])
        table[name] = {"metrics": per_image, "first": first, "outputs": outputs}
    return table


def summarise(table: dict, hrs: list[np.ndarray], perc: PerceptualMetrics) -> dict[str, dict]:
    """Mean of each metric per row, FID over the row's outputs, and how many images each row covers."""
    summary = {}
    for name, row in table.items():
        means = {k: float(np.mean([m[k] for m in row["metrics"]])) for k in COLUMNS if row["metrics"]
                 and all(k in m for m in row["metrics"])}
        if perc.inception is not None and len(row["first"]) >= 2:
            kept = [hr for hr, out in zip(hrs, row["outputs"]) if out is not None]
            means["fid"] = perc.fid(row["first"], kept)
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


def write_figure(path: Path, lr: np.ndarray, columns: list[np.ndarray], scale: int) -> None:
    """LR (nearest x`scale`) | each method's output | HR, as one PNG row."""
    nearest = np.repeat(np.repeat(lr, scale, 0), scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    evaluate.save_grid(path, [np.stack([nearest, *columns])])


def evaluate_sr(config, model, params, images: list[tuple[str, np.ndarray]], out_dir: Path) -> dict:
    """Both protocols' tables and figures for uint8 HR `images`; returns the summaries and the table paths."""
    cfg, scale = config.evaluate, model.image_size // model.lr_image_size
    perc = PerceptualMetrics(cfg)
    externals = parse_external(cfg.external)
    base = Settings.from_config(config.upscale)

    def upscaler_for(t):
        return Upscaler(model, params, config.data, Settings(t, cfg.num_samples, base.seed, base.overlap,
                                                             base.batch_per_device))

    notes = [f"x{scale}; LR by MATLAB bicubic; Y channel (BT.601), {scale}-pixel border cropped; SSIM with an 11x11 "
             "Gaussian window (sigma 1.5); LR-PSNR: PSNR of the bicubic downscale of the output against the LR input",
             f"model rows: the mean over {cfg.num_samples} samples per image; pixel std: the mean per-pixel "
             "standard deviation across them (0-255)"]
    notes += [f"{name.upper()} not computed: {reason}" for name, reason in perc.missing.items()]
    result = {"dataset": config.data.dataset, "protocols": {}}
    for protocol in cfg.protocols:
        if protocol == "whole":
            prepared = [(n, mod_crop(hr, scale)) for n, hr in images]
            ext = externals
        elif protocol == "thesis":
            prepared = [(n, data.center_crop(hr, model.image_size)) for n, hr in images]
            ext = {}
        else:
            raise ValueError(f"unknown evaluate.protocols entry {protocol!r}: use 'whole' or 'thesis'")
        lrs = [bicubic_downscale(hr[None], scale)[0] for _, hr in prepared]
        table = _rows(prepared, lrs, upscaler_for, cfg.temperatures, scale, perc, ext)
        summary = summarise(table, [hr for _, hr in prepared], perc)
        stem = out_dir / f"{config.data.dataset.replace(' ', '_')}_{protocol}"
        title = f"{config.data.dataset}, {protocol} protocol ({len(prepared)} images)"
        md, csv_path = write_tables(summary, stem, title, notes)
        if cfg.figures:
            for i, ((name, hr), lr) in enumerate(zip(prepared, lrs)):
                outputs = [row["outputs"][i] for row in table.values()]
                columns = [o if o.ndim == 3 else o[0] for o in outputs if o is not None]
                write_figure(out_dir / "figures" / f"{protocol}_{i:03d}_{Path(name).stem}.png", lr, columns + [hr],
                             scale)
        result["protocols"][protocol] = {"summary": summary, "markdown": str(md), "csv": str(csv_path)}
    if "thesis" in cfg.protocols:
        crops = np.stack([data.center_crop(hr, model.image_size) for _, hr in images])
        batches = [crops[i : i + 16] for i in range(0, len(crops), 16)]
        result["conditional_elbo"] = evaluate.bits_per_dim(model, params, batches, config.data)
    result["not_computed"] = perc.missing
    return result
