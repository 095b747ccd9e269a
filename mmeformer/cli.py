"""Shared pieces of the command-line tools in tools/: parsers built from a tool's docstring and
the HxW image-size argument."""
import argparse
from typing import Tuple


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the docstring's first paragraph and whose epilog
    (printed verbatim after the options) is the rest."""
    summary, _, details = doc.partition('\n\n')
    return argparse.ArgumentParser(description=summary, epilog=details or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def image_size(text: str) -> Tuple[int, int]:
    """'800x1344' -> (800, 1344); '512' -> (512, 512)."""
    h, _, w = text.partition('x')
    try:
        size = int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a size: write HxW, e.g. 800x1344')
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: height and width must be positive')
    return size
