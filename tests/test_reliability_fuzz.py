"""Fuzz: random input sizes (below 32, odd, very elongated), dtypes, batch sizes, channel
counts, train / eval and autocast for every arch of the three families. Each case must give the
correct output (one level per ``out_indices`` entry, ``ceil(H / stride) x ceil(W / stride)``,
``out_channels`` channels, finite values) or one of the documented ``ValueError``s that applies
to it; any other outcome fails.

The expected outcome is derived here from the input alone, independently of the checks in
``MobileBackbone._check_input``. Cases are drawn once from a fixed seed."""
import math
import random
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from conftest import ALL_ARCHS, backbone_class

STRIDES = {'EfficientFormer': [4, 8, 16, 32], 'EfficientFormerV2': [4, 8, 16, 32],
           'EfficientViT': [16, 32, 64]}
CHANNELS = {
    'l1': [48, 96, 224, 448], 'l3': [64, 128, 320, 512], 'l7': [96, 192, 384, 768],
    's0': [32, 48, 96, 176], 's1': [32, 48, 120, 224], 's2': [32, 64, 144, 288],
    'l': [40, 80, 192, 384], 'm0': [64, 128, 192], 'm1': [128, 144, 192],
    'm2': [128, 192, 224], 'm3': [128, 240, 320], 'm4': [128, 256, 384], 'm5': [192, 288, 384]}
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.uint8, torch.int64)
SIDES = [8, 31, 32, 33, 37, 45, 63, 64, 65, 97, 129]
ELONGATED = [(33, 300), (300, 33), (32, 257), (41, 211)]

# The documented errors, as (condition name, message pattern).
ERRORS = {
    'channels': r'expects 3 input channels, got \d+',
    'size': r'needs inputs of at least 32x32 pixels',
    'integer': r'expects a floating-point input',
    'dtype': r'has torch\.float32 weights but got a torch\.\w+ input',
    'single_image_bn': r'cannot take a batch of one \d+x\d+ image: its stride-\d+ feature map is '
                       r'1x1',
}


@dataclass
class Case:
    family: str
    arch: str
    batch: int
    channels: int
    height: int
    width: int
    dtype: torch.dtype
    autocast: Optional[torch.dtype]
    train: bool

    def __str__(self):
        cast = f'-autocast_{str(self.autocast)[6:]}' if self.autocast else ''
        return (f'{self.arch}-{self.batch}x{self.channels}x{self.height}x{self.width}-'
                f'{str(self.dtype)[6:]}{cast}-{"train" if self.train else "eval"}')

    def expected_errors(self):
        """The documented errors that apply; empty when the output must be correct."""
        errors = []
        if self.channels != 3:
            errors.append('channels')
        if min(self.height, self.width) < 32:
            errors.append('size')
        if self.dtype in INTS:
            errors.append('integer')
        elif self.dtype != torch.float32 and (self.autocast is None
                                              or self.dtype == torch.float64):
            errors.append('dtype')  # float32 weights; autocast casts all but float64
        # In training, BatchNorm needs 2+ values per channel: one image whose coarsest map
        # (stride 32; EfficientViT 64) is 1x1 cannot be normalised.
        coarsest = STRIDES[self.family][-1]
        if self.train and self.batch == 1 and (math.ceil(self.height / coarsest) *
                                               math.ceil(self.width / coarsest)) == 1:
            errors.append('single_image_bn')
        return errors


