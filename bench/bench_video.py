"""Video extraction: `fs extract --modality video` frames/s divided by a bare loop on the same clips.

Target (issue 15): >= 0.85. Both sides decode the same mp4 clips (written here with PyAV:
moving gradients with noise, libx264), keep the same uniformly sampled frames (16 per clip),
and run the same `clip-image` backbone (the same loaded model) on them. The bare loop is what
a user would write: per batch of clips, open each with PyAV, decode, convert the kept frames
to RGB, then the processor and the forward. The job is timed as a whole `run()` (planning,
content keys, decoding on worker threads ahead of the model, segment writes and atomic
publication), with the model already loaded.

On CPU the default model is a small CLIP vision tower built from a config (random weights;
speed does not depend on them). `--vit-b32` builds the ViT-B/32 architecture of
openai/clip-vit-base-patch32 instead; with `--device cuda` the GPU's utilisation is sampled
(pynvml via torch.cuda.utilization) while the job runs, to show whether decoding keeps it busy.

    python bench/bench_video.py [--clips 24] [--frames 16] [--size 224] [--device cpu|cuda] [--vit-b32]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import GPUSampler  # (also sets the offline environment and sys.path)

from featurestore import backbones
from featurestore.backbones._video import uniform_indices
from featurestore.datasets import add_dataset, read_manifest_file
from featurestore.jobs.extract import ExtractConfig, run
from featurestore.store import open_store


def write_clips(folder: Path, n: int, frames: int, size: int) -> list[Path]:
    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for c in range(n):
        path = folder / f"clip{c:03d}.mp4"
        with av.open(str(path), mode="w") as out:
            s = out.add_stream("libx264", rate=25)
            s.width = s.height = size
            s.pix_fmt = "yuv420p"
            for i in range(frames):
                base = (xx * (1 + c % 3) + yy * (1 + i % 4) + 6 * i + 17 * c) % 256
                img = np.stack([base, (base * 3 + 40 * c) % 256, (255 - base)], -1)
                img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
                for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
        paths.append(path)
    return paths


def tiny_clip(folder: Path, vit_b32: bool) -> Path:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig() if vit_b32 else CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        image_size=224, patch_size=32, projection_dim=256)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def bare_loop(bb, paths: list[Path], frames: int, batch: int) -> int:
    """Decode, keep the sampled frames, processor and forward; one batch of clips after another."""
    import av
    import torch
    from PIL import Image

    image = bb.image  # the same loaded CLIPImage the job runs
    done = 0
    for b in range(0, len(paths), batch):
        imgs = []
        for path in paths[b:b + batch]:
            with av.open(str(path)) as c:
                stream = c.streams.video[0]
                keep = uniform_indices(stream.frames, frames)
                picked = {}
                for i, f in enumerate(c.decode(stream)):
                    if i in keep and i not in picked:
                        picked[i] = Image.fromarray(f.to_ndarray(format="rgb24"))
            imgs += [picked[int(i)] for i in keep]
        pixels = image.processor(images=imgs, return_tensors="pt")["pixel_values"].to(image.device)
        with torch.inference_mode():
            image.model(pixel_values=pixels).image_embeds.float().cpu()
        done += len(imgs)
    if image.device.startswith("cuda"):
        torch.cuda.synchronize()
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--clip-frames", type=int, default=48, help="frames per generated clip (25 fps)")
    ap.add_argument("--frames", type=int, default=16, help="frames sampled per clip")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vit-b32", action="store_true", help="the ViT-B/32 architecture (default: a small tower)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for both sides (0: the bare loop uses all cores, the job its own split)")
    ap.add_argument("--param", action="append", default=[], help="extra backbone parameter key=value for the job")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "clips").mkdir()
        paths = write_clips(tmp / "clips", args.clips, args.clip_frames, args.size)
        (tmp / "m.csv").write_text("id,split,video\n" + "".join(f"{p.stem},train,clips/{p.name}\n" for p in paths))
        model = tiny_clip(tmp / "model", args.vit_b32)
        params = {"model": str(model), "frames": str(args.frames), **dict(p.split("=", 1) for p in args.param)}
        bb = backbones.create("clip-image", params, device=args.device, modality="video").load()
        if args.threads:  # both sides on this many threads
            bb.cpu_threads = args.threads
        bare_loop(bb, paths[:2], args.frames, args.batch_size)  # warm up
        ratios, bares, jobs = [], [], []
        for r in range(args.repeat):
            torch.set_num_threads(args.threads or os.cpu_count() or 1)  # the bare loop: torch's usual threads
            t = time.perf_counter()
            n = bare_loop(bb, paths, args.frames, args.batch_size)
            bare = n / (time.perf_counter() - t)
            store = open_store(tmp / f"store{r}", create=True)
            add_dataset(store, "bench", read_manifest_file(tmp / "m.csv"), root=tmp, source="bench")
            with GPUSampler(bb.device) as gpu:
                t = time.perf_counter()
                res = run(ExtractConfig(dataset="bench", modality="video", backbone="clip-image", params=params,
                                        batch_size=args.batch_size, device=args.device), store, backbone=bb)
                elapsed = time.perf_counter() - t
            assert res.computed == len(paths) and res.failed_new == 0, res
            job = res.computed * args.frames / elapsed
            ratios.append(job / bare)
            bares.append(bare)
            jobs.append(job)
            util = f"   GPU utilisation {gpu.mean:.0f}%" if gpu.mean is not None else ""
            print(f"run {r}: bare loop {bare:7.1f} frames/s   fs extract --modality video {job:7.1f} frames/s   "
                  f"ratio {ratios[-1]:.3f}   (model = {res.model_seconds / elapsed:.2f} of the run){util}")
    arch = "ViT-B/32" if args.vit_b32 else "small CLIP vision tower"
    print(f"video extraction ratio: median {float(np.median(ratios)):.3f}, best vs best {max(jobs) / max(bares):.3f} "
          f"(target >= 0.85; {args.clips} clips of {args.clip_frames} frames at {args.size}x{args.size}, "
          f"{args.frames} sampled per clip, clip-image ({arch}), {args.device}, batch {args.batch_size} clips)")


if __name__ == "__main__":
    main()
