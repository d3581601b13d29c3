"""Train the BCI profile for a fixed number of iterations per stage and report speed and memory, AMP off and on.

Made for a CUDA machine (``scripts/gpu_smoke.sh`` runs it there): it writes a synthetic dataset in the BCI layout
with BCI's file format (1024x1024 JPEG bytes under ``.png`` names: demo renders upsampled), then runs the bundle's
three stages -- branch selector, CM-GAN, classifier -- from ``bundle/configs/train.json`` with ``--dataset_dir``
(so the ``bci`` profile: 512 px, 256 px GAN crops, ResNet50 + EfficientNet-B0) for ``--iterations`` training steps
each, once with mixed precision off and once on. For each stage it reports

* samples/s and images/s over the timed iterations (the first ``--warmup`` are not timed; validation is not timed):
  a selector sample is one image, a CM-GAN sample a pair (both directions train on it: 2 images), a classifier
  sample a pair (2 images);
* peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each stage); on a CPU the process's peak
  resident memory so far instead.

Usage::

    bash scripts/gpu_smoke.sh                                       # CUDA, 300 iterations, AMP off and on
    python benchmarks/bci_profile_speed.py --device cpu --iterations 5
    python benchmarks/bci_profile_speed.py --device cpu --iterations 2 --amp off --set image_size=64 gan_crop_size=32

``--set key=value`` overrides any knob of ``train.json`` (values are read as JSON when they parse, e.g. numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
#: stage -> (trainer id, config key of its batch size or None for the data plan, images per sample)
STAGES = {"selector": ("selector#trainer", "selector_batch_size", 1), "gan": ("gan#trainer", "gan", 2),
          "classifier": ("train#trainer", "classifier", 2)}  # fmt: skip


def write_bci_like_dataset(root: Path, per_class: int, test_per_class: int = 1, size: int = 1024) -> Path:
    """BCI layout with BCI's file format: ``{HE,IHC}/{train,test}/NNNNN_{split}_{score}.png`` holding JPEG bytes.

    Args:
        root: destination (replaced).
        per_class: training pairs per class.
        test_per_class: test pairs per class.
        size: side length of the written images.

    Returns:
        ``root``.
    """
    from her2_monai.constants import CLASS_NAMES
    from her2_monai.data.demo import DemoPairGenerator

    shutil.rmtree(root, ignore_errors=True)
    generator = DemoPairGenerator(image_size=256)
    index = 0
    for split, count in (("train", per_class), ("test", test_per_class)):
        for stain in ("HE", "IHC"):
            (root / stain / split).mkdir(parents=True, exist_ok=True)
        for label, score in enumerate(CLASS_NAMES):
            for _ in range(count):
                index += 1
                for stain, pixels in zip(("HE", "IHC"), generator.render(label, seed=index)):
                    big = Image.fromarray(pixels).resize((size, size), Image.BICUBIC)
                    big.save(root / stain / split / f"{index:05d}_{split}_{score}.png", format="JPEG", quality=90)
    return root


class IterationClock:
    """Timestamps of every training iteration of an ignite engine after ``warmup`` (ITERATION_COMPLETED)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED(once=self.warmup + 1), self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._tick)

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _start(self, engine) -> None:
        self._sync()
        self.times = [time.perf_counter()]

    def _tick(self, engine) -> None:
        if engine.state.iteration > self.warmup:
            self._sync()
            self.times.append(time.perf_counter())

    @property
    def timed_iterations(self) -> int:
        return max(0, len(self.times) - 1)

    @property
    def seconds(self) -> float:
        return self.times[-1] - self.times[0] if len(self.times) > 1 else float("nan")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def run_profile(dataset: Path, work: Path, device: str, amp: bool, iterations: int, warmup: int, sets: dict) -> dict:
    """Train the three stages of the BCI profile for ``iterations`` steps each; return speed and memory per stage."""
    from monai.bundle import ConfigParser

    bundle = work / f"bundle-amp-{'on' if amp else 'off'}"
    shutil.rmtree(bundle, ignore_errors=True)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(
        {
            "dataset_dir": str(dataset),
            "bundle_root": str(bundle),
            "device": f"$torch.device('{device}')",
            "amp": amp,
            "channels_last": device.startswith("cuda") or amp,
            "tracker": "none",
            "selector_epochs": 1,
            "selector_steps_per_epoch": iterations,
            "gan_epochs": 1,
            "cls_epochs": 1,
            "early_stop_patience": 0,  # one timed epoch: nothing to stop early
            "gan#trainer#epoch_length": iterations,
            "train#trainer#epoch_length": iterations,
            **sets,
        }
    )
    parser.get_parsed_content("initialize")
    plan = parser.get_parsed_content("data_plan").check(["gan", "classifier"])
    parser.get_parsed_content("pretrained").fetch()
    torch_device = torch.device(device)
    results = {}
    for stage, (trainer_id, batch_key, images_per_sample) in STAGES.items():
        trainer = parser.get_parsed_content(trainer_id)
        batch = plan.batch_size(batch_key) if stage != "selector" else int(parser.get_parsed_content(batch_key))
        clock = IterationClock(warmup)
        clock.attach(trainer)
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(torch_device)
        trainer.run()
        samples = clock.timed_iterations * batch
        results[stage] = {
            "batch_size": batch,
            "timed_iterations": clock.timed_iterations,
            "samples_per_s": samples / clock.seconds,
            "images_per_s": samples * images_per_sample / clock.seconds,
            "peak_memory_mb": _peak_memory_mb(torch_device),
        }
    return results


