#!/usr/bin/env python
"""The main job (`make demo`): builds every backbone, runs it at classification and detection
sizes (odd sizes included), round-trips a checkpoint through the converter, and reports CPU
latency. Writes ``outputs/demo/backbones.md``.

Detection / segmentation training, export and the full latency report join this demo as their
issues land.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmeformer.checkpoint import load_pretrained
from mmeformer.models import EfficientFormer, EfficientFormerV2, EfficientViT

VARIANTS = [(EfficientFormer, a) for a in ('l1', 'l3', 'l7')] + \
           [(EfficientFormerV2, a) for a in ('s0', 's1', 's2', 'l')] + \
           [(EfficientViT, f'm{i}') for i in range(6)]


def median_ms(model, x, repeats):
    with torch.inference_mode():
        model(x)  # warm-up (also fills the bias caches)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='outputs/demo')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for cls, arch in VARIANTS:
        model = cls(arch=arch).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with torch.inference_mode():
            odd = model(torch.randn(1, 3, 225, 331))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / 'ckpt.pth'
            torch.save(model.state_dict(), path)
            report = load_pretrained(cls(arch=arch), str(path), logger='silent')
        ms_224 = median_ms(model, torch.randn(1, 3, 224, 224), args.repeats)
        ms_det = median_ms(model, torch.randn(1, 3, 800, 1344), args.repeats)
        shapes = ' '.join('x'.join(map(str, o.shape[1:])) for o in odd)
        rows.append((f'{cls.__name__}-{arch}', f'{params:.2f}', shapes,
                     f'{len(report.missing)}/{len(report.unused)}', f'{ms_224:.1f}',
                     f'{ms_det:.1f}'))
        print(f'{rows[-1][0]:22s} params {rows[-1][1]:>6s} M | 225x331 -> {shapes} | '
              f'reload missing/unused {rows[-1][3]} | {ms_224:7.1f} ms @224 | '
              f'{ms_det:7.1f} ms @800x1344', flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = ('| backbone | params (M, no head) | levels at 225x331 (C x H x W) | reload '
              'missing/unused | ms @224 | ms @800x1344 |\n|---|---|---|---|---|---|\n')
    table = header + ''.join('| ' + ' | '.join(r) + ' |\n' for r in rows)
    note = (f'\nCPU, {args.threads} threads, batch 1, fp32, eval, random weights, median of '
            f'{args.repeats} after one warm-up; `python tools/demo.py`.\n')
    (out / 'backbones.md').write_text(table + note)
    print(f'\nwrote {out / "backbones.md"}')


if __name__ == '__main__':
    main()