def _draw_cases(seed=0, per_arch=3):
    rng = random.Random(seed)
    cases = []
    for index, (family, arch) in enumerate(ALL_ARCHS):
        for k in range(per_arch):
            if k == 0:
                height, width = ELONGATED[index % len(ELONGATED)]
            else:
                height, width = rng.choice(SIDES), rng.choice(SIDES)
            roll = rng.random()
            dtype = (torch.float32 if roll < 0.45 else
                     rng.choice(FLOATS[1:]) if roll < 0.85 else rng.choice(INTS))
            autocast = None
            if dtype in (torch.float32, torch.float16, torch.bfloat16) and rng.random() < 0.5:
                autocast = rng.choice([torch.float16, torch.bfloat16])
            elif dtype == torch.float64 and rng.random() < 0.3:
                autocast = torch.bfloat16
            cases.append(Case(family, arch, batch=rng.randint(1, 3),
                              channels=3 if rng.random() < 0.9 else rng.choice([1, 4]),
                              height=height, width=width, dtype=dtype, autocast=autocast,
                              train=rng.random() < 0.3))
    return cases


# Edge cases of training with a single image, next to the drawn ones.
EDGE_CASES = [
    Case('EfficientViT', 'm0', 1, 3, 64, 64, torch.float32, None, True),  # stride 64: 1x1
    Case('EfficientFormer', 'l1', 1, 3, 32, 32, torch.float32, torch.bfloat16, True),
    Case('EfficientFormerV2', 's1', 1, 3, 32, 48, torch.float32, None, True),  # 1x2: fine
]
CASES = sorted(_draw_cases() + EDGE_CASES, key=lambda c: ALL_ARCHS.index((c.family, c.arch)))


def test_the_draw_covers_every_kind_of_input():
    alone = {c.expected_errors()[0] for c in CASES if len(c.expected_errors()) == 1}
    assert alone == set(ERRORS), alone  # each documented error is tested on its own
    assert sum(not c.expected_errors() for c in CASES) >= len(CASES) // 3  # many valid ones
    assert {c.dtype for c in CASES} == set(FLOATS + INTS)
    assert {c.autocast for c in CASES if not c.expected_errors()} >= {None, torch.float16,
                                                                      torch.bfloat16}
    assert {(c.height, c.width) for c in CASES} >= set(ELONGATED)
    assert {c.batch for c in CASES} == {1, 2, 3} and any(c.train for c in CASES)
    assert {c.arch for c in CASES} == {arch for _, arch in ALL_ARCHS}


@pytest.fixture(scope='module')
def model_of():
    """One model per arch, built on first use; the previous arch's model is dropped (cases are
    grouped by arch) to keep memory low."""
    cache = {}

    def get(family, arch):
        if arch not in cache:
            cache.clear()
            torch.manual_seed(0)
            cache[arch] = backbone_class(family)(arch=arch)
        return cache[arch]

    return get


def _make_input(case):
    shape = (case.batch, case.channels, case.height, case.width)
    if case.dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    if case.dtype == torch.int64:
        return torch.randint(-5, 5, shape)
    return torch.randn(shape).to(case.dtype)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_fuzz_correct_output_or_documented_error(case, model_of):
    model = model_of(case.family, case.arch).train(case.train)
    x = _make_input(case)
    expected = case.expected_errors()
    try:
        with torch.no_grad(), torch.autocast('cpu', dtype=case.autocast or torch.bfloat16,
                                             enabled=case.autocast is not None):
            outs = model(x)
    except ValueError as err:
        matching = [name for name in expected if _matches(ERRORS[name], str(err))]
        assert matching, f'ValueError {str(err)!r}, expected one of {expected or "no error"}'
        return
    except Exception as err:  # noqa: B902 - anything else is a bug
        pytest.fail(f'{type(err).__name__}: {err} (expected {expected or "a correct output"})')
    assert not expected, f'no error raised, expected one of {expected}'
    assert isinstance(outs, tuple) and len(outs) == len(model.out_indices)
    assert model.out_channels == CHANNELS[case.arch]
    for out, channels, stride in zip(outs, model.out_channels, model.out_strides):
        assert out.shape == (case.batch, channels, math.ceil(case.height / stride),
                             math.ceil(case.width / stride)), (out.shape, stride)
        assert out.is_floating_point() and bool(torch.isfinite(out).all())


def _matches(pattern, text):
    import re
    return re.search(pattern, text) is not None