def _parse_sets(items: list[str]) -> dict:
    sets = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got '{item}'")
        try:
            sets[key] = json.loads(value)
        except json.JSONDecodeError:
            sets[key] = value
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=300, help="training iterations per stage")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first iterations (default: 10%%, >= 1)")
    parser.add_argument("--amp", choices=("both", "off", "on"), default="both")
    parser.add_argument("--pairs_per_class", type=int, default=4, help="synthetic 1024 px training pairs per class")
    parser.add_argument("--work", type=Path, default=Path("bci_speed_work"), help="folder for data and weights")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.json overrides")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.iterations < 2:
        raise SystemExit("--iterations must be at least 2 (one untimed warm-up, one timed)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    warmup = args.warmup if args.warmup is not None else max(1, args.iterations // 10)
    warmup = min(warmup, args.iterations - 1)
    sets = _parse_sets(args.set)

    work = args.work.resolve()
    dataset = write_bci_like_dataset(work / "bci_like", args.pairs_per_class)
    print(f"synthetic BCI-layout data (1024 px JPEG under .png): {dataset}", flush=True)
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}", flush=True)
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.1f}", flush=True)

    report = {"device": args.device, "iterations": args.iterations, "warmup": warmup, "overrides": sets, "runs": {}}
    for amp in {"both": (False, True), "off": (False,), "on": (True,)}[args.amp]:
        name = f"amp {'on' if amp else 'off'}"
        report["runs"][name] = run_profile(dataset, work, args.device, amp, args.iterations, warmup, sets)
    memory = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(f"\n{'run':<8} {'stage':<11} {'batch':>5} {'timed it':>8} {'samples/s':>10} {'images/s':>9} {memory:>12}")
    for name, stages in report["runs"].items():
        for stage, row in stages.items():
            print(
                f"{name:<8} {stage:<11} {row['batch_size']:>5} {row['timed_iterations']:>8} "
                f"{row['samples_per_s']:>10.2f} {row['images_per_s']:>9.2f} {row['peak_memory_mb']:>12.0f}"
            )
    if {"amp off", "amp on"} <= set(report["runs"]):
        for stage in STAGES:
            off, on = report["runs"]["amp off"][stage], report["runs"]["amp on"][stage]
            print(f"AMP speed-up, {stage}: {on['samples_per_s'] / off['samples_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
