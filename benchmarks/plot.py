"""The latency figure of a report, drawn as the papers draw theirs: published accuracy against
measured latency, one labelled line per family (the reference implementations as their own
series where the report timed them), and latency against MACs with every point labelled."""
import math
from typing import Dict, List, Sequence

from mmeformer.models.archs import split_variant

from .published import COCO_BOX_AP, IMAGENET_TOP1

ACCURACY_PANELS = (
    (IMAGENET_TOP1, (224, 224), 'ImageNet top-1 against latency',
     'ImageNet-1k top-1 % (published)'),
    (COCO_BOX_AP, (800, 1344), 'COCO box AP against latency', 'Mask R-CNN 1x box AP (published)'),
)
FAMILY_STYLE = {'EfficientFormer': ('tab:blue', 'o'), 'EfficientFormerV2': ('tab:orange', 's'),
                'EfficientViT': ('tab:green', '^')}
SIZE_MARKERS = ['o', 's', '^', 'D', 'v', 'P']


def _family(variant: str) -> str:
    return split_variant(variant)[0]


def _arch(variant: str) -> str:
    return split_variant(variant)[1]


def _log_axis(axis, values: Sequence[float]) -> None:
    """A log axis with plain-number ticks, about five of them whatever the range, instead of
    overlapping powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    decades = math.log10(max(values) / max(min(values), 1e-9))
    subs = ((1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0) if decades < 1.2 else
            (1.0, 2.0, 3.0, 5.0) if decades < 2.5 else (1.0, 2.0, 5.0) if decades < 5 else (1.0, ))
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    axis.set_minor_formatter(NullFormatter())


def _accuracy_panel(ax, rows: List, published: Dict[str, float], size, title: str,
                    ylabel: str) -> None:
    """Published accuracy (y) against measured eager batch-1 latency (x) at ``size``: a line
    per (implementation, family), points labelled with the arch."""
    points = [m for m in rows if (m.height, m.width) == size and m.runtime == 'eager'
              and m.batch == 1 and m.variant in published]
    series = {}
    for m in points:
        series.setdefault((m.implementation, _family(m.variant)), []).append(m)
    for (implementation, family), members in sorted(series.items()):
        members.sort(key=lambda m: m.median_ms)
        color, marker = FAMILY_STYLE[family]
        ours = implementation == 'mmeformer'
        label = family if ours else f'{family} ({implementation})'
        ax.plot([m.median_ms for m in members], [published[m.variant] for m in members],
                marker=marker, color=color, linestyle='-' if ours else '--',
                alpha=1.0 if ours else 0.55, markerfacecolor=color if ours else 'white',
                label=label)
        if ours:
            for m in members:
                ax.annotate(_arch(m.variant).upper(), (m.median_ms, published[m.variant]),
                            textcoords='offset points', xytext=(5, -10), fontsize=8,
                            color=color)
    ax.set(xscale='log', xlabel=f'latency, batch 1 (ms, measured at {size[0]}x{size[1]})',
           ylabel=ylabel, title=title)
    ax.grid(True, which='major', alpha=0.3)
    if points:
        _log_axis(ax.xaxis, [m.median_ms for m in points])
        ax.legend(fontsize=7, loc='lower right')
    else:
        ax.text(0.5, 0.5, f'no eager run at {size[0]}x{size[1]} of a variant with a\n'
                'published number in this report', ha='center', va='center',
                transform=ax.transAxes, fontsize=8)


def _macs_panel(ax, rows: List) -> None:
    """Measured latency against MACs, mmeformer eager batch 1: colour by family, marker by
    input size, every point labelled."""
    ours = [m for m in rows if m.implementation == 'mmeformer' and m.runtime == 'eager'
            and m.batch == 1]
    sizes = sorted({(m.height, m.width) for m in ours}, key=lambda s: s[0] * s[1])
    for family, (color, _) in FAMILY_STYLE.items():
        for index, size in enumerate(sizes):
            pts = [m for m in ours if _family(m.variant) == family
                   and (m.height, m.width) == size]
            if not pts:
                continue
            pts.sort(key=lambda m: m.gmacs)
            ax.plot([m.gmacs for m in pts], [m.median_ms for m in pts], color=color,
                    marker=SIZE_MARKERS[index % len(SIZE_MARKERS)], markersize=5,
                    linewidth=0.8, alpha=0.8)
            for m in pts:
                ax.annotate(_arch(m.variant).upper(), (m.gmacs, m.median_ms),
                            textcoords='offset points', xytext=(4, -9), fontsize=6.5,
                            color=color)
    # Legends: colours are families, markers are sizes.
    for family, (color, _) in FAMILY_STYLE.items():
        if any(_family(m.variant) == family for m in ours):
            ax.scatter([], [], color=color, marker='o', label=family)
    for index, size in enumerate(sizes):
        ax.scatter([], [], color='gray', marker=SIZE_MARKERS[index % len(SIZE_MARKERS)],
                   label=f'{size[0]}x{size[1]}')
    ax.set(xscale='log', yscale='log', xlabel='GMACs (counted)',
           ylabel='latency, batch 1 (ms, measured)', title='Latency against MACs (mmeformer)')
    ax.grid(True, which='major', alpha=0.3)
    if ours:
        _log_axis(ax.xaxis, [m.gmacs for m in ours])
        _log_axis(ax.yaxis, [m.median_ms for m in ours])
        ax.legend(fontsize=7, loc='upper left')


def plot(report, path: str) -> None:
    import matplotlib  # an extra: only the figure needs it
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = report.measurements
    # An accuracy panel for each published table whose input size the report timed.
    panels = [(table, size, title, ylabel) for table, size, title, ylabel in ACCURACY_PANELS
              if any((m.height, m.width) == size and m.variant in table for m in rows)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(6 * (len(panels) + 1), 5.6),
                             squeeze=False)
    for ax, (table, size, title, ylabel) in zip(axes[0], panels):
        _accuracy_panel(ax, rows, table, size, title, ylabel)
    _macs_panel(axes[0][-1], rows)
    env = report.environment
    dtypes = '/'.join(sorted({m.dtype for m in rows})) or 'float32'
    fig.suptitle(f"Measured on {env['cpu']}, device {env['device']}, {env['threads']} threads, "
                 f"{dtypes}, torch {env['torch']}; accuracies are the papers' (not measured "
                 'here)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
