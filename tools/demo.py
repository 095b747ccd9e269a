#!/usr/bin/env python
"""The main job (`make demo`), on a fresh machine with no data and no downloads:

1. every backbone at an odd input size, with a checkpoint round trip;
2. generate the toy COCO / ADE20K data;
3. train the toy Mask R-CNN with EfficientFormer-L1 and evaluate it (real CocoMetric);
4. export the trained backbone to ONNX (dynamic size) with the ONNX Runtime parity check;
5. the quick latency report with its plot;
6. the trained detector's predictions drawn on a toy validation image (tools/infer.py, mmdet's
   DetInferencer);
7. the trained detector evaluated again with its backbone deployed in LiteRT (the fastest
   float32 runtime of the benchmarks on 2-core CPUs; tools/test.py --backbone-runtime), the
   metrics side by side with PyTorch's.

Each step runs the project's own tool, printed before it runs, so it can be repeated by hand.
Artefacts go under outputs/demo/.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmeformer.checkpoint import load_pretrained
from mmeformer.models import arch_names, create_backbone

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = 'configs/detection/toy/maskrcnn_eformer_l1.py'
DEPLOY_RUNTIME = 'litert'


def run(step: str, args, log_dir: Path):
    command = [sys.executable] + [str(a) for a in args]
    print(f'\n=== {step}\n$ {" ".join(command[1:])}', flush=True)
    start = time.time()
    log_path = log_dir / (step.split(':')[0].replace(' ', '_') + '.log')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
        proc.wait()
    if proc.returncode != 0:
        print('\n'.join(tail))
        raise SystemExit(f'{step} failed (exit {proc.returncode}); full log: {log_path}')
    print(f'({time.time() - start:.0f} s; log: {log_path.relative_to(REPO)})')
    return tail


def check_backbones():
    print('\n=== 1: every backbone at 225x331 (odd, non-square), checkpoint round trip')
    for name in arch_names():
        model = create_backbone(name).eval()
        with torch.inference_mode():
            outs = model(torch.randn(1, 3, 225, 331))
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(model.state_dict(), Path(tmp) / 'ckpt.pth')
            report = load_pretrained(create_backbone(name), str(Path(tmp) / 'ckpt.pth'),
                                     logger='silent')
        shapes = ' '.join('x'.join(map(str, o.shape[1:])) for o in outs)
        print(f'{name:22s} levels {shapes:42s} reload missing/unused '
              f'{len(report.missing)}/{len(report.unused)}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='outputs/demo')
    args = parser.parse_args()
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    check_backbones()
    run('2: toy data', ['tools/make_toy_data.py', '--out', 'data/toy'], out)
    work_dir = out / 'maskrcnn_eformer_l1_toy'
    run('3a: train toy Mask R-CNN + EfficientFormer-L1',
        # Seeded, so that a rerun prints the numbers quoted in the README.
        ['tools/train.py', TOY_CONFIG, '--work-dir', work_dir,
         '--cfg-options', 'randomness.seed=0'], out)
    checkpoint = (work_dir / 'last_checkpoint').read_text().strip()
    tail = run('3b: evaluate it', ['tools/test.py', TOY_CONFIG, checkpoint, '--work-dir',
                                   work_dir / 'test'], out)
    print('\n'.join(line for line in tail if 'coco/' in line or 'mAP' in line))
    onnx_path = out / 'efficientformer_l1_toy.onnx'
    print('\n'.join(run('4: ONNX export with parity check',
                        ['tools/export.py', 'efficientformer_l1', '--checkpoint', checkpoint,
                         '--dynamic', '--shape', '320', '320', '--out', onnx_path], out)[-4:]))
    run('5: quick latency report', ['tools/benchmark.py', '--quick', '--out',
                                    out / 'benchmark'], out)
    image = sorted((REPO / 'data' / 'toy' / 'coco' / 'val2017').iterdir())[0]
    print('\n'.join(run('6: predictions drawn by mmdet\'s DetInferencer',
                        ['tools/infer.py', TOY_CONFIG, checkpoint, image.relative_to(REPO),
                         '--out', out / 'infer'], out)[-2:]))
    tail = run(f'7: the backbone deployed in {DEPLOY_RUNTIME}, evaluated inside the detector',
               ['tools/test.py', TOY_CONFIG, checkpoint, '--work-dir', work_dir / 'deployed',
                '--backbone-runtime', DEPLOY_RUNTIME], out)
    print('\n'.join(line for line in tail if line.startswith(('metric ', 'coco/'))))
    print(f'\nArtefacts:\n  toy data:        data/toy/\n  training run:    {work_dir}\n'
          f'  checkpoint:      {checkpoint}\n  ONNX backbone:   {onnx_path}\n'
          f'  deployed:        {work_dir / "deployed" / "deployed_backbone"}/ (one file per '
          f'input size)\n'
          f'  latency report:  {out / "benchmark"}/latency.{{md,csv,json,png}}\n'
          f'  predictions:     {out / "infer" / "vis" / image.name} (drawn), '
          f'{out / "infer" / "preds"}/\n'
          f'  step logs:       {out}/*.log')


if __name__ == '__main__':
    main()
