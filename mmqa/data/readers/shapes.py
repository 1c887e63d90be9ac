"""The built-in shapes world (`mmqa.data.worlds.shapes`), generated on first read."""

from mmqa.data.readers.generated import GeneratedReader
from mmqa.data.worlds.shapes import generate_shapes


class ShapesReader(GeneratedReader):
    generate = generate_shapes
